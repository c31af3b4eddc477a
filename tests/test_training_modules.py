"""Training-side guards of the victim/evaluator classifier and the DDPM prior, and the file modes of atomic writes."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from lightning import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.classifier import ImageClassifier, save_classifier
from lightning_modules.ddpm import DDPMPrior


def _trainer(**kw) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, **kw)


def _loader(n: int = 8, labels: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    ds = TensorDataset(x, torch.arange(n) % 10) if labels else TensorDataset(x)
    return DataLoader(ds, batch_size=4)


def test_classifier_refuses_more_steps_than_its_one_cycle_schedule_before_training():
    module = ImageClassifier(arch="convnet", image_size=8, max_lr_steps=3)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = _trainer(max_steps=5)
    with pytest.raises(ValueError, match=r"5 optimiser steps .*max_lr_steps = 3"):
        trainer.fit(module, _loader())
    assert trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    trainer = _trainer(max_steps=3)  # as many steps as the schedule: trains to the end
    trainer.fit(ImageClassifier(arch="convnet", image_size=8, max_lr_steps=3), _loader(16))
    assert trainer.global_step == 3


def _tiny_ddpm(**kw) -> DDPMPrior:
    return DDPMPrior(image_size=8, block_out_channels=(32, 32), layers_per_block=1, sample_every_n_steps=0, **kw)


def test_ddpm_checks_image_size_against_unet_depth_and_refuses_true_half_precision():
    with pytest.raises(ValueError, match=r"image_size 28 must be a multiple of 2\*\*\(levels - 1\) = 8"):
        DDPMPrior(image_size=28, block_out_channels=(32, 64, 64, 128))
    DDPMPrior(image_size=32, block_out_channels=(32, 64, 64, 128))  # the shipped prior's shape
    with pytest.raises(ValueError, match="bf16-true .* use bf16-mixed"):
        _trainer(max_steps=1, precision="bf16-true").fit(_tiny_ddpm(), _loader(labels=False))


class _EmaAtBatchEnd(Callback):
    """Records, when callbacks run at the end of each batch (where checkpoints and exports are written), the EMA and
    the value it should have: lerp(EMA before the step, weights after it, 1 - decay at the new global step)."""

    def __init__(self):
        self.errors: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ema_before = [p.detach().clone() for p in pl_module.ema_unet.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        decay = pl_module._ema_step_decay()
        err = 0.0
        for e0, e, w in zip(self.ema_before, pl_module.ema_unet.parameters(), pl_module.unet.parameters()):
            err = max(err, float((torch.lerp(e0, w.detach(), 1.0 - decay) - e).abs().max()))
        self.errors.append(err)


def test_ddpm_ema_is_updated_before_callbacks_save_it():
    torch.manual_seed(0)
    cb = _EmaAtBatchEnd()
    module = _tiny_ddpm(ema_decay=0.9, lr=1e-2, warmup_steps=1)  # steps large enough to see a missed update
    trainer = _trainer(max_steps=3, callbacks=[cb])
    trainer.fit(module, _loader(12, labels=False))
    assert trainer.global_step == 3 and len(cb.errors) == 3
    assert max(cb.errors) < 1e-5, cb.errors  # float rounding of lerp
    assert not all(torch.equal(e, w) for e, w in zip(module.ema_unet.parameters(), module.unet.parameters()))


def test_atomic_writes_get_ordinary_file_modes(tmp_path):
    import attack
    from callbacks.export import ExportModel

    old = os.umask(0o022)
    try:
        save_classifier(ImageClassifier(arch="convnet").model, {"arch": "convnet"}, tmp_path / "clf")
        attack.atomic_write_text(tmp_path / "results.csv", "user\n0\n")
        cb = ExportModel(str(tmp_path / "export"), sample_grid=False)
        cb._t0 = 0.0
        module = ImageClassifier(arch="convnet", image_size=8)

        class T:
            callback_metrics, global_step, current_epoch, precision = {}, 0, 0, "32-true"

        cb.export(T(), module)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "clf" / "model.safetensors") == 0o644
    assert mode(tmp_path / "results.csv") == 0o644
    assert mode(tmp_path / "export") == 0o755
    assert mode(tmp_path / "export" / "model.safetensors") == 0o644
