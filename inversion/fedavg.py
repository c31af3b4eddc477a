"""FedAvg client update (McMahan et al. 2017, Alg. 1 "ClientUpdate") and the server's pseudo-gradient.

The client runs E local epochs of plain SGD (no momentum, no weight decay) with learning rate eta over its batch of B
images split into mini-batches of size b (the last one may be smaller), i.e. ``local_steps_for(B, E, b) = E *
ceil(B / b)`` steps, each on the mean cross-entropy of its mini-batch. It trains a deep copy of the global model, so
the caller's victim is untouched, and keeps that copy in **eval mode**: BatchNorm uses (and does not update) its
running statistics, exactly as in the FedSGD client of :mod:`inversion.scenario`, which makes a mini-batch of one
image well defined and keeps FedAvg with one step identical to FedSGD; dropout is off.

The server receives the weight difference ``delta = w_before - w_after`` (trainable parameters, names and order of
``victim.named_parameters()``). Gradient inversion attacks match gradients, so the common approximation treats the
update as one averaged gradient (attacks that simulate the local steps instead, as Geiping et al. 2020 sec. 6 and
Dimitrov et al. 2022 do, need no such approximation):

    pseudo_gradient = delta / (eta * local_steps)                                                  (1)

which is exact for a single local step (E = 1, b >= B) in exact arithmetic: delta = eta * g_FedSGD. In float32 the
weight difference ``w_before - w_after`` loses the low bits of ``eta * g`` (each weight keeps ~7 significant digits of
itself, not of its change), so the relative error of (1) grows about as 1/eta: measured on the shipped ResNet-18 at
B = 10, one step, 3e-6 at eta 0.1, 3e-5 at 0.01, 3e-4 at 1e-3, 3e-3 at 1e-4 overall (worst layer about 20x that);
4e-8 with a float64 victim. A real client also sends float32 weights; the small-lr limits below are about the
arithmetic, not this rounding.

Small-lr limit, and when it is not the FedSGD gradient. As eta -> 0 the weights barely move during the round, every
local step's gradient is taken at w_before, and (1) tends to the unweighted mean of the K = ceil(B / b) mini-batch
mean gradients of an epoch, ``(1/K) sum_k mean_{i in S_k} g_i`` (with ``shuffle`` the mini-batches change per epoch
and the limit is the mean over the epochs). That equals the FedSGD gradient ``(1/B) sum_i g_i`` only when all
mini-batches have the same size, i.e. **when b divides B** (or b >= B). When b does not divide B the short last
mini-batch's mean gradient gets the same weight 1/K as the full ones, so its images are over-weighted and (1) does
not approach the FedSGD gradient however small eta is: in float64, ``||(1) - g|| / ||g||`` was about 0.6 at B = 5,
b = 2, E = 1, eta = 1e-7 on the tiny conv victim of tests/helpers.py (0.4 on the BatchNorm net of tests/test_fedavg.py),
against 1e-7 at B = 4, b = 2.

Large local learning rates. With BatchNorm in eval mode its running statistics do not follow the weights as they
move, so several local steps at a large eta can blow up: on the shipped ResNet-18 at E = 5, eta = 0.1, b = 5,
B = 10 (shuffled), 5 of 6 mixed-class users (p = 0.6) reached a NaN/inf local loss at epochs 2-4, none of 6
single-class users (p = 1.0, what ``configs/sweep/fedavg.yaml`` runs); the largest local loss per user reached
1e8-1e30 where the same loop in train mode stayed below 25. :func:`fedavg_client_update` then raises (the run stops
at that user); lower ``threat.fedavg_lr`` (0.01, the threat config's default, is the measured-safe setting).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from inversion.scenario import raise_if_unused, victim_parameters
from inversion.numbers import float32_step_size


class ClientDivergedError(ValueError):
    """The client's local training (FedAvg) reached a NaN/inf loss; the message names the epoch and step and the fix.
    attack.py records the run as 'diverged' (as :class:`lightning_modules.base_attack.AttackDivergedError`)."""


def local_steps_for(batch_size: int, epochs: int, local_batch_size: int) -> int:
    """Number of local SGD steps: ``epochs * ceil(batch_size / local_batch_size)``.

    A ``local_batch_size`` above ``batch_size`` means one full-batch step per epoch.

    Raises:
        ValueError: batch_size < 1, epochs < 1 or local_batch_size < 1 (any of which gives zero steps).
    """
    for key, value in (("batch_size", batch_size), ("epochs", epochs), ("local_batch_size", local_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"FedAvg: {key} must be an integer >= 1 (otherwise no local step is taken), got {value!r}")
    return epochs * math.ceil(batch_size / local_batch_size)


def fedavg_pseudo_gradient(
    delta: "OrderedDict[str, torch.Tensor]", local_lr: float, local_steps: int
) -> "OrderedDict[str, torch.Tensor]":
    """Eq. (1): ``delta / (local_lr * local_steps)`` per tensor (float32), the gradient-like target for attacks.

    In the small-lr limit this is the unweighted mean of the local steps' mini-batch mean gradients. It is the FedSGD
    gradient in that limit only when the local batch size b divides B (or b >= B): otherwise the short last
    mini-batch's mean gets the same weight as the full ones and the error does not vanish as local_lr -> 0
    (relative error about 0.6 at B = 5, b = 2, E = 1, local_lr = 1e-7 in float64; see the module docstring).

    Raises:
        ValueError: local_lr <= 0 or local_steps < 1.
    """
    float32_step_size("FedAvg: local_lr", local_lr)  # 1e-300 was 0 in float32: the pseudo-gradient became 0 / 0
    if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
        raise ValueError(f"FedAvg: local_steps must be an integer >= 1, got {local_steps!r}")
    scale = 1.0 / (local_lr * local_steps)
    return OrderedDict((n, d.detach().float() * scale) for n, d in delta.items())


@dataclass
class FedAvgUpdate:
    """A client's FedAvg round.

    Attributes:
        delta: OrderedDict name -> float32 ``w_before - w_after`` (what the server receives).
        pseudo_gradient: eq. (1), same names/shapes (the target for gradient-matching attacks).
        local_steps: SGD steps taken; epochs, local_lr, local_batch_size: the settings used.
        losses: mini-batch losses, one per step (before the step).
    """

    delta: "OrderedDict[str, torch.Tensor]"
    pseudo_gradient: "OrderedDict[str, torch.Tensor]"
    local_steps: int
    epochs: int
    local_lr: float
    local_batch_size: int
    losses: list[float] = field(default_factory=list)

    @property
    def meta(self) -> dict:
        """Protocol metadata for ``ServerView.meta`` (the server knows the FedAvg hyper-parameters)."""
        return {
            "protocol": "fedavg",
            "local_epochs": self.epochs,
            "local_lr": self.local_lr,
            "local_batch_size": self.local_batch_size,
            "local_steps": self.local_steps,
        }


def fedavg_client_update(
    victim: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 1,
    local_lr: float = 0.01,
    local_batch_size: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> FedAvgUpdate:
    """Run FedAvg's ClientUpdate on a deep copy of ``victim`` (eval mode) and return the weight difference.

    Args:
        victim: the global model; float (B, C, H, W) pixels in [0, 1] -> logits (B, num_classes). Not modified.
        images: float (B, C, H, W) in [0, 1]; labels: int64 (B,).
        epochs: E >= 1 local epochs.
        local_lr: eta > 0.
        local_batch_size: b >= 1 (None: b = B, full-batch steps).
        shuffle: False: mini-batches in data order every epoch; True: a fresh permutation per epoch drawn from a
            CPU generator seeded with ``seed`` (reproducible).
        seed: seed of the shuffling.

    Returns:
        :class:`FedAvgUpdate` (tensors detached, float32, on the victim's device).

    Raises:
        ValueError: before any work, if the settings give zero steps (empty batch, epochs < 1, local batch < 1),
            local_lr <= 0, or images and labels disagree in length; at the first local step, before any weight moves,
            if a trainable parameter does not affect the loss (as :func:`inversion.scenario.fedsgd_gradient`).
        ClientDivergedError: a local loss becomes NaN/inf (a ValueError).
    """
    if images.dim() != 4:
        raise ValueError(f"FedAvg: images must be (B, C, H, W), got shape {tuple(images.shape)}")
    B = int(images.shape[0])
    if labels.shape != (B,):
        raise ValueError(f"FedAvg: labels must be int64 (B,) = ({B},), got shape {tuple(labels.shape)}")
    b = B if local_batch_size is None else local_batch_size
    steps = local_steps_for(B, epochs, b)
    float32_step_size("FedAvg: local_lr", local_lr)
    b = min(b, B)

    model = copy.deepcopy(victim).eval()
    params = victim_parameters(model)
    before = OrderedDict((n, p.detach().clone()) for n, p in params.items())
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for epoch in range(epochs):
        order = torch.randperm(B, generator=gen) if shuffle else torch.arange(B)
        order = order.to(images.device)
        for start in range(0, B, b):
            idx = order[start : start + b]
            with torch.enable_grad():
                loss = F.cross_entropy(model(images[idx]), labels[idx])
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            if not losses:
                raise_if_unused(list(params), grads)  # before any weight moves, as the FedSGD client does
            if not torch.isfinite(loss):
                raise ClientDivergedError(
                    f"FedAvg: local loss is NaN/inf at epoch {epoch}, step {len(losses)} (local lr {local_lr}, "
                    f"{epochs} epochs): the client trains with BatchNorm in eval mode, whose frozen statistics let "
                    "large local steps diverge (see inversion/fedavg.py); lower threat.fedavg_lr, e.g. 0.01")
            losses.append(float(loss.detach()))
            with torch.no_grad():
                for p, g in zip(params.values(), grads):
                    if g is not None:
                        p.sub_(local_lr * g)
    assert len(losses) == steps
    delta = OrderedDict((n, (before[n] - p.detach()).float()) for n, p in params.items())
    return FedAvgUpdate(
        delta=delta,
        pseudo_gradient=fedavg_pseudo_gradient(delta, float(local_lr), steps),
        local_steps=steps,
        epochs=epochs,
        local_lr=float(local_lr),
        local_batch_size=b,
        losses=losses,
    )
