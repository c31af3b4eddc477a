"""Range checks for numbers that end up in float32 tensors (step sizes, noise scales).

A Python float passes ``math.isfinite`` far beyond what float32 holds: an attack lr of 1e38 overflowed inside Adam
("value cannot be converted to type float without overflow"), a FedAvg local lr of 1e-300 became 0 in float32 and the
pseudo-gradient 0 / 0, a Gaussian noise scale of 1e39 made every coordinate inf. These checks refuse such values when
the object is built, before any work, with the option's name.
"""

from __future__ import annotations

import math
from typing import Any

import torch

FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # ~3.4e38
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # ~1.2e-38, the smallest normal float32


def float32_step_size(what: str, value: Any) -> float:
    """``value`` as a float if it is a number in [FLOAT32_TINY, FLOAT32_MAX] (float32's normal positive range).

    Args:
        what: the option's name for the message, e.g. ``'attack.lr'``.
        value: a learning rate or other strictly positive scale.

    Raises:
        ValueError: not a number (bool included), NaN/inf, <= 0, or outside float32's normal range, naming ``what``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number > 0, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    if not FLOAT32_TINY <= v <= FLOAT32_MAX:
        raise ValueError(f"{what} = {value!r} is outside float32's range [{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.3g}] "
                         "(the tensors it scales are float32); use a value inside it")
    return v
