"""Image metrics between a user's representative image and that user's batch: MSE, PSNR, SSIM, LPIPS.

All images are float tensors with pixels in [0, 1]: ``x_hat`` is (1, C, H, W) or (C, H, W), a batch is
(B, C, H, W), C = 1 (grayscale) or 3 (RGB). Per-pair functions broadcast a single image against a batch and return
one value per batch image (shape (B,)). :func:`image_metrics` reduces them to the "nearest" (best over the batch: min
for MSE/LPIPS, max for PSNR/SSIM) and the "mean" (mean over the batch) value.

Sources: PSNR and SSIM from torchmetrics (``torchmetrics.functional``; SSIM of Wang et al. 2004 with an 11x11
Gaussian window, sigma 1.5, data_range 1, in torchmetrics' convention: the image is reflect-padded and the SSIM map
averaged over every pixel, borders included, whereas skimage / Wang et al.'s reference code average only the
positions where the whole window fits. At 28 x 28 that valid region is 18 x 18 and the two differ a lot (0.07 vs
0.15 on one measured pair): compare SSIM figures only with torchmetrics-based ones). LPIPS is the standard one (Zhang et al. 2018, arXiv 1801.03924): the
``lpips`` package, AlexNet trunk with torchvision's ImageNet weights, v0.1 linear heads. The AlexNet features are
loaded from ``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth`` (installed offline by
``scripts/install_lpips_weights.py``); the trunk is never left with random weights.

LPIPS resolution: AlexNet needs at least 31 x 31 pixels (two 3x3/2 max-pools after an 11x11/4 conv). Images whose
shorter side is below :data:`LPIPS_MIN_SIZE` (32) are upsampled bilinearly (aspect kept) so that side is 32, e.g.
28 x 28 Fashion-MNIST -> 32 x 32; larger images are used at their native size, as in the gradient-inversion
literature that reports LPIPS on 32 x 32 CIFAR. Grayscale is replicated to 3 channels; inputs are mapped to [-1, 1].
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

__all__ = [
    "LPIPS_MIN_SIZE",
    "PSNR_MAX_DB",
    "RANGE_TOL",
    "LpipsWeightsMissing",
    "alexnet_weights_path",
    "check_image_range",
    "get_lpips_model",
    "image_metrics",
    "lpips_distance",
    "mse",
    "psnr",
    "ssim",
]

LPIPS_MIN_SIZE = 32
PSNR_MAX_DB = 100.0
RANGE_TOL = 1e-3
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
INSTALL_HINT = "python scripts/install_lpips_weights.py  (or bash scripts/setup_offline_assets.sh)"

_LPIPS_CACHE: dict[str, torch.nn.Module] = {}
_LPIPS_LOCK = threading.Lock()


class LpipsWeightsMissing(FileNotFoundError):
    """The ImageNet AlexNet features for LPIPS are not installed in torch's hub cache."""


def check_image_range(x: torch.Tensor, name: str = "image", tol: float = RANGE_TOL) -> None:
    """Raise ValueError unless ``x`` is a floating tensor with pixels in [0, 1] (within ``tol``).

    A maximum above 1.5 is reported as probably 0-255 pixels; any other value outside [-tol, 1 + tol] (e.g. images
    normalised to [-1, 1]) is reported with the observed min/max. NaN/inf are rejected too.
    """
    if not torch.is_tensor(x):
        raise TypeError(f"{name}: expected a torch.Tensor with pixels in [0, 1], got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor with pixels in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name}: empty tensor of shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or inf; expected pixels in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if hi > 1.5:
        raise ValueError(
            f"{name}: pixel values in [{lo:.4g}, {hi:.4g}] look like 0-255; expected floats in [0, 1] (divide by 255)"
        )
    if lo < -tol or hi > 1 + tol:
        raise ValueError(
            f"{name}: pixel values in [{lo:.4g}, {hi:.4g}] are outside [0, 1] (tolerance {tol}); expected floats in "
            "[0, 1] (map [-1, 1] images with (x + 1) / 2)"
        )


def _pair(x_hat: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, then broadcast ``x_hat`` to the batch: returns two float32 (B, C, H, W) tensors clamped to [0, 1]."""
    if batch.dim() == 3:
        batch = batch.unsqueeze(0)
    if x_hat.dim() == 3:
        x_hat = x_hat.unsqueeze(0)
    if batch.dim() != 4 or x_hat.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) batch and (1, C, H, W) image, got {tuple(batch.shape)} and "
                         f"{tuple(x_hat.shape)}")
    check_image_range(x_hat, "x_hat")
    check_image_range(batch, "batch")
    if x_hat.shape[1:] != batch.shape[1:]:
        raise ValueError(f"x_hat {tuple(x_hat.shape)} and batch {tuple(batch.shape)} differ in C, H or W")
    if x_hat.shape[0] not in (1, batch.shape[0]):
        raise ValueError(f"x_hat has {x_hat.shape[0]} images; expected 1 or the batch size {batch.shape[0]}")
    batch = batch.float().clamp(0, 1)
    x_hat = x_hat.to(batch.device).float().clamp(0, 1).expand_as(batch)
    return x_hat, batch


def mse(x_hat: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Mean squared error per batch image, pixels in [0, 1]: returns (B,) float32 (units: [0,1]^2)."""
    a, b = _pair(x_hat, batch)
    return ((a - b) ** 2).flatten(1).mean(1)


def psnr(x_hat: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per batch image, data_range 1: 10 log10(1 / MSE). Returns (B,).

    Uses ``torchmetrics.functional.image.peak_signal_noise_ratio`` (reduction none, per image), capped at
    :data:`PSNR_MAX_DB` (100 dB, i.e. MSE <= 1e-10) so that an exact copy gives a finite value that can be averaged.
    """
    a, b = _pair(x_hat, batch)
    out = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return torch.nan_to_num(out, posinf=PSNR_MAX_DB).clamp(max=PSNR_MAX_DB)


def ssim(x_hat: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """SSIM per batch image (torchmetrics, Gaussian 11x11, sigma 1.5, data_range 1; reflect-padded, the map averaged
    over all pixels: see the module docstring): returns (B,) in [-1, 1].

    Raises ValueError for images smaller than the 11 x 11 window.
    """
    a, b = _pair(x_hat, batch)
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11 x 11 pixels, got {tuple(a.shape[-2:])}")
    return structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")


def alexnet_weights_path() -> Path:
    """Path of the ImageNet AlexNet weights that LPIPS uses: ``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def _load_alexnet_features(model: torch.nn.Module) -> None:
    """Load the ImageNet AlexNet ``features.*`` tensors into ``model.net`` (lpips.pretrained_networks.alexnet).

    The lpips trunk keeps torchvision's indices inside its slices (slice1.0 = features.0, ..., slice5.10 =
    features.10), so each conv parameter ``sliceK.I.weight`` maps to ``features.I.weight``. Every trunk parameter
    must be found, with the right shape, or this raises.
    """
    path = alexnet_weights_path()
    if not path.is_file():
        raise LpipsWeightsMissing(
            f"LPIPS needs torchvision's ImageNet AlexNet weights at {path}, which is missing (they cannot be "
            f"downloaded here). Install them offline with: {INSTALL_HINT}"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapped = {}
    for name, param in model.net.named_parameters():
        _, idx, kind = name.split(".")  # sliceK.I.weight
        key = f"features.{idx}.{kind}"
        if key not in state or state[key].shape != param.shape:
            raise ValueError(f"{path}: {key} missing or of the wrong shape; rerun {INSTALL_HINT} --force")
        mapped[name] = state[key]
    if len(mapped) != 10:
        raise ValueError(f"lpips AlexNet trunk has {len(mapped)} parameters, expected 10 conv weights/biases")
    missing, unexpected = model.net.load_state_dict(mapped, strict=False)
    if [k for k in missing if k in mapped] or unexpected:
        raise RuntimeError(f"could not load AlexNet features: missing {missing}, unexpected {unexpected}")


def get_lpips_model(device: str | torch.device = "cpu") -> torch.nn.Module:
    """Standard LPIPS (lpips 0.1.4, net='alex', version='0.1') with ImageNet AlexNet features, cached per process.

    The model is built with ``pnet_rand=True`` (so torchvision never tries to download) and then the AlexNet
    features are loaded from torch's hub cache (see :func:`alexnet_weights_path`); the v0.1 heads come from the
    lpips package. Eval mode, no gradients.

    Raises:
        LpipsWeightsMissing: the AlexNet weights file is absent (names the install command).
    """
    key = str(torch.device(device))
    with _LPIPS_LOCK:
        if key not in _LPIPS_CACHE:
            import warnings

            import lpips

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torchvision's "pretrained is deprecated"
                model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
            _load_alexnet_features(model)
            model = model.eval().requires_grad_(False).to(device)
            _LPIPS_CACHE[key] = model
        return _LPIPS_CACHE[key]


def _lpips_size(x: torch.Tensor, min_size: int = LPIPS_MIN_SIZE) -> torch.Tensor:
    h, w = x.shape[-2:]
    if min(h, w) >= min_size:
        return x
    scale = min_size / min(h, w)
    size = (max(min_size, round(h * scale)), max(min_size, round(w * scale)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def lpips_distance(
    x_hat: torch.Tensor, batch: torch.Tensor, device: Optional[str | torch.device] = None, chunk: int = 256
) -> torch.Tensor:
    """Standard LPIPS distance (AlexNet, v0.1) per batch image: returns (B,) float32 on CPU, >= 0 (0 = identical).

    Pixels in [0, 1]; grayscale replicated to 3 channels; images with a side below 32 upsampled bilinearly to 32
    (see module docstring); inputs mapped to [-1, 1] as lpips expects. ``device`` defaults to the batch's device.

    Raises:
        ValueError: pixel range or shapes are wrong (see :func:`check_image_range`).
        LpipsWeightsMissing: ImageNet AlexNet weights are not installed.
    """
    a, b = _pair(x_hat, batch)
    device = torch.device(device) if device is not None else b.device
    model = get_lpips_model(device)
    if a.shape[1] == 1:
        a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
    elif a.shape[1] != 3:
        raise ValueError(f"LPIPS needs 1 or 3 channels, got {a.shape[1]}")
    out = []
    for i in range(0, len(b), chunk):
        pa = _lpips_size(a[i : i + chunk].to(device)) * 2 - 1
        pb = _lpips_size(b[i : i + chunk].to(device)) * 2 - 1
        out.append(model(pa, pb).flatten().float().cpu())
    return torch.cat(out)


def image_metrics(x_hat: torch.Tensor, batch: torch.Tensor, lpips: bool = True,
                  device: Optional[str | torch.device] = None) -> dict[str, float]:
    """All metrics between a representative image and a user's batch, reduced over the batch.

    Args:
        x_hat: (1, C, H, W) or (C, H, W) float, pixels in [0, 1].
        batch: (B, C, H, W) float, pixels in [0, 1], same C, H, W.
        lpips: compute LPIPS too (needs the AlexNet weights; see :func:`get_lpips_model`).
        device: device for LPIPS (default: the batch's).

    Returns:
        ``{mse_nearest, mse_mean, psnr_nearest, psnr_mean, ssim_nearest, ssim_mean, lpips_nearest, lpips_mean,
        nearest_index}``: "nearest" is the best over the batch (min MSE/LPIPS, max PSNR/SSIM; PSNR in dB),
        "mean" the mean over the batch of the per-image value; ``nearest_index`` is the batch index of the image with
        the lowest MSE. SSIM keys are NaN for images under 11 x 11 pixels; PSNR is capped at 100 dB.

    Raises:
        ValueError: bad range (e.g. 0-255 pixels) or shapes.
        LpipsWeightsMissing: ``lpips=True`` and the AlexNet weights are not installed.
    """
    per = {"mse": mse(x_hat, batch), "psnr": psnr(x_hat, batch)}
    try:
        per["ssim"] = ssim(x_hat, batch)
    except ValueError:
        if min(batch.shape[-2:]) >= 11:
            raise
        per["ssim"] = torch.full_like(per["mse"], math.nan)
    if lpips:
        per["lpips"] = lpips_distance(x_hat, batch, device=device)
    out: dict[str, float] = {}
    for name, values in per.items():
        values = values.detach().double().cpu()
        best = values.max() if name in ("psnr", "ssim") else values.min()
        out[f"{name}_nearest"] = float(best)
        out[f"{name}_mean"] = float(values.mean())
    out["nearest_index"] = int(per["mse"].argmin())
    return out
