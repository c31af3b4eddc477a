"""Review fixes of the training side: DDPM layouts, warm-start checks, the last checkpoint, exports, W&B, run configs.

1. load_ddpm and DDPMPrior(init_weights=...) share one loader (inversion.prior.load_ddpm_parts): the pipeline layout
   (unet/, scheduler/) first, then the root layout of single-model hub repos (google/ddpm-cifar10-32), local or by
   hub id from the HF cache; a folder that is not a DDPM (a classifier) is refused clearly; the offline hint only
   when HF_HUB_OFFLINE is set and the cache holds nothing of the id.
2. A DDPM warm start compares the UNet configs (not only the weight shapes) and the noise schedules.
3. train.py writes last.ckpt at the final step when training stops off the every_n_train_steps grid.
4. Two ExportModel callbacks can share a Trainer; a checkpoint of the older code (state key 'ExportModel') resumes.
5. An export folder under a regular file fails before training.
6. A classifier warm start refuses another input normalisation.
7. The train configs leave W&B's mode to WANDB_MODE (no offline: true, which forces dryrun).
8. The resume config (config-resume-k.yaml) is written when training starts, after the whole checkpoint restore.
9. last.ckpt at a stop (max_steps, max_time) is written from the final batch's on_train_batch_end, before Lightning
   counts the stopped epoch as completed, so a resume trains the rest of that epoch (as from Lightning's own
   checkpoints).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDPMScheduler, UNet2DModel
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from callbacks.export import ExportModel, check_export_target
from inversion.prior import load_ddpm
from lightning_modules.classifier import ImageClassifier, save_classifier
from lightning_modules.ddpm import DDPMPrior
from tests.helpers import QUIET_FIT_WARNINGS, tiny_victim, write_fake_fmnist
from tests.test_train_runs import _config, _step

pytestmark = QUIET_FIT_WARNINGS

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=8, block_out_channels=(32, 32), layers_per_block=1)


def _tiny_ddpm(in_channels: int = 1, seed: int = 0, **kw) -> DDPMPrior:
    torch.manual_seed(seed)
    return DDPMPrior(in_channels=in_channels, **{**TINY, **kw})


def _save_root_layout(folder: Path, unet: UNet2DModel, scheduler: DDPMScheduler) -> Path:
    """config.json + diffusion_pytorch_model.safetensors + scheduler_config.json at the top of ``folder`` (the layout
    of google/ddpm-cifar10-32 and google/ddpm-cat-256), plus their model_index.json."""
    unet.save_pretrained(str(folder))
    scheduler.save_pretrained(str(folder))
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
         "scheduler": ["diffusers", "DDPMScheduler"]}))
    return folder


def _eps(unet: UNet2DModel, channels: int = 1) -> torch.Tensor:
    x = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return unet.eval()(x, torch.tensor([10, 500])).sample


# ------------------------------------------------------------------------------------------------ 1 layouts
def test_local_root_layout_ddpm_folder_loads_as_prior_and_warm_start(tmp_path):
    src = _tiny_ddpm()
    folder = _save_root_layout(tmp_path / "root_layout", src.unet, src.scheduler)
    assert not (folder / "unet").exists()
    unet, sched = load_ddpm(str(folder))
    torch.testing.assert_close(_eps(unet), _eps(src.unet))
    assert sched.config.num_train_timesteps == 1000
    warm = DDPMPrior(in_channels=1, init_weights=str(folder), **TINY)
    torch.testing.assert_close(_eps(warm.ema_unet), _eps(src.unet))


def test_pipeline_layout_still_loads_first(tmp_path):
    src = _tiny_ddpm(seed=1)
    src.ema_unet.load_state_dict(src.unet.state_dict())
    src.export(tmp_path / "pipe")
    # a stray root config.json of another UNet must not win over unet/
    _save_root_layout(tmp_path / "pipe", _tiny_ddpm(seed=2).unet, DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    unet, sched = load_ddpm(str(tmp_path / "pipe"))
    torch.testing.assert_close(_eps(unet), _eps(src.unet))
    assert sched.config.beta_schedule == "linear"
    warm = DDPMPrior(in_channels=1, init_weights=str(tmp_path / "pipe"), **TINY)
    torch.testing.assert_close(_eps(warm.unet), _eps(src.unet))


def _fake_hub_cache(monkeypatch, cache: Path, repo: str = "google/ddpm-cifar10-32") -> Path:
    """An offline HF cache at ``cache`` (huggingface_hub.constants.HF_HUB_CACHE patched: huggingface_hub reads
    HF_HUB_CACHE at import, hf_hub_download the constant at call time); returns the snapshot folder of ``repo``."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    commit = "0" * 40
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    return snap


def test_hub_id_in_root_layout_loads_from_the_offline_cache(tmp_path, monkeypatch):
    src = _tiny_ddpm(in_channels=3)
    _save_root_layout(_fake_hub_cache(monkeypatch, tmp_path / "hf"), src.unet,
                      DDPMScheduler(variance_type="fixed_large"))
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    unet, sched = load_ddpm("google/ddpm-cifar10-32")
    torch.testing.assert_close(_eps(unet, 3), _eps(src.unet, 3))
    assert sched.config.variance_type == "fixed_large"
    warm = DDPMPrior(in_channels=3, init_weights="google/ddpm-cifar10-32", **TINY)
    torch.testing.assert_close(_eps(warm.unet, 3), _eps(src.unet, 3))


def test_hub_errors_give_the_offline_hint_only_for_an_uncached_id(tmp_path, monkeypatch):
    snap = _fake_hub_cache(monkeypatch, tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE is set .* holds nothing of google/ddpm-cat-256"):
        load_ddpm("google/ddpm-cat-256")
    # cached (config.json) but broken (no weights): the real error, no download hint
    _tiny_ddpm().unet.save_config(str(snap))
    with pytest.raises(FileNotFoundError) as err:
        load_ddpm("google/ddpm-cifar10-32")
    assert "holds nothing" not in str(err.value) and "diffusion_pytorch_model" in str(err.value), str(err.value)


def test_a_classifier_folder_is_refused_as_prior_and_warm_start(tmp_path):
    model, cfg = tiny_victim(8)
    save_classifier(model, cfg, tmp_path / "victim")
    with pytest.raises(ValueError, match=r"not a diffusers DDPM folder.*no unet/config\.json.*classifier folder"):
        load_ddpm(str(tmp_path / "victim"))
    with pytest.raises(ValueError, match=r"not a diffusers DDPM folder.*classifier folder"):
        DDPMPrior(in_channels=1, init_weights=str(tmp_path / "victim"), **TINY)
    # a root UNet without a scheduler config: a prior needs one, a warm start does not
    src = _tiny_ddpm()
    src.unet.save_pretrained(str(tmp_path / "unet_only"))
    with pytest.raises(ValueError, match="no scheduler config"):
        load_ddpm(str(tmp_path / "unet_only"))
    DDPMPrior(in_channels=1, init_weights=str(tmp_path / "unet_only"), **TINY)


# ------------------------------------------------------------------------------------------------ 2 warm-start config
def test_warm_start_refuses_another_unet_config_with_equal_weight_shapes(tmp_path):
    torch.manual_seed(0)
    other = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 32), layers_per_block=1,
                        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                        flip_sin_to_cos=False, freq_shift=1, norm_num_groups=16)
    _save_root_layout(tmp_path / "other", other, DDPMScheduler())
    with pytest.raises(ValueError, match="UNet config differs") as err:
        DDPMPrior(in_channels=1, init_weights=str(tmp_path / "other"), **TINY)
    msg = str(err.value)
    for part in ("flip_sin_to_cos: source False, here True", "freq_shift: source 1, here 0",
                 "norm_num_groups: source 16, here 32", "sample_size: source 16, here 8 (model.init_args.image_size)"):
        assert part in msg
    # dropout (training only) may differ
    src = _tiny_ddpm()
    torch.manual_seed(0)
    drop = UNet2DModel(**{**{k: v for k, v in src.unet.config.items() if not k.startswith("_")}, "dropout": 0.1})
    _save_root_layout(tmp_path / "dropout", drop, DDPMScheduler())
    DDPMPrior(in_channels=1, init_weights=str(tmp_path / "dropout"), **TINY)


def test_warm_start_refuses_another_noise_schedule(tmp_path):
    src = _tiny_ddpm()
    _save_root_layout(tmp_path / "cos", src.unet, DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    with pytest.raises(ValueError, match=r"noise schedule differs.*beta_schedule: source squaredcos_cap_v2, here "
                                         r"linear \(model\.init_args\.beta_schedule\)"):
        DDPMPrior(in_channels=1, init_weights=str(tmp_path / "cos"), **TINY)
    DDPMPrior(in_channels=1, init_weights=str(tmp_path / "cos"), beta_schedule="squaredcos_cap_v2", **TINY)
    _save_root_layout(tmp_path / "t500", src.unet, DDPMScheduler(num_train_timesteps=500))
    with pytest.raises(ValueError, match="num_train_timesteps: source 500, here 1000"):
        DDPMPrior(in_channels=1, init_weights=str(tmp_path / "t500"), **TINY)
    _save_root_layout(tmp_path / "v", src.unet, DDPMScheduler(prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="prediction_type: source v_prediction, here epsilon"):
        DDPMPrior(in_channels=1, init_weights=str(tmp_path / "v"), **TINY)


# ------------------------------------------------------------------------------------------------ 6 classifier
def test_classifier_warm_start_refuses_another_normalisation(tmp_path):
    torch.manual_seed(0)
    src = ImageClassifier(arch="convnet", in_channels=1, num_classes=4, image_size=8, mean=[0.2860], std=[0.3530])
    src.export(tmp_path / "stage1", dtype=torch.float16)  # buffers rounded to float16, config.json exact
    with pytest.raises(ValueError, match=r"normalises its inputs differently.*mean: source \[0\.286\], here \[0\.5\]"
                                         r".*std: source \[0\.353\], here \[0\.5\]"):
        ImageClassifier(arch="convnet", in_channels=1, num_classes=4, image_size=8, init_weights=str(tmp_path / "stage1"))
    same = ImageClassifier(arch="convnet", in_channels=1, num_classes=4, image_size=8, mean=[0.2860], std=[0.3530],
                           init_weights=str(tmp_path / "stage1"))
    # the configured values, not the float16-rounded copies of the export
    assert same.model[0].mean.item() == torch.tensor(0.2860).item()
    assert same.model[0].std.item() == torch.tensor(0.3530).item()


# ------------------------------------------------------------------------------------------------ 4, 5 export
class StepSpy(Callback):
    """Counts the training batches that started."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps += 1


def _fit(tmp_path: Path, callbacks: list, steps: int = 2, ckpt_path=None) -> Trainer:
    torch.manual_seed(0)
    model = ImageClassifier(arch="convnet", in_channels=1, num_classes=4, image_size=8)
    data = DataLoader(TensorDataset(torch.rand(16, 1, 8, 8), torch.arange(16) % 4), batch_size=4)
    trainer = Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, accelerator="cpu", devices=1,
                      default_root_dir=str(tmp_path), callbacks=callbacks)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


def test_two_exports_share_a_trainer_and_an_old_checkpoint_resumes(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    exports = [ExportModel(str(tmp_path / "fp32"), sample_grid=False),
               ExportModel(str(tmp_path / "fp16"), dtype="float16", sample_grid=False)]
    _fit(tmp_path, exports + [ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0)])
    assert (tmp_path / "fp32" / "model.safetensors").is_file() and (tmp_path / "fp16" / "model.safetensors").is_file()
    ckpt = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    keys = sorted(k for k in ckpt["callbacks"] if str(k).startswith("ExportModel"))
    assert keys == sorted(cb.state_key for cb in exports) and len(keys) == 2
    # a checkpoint of the older code: one ExportModel state under the class name
    state = ckpt["callbacks"].pop(exports[0].state_key)
    ckpt["callbacks"].pop(exports[1].state_key)
    state["wall_time_s"] = 1234.0
    ckpt["callbacks"]["ExportModel"] = state
    torch.save(ckpt, tmp_path / "old.ckpt")
    resumed = ExportModel(str(tmp_path / "fp32"), sample_grid=False)
    _fit(tmp_path, [resumed], steps=3, ckpt_path=str(tmp_path / "old.ckpt"))
    summary = json.loads((tmp_path / "fp32" / "training_summary.json").read_text())
    assert summary["global_step"] == 3 and summary["wall_time_s"] >= 1234.0


def test_export_folder_under_a_regular_file_fails_before_training(tmp_path):
    (tmp_path / "afile").write_text("x")
    for target in (tmp_path / "afile" / "export", tmp_path / "afile" / "sub" / "export"):
        with pytest.raises(NotADirectoryError, match=r"cannot be created: .*afile is a file"):
            check_export_target(target)  # train.py's check before the run directory exists
        spy = StepSpy()
        with pytest.raises(NotADirectoryError, match="afile is a file"):
            _fit(tmp_path / "t", [ExportModel(str(target), sample_grid=False), spy])
        assert spy.steps == 0  # refused at fit start, not after the training
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_export_target(tmp_path / "afile", overwrite=True)


# ------------------------------------------------------------------------------------------------ 7 W&B
def test_train_configs_leave_the_wandb_mode_to_the_environment():
    """Lightning's WandbLogger(offline=True) sets WANDB_MODE=dryrun when the run starts, over WANDB_MODE=online;
    train.py itself defaults WANDB_MODE to offline only when it is unset."""
    found = 0
    for path in sorted((ROOT / "configs" / "train").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        loggers = cfg["trainer"].get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if isinstance(logger, dict) and logger.get("class_path", "").endswith("WandbLogger"):
                found += 1
                assert not logger.get("init_args", {}).get("offline"), f"{path.name}: offline: true forces dryrun"
    assert found >= 5
    code = "import os, train; print(os.environ.get('WANDB_MODE'))"
    for given, expected in ((None, "offline"), ("online", "online")):
        env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
        if given:
            env["WANDB_MODE"] = given
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        assert out[-1] == expected


# ------------------------------------------------------------------------------------------------ 3, 8 train.py
def _train_config(tmp_path: Path, data_root: Path, root: Path, every: int = 2, steps: int = 5) -> Path:
    """tests/test_train_runs.py's tiny convnet run with ``steps`` steps, a checkpoint every ``every``, no logger and
    no validation."""
    p = _config(tmp_path, data_root, root)
    cfg = yaml.safe_load(p.read_text())
    cfg["trainer"].update(max_steps=steps, limit_val_batches=0, logger=False)
    cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = every
    p.write_text(yaml.safe_dump(cfg))
    return p




def _only_run(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir()]
    assert len(runs) == 1
    return runs[0]


@pytest.fixture()
def fake_fmnist(tmp_path: Path) -> Path:
    data = tmp_path / "fmnist"
    data.mkdir()
    return write_fake_fmnist(data)


def test_last_checkpoint_is_written_at_the_final_step_off_the_grid(tmp_path, fake_fmnist):
    import train

    root = tmp_path / "tr"
    cfg = _train_config(tmp_path, fake_fmnist, root, every=2, steps=5)
    train.main(["--config", str(cfg)])
    run = _only_run(root)
    summary = json.loads((tmp_path / "export" / "training_summary.json").read_text())
    assert summary["global_step"] == 5
    assert _step(run / "ckpt" / "last.ckpt") == 5  # was 4: the last multiple of every_n_train_steps
    train.main(["--config", str(cfg), "--ckpt_path", "last", "--trainer.max_steps", "6"])
    assert _step(run / "ckpt" / "last.ckpt") == 6
    assert json.loads((tmp_path / "export" / "training_summary.json").read_text())["global_step"] == 6


def test_export_probe_at_fit_start_reports_what_the_file_system_refused(tmp_path, monkeypatch):
    """os.access passes (e.g. as root, or on a read-only mount that reports write access): the probe folder that
    ExportModel makes at fit start is what finds the refusal, and its error names the folder."""
    import callbacks.export as export

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    target = tmp_path / "new" / "export"
    export.check_export_parent(target)  # looking only: fine
    monkeypatch.setattr(export.tempfile, "mkdtemp", refuse)
    with pytest.raises(PermissionError, match=r"cannot be written: creating a folder in .*new failed \(Permission denied\)"):
        export.check_export_parent(target, create=True)
    assert (tmp_path / "new").is_dir() and not target.exists()  # the parent was made, the export folder was not


# ------------------------------------------------------------------------------------------ 9 last.ckpt at a stop
class BatchSpy(Callback):
    """Records ``(current_epoch, batch_idx)`` of every training batch that started."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((trainer.current_epoch, batch_idx))


def _fit_3_batches(root: Path, ckpt_path=None, **trainer_kw) -> tuple[Trainer, list[tuple[int, int]]]:
    """A tiny convnet on 12 images in batches of 4 (3 batches an epoch), with train.py's SaveLastAtTrainEnd and a
    ModelCheckpoint that saves only last.ckpt (no every_n_train_steps: only the stop writes it)."""
    import train

    torch.manual_seed(0)
    model = ImageClassifier(arch="convnet", in_channels=1, num_classes=4, image_size=8)
    data = DataLoader(TensorDataset(torch.rand(12, 1, 8, 8), torch.arange(12) % 4), batch_size=4)
    spy = BatchSpy()
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, accelerator="cpu", devices=1, default_root_dir=str(root),
                      callbacks=[train.SaveLastAtTrainEnd(), spy,
                                 ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True, save_top_k=0)],
                      **trainer_kw)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, spy.batches


def _epoch_and_step(ckpt: Path) -> tuple[int, int]:
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    return saved["epoch"], saved["global_step"]


def test_last_checkpoint_at_max_steps_mid_epoch_resumes_the_rest_of_the_epoch(tmp_path):
    """Saved in on_train_end, the stopped epoch was already counted as completed (epoch 1): a resume with
    max_epochs=2 skipped batch 2 of epoch 0 and trained 5 steps in all."""
    _, first = _fit_3_batches(tmp_path, max_steps=2)
    assert first == [(0, 0), (0, 1)]
    assert _epoch_and_step(tmp_path / "ckpt" / "last.ckpt") == (0, 2)  # was (1, 2)
    trainer, resumed = _fit_3_batches(tmp_path, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), max_epochs=2,
                                      max_steps=-1)
    assert resumed == [(0, 2), (1, 0), (1, 1), (1, 2)]  # was [(1, 0), (1, 1), (1, 2)]
    assert trainer.global_step == 6 and trainer.current_epoch == 2  # was 5


def test_last_checkpoint_at_max_steps_on_an_epoch_end_resumes_without_a_phantom_batch(tmp_path):
    """Stopped by max_steps on the last batch of an epoch and resumed by steps: the on_train_end checkpoint made
    Lightning start a batch 3 of a 3-batch epoch 1, then epoch 2."""
    _fit_3_batches(tmp_path, max_steps=3)
    assert _epoch_and_step(tmp_path / "ckpt" / "last.ckpt") == (0, 3)  # was (1, 3)
    trainer, resumed = _fit_3_batches(tmp_path, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), max_steps=5)
    assert resumed == [(1, 0), (1, 1)]  # was [(1, 3), (2, 0)]
    # the stopped epoch 1 counts as ended after fit (as in any max_steps stop); was 3 (after an epoch 2)
    assert trainer.global_step == 5 and trainer.current_epoch == 2


def test_last_checkpoint_at_max_time_is_written_after_the_timer_stopped(tmp_path, monkeypatch):
    """Trainer(max_time=...) appends its Timer after the given callbacks; SaveLastAtTrainEnd moves itself behind it
    at setup, so it sees the stop the Timer sets in on_train_batch_end (here: after step 2, patched)."""
    from lightning.pytorch.callbacks import Timer

    import train

    def stop_after_2_steps(self, trainer):
        trainer.should_stop = trainer.should_stop or trainer.global_step >= 2

    monkeypatch.setattr(Timer, "_check_time_remaining", stop_after_2_steps)
    trainer, first = _fit_3_batches(tmp_path, max_time="00:01:00:00")
    assert first == [(0, 0), (0, 1)]
    assert _epoch_and_step(tmp_path / "ckpt" / "last.ckpt") == (0, 2)  # was (1, 2)
    assert isinstance(trainer.callbacks[-1], train.SaveLastAtTrainEnd)
    monkeypatch.undo()
    trainer, resumed = _fit_3_batches(tmp_path, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), max_epochs=2)
    assert resumed == [(0, 2), (1, 0), (1, 1), (1, 2)] and trainer.global_step == 6


def test_last_checkpoint_at_max_epochs_is_still_written_at_train_end(tmp_path):
    _fit_3_batches(tmp_path, max_epochs=1)
    assert _epoch_and_step(tmp_path / "ckpt" / "last.ckpt") == (1, 3)  # a complete epoch
    trainer, resumed = _fit_3_batches(tmp_path, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), max_epochs=2)
    assert resumed == [(1, 0), (1, 1), (1, 2)] and trainer.global_step == 6


def test_train_py_resume_after_a_max_steps_stop_trains_the_configured_epochs(tmp_path, fake_fmnist):
    """train.py end to end: 24 training images in batches of 8 (3 an epoch), stopped at max_steps 2 off the
    checkpoint grid, resumed with --ckpt_path last to max_epochs 2: 6 steps in all (was 5)."""
    import train

    root = tmp_path / "tr"
    cfg = _train_config(tmp_path, fake_fmnist, root, every=100, steps=2)
    loaded = yaml.safe_load(cfg.read_text())
    loaded["data"]["init_args"]["val_size"] = 176
    cfg.write_text(yaml.safe_dump(loaded))
    train.main(["--config", str(cfg)])
    run = _only_run(root)
    assert _epoch_and_step(run / "ckpt" / "last.ckpt") == (0, 2)
    train.main(["--config", str(cfg), "--ckpt_path", "last", "--trainer.max_epochs", "2",
                "--trainer.max_steps", "-1"])
    assert _epoch_and_step(run / "ckpt" / "last.ckpt") == (2, 6)  # was (2, 5)
    assert json.loads((tmp_path / "export" / "training_summary.json").read_text())["global_step"] == 6


def test_a_monitored_checkpoint_due_at_the_final_validation_is_still_saved(tmp_path):
    """SaveLastAtTrainEnd writes last.ckpt at the stopping batch; Lightning then took that step as saved and skipped
    a monitored ModelCheckpoint's own top-k save at the validation right after it (no epoch=0-step=4.ckpt, best '')."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from train import SaveLastAtTrainEnd

    class Monitored(BoringModel):
        def validation_step(self, batch, batch_idx):
            loss = self.step(batch)
            self.log("val_loss", loss)
            return {"x": loss}

    torch.manual_seed(0)
    mc = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1, save_last=True)
    trainer = Trainer(callbacks=[mc, SaveLastAtTrainEnd()], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_train_batches=4, limit_val_batches=2, num_sanity_val_steps=0,
                      default_root_dir=tmp_path, max_steps=6, val_check_interval=2)
    trainer.fit(Monitored())
    assert sorted(os.listdir(tmp_path)) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=1-step=6.ckpt",
                                            "last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 6
