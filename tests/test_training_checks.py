"""Training-side checks: a resume with another one-cycle length, "~" in export folders, model and data seeds that differ."""

from __future__ import annotations

import pytest
import torch
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.classifier import ImageClassifier


def _loader(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10), batch_size=4)


def _trainer(tmp_path, max_steps: int, **kw) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   max_steps=max_steps, num_sanity_val_steps=0, default_root_dir=str(tmp_path), **kw)


def test_resume_with_another_one_cycle_length_is_refused_before_any_step(tmp_path):
    """The restored OneCycleLR keeps the checkpoint's total_steps, so a resume with a larger max_lr_steps (and
    max_steps) passed configure_optimizers' length check and then crashed at step total_steps + 1 with torch's
    'Tried to step 4 times', after that step had changed the weights."""
    torch.manual_seed(0)
    ckpt_cb = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, save_top_k=0, every_n_train_steps=1)
    _trainer(tmp_path, 3, callbacks=[ckpt_cb]).fit(ImageClassifier(arch="convnet", image_size=8, max_lr_steps=3),
                                                   _loader())
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3

    module = ImageClassifier(arch="convnet", image_size=8, max_lr_steps=5)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = _trainer(tmp_path, 5, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"one-cycle schedule of 3 optimiser steps .*max_lr_steps = 5"):
        trainer.fit(module, _loader(), ckpt_path=str(last))
    assert trainer.global_step == 0  # refused while restoring, before the optimiser or any step
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())

    # the same length resumes as before (a no-op here: the run is complete), and a model built without a trainer
    # (load_from_checkpoint) is not refused
    _trainer(tmp_path, 3, enable_checkpointing=False).fit(
        ImageClassifier(arch="convnet", image_size=8, max_lr_steps=3), _loader(), ckpt_path=str(last))
    ImageClassifier.load_from_checkpoint(str(last), max_lr_steps=5)


@pytest.mark.parametrize("first, then", [(0, 5), (3, 0)])
def test_resume_between_constant_lr_and_one_cycle_is_refused_before_any_step(tmp_path, first, then):
    """A one-cycle resume of a constant-lr run raised KeyError 'initial_lr' after one update; max_lr_steps 0 on a
    one-cycle run went on silently at the checkpoint's annealed lr and momentum."""
    torch.manual_seed(0)
    ckpt_cb = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, save_top_k=0, every_n_train_steps=1)
    _trainer(tmp_path, 3, callbacks=[ckpt_cb]).fit(ImageClassifier(arch="convnet", image_size=8, max_lr_steps=first),
                                                   _loader())
    module = ImageClassifier(arch="convnet", image_size=8, max_lr_steps=then)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = _trainer(tmp_path, 5, enable_checkpointing=False)
    was = "a constant lr" if first == 0 else "a one-cycle schedule of 3"
    with pytest.raises(ValueError, match=f"trained with {was}.*max_lr_steps = {then}"):
        trainer.fit(module, _loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_export_folder_expands_home(tmp_path, monkeypatch):
    """ExportModel wrote '~/x' into a folder literally named '~' under the working directory (Lightning's
    ModelCheckpoint and train.py's run directories expand it), and the 'already exists' check looked there too."""
    from callbacks.export import ExportModel, check_export_target

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cb = ExportModel("~/exports/clf", sample_grid=False)
    assert cb.dirpath == tmp_path / "home" / "exports" / "clf"
    cb._t0 = 0.0

    class T:
        callback_metrics, global_step, current_epoch, precision = {}, 0, 0, "32-true"

    cb.export(T(), ImageClassifier(arch="convnet", image_size=8))
    assert (tmp_path / "home" / "exports" / "clf" / "model.safetensors").is_file()
    assert not (tmp_path / "~").exists()
    with pytest.raises(FileExistsError):
        check_export_target("~/exports/clf")


def test_model_and_data_seeds_may_differ(tmp_path, capsys):
    """The model's ``seed`` (DDPM: the sample grid's; classifier: the one recorded in config.json) and the data
    module's (its validation split) are unrelated, but Lightning refused to log a model and a data module whose
    hparams share a key with different values: `--data.init_args.seed 1` stopped the run at fit start ("Error while
    merging hparams"), after its run directory and config.yaml had been written."""
    import yaml

    import train
    from tests.helpers import write_fake_fmnist

    data = tmp_path / "fmnist"
    data.mkdir()
    write_fake_fmnist(data)
    root = tmp_path / "tr"
    cfg = {
        "seed_everything": 0,
        "model": {"class_path": "lightning_modules.classifier.ImageClassifier",
                  "init_args": {"arch": "convnet", "image_size": 8, "seed": 1}},
        "data": {"class_path": "datamodules.fashion_mnist.FashionMNISTDataModule",
                 "init_args": {"root": str(data), "image_size": 8, "batch_size": 8, "val_size": 40, "seed": 0}},
        "trainer": {
            "accelerator": "cpu", "max_steps": 1, "limit_val_batches": 1, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root), "name": "csv"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(root / "ckpt"), "save_last": True, "save_top_k": 0}}],
        },
        "test_after_fit": False,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train.main(["--config", str(path)])
    assert "both set seed to different values" in capsys.readouterr().err
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    assert (run / "ckpt" / "last.ckpt").is_file()
    logged = yaml.safe_load((run / "csv" / "version_0" / "hparams.yaml").read_text())
    assert logged["seed"] == 1 and logged["arch"] == "convnet"
    ckpt = torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["datamodule_hyper_parameters"]["seed"] == 0 and ckpt["hyper_parameters"]["seed"] == 1


def test_init_weights_are_found_from_another_directory(tmp_path, monkeypatch):
    """The fine-tuning configs name init_weights relative to the repository root (checkpoints/...): from another
    directory they were not found, while attack.py's checkpoints were (one input-path rule; '~' expanded too)."""
    from inversion.fsutils import REPO_ROOT
    from lightning_modules.classifier import load_classifier

    monkeypatch.chdir(tmp_path)
    shipped = "checkpoints/fashion_mnist/victim_resnet18"
    module = ImageClassifier(arch="resnet18", init_weights=shipped)
    reference, _ = load_classifier(REPO_ROOT / shipped)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(module.eval()(x), reference(x))
