"""attack.py end to end on a tiny config (tiny victim, evaluator and DDPM; real Fashion-MNIST users)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

import attack
from datamodules.fashion_mnist import DataNotFoundError, find_fashion_mnist_root
from tests.helpers import save_tiny_assets

try:
    find_fashion_mnist_root(download=False)
    HAVE_FMNIST = True
except DataNotFoundError:
    HAVE_FMNIST = False

pytestmark = pytest.mark.skipif(not HAVE_FMNIST, reason="needs `apt-get install dataset-fashion-mnist`")


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
    run_dir = attack.main(["--config", str(cfg)])
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("tiny-")
    for name in ("config.yaml", "results.csv", "summary.json"):
        assert (run_dir / name).stat().st_size > 0
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert [r["user"] for r in rows] == ["0", "1"]
    for r in rows:
        assert r["B"] == "3" and r["steps"] == "4" and r["method"] == "UserLevelInversion"
        assert r["inferred_dominant"] == r["dominant_class"]  # single-class users: label inference is exact
        for key in ("evaluator_class", "evaluator_prob", "mse_nearest", "mse_mean", "psnr_nearest", "psnr_mean", "seconds"):
            assert r[key] != ""
        assert float(r["psnr_nearest"]) >= float(r["psnr_mean"])
    for uid in ("user_0000", "user_0001"):
        for png in ("batch.png", "raw.png", "denoised.png", "grid.png"):
            assert (run_dir / "users" / uid / png).stat().st_size > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["users"] == 2
    assert list(run_dir.glob("wandb/offline-run-*")), "W&B offline run missing"
    assert not list(run_dir.rglob("*.tmp")), "temporary files left behind"
    # a second run never reuses the directory
    run_dir2 = attack.main(["--config", str(cfg)])
    assert run_dir2 != run_dir and (run_dir / "results.csv").read_text() == (run_dir / "results.csv").read_text()


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"victim.checkpoint": "/nonexistent/victim"}, FileNotFoundError, "config.json"),
        ({"users.init_args.channels": 3}, attack.ConfigError, "expects"),
        ({"users.init_args.batch_size": 2000}, ValueError, "1000 test images"),
        ({"threat.defenses": [{"name": "gaussian_dp", "clip_norm": 1.0, "sigma": -1.0}]}, ValueError, "sigma|noise"),
        ({"threat.protocol": "fedavg", "threat.fedavg_epochs": 0}, ValueError, "epoch"),
        ({"attack.init_args.t_min": 900}, ValueError, "t_min"),
    ],
)
def test_bad_input_fails_before_any_run_dir(tmp_path, overrides, error, match):
    cfg = tiny_config(tmp_path, **overrides)
    with pytest.raises(error, match=match):
        attack.main(["--config", str(cfg)])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_unknown_config_key_is_rejected(tmp_path, capsys):
    cfg = tiny_config(tmp_path, **{"attack.init_args.stepz": 3})
    with pytest.raises(SystemExit):
        attack.main(["--config", str(cfg)])
    assert "stepz" in capsys.readouterr().err
