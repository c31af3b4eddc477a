"""Client-side defenses applied to an update before the server sees it (FedSGD gradient or FedAvg weight difference).

An update is an ``OrderedDict`` parameter name -> float tensor (see :mod:`inversion.scenario`). Every defense is a
callable ``update -> new update`` (same names, shapes, dtypes and devices; the input is never modified):

- :class:`Clip`: global L2 clipping, ``u * min(1, C / ||u||)`` with ``||u||`` over all tensors together.
- :class:`GaussianDP`: the Gaussian mechanism of DP-SGD (Abadi et al. 2016, Alg. 1) applied to the whole client
  update (user-level, as in DP-FedAvg, McMahan et al. 2018): clip globally to ``clip_norm`` C, then add
  N(0, (sigma C)^2) i.i.d. to every coordinate. (Abadi et al. clip per example and add the noise to the sum; the
  update here is one client's, so one clip and one noise draw.)
- :class:`TopKPruning`: gradient pruning (Zhu et al. 2019, sec. 5 "Gradient compression and sparsification"): per
  layer (per tensor), keep the ``k = max(1, round(keep_fraction * numel))`` entries of largest magnitude, zero the rest.
- :class:`Quantize`: per tensor, uniform quantisation with max-norm scaling (QSGD-style levels, Alistarh et al. 2017;
  QSGD itself scales by ||u||_2 and always rounds stochastically, TernGrad (Wen et al. 2017) is the max-norm,
  ``levels`` = 2 case): the sign and the magnitude rounded to one of ``levels`` equally spaced values in
  [0, max |u|] (zero included, so zeros stay zero); deterministic rounding to the nearest level, or stochastic
  (unbiased) rounding to one of the two neighbouring levels.
- :class:`SignCompression`: signSGD's sign (Bernstein et al. 2018) scaled as in Karimireddy et al. 2019 (EF-signSGD):
  per tensor ``sign(u) * ||u||_1 / nnz(u)``
  (the mean magnitude of the non-zero entries), so each tensor keeps its L1 mass (after pruning too) and only the
  sign pattern is revealed.
- :class:`Compose`: applies a list of defenses in order (e.g. clip, then prune, then noise).

Randomness: a defense built with an integer ``seed`` draws from a CPU ``torch.Generator`` re-seeded with that seed at
every call, so the same input always gets the same noise (and the same on every device); give each client its own
seed to get independent noise across clients (attack.py derives one per client and defense from the configured seed:
``attack.defense_seed``). ``seed=None`` draws from the global RNG.

Configs: :func:`build_defenses` turns ``[{name: gaussian_dp, clip_norm: 1.0, noise_multiplier: 0.1}, ...]`` into a
:class:`Compose`; names are the keys of :data:`DEFENSES`. Invalid values raise one ``ValueError`` naming the key and
its valid range, at construction.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch

from inversion.numbers import FLOAT32_MAX

Update = "OrderedDict[str, torch.Tensor]"
# The parameter that is a defense's strength on a privacy curve: the first of these a defense config holds
# (attack.defense_label and inversion.report read it).
STRENGTH_KEYS = ("sigma", "noise_multiplier", "keep_fraction", "levels", "clip_norm")


def _number(owner: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{owner}: {key} must be a finite number, got {value!r}")
    return float(value)


def _seed(owner: str, seed: Any) -> Optional[int]:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{owner}: seed must be an integer or None, got {seed!r}")
    if not -(2**63) <= seed < 2**64:  # torch.Generator.manual_seed's range: fail here, not at the first update
        raise ValueError(f"{owner}: seed must be in [-2**63, 2**64), got {seed!r}")
    return seed


def global_l2_norm(update: Update) -> torch.Tensor:
    """L2 norm of all tensors of the update taken together (float32 scalar, computed in float64 for accuracy)."""
    if not update:
        return torch.tensor(0.0)
    return torch.sqrt(sum(t.detach().double().pow(2).sum().cpu() for t in update.values())).float()


class Defense:
    """Base class: ``__call__(update) -> defended update`` (a new OrderedDict; the input is left untouched)."""

    name: str = "defense"

    def __call__(self, update: Update) -> Update:
        if not isinstance(update, Mapping):
            raise TypeError(f"{type(self).__name__} expects an OrderedDict name -> tensor, got {type(update).__name__}")
        return self.apply(OrderedDict(update))

    def apply(self, update: Update) -> Update:
        """The defense itself, called by ``__call__`` with a shallow copy of the update (the tensors are the caller's).

        Args:
            update: OrderedDict parameter name -> float tensor (a FedSGD gradient or a FedAvg weight difference).

        Returns:
            a new OrderedDict with the same names, shapes, dtypes and devices; implementations must not modify the
            input tensors in place.

        Raises:
            NotImplementedError: always, here; every defense overrides it.
        """
        raise NotImplementedError

    def _generator(self, seed: Optional[int]) -> Optional[torch.Generator]:
        return None if seed is None else torch.Generator(device="cpu").manual_seed(seed)

    @property
    def reproducible(self) -> bool:
        """True when the same input always gives the same output (no randomness, or randomness from its own seed);
        False when it draws from the global RNG (``seed=None``), so its output cannot be redrawn later."""
        return True

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Clip(Defense):
    """Global L2 clipping: ``u <- u * min(1, clip_norm / ||u||_2)``, the norm taken over every tensor together.

    Args:
        clip_norm: C > 0.

    Raises:
        ValueError: clip_norm <= 0 or not a finite number.
    """

    name = "clip"

    def __init__(self, clip_norm: float) -> None:
        self.clip_norm = _number("Clip", "clip_norm", clip_norm)
        if self.clip_norm <= 0:
            raise ValueError(f"Clip: clip_norm must be > 0, got {clip_norm}")

    def apply(self, update: Update) -> Update:
        """Scale every tensor by ``min(1, clip_norm / ||u||)`` (:func:`global_l2_norm`; an all-zero update is kept).
        See :meth:`Defense.apply`.

        Raises:
            ValueError: the update holds NaN or inf (its norm is not finite: clipping cannot bound it).
        """
        norm = float(global_l2_norm(update))
        if not math.isfinite(norm):
            bad = next((n for n, t in update.items() if not torch.isfinite(t).all()), "?")
            raise ValueError(f"Clip: the update's L2 norm is {norm} ({bad!r} holds NaN or inf): the client's update "
                             "diverged before the defense; check the victim and the client's data and learning rate")
        scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        return OrderedDict((n, t * scale) for n, t in update.items())


class GaussianDP(Defense):
    """Gaussian mechanism on the whole update (DP-SGD, Abadi et al. 2016; per client as in DP-FedAvg).

    ``u <- clip(u, C) + N(0, (sigma * C)^2 I)``: global L2 clipping to C (:class:`Clip`) then i.i.d. Gaussian noise of
    standard deviation ``sigma * C`` on every coordinate. The noise is drawn in float32 on the CPU (seeded, see the
    module docstring) and moved to each tensor's device.

    Args:
        clip_norm: C > 0.
        noise_multiplier: sigma >= 0 (``sigma`` is accepted as an alias; 0 means clipping only).
        seed: integer for reproducible noise (the same input gets the same noise), None for the global RNG.

    Raises:
        ValueError: clip_norm <= 0, sigma < 0, both ``noise_multiplier`` and ``sigma`` given with different values,
            neither given, a non-number sigma, or a non-integer seed (or one outside torch's [-2**63, 2**64)).
    """

    name = "gaussian_dp"

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: Optional[float] = None,
        seed: Optional[int] = None,
        sigma: Optional[float] = None,
    ) -> None:
        if noise_multiplier is None and sigma is None:
            raise ValueError("GaussianDP: noise_multiplier (alias sigma) is required, a number >= 0")
        if noise_multiplier is not None and sigma is not None:  # each checked first: a clear error, not float()'s
            if (_number("GaussianDP", "noise_multiplier", noise_multiplier)
                    != _number("GaussianDP", "sigma", sigma)):
                raise ValueError(f"GaussianDP: noise_multiplier={noise_multiplier} and sigma={sigma} disagree; "
                                 "give one")
        value = noise_multiplier if noise_multiplier is not None else sigma
        self.noise_multiplier = _number("GaussianDP", "noise_multiplier (sigma)", value)
        if self.noise_multiplier < 0:
            raise ValueError(f"GaussianDP: noise_multiplier (sigma) must be >= 0, got {value}")
        self.clip_norm = _number("GaussianDP", "clip_norm", clip_norm)
        if self.clip_norm <= 0:
            raise ValueError(f"GaussianDP: clip_norm must be > 0, got {clip_norm}")
        if self.noise_multiplier * self.clip_norm > FLOAT32_MAX:  # every noise coordinate would be inf in float32
            raise ValueError(f"GaussianDP: the noise scale sigma * clip_norm = {self.noise_multiplier * self.clip_norm:.3g} "
                             f"exceeds float32's largest value {FLOAT32_MAX:.3g} (the update is float32); lower sigma "
                             "or clip_norm")
        self.clip = Clip(self.clip_norm)
        self.seed = _seed("GaussianDP", seed)

    @property
    def noise_std(self) -> float:
        """Per-coordinate noise standard deviation sigma * C."""
        return self.noise_multiplier * self.clip_norm

    @property
    def reproducible(self) -> bool:
        """True with an integer seed or when sigma * C = 0 (clipping only). See :attr:`Defense.reproducible`."""
        return self.seed is not None or self.noise_std == 0

    def apply(self, update: Update) -> Update:
        """Clip globally to C, then add N(0, (sigma C)^2) noise to every coordinate; the result is cast back to each
        tensor's dtype. The noise is float32, drawn on the CPU tensor by tensor in update order, from a generator
        re-seeded with ``seed`` at each call (the global RNG when ``seed`` is None). With sigma * C = 0 this is
        :class:`Clip` alone. See :meth:`Defense.apply`."""
        clipped = self.clip.apply(update)
        if self.noise_std == 0:
            return clipped
        gen = self._generator(self.seed)
        out = OrderedDict()
        for n, t in clipped.items():
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32) * self.noise_std
            out[n] = (t.float() + noise.to(t.device)).to(t.dtype)
        return out


class TopKPruning(Defense):
    """Magnitude pruning per layer (Zhu et al. 2019's pruning defense): keep the largest |u| entries of each tensor.

    Each tensor keeps exactly ``k = max(1, round(keep_fraction * numel))`` entries (Python's ``round``: halves go to
    the even integer, so 0.5 of 5 or of 3 entries keeps 2; ties in magnitude broken by ``torch.topk``),
    the others become 0. Pruning per tensor (not globally) keeps every layer represented, as the per-layer sparsity
    of Zhu et al.'s experiments.

    Args:
        keep_fraction: in (0, 1]; 1 keeps everything.

    Raises:
        ValueError: keep_fraction not in (0, 1].
    """

    name = "topk_pruning"

    def __init__(self, keep_fraction: float) -> None:
        self.keep_fraction = _number("TopKPruning", "keep_fraction", keep_fraction)
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"TopKPruning: keep_fraction must be in (0, 1], got {keep_fraction}")

    def kept(self, numel: int) -> int:
        """Number of entries kept in a tensor of ``numel`` entries."""
        return min(numel, max(1, int(round(self.keep_fraction * numel))))

    def apply(self, update: Update) -> Update:
        """Per tensor, keep the :meth:`kept` entries of largest magnitude and zero the rest (a tensor that keeps
        all its entries is copied unchanged). See :meth:`Defense.apply`."""
        out = OrderedDict()
        for n, t in update.items():
            k = self.kept(t.numel())
            if k >= t.numel():
                out[n] = t.clone()
                continue
            flat = t.reshape(-1)
            idx = torch.topk(flat.abs(), k, sorted=False).indices
            mask = torch.zeros_like(flat, dtype=torch.bool)
            mask[idx] = True
            out[n] = torch.where(mask, flat, torch.zeros_like(flat)).reshape(t.shape)
        return out


class Quantize(Defense):
    """Uniform quantisation per tensor with max-norm scaling: ``q(u) = sign(u) * s * k / (levels - 1)``, s = max |u|
    (QSGD-style levels, Alistarh et al. 2017, which scales by ||u||_2 instead; TernGrad, Wen et al. 2017, at
    ``levels`` = 2).

    Each magnitude |u| / s in [0, 1] is mapped to one of ``levels`` equally spaced values k / (levels - 1),
    k = 0..levels-1 (0 and s included), and the sign is kept: a tensor holds at most 2 levels - 1 distinct values
    (levels = 2 is ternary, {-s, 0, s}). Zeros stay exactly zero, so quantising after pruning keeps the sparsity and
    an absent class's zero bias gradient stays zero. Deterministic: round k to the nearest level. Stochastic: with
    r = (levels - 1) |u| / s, k = floor(r) + Bernoulli(r - floor(r)), which is unbiased (E[q(u)] = u, as in QSGD).
    An all-zero or empty tensor is returned unchanged.

    Args:
        levels: integer >= 2.
        stochastic: stochastic rounding (default False: deterministic).
        seed: seed of the stochastic rounding (see the module docstring), None for the global RNG.

    Raises:
        ValueError: levels < 2 or not an integer, stochastic not a boolean, or a non-integer seed.
    """

    name = "quantize"

    def __init__(self, levels: int, stochastic: bool = False, seed: Optional[int] = None) -> None:
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"Quantize: levels must be an integer >= 2, got {levels!r}")
        self.levels = levels
        if not (isinstance(stochastic, bool) or (isinstance(stochastic, int) and stochastic in (0, 1))):
            # bool("false") is True: a string or other value would silently switch stochastic rounding on
            raise ValueError(f"Quantize: stochastic must be true or false, got {stochastic!r}")
        self.stochastic = bool(stochastic)
        self.seed = _seed("Quantize", seed)

    @property
    def reproducible(self) -> bool:
        """True for deterministic rounding, or stochastic rounding with an integer seed. See
        :attr:`Defense.reproducible`."""
        return not self.stochastic or self.seed is not None

    def apply(self, update: Update) -> Update:
        """Quantise each tensor on its own grid sign * max|u| * k / (levels - 1) (computed in float32, cast back to
        the tensor's dtype); all-zero and empty tensors are copied unchanged. See :meth:`Defense.apply`."""
        gen = self._generator(self.seed) if self.stochastic else None
        out = OrderedDict()
        for n, t in update.items():
            if t.numel() == 0:  # nothing to quantise (min/max of an empty tensor would raise)
                out[n] = t.clone()
                continue
            tf = t.float()
            scale = tf.abs().max()
            if float(scale) == 0:
                out[n] = t.clone()
                continue
            step = scale / (self.levels - 1)
            r = tf.abs() / step
            if self.stochastic:
                base = r.floor()
                u = torch.rand(t.shape, generator=gen, dtype=torch.float32).to(t.device)
                idx = base + (u < (r - base)).float()
            else:
                idx = r.round()
            idx = idx.clamp(0, self.levels - 1)
            out[n] = (torch.sign(tf) * idx * step).to(t.dtype)
        return out


class SignCompression(Defense):
    """signSGD's sign (Bernstein et al. 2018) with a per-tensor scale as in Karimireddy et al. 2019 (EF-signSGD,
    there ||u||_1 / d): ``u <- sign(u) * ||u||_1 / nnz(u)``.

    The scale is the mean magnitude of the non-zero entries, so the tensor's L1 norm is kept exactly and zeros stay
    zero (after top-k pruning the kept entries share the kept mass; a mean over all entries would shrink it by the
    keep fraction)."""

    name = "sign_compression"

    def apply(self, update: Update) -> Update:
        """Replace each tensor by ``sign(t) * sum|t| / count_nonzero(t)`` (an all-zero tensor stays zero). See
        :meth:`Defense.apply`."""
        return OrderedDict(  # the scale in float32 (a float16 sum overflows), cast back to the tensor's dtype
            (n, (torch.sign(t.float()) * (t.float().abs().sum() / t.count_nonzero().clamp_min(1))).to(t.dtype))
            for n, t in update.items()
        )


class Compose(Defense):
    """Apply defenses in list order: ``Compose([a, b])(u) == b(a(u))``. An empty list is the identity (a copy)."""

    name = "compose"

    def __init__(self, defenses: Sequence[Defense] = ()) -> None:
        defenses = list(defenses)
        for d in defenses:
            if not callable(d):
                raise ValueError(f"Compose: every element must be a defense (callable), got {d!r}")
        self.defenses = defenses

    def apply(self, update: Update) -> Update:
        """Copy the update, then call each defense on the previous one's output, in list order. See
        :meth:`Defense.apply`."""
        out = OrderedDict((n, t.clone()) for n, t in update.items())
        for d in self.defenses:
            out = d(out)
        return out

    def __len__(self) -> int:
        return len(self.defenses)

    @property
    def reproducible(self) -> bool:
        """True when every element is reproducible (an element without a ``reproducible`` attribute, e.g. a plain
        function, counts as not reproducible); True for an empty Compose. See :attr:`Defense.reproducible`."""
        return all(getattr(d, "reproducible", False) for d in self.defenses)


DEFENSES: dict[str, type] = {
    "clip": Clip,
    "gaussian_dp": GaussianDP,
    "topk_pruning": TopKPruning,
    "quantize": Quantize,
    "sign_compression": SignCompression,
}


def build_defense(spec: Mapping[str, Any]) -> Defense:
    """One defense from a config mapping ``{name: <key of DEFENSES>, **params}``.

    Raises:
        ValueError: missing/unknown name, unknown parameters (the accepted ones are listed), or invalid values.
    """
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"a defense config needs a 'name' (one of {sorted(DEFENSES)}), got {spec!r}")
    params = dict(spec)
    name = params.pop("name")
    if name not in DEFENSES:
        raise ValueError(f"unknown defense name {name!r}; choose one of {sorted(DEFENSES)}")
    cls = DEFENSES[name]
    accepted = ([] if cls.__init__ is object.__init__  # no settings (sign_compression)
                else [p for p in inspect.signature(cls.__init__).parameters if p != "self"])
    unknown = [k for k in params if k not in accepted]
    if unknown:
        raise ValueError(f"defense {name!r}: unknown parameter(s) {unknown}; accepted: {accepted}")
    try:
        return cls(**params)
    except TypeError as exc:  # a required parameter is missing
        raise ValueError(f"defense {name!r}: {exc}; accepted parameters: {accepted}") from exc


def build_defenses(specs: Optional[Iterable[Mapping[str, Any]]]) -> Compose:
    """A :class:`Compose` of the defenses listed in a config (applied in order); None or [] gives the identity.

    Raises:
        ValueError: as :func:`build_defense`, naming the offending entry's position.
    """
    out = []
    for i, spec in enumerate(specs or []):
        try:
            out.append(build_defense(spec))
        except ValueError as exc:
            raise ValueError(f"defenses[{i}]: {exc}") from exc
    return Compose(out)
