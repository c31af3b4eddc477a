"""Victim and evaluator classifiers: architectures, a LightningModule to train them, safetensors save/load.

The victim is torchvision's ``resnet18`` with the small-image stem (3x3 conv, stride 1, no max-pool, as in the
CIFAR ResNets of He et al. 2016 sec. 4.2) for inputs up to 64 px. The per-channel input normalisation is a layer
inside the model, so every caller (client, attacker, evaluation) feeds plain pixels in [0, 1].

The evaluator is an independent classifier (another architecture, another seed) used only to judge whether a
reconstruction shows a user's class; it never sees the attack.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from lightning import LightningModule
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from inversion.fsutils import atomic_write_bytes
from lightning_modules.resumable import Resumable, run_seed

ARCHITECTURES = ("resnet18", "convnet")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class Normalize(nn.Module):
    """(x - mean) / std per channel, as a layer. Input float (B, C, H, W) in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels, same shape as ``x`` (B, C, H, W); ``x`` is float in [0, 1], C = len(mean)."""
        return (x - self.mean) / self.std


def resnet18_small(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision ``resnet18`` with a 3x3/stride-1 stem and no max-pool (for 28-64 px inputs)."""
    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


class ConvNet(nn.Module):
    """A small VGG-style CNN (the evaluator's architecture): 3 conv stages with BN, dropout, global pooling."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()

        def stage(cin, cout):
            """Two 3x3 conv + BN + ReLU layers (cin -> cout -> cout), then a 2x2 max-pool halving H and W."""
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(stage(in_channels, width), stage(width, 2 * width), stage(2 * width, 4 * width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of a float (B, in_channels, H, W) input.

        The input is used as given (the pixel normalisation is the :class:`Normalize` layer that
        :func:`build_classifier` puts in front).
        """
        return self.head(self.features(x))


def build_classifier(
    arch: str,
    in_channels: int,
    num_classes: int,
    image_size: int = 32,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> nn.Sequential:
    """Build ``Sequential(Normalize, net)``: takes float (B, in_channels, H, W) pixels in [0, 1], returns logits.

    Raises:
        ValueError: unknown ``arch``, ``image_size`` above 64 px for the small-stem ResNet-18, or ``mean``/``std``
            not of length ``in_channels``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown classifier arch {arch!r}; choose one of {ARCHITECTURES}")
    if arch == "resnet18" and image_size > 64:
        raise ValueError(f"the small-stem resnet18 is for inputs up to 64 px, got image_size={image_size}")
    mean = list(mean) if mean is not None else [0.5] * in_channels
    std = list(std) if std is not None else [0.5] * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values (in_channels), got {len(mean)}/{len(std)}")
    net = resnet18_small(in_channels, num_classes) if arch == "resnet18" else ConvNet(in_channels, num_classes)
    return nn.Sequential(Normalize(mean, std), net)


class ImageClassifier(Resumable, LightningModule):
    """Train a victim or evaluator classifier with cross-entropy.

    Batches are ``(images, labels)`` with images float (B, C, H, W) in [0, 1] and labels int64 (B,).

    Args:
        arch: 'resnet18' (victim) or 'convnet' (evaluator).
        in_channels, num_classes, image_size: input and output shapes; must agree with the data.
        mean, std: per-channel normalisation stored inside the model (default 0.5/0.5).
        lr, weight_decay, max_lr_steps: AdamW with a one-cycle schedule over ``max_lr_steps`` (0: constant lr); a
            trainer that would take more steps than ``max_lr_steps`` is refused (ValueError) before the first step.
        label_smoothing: CE label smoothing.
        seed: the seed recorded in the exported ``config.json``; None (default): the run's ``seed_everything``
            (read from Lightning's ``PL_GLOBAL_SEED`` at fit start; None when no seed was set). Not used for
            randomness here: the run's seed is ``seed_everything``.
        init_weights: optional classifier folder (model.safetensors + config.json) to start from (fine-tuning;
            looked up as given, then under the repository root: :func:`inversion.fsutils.find_input_path`); its
            architecture and shapes must match, and so must its input normalisation: the source's ``mean``/``std``
            (its config.json, else its weights' buffers) must equal this config's ``mean``/``std`` (the defaults
            0.5 included) to within float16 rounding, or ValueError (:func:`check_normalisation_matches`) names
            both. The model keeps the configured values (the source's weights were trained behind them).

    Raises:
        ValueError: unknown arch or bad shapes (:func:`build_classifier`); ``init_weights`` holds another
            architecture or shapes, or another normalisation.
        FileNotFoundError: ``init_weights`` is not a classifier folder (:func:`load_classifier`).
    """

    def __init__(
        self,
        arch: str = "resnet18",
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 32,
        mean: Optional[list[float]] = None,
        std: Optional[list[float]] = None,
        lr: float = 2e-3,
        weight_decay: float = 5e-4,
        max_lr_steps: int = 0,
        label_smoothing: float = 0.0,
        seed: Optional[int] = None,
        init_weights: Optional[str] = None,
    ) -> None:
        super().__init__()
        # an unset seed stays out of hparams: Lightning refuses to log a module and a data module whose hparams
        # share a key with different values (the data modules have their own ``seed``)
        self.save_hyperparameters(ignore=["seed"] if seed is None else None)
        self.model = build_classifier(arch, in_channels, num_classes, image_size, mean, std)
        self._run_seed: Optional[int] = None
        if init_weights:
            from inversion.fsutils import find_input_path  # as given, else under the repository root

            start, cfg = load_classifier(find_input_path(init_weights))
            if (cfg["arch"], cfg["in_channels"], cfg["num_classes"]) != (arch, in_channels, num_classes):
                raise ValueError(f"init_weights {init_weights} holds a {cfg['arch']} ({cfg['in_channels']} -> "
                                 f"{cfg['num_classes']}), not a {arch} ({in_channels} -> {num_classes})")
            check_normalisation_matches(init_weights, cfg, start, self.model)
            state = start.state_dict()
            # the configured buffers (equal to the source's, checked above): not the source's copies, which an
            # export rounded to its dtype (float16: 0.2860 -> 0.28613)
            state.update({k: v for k, v in self.model.state_dict().items() if k in ("0.mean", "0.std")})
            self.model.load_state_dict(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of float (B, in_channels, H, W) pixels in [0, 1] (normalised inside the model)."""
        return self.model(x)

    def _step(self, batch, stage: str):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing if stage == "train" else 0.0)
        acc = (logits.argmax(1) == y).float().mean()
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        self.log(f"{stage}/acc", acc, prog_bar=True, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_fit_start(self) -> None:
        """Remember the run's seed (``seed_everything`` sets ``PL_GLOBAL_SEED``) for the exported config; a resumed
        run's RNG states come back here (:class:`~lightning_modules.resumable.Resumable`)."""
        super().on_fit_start()
        self._run_seed = run_seed()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, before anything is trained, a resume whose ``max_lr_steps`` does not continue the checkpoint's
        learning-rate schedule. Lightning restores the saved schedule's state (``total_steps`` included) over the one
        :meth:`configure_optimizers` builds: another one-cycle length passed the length check there and then raised
        at step ``total_steps + 1`` after that step's update; a one-cycle resume of a constant-lr run (no saved
        schedule) raised ``KeyError: 'initial_lr'`` after one update; and ``max_lr_steps`` 0 on a one-cycle run
        silently went on at the checkpoint's last (annealed) lr and momentum instead of ``lr``.

        Raises:
            ValueError: only while fitting (not for ``load_from_checkpoint`` or validate/test), naming both lengths.
        """
        super().on_load_checkpoint(checkpoint)
        if not (self._trainer is not None and self.trainer.state.fn == "fit"):
            return
        saved = [s["total_steps"] for s in checkpoint.get("lr_schedulers") or []
                 if isinstance(s, dict) and "total_steps" in s]
        had = saved[0] if saved else 0  # 0: trained at a constant lr
        want = self.hparams.max_lr_steps or 0
        if had != want:
            was = f"a one-cycle schedule of {had} optimiser steps" if had else "a constant lr (max_lr_steps 0)"
            raise ValueError(
                f"the checkpoint was trained with {was} but model.init_args.max_lr_steps = {want}: a resumed run "
                f"keeps its learning-rate schedule. Resume with max_lr_steps {had}"
                + (f" and trainer.max_steps <= {had}" if had else "")
                + ", or train on from the exported weights in a fresh run (model.init_args.init_weights) with a new "
                "schedule"
            )

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if not self.hparams.max_lr_steps:
            return opt
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        if total > self.hparams.max_lr_steps:  # OneCycleLR raises at step max_lr_steps + 1, after all that training
            raise ValueError(
                f"the trainer will take {total} optimiser steps but the one-cycle schedule has "
                f"model.init_args.max_lr_steps = {self.hparams.max_lr_steps}: set trainer.max_steps <= max_lr_steps "
                "(a resumed run included); in a fresh run, raise max_lr_steps or set it to 0 for a constant lr (a "
                "resumed run keeps its schedule: train on from its exported weights with model.init_args.init_weights)"
            )
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=self.hparams.max_lr_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def classifier_config(self) -> dict:
        """The JSON config written next to the weights by :meth:`export` and read back by :func:`load_classifier`.

        Keys: 'arch', 'in_channels', 'num_classes', 'image_size', 'mean' and 'std' (per-channel floats, taken from
        the model's :class:`Normalize` layer) and 'seed'.
        """
        hp = self.hparams
        return {
            "arch": hp.arch,
            "in_channels": hp.in_channels,
            "num_classes": hp.num_classes,
            "image_size": hp.image_size,
            "mean": list(self.model[0].mean.flatten().tolist()),
            "std": list(self.model[0].std.flatten().tolist()),
            "seed": hp.get("seed") if hp.get("seed") is not None else self._run_seed,
        }

    def export(self, dirpath: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write ``model.safetensors`` + ``config.json`` (rebuilds with :func:`load_classifier`)."""
        return save_classifier(self.model, self.classifier_config(), dirpath, dtype)


def check_normalisation_matches(name: str, source_cfg: dict, source: nn.Module, model: nn.Module) -> None:
    """Refuse a warm start whose source normalises its inputs differently from ``model``.

    The normalisation is a layer inside the model (:class:`Normalize`, the first module of ``Sequential(Normalize,
    net)``): loading the source's state dict would silently replace the configured ``mean``/``std`` with the
    source's, and the fine-tuned classifier would not be the configured one. The source's values come from its
    ``config.json`` (exact), else from its ``Normalize`` buffers; they must equal ``model``'s within float16
    rounding (relative 1e-3: exports may be float16).

    Args:
        name: the ``init_weights`` value, for the message.
        source_cfg, source: the source's config and model (:func:`load_classifier`); model: the one built here.

    Raises:
        ValueError: mean or std differ; the message gives both and says to set model.init_args.mean/std to the
            source's values.
    """
    diffs = []
    for key in ("mean", "std"):
        here = getattr(model[0], key).flatten().double()
        given = source_cfg.get(key)
        src = (torch.tensor([float(v) for v in given], dtype=torch.float64) if given is not None
               else getattr(source[0], key).flatten().double())
        if src.shape != here.shape or not torch.allclose(src, here, rtol=1e-3, atol=1e-6):
            diffs.append(f"{key}: source {[round(v, 6) for v in src.tolist()]}, "
                         f"here {[round(v, 6) for v in here.tolist()]}")
    if diffs:
        raise ValueError(
            f"init_weights {name} normalises its inputs differently from this config ({'; '.join(diffs)}): its "
            "weights were trained behind its own normalisation layer. Set model.init_args.mean and std to the "
            "source's values (its config.json), or train from scratch without init_weights")


def save_classifier(model: nn.Module, config: dict, dirpath: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Save weights as safetensors (cast to ``dtype``, buffers too) and the JSON config into ``dirpath``; each file
    is written atomically and durably (:func:`inversion.fsutils.atomic_write_bytes`), weights first."""
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    atomic_write_bytes(dirpath / WEIGHTS_FILE, save_safetensors(state, metadata={"format": "pt"}))
    atomic_write_bytes(dirpath / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return dirpath


def load_classifier(dirpath: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a classifier saved by :func:`save_classifier`; returns (model in eval mode, float32, config).

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or ``model.safetensors`` is missing.
        ValueError: the weights do not fit the architecture the config describes.
    """
    dirpath = Path(dirpath)
    cfg_path, w_path = dirpath / CONFIG_FILE, dirpath / WEIGHTS_FILE
    if not dirpath.is_dir():
        from inversion.fsutils import producing_train_config

        made_by = producing_train_config(dirpath)
        raise FileNotFoundError(
            f"classifier checkpoint {dirpath} not found: "
            + (f"train it with `python train.py --config {made_by}`" if made_by else
               "give a folder written by train.py (model.safetensors + config.json), e.g. "
               "checkpoints/fashion_mnist/victim_resnet18 or checkpoints/fashion_mnist/evaluator_convnet")
        )
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"classifier checkpoint {dirpath} lacks {p.name}; expected a folder written by train.py "
                f"(model.safetensors + config.json), e.g. checkpoints/fashion_mnist/victim_resnet18"
            )
    cfg = json.loads(cfg_path.read_text())
    model = build_classifier(
        cfg["arch"], cfg["in_channels"], cfg["num_classes"], cfg.get("image_size", 32), cfg.get("mean"), cfg.get("std")
    )
    state = load_file(str(w_path))
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as exc:
        raise ValueError(
            f"{w_path} does not hold a {cfg['arch']} with in_channels={cfg['in_channels']}, "
            f"num_classes={cfg['num_classes']} as {cfg_path} says: {str(exc).splitlines()[0]}"
        ) from exc
    return model.to(device).eval(), cfg
