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


class _ValMetricsAtValidation(Callback):
    """Records the classifier's validation accuracy each time a validation ends (sanity check excluded)."""

    def __init__(self):
        self.acc: dict[int, float] = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.acc[trainer.global_step] = float(trainer.callback_metrics["val/acc"])


def test_periodic_export_carries_the_validation_of_its_own_step(tmp_path):
    """An export at step N is written after step N's validation (Lightning validates after the batch-end hooks), so
    its summary's val metrics are step N's; at a step without validation it is written before the next step, with
    step N's weights."""
    import json

    from callbacks.export import ExportModel

    torch.manual_seed(0)

    class Recording(ExportModel):
        def export(self, trainer, pl_module):
            super().export(trainer, pl_module)
            summary = json.loads((self.dirpath / "training_summary.json").read_text())
            weights = [p.detach().clone() for p in pl_module.parameters()]
            self.seen.append((summary["global_step"], summary.get("validated_at_step"), summary["metrics"].get("val/acc"),
                              weights))

    val = _ValMetricsAtValidation()
    cb = Recording(str(tmp_path / "export"), every_n_steps=2, sample_grid=False)
    cb.seen = []
    steps_weights: dict[int, list] = {}

    class Weights(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps_weights[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    module = ImageClassifier(arch="convnet", image_size=8, lr=1e-2)
    trainer = _trainer(max_steps=6, val_check_interval=4, num_sanity_val_steps=0, callbacks=[Weights(), val, cb])
    trainer.fit(module, _loader(24), _loader(8))
    assert sorted(val.acc) == [4]  # 6 batches, val_check_interval 4
    # periodic at 2 (no validation yet) and 4 (after its validation); at 6 the fit ends: one export, the final one
    assert [s[:2] for s in cb.seen] == [(2, None), (4, 4), (6, 4)]
    for step, at, acc, weights in cb.seen:
        if at is not None:
            assert acc == pytest.approx(val.acc[at])
        assert all(torch.equal(a, b) for a, b in zip(weights, steps_weights[step]))
    card = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert "final logged metrics (validation at step 4):" in card


def test_exported_classifier_records_the_runs_seed(tmp_path):
    """config.json's seed and the summary's seed_everything are the run's seed_everything, not a default of 0 (the
    fine-tuned victim's config said 0 for a run seeded 2); an explicit ``seed`` is recorded as given."""
    import json

    from lightning import seed_everything

    from callbacks.export import ExportModel

    for model_seed, expected in ((None, 5), (3, 3)):
        seed_everything(5, verbose=False)
        out = tmp_path / f"clf{model_seed}"
        trainer = _trainer(max_steps=1, callbacks=[ExportModel(str(out), sample_grid=False)])
        trainer.fit(ImageClassifier(arch="convnet", image_size=8, seed=model_seed), _loader())
        assert json.loads((out / "config.json").read_text())["seed"] == expected
        summary = json.loads((out / "training_summary.json").read_text())
        assert summary["seed_everything"] == 5
        assert "seed_everything 5" in (out / "MODEL_CARD.md").read_text()


def test_ddpm_export_sample_grid_size_and_steps(tmp_path):
    """The export's sample grid can be shrunk for quick trials: 4 samples of 2 DDIM steps give a 1-row grid of four
    8x8 tiles (8 per row, 2-pixel padding), and the card says so; a grid of 0 samples is refused."""
    import numpy as np
    from PIL import Image

    from callbacks.export import ExportModel

    torch.manual_seed(0)
    out = tmp_path / "ddpm"
    cb = ExportModel(str(out), sample_grid_size=4, sample_steps=2)
    _trainer(max_steps=1, callbacks=[cb]).fit(_tiny_ddpm(), _loader(labels=False))
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape[:2] == (8 + 2 * 2, 4 * 8 + 5 * 2)
    assert "4 seeded DDIM samples, 2 steps" in (out / "MODEL_CARD.md").read_text()
    with pytest.raises(ValueError, match="sample_grid_size and sample_steps must be >= 1"):
        ExportModel(str(out), sample_grid_size=0)


def test_checkpoints_carry_the_rng_states_and_a_resume_continues_the_stream():
    """LightningCLI re-seeds a resumed run; the module's checkpoint hook saves the torch/numpy/random states and the
    resumed module sets them back at train start, so the next draws are those the stopped run would have made."""
    import random

    import numpy as np

    for make in (lambda: ImageClassifier(arch="convnet", image_size=8), _tiny_ddpm):
        torch.manual_seed(123), np.random.seed(123), random.seed(123)
        ckpt: dict = {"hyper_parameters": {}}
        make().on_save_checkpoint(ckpt)
        expected = (torch.rand(4), np.random.rand(2), random.random())  # what the run would have drawn next
        torch.manual_seed(0), np.random.seed(0), random.seed(0)  # the CLI's seed_everything at the resume
        resumed = make()
        resumed.on_load_checkpoint(ckpt)
        resumed.on_fit_start()
        resumed.on_train_start()  # the states are set once: the late fallback does not set them again
        got = (torch.rand(4), np.random.rand(2), random.random())
        assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_run_resumed_at_an_epoch_boundary_trains_exactly_as_the_uninterrupted_one(tmp_path, num_workers):
    """End to end through Lightning: 8 steps in one go against 4 steps, stop, resume from last.ckpt, 4 more (shuffled
    data, 4 batches an epoch; workers draw from the global stream). The states used to come back at on_train_start,
    after Lightning had built the epoch's DataLoader iterator from the re-seeded stream: epoch 1 replayed epoch 0's
    shuffling and worker seeds, and the weights differed by ~1e-3."""
    from lightning import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_steps, name, ckpt=None):
        seed_everything(0, verbose=False)  # as LightningCLI does on every start, a resume included
        module = _tiny_ddpm(warmup_steps=3, ema_decay=0.9)
        x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        loader = DataLoader(TensorDataset(x), batch_size=2, shuffle=True, drop_last=True, num_workers=num_workers)
        cb = ModelCheckpoint(dirpath=tmp_path / name, save_last=True, save_top_k=0, every_n_train_steps=1)
        Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                callbacks=[cb], max_steps=max_steps).fit(module, loader, ckpt_path=ckpt)
        return module

    whole = fit(8, "whole")
    fit(4, "half")
    resumed = fit(8, "half", ckpt=tmp_path / "half" / "last.ckpt")
    for net in ("unet", "ema_unet"):
        for a, b in zip(getattr(whole, net).parameters(), getattr(resumed, net).parameters()):
            assert torch.equal(a, b), net


@pytest.mark.parametrize("kind", ["ddpm", "classifier"])
def test_a_resume_with_another_lr_or_weight_decay_is_refused_before_any_step(tmp_path, kind):
    """Lightning restores the checkpoint's optimiser over the configured one: a new lr was silently ignored while the
    model card recorded it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def make(**kw):
        kw = {"lr": 5e-4, "weight_decay": 0.0, **kw}
        return _tiny_ddpm(**kw) if kind == "ddpm" else ImageClassifier(arch="convnet", image_size=8, **kw)

    labels = kind == "classifier"
    cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[cb], max_steps=2).fit(make(), _loader(labels=labels))
    for kw, named in (({"lr": 1e-3}, "lr 0.0005 -> 0.001"), ({"weight_decay": 0.01}, "weight_decay 0.0 -> 0.01")):
        module = make(**kw)
        before = [p.detach().clone() for p in module.parameters()]
        trainer = _trainer(max_steps=4)
        with pytest.raises(ValueError, match=f"{named} on a resume"):
            trainer.fit(module, _loader(labels=labels), ckpt_path=tmp_path / "last.ckpt")
        assert trainer.global_step == 0 or all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    trainer = _trainer(max_steps=3)  # the same values resume
    trainer.fit(make(), _loader(labels=labels), ckpt_path=tmp_path / "last.ckpt")
    assert trainer.global_step == 3


def test_ddpm_validates_the_ema_unet_too_and_samples_once_per_step_under_accumulation():
    """val/loss_ema is the EMA UNet's loss on val/loss's noise (the exported prior is the EMA one); with
    accumulate_grad_batches 2 the sample grid is drawn once per optimiser step, not once per batch."""
    torch.manual_seed(0)
    module = DDPMPrior(image_size=8, block_out_channels=(32, 32), layers_per_block=1, sample_every_n_steps=1,
                       lr=1e-2, warmup_steps=1, ema_decay=0.9)
    drawn = []
    module.log_samples = lambda: drawn.append(module.global_step)
    trainer = _trainer(max_steps=2, accumulate_grad_batches=2, limit_val_batches=1, num_sanity_val_steps=0,
                       val_check_interval=4)
    trainer.fit(module, _loader(16, labels=False), _loader(4, labels=False))
    assert trainer.global_step == 2 and drawn == [1, 2]
    x = _loader(4, labels=False).dataset.tensors[0]
    g = lambda: torch.Generator().manual_seed(1000)  # noqa: E731 - batch 0's validation noise
    with torch.no_grad():
        ema, raw = module.diffusion_loss(x, g(), unet=module.ema_unet), module.diffusion_loss(x, g())
    assert float(trainer.callback_metrics["val/loss_ema"]) == pytest.approx(float(ema), rel=1e-5)
    assert float(trainer.callback_metrics["val/loss"]) == pytest.approx(float(raw), rel=1e-5)
    assert float(ema) != float(raw)


def test_periodic_export_once_per_step_under_gradient_accumulation(tmp_path):
    from callbacks.export import ExportModel

    class Counting(ExportModel):
        def export(self, trainer, pl_module):
            self.steps.append(trainer.global_step)

    cb = Counting(str(tmp_path / "export"), every_n_steps=1, sample_grid=False)
    cb.steps = []
    trainer = _trainer(max_steps=3, accumulate_grad_batches=3, callbacks=[cb])
    trainer.fit(ImageClassifier(arch="convnet", image_size=8), _loader(40))
    assert cb.steps == [1, 2, 3]  # periodic at 1 and 2, the final one at 3 (it was [1, 1, 1, 2, 2, 2, 3])


def test_non_square_prior_is_refused():
    from diffusers import DDPMScheduler, UNet2DModel

    from inversion.prior import DiffusionPrior, PriorMismatchError

    unet = UNet2DModel(sample_size=(8, 16), in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(32, 32), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(PriorMismatchError, match=r"non-square sample_size \(8, 16\)"):
        DiffusionPrior(unet, DDPMScheduler(num_train_timesteps=10), (1, 8, 8))
    unet.register_to_config(sample_size=(8, 8))
    assert DiffusionPrior(unet, DDPMScheduler(num_train_timesteps=10), (1, 8, 8)).prior_size == 8


def _sampling_ddpm(**kw) -> DDPMPrior:
    """_tiny_ddpm with the sampling settings left to ``kw``."""
    return DDPMPrior(image_size=8, block_out_channels=(32, 32), layers_per_block=1, **kw)


def test_ddpm_refuses_sampling_settings_before_training():
    """With periodic sampling on, a DDIM step count outside 1..T (0: ZeroDivisionError, 2000: diffusers' ValueError)
    or an empty grid (a reshape error) failed at the first sample, after training started."""
    steps = r"model.init_args.sample_inference_steps must be an integer in 1\.\.{}"
    for bad in (0, 2000, -1):
        with pytest.raises(ValueError, match=steps.format(1000) + rf" .*got {bad}; or set .*sample_every_n_steps: 0"):
            _sampling_ddpm(sample_every_n_steps=1, sample_inference_steps=bad)
    with pytest.raises(ValueError, match=steps.format(10) + " .*got 50"):
        _sampling_ddpm(sample_every_n_steps=1, num_train_timesteps=10)  # the default 50 steps > T = 10
    with pytest.raises(ValueError, match="model.init_args.sample_grid_size must be an integer >= 1, got 0"):
        _sampling_ddpm(sample_every_n_steps=1, sample_grid_size=0)
    with pytest.raises(ValueError, match=r"model.init_args.sample_every_n_steps must be an integer >= 0 .*got -1"):
        _sampling_ddpm(sample_every_n_steps=-1)
    # the bounds are accepted; with sampling off the grid settings are not used, so not checked
    _sampling_ddpm(sample_every_n_steps=1, sample_inference_steps=1000, sample_grid_size=1)
    _sampling_ddpm(sample_every_n_steps=0, sample_inference_steps=0, sample_grid_size=0)
    module = _sampling_ddpm(sample_every_n_steps=1, num_train_timesteps=10, sample_inference_steps=10,
                            sample_grid_size=2)
    _trainer(max_steps=1).fit(module, _loader(labels=False))  # samples once, with every one of the 10 timesteps


def test_ddpm_refuses_block_widths_the_group_norm_cannot_split():
    """torch's own error named neither the config key nor the rule: 'num_channels (8) must be divisible by
    num_groups (32)'."""
    with pytest.raises(ValueError, match=r"model.init_args.block_out_channels \[8, 8\] must be a non-empty list of "
                                         r"positive multiples of 32 .*norm_num_groups = 32.*; not: \[8, 8\]"):
        DDPMPrior(image_size=8, block_out_channels=(8, 8), layers_per_block=1)
    with pytest.raises(ValueError, match=r"block_out_channels \[32, 48\] .*; not: \[48\]"):
        DDPMPrior(image_size=8, block_out_channels=[32, 48], layers_per_block=1)
    with pytest.raises(ValueError, match=r"block_out_channels \[\] must be a non-empty list"):
        DDPMPrior(image_size=8, block_out_channels=[], layers_per_block=1)
    module = DDPMPrior(image_size=8, block_out_channels=(32, 64), layers_per_block=1)
    from lightning_modules.ddpm import NORM_NUM_GROUPS

    assert NORM_NUM_GROUPS == 32 and module.unet.config.norm_num_groups == 32


def test_export_refuses_more_sample_steps_than_training_timesteps_before_training(tmp_path):
    """sample_steps > T made the final export's DDIM fail after the whole training; now on_fit_start refuses it."""
    from callbacks.export import ExportModel

    class Steps(Callback):
        steps = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            Steps.steps += 1

    out = tmp_path / "ddpm"
    module = _tiny_ddpm(num_train_timesteps=10)
    with pytest.raises(ValueError, match=r"sample_steps 11 exceeds the model's num_train_timesteps 10 "
                                         r"\(model.init_args.num_train_timesteps.*at most 10, or sample_grid: false"):
        _trainer(max_steps=1, callbacks=[ExportModel(str(out), sample_grid_size=2, sample_steps=11), Steps()]).fit(
            module, _loader(labels=False))
    assert Steps.steps == 0 and not out.exists()
    # no grid: nothing to refuse; T steps: the grid is drawn
    _trainer(max_steps=1, callbacks=[ExportModel(str(out), sample_grid=False, sample_steps=11)]).fit(
        _tiny_ddpm(num_train_timesteps=10), _loader(labels=False))
    assert not (out / "samples.png").exists()
    _trainer(max_steps=1, callbacks=[ExportModel(str(out), overwrite=True, sample_grid_size=2, sample_steps=10)]).fit(
        _tiny_ddpm(num_train_timesteps=10), _loader(labels=False))
    assert (out / "samples.png").is_file()
    assert "2 seeded DDIM samples, 10 steps" in (out / "MODEL_CARD.md").read_text()


def test_ddpm_fit_does_not_warn_about_its_eval_mode_ema_unet(recwarn):
    """Every DDPM run printed Lightning's 'Found 179 module(s) in eval mode' (the frozen EMA copy, by design)."""
    _trainer(max_steps=1).fit(_tiny_ddpm(), _loader(labels=False))
    assert not [w for w in recwarn if "in eval mode at the start of training" in str(w.message)]
    assert not [f for f in __import__("warnings").filters if f[1] is not None and "in eval mode" in f[1].pattern]
    module = _tiny_ddpm()
    module.unet.conv_in.eval()  # one more module in eval mode: a real surprise still warns
    with pytest.warns(UserWarning, match=r"Found \d+ module\(s\) in eval mode"):
        _trainer(max_steps=1).fit(module, _loader(labels=False))
