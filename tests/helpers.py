"""Tiny models and fixtures shared by the tests (fast on 2 CPU cores)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from lightning_modules.classifier import build_classifier, save_classifier

#: ``pytestmark`` of test modules that fit attacks on tiny in-memory data: Lightning's warnings about data-loader
#: workers, modules in eval mode (the frozen victim) and pytree LeafSpec say nothing there
QUIET_FIT_WARNINGS = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings(r"ignore:.*module\(s\) in eval mode.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
]


def tiny_mlp(seed: int = 0) -> nn.Module:
    """A 4-class victim for 1 x 8 x 8 images: Flatten, Linear(64, 16), Sigmoid, Linear(16, 4) (seeded)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Sigmoid(), nn.Linear(16, 4))


def tiny_victim(size: int = 8, channels: int = 1, num_classes: int = 10, seed: int = 0, arch: str = "resnet18"):
    torch.manual_seed(seed)
    model = build_classifier(arch, channels, num_classes, size).eval()
    cfg = {"arch": arch, "in_channels": channels, "num_classes": num_classes, "image_size": size,
           "mean": [0.5] * channels, "std": [0.5] * channels, "seed": seed}
    return model, cfg


def tiny_unet(size: int = 8, channels: int = 1, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    ).eval()


def save_tiny_assets(root: Path, size: int = 8, channels: int = 1) -> dict[str, str]:
    """Write a tiny victim, evaluator and DDPM folder under ``root``; returns their paths."""
    victim, vcfg = tiny_victim(size, channels, seed=0)
    save_classifier(victim, vcfg, root / "victim")
    ev, ecfg = tiny_victim(size, channels, seed=1, arch="convnet")
    save_classifier(ev, ecfg, root / "evaluator")
    DDPMPipeline(unet=tiny_unet(size, channels), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
        str(root / "ddpm"), safe_serialization=True
    )
    return {"victim": str(root / "victim"), "evaluator": str(root / "evaluator"), "prior": str(root / "ddpm")}


def write_idx(path: Path, arr: np.ndarray) -> None:
    """Write a uint8 array as a gzipped idx file (Fashion-MNIST's format)."""
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def write_fake_fmnist(folder: Path) -> Path:
    """A tiny Fashion-MNIST in the idx layout in ``folder``: 200 train and 100 test random 28x28 images,
    label = index % 10 (numpy seed 0). Returns ``folder``."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 200), ("t10k", 100)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder



class StepSpy:
    """What :func:`interrupt_user_at` installed: ``calls`` gets ``(log_prefix, global_step)`` for every training
    step; ``at`` is the ``(log_prefix, global_step)`` that raises KeyboardInterrupt (None: no interrupt, e.g. for
    the resumed run)."""

    def __init__(self, at):
        self.calls: list[tuple[str, int]] = []
        self.at = at


def interrupt_user_at(monkeypatch, user_prefix: str, step: int) -> StepSpy:
    """Patch :class:`UserLevelInversion`'s training step to record every call and to raise KeyboardInterrupt (a
    Ctrl-C in the middle of that user's attack) when the user logged under ``user_prefix`` (e.g. ``"user_0001/"``)
    reaches global step ``step``. Set the returned spy's ``at`` to None to let later runs through, still recorded."""
    from lightning_modules.user_level_inversion import UserLevelInversion

    original = UserLevelInversion.training_step
    spy = StepSpy((user_prefix, step))

    def recording(self, batch, batch_idx):
        spy.calls.append((self.log_prefix, self.global_step))
        if spy.at == (self.log_prefix, self.global_step):
            raise KeyboardInterrupt
        return original(self, batch, batch_idx)

    monkeypatch.setattr(UserLevelInversion, "training_step", recording)
    return spy
