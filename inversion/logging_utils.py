"""Logging helpers that go through Lightning's generic logger API (W&B, CSV, TensorBoard alike)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torchvision.utils import make_grid


def to_uint8_hwc(images: torch.Tensor, nrow: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """Tile float images in [0, 1] (N, C, H, W) or (C, H, W) into one uint8 array (H', W', 3).

    W&B saves float arrays as black images, so every image that leaves the project is uint8.
    """
    if images.dim() == 3:
        images = images.unsqueeze(0)
    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    nrow = nrow or max(1, int(np.ceil(np.sqrt(len(images)))))
    grid = make_grid(images, nrow=nrow, padding=pad, pad_value=1.0)
    return (grid.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def log_image_grid(logger, key: str, images: torch.Tensor, step: Optional[int] = None, caption: str = "",
                   nrow: Optional[int] = None) -> None:
    """Log a grid of images in [0, 1] through a Lightning logger (``nrow`` images per row; default: about square, see
    :func:`to_uint8_hwc`).

    WandbLogger gets ``log_image`` with a uint8 array; loggers with an ``experiment.add_image`` (TensorBoard) get
    that; any other logger with a ``log_dir`` gets a PNG file under ``log_dir/images`` (written to a temporary name
    and renamed, :func:`inversion.fsutils.atomic_write_bytes`).
    """
    if logger is None:
        return
    log_uint8_image(logger, key, to_uint8_hwc(images, nrow=nrow), step=step, caption=caption)


def log_uint8_image(logger, key: str, grid: np.ndarray, step: Optional[int] = None, caption: str = "") -> None:
    """Log one uint8 (H, W, 3) image through a Lightning logger, as :func:`log_image_grid` does (W&B ``log_image``,
    TensorBoard ``add_image``, else a PNG under ``log_dir/images``); nothing when ``logger`` is None.

    Raises:
        ValueError: ``grid`` is not a uint8 (H, W, 3) array (W&B would save a float array black).
    """
    if logger is None:
        return
    if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[2] != 3:
        raise ValueError(f"log_uint8_image needs a uint8 (H, W, 3) array, got {grid.dtype} {tuple(grid.shape)}")
    if hasattr(logger, "log_image"):
        kwargs = {"caption": [caption]} if caption else {}
        logger.log_image(key=key, images=[grid], step=step, **kwargs)
        return
    exp = getattr(logger, "experiment", None)
    if exp is not None and hasattr(exp, "add_image"):
        exp.add_image(key, grid, global_step=step or 0, dataformats="HWC")
        return
    log_dir = getattr(logger, "log_dir", None)
    if log_dir:
        import io

        from PIL import Image

        from inversion.fsutils import atomic_write_bytes

        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG")
        # a temporary file renamed into place: an interrupted save never leaves a truncated PNG under the real name
        atomic_write_bytes(Path(log_dir) / "images" / f"{key.replace('/', '_')}_{step or 0:07d}.png", buf.getvalue())
