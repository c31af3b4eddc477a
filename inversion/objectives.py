"""Objectives and schedules of the user-level attack (arXiv 2409.07291, mechanisms 1-3).

- :func:`layer_cosine_distances` / :func:`gradient_matching_loss`: per-layer cosine distance between the target and
  the dummy gradient, weighted per layer.
- :func:`sliding_window_weights`: the asymmetric Hamming window over the layer index whose centre slides from the
  deepest (output side) to the shallowest (input side) layer, matching high-level semantics first.
- :func:`timestep_at`: the prior's timestep t(s) annealed from t_max to t_min.
- :func:`clip_matching_gradient`: dynamic clipping of the matching gradient relative to the prior gradient.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def pow2_rescale(t: torch.Tensor, dims: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``t`` times a power of two chosen so that its largest |entry| (over ``dims``; all when None) lies in
    [0.5, 1): an exact scaling in floating point (only exponents change, barring entries that fall to subnormals),
    so a cosine similarity with the result equals the one with ``t`` bit for bit (when both norms are above the
    distance's ``eps`` floor), while the squared norms of a huge target gradient (e.g. Gaussian noise of std 1e18
    from a DP defense: ``sum(g**2)`` past 3.4e38) no longer overflow float32 into inf and NaN image gradients.
    The attacks apply it to their target gradient once, when they bind it (not per step).

    Args:
        t: float tensor (any shape), e.g. one layer's target gradient.
        dims: dimensions to take the max over, keeping the others apart (e.g. ``range(1, t.dim())`` for one scale
            per user of a stacked (U, ...) target; an empty sequence: one scale per entry); None: one scale for the
            whole tensor.

    Returns:
        float32 tensor of ``t``'s shape. Empty tensors, all-zero and non-finite slices are left as they are; the
        power of two is kept within float32's normal range (2**-126 .. 2**127), so tiny or huge slices are brought
        only that far.
    """
    t = t.float()
    if t.numel() == 0:
        return t
    a = t.detach().abs()
    if dims is None:
        a = a.amax()
    elif len(tuple(dims)):
        a = a.amax(dim=tuple(dims), keepdim=True)
    return t * pow2_scale(a)


def pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """The power of two 2**-e (float32, ``amax``'s shape) that brings a positive finite ``amax`` into [0.5, 1)
    (``amax = m * 2**e``, :func:`torch.frexp`); 1 where ``amax`` is 0 or not finite; e clamped to -127..126 so the
    result is a normal float32. Built from its exponent bits, so it is exact on any device (no exp2 rounding)."""
    _, e = torch.frexp(amax.float())
    e = torch.where(torch.isfinite(amax) & (amax > 0), e, torch.zeros_like(e)).clamp(-127, 126)
    return ((127 - e).to(torch.int32) << 23).view(torch.float32)


def layer_cosine_distances(target: Sequence[torch.Tensor], dummy: Sequence[torch.Tensor], eps: float = 1e-12) -> torch.Tensor:
    """1 - <g_l, g_hat_l> / (|g_l| |g_hat_l|) for each layer l; float32 (L,), values in [0, 2].

    ``target`` and ``dummy`` are sequences of L tensors with matching shapes (one per victim parameter, input side
    first); differentiable w.r.t. ``dummy``. Each norm is floored at ``eps`` on its own (a zero gradient gives
    distance 1), so the distance is scale-invariant for any gradient whose norm is above ``eps``. A target whose
    squared norm overflows float32 (a huge DP noise) gives NaN: pass it through :func:`pow2_rescale` once first, as
    the attacks do when they bind their target.
    """
    if len(target) != len(dummy):
        raise ValueError(f"{len(target)} target layers but {len(dummy)} dummy layers")
    out = []
    for g, h in zip(target, dummy):
        g, h = g.flatten().float(), h.flatten().float()
        out.append(1.0 - (g * h).sum() / (g.norm().clamp_min(eps) * h.norm().clamp_min(eps)))
    return torch.stack(out)


def weighted_layer_mean(distances: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-layer values (L,) combined with layer weights (L,) normalised to sum 1 (the plain mean when None); scalar."""
    if weights is None:
        return distances.mean()
    w = weights.to(distances.device, distances.dtype)
    return (w * distances).sum() / w.sum().clamp_min(1e-12)


def gradient_matching_loss(target: Sequence[torch.Tensor], dummy: Sequence[torch.Tensor], weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weighted sum over layers of the cosine distances, weights normalised to sum 1 (uniform when None); scalar."""
    return weighted_layer_mean(layer_cosine_distances(target, dummy), weights)


def window_centre(num_layers: int, progress: float, slide_fraction: float = 0.5, start: float = 1.0, end: float = 0.0) -> float:
    """Centre of the sliding window, as a (fractional) layer index in [0, L-1].

    It moves linearly from ``start`` (fraction of L-1; 1.0 = deepest, output side) to ``end`` (0.0 = shallowest,
    input side) while ``progress`` (s / S, in [0, 1]) goes from 0 to ``slide_fraction``, and stays at ``end`` after.
    """
    if not 0.0 < slide_fraction <= 1.0:
        raise ValueError(f"window slide_fraction must be in (0, 1], got {slide_fraction}")
    a = min(1.0, max(0.0, progress / slide_fraction))
    return (start + (end - start) * a) * (num_layers - 1)


def sliding_window_weights(
    num_layers: int,
    centre: float,
    width_deep: float,
    width_shallow: float,
    floor: float = 0.0,
) -> torch.Tensor:
    """Asymmetric Hamming window over the layer index; float32 (L,).

    With d = l - centre, a layer gets 0.54 + 0.46 cos(pi d / W) for |d| <= W, where W = ``width_deep`` toward deeper
    layers (d > 0) and W = ``width_shallow`` toward shallower ones (d < 0): 1 at the centre, 0.08 at the edges (the
    Hamming window's end value), ``floor`` beyond; no layer gets less than ``floor`` (so the weights never rise
    again away from the centre, whatever the floor). Widths are in layers (parameter tensors) and must be > 0; with
    ``floor`` 0 they must add up to at least 1 layer, else a (fractional) centre can fall between two layers with
    neither inside the window, every weight would be 0 and the matching loss (and its gradient) would vanish.

    Raises:
        ValueError: a width <= 0, ``floor`` outside [0, 1], or widths adding up to less than 1 layer with floor 0.
    """
    if width_deep <= 0 or width_shallow <= 0:
        raise ValueError(f"window widths must be > 0 layers, got deep={width_deep}, shallow={width_shallow}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"window floor must be in [0, 1], got {floor}")
    if floor == 0.0 and width_deep + width_shallow < 1.0:
        raise ValueError(
            f"window widths deep={width_deep} + shallow={width_shallow} < 1 layer with floor 0: a centre between two "
            "layers would leave every layer outside the window (all weights 0, no matching loss); widen the window "
            "or set a floor > 0")
    idx = torch.arange(num_layers, dtype=torch.float32)
    d = idx - centre
    W = torch.where(d > 0, torch.tensor(float(width_deep)), torch.tensor(float(width_shallow)))
    w = 0.54 + 0.46 * torch.cos(math.pi * d / W)
    return torch.where(d.abs() <= W, w.clamp(min=float(floor)), torch.tensor(float(floor)))


def timestep_at(progress: float, t_max: int, t_min: int, schedule: str = "linear", anneal_fraction: float = 1.0) -> int:
    """Prior timestep t(s) annealed from ``t_max`` at progress 0 to ``t_min`` at ``anneal_fraction`` (then constant).

    ``schedule``: 'linear', 'cosine' (slow start and end) or 'sqrt' (fast early decay, t = t_min + (t_max - t_min)
    (1 - sqrt(a))), with a = min(1, progress / anneal_fraction). Returns an int timestep.

    Raises:
        ValueError: t_min > t_max, ``anneal_fraction`` outside (0, 1], or an unknown schedule.
    """
    if t_min > t_max:
        raise ValueError(f"t_min ({t_min}) must be <= t_max ({t_max})")
    if not 0.0 < anneal_fraction <= 1.0:
        raise ValueError(f"anneal_fraction must be in (0, 1] (the part of the run the t annealing takes), got "
                         f"{anneal_fraction}")
    a = min(1.0, max(0.0, progress / anneal_fraction))
    if schedule == "linear":
        f = 1.0 - a
    elif schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * a))
    elif schedule == "sqrt":
        f = 1.0 - math.sqrt(a)
    else:
        raise ValueError(f"unknown t schedule {schedule!r}; choose linear, cosine or sqrt")
    return int(round(t_min + (t_max - t_min) * f))


def clip_matching_gradient(g_match: torch.Tensor, g_prior: torch.Tensor, kappa: float) -> tuple[torch.Tensor, float]:
    """Dynamic clipping: if |g_match| > kappa |g_prior|, rescale g_match to norm kappa |g_prior|.

    One user's case of :func:`clip_matching_gradients` (the same computation on a batch of one).
    Returns the (possibly rescaled) matching gradient and the ratio |g_match| / |g_prior| before clipping
    (inf when the prior gradient is zero, in which case nothing is clipped).
    """
    clipped, ratio = clip_matching_gradients(g_match.unsqueeze(0), g_prior.unsqueeze(0), kappa)
    return clipped[0], float(ratio[0])


def clip_matching_gradients(g_match: torch.Tensor, g_prior: torch.Tensor, kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic clipping per user (the many-users attack): :func:`clip_matching_gradient` applied to each row.

    Args:
        g_match, g_prior: float (U, ...) matching and prior gradients of U users' images (row u is user u's).
        kappa: the largest allowed |g_match_u| / |g_prior_u|.

    Returns:
        (clipped, ratios): g_match with each row u rescaled to norm kappa |g_prior_u| where |g_match_u| > kappa
        |g_prior_u| (other rows unchanged), and float32 (U,) ratios |g_match_u| / |g_prior_u| before clipping (inf
        where the prior gradient is zero; that row is not clipped). One user's clipping never depends on another's.
    """
    if g_match.shape != g_prior.shape or g_match.dim() < 1:
        raise ValueError(f"g_match {tuple(g_match.shape)} and g_prior {tuple(g_prior.shape)} must be equal (U, ...) shapes")
    nm = g_match.flatten(1).norm(dim=1)
    npr = g_prior.flatten(1).norm(dim=1)
    ratio = torch.where(npr > 0, nm / npr.clamp_min(torch.finfo(npr.dtype).tiny), torch.full_like(nm, float("inf")))
    clip = (npr > 0) & (ratio > kappa)
    scale = torch.where(clip, kappa * npr / nm.clamp_min(torch.finfo(nm.dtype).tiny), torch.ones_like(nm))
    return g_match * scale.view(-1, *([1] * (g_match.dim() - 1))).to(g_match.dtype), ratio.float()
