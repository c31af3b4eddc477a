"""Sample-level gradient inversion baselines: DLG, iDLG and Inverting Gradients, on the common attack interface.

Each baseline reconstructs the B images of the client's batch (B from ``view.batch_size``; sample-level attacks cannot
run without it) by matching the gradient of dummy images to the target gradient:

- :class:`DLG` (Zhu et al. 2019, "Deep Leakage from Gradients", Alg. 1): dummy images and dummy soft labels
  (logits, passed through a softmax), squared L2 gradient distance ``||grad(x', y') - g||^2`` summed over all layers,
  optimised jointly with L-BFGS. Pixels are free (no box); results are clamped to [0, 1] only for reporting.
- :class:`iDLG` (Zhao et al. 2020, "iDLG: Improved Deep Leakage from Gradients"): DLG for B = 1 with the label read
  analytically from the sign of the last layer's gradient (``label_strategy='idlg'``), so only the image is optimised.
- :class:`InvertingGradients` (Geiping et al. 2020, "Inverting Gradients - How easy is it to break privacy in
  federated learning?", eq. 4): ``1 - <grad(x', y), g> / (||grad(x', y)|| ||g||)`` over all layers jointly plus a
  total-variation prior, Adam on the signed gradient, step decay at 3/8, 5/8 and 7/8 of the steps (x0.1), pixels
  boxed to [0, 1] after every step, several restarts (the one with the lowest final gradient loss is kept, their
  ``scoring_choice='loss'``), labels from label inference.

The victim is deep-copied at :meth:`bind`, kept in eval mode (BatchNorm running statistics, as on the client, see
:mod:`inversion.scenario`) and never stepped: the dummy gradient is ``torch.autograd.grad`` w.r.t. the victim's
parameters with ``create_graph=True``, and backward runs only into the dummy variables (``inputs=``).

Representative image: sample-level attacks reconstruct B images while the user-level comparison needs one image per
user. The server has no ground truth, so each baseline reports the reconstruction whose *own* single-image gradient
(victim in eval mode, CE with that image's label) has the lowest cosine distance to the target gradient, i.e. the
image that explains the observed update best; ties go to the lowest index. For B = 1 it is the only image.

``ATTACKS`` maps short names ('dlg', 'idlg', 'inverting_gradients', 'user_level') to import paths, for Python callers
(scripts, notebooks), and :func:`resolve_attack` imports them lazily. attack.py does not use it: its
``attack.class_path`` takes a dotted import path (``lightning_modules.baselines.DLG``; jsonargparse also resolves the
bare class name of an attack attack.py imports, e.g. ``DLG``), not these short names.
"""

from __future__ import annotations

import copy
import importlib
import math
import warnings
from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from inversion.label_inference import LabelInference, infer_labels
from inversion.logging_utils import log_image_grid
from inversion.numbers import float32_step_size
from inversion.objectives import pow2_scale
from inversion.scenario import ServerView, check_target_gradient, victim_parameters
from lightning_modules.base_attack import AttackDivergedError, AttackResult, GradientInversionAttack

GradientList = Sequence[torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Pure functions (tested directly)
# ----------------------------------------------------------------------------------------------------------------


def _as_list(g: "GradientList | OrderedDict[str, torch.Tensor]") -> list[torch.Tensor]:
    return list(g.values()) if isinstance(g, dict) else list(g)


def l2_gradient_distance(
    dummy: "GradientList | OrderedDict[str, torch.Tensor]", target: "GradientList | OrderedDict[str, torch.Tensor]"
) -> torch.Tensor:
    """DLG's gradient distance (Zhu et al. 2019, Alg. 1): ``sum_layers ||d_l - t_l||_2^2``.

    Args:
        dummy, target: per-layer gradients (lists or OrderedDicts in the same order), matching shapes, float.

    Returns:
        float scalar tensor >= 0 (differentiable w.r.t. ``dummy``).

    Raises:
        ValueError: different numbers of layers or a shape mismatch.
    """
    d, t = _as_list(dummy), _as_list(target)
    _check_pairs(d, t)
    return sum(((a - b) ** 2).sum() for a, b in zip(d, t))


def cosine_gradient_distance(
    dummy: "GradientList | OrderedDict[str, torch.Tensor]",
    target: "GradientList | OrderedDict[str, torch.Tensor]",
    eps: float = 1e-12,
) -> torch.Tensor:
    """Geiping et al. 2020, eq. 4: ``1 - <d, t> / (||d|| ||t||)`` with every layer concatenated into one vector.

    As in their ``reconstruction_costs`` (cost_fn='sim', all layers, equal weights): the inner product and both norms
    are summed over all layers before dividing. ``eps`` floors each norm on its own (a zero gradient gives 1), so the
    distance is scale-invariant for gradients whose norm is above ``eps``. The floor is applied to the squared norm
    before the square root (``sqrt(max(||d||^2, eps^2))``), so an exactly zero dummy gradient has a finite gradient
    (flooring after the root backpropagated 0/0 = NaN through sqrt at 0). The target is first multiplied by one
    power of two (:func:`inversion.objectives.pow2_scale` of its largest |entry|: exact, the distance unchanged
    bit for bit when the target's norm is above ``eps``; below it the floor no longer applies to a non-zero target),
    so a target too large for float32 squared norms (a huge DP noise) still gives a finite distance and gradient;
    a float16/bfloat16 target is multiplied in float32. One pass over the target per call: small beside the dummy
    gradient's double backward of the B images.

    Returns:
        float scalar tensor in [0, 2] (differentiable w.r.t. ``dummy``).

    Raises:
        ValueError: different numbers of layers or a shape mismatch.
    """
    d, t = _as_list(dummy), _as_list(target)
    _check_pairs(d, t)
    amax = [b.detach().abs().amax().float() for b in t if b.numel()]
    scale = pow2_scale(torch.stack(amax).amax()) if amax else None
    if scale is not None:
        t = [b * scale.to(b.device, torch.promote_types(b.dtype, torch.float32)) for b in t]
    dot = sum((a * b).sum() for a, b in zip(d, t))
    dn = sum(a.pow(2).sum() for a in d)
    tn = sum(b.pow(2).sum() for b in t)
    return 1 - dot / (dn.clamp_min(eps**2).sqrt() * tn.clamp_min(eps**2).sqrt())


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic L1 total variation as in Geiping et al.'s ``inversefed.metrics.total_variation``.

    ``TV(x) = mean |x[..., :, 1:] - x[..., :, :-1]| + mean |x[..., 1:, :] - x[..., :-1, :]|`` (means over every
    batch element, channel and pixel pair), so the value does not grow with image size or batch size.

    Args:
        x: float (..., H, W), typically (B, C, H, W) in [0, 1].

    Returns:
        float scalar tensor >= 0.
    """
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dw + dh


def _check_pairs(d: list[torch.Tensor], t: list[torch.Tensor]) -> None:
    if len(d) != len(t):
        raise ValueError(f"gradient lists differ in length: {len(d)} dummy layers vs {len(t)} target layers")
    for i, (a, b) in enumerate(zip(d, t)):
        if a.shape != b.shape:
            raise ValueError(f"gradient layer {i}: dummy shape {tuple(a.shape)} vs target shape {tuple(b.shape)}")


def labels_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Expand per-class counts (C,) that sum to B into B int64 labels, sorted by class (e.g. [0, 2, 1] -> [0, 2, 2]).

    Raises:
        ValueError: negative or non-integer counts.
    """
    c = counts.detach().cpu()
    if (c < 0).any() or not torch.equal(c, c.round()):
        raise ValueError(f"label counts must be non-negative integers, got {c.tolist()}")
    return torch.repeat_interleave(torch.arange(c.numel()), c.long())


# ----------------------------------------------------------------------------------------------------------------
# Shared machinery
# ----------------------------------------------------------------------------------------------------------------


def _needs_batch_size_message(attack_name: str) -> str:
    return (
        f"{attack_name} is a sample-level attack and needs the batch size B (it reconstructs B images), but the "
        "server view has batch_size=None; use a threat model that reveals B, or the user-level attack"
    )


def _single_image_message(batch_size: int) -> str:
    return (f"iDLG is defined for a single image (B = 1), got batch_size={batch_size}; use DLG or InvertingGradients "
            "for B > 1")


class SampleLevelAttack(GradientInversionAttack, abstract_base=True):
    """Common part of the sample-level baselines: binding, frozen victim, dummy gradients, representative choice.

    Subclasses create their dummy variables in ``_init_variables`` and implement ``configure_optimizers``,
    ``training_step`` and ``result``.
    """

    #: measured on CPU with a tiny victim (DLG, iDLG, InvertingGradients, through a Trainer): these run. 'bf16'
    #: is Lightning's alias of 'bf16-mixed', '32' and '64' of '32-true' and '64-true'. Refused: 'bf16-true' and
    #: '16-true' (Lightning converts the whole module, victim copy, target gradient and pixels, to half precision, so
    #: the gradient matching runs with a 8/11-bit mantissa, and result() scores the float32 reconstructions with the
    #: converted victim: "expected scalar type Float but found BFloat16"/"Half"; DLG and iDLG under '16-true'
    #: diverge before that), and '16-mixed' (fp16 AMP: Lightning refuses L-BFGS with a grad scaler, and IG's signed
    #: gradient would pass through one; on CPU Lightning replaces '16-mixed' by 'bf16-mixed', which is accepted).
    #: '64-true' is safe here because bind deep-copies the victim (the conversion never reaches the caller's model);
    #: result() scores in the converted copy's float64 and returns float32 images (tests/test_baselines_review.py).
    #: Under 'bf16-mixed' the gradient matching itself runs in float32 (:meth:`_float32`): these attacks have no
    #: network of their own for bf16 to speed up, and a bf16 victim gave a cosine floor of 1.9e-2 at the true image.
    supported_precisions = ("32-true", "32", "64-true", "64", "bf16-mixed", "bf16")
    #: the fix an :class:`AttackDivergedError` suggests (these attacks have no prior weight to raise)
    divergence_hint = "Lower attack.lr, or check the target gradient (a defense with a huge noise scale?)."

    def __init__(
        self,
        steps: int = 300,
        label_strategy: str = "bias_corrected",
        seed: int = 0,
        log_images_every: int = 0,
        log_prefix: str = "",
    ) -> None:
        super().__init__(steps, label_strategy, seed, log_images_every, log_prefix)
        self.victim: Optional[torch.nn.Module] = None
        self.batch_size: Optional[int] = None
        self.image_shape: Optional[tuple[int, int, int]] = None
        self.num_classes: Optional[int] = None
        self.label_inference: Optional[LabelInference] = None
        self._target_names: list[str] = []
        self._steps_done = 0

    def on_save_checkpoint(self, checkpoint) -> None:
        """As the base, plus the steps done (a resumed run reports the run's total steps, not those since resume)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["attack_steps_done"] = self._steps_done

    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        self._steps_done = int(checkpoint.get("attack_steps_done", checkpoint.get("global_step", 0)))

    # -- binding ---------------------------------------------------------------------------------------------------

    def bind(self, view: ServerView, prior: Optional[Any] = None) -> "SampleLevelAttack":
        """Take what the server sees; ``prior`` is ignored (these baselines have none).

        Raises:
            ValueError: ``view.batch_size`` is None (sample-level attacks reconstruct exactly B images).
            TargetGradientError: the target gradient does not fit the victim or holds NaN/inf.
        """
        if view.batch_size is None:
            raise ValueError(_needs_batch_size_message(type(self).__name__))
        if view.batch_size < 1:
            raise ValueError(f"view.batch_size must be >= 1, got {view.batch_size}")
        check_target_gradient(view.victim, view.target_gradient)
        self.victim = copy.deepcopy(view.victim).eval()
        params = victim_parameters(self.victim)
        for n in self._target_names:  # re-binding: drop the previous target
            delattr(self, n)
        self._target_names = []
        for i, name in enumerate(params):
            buf = f"_target_{i}"
            self.register_buffer(buf, view.target_gradient[name].detach().float().clone(), persistent=False)
            self._target_names.append(buf)
        self.batch_size = int(view.batch_size)
        self.image_shape = tuple(int(s) for s in view.image_shape)
        self.num_classes = int(view.num_classes)
        self.history = {}
        self._steps_done = 0
        self._init_variables(view)
        return self

    def check_threat(self, batch_size: Optional[int], reveal_batch_size: bool, known_labels: bool) -> None:
        """:meth:`GradientInversionAttack.check_threat` after the check of :meth:`bind`: the threat model must
        reveal B.

        Raises:
            ValueError: ``reveal_batch_size`` is False; then the label strategy's mismatches (base class).
        """
        if not reveal_batch_size:
            raise ValueError(_needs_batch_size_message(type(self).__name__))
        super().check_threat(batch_size, reveal_batch_size, known_labels)

    def _init_variables(self, view: ServerView) -> None:
        raise NotImplementedError

    def _require_bound(self) -> None:
        if self.victim is None:
            raise RuntimeError(f"{type(self).__name__}: call bind(view) before fitting or asking for the result")

    def train(self, mode: bool = True) -> "SampleLevelAttack":
        """Lightning switches the module to train mode at fit start; the victim always stays in eval mode."""
        super().train(mode)
        if self.victim is not None:
            self.victim.eval()
        return self

    def _init_pixels(self, *leading: int) -> torch.Tensor:
        """Seeded initial pixels, float32 (*leading, C, H, W) ~ N(0.5, 0.5^2), in [0, 1] pixel units (unclamped).

        A standard normal ``randn`` in the victim's normalised input space when it normalises with the default
        ``Normalize(0.5, 0.5)`` (:mod:`lightning_modules.classifier`), as Geiping et al.'s inversefed draws its
        start (``randn`` on normalised pixels). Not DLG's original start: Zhu et al.'s code draws ``randn`` directly
        in its [0, 1] input space (no normalisation), i.e. N(0, 1) pixels; here DLG, iDLG and IG share this start.
        """
        gen = torch.Generator().manual_seed(self.seed)
        return 0.5 + 0.5 * torch.randn(*leading, *self.image_shape, generator=gen)

    # -- gradients -------------------------------------------------------------------------------------------------

    def targets(self) -> list[torch.Tensor]:
        """The target gradient as a list of tensors (victim parameter order), on the module's device: float32, or
        float64 under trainer precision '64-true' (Lightning converts the module's buffers with the victim copy)."""
        return [getattr(self, n) for n in self._target_names]

    def _float32(self):
        """A context that turns Lightning's autocast off: under 'bf16-mixed' the victim forward, the dummy gradient
        and the gradient distances run in the victim's own dtype (float32), as UserLevelInversion's matching does.
        In bf16 the cosine distance at the true image (B = 1) was 6.5e-3 to 1.9e-2 instead of ~1e-7: a bf16 methods table
        would handicap only the baselines."""
        return torch.autocast(self.device.type if self.device.type in ("cpu", "cuda") else "cpu", enabled=False)

    def dummy_gradient(self, x: torch.Tensor, y: torch.Tensor, create_graph: bool = True) -> list[torch.Tensor]:
        """``grad_w CE(f_w(x), y)`` (mean over the batch) w.r.t. the frozen victim's parameters.

        Args:
            x: float (n, C, H, W) dummy pixels. y: int64 (n,) hard labels or float (n, num_classes) probabilities.
            create_graph: keep the graph so that a distance of this gradient can be differentiated w.r.t. ``x``.

        Returns:
            list of float tensors, parameter shapes (a parameter that does not influence the output gets zeros).
        """
        params = list(victim_parameters(self.victim).values())
        with torch.enable_grad(), self._float32():
            loss = F.cross_entropy(self.victim(x), y)
            grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def _check_finite(self, loss: torch.Tensor, step: int, what: str = "gradient loss") -> None:
        if not torch.isfinite(loss).all():
            raise AttackDivergedError(step, what, self.divergence_hint)

    def victim_dtype(self) -> torch.dtype:
        """The floating dtype of the bound victim copy: float32, or float64 after a '64-true' fit (Lightning converts
        the whole module, victim copy included); float32 for a victim without floating parameters or buffers."""
        self._require_bound()
        for t in list(self.victim.parameters()) + list(self.victim.buffers()):
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    @torch.no_grad()
    def image_scores(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cosine gradient distance of each image's own single-image gradient to the target.

        The images (and float soft labels) are cast to :meth:`victim_dtype` first, so scoring float32 reconstructions
        works after a '64-true' fit (it crashed with "mat1 and mat2 must have the same dtype").

        Args:
            x: float (B, C, H, W) in [0, 1], any float dtype; y: int64 (B,) or float (B, num_classes) probabilities.

        Returns:
            float32 (B,) distances in [0, 2] on the CPU (lower: the image explains the update better).
        """
        dtype = self.victim_dtype()
        x = x.to(dtype)
        y = y.to(dtype) if y.is_floating_point() else y
        tg = self.targets()
        scores = []
        for i in range(x.shape[0]):
            with self._float32():
                g = self.dummy_gradient(x[i : i + 1], y[i : i + 1], create_graph=False)
                scores.append(float(cosine_gradient_distance([a.detach() for a in g], tg)))
        return torch.tensor(scores, dtype=torch.float32)

    def _maybe_log_images(self, x: torch.Tensor, step: int) -> None:
        """Log ``x`` as ``<log_prefix>reconstruction`` every ``log_images_every`` steps and at the last step (the
        final reconstruction), as the user-level attack does; nothing when ``log_images_every`` is 0 or there is
        no logger."""
        every = self.log_images_every
        if every and (step % every == 0 or step == self.steps - 1) and self.logger is not None:
            log_image_grid(self.logger, f"{self.log_prefix}reconstruction", x.detach().clamp(0, 1), step=step)

    def _finish(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        labels: LabelInference,
        extras: Optional[dict] = None,
    ) -> AttackResult:
        """Package B reconstructions x (B, C, H, W) (clamped to [0, 1]) into an :class:`AttackResult`.

        The reported images are float32 on the CPU whatever the trainer precision ('64-true' fits hold float64
        pixels); they are scored (:meth:`image_scores`) in the victim copy's dtype.
        """
        x = x.detach().float().clamp(0, 1)
        scores = self.image_scores(x, y)
        best = int(torch.argmin(scores))
        hard = y if y.dim() == 1 else y.argmax(dim=1)
        ex = {"image_scores": scores.tolist(), "representative_index": best, "image_labels": hard.detach().cpu()}
        ex.update(extras or {})
        return AttackResult(
            representative=x[best : best + 1].cpu(),
            reconstructions=x.cpu(),
            denoised=None,
            labels=labels,
            steps=self._steps_done,
            history={k: list(v) for k, v in self.history.items()},
            extras=ex,
        )


# ----------------------------------------------------------------------------------------------------------------
# DLG / iDLG
# ----------------------------------------------------------------------------------------------------------------


class DLG(SampleLevelAttack):
    """Deep Leakage from Gradients (Zhu et al. 2019, Alg. 1).

    Variables: dummy pixels x' float32 (B, C, H, W), free (no box; initialised N(0.5, 0.5^2), see ``_init_pixels``),
    and, with ``label_strategy='optimize'``, dummy label logits float32 (B, num_classes) ~ N(0, 1) whose softmax is
    the soft label y'. Objective ``sum_l ||grad_l CE(f(x'), y') - g_l||^2`` (:func:`l2_gradient_distance`), minimised
    by ``torch.optim.LBFGS`` with a closure; each Trainer step is one ``LBFGS.step`` (up to ``max_iter`` inner
    iterations). With any other ``label_strategy`` (see :mod:`inversion.label_inference`) the labels are inferred and
    fixed (B labels expanded from the inferred counts) and only x' is optimised.

    Args:
        steps: L-BFGS ``step`` calls (Trainer steps). DLG ran 300 iterations of L-BFGS.
        lr: L-BFGS learning rate (DLG: 1).
        max_iter, history_size: L-BFGS inner iterations per step and memory (torch defaults 20 and 100, as in DLG's
            code, which used the defaults).
        line_search_fn: None (DLG's code) or 'strong_wolfe' (more robust on deep nets).
        label_strategy: 'optimize' (DLG's soft labels) or a label-inference strategy.
        seed, log_images_every, log_prefix: see :class:`GradientInversionAttack`.

    Raises at step time:
        AttackDivergedError: the gradient loss (or a pixel) becomes NaN/inf (L-BFGS without line search can blow up).
    """

    extra_label_strategies = ("optimize",)
    divergence_hint = ("Lower attack.lr, set attack.line_search_fn strong_wolfe (L-BFGS without a line search can "
                       "blow up), or check the target gradient (a defense with a huge noise scale?).")

    def __init__(
        self,
        steps: int = 300,
        lr: float = 1.0,
        max_iter: int = 20,
        history_size: int = 100,
        line_search_fn: Optional[str] = None,
        label_strategy: str = "optimize",
        seed: int = 0,
        log_images_every: int = 0,
        log_prefix: str = "",
    ) -> None:
        super().__init__(steps, label_strategy, seed, log_images_every, log_prefix)
        float32_step_size("DLG lr (attack.lr)", lr)  # NaN/inf or 1e38: not an error deep inside L-BFGS later
        if max_iter < 1 or history_size < 1:
            raise ValueError(
                f"DLG needs max_iter >= 1 and history_size >= 1; got {max_iter}, {history_size}"
            )
        if line_search_fn not in (None, "strong_wolfe"):
            raise ValueError(f"line_search_fn must be None or 'strong_wolfe', got {line_search_fn!r}")
        self.lr = lr
        self.max_iter = max_iter
        self.history_size = history_size
        self.line_search_fn = line_search_fn
        self.x: Optional[torch.nn.Parameter] = None
        self.label_logits: Optional[torch.nn.Parameter] = None

    @property
    def optimizes_labels(self) -> bool:
        """True when ``label_strategy == 'optimize'``: DLG's dummy soft labels are optimised with the pixels."""
        return self.label_strategy == "optimize"

    def _init_variables(self, view: ServerView) -> None:
        B = self.batch_size
        self.x = torch.nn.Parameter(self._init_pixels(B))
        if self.optimizes_labels:
            gen = torch.Generator().manual_seed(self.seed + 1)
            self.label_logits = torch.nn.Parameter(torch.randn(B, self.num_classes, generator=gen))
            self.label_inference = None
            self.register_buffer("fixed_labels", None, persistent=False)
        else:
            self.label_logits = None
            self.label_inference = infer_labels(
                view.target_gradient, self.num_classes, B, self.label_strategy, known_labels=view.labels
            )
            y = view.labels.long().cpu() if self.label_strategy == "known" else labels_from_counts(
                self.label_inference.counts
            )
            if y.numel() != B:
                raise ValueError(f"label inference gave {y.numel()} labels for a batch of B = {B}")
            self.register_buffer("fixed_labels", y.clone(), persistent=False)

    def dummy_variables(self) -> list[torch.nn.Parameter]:
        """The optimised tensors: ``[x]`` (float32 (B, C, H, W) pixels), plus the label logits float32
        (B, num_classes) when :attr:`optimizes_labels`. Valid after :meth:`bind`.
        """
        return [self.x] + ([self.label_logits] if self.optimizes_labels else [])

    def current_labels(self) -> torch.Tensor:
        """float (B, num_classes) soft labels (DLG) or int64 (B,) fixed labels."""
        return F.softmax(self.label_logits, dim=-1) if self.optimizes_labels else self.fixed_labels

    def configure_optimizers(self):
        self._require_bound()
        return torch.optim.LBFGS(
            self.dummy_variables(),
            lr=self.lr,
            max_iter=self.max_iter,
            history_size=self.history_size,
            line_search_fn=self.line_search_fn,
        )

    def training_step(self, batch, batch_idx):
        self._require_bound()
        step = int(batch_idx)
        opt = self.optimizers()
        tg = self.targets()
        last = {}

        def closure():
            opt.zero_grad()
            with self._float32():
                g = self.dummy_gradient(self.x, self.current_labels(), create_graph=True)
                loss = l2_gradient_distance(g, tg)
            self._check_finite(loss, step)
            self.manual_backward(loss, inputs=self.dummy_variables())
            last["loss"] = loss.detach()
            return loss

        opt.step(closure=closure)
        self._check_finite(self.x.detach(), step, "image")
        self._steps_done += 1
        self.record({"grad_loss": float(last["loss"])}, prog_bar=("grad_loss",))
        self._maybe_log_images(self.x, step)

    def result(self) -> AttackResult:
        """B reconstructions clamped to [0, 1]; labels: the inferred ones, or (DLG) the argmax of the soft labels.

        ``extras``: 'image_scores' (B,), 'representative_index', 'image_labels' int64 (B,), and for DLG
        'soft_labels' float32 (B, num_classes).
        """
        self._require_bound()
        y = self.current_labels().detach()
        extras = {}
        if self.optimizes_labels:
            hard = y.argmax(dim=1).cpu()
            counts = torch.bincount(hard, minlength=self.num_classes).float()
            labels = LabelInference(counts, counts > 0, int(counts.argmax()), "dlg")
            extras["soft_labels"] = y.float().cpu()
        else:
            labels = self.label_inference
        return self._finish(self.x, y, labels, extras)


class iDLG(DLG):
    """Improved DLG (Zhao et al. 2020): DLG for a single image with the analytically extracted label.

    For B = 1 the last layer's bias gradient is ``p - onehot(y)``, negative only at the true class, so the label is
    exact (``label_strategy='idlg'``; 'known' is also accepted) and L-BFGS optimises the image alone with
    :func:`l2_gradient_distance`. Arguments as :class:`DLG`.

    Raises:
        ValueError: at construction, ``label_strategy`` is not 'idlg'/'known'; at bind (and earlier in
            :meth:`check_threat`), B is not 1 (see :meth:`bind`).
    """

    def __init__(
        self,
        steps: int = 300,
        lr: float = 1.0,
        max_iter: int = 20,
        history_size: int = 100,
        line_search_fn: Optional[str] = None,
        label_strategy: str = "idlg",
        seed: int = 0,
        log_images_every: int = 0,
        log_prefix: str = "",
    ) -> None:
        if label_strategy not in ("idlg", "known"):
            raise ValueError(f"iDLG reads the label analytically: label_strategy must be 'idlg' or 'known', got "
                             f"{label_strategy!r}")
        super().__init__(steps, lr, max_iter, history_size, line_search_fn, label_strategy, seed, log_images_every,
                         log_prefix)

    def bind(self, view: ServerView, prior: Optional[Any] = None) -> "iDLG":
        """:meth:`SampleLevelAttack.bind` restricted to a single image; returns self.

        Raises:
            ValueError: ``view.batch_size`` is given and is not 1 (here); ``view.batch_size`` is None (by
                :meth:`SampleLevelAttack.bind`, which needs B).
            TargetGradientError: the target gradient does not fit the victim or holds NaN/inf.
        """
        if view.batch_size is not None and view.batch_size != 1:
            raise ValueError(_single_image_message(view.batch_size))
        return super().bind(view, prior)

    def check_threat(self, batch_size: Optional[int], reveal_batch_size: bool, known_labels: bool) -> None:
        """As :meth:`SampleLevelAttack.check_threat`, after refusing a known B other than 1 (revealed or not: iDLG
        cannot attack such users either way).

        Raises:
            ValueError: ``batch_size`` is given and is not 1; then as :meth:`SampleLevelAttack.check_threat`.
        """
        if batch_size is not None and batch_size != 1:
            raise ValueError(_single_image_message(batch_size))
        super().check_threat(batch_size, reveal_batch_size, known_labels)


# ----------------------------------------------------------------------------------------------------------------
# Inverting Gradients
# ----------------------------------------------------------------------------------------------------------------


class InvertingGradients(SampleLevelAttack):
    """Inverting Gradients (Geiping et al. 2020, eq. 4), as in their ``inversefed.GradientReconstructor``.

    Variables: R restarts of B dummy images, float32 (R, B, C, H, W), initialised N(0.5, 0.5^2) (seeded) and clamped
    to [0, 1]. Per restart r the loss is ``cosine_gradient_distance(grad CE(f(x_r), y), g) + tv_weight * TV(x_r)``;
    the restarts are independent (one backward each, per-element Adam), so one optimiser over all of them equals R
    separate runs. After backward the gradient is replaced by its sign (``signed``), Adam steps, the learning rate
    decays by 0.1 at 3/8, 5/8 and 7/8 of the steps (``lr_decay``) and the pixels are clamped to [0, 1] (``boxed``).
    Labels y: int64 (B,) expanded from the counts of :func:`inversion.label_inference.infer_labels` (or the known
    labels). At the end the restart with the lowest gradient loss (without TV) at its final pixels is kept.

    Diverged restarts: as inversefed/breaching drop a non-finite trial and score the finite ones, a restart whose loss,
    pixel gradient or pixels become NaN/inf is frozen from that step on (pixels kept at their last finite values, or
    as they were when its loss went non-finite; gradient zeroed, no further backward), gets a final score of +inf in
    ``extras['restart_grad_loss']`` and is never the best restart; a ``UserWarning`` names it. Only when every
    restart has diverged does the attack raise.

    Units against inversefed: this implementation works in [0, 1] pixels x, inversefed optimises normalised pixels
    x_n = (x - m) / s. Under the victims' default ``Normalize(0.5, 0.5)`` (x_n = 2x - 1): the start N(0.5, 0.5^2) here
    is inversefed's randn, the box [0, 1] is its [-1, 1], and with the signed gradient Adam moves every pixel by about
    lr per step in the units it optimises, so ``lr`` 0.1 here (0.1 in [0, 1] units = 0.2 in normalised units) is
    twice inversefed's step at its lr 0.1 (inversefed's 0.1 equals lr 0.05 here). :func:`total_variation` has
    inversefed's definition (``inversefed.metrics.total_variation``: mean absolute horizontal plus vertical
    differences) and is linear in the pixel scale, so TV(x_n) = 2 TV(x) and ``tv_weight`` w here equals w / 2 in
    inversefed's units (inversefed's default 1e-1 equals tv_weight 0.2 here; the default 1e-2 here is 5e-3 there).
    The cosine term does not depend on the pixel units (the victim sees the same normalised input).

    Args:
        steps: Adam steps (Geiping: 4800 to 24000 on CIFAR/ImageNet).
        lr: Adam learning rate on [0, 1] pixels (inversefed: 0.1 on normalised pixels, i.e. 0.05 here under
            Normalize(0.5, 0.5); see above).
        tv_weight: weight of :func:`total_variation` on [0, 1] pixels (inversefed's default config: 1e-1 on normalised
            pixels, i.e. 0.2 here under Normalize(0.5, 0.5); tune per dataset).
        restarts: R independent initialisations (inversefed: 1 by default, up to 8 in their experiments).
        signed, boxed, lr_decay: Geiping's switches, all on by default.
        label_strategy, seed, log_images_every, log_prefix: see :class:`GradientInversionAttack`.

    Raises at step time:
        AttackDivergedError: every restart has diverged (the step is the one at which the last restart did).
    """

    def __init__(
        self,
        steps: int = 4800,
        lr: float = 0.1,
        tv_weight: float = 1e-2,
        restarts: int = 4,
        signed: bool = True,
        boxed: bool = True,
        lr_decay: bool = True,
        label_strategy: str = "bias_corrected",
        seed: int = 0,
        log_images_every: int = 0,
        log_prefix: str = "",
    ) -> None:
        super().__init__(steps, label_strategy, seed, log_images_every, log_prefix)
        float32_step_size("InvertingGradients lr (attack.lr)", lr)
        if not (math.isfinite(tv_weight) and tv_weight >= 0):
            raise ValueError(f"InvertingGradients tv_weight must be a finite number >= 0, got {tv_weight}")
        if restarts < 1:
            raise ValueError(f"InvertingGradients restarts must be >= 1, got {restarts}")
        self.lr = lr
        self.tv_weight = tv_weight
        self.restarts = restarts
        self.signed = signed
        self.boxed = boxed
        self.lr_decay = lr_decay
        self.x: Optional[torch.nn.Parameter] = None
        #: restart index -> (step, what) for every restart that went non-finite (frozen, excluded from the choice)
        self.diverged: dict[int, tuple[int, str]] = {}

    def on_save_checkpoint(self, checkpoint) -> None:
        """As :class:`SampleLevelAttack`, plus the diverged restarts (a resumed run keeps them frozen)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["attack_diverged_restarts"] = {int(r): [int(st), str(w)] for r, (st, w) in self.diverged.items()}

    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("attack_diverged_restarts", {})
        self.diverged = {int(r): (int(st), str(w)) for r, (st, w) in saved.items()}

    def alive(self) -> torch.Tensor:
        """bool (R,) on the pixels' device: True for the restarts that have not diverged."""
        mask = torch.ones(self.restarts, dtype=torch.bool)
        for r in self.diverged:
            mask[r] = False
        return mask.to(self.x.device)

    def _diverge(self, r: int, step: int, what: str) -> None:
        """Freeze restart r (it went non-finite at ``step``; ``what``: which quantity) and warn once."""
        if r in self.diverged:
            return
        self.diverged[r] = (step, what)
        if len(self.diverged) >= self.restarts:  # the last one: _raise_if_all_diverged stops the attack instead
            return
        warnings.warn(
            f"InvertingGradients: restart {r} of {self.restarts} diverged at step {step} ({what} is NaN or inf); it is "
            "frozen and excluded from the best-restart choice, the other restarts go on",
            stacklevel=2,
        )

    def _raise_if_all_diverged(self, step: int) -> None:
        if len(self.diverged) < self.restarts:
            return
        detail = ", ".join(f"restart {r}: {w} at step {st}" for r, (st, w) in sorted(self.diverged.items()))
        raise AttackDivergedError(step, f"every one of the {self.restarts} restarts ({detail})", self.divergence_hint)

    def _init_variables(self, view: ServerView) -> None:
        B = self.batch_size
        self.diverged = {}
        self.label_inference = infer_labels(
            view.target_gradient, self.num_classes, B, self.label_strategy, known_labels=view.labels
        )
        if self.label_strategy == "known":
            y = view.labels.long().cpu()
        else:
            y = labels_from_counts(self.label_inference.counts)
        if y.numel() != B:
            raise ValueError(f"label inference gave {y.numel()} labels for a batch of B = {B}")
        self.register_buffer("fixed_labels", y.clone(), persistent=False)
        x = self._init_pixels(self.restarts, B)
        self.x = torch.nn.Parameter(x.clamp(0, 1) if self.boxed else x)

    def milestones(self) -> list[int]:
        """Steps at which the lr is multiplied by 0.1: 3/8, 5/8 and 7/8 of ``steps`` (inversefed's schedule)."""
        return [int(self.steps * 3 / 8), int(self.steps * 5 / 8), int(self.steps * 7 / 8)]

    def configure_optimizers(self):
        self._require_bound()
        opt = torch.optim.Adam([self.x], lr=self.lr)
        if not self.lr_decay:
            return opt
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=self.milestones(), gamma=0.1)
        return [opt], [sched]

    def restart_loss(self, r: int, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine gradient loss, TV) of restart r at the current pixels; scalars."""
        with self._float32():
            g = self.dummy_gradient(self.x[r], self.fixed_labels, create_graph=create_graph)
            return cosine_gradient_distance(g, self.targets()), total_variation(self.x[r])

    def training_step(self, batch, batch_idx):
        """One signed Adam step of every live restart; a restart whose loss, gradient or pixels turn NaN/inf is
        frozen (see the class docstring). Raises AttackDivergedError once every restart has diverged."""
        self._require_bound()
        step = int(batch_idx)
        opt = self.optimizers()
        opt.zero_grad()
        before = self.x.detach().clone()  # pixels at the start of the step: a diverged restart is put back to these
        grad_losses, tvs = [float("inf")] * self.restarts, [float("nan")] * self.restarts
        for r in range(self.restarts):
            if r in self.diverged:
                continue
            gl, tv = self.restart_loss(r, create_graph=True)
            loss = gl + self.tv_weight * tv
            if not torch.isfinite(loss):
                self._diverge(r, step, "gradient loss")
                continue
            self.manual_backward(loss, inputs=[self.x])  # one graph at a time; x.grad accumulates per restart slice
            grad_losses[r] = float(gl.detach())
            tvs[r] = float(tv.detach())
        self._raise_if_all_diverged(step)
        with torch.no_grad():
            bad_grad = ~torch.isfinite(self.x.grad.flatten(1)).all(dim=1)
            for r in bad_grad.nonzero().flatten().tolist():
                if r not in self.diverged:
                    self._diverge(r, step, "pixel gradient")
                    grad_losses[r] = float("inf")
            self._raise_if_all_diverged(step)
            self.x.grad[~self.alive()] = 0  # frozen restarts: no gradient (Adam's momentum is undone below)
        if self.signed:
            self.x.grad.sign_()
        lr = opt.param_groups[0]["lr"]  # the lr of this step (before the scheduler moves it)
        opt.step()
        if self.lr_decay:
            self.lr_schedulers().step()
        with torch.no_grad():
            if self.boxed:
                self.x.clamp_(0, 1)
            for r in (~torch.isfinite(self.x.flatten(1)).all(dim=1)).nonzero().flatten().tolist():
                if r not in self.diverged:
                    self._diverge(r, step, "image")
                    grad_losses[r] = float("inf")
            dead = ~self.alive()
            self.x[dead] = before[dead]  # frozen at their last finite (or diverged-at) pixels
        self._raise_if_all_diverged(step)
        self._steps_done += 1
        best = min(range(self.restarts), key=lambda i: grad_losses[i])
        self.record(
            {"grad_loss": grad_losses[best], "tv": tvs[best], "lr": lr}, prog_bar=("grad_loss",)
        )
        self._maybe_log_images(self.x[best], step)

    def result(self) -> AttackResult:
        """The best restart's B images in [0, 1] (lowest final cosine gradient loss, TV excluded), float32 on the CPU.

        Diverged restarts, and any whose final loss is NaN/inf, score +inf and are never chosen.

        ``extras``: 'restart_grad_loss' (R,) floats (+inf for diverged restarts), 'best_restart', 'diverged_restarts'
        {restart: (step, what)}, 'image_scores' (B,), 'representative_index', 'image_labels' int64 (B,).

        Raises:
            AttackDivergedError: no restart has a finite final gradient loss.
        """
        self._require_bound()
        finals = []
        with torch.enable_grad():
            for r in range(self.restarts):
                f = float("inf") if r in self.diverged else float(self.restart_loss(r, create_graph=False)[0])
                finals.append(f if math.isfinite(f) else float("inf"))
        finals_t = torch.tensor(finals)
        if not torch.isfinite(finals_t).any():
            raise AttackDivergedError(self._steps_done, f"the final gradient loss of every one of the {self.restarts} "
                                                         "restarts", self.divergence_hint)
        best = int(torch.argmin(finals_t))
        extras = {"restart_grad_loss": finals, "best_restart": best, "diverged_restarts": dict(self.diverged)}
        return self._finish(self.x[best], self.fixed_labels, self.label_inference, extras)


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

ATTACKS: dict[str, str] = {
    "user_level": "lightning_modules.user_level_inversion.UserLevelInversion",
    "dlg": "lightning_modules.baselines.DLG",
    "idlg": "lightning_modules.baselines.iDLG",
    "inverting_gradients": "lightning_modules.baselines.InvertingGradients",
}


def resolve_attack(name: str) -> type:
    """The attack class registered under the short ``name`` in :data:`ATTACKS` (e.g. 'dlg'), imported lazily.

    For Python callers; a config's ``attack.class_path`` wants the dotted import path instead (the value in
    :data:`ATTACKS`, e.g. ``lightning_modules.baselines.DLG``).

    Raises:
        ValueError: unknown name (the message lists the choices).
        ImportError: the registered module or class cannot be imported (the message names the import path).
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    path = ATTACKS[name]
    module_name, cls_name = path.rsplit(".", 1)
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"attack {name!r} is registered as {path}, which cannot be imported: {exc}") from exc
    return cls
