"""train.py run directories: one new directory per run, `--ckpt_path last` continues the newest one (issue: runs
reuse and overwrite each other's directories)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import write_fake_fmnist

RUN_NAME = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")


@pytest.fixture()
def fake_fmnist(tmp_path: Path) -> Path:
    """A tiny Fashion-MNIST in the idx layout (tests.helpers.write_fake_fmnist) in its own folder."""
    data = tmp_path / "fmnist"
    data.mkdir()
    return write_fake_fmnist(data)


def _config(tmp_path: Path, data_root: Path, root: Path, name: str = "cfg.yaml") -> Path:
    """A tiny convnet run whose logger save_dir and ModelCheckpoint dirpath are fixed paths under ``root``, as in
    configs/train/*.yaml; the export folder lies outside ``root``."""
    cfg = {
        "seed_everything": 0,
        "model": {"class_path": "lightning_modules.classifier.ImageClassifier", "init_args": {"arch": "convnet"}},
        "data": {"class_path": "datamodules.fashion_mnist.FashionMNISTDataModule",
                 "init_args": {"root": str(data_root), "batch_size": 8, "val_size": 40}},
        "trainer": {
            "max_steps": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0, "enable_progress_bar": False,
            "enable_model_summary": False, "log_every_n_steps": 1, "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root), "name": "csv"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(root / "ckpt"), "every_n_train_steps": 1, "save_last": True,
                               "save_top_k": 0}},
                {"class_path": "callbacks.export.ExportModel",
                 "init_args": {"dirpath": str(tmp_path / "export"), "title": "tiny", "sample_grid": False,
                               "overwrite": True}},
            ],
        },
        "test_after_fit": False,
    }
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def _runs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and RUN_NAME.match(p.name))


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


@pytest.mark.slow
def test_each_run_gets_its_own_directory_and_last_resumes_the_newest(tmp_path, fake_fmnist, capsys):
    import train

    root = tmp_path / "tr"
    cfg = _config(tmp_path, fake_fmnist, root)
    train.main(["--config", str(cfg)])
    (first,) = _runs(root)
    assert f"run directory: {first}" in capsys.readouterr().out
    train.main(["--config", str(cfg)])
    runs = _runs(root)
    assert len(runs) == 2
    second = runs[1] if runs[0] == first else runs[0]
    # nothing is written to the fixed configured places any more: all of it lies in the run directories
    assert sorted(p.name for p in root.iterdir()) == sorted([first.name, second.name])
    for run in (first, second):
        assert _step(run / "ckpt" / "last.ckpt") == 2
        assert (run / "csv" / "version_0" / "metrics.csv").is_file()
        saved = yaml.safe_load((run / "config.yaml").read_text())
        # the config is saved as given, so `--config <run>/config.yaml` starts another fresh run under root
        assert saved["trainer"]["default_root_dir"] == str(root)
        assert saved["trainer"]["callbacks"][0]["init_args"]["dirpath"] == str(root / "ckpt")
    config_before = (second / "config.yaml").read_bytes()

    # resume: continues the newest run, in its own directory, global step going on from 2
    train.main(["--config", str(cfg), "--ckpt_path", "last", "--trainer.max_steps", "4"])
    assert f"run directory: {second} (resuming {second / 'ckpt' / 'last.ckpt'})" in capsys.readouterr().out
    assert _runs(root) == runs
    assert _step(second / "ckpt" / "last.ckpt") == 4
    assert _step(first / "ckpt" / "last.ckpt") == 2
    assert (second / "config.yaml").read_bytes() == config_before
    resumed = yaml.safe_load((second / "config-resume-1.yaml").read_text())
    assert resumed["ckpt_path"] == "last" and resumed["trainer"]["max_steps"] == 4
    assert (second / "csv" / "version_1" / "metrics.csv").is_file()
    # a second resume gets the next free name; the earlier configs stay as they were
    train.main(["--config", str(cfg), "--ckpt_path", "last", "--trainer.max_steps", "5"])
    assert _step(second / "ckpt" / "last.ckpt") == 5
    assert yaml.safe_load((second / "config-resume-2.yaml").read_text())["trainer"]["max_steps"] == 5
    assert yaml.safe_load((second / "config-resume-1.yaml").read_text())["trainer"]["max_steps"] == 4
    assert not list(second.glob(".*.tmp"))

    # an explicit checkpoint file keeps its meaning (restore it) and gets a fresh run directory
    train.main(["--config", str(cfg), "--ckpt_path", str(first / "ckpt" / "last.ckpt"), "--trainer.max_steps", "3"])
    third = [r for r in _runs(root) if r not in runs]
    assert len(third) == 1 and _step(third[0] / "ckpt" / "last.ckpt") == 3
    assert (third[0] / "config.yaml").is_file() and _step(first / "ckpt" / "last.ckpt") == 2


def test_ckpt_path_last_without_a_run_is_a_clear_error(tmp_path, fake_fmnist):
    import train

    root = tmp_path / "fresh"
    cfg = _config(tmp_path, fake_fmnist, root)
    with pytest.raises(FileNotFoundError) as err:
        train.main(["--config", str(cfg), "--ckpt_path", "last"])
    msg = str(err.value)
    assert f"default_root_dir {root}" in msg and "ckpt/last.ckpt" in msg and "without --ckpt_path" in msg
    assert isinstance(err.value, train.NoCheckpointError)
    assert not root.exists() or not any(root.iterdir())  # nothing created, nothing trained
    # a checkpoint of the old fixed layout (root/ckpt/last.ckpt) is named in the message, not silently used
    (root / "ckpt").mkdir(parents=True)
    (root / "ckpt" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=re.escape(f"--ckpt_path {root / 'ckpt' / 'last.ckpt'}")):
        train.main(["--config", str(cfg), "--ckpt_path", "last"])
    assert sorted(p.name for p in root.iterdir()) == ["ckpt"]


def test_reroot_moves_only_paths_under_default_root_dir(tmp_path):
    from jsonargparse import Namespace

    import train

    root, run = tmp_path / "tr", tmp_path / "tr" / "20250101-000000-abcdef"
    trainer = Namespace(
        default_root_dir=str(root),
        logger=[Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                          init_args=Namespace(save_dir=str(root / "logs"), name="csv")),
                Namespace(class_path="lightning.pytorch.loggers.WandbLogger",
                          init_args=Namespace(save_dir=str(tmp_path / "elsewhere"), dir=None))],
        callbacks=[Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                             init_args=Namespace(dirpath=str(root / "ckpt"))),
                   Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                             init_args=Namespace(dirpath=str(tmp_path / "other_ckpt"))),
                   Namespace(class_path="callbacks.export.ExportModel",
                             init_args=Namespace(dirpath=str(root / "export")))],
    )
    train.reroot_trainer_config(trainer, root, run)
    assert trainer.default_root_dir == str(run)
    assert trainer.logger[0].init_args.save_dir == str(run / "logs")
    assert trainer.logger[1].init_args.save_dir == str(tmp_path / "elsewhere")  # outside root: left alone
    assert trainer.callbacks[0].init_args.dirpath == str(run / "ckpt")
    assert trainer.callbacks[1].init_args.dirpath == str(tmp_path / "other_ckpt")
    assert trainer.callbacks[2].init_args.dirpath == str(root / "export")  # exports stay where configured
    # a single logger given as a dict, relative paths kept relative, the root itself maps to the run directory
    single = {"default_root_dir": "train_runs/x", "callbacks": None,
              "logger": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                         "init_args": {"save_dir": "train_runs/x", "dir": None}}}
    train.reroot_trainer_config(single, "train_runs/x", "train_runs/x/20250101-000000-abcdef")
    assert single["logger"]["init_args"] == {"save_dir": "train_runs/x/20250101-000000-abcdef", "dir": None}
    assert single["default_root_dir"] == "train_runs/x/20250101-000000-abcdef"


def test_find_last_checkpoint_picks_the_newest_run(tmp_path):
    import train

    root = tmp_path / "tr"
    for name in ("20250101-000000-aaaaaa", "20250102-000000-bbbbbb", "20250103-000000-cccccc"):
        (root / name).mkdir(parents=True)
    for name in ("20250101-000000-aaaaaa", "20250102-000000-bbbbbb"):
        (root / name / "ckpt").mkdir()
        (root / name / "ckpt" / "last.ckpt").write_bytes(b"x")
    (root / "notarun").mkdir()
    run, ckpt = train.find_last_checkpoint(root, [str(root / "ckpt")])
    assert run == root / "20250102-000000-bbbbbb" and ckpt == run / "ckpt" / "last.ckpt"
    # without a configured dirpath under root, any last.ckpt inside a run counts
    (root / "20250103-000000-cccccc" / "lightning_logs").mkdir()
    (root / "20250103-000000-cccccc" / "lightning_logs" / "last.ckpt").write_bytes(b"x")
    assert train.find_last_checkpoint(root, [])[0] == root / "20250103-000000-cccccc"
    empty = tmp_path / "tr2"
    (empty / "20250101-000000-aaaaaa").mkdir(parents=True)
    (empty / "20250102-000000-aaaaaa").mkdir()
    with pytest.raises(train.NoCheckpointError, match="in 2 run directories"):
        train.find_last_checkpoint(empty, [str(empty / "ckpt")])


def test_config_file_is_never_overwritten(tmp_path):
    import train

    train.write_new_text(tmp_path / "config.yaml", "a: 1\n")
    with pytest.raises(FileExistsError):
        train.write_new_text(tmp_path / "config.yaml", "a: 2\n")
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no temporary file left behind


def test_new_run_dir_expands_home(tmp_path, monkeypatch):
    import train

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    run = train.new_run_dir("~/runs")
    assert run.parent == tmp_path / "home" / "runs" and RUN_NAME.match(run.name)
    assert not (tmp_path / "~").exists()
    assert train.list_run_dirs("~/runs") == [run]


@pytest.mark.slow
def test_ckpt_path_last_with_checkpoints_outside_default_root_dir(tmp_path, fake_fmnist, capsys):
    """A ModelCheckpoint dirpath outside default_root_dir is shared by every run; 'last' continues from its newest
    last.ckpt (as Lightning's own 'last' did) in a fresh run directory."""
    import train

    root, shared = tmp_path / "tr", tmp_path / "shared_ckpt"
    cfg_path = _config(tmp_path, fake_fmnist, root)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(shared)
    cfg_path.write_text(yaml.safe_dump(cfg))
    train.main(["--config", str(cfg_path)])
    assert _step(shared / "last.ckpt") == 2
    err = capsys.readouterr().err  # named before training: every run of this config writes there
    assert "[train] warning" in err and f"trainer.callbacks[0].dirpath: {shared}" in err
    train.main(["--config", str(cfg_path), "--ckpt_path", "last", "--trainer.max_steps", "3"])
    assert f"weights and state from {shared / 'last.ckpt'}" in capsys.readouterr().out
    assert _step(shared / "last.ckpt") == 3
    assert len(_runs(root)) == 2


@pytest.mark.slow
def test_resuming_a_warm_started_run_needs_no_warm_start_folder(tmp_path, fake_fmnist, capsys):
    """The fine-tuning configs warm-start from a stage-1 export (model.init_args.init_weights); a resume restores the
    checkpoint's weights, so it must not need that folder (it failed at model construction once it was moved away),
    and the export still names the warm start. Checkpoints carry the RNG states."""
    import json
    import shutil

    import train

    cfg = _config(tmp_path, fake_fmnist, tmp_path / "stage1_runs")
    train.main(["--config", str(cfg)])
    stage1 = tmp_path / "stage1"
    shutil.copytree(tmp_path / "export", stage1)
    warm = yaml.safe_load(cfg.read_text())
    warm["model"]["init_args"]["init_weights"] = str(stage1)
    warm["trainer"]["default_root_dir"] = str(tmp_path / "tr")
    warm["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "tr")
    warm["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "tr" / "ckpt")
    warm["trainer"]["callbacks"][1]["init_args"]["dirpath"] = str(tmp_path / "export2")
    cfg2 = tmp_path / "warm.yaml"
    cfg2.write_text(yaml.safe_dump(warm))
    train.main(["--config", str(cfg2)])
    shutil.rmtree(stage1)  # the stage-1 export moved away (as the shipped *_stage1 folders are)
    capsys.readouterr()
    train.main(["--config", str(cfg2), "--ckpt_path", "last", "--trainer.max_steps", "4"])
    assert "init_weights" in capsys.readouterr().out  # said why it is not loaded
    (run,) = _runs(tmp_path / "tr")
    assert _step(run / "ckpt" / "last.ckpt") == 4
    assert "rng_states" in torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    summary = json.loads((tmp_path / "export2" / "training_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["hparams"]["init_weights"] == str(stage1)
    assert yaml.safe_load((run / "config-resume-1.yaml").read_text())["model"]["init_args"]["init_weights"] == str(stage1)


@pytest.mark.slow
def test_export_reports_the_epochs_actually_trained(tmp_path, fake_fmnist):
    """training_summary.json / MODEL_CARD.md counted Lightning's current_epoch, which advances when fit stops at
    max_steps part-way through an epoch: 2 steps of a 20-batch epoch read 'epochs completed: 1'."""
    import json

    import train

    cfg = _config(tmp_path, fake_fmnist, tmp_path / "tr")  # 200 - 40 held out = 160 images, batches of 8: 20
    train.main(["--config", str(cfg)])  # max_steps 2
    summary = json.loads((tmp_path / "export" / "training_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["epoch"] == 0  # Lightning's current_epoch said 1
    assert summary["epochs_trained"] == 0.1 and summary["batches_per_epoch"] == 20
    card = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert ("- optimiser steps: 2 = 0.1 epochs of the training split (20 batches per epoch; full epochs completed: 0)"
            in card)
    # 5 batches per epoch, 2 per optimiser step: an epoch is 3 steps (the last one on a single batch); 4 steps
    train.main(["--config", str(cfg), "--trainer.limit_train_batches", "5", "--trainer.accumulate_grad_batches", "2",
                "--trainer.max_steps", "4"])
    summary = json.loads((tmp_path / "export" / "training_summary.json").read_text())
    assert summary["global_step"] == 4 and summary["batches_per_epoch"] == 5
    assert summary["accumulate_grad_batches"] == 2
    assert summary["epoch"] == 1 and summary["epochs_trained"] == 1.3333
    assert ("- optimiser steps: 4 = 1.3333 epochs of the training split (5 batches per epoch, 2 per optimiser step; "
            "full epochs completed: 1)" in (tmp_path / "export" / "MODEL_CARD.md").read_text())


@pytest.mark.slow
def test_default_root_dir_on_the_command_line_takes_the_configs_paths_along(tmp_path, fake_fmnist, capsys):
    """--trainer.default_root_dir elsewhere left the logger and the checkpoints in the config's own root (shared by
    every such run, and picked up by another run's --ckpt_path last) while the printed run directory held only
    config.yaml."""
    import train

    config_root, other = tmp_path / "tr", tmp_path / "other"
    cfg = _config(tmp_path, fake_fmnist, config_root)
    train.main(["--config", str(cfg), "--trainer.default_root_dir", str(other)])
    (run,) = _runs(other)
    assert not config_root.exists()  # nothing written into the config's own root
    assert _step(run / "ckpt" / "last.ckpt") == 2
    assert (run / "csv" / "version_0" / "metrics.csv").is_file()
    out = capsys.readouterr()
    assert f"run directory: {run}" in out.out and f"replaces the config's {config_root}" in out.out
    assert "[train] warning" not in out.err
    saved = yaml.safe_load((run / "config.yaml").read_text())["trainer"]  # as meant: under the new root
    assert saved["default_root_dir"] == str(other) and saved["logger"]["init_args"]["save_dir"] == str(other)
    assert saved["callbacks"][0]["init_args"]["dirpath"] == str(other / "ckpt")
    # --ckpt_path last with the same root continues that run, in its directory (the '=' form too)
    train.main(["--config", str(cfg), f"--trainer.default_root_dir={other}", "--ckpt_path", "last",
                "--trainer.max_steps", "3"])
    assert _runs(other) == [run] and _step(run / "ckpt" / "last.ckpt") == 3
    assert not config_root.exists()
    # the saved config starts the next run under the new root
    train.main(["--config", str(run / "config.yaml")])
    assert len(_runs(other)) == 2 and not config_root.exists()


def test_paths_left_outside_the_run_directory_are_named(tmp_path):
    import train

    root, run = tmp_path / "tr", tmp_path / "tr" / "20250101-000000-abcdef"
    trainer = {"default_root_dir": str(root),
               "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}},
               "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                              "init_args": {"dirpath": str(tmp_path / "shared")}}]}
    train.reroot_trainer_config(trainer, root, run)
    assert train.shared_paths(trainer, run) == [f"trainer.callbacks[0].dirpath: {tmp_path / 'shared'}"]
    assert train.without_root_override(["--config", "a.yaml", "--trainer.default_root_dir", "x", "--y", "1"]) == [
        "--config", "a.yaml", "--y", "1"]
    assert train.without_root_override(["--trainer.default_root_dir=x"]) == []
    assert train.without_root_override(["--config", "a.yaml"]) is None


def test_existing_export_folder_fails_before_anything_is_created(tmp_path, fake_fmnist, capsys):
    """The 'export folder ... already exists' error came at fit start, after the run directory and W&B had been
    created (leaving <run>/wandb/ behind)."""
    import train

    root = tmp_path / "tr"
    cfg_path = _config(tmp_path, fake_fmnist, root)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["trainer"]["callbacks"][1]["init_args"]["overwrite"] = False
    cfg_path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "export").mkdir()
    with pytest.raises(FileExistsError, match="export folder .*export already exists"):
        train.main(["--config", str(cfg_path)])
    assert "run directory" not in capsys.readouterr().out
    assert not root.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cfg.yaml", "export", "fmnist"])


def test_a_run_that_fails_in_data_setup_leaves_no_run_directory(tmp_path, fake_fmnist, capsys):
    """The data's checks run in setup, after the loggers start: a batch larger than the training split left a run
    directory holding only an offline W&B run folder (no config.yaml), which `wandb sync` would upload."""
    import train

    root = tmp_path / "tr"
    cfg_path = _config(tmp_path, fake_fmnist, root)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["data"]["init_args"]["batch_size"] = 10_000
    cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.WandbLogger",
                                "init_args": {"save_dir": str(root), "offline": True, "project": "t"}}
    cfg_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="batch_size=10000"):
        train.main(["--config", str(cfg_path)])
    assert "run directory" in capsys.readouterr().out  # it was created, then removed
    assert not root.exists() or not _runs(root), list(root.rglob("*"))


def test_a_refused_resume_leaves_the_resumed_run_as_it_was(tmp_path, fake_fmnist):
    """A resume with another lr was refused only when Lightning loaded the checkpoint, after the loggers had started
    in the resumed run's folder (csv/version_1; with the shipped configs an offline W&B run there, latest-run moved
    to the refused attempt); train.py now compares the checkpoint's lr / weight_decay before fit: nothing is
    written."""
    import train

    root = tmp_path / "tr"
    cfg = _config(tmp_path, fake_fmnist, root)
    train.main(["--config", str(cfg)])
    (run,) = _runs(root)
    def state():  # W&B's own files inside a run folder settle in the background: compare the runs, not their files
        files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if "wandb" not in p.relative_to(run).parts)
        wandb_dir = run / "wandb"
        runs = sorted(p.name for p in wandb_dir.iterdir()) if wandb_dir.is_dir() else []
        latest = wandb_dir / "latest-run"
        return files, runs, (os.readlink(latest) if latest.is_symlink() else None)

    before = state()
    with pytest.raises(ValueError, match=r"model.init_args: lr 0.002 -> 0.01 on a resume"):
        train.main(["--config", str(cfg), "--ckpt_path", "last", "--model.init_args.lr", "0.01"])
    assert state() == before
    assert _step(run / "ckpt" / "last.ckpt") == 2


def test_a_ckpt_path_that_is_a_folder_or_no_checkpoint_gets_one_line(tmp_path, fake_fmnist):
    """--ckpt_path naming an export folder said 'does not exist'; naming README.md or a .safetensors export ended in
    torch's UnpicklingError traceback. Both are one line now, and no run directory is left."""
    import train

    root = tmp_path / "tr"
    cfg = _config(tmp_path, fake_fmnist, root)
    folder = tmp_path / "export_folder"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder; pass a Lightning .ckpt file or 'last'"):
        train.main(["--config", str(cfg), "--ckpt_path", str(folder)])
    notes = tmp_path / "notes.md"
    notes.write_text("# not a checkpoint\n")
    with pytest.raises(ValueError, match=rf"--ckpt_path {notes} is not a Lightning checkpoint train.py can read"):
        train.main(["--config", str(cfg), "--ckpt_path", str(notes)])
    assert not root.exists() or _runs(root) == []
    # 'last' finding a cut-short checkpoint: the message names it and does not send the user back to 'last'
    train.main(["--config", str(cfg)])
    (run,) = _runs(root)
    last = run / "ckpt" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"--ckpt_path last: the newest run's checkpoint {last} cannot be read"):
        train.main(["--config", str(cfg), "--ckpt_path", "last", "--trainer.max_steps", "4"])
