"""Label inference from the last fully connected layer's gradient (a registry of strategies, as in breaching).

For softmax cross-entropy averaged over a batch of B images, the gradient of the last layer's bias is

    g_c = dL/db_c = pbar_c - n_c / B,                                                     (1)

with pbar_c the batch-mean softmax probability of class c and n_c the number of images labelled c (Zhao et al. 2020,
iDLG; Wainakh et al. 2022, LLG). Classes absent from the batch have g_c = pbar_c >= 0; present ones are pulled down.

Strategies (``LABEL_STRATEGIES``):
- ``idlg``: B = 1, the single class with a negative gradient (Zhao et al. 2020).
- ``sign``: presence = classes with g_c < 0 (with B given, at most the B most negative); counts split evenly among
  them (no count estimate).
- ``bias_corrected`` (default): LLG-style count estimation (Wainakh et al. 2022, "User-level label leakage from
  gradients in federated learning"). Modelling each class's mean probability as an offset pi (the probability mass a
  class gets from images of other classes, estimated from the classes taken as absent, for which g_c = pi_c exactly)
  plus a self-confidence a = 1 - (C - 1) pi that keeps the probabilities summing to one, (1) becomes
  g_c = pi (1 - C n_c / B), hence n_c = B (pi - g_c) / (C pi). Presence is read from the sign (absent classes have
  g_c = pi_c >= 0 exactly), pi is the mean gradient of the classes read as absent. With B known, as in LLG's stage 1
  (Wainakh et al. 2022) and breaching's 'wainakh'/'bias-corrected' strategies, each of the k classes with g_c < 0
  first gets one image (a negative entry proves the class present), then the remaining B - k images are shared by
  the estimated counts beyond that first image, max(n_c - 1, 0), with largest-remainder rounding (total exactly B).
  When k > B (only possible with noise or a non-CE update) the one-each rule cannot hold and the estimates are
  rounded to B directly, so some negative classes get 0. Exact for a single-class batch, and under a uniform output
  (pi = 1/C) when every present class has n_c / B > pi. Limit: the bias gradient sums to zero over the classes, so
  pi cannot be read from g alone; a present class with n_c / B below its offset (one image of 20 under a uniform
  output) has g_c > 0, is read as absent (count 0) and biases pi. Scale-free; with no bias it uses the weight-row
  sums, whose signs follow the bias rule when the penultimate features are non-negative (after a ReLU and pooling,
  as in ResNet).
  Measured on mixed batches (``scripts/label_inference_audit.py``, ``reports/label_inference_audit_cpu/``): a trained
  victim leaks little (23-63% of images mislabelled by every strategy); with a random one this default mislabels
  11-30% and finds the dominant class in 12-15 of 15 batches at Dirichlet alpha 0.5 and 0.1.
- ``known``: the server is given the labels (threat model with known labels).

Ties: when classes share the most negative bias entry exactly (a sign compression or 2-level quantisation of the
update makes every present class equal), the dominant class is the tied class with the most negative weight-row sum
(:func:`break_dominant_tie`), not the lowest class id. Only for an informative signal (some entry negative): an
uninformative one keeps the fallback below.

Uninformative signal: when the last-layer signal has no negative entry (all zero, e.g. a defense zeroed or masked
the last layer; all equal; or a saturated victim), no class is proven present and every strategy falls back to the
argmin (class 0 for an all-equal signal). The result then has ``informative=False`` and :func:`infer_labels` warns
(``UserWarning``) that the labels are a guess; the counts are those of the fallback, unchanged.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class LabelInference:
    """Result of label inference.

    Attributes:
        counts: float32 (C,) estimated number of images per class (sums to B when B is known; else proportions).
        present: bool (C,) classes inferred present.
        dominant: the class with the largest estimated count.
        strategy: name of the strategy used.
        informative: False when the last-layer signal had no negative entry (no class proven present, e.g. an
            all-zero bias gradient under a defense): the counts are then the strategies' argmin fallback, a guess.
            True for 'known' labels and for results built elsewhere (default).
    """

    counts: torch.Tensor
    present: torch.Tensor
    dominant: int
    strategy: str
    informative: bool = True

    @property
    def proportions(self) -> torch.Tensor:
        """float32 (C,) estimated label distribution (sums to 1)."""
        return self.counts / self.counts.sum().clamp_min(1e-12)


def _output_side_gradient(target_gradient: "OrderedDict[str, torch.Tensor]", kinds, num_classes: int):
    """The output-side-most gradient of one of ``kinds`` with ``num_classes`` outputs: ('bias', g) for a 1-D
    ``*bias`` tensor, ('weight', g) for a 2-D one, or (None, None) when there is none."""
    for name in reversed(list(target_gradient)):
        g = target_gradient[name]
        if "bias" in kinds and g.dim() == 1 and g.shape[0] == num_classes and name.endswith("bias"):
            return "bias", g
        if "weight" in kinds and g.dim() == 2 and g.shape[0] == num_classes:
            return "weight", g
    return None, None


def _final_layer(target_gradient: "OrderedDict[str, torch.Tensor]", num_classes: int):
    """The output-side-most bias or weight gradient with ``num_classes`` outputs (see _output_side_gradient)."""
    return _output_side_gradient(target_gradient, ("bias", "weight"), num_classes)


def last_layer_signal(target_gradient: "OrderedDict[str, torch.Tensor]", num_classes: int) -> torch.Tensor:
    """Per-class signal from the last layer: the bias gradient (C,), or the weight-row sums when there is no bias.

    Raises:
        ValueError: no parameter with a leading dimension of ``num_classes`` at the output side.
    """
    kind, g = _final_layer(target_gradient, num_classes)
    if kind == "bias":
        return g.detach().float()
    if kind == "weight":
        return g.detach().float().sum(dim=1)
    raise ValueError(
        f"no last fully connected layer with {num_classes} outputs found in the target gradient; label inference "
        "needs the classifier's final layer (or use label_strategy: known)"
    )


def mean_softmax_from_gradient(
    target_gradient: "OrderedDict[str, torch.Tensor]", label_proportions: torch.Tensor
) -> torch.Tensor:
    """The batch-mean softmax output of the victim, read off the last layer's bias gradient: pbar = g_b + n / B.

    From Eq. (1) of this module (softmax cross-entropy averaged over the batch): g_c = pbar_c - n_c / B, so with the
    inferred label distribution n / B the server recovers the victim's mean predicted distribution over the user's
    batch (exact for FedSGD with the true label distribution; under FedAvg's pseudo-gradient an estimate). Under a
    defense that rescales or masks the update (clipping, DP noise, pruning, quantisation, sign compression) g_b is
    no longer on the cross-entropy's scale and the estimate is pulled toward ``label_proportions`` (clipping to norm C
    multiplies g_b by C / ||u||); the scale cannot be read back
    from g_b (its entries sum to 0 at any scale), so attack.py warns when the output terms meet defenses. Negative
    entries (from noise or wrong counts) are clamped to 0 and the result renormalised.

    Args:
        target_gradient: name -> gradient in the victim's parameter order; the output-side-most parameter with C
            outputs (:func:`_final_layer`) must be a bias (``*bias``, C entries): it is taken as the final layer's
            bias gradient. An earlier C-entry bias is not the logits' bias and is not used.
        label_proportions: float (C,) inferred label distribution n / B (sums to 1), e.g.
            ``LabelInference.proportions``.

    Returns:
        float32 (C,) probabilities summing to 1 (on the CPU).

    Raises:
        ValueError: no final-layer bias gradient with C entries (a victim whose last layer has no bias: the mean
            output cannot be read off; turn the output term off).
    """
    C = int(label_proportions.numel())
    kind, bias = _final_layer(target_gradient, C)
    if kind != "bias":
        raise ValueError(
            f"the target gradient has no final-layer bias with {C} entries: the victim's mean softmax output cannot "
            "be recovered; set attack.output_weight: 0 (and attack.selection_output_weight: 0 when final_candidates > 1)"
        )
    p = (bias.detach().float().cpu() + label_proportions.detach().float().cpu()).clamp_min(0)
    if p.sum() <= 0:
        return torch.full((C,), 1.0 / C)
    return p / p.sum()


def round_to_total(x: torch.Tensor, total: int) -> torch.Tensor:
    """Largest-remainder rounding of non-negative reals ``x`` (C,) to integers summing to ``total``."""
    x = x.clamp_min(0)
    if x.sum() <= 0:
        x = torch.ones_like(x)
    scaled = x / x.sum() * total
    base = scaled.floor()
    rest = int(total - base.sum().item())
    if rest > 0:
        order = torch.argsort(scaled - base, descending=True)
        base[order[:rest]] += 1
    return base


def _informative(signal: torch.Tensor) -> bool:
    """True when some class has a negative signal (proven present under softmax cross-entropy)."""
    return bool((signal < 0).any())


def _idlg(signal: torch.Tensor, batch_size: Optional[int]) -> LabelInference:
    c = int(torch.argmin(signal))
    counts = torch.zeros_like(signal)
    counts[c] = float(batch_size or 1)
    return LabelInference(counts, counts > 0, c, "idlg", _informative(signal))


def _sign(signal: torch.Tensor, batch_size: Optional[int]) -> LabelInference:
    """Presence from the sign alone (negative: present), equal shares of the images. With B given, at most B
    classes can be present: when more are negative (noise or a defense on the update), the B most negative are
    kept, so that every class marked present gets at least one image; the B mod k images that do not split evenly
    over the k present classes go one each to the most negative ones (the dominant class first)."""
    present = signal < 0
    if not present.any():
        present[torch.argmin(signal)] = True
    if batch_size and int(present.sum()) > batch_size:
        keep = torch.argsort(signal)[:batch_size]  # the most negative B
        present = torch.zeros_like(present)
        present[keep] = True
    k = int(present.sum())
    if not batch_size:
        counts = present.float() / k
    else:  # equal shares; the B mod k images left over go to the most negative present classes, so that the
        # dominant (most negative) class also has the largest count
        counts = present.float() * (batch_size // k)
        rest = batch_size - (batch_size // k) * k
        order = torch.argsort(torch.where(present, signal, torch.full_like(signal, float("inf"))), stable=True)
        counts[order[:rest]] += 1
    return LabelInference(counts, present, int(torch.argmin(signal)), "sign", _informative(signal))


def _bias_corrected(signal: torch.Tensor, batch_size: Optional[int]) -> LabelInference:
    """LLG-style counts (module docstring): float32 (C,) summing to ``batch_size`` (or proportions without B).

    With B given and k <= B negative classes, each negative class gets one image first and the other B - k follow
    the estimated counts beyond one (Wainakh et al. 2022, LLG stage 1; breaching's 'bias-corrected'); k > B keeps
    the plain rounding of the estimates to B.
    """
    C = signal.numel()
    negative = signal < 0  # absent classes have g_c = pi_c >= 0 exactly, so these are present
    present = negative.clone()
    if not present.any():
        present[torch.argmin(signal)] = True
    absent = ~present
    if absent.any():
        pi = signal[absent].mean().clamp_min(1e-12)
        share = torch.where(present, (pi - signal) / (C * pi), torch.zeros_like(signal)).clamp_min(0)
    else:  # every class present: no offset to estimate, split by the size of the negative gradients
        share = -signal / (-signal).sum()
    k = int(negative.sum())
    if not batch_size:
        counts = share / share.sum().clamp_min(1e-12)
    elif 0 < k <= batch_size:
        estimate = share / share.sum().clamp_min(1e-12) * batch_size  # estimated n_c, sums to B
        beyond_one = torch.where(negative, (estimate - 1).clamp_min(0), torch.zeros_like(estimate))
        if beyond_one.sum() <= 0:  # every estimate <= 1: share the rest by the estimates themselves
            beyond_one = torch.where(negative, estimate, torch.zeros_like(estimate))
        counts = negative.float() + round_to_total(beyond_one, batch_size - k)
    else:  # no negative class (uninformative), or k > B (noise): round the estimates to B
        counts = round_to_total(share, batch_size)
    return LabelInference(counts, counts > 0, int(torch.argmax(share)), "bias_corrected", _informative(signal))


LABEL_STRATEGIES: dict[str, Callable[[torch.Tensor, Optional[int]], LabelInference]] = {
    "idlg": _idlg,
    "sign": _sign,
    "bias_corrected": _bias_corrected,
}


def check_label_threat(strategy: str, batch_size: Optional[int], known_labels: bool) -> None:
    """Raise what :func:`infer_labels` would raise for ``strategy`` before it reads any gradient.

    Args:
        strategy: 'bias_corrected', 'sign', 'idlg' or 'known'.
        batch_size: the B the server is given (None: not revealed; then no B-dependent check).
        known_labels: whether the server is given the labels (threat model ``known_labels``).

    Raises:
        ValueError: 'known' without labels, an unknown strategy, or 'idlg' with a given B > 1.
    """
    if strategy == "known":
        if not known_labels:
            raise ValueError("label_strategy 'known' needs the labels in the server view (threat model known_labels)")
        return
    if strategy not in LABEL_STRATEGIES:
        raise ValueError(f"unknown label strategy {strategy!r}; choose one of {sorted(LABEL_STRATEGIES) + ['known']}")
    if strategy == "idlg" and batch_size not in (None, 1):
        raise ValueError(f"label strategy 'idlg' is exact only for B = 1, got B = {batch_size}; use bias_corrected")


def _final_weight_row_sums(target_gradient: "OrderedDict[str, torch.Tensor]", num_classes: int):
    """float32 (C,) row sums of the output-side-most 2-D gradient with ``num_classes`` rows (the last layer's weight),
    or None when there is none."""
    _, g = _output_side_gradient(target_gradient, ("weight",), num_classes)
    return None if g is None else g.detach().float().sum(dim=1).cpu()


def break_dominant_tie(result: LabelInference, signal: torch.Tensor, tiebreak: Optional[torch.Tensor]) -> LabelInference:
    """Choose the dominant class among classes tied at the most negative ``signal`` by the most negative
    ``tiebreak`` (the last layer's weight-row sums), instead of the lowest class id.

    Every strategy's dominant class is the argmin of the bias signal. A sign compression or a 2-level quantisation of
    the update gives every present class the same bias entry, so that argmin fell on the lowest present class id.
    The weight rows still tell the classes apart: row c of the weight gradient is (1/B) sum_i (p_ic - y_ic) h_i with
    non-negative features h_i (ReLU, pooling), so its sum is a feature-weighted form of (1) that is most negative for
    the class with the most images (LLG reads labels from these sums when a layer has no bias), and after sign
    compression it counts the row's negative entries. When the choice moves the dominant class, its count and
    presence are swapped with the old dominant's (both had the same signal, so either assignment fits (1)).

    Args:
        result: a strategy's output (dominant = argmin of ``signal``).
        signal: float32 (C,) the bias signal the strategy read.
        tiebreak: float32 (C,) weight-row sums, or None (no weight / no bias: nothing to break with).

    Returns:
        ``result`` itself when there is no tie (or nothing to break it with), else a new :class:`LabelInference`.
    """
    if tiebreak is None:
        return result
    tied = torch.nonzero(signal == signal[result.dominant]).flatten()
    if tied.numel() < 2:
        return result
    new = int(tied[torch.argmin(tiebreak[tied])])  # lowest id among exact ties of the tie-break too
    old = result.dominant
    if new == old:
        return result
    counts, present = result.counts.clone(), result.present.clone()
    if counts[new] < counts[old]:
        counts[[new, old]] = counts[[old, new]]
        present[[new, old]] = present[[old, new]]
    return LabelInference(counts, present, new, result.strategy, result.informative)


def infer_labels(
    target_gradient: "OrderedDict[str, torch.Tensor]",
    num_classes: int,
    batch_size: Optional[int] = None,
    strategy: str = "bias_corrected",
    known_labels: Optional[torch.Tensor] = None,
) -> LabelInference:
    """Infer which labels a client's batch holds, and how many of each, from its target gradient.

    Args:
        target_gradient: name -> gradient, the victim's parameter order (see :mod:`inversion.scenario`).
        num_classes: C.
        batch_size: B if known (counts then sum to B), else None (counts are proportions).
        strategy: 'bias_corrected', 'sign', 'idlg' or 'known'.
        known_labels: int64 (B,) labels, required for 'known'.

    Returns:
        :class:`LabelInference` with float32 (C,) counts (summing to B when given) on the CPU.

    Warns:
        UserWarning: the last-layer signal has no negative entry (e.g. all zero under a defense); the result then has
            ``informative=False`` and its labels are the strategy's argmin fallback, a guess.

    Raises:
        ValueError: unknown strategy, 'idlg' with B > 1, or 'known' without labels.
    """
    check_label_threat(strategy, batch_size, known_labels is not None)
    if strategy == "known":
        counts = torch.bincount(known_labels.long().cpu(), minlength=num_classes).float()
        return LabelInference(counts, counts > 0, int(counts.argmax()), "known")
    signal = last_layer_signal(target_gradient, num_classes).cpu()
    result = LABEL_STRATEGIES[strategy](signal, batch_size)
    # (with no bias the row sums are the signal; an uninformative bias (no negative entry, e.g. zeroed by a defense)
    # keeps the documented fallback)
    if result.informative and _final_layer(target_gradient, num_classes)[0] == "bias":
        result = break_dominant_tie(result, signal, _final_weight_row_sums(target_gradient, num_classes))
    if not result.informative:
        what = "is all zero" if not signal.any() else f"has no negative entry (min {float(signal.min()):.3g})"
        warnings.warn(
            f"label inference ({strategy}): the last layer's gradient {what}, so no class is proven present (a "
            f"defense zeroed or masked it, or the victim is saturated); the inferred labels (dominant class "
            f"{result.dominant}) are a guess. Use label_strategy 'known' if the threat model gives the labels.",
            stacklevel=2,
        )
    return result
