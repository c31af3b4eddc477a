"""attack.py end to end on a tiny config (tiny victim, evaluator and DDPM; real Fashion-MNIST users)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import attack
from datamodules.fashion_mnist import DataNotFoundError, find_fashion_mnist_root
from tests.helpers import save_tiny_assets

try:
    find_fashion_mnist_root(download=False)
    HAVE_FMNIST = True
except DataNotFoundError:
    HAVE_FMNIST = False

pytestmark = pytest.mark.skipif(not HAVE_FMNIST, reason="needs `apt-get install dataset-fashion-mnist`")


def test_topk_overlap_by_hand():
    import torch

    hist = torch.tensor([0, 5, 3, 0, 2, 0, 0, 0, 0, 0])
    probs = torch.tensor([0.0, 0.5, 0.1, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0, 0.05])
    assert attack.topk_overlap(probs, hist) == pytest.approx(2 / 3)  # top-3 true {1,2,4}, predicted {1,5,2}
    assert attack.topk_overlap(probs, torch.tensor([0, 9, 0, 0, 0, 0, 0, 0, 0, 0])) == 1.0
    assert attack.topk_overlap(probs, torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 0, 0])) == 0.0
    # ties at the 3rd count: classes 0-4 all have 2 images, so the evaluator's top 3 {1, 2, 3} are all right
    # (torch.topk kept 3 of the 5 tied classes arbitrarily: {0, 1, 2} or {0, 3, 4} scored 2/3 or 1/3)
    tied = torch.tensor([2, 2, 2, 2, 2, 0, 0, 0, 0, 0])
    assert attack.topk_overlap(torch.tensor([0.0, 0.4, 0.3, 0.2, 0, 0, 0, 0, 0, 0.1]), tied) == 1.0
    assert attack.topk_overlap(torch.tensor([0.0, 0.4, 0.3, 0.0, 0, 0.2, 0, 0, 0, 0.1]), tied) == pytest.approx(2 / 3)


def tiny_config(tmp_path: Path, **overrides) -> Path:
    assets = save_tiny_assets(tmp_path / "assets", size=8)
    cfg = {
        "seed": 0,
        "users": {"class_path": "FashionMNISTUsers", "init_args": {"num_users": 2, "batch_size": 3, "image_size": 8}},
        "victim": {"checkpoint": assets["victim"]},
        "prior": {"path": assets["prior"]},
        "attack": {
            "class_path": "UserLevelInversion",
            "init_args": {"steps": 4, "t_max": 300, "t_min": 10, "t_final": 20, "denoise_steps": 2},
        },
        "evaluation": {"evaluator": assets["evaluator"], "lpips": False},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        "logger": {"backend": "wandb", "mode": "offline"},
        "output": {"root": str(tmp_path / "runs"), "name": "tiny"},
        "image_log_every": 2,
    }
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_attack_py_writes_every_output(tmp_path):
    cfg = tiny_config(tmp_path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        run_dir = attack.main(["--config", str(cfg)])
        assert warnings.filters == filters  # the silencing is scoped to each fit
    # Lightning's warning about the intentionally frozen eval-mode victim/prior is not shown (it reads as a problem)
    assert not [str(w.message) for w in seen if "eval mode" in str(w.message)]
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("tiny-")
    for name in ("config.yaml", "results.csv", "summary.json"):
        assert (run_dir / name).stat().st_size > 0
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [r["user"] for r in rows] == ["0", "1"]
    for r in rows:
        assert r["B"] == "3" and r["steps"] == "4" and r["method"] == "UserLevelInversion"
        assert r["final_stage"] == "denoise t=20 ddim/2" and r["device"] == "cpu"  # the tiny config's final stage
        assert r["inferred_dominant"] == r["dominant_class"]  # single-class users: label inference is exact
        assert r["inferred_informative"] == "True"
        for key in ("evaluator_class", "evaluator_prob", "mse_nearest", "mse_mean", "psnr_nearest", "psnr_mean", "seconds"):
            assert r[key] != ""
        assert float(r["psnr_nearest"]) >= float(r["psnr_mean"])
        assert int(r["victim_correct"]) == (r["victim_class"] == r["dominant_class"])
        assert 0.0 <= float(r["victim_prob_of_dominant"]) <= 1.0
        assert float(r["update_norm"]) > 0  # the client's update before defenses (evaluation side)
    assert [r["user_dir"] for r in rows] == ["users/user_0000", "users/user_0001"]
    for uid in ("user_0000", "user_0001"):
        for png in ("batch.png", "raw.png", "denoised.png", "grid.png"):
            assert (run_dir / "users" / uid / png).stat().st_size > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["users"] == 2
    # the run-level mean of the evaluator's probability of the dominant class (README's reading guide); SSIM is NaN
    # on 8x8 images (an 11x11 window), so its mean is left out
    assert summary["evaluator_prob_of_dominant_mean"] == pytest.approx(
        sum(float(r["evaluator_prob_of_dominant"]) for r in rows) / 2)
    assert "ssim_nearest_mean" not in summary
    (wb,) = run_dir.glob("wandb/offline-run-*")
    media = wb / "files" / "media"
    (table,) = (media / "table" / "final").glob("results_*.table.json")  # the results table as a wandb.Table
    table = json.loads(table.read_text())
    assert len(table["data"]) == 2 and set(table["columns"]) >= {"user", "B", "inferred_dominant", "psnr_nearest"}
    assert table["columns"][:1] == list(rows[0])[:1]
    assert list((media / "images" / "final").glob("grid_*.png"))  # the final grid
    for uid in ("user_0000", "user_0001"):  # reconstructions every 2 of 4 steps (image_log_every 2), uint8 PNGs
        recs = sorted((media / "images" / uid).glob("reconstruction_*.png"))
        assert len(recs) == 3, recs
        assert np.asarray(Image.open(recs[-1])).dtype == np.uint8 and np.asarray(Image.open(recs[-1])).max() > 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["attack"]["init_args"]["steps"] == 4
    assert not list(run_dir.rglob("*.tmp")), "temporary files left behind"
    # a second run never reuses the directory and leaves the first one as it was
    def files(d):  # W&B links its process-wide service log (wandb/*/logs/debug-core.log) into every run: not ours
        return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and not p.is_symlink()}

    first = files(run_dir)
    run_dir2 = attack.main(["--config", str(cfg)])
    assert run_dir2 != run_dir and files(run_dir) == first


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"victim.checkpoint": "/nonexistent/victim"}, FileNotFoundError, "config.json"),
        ({"users.init_args.channels": 3}, attack.ConfigError, "expects"),
        ({"users.init_args.batch_size": 2000}, ValueError, "needs 2000 images of class .* has only 1000"),
        ({"threat.defenses": [{"name": "gaussian_dp", "clip_norm": 1.0, "sigma": -1.0}]}, ValueError, "sigma|noise"),
        ({"threat.protocol": "fedavg", "threat.fedavg_epochs": 0}, ValueError, "epoch"),
        ({"attack.init_args.t_min": 900}, ValueError, "t_min"),
        ({"trainer.precision": "16-mixed"}, attack.ConfigError, r"trainer.precision: UserLevelInversion .*'16-mixed'"),
        ({"trainer.precision": "bf16-true"}, attack.ConfigError, "bf16-mixed"),
        ({"evaluation.face_gallery_users": -1}, attack.ConfigError, "face_gallery_users is -1: set it to 0"),
        # the attack against the threat model (were refused by bind, after the run directory existed)
        ({"attack.class_path": "lightning_modules.baselines.iDLG", "attack.init_args": {"steps": 1}},
         attack.ConfigError, "attack vs threat: iDLG is defined for a single image"),
        ({"attack.class_path": "lightning_modules.baselines.DLG", "attack.init_args": {"steps": 1},
          "threat.reveal_batch_size": False}, attack.ConfigError, "needs the batch size B"),
        ({"attack.init_args.label_strategy": "known"}, attack.ConfigError, "'known' needs the labels"),
        ({"attack.class_path": "lightning_modules.baselines.InvertingGradients",
          "attack.init_args": {"steps": 1, "label_strategy": "idlg"}}, attack.ConfigError, "'idlg' is exact only for B = 1"),
        ({"threat.protocol": "fedavg", "threat.fedavg_lr": float("inf")}, attack.ConfigError, "finite number > 0"),
        # finite for Python, out of float32's range: a NaN target gradient or an overflow inside Adam after the run
        # directory existed
        ({"threat.protocol": "fedavg", "threat.fedavg_lr": 1e-300}, attack.ConfigError, "outside float32's range"),
        ({"threat.defenses": [{"name": "gaussian_dp", "clip_norm": 1.0, "sigma": 1e39}]}, ValueError,
         "exceeds float32's largest value"),
        ({"attack.init_args.lr": 1e39}, ValueError, "attack.lr .*outside float32's range"),
        ({"output.root": __file__}, attack.ConfigError, "output.root .* is a file, not a folder"),  # was "[Errno 17]"
        ({"output.root": __file__ + "/runs"}, attack.ConfigError, "output.root .* is a file, not a folder"),
    ],
)
def test_bad_input_fails_before_any_run_dir(tmp_path, overrides, error, match):
    cfg = tiny_config(tmp_path, **overrides)
    with pytest.raises(error, match=match):
        attack.main(["--config", str(cfg)])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--attack", "dlg"], r"^attack: 'dlg' is not a known attack method; use one of UserLevelInversion, DLG, "
                              r"InvertingGradients, iDLG \(as --attack NAME"),
        (["--attack.class_path", "lightning_modules.baselines.Nope"], "'lightning_modules.baselines.Nope' is not a known"),
        (["--attack", "torch.nn.Linear"], "'torch.nn.Linear' is not a known attack method"),  # imports, wrong base
        (["--users", "Foo"], "^users: 'Foo' is not a known user source; use one of FashionMNISTUsers, FolderUsers, "
                             "CelebAUsers"),
        (["--users.init_args.batch_size", "x"], r'^users \(FashionMNISTUsers\): Parser key "batch_size": Expected'),
        (["--attack", "DLG", "--attack.init_args.steps", "x"], r'^attack \(DLG\): Parser key "steps"'),
        (["--attack.init_args.no_such_option", "1"], r"^attack \(UserLevelInversion\): Option 'no_such_option'"),
    ],
)
def test_an_unknown_attack_or_user_source_gets_one_readable_line(tmp_path, capsys, argv, match):
    """The subclass groups' parse errors name the group, the class and what was wrong (and the shipped attacks for an
    unknown name), not jsonargparse's Union-type dump ("Does not validate against any of the Union subtypes ...
    Expected a <class 'NoneType'>")."""
    cfg = tiny_config(tmp_path)
    with pytest.raises(SystemExit) as exc:
        attack.main(["--config", str(cfg), *argv])
    assert exc.value.code == 2
    error = capsys.readouterr().err.split("error: ", 1)[1]
    assert re.search(match, error) and "NoneType" not in error and "Union" not in error, error
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("size, classes, match", [(16, 10, "trained on 16 px images, the users' are 8 px"),
                                                 (8, 3, "has 3 outputs but the users have 10 classes")])
def test_an_evaluator_of_other_images_or_classes_fails_before_any_run_dir(tmp_path, size, classes, match):
    """Only the evaluator's channels were checked: one with fewer outputs than the users' classes failed with an
    IndexError after the first user's attack, and one trained at another resolution ran (its pooling head takes any
    size) and gave meaningless accuracy."""
    from lightning_modules.classifier import save_classifier
    from tests.helpers import tiny_victim

    ev, ecfg = tiny_victim(size, 1, num_classes=classes, seed=1, arch="convnet")
    save_classifier(ev, ecfg, tmp_path / "other_evaluator")
    cfg = tiny_config(tmp_path, **{"evaluation.evaluator": str(tmp_path / "other_evaluator")})
    with pytest.raises(attack.ConfigError, match=match):
        attack.main(["--config", str(cfg)])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_shipped_attack_list_leaves_out_common_bases_by_their_marker_not_their_name():
    """The list of shipped attacks left out SampleLevelAttack by its class name; a user's own common base was listed
    as an attack. Now a base says so in its class statement (``abstract_base=True``; its subclasses are attacks)."""
    import gc

    from lightning_modules.base_attack import GradientInversionAttack

    assert [c.__name__ for c in attack.AttackArgumentParser.known("attack")] == [
        "UserLevelInversion", "DLG", "InvertingGradients", "iDLG"]
    from lightning_modules.baselines import DLG, SampleLevelAttack

    assert SampleLevelAttack.abstract_base and not DLG.abstract_base  # what a getattr sees, too

    class MyBase(GradientInversionAttack, abstract_base=True):
        pass

    class MyAttack(MyBase):
        pass

    try:
        names = [c.__name__ for c in attack.AttackArgumentParser.known("attack")]
        assert "MyAttack" in names and "MyBase" not in names and "SampleLevelAttack" not in names, names
    finally:  # subclasses are weak references: drop them so other tests see only the shipped list
        del MyAttack, MyBase
        gc.collect()
    assert "MyAttack" not in [c.__name__ for c in attack.AttackArgumentParser.known("attack")]


def test_unknown_class_in_a_config_file_is_named_and_a_broken_own_class_keeps_its_import_error(tmp_path, capsys,
                                                                                              monkeypatch):
    """class_path: DLGx in a config file got jsonargparse's terse message, not the list of shipped attacks; and a
    user's own attack whose module fails to import (a missing dependency) was called "not a known attack method",
    hiding the ImportError."""
    cfg = tiny_config(tmp_path)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("attack:\n  class_path: DLGx\n")
    (tmp_path / "brokenatk.py").write_text("import nonexistent_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for argv, match in ((["--config", str(overlay)], r"^attack: 'DLGx' is not a known attack method; use one of"),
                        (["--attack", "brokenatk.MyDLG"], r"^attack \(MyDLG\): No module named 'nonexistent_dep_xyz'")):
        with pytest.raises(SystemExit):
            attack.main(["--config", str(cfg), *argv])
        error = capsys.readouterr().err.split("error: ", 1)[1]
        assert re.search(match, error), error


def test_a_user_source_argument_refused_at_construction_reads_as_one_line(tmp_path):
    with pytest.raises(attack.ConfigError, match=r"^users: num_users must be >= 1, got 0$"):
        attack.main(["--config", str(tiny_config(tmp_path)), "--users.init_args.num_users", "0"])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "trainer, match",
    [
        ({"accelerator": "gpu", "devices": 1}, "no CUDA device"),
        ({"accelerator": "cpu", "devices": 64, "strategy": "ddp"}, "devices is 64 but this machine has 2 CPU cores"),
        ({"accelerator": "cpu", "devices": 0}, ">= 1"),
    ],
)
def test_devices_the_machine_lacks_fail_before_any_run_dir(tmp_path, monkeypatch, trainer, match):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    cfg = tiny_config(tmp_path, **{f"trainer.{k}": v for k, v in trainer.items()})
    with pytest.raises(attack.ConfigError, match=match):
        attack.main(["--config", str(cfg)])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_several_devices_shard_users_under_ddp_or_auto_and_are_refused_otherwise(monkeypatch):
    """devices 2 with strategy auto is Lightning's ddp: attack.py shards the users (each per-user Trainer started
    its own processes, which re-ran attack.py); another strategy with several devices is refused up front."""
    monkeypatch.setattr(attack.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attack.requested_devices({"accelerator": "cpu", "devices": "auto"}) == 1
    assert attack.requested_devices({"accelerator": "cpu", "devices": -1}) == 4
    assert attack.requested_devices({"accelerator": "cpu", "devices": [0, 2]}) == 2
    assert attack.distributed({"accelerator": "cpu", "devices": 2}) is True
    assert attack.distributed({"accelerator": "cpu", "devices": 1, "num_nodes": 2}) is True
    assert attack.distributed({"accelerator": "cpu", "devices": 1}) is False
    assert attack.distributed({"accelerator": "cpu", "devices": 1, "strategy": "ddp"}) is True
    attack.check_devices({"accelerator": "cpu", "devices": 2})
    with pytest.raises(attack.ConfigError, match="strategy 'fsdp' with 2 devices.*--trainer.strategy ddp"):
        attack.check_devices({"accelerator": "cpu", "devices": 2, "strategy": "fsdp"})
    attack.check_devices({"accelerator": "cpu", "devices": 1, "strategy": "fsdp"})
    # a misspelt strategy: Lightning's "invalid strategy name" came only at the first user's Trainer, after the run
    # directory and the W&B run existed
    with pytest.raises(attack.ConfigError, match="trainer.strategy 'dpp' is not a Lightning strategy \\(did you mean 'ddp'"):
        attack.check_devices({"accelerator": "cpu", "devices": 1, "strategy": "dpp"})
    attack.check_devices({"accelerator": "cpu", "devices": 1, "strategy": "DDP"})  # Lightning lower-cases it
    attack.check_devices({"accelerator": "cpu", "devices": 2, "strategy": "DDP"})  # and shards the users with it


def test_check_devices_accepts_what_the_machine_has(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    attack.check_devices({"accelerator": "gpu", "devices": 2})
    attack.check_devices({"accelerator": "auto", "devices": [1]})
    with pytest.raises(attack.ConfigError, match="names device 2"):
        attack.check_devices({"accelerator": "cuda", "devices": [0, 2]})
    with pytest.raises(attack.ConfigError, match="3 but this machine has 2 CUDA devices"):
        attack.check_devices({"accelerator": "auto", "devices": 3})


def test_unknown_config_key_is_rejected(tmp_path, capsys):
    cfg = tiny_config(tmp_path, **{"attack.init_args.stepz": 3})
    with pytest.raises(SystemExit):
        attack.main(["--config", str(cfg)])
    assert "stepz" in capsys.readouterr().err


def test_a_key_given_twice_in_a_config_file_is_rejected(tmp_path, capsys):
    """``steps: 3`` then ``steps: 5`` in one attack YAML ran 5 steps without a word (sweep.py refused the same in
    a sweep file); now one line names the file, the key and both lines, before any run directory."""
    cfg = tiny_config(tmp_path)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("attack:\n  init_args:\n    steps: 3\n    steps: 5\n")
    with pytest.raises(SystemExit) as exit_info:
        attack.main(["--config", str(cfg), "--config", str(overlay)])
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"--config {overlay}: key 'steps' is given twice in one mapping (lines 3 and 4)" in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_resume_skips_finished_users_and_continues_the_interrupted_one(tmp_path, monkeypatch):
    from tests.helpers import interrupt_user_at

    cfg = tiny_config(tmp_path, **{"logger.backend": "csv"})
    spy = interrupt_user_at(monkeypatch, "user_0001/", 3)  # Ctrl-C in the middle of the second user's attack
    with pytest.raises(SystemExit), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        attack.main(["--config", str(cfg), "--checkpoint_every", "2"])
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    first = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [r["user"] for r in first] == ["0"]
    assert (run_dir / "checkpoints" / "user_0001" / "last.ckpt").is_file()
    import torch

    before = torch.load(run_dir / "checkpoints" / "user_0001" / "last.ckpt", weights_only=False)["attack_seconds"]
    assert before > 0  # the interrupted user's time so far travels with its checkpoint

    spy.calls.clear()
    spy.at = None
    monkeypatch.chdir(tmp_path)  # resumed by a relative path, with another image logging interval (logging only)
    with warnings.catch_warnings(record=True) as seen_on_resume:
        warnings.simplefilter("always")
        resumed = attack.main(["--config", str(cfg), "--checkpoint_every", "2", "--resume", f"runs/{run_dir.name}",
                               "--image_log_every", "3", "--attack.init_args.log_images_every", "3"])
    # Lightning's warnings about manual-optimisation checkpoints and a mid-epoch resume of the step loader are by
    # design here (tests/test_batched_attack.py: a resumed run equals an uninterrupted one): not shown
    assert not [str(w.message) for w in seen + seen_on_resume
                if re.search("manual optimization|ended before the epoch ended", str(w.message))]
    assert resumed.resolve() == run_dir
    assert json.loads((run_dir / "summary.json").read_text())["run_dir"] == str(run_dir.resolve())
    assert spy.calls == [("user_0001/", 2), ("user_0001/", 3)]  # user 0 skipped, user 1 resumed at step 2
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [r["user"] for r in rows] == ["0", "1"] and rows[0] == first[0] and rows[1]["steps"] == "4"
    assert float(rows[1]["seconds"]) > before  # the whole attack's time, not only the part after the resume
    assert not (run_dir / "checkpoints" / "user_0001").exists()
    other = tiny_config(tmp_path / "other", **{"attack.init_args.steps": 5})
    with pytest.raises(attack.ConfigError, match="another config"):
        attack.main(["--config", str(other), "--resume", str(run_dir)])


@pytest.mark.slow
def test_two_process_cpu_ddp_gives_the_same_results_table(tmp_path):
    import subprocess
    import sys

    cfg = tiny_config(tmp_path, **{"logger.backend": "none"})
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(attack.__file__).parent))
    script = str(Path(attack.__file__))
    runs = (([], "one"), (["--trainer.strategy", "ddp", "--trainer.devices", "2"], "two"),
            (["--trainer.devices", "2"], "auto2"))  # strategy auto with 2 devices: sharded as ddp (it crashed)
    for extra, name in runs:
        out = subprocess.run([sys.executable, script, "--config", str(cfg), "--output.name", name, *extra],
                             env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    one = list(csv.DictReader(next((tmp_path / "runs").glob("one-*")).joinpath("results.csv").open()))
    two_dir = next((tmp_path / "runs").glob("two-*"))
    two = list(csv.DictReader(two_dir.joinpath("results.csv").open()))
    assert json.loads((two_dir / "summary.json").read_text())["processes"] == 2
    assert [r["user"] for r in two] == [r["user"] for r in one] == ["0", "1"]
    for a, b in zip(one, two):
        for key in ("dominant_class", "inferred_dominant", "inferred_counts", "evaluator_class", "B", "steps"):
            assert a[key] == b[key], key
        for key in ("mse_nearest", "psnr_mean", "evaluator_prob"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-3, abs=1e-4), key
    assert len(list((two_dir / "users").iterdir())) == 2
    (auto_dir,) = (tmp_path / "runs").glob("auto2-*")  # one run directory, not one per process
    assert json.loads((auto_dir / "summary.json").read_text())["processes"] == 2
    assert list(csv.DictReader(auto_dir.joinpath("results.csv").open())) == [
        dict(r, seconds=a["seconds"], seconds_per_step=a["seconds_per_step"])
        for r, a in zip(two, csv.DictReader(auto_dir.joinpath("results.csv").open()))]


def test_user_uid_pads_integer_ids_and_keeps_folder_names_verbatim():
    import numpy as np
    import torch

    from datamodules.users import User

    def uid(user_id):
        return attack.user_uid(User(user_id=user_id, images=torch.zeros(1, 1, 2, 2), labels=torch.zeros(1, dtype=torch.int64),
                                    num_classes=2, dominant_class=0))

    assert uid(3) == "user_0003" and uid(np.int64(12345)) == "user_12345"
    # folder names: two that differ only in leading zeros must not share a folder
    assert uid("12") == "user_12" and uid("012") == "user_012" and uid("Aaron_Eckhart") == "user_Aaron_Eckhart"


def test_random_victim_depends_only_on_init_seed_and_leaves_the_global_rng():
    import torch

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, _ = attack.load_victim(attack.VictimSpec(random_init=True, init_seed=0))
    assert torch.equal(torch.get_rng_state(), before)  # loading draws nothing from the global RNG
    torch.manual_seed(7)  # another global state: same weights
    b, _ = attack.load_victim(attack.VictimSpec(random_init=True, init_seed=0))
    c, _ = attack.load_victim(attack.VictimSpec(random_init=True, init_seed=1))
    trained, _ = attack.load_victim(attack.VictimSpec())
    wa, wb, wc, wt = (next(m.parameters()) for m in (a, b, c, trained))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc) and not torch.equal(wa, wt)


def test_log_final_draws_one_row_per_user_and_a_table_of_every_column():
    import torch

    class Logger:
        def __init__(self):
            self.images, self.tables, self.metrics = [], [], []

        def log_image(self, key, images, step=None, caption=None):
            self.images.append((key, images[0], caption))

        def log_table(self, key, columns, data):
            self.tables.append((key, columns, data))

        def log_metrics(self, metrics, step=None):
            self.metrics.append(metrics)

    log = Logger()
    grids = {"0": torch.full((12, 1, 4, 4), 0.0), "1": torch.full((11, 1, 4, 4), 0.0)}  # user 1: no denoised image
    rows = [{"user": 0, "evaluator_correct": 1}, {"user": 1, "evaluator_correct": 0, "resumed": True}]
    attack.log_final(log, None, rows, grids)
    key, img, caption = log.images[0]
    assert key == "final/grid" and "one row per user" in caption[0]
    # make_grid with padding 2: 2 rows of 4-pixel images, 12 columns
    assert img.shape == (2 * 6 + 2, 12 * 6 + 2, 3) and img.dtype.name == "uint8"
    assert img[8:12, 2 + 11 * 6: 6 + 11 * 6].min() == 255  # the second user's missing 12th image is blank (white)
    assert img[2:6, 2 + 11 * 6: 6 + 11 * 6].max() == 0  # the first user's 12th image is there
    assert log.tables[0][1] == ["user", "evaluator_correct", "resumed"]
    assert log.tables[0][2][0] == [0, 1, None]


def test_victim_with_more_outputs_than_the_users_classes(tmp_path):
    """A victim with 12 outputs attacked on 10-class users (validate allows it): the server's label space is the
    victim's, so label inference and DLG's soft labels work (they failed: the view said 10 classes)."""
    from lightning_modules.classifier import save_classifier
    from tests.helpers import tiny_victim

    victim, vcfg = tiny_victim(8, 1, num_classes=12, seed=0)
    save_classifier(victim, vcfg, tmp_path / "victim12")
    cfg = tiny_config(tmp_path, **{"victim.checkpoint": str(tmp_path / "victim12"), "logger.backend": "none",
                                   "attack.class_path": "lightning_modules.baselines.DLG",
                                   "attack.init_args": {"steps": 1, "max_iter": 2}, "image_log_every": 0})
    run_dir = attack.main(["--config", str(cfg)])
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert len(rows) == 2 and all(0 <= int(r["inferred_dominant"]) < 12 for r in rows)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def _gather_worker(rank: int, world: int, init_file: str, run_dir: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from datamodules.users import User

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    users = [User(u, torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), 2, 0) for u in range(3)]
    run = Path(run_dir)
    if rank == 0:  # rank 0 finished users 0 and 2; rank 1 diverged after user 1
        status, rows, local = "finished", [{"user": 2, "psnr": 2.0}, {"user": 0, "psnr": 0.0}], []
    else:
        status, rows, local = "diverged: loss is NaN at step 7", [], [(1, {"user": 1, "psnr": 1.0}, torch.ones(1, 2, 2))]
        (run / attack.PARTIAL_DIR).mkdir()
        attack.write_results(run, [local[0][1]], name=f"{attack.PARTIAL_DIR}/rank1-1.csv")
    grids: dict = {}
    dist.barrier()
    status, rows = attack.gather_ranks(status, rows, local, grids, rank, world, run, users)
    if rank == 0:
        Path(out).write_text(json.dumps({"status": status, "users": [r["user"] for r in rows], "grids": sorted(grids)}))
    dist.destroy_process_group()


def test_gather_ranks_merges_every_rank_and_reports_a_stopped_one(tmp_path):
    """Every rank meets in run()'s finally: rank 0 gets the users of a rank that diverged, writes them into
    results.csv in user order, and the run's status names that rank (a rank that stopped early used to leave the
    others waiting forever in the gather, and its users were lost)."""
    import torch.multiprocessing as mp

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = tmp_path / "out.json"
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "pg"), str(run_dir), str(out)), nprocs=2, join=True)
    got = json.loads(out.read_text())
    assert got == {"status": "rank 1: diverged: loss is NaN at step 7", "users": [0, 1, 2], "grids": ["1"]}
    assert [r["user"] for r in csv.DictReader((run_dir / "results.csv").open())] == ["0", "1", "2"]
    assert not (run_dir / attack.PARTIAL_DIR).exists()


def test_a_failed_gather_merges_the_partial_rows_and_is_not_finished_while_users_lack_rows(tmp_path, capsys):
    """A broken (or timed-out) process group made gather_ranks return rank 0's own rows and status: the run said
    "finished" (exit 0, checkpoints removed, sweep.py skipping the cell) with another rank's users missing from
    results.csv. Rank 0 now merges partial/ from disk and reports 'incomplete' while users are missing."""
    from datamodules.users import User

    users = [User(u, torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), 2, 0) for u in range(3)]
    (tmp_path / attack.PARTIAL_DIR).mkdir()
    attack.write_results(tmp_path, [{"user": 2, "psnr": 2.0}], name=f"{attack.PARTIAL_DIR}/rank1-1.csv")
    # no process group here: all_gather_object raises, as a broken one does
    status, rows = attack.gather_ranks("finished", [{"user": 0, "psnr": 0.0}], [], {}, 0, 2, tmp_path, users)
    assert status.startswith("incomplete:") and "1 of 3 users have no row (first: [1])" in status
    assert [str(r["user"]) for r in rows] == ["0", "2"]
    assert [r["user"] for r in csv.DictReader((tmp_path / "results.csv").open())] == ["0", "2"]
    assert (tmp_path / attack.PARTIAL_DIR / "rank1-1.csv").is_file()  # kept for --resume
    attack.write_results(tmp_path, [{"user": 1, "psnr": 1.0}], name=f"{attack.PARTIAL_DIR}/rank2-1.csv")
    status, rows = attack.gather_ranks("finished", [{"user": 0, "psnr": 0.0}], [], {}, 0, 3, tmp_path, users)
    assert status == "finished" and [str(r["user"]) for r in rows] == ["0", "1", "2"]  # every user is there
    assert "could not gather" in capsys.readouterr().err


def test_resume_reads_the_rows_other_ranks_left_in_partial(tmp_path):
    """A run stopped hard before rank 0 merged: --resume counts rank 1's finished users (partial/rank1-*.csv) as
    done, besides results.csv's."""
    cfg = tiny_config(tmp_path, **{"logger.backend": "none"})
    parser = attack.build_parser()
    ns = parser.parse_args(["--config", str(cfg)])
    run_dir = tmp_path / "runs" / "tiny-20260101-000000-abcdef"
    (run_dir / attack.PARTIAL_DIR).mkdir(parents=True)
    attack.atomic_write_text(run_dir / "config.yaml", attack.dump_config(parser, ns))
    attack.write_results(run_dir, [{"user": 0, "psnr_nearest": 10.0}])
    attack.write_results(run_dir, [{"user": 1, "psnr_nearest": 11.0}, {"user": 0, "psnr_nearest": 9.0}],
                         name=f"{attack.PARTIAL_DIR}/rank1-42.csv")
    ns = parser.parse_args(["--config", str(cfg), "--resume", str(run_dir)])
    _, rows = attack.open_resume_dir(parser, ns)
    assert [(r["user"], r["psnr_nearest"]) for r in rows] == [("0", "10.0"), ("1", "11.0")]


TINY_ATTACK = {"steps": 4, "t_max": 300, "t_min": 10, "t_final": 20, "denoise_steps": 2}


def prepare_warnings(cfg_path: Path, containing: str) -> list[str]:
    """The messages of the warnings ``attack.prepare`` gives for the config file ``cfg_path`` that contain
    ``containing`` (every warning recorded, none filtered)."""
    parser = attack.build_parser()
    cfg = parser.parse_args(["--config", str(cfg_path)])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        attack.prepare(parser, cfg)
    return [str(x.message) for x in seen if containing in str(x.message)]


@pytest.mark.parametrize("attack_args, warns", [
    ({"output_weight": 0.5}, "output_weight > 0 under client defenses"),
    ({"final_candidates": 4}, "selection_output_weight > 0 under client defenses"),
    ({"final_candidates": 4, "selection_output_weight": 0.0}, None),
    ({}, None),
])
def test_output_terms_under_defenses_warn_before_the_run(tmp_path, attack_args, warns):
    """The output-matching target (mean softmax from the bias gradient) is biased by defenses that rescale or mask
    the update: said once, at preparation, and only when an output term is on."""
    cfg_path = tiny_config(tmp_path, **{"attack.init_args": {**TINY_ATTACK, **attack_args},
                                        "threat.defenses": [{"name": "clip", "clip_norm": 1.0}]})
    msgs = prepare_warnings(cfg_path, "under client defenses")
    assert (msgs and warns in msgs[0] and len(msgs) == 1) if warns else not msgs


def test_results_row_says_when_label_inference_was_a_guess():
    """A last layer with no negative entry (e.g. zeroed by a defense) makes the inferred labels a guess: it was a
    warning only, so a privacy curve's label columns could not tell guesses from inferences."""
    from types import SimpleNamespace

    from datamodules.users import User
    from inversion.label_inference import infer_labels

    user = User(user_id=3, images=torch.zeros(2, 1, 4, 4), labels=torch.tensor([1, 1]), num_classes=4,
                dominant_class=1)
    init = SimpleNamespace(threat=attack.ThreatSpec(), victim=SimpleNamespace(random_init=False))
    grads = {"fc.weight": torch.zeros(4, 3), "fc.bias": torch.zeros(4)}
    with pytest.warns(UserWarning, match="are a guess"):
        guess = infer_labels(grads, 4, 2)
    assert attack.scenario_columns("M", user, guess, init)["inferred_informative"] is False
    grads["fc.bias"] = torch.tensor([0.1, -0.4, 0.2, 0.1])
    proven = infer_labels(grads, 4, 2)
    row = attack.scenario_columns("M", user, proven, init)
    assert row["inferred_informative"] is True and row["inferred_dominant"] == 1


@pytest.mark.parametrize("defense, warns", [
    ({"name": "gaussian_dp", "clip_norm": 1.0, "sigma": 0.1}, True),
    ({"name": "quantize", "levels": 4, "stochastic": True}, True),
    ({"name": "gaussian_dp", "clip_norm": 1.0, "sigma": 0.1, "seed": 0}, False),
    ({"name": "clip", "clip_norm": 1.0}, False),
])
def test_an_unseeded_random_defense_warns_before_the_run(tmp_path, defense, warns):
    """Without a seed the noise comes from the global generator: a user's draw depends on the users before it and
    changes on --resume or in split runs; said at preparation (it was silent)."""
    import warnings as w

    cfg_path = tiny_config(tmp_path, **{"threat.defenses": [defense]})
    parser = attack.build_parser()
    cfg = parser.parse_args(["--config", str(cfg_path)])
    with w.catch_warnings(record=True) as seen:
        w.simplefilter("always")
        attack.prepare(parser, cfg)
    assert any("has no seed" in str(x.message) for x in seen) == warns


def test_raw_pt_holds_only_the_representative_image(tmp_path):
    """A baseline's best-matching image is a slice of its B reconstructions: raw.pt saved the whole storage (B times
    the size: 411 kB instead of 6 kB at B = 100)."""
    recon = torch.rand(100, 1, 28, 28)
    attack.write_user(tmp_path, "user_0000", {"raw": recon[7:8]})
    path = tmp_path / "users" / "user_0000" / "raw.pt"
    assert torch.equal(torch.load(path), recon[7:8]) and path.stat().st_size < 10_000


def test_32_true_turns_tf32_off():
    import torch.backends.cudnn as cudnn

    before = (cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        cudnn.allow_tf32 = True
        attack.full_float32("32-true")
        assert not cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        attack.full_float32("bf16-mixed")  # torch's defaults back: a later cell in the process does not inherit
        assert cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_resume_accepts_other_execution_settings_but_not_another_experiment(tmp_path):
    """A run started with accelerator 'cpu' resumes under 'auto' (the shipped configs changed so; the methods queue's
    resume was refused for it), with another progress-bar setting or device count; a changed precision or attack
    setting is refused, naming the dotted key."""
    parser = attack.build_parser()
    cfg_path = tiny_config(tmp_path)
    run_dir = tmp_path / "runs" / "tiny-20260101-000000-abcdef"
    run_dir.mkdir(parents=True)
    cfg = parser.parse_args(["--config", str(cfg_path)])
    (run_dir / "config.yaml").write_text(attack.dump_config(parser, cfg))

    def resume(*extra):
        return attack.open_resume_dir(parser, parser.parse_args(["--config", str(cfg_path), *extra,
                                                                 "--resume", str(run_dir)]))

    assert resume("--trainer.accelerator", "auto", "--trainer.enable_progress_bar", "true",
                  "--trainer.devices", "2")[0] == run_dir
    with pytest.raises(attack.ConfigError, match=r"differs in \['trainer.precision'\]"):
        resume("--trainer.precision", "bf16-mixed")
    with pytest.raises(attack.ConfigError, match=r"differs in \['attack.init_args.steps'\]"):
        resume("--attack.init_args.steps", "5")


def test_inverting_gradients_rows_count_the_restarts_it_dropped(tmp_path):
    """A diverged IG restart is dropped with a warning; results.csv says how many were (it was in the warning only)."""
    cfg = tiny_config(tmp_path, **{"attack.class_path": "lightning_modules.baselines.InvertingGradients",
                                   "attack.init_args": {"steps": 2, "restarts": 2},
                                   "users.init_args.num_users": 1, "logger.backend": "none"})
    run_dir = attack.main(["--config", str(cfg)])
    (row,) = list(csv.DictReader((run_dir / "results.csv").open()))
    assert row["method"] == "InvertingGradients" and row["diverged_restarts"] == "0"


def test_resume_refuses_models_changed_on_disk_since_the_run_started(tmp_path):
    """Only the config text was compared: retraining the victim (or prior) into the same folder between two parts
    of a run mixed users attacked with two models in one results.csv, with status 'finished'."""
    import json as _json

    from lightning_modules.classifier import save_classifier
    from tests.helpers import tiny_victim

    cfg = tiny_config(tmp_path, **{"users.init_args.num_users": 1, "logger.backend": "none"})
    run_dir = attack.main(["--config", str(cfg)])
    recorded = _json.loads((run_dir / "models.json").read_text())
    assert sorted(recorded) == ["evaluator", "prior", "victim"] and all(len(v) == 64 for v in recorded.values())
    assert attack.main(["--config", str(cfg), "--resume", str(run_dir)]) == run_dir  # unchanged: resumes
    victim_dir = tmp_path / "assets" / "victim"
    original = (victim_dir / "model.safetensors").read_bytes()
    other, vcfg = tiny_victim(8, 1, seed=5)
    save_classifier(other, vcfg, victim_dir)
    assert (victim_dir / "model.safetensors").read_bytes() != original
    with pytest.raises(attack.ConfigError, match=r"the victim model files changed since this run started"):
        attack.main(["--config", str(cfg), "--resume", str(run_dir)])


def test_run_seed_and_checkpoint_interval_are_checked_up_front(tmp_path, recwarn):
    """--seed -7 failed in Lightning's seed_everything with a numpy message that did not name --seed; a
    --checkpoint_every above the steps silently saved nothing mid-user; a negative one failed in ModelCheckpoint."""
    cfg = tiny_config(tmp_path, **{"users.init_args.num_users": 1, "logger.backend": "none"})
    for argv, match in ((["--seed", "-7"], r"--seed must be an integer in \[0, 2\*\*32 - 1\].*got -7"),
                        (["--seed", str(2**32)], r"--seed must be"),
                        (["--checkpoint_every", "-1"], r"--checkpoint_every must be >= 0")):
        with pytest.raises(attack.ConfigError, match=match):
            attack.main(["--config", str(cfg), *argv])
    assert not (tmp_path / "runs").exists()
    attack.main(["--config", str(cfg), "--checkpoint_every", "100"])  # the tiny attack runs 4 steps
    assert [w for w in recwarn if "--checkpoint_every 100 is above the attack's 4 steps" in str(w.message)]


def test_a_checkpoint_the_resume_cannot_load_names_the_folder_to_delete(tmp_path, monkeypatch):
    """A checkpoint written on another kind of device (its RNG state does not fit) failed every later resume with
    "resume on the device it ran on (or start this user afresh)", without saying how to start it afresh."""
    from lightning_modules.user_level_inversion import UserLevelInversion
    from tests.helpers import interrupt_user_at

    cfg = tiny_config(tmp_path, **{"logger.backend": "none"})
    spy = interrupt_user_at(monkeypatch, "user_0001/", 3)
    with pytest.raises(SystemExit):
        attack.main(["--config", str(cfg), "--checkpoint_every", "2"])
    (run_dir,) = (tmp_path / "runs").iterdir()
    spy.at = None

    def foreign(self, checkpoint):  # as a CUDA generator state read on a CPU machine
        raise ValueError("the checkpoint's noise generator state (16 bytes) is not one of a cpu generator")

    monkeypatch.setattr(UserLevelInversion, "on_load_checkpoint", foreign)
    with pytest.raises(ValueError, match=r"\[checkpoint .*user_0001.last\.ckpt: to start user_0001 afresh, delete "
                                         r".*checkpoints.user_0001 and resume again\]"):
        attack.main(["--config", str(cfg), "--checkpoint_every", "2", "--resume", str(run_dir)])


@pytest.mark.parametrize("threat, warns", [
    ({"reveal_batch_size": False, "fedavg_batch_size": 1}, True),  # B = 3 in 3 hidden steps: divisor 3x too small
    ({"reveal_batch_size": True, "fedavg_batch_size": 1}, False),  # the server counts the steps
    ({"reveal_batch_size": False, "fedavg_batch_size": 0}, False),  # one step per epoch: lr x epochs is right
])
def test_output_terms_under_fedavg_with_hidden_b_and_mini_batches_warn_before_the_run(tmp_path, threat, warns):
    """With B hidden and local mini-batches b < B the server divides by lr x epochs, so the pseudo-gradient is
    ceil(B / b) times too large and the mean softmax read from it (p = g + n / B) is off: said at preparation."""
    cfg_path = tiny_config(tmp_path, **{"attack.init_args": {**TINY_ATTACK, "output_weight": 0.5},
                                        "threat.protocol": "fedavg", **{f"threat.{k}": v for k, v in threat.items()}})
    msgs = prepare_warnings(cfg_path, "B hidden and local mini-batches")
    assert (len(msgs) == 1 and "output_weight > 0" in msgs[0] and "ceil(B / 1)" in msgs[0]) if warns else not msgs


def test_a_run_directory_moved_between_resumes_keeps_saving_last_ckpt(tmp_path, monkeypatch):
    """Lightning records the checkpoint folder's absolute path; after the run directory moved, a resumed fit saved
    last-v1.ckpt beside the old last.ckpt, and every later --resume restarted from the old step."""
    from tests.helpers import interrupt_user_at

    cfg = tiny_config(tmp_path, **{"logger.backend": "csv", "users.init_args.num_users": 1,
                                   "attack.init_args.steps": 6})
    spy = interrupt_user_at(monkeypatch, "user_0000/", 3)
    with pytest.raises(SystemExit):
        attack.main(["--config", str(cfg), "--checkpoint_every", "2"])
    (run_dir,) = (tmp_path / "runs").iterdir()
    moved = tmp_path / "moved" / run_dir.name
    moved.parent.mkdir()
    shutil.move(str(run_dir), str(moved))
    spy.calls.clear()
    spy.at = ("user_0000/", 5)  # interrupted again, after the checkpoint of step 4
    with pytest.raises(SystemExit):
        attack.main(["--config", str(cfg), "--checkpoint_every", "2", "--resume", str(moved)])
    ckpts = sorted(p.name for p in (moved / "checkpoints" / "user_0000").iterdir())
    assert ckpts == ["last.ckpt"]
    assert torch.load(moved / "checkpoints" / "user_0000" / "last.ckpt", weights_only=False)["global_step"] == 4
    spy.calls.clear()
    spy.at = None
    attack.main(["--config", str(cfg), "--checkpoint_every", "2", "--resume", str(moved)])
    assert spy.calls == [("user_0000/", 4), ("user_0000/", 5)]  # continued from step 4, not from step 2 again


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_run_kept_in_git_by_queue_persist_resumes_the_user_in_progress_at_its_checkpoint(tmp_path, monkeypatch):
    """The CPU queues keep a subset of each run directory in git (scripts/queue_lib.sh: queue_persist) and copy it
    back on the next machine (queue_restore). The user in progress used to restart there (no checkpoint was kept):
    up to a whole user's attack (~17 minutes at 4,000 steps) lost per queue per session."""
    import subprocess
    import sys

    from tests.helpers import interrupt_user_at

    cfg = tiny_config(tmp_path, **{"logger.backend": "csv", "users.init_args.num_users": 2,
                                   "attack.init_args.steps": 6})
    spy = interrupt_user_at(monkeypatch, "user_0001/", 5)  # after user 1's checkpoint of step 4
    with pytest.raises(SystemExit):
        attack.main(["--config", str(cfg), "--checkpoint_every", "2"])
    (run_dir,) = (tmp_path / "runs").iterdir()
    lib = Path(attack.__file__).resolve().parent / "scripts" / "queue_lib.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", f"source {lib}\nqueue_persist runs kept"], cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    kept = tmp_path / "kept" / run_dir.name
    assert (kept / "checkpoints" / "user_0001" / "last.ckpt").is_file() and not (kept / "logs").exists()
    shutil.rmtree(tmp_path / "runs")  # a fresh machine: only what git kept
    subprocess.run(["bash", "-c", f"source {lib}\nqueue_restore runs kept"], cwd=tmp_path, env=env, check=True)
    spy.calls.clear()
    spy.at = None
    attack.main(["--config", str(cfg), "--checkpoint_every", "2", "--resume", str(run_dir)])
    assert spy.calls == [("user_0001/", 4), ("user_0001/", 5)]  # user 0 kept, user 1 continued from step 4
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [r["user"] for r in rows] == ["0", "1"] and rows[1]["steps"] == "6"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def test_summary_means_include_ssim_and_the_probability_of_the_dominant_class():
    rows = [{"ssim_nearest": "0.25", "ssim_mean": 0.1, "evaluator_prob": 0.9, "evaluator_prob_of_dominant": 0.2},
            {"ssim_nearest": "0.75", "ssim_mean": "nan", "evaluator_prob": 0.7, "evaluator_prob_of_dominant": ""}]
    s = attack.summarize(rows)
    assert s["ssim_nearest_mean"] == 0.5 and s["ssim_mean_mean"] == 0.1  # NaN and empty cells left out
    assert s["evaluator_prob_mean"] == pytest.approx(0.8) and s["evaluator_prob_of_dominant_mean"] == 0.2


def test_each_process_of_a_device_list_attacks_on_its_own_gpu(monkeypatch):
    """With --trainer.devices [1, 3] Lightning runs rank 1 on cuda:3; the per-user Trainers got devices [1] (the
    rank number): another GPU than the process group's."""
    import lightning.fabric

    class FakeFabric:
        def __init__(self, **kw):
            self.kw, self.local_rank, self.device = kw, 1, torch.device("cuda", 3)

        def launch(self):
            pass

    monkeypatch.setattr(lightning.fabric, "Fabric", FakeFabric)
    kwargs = {"accelerator": "gpu", "devices": [1, 3], "strategy": "ddp"}
    fabric = attack.start_distributed(None, kwargs)
    assert fabric.kw["devices"] == [1, 3] and kwargs["devices"] == [3] and kwargs["strategy"] == "auto"
    # the final gather waits for the slowest rank: longer than torch's 30 min default (an hour-long DLG user)
    assert fabric.kw["strategy"]._timeout == attack.DDP_GATHER_TIMEOUT >= timedelta(hours=2)


def test_a_resume_sets_aside_an_unreadable_checkpoint_and_restarts_that_user(tmp_path, monkeypatch, capsys):
    """A last.ckpt truncated by a kill while Lightning wrote it (in place) made every --resume fail with a
    traceback ('failed: OSError: [Errno 22] Invalid argument'); now it is renamed aside, named on stderr, and that
    user starts again from step 0."""
    from tests.helpers import interrupt_user_at

    cfg = tiny_config(tmp_path, **{"logger.backend": "none", "image_log_every": 0, "users.init_args.num_users": 1})
    spy = interrupt_user_at(monkeypatch, "user_0000/", 3)
    with pytest.raises(SystemExit):
        attack.main(["--config", str(cfg), "--checkpoint_every", "2"])
    (run_dir,) = (tmp_path / "runs").iterdir()
    last = run_dir / "checkpoints" / "user_0000" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    spy.calls.clear()
    spy.at = None
    capsys.readouterr()
    assert attack.main(["--config", str(cfg), "--checkpoint_every", "2", "--resume", str(run_dir)]) == run_dir
    err = capsys.readouterr().err
    assert re.search(r"user_0000: its checkpoint .*last.ckpt cannot be read \(\w+.*\); set aside as "
                     r"last.unreadable-\d{8}-\d{6}.ckpt, user_0000 starts again from step 0", err), err
    assert spy.calls[0] == ("user_0000/", 0)  # from the start
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


def test_only_a_cut_short_checkpoint_is_set_aside(tmp_path, monkeypatch):
    """set_aside_unreadable_checkpoint renamed an intact checkpoint on any load error (a module the pickle names
    gone, an I/O error), throwing the user's progress away; only the errors of a cut-short file count now."""
    import pickle

    good = tmp_path / "a" / "last.ckpt"
    good.parent.mkdir()
    torch.save({"global_step": 3}, good)
    assert attack.set_aside_unreadable_checkpoint(good, "user_0000") is None and good.is_file()
    for exc in (ModuleNotFoundError("No module named 'oldmod'"), OSError(5, "Input/output error"), MemoryError()):
        monkeypatch.setattr(torch, "load", lambda *a, exc=exc, **k: (_ for _ in ()).throw(exc))
        with pytest.raises(type(exc)):
            attack.set_aside_unreadable_checkpoint(good, "user_0000")
        assert good.is_file()
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(pickle.UnpicklingError("truncated")))
    bad = attack.set_aside_unreadable_checkpoint(good, "user_0000")
    assert bad is not None and bad.is_file() and not good.exists()
