"""Many users per step: per-user gradient matching of U representative images in one batched pass.

The user-level attack (:mod:`lightning_modules.user_level_inversion`) optimises one image x_hat per user against that
user's target gradient g_u. Run one user at a time, a step costs a batch-1 forward, a double backward and a
parameter-sized gradient comparison, which leaves an accelerator mostly idle. :class:`BatchedMatching` computes, for U
users at once,

    loss_u = sum_l w_l (1 - cos(g_u,l, ghat_u,l)) / sum_l w_l,   ghat_u = grad_w CE(f_w(x_u), y_u)   (batch of 1)

and d loss_u / d x_u, identical (up to float rounding) to U separate calls of
:func:`inversion.objectives.gradient_matching_loss` on an ``autograd.grad(..., create_graph=True)`` dummy gradient
followed by ``autograd.grad(loss, x)``.

How: torch.func's per-sample-gradient recipe (https://pytorch.org/tutorials/intermediate/per_sample_grads.html,
``vmap(grad(loss))`` over a ``functional_call`` of the model), nested once more: ``vmap(grad_and_value(per_user))``
where ``per_user`` itself takes ``torch.func.grad`` of the cross-entropy w.r.t. the parameter dict (the dummy
gradient), then the weighted per-layer cosine distance to that user's target. The outer ``grad`` is w.r.t. the image
only. The victim must be in eval mode (BatchNorm on running statistics): then user u's dummy gradient depends on
x_u alone, which is what makes a vmap over users equal to independent attacks. In train mode BatchNorm would mix the
users (and vmap refuses in-place running-stat updates), so the constructor
puts its private copy of the victim in eval mode.

A summed loss with ``torch.autograd.grad(sum_u loss_u, x)`` would also give each d loss_u / d x_u (users are
independent), but ``sum_u loss_u`` needs each user's *own* dummy gradient, i.e. per-sample parameter gradients,
which plain autograd only yields with a loop over users; hence torch.func. ``chunk_size`` bounds the memory
(the U per-user dummy gradients are each as large as the victim).

Convolutions (``conv_impl``): under vmap, a per-user weight gradient of ``nn.Conv2d`` and its double backward go
through functorch's convolution batching rules, which turn them into grouped / depthwise convolutions with one
group per user and channel (slow on CPU: measured 1.7x slower than ``'unfold'`` for ResNet-18 at 32 px, U = 8).
``conv_impl='unfold'`` (default) runs the attack on a private copy of the victim in which every plain
``nn.Conv2d`` (zeros padding, groups = 1, numeric padding) computes ``W.view(C_out, -1) @ F.unfold(x)`` instead:
the same function and parameters, but the per-user weight gradients and the double backward become batched
matmuls. ``'native'`` keeps the victim's own convolutions. BatchNorm layers of the copy normalise in their
parameters' dtype so that the pass also runs under ``torch.autocast`` (bf16 on CPU is tested).

Cost: the work per user is the same as one at a time (a batch-1 double backward plus several passes over
victim-sized per-user tensors); batching saves per-op overhead (kernel launches on a GPU), not arithmetic. On a
CPU the one-at-a-time path is already compute- or memory-bound and the batched pass is not faster
(``scripts/benchmark.py`` reports both); the gain is expected on accelerators, where batch-1 steps are
launch-bound.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional, Sequence

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap

from inversion.scenario import victim_parameters


CONV_IMPLS = ("unfold", "native")


class UnfoldConv2d(nn.Conv2d):
    """``nn.Conv2d`` computed as im2col + matmul: ``W.view(C_out, C_in k_h k_w) @ F.unfold(x)`` (+ bias).

    Same parameters and outputs as the convolution (up to float rounding); used by :class:`BatchedMatching` so
    that per-user weight gradients under ``vmap`` are batched matmuls. Only for groups = 1, zeros padding and
    numeric padding (see :func:`unfold_convolutions`). Input float (N, C_in, H, W), output (N, C_out, H', W').
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``nn.Conv2d.forward`` as ``F.unfold`` + matmul: float (N, C_in, H, W) -> (N, C_out, H', W'), with H', W'
        from the usual convolution output-size formula (stride, zero padding, dilation)."""
        N, _, H, W = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))  # (N, C_in kh kw, Ho Wo)
        out = (self.weight.reshape(self.out_channels, -1) @ cols).reshape(N, self.out_channels, Ho, Wo)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out


def unfold_convolutions(module: nn.Module) -> int:
    """Turn every plain ``nn.Conv2d`` inside ``module`` (in place) into an :class:`UnfoldConv2d`; returns the count.

    Only exact ``nn.Conv2d`` instances with groups = 1, padding_mode 'zeros' and numeric padding are converted
    (others, e.g. depthwise or 'same' padding, are left as they are). Call it on a copy.
    """
    n = 0
    for m in module.modules():
        if type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            m.__class__ = UnfoldConv2d
            n += 1
    return n


class _BatchNormInParamDtype:
    """Mixin for ``nn.BatchNorm*d``: normalise in the parameters' dtype, return the input's dtype.

    Under ``torch.autocast`` a convolution feeds bf16/fp16 activations to BatchNorm whose weights and running
    statistics are float32; plain eager BatchNorm accepts that, but functorch's batch_norm batching rule raises
    "expected scalar type BFloat16 but found Float". Casting around it keeps autocast usable under vmap (a no-op
    in float32).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The BatchNorm forward on ``x`` cast to the weight's dtype (the running mean's when there is no weight),
        cast back to ``x.dtype``; plain BatchNorm when the dtypes already agree or there is neither."""
        ref = self.weight if self.weight is not None else self.running_mean
        if ref is None or x.dtype == ref.dtype:
            return super().forward(x)
        return super().forward(x.to(ref.dtype)).to(x.dtype)


_BN_CLASSES: dict[type, type] = {}


def _cast_batchnorms(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _BatchNormInParamDtype):
            cls = type(m)
            if cls not in _BN_CLASSES:
                _BN_CLASSES[cls] = type(cls.__name__, (_BatchNormInParamDtype, cls), {"__module__": __name__})
            m.__class__ = _BN_CLASSES[cls]


def stack_targets(
    target_gradients: Sequence[Mapping[str, torch.Tensor]], param_names: Sequence[str]
) -> list[torch.Tensor]:
    """Stack U users' target gradients per parameter.

    Args:
        target_gradients: U >= 1 mappings parameter name -> gradient tensor (e.g. ``ServerView.target_gradient`` or
            :func:`inversion.scenario.fedsgd_gradient` outputs), all on one device.
        param_names: the L parameter names to keep, in the victim's order (input side first), e.g.
            ``BatchedMatching.param_names``.

    Returns:
        list of L float32 tensors, the l-th of shape (U, *shape_l).

    Raises:
        ValueError: no users, a user missing a parameter, or users whose gradients for one parameter differ in shape.
    """
    if len(target_gradients) == 0:
        raise ValueError("stack_targets needs at least one user's target gradient")
    out = []
    for name in param_names:
        per_user = []
        for u, tg in enumerate(target_gradients):
            if name not in tg:
                raise ValueError(f"user {u}'s target gradient has no entry for parameter {name!r}")
            per_user.append(tg[name].detach().float())
        shapes = {tuple(t.shape) for t in per_user}
        if len(shapes) != 1:
            raise ValueError(f"users' target gradients for {name!r} differ in shape: {sorted(shapes)}")
        out.append(torch.stack(per_user))
    return out


class BatchedMatching:
    """Per-user gradient matching losses and image gradients for U users in one vectorised pass.

    Args:
        victim: the frozen classifier, float32, taking (N, C, H, W) pixels in [0, 1] and returning logits (N, K).
            It is not modified: a snapshot (deep copy, eval mode, BatchNorm on running statistics so that each image is
            independent) is taken at construction; build a new BatchedMatching after changing the victim.
        param_names: the parameters whose gradient is matched (default: all trainable ones, the order of
            :func:`inversion.scenario.victim_parameters`, as the attack uses); the others stay fixed.
        chunk_size: passed to ``torch.func.vmap``: users processed together (None: all U at once). Smaller bounds
            peak memory (each user's dummy gradient is victim-sized) at some speed cost.
        conv_impl: 'unfold' (default; convolutions as im2col + matmul, see the module docstring) or 'native'.

    Raises:
        ValueError: an unknown or duplicated parameter name, an empty list, or an unknown ``conv_impl``.
    """

    def __init__(
        self,
        victim: nn.Module,
        param_names: Optional[Sequence[str]] = None,
        chunk_size: Optional[int] = None,
        conv_impl: str = "unfold",
    ) -> None:
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
        trainable = victim_parameters(victim)
        names = list(trainable) if param_names is None else list(param_names)
        if not names:
            raise ValueError("param_names is empty: nothing to match")
        all_params = dict(victim.named_parameters())
        unknown = [n for n in names if n not in all_params]
        if unknown:
            raise ValueError(f"unknown victim parameter(s) {unknown[:3]}; known e.g. {list(all_params)[:3]}")
        if len(set(names)) != len(names):
            raise ValueError("param_names holds duplicates")
        self.param_names: list[str] = names
        self.chunk_size = chunk_size
        self.conv_impl = conv_impl
        self.victim = copy.deepcopy(victim).eval()
        if conv_impl == "unfold":
            unfold_convolutions(self.victim)
        _cast_batchnorms(self.victim)
        all_params = dict(self.victim.named_parameters())
        # matched parameters (differentiated) and everything else (fixed: other parameters and buffers)
        self._params = OrderedDict((n, all_params[n].detach()) for n in names)
        self._fixed = {n: p.detach() for n, p in all_params.items() if n not in self._params}
        self._fixed.update({n: b for n, b in self.victim.named_buffers()})
        self._fn = vmap(grad_and_value(self._per_user), in_dims=(0, 0, 0, 0), chunk_size=chunk_size)

    @property
    def num_layers(self) -> int:
        """L, the number of matched parameters (``len(param_names)``; each parameter tensor counts as one layer)."""
        return len(self.param_names)

    @property
    def param_shapes(self) -> list[torch.Size]:
        """The L matched parameters' shapes, in :attr:`param_names` order (what each user's target must match)."""
        return [p.shape for p in self._params.values()]

    # ------------------------------------------------------------------------------------------ per-user function
    def _ce(self, params: dict, x_u: torch.Tensor, y_u: torch.Tensor) -> torch.Tensor:
        logits = functional_call(self.victim, (params, self._fixed), (x_u.unsqueeze(0),))
        return -(y_u.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()

    def _per_user(self, x_u: torch.Tensor, y_u: torch.Tensor, targets_u: list, w_u: torch.Tensor) -> torch.Tensor:
        """loss_u for one user: x_u (C, H, W), y_u (K,), targets_u L tensors (*shape_l), w_u (L,); scalar."""
        dummy = grad(self._ce)(self._params, x_u, y_u)
        dists = []
        for g, n in zip(targets_u, self.param_names):
            g, h = g.flatten().float(), dummy[n].flatten().float()
            # as inversion.objectives.layer_cosine_distances (eps = 1e-12)
            dists.append(1.0 - (g * h).sum() / (g.norm().clamp_min(1e-12) * h.norm().clamp_min(1e-12)))
        d = torch.stack(dists)
        return (w_u * d).sum() / w_u.sum().clamp_min(1e-12)

    # ------------------------------------------------------------------------------------------ public API
    def matching_loss_and_grad(
        self,
        x: torch.Tensor,
        y_soft: torch.Tensor,
        targets: Sequence[torch.Tensor],
        weights: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-user gradient matching losses and their gradients w.r.t. each user's image.

        Args:
            x: float (U, C, H, W) representative images, pixels in [0, 1], on the victim's device. Not modified;
                ``requires_grad`` is not needed (the gradient is returned, not accumulated into ``x.grad``).
            y_soft: float (U, K) soft or one-hot CE targets (rows summing to 1), one row per user.
            targets: L tensors, the l-th (U, *shape_l): the users' target gradients stacked per parameter, in
                :attr:`param_names` order (see :func:`stack_targets`); cast to float32 on x's device.
            weights: None (uniform, i.e. the mean over layers), (L,) layer weights shared by all users (e.g.
                :func:`inversion.objectives.sliding_window_weights`), or (U, L) per-user weights; non-negative,
                normalised to sum 1 per user.

        Returns:
            (losses, grads): float32 (U,) losses in [0, 2] and (U, C, H, W) d loss_u / d x_u in x's dtype; both
            detached.

        Raises:
            ValueError: x not 4-D; y_soft not (U, K); U differing between x, y_soft, targets or weights; a wrong
                number of layers; a target of the wrong shape; weights of the wrong shape.
        """
        if x.dim() != 4:
            raise ValueError(f"x must be (U, C, H, W), got shape {tuple(x.shape)}")
        U = x.shape[0]
        if y_soft.dim() != 2 or y_soft.shape[0] != U:
            raise ValueError(f"y_soft must be (U={U}, K), got shape {tuple(y_soft.shape)}")
        if len(targets) != self.num_layers:
            raise ValueError(f"{len(targets)} target layers but {self.num_layers} matched parameters")
        dev = x.device
        tg = []
        for t, n, s in zip(targets, self.param_names, self.param_shapes):
            if tuple(t.shape) != (U, *s):
                raise ValueError(f"target for {n!r} must have shape {(U, *s)} (U users x parameter), got {tuple(t.shape)}")
            tg.append(t.to(device=dev, dtype=torch.float32))
        L = self.num_layers
        if weights is None:
            w = torch.ones(U, L, device=dev)
        else:
            w = weights.to(device=dev, dtype=torch.float32)
            if w.dim() == 1 and w.shape[0] == L:
                w = w.unsqueeze(0).expand(U, L)
            elif tuple(w.shape) != (U, L):
                raise ValueError(f"weights must be (L={L},) or (U={U}, L={L}), got shape {tuple(w.shape)}")
        x_in = x.detach()
        y_in = y_soft.detach().to(device=dev)
        with torch.enable_grad():
            grads, losses = self._fn(x_in, y_in, tg, w)
        return losses.detach().float(), grads.detach().to(x.dtype)

    def __call__(self, *args, **kwargs):
        return self.matching_loss_and_grad(*args, **kwargs)
