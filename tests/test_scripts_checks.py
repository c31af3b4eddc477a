"""Checks of the scripts in scripts/ found by a review: refinish under --seed, the objective audit's threat check,
the benchmark's and check_checkpoints' argument checks (each an error before any work or output)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import attack
from tests.test_attack_e2e import HAVE_FMNIST, tiny_config

ROOT = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="needs `apt-get install dataset-fashion-mnist`")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script_checks", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # the objective audit's dataclass needs its module registered
    spec.loader.exec_module(mod)
    return mod


@needs_fmnist
def test_refinish_of_a_seeded_run_records_its_seed_and_can_be_refinished_again(tmp_path):
    """A run made with --seed S records its effective attack seed (attack_seed.txt); the refinished run directory did
    not, so refinishing it again (another final stage on the same images) was refused as 'made before --seed'."""
    cfg = tiny_config(tmp_path, **{"seed": 5, "users.init_args.num_users": 1, "attack.init_args.steps": 2,
                                   "logger.backend": "csv"})
    run = attack.main(["--config", str(cfg)])
    seed = (run / attack.ATTACK_SEED_FILE).read_text()
    rf = load_script("refinish")
    once = rf.main([str(run), "--attack.init_args.denoise_steps", "1"])
    assert (once / attack.ATTACK_SEED_FILE).read_text() == seed
    twice = rf.main([str(once), "--attack.init_args.denoise_steps", "1"])  # refused before the fix
    assert (twice / attack.ATTACK_SEED_FILE).read_text() == seed


@needs_fmnist
def test_objective_audit_threat_mismatch_fails_before_any_run_dir(tmp_path):
    """label_strategy 'known' without threat.known_labels: attack.py refuses it before any run directory; the audit
    failed only at the first user's bind, after writing a run directory (config.yaml alone, which `collect` then
    rejects for its missing summary.json)."""
    audit = load_script("objective_audit")
    cfg = tiny_config(tmp_path)
    with pytest.raises(attack.ConfigError, match="known_labels"):
        audit.main(["--config", str(cfg), "--audit.per_class", "1", "--attack.init_args.label_strategy", "known"])
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--tiny", "--steps", "0"], ["--image-size", "0"],
                                  ["--image-size", "-8"]])
def test_benchmark_refuses_zero_steps_and_image_size(argv, capsys):
    """--steps 0 / --image-size 0 silently ran the defaults (5 steps, 32 px) instead of the >= 1 error."""
    bench = load_script("benchmark")
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    assert bench.parse_args(["--tiny"]).steps == 2 and bench.parse_args([]).image_size == 32  # defaults kept


@pytest.mark.parametrize("device, msg", [("cuda", "CUDA is not available"), ("foo", "--device 'foo'"),
                                         ("mps", "cpu, cuda or cuda:N")])
def test_check_checkpoints_refuses_a_bad_device_before_the_accuracies(device, msg, monkeypatch, capsys):
    """--device cuda on a machine without CUDA (or an unknown device) failed with a traceback at the prior, after
    loading the test split and computing both accuracies (minutes on a CPU with the default 10,000 images)."""
    import datamodules.fashion_mnist as fm

    def no_work(*args, **kwargs):
        raise AssertionError("the test split was loaded before the device was checked")

    monkeypatch.setattr(fm, "load_split", no_work)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mod = load_script("check_checkpoints")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--device", device, "--n-test", "10", "--n-samples", "1", "--ddim-steps", "1"])
    assert exc.value.code == 2 and msg in capsys.readouterr().err


def test_objective_audit_names_the_attack_setting_and_refinish_expands_home(tmp_path, monkeypatch):
    """The audit's attack-setting errors name attack.init_args as attack.py's do; refinish takes a quoted '~/...'
    run directory (it said 'not a run directory' of the literal '~' path)."""
    audit = load_script("objective_audit")
    cfg = tiny_config(tmp_path)
    with pytest.raises(attack.ConfigError, match=r"^attack.init_args \(UserLevelInversion\): anneal_fraction"):
        audit.main(["--config", str(cfg), "--audit.per_class", "1", "--attack.init_args.anneal_fraction", "0"])
    refinish = load_script("refinish")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(attack.ConfigError, match=f"^{tmp_path / 'no_run'}: not a run directory"):
        refinish.main(["~/no_run"])
