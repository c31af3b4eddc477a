"""The FL scenario (client side) and what the honest-but-curious server sees.

The client computes its FedSGD update g = grad_w mean_i CE(f_w(x_i), y_i) on its private batch, victim in eval mode
(BatchNorm uses running statistics, which also makes batch-1 gradients defined). The server receives only a
:class:`ServerView`: the victim, the target gradient (per-parameter tensors with their names), the image shape and,
optionally, the batch size B or the labels when the threat model grants them. Ground-truth images never enter it.
"""

from __future__ import annotations

import contextlib

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class TargetGradientError(ValueError):
    """The target gradient does not fit the victim or holds NaN/inf values."""


@dataclass
class ServerView:
    """Everything the attacker (server) may use.

    Attributes:
        victim: the global model the client trained on (frozen by the attack, eval mode).
        target_gradient: OrderedDict parameter name -> float32 tensor of that parameter's shape, in the order of
            ``victim.named_parameters()`` (input side first).
        image_shape: (C, H, W) of the client's images; pixels in [0, 1].
        num_classes: outputs of the victim.
        batch_size: B when the protocol reveals it (e.g. FedAvg weighting), else None.
        labels: int64 (B,) only under the known-labels threat model, else None.
        meta: other protocol metadata (e.g. FedAvg local epochs and lr).
    """

    victim: nn.Module
    target_gradient: "OrderedDict[str, torch.Tensor]"
    image_shape: tuple[int, int, int]
    num_classes: int
    batch_size: Optional[int] = None
    labels: Optional[torch.Tensor] = None
    meta: dict = field(default_factory=dict)


def victim_parameters(victim: nn.Module) -> "OrderedDict[str, nn.Parameter]":
    """The victim's trainable parameters, input side first (the order of ``named_parameters``)."""
    return OrderedDict((n, p) for n, p in victim.named_parameters() if p.requires_grad)


def fedsgd_gradient(victim: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
    """The client's FedSGD update: grad_w of the mean cross-entropy over the batch, victim in eval mode.

    Args:
        victim: classifier taking float (B, C, H, W) pixels in [0, 1] and returning logits (B, num_classes).
        images: float (B, C, H, W) in [0, 1]; labels: int64 (B,).

    Returns:
        OrderedDict name -> detached float32 gradient, same shapes as the parameters.

    Raises:
        ValueError: a trainable parameter does not affect the loss (e.g. an unused head); the attacks differentiate
            every trainable parameter, so freeze it (``requires_grad_(False)``) or remove it.
    """
    was_training = victim.training
    victim.eval()
    params = victim_parameters(victim)
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(victim(images), labels)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    finally:
        victim.train(was_training)
    raise_if_unused(list(params), grads)
    return OrderedDict((n, g.detach().float()) for n, g in zip(params, grads))


def raise_if_unused(names: list[str], grads) -> None:
    """Raise the one error for trainable victim parameters whose gradient is None (they do not reach the loss).

    Args:
        names: the parameters' names; grads: their gradients from ``torch.autograd.grad(..., allow_unused=True)``.

    Raises:
        ValueError: naming up to five such parameters and how to fix the victim.
    """
    unused = [n for n, g in zip(names, grads) if g is None]
    if unused:
        raise ValueError(f"victim parameter(s) {unused[:5]} do not affect the output, so they have no gradient; "
                         "freeze them (requires_grad_(False)) or remove them from the victim")


def check_victim_parameters_used(victim: nn.Module, image_shape: tuple[int, int, int]) -> None:
    """Check, before any client update, that every trainable victim parameter reaches the logits.

    FedSGD and FedAvg clients and every attack differentiate all trainable parameters, so a parameter that does not
    affect the output (an unused head, a dead branch) would give no gradient. One forward and backward pass of a
    batch of two all-0.5 images (pixels in [0, 1]) in eval mode, on the victim's device; the victim's mode and
    parameters are left as they were.

    Args:
        victim: classifier, float (N, C, H, W) in [0, 1] -> logits (N, num_classes).
        image_shape: (C, H, W) of the users' images.

    Raises:
        ValueError: from :func:`raise_if_unused`, naming the unused parameters.
    """
    params = victim_parameters(victim)
    if not params:
        return
    with _probe_mode(victim), torch.enable_grad():
        out = victim(_probe_batch(victim, image_shape, 2))
        grads = torch.autograd.grad(out.float().square().sum(), list(params.values()), allow_unused=True)
    raise_if_unused(list(params), grads)


def victim_num_outputs(victim: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """The victim's number of outputs (logits) for (C, H, W) images: one forward pass of an all-0.5 image (pixels
    in [0, 1]) in eval mode, without gradients, on the victim's device; the victim's mode is restored.

    The server's label space is the victim's output space (a :class:`ServerView`'s ``num_classes``), which may be
    larger than the classes the users' data uses (e.g. one-class face folders with a 2-class victim).
    """
    with _probe_mode(victim), torch.no_grad():
        out = victim(_probe_batch(victim, image_shape, 1))
    return int(out.shape[-1])


@contextlib.contextmanager
def _probe_mode(victim: nn.Module):
    """The victim in eval mode inside the block, its own mode restored after (the probes above)."""
    was_training = victim.training
    victim.eval()
    try:
        yield victim
    finally:
        victim.train(was_training)


def _probe_batch(victim: nn.Module, image_shape: tuple[int, int, int], n: int) -> torch.Tensor:
    """``n`` all-0.5 images (pixels in [0, 1]) of ``image_shape`` on the victim's device (CPU without parameters)."""
    param = next(iter(victim.parameters()), None)
    return torch.full((n, *image_shape), 0.5, device=param.device if param is not None else torch.device("cpu"))


def check_target_gradient(victim: nn.Module, target: "OrderedDict[str, torch.Tensor]") -> None:
    """Validate a target gradient against the victim before an attack starts.

    Raises:
        TargetGradientError: missing/extra parameter names, a shape mismatch, or NaN/inf values; the message names
            the first offending parameter.
    """
    params = victim_parameters(victim)
    missing = [n for n in params if n not in target]
    extra = [n for n in target if n not in params]
    if missing or extra:
        raise TargetGradientError(
            f"target gradient does not match the victim: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}. Was it computed on another architecture?"
        )
    for n, p in params.items():
        g = target[n]
        if tuple(g.shape) != tuple(p.shape):
            raise TargetGradientError(
                f"target gradient for {n!r} has shape {tuple(g.shape)}, the victim's parameter has {tuple(p.shape)}"
            )
        if not torch.isfinite(g).all():
            raise TargetGradientError(
                f"target gradient for {n!r} holds NaN or inf values: a client update must be finite (one a defense or "
                "FedAvg produced: check threat.defenses and threat.fedavg_* settings, e.g. a noise scale near float32's "
                "limit)")


def make_server_view(
    victim: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    reveal_batch_size: bool = True,
    reveal_labels: bool = False,
    gradient: Optional["OrderedDict[str, torch.Tensor]"] = None,
) -> ServerView:
    """Run the client (FedSGD unless ``gradient`` is given, e.g. a defended or FedAvg update) and return the view.

    The returned view holds no image; ``labels`` only when ``reveal_labels``.
    """
    target = gradient if gradient is not None else fedsgd_gradient(victim, images, labels)
    check_target_gradient(victim, target)
    return ServerView(
        victim=victim,
        target_gradient=target,
        image_shape=tuple(images.shape[1:]),
        num_classes=num_classes,
        batch_size=int(images.shape[0]) if reveal_batch_size else None,
        labels=labels.clone() if reveal_labels else None,
    )

