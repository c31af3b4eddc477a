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


def run_as_script(name: str, argv: list[str], monkeypatch) -> int:
    """Run scripts/<name>.py as `python scripts/<name>.py ARGV` would, in this process (runpy, __main__): its exit
    status (SystemExit's code; 0 when it returns)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script inserts the repository root
    try:
        runpy.run_path(str(ROOT / "scripts" / f"{name}.py"), run_name="__main__")
    except SystemExit as exc:
        return exc.code
    return 0


def no_work(*args, **kwargs):
    raise AssertionError("the work began before the input was checked")


def one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv, msg", [
    (["--channels", "3"], "--channels 3: --image-size, --channels and --prior-arch apply only to random models"),
    (["--image-size", "64"], "--image-size 64: --image-size, --channels and --prior-arch apply only to random models"),
    (["--prior-arch", "ddpm-cifar10"], "--prior-arch ddpm-cifar10: --image-size"),
    (["--image-size", "64", "--channels", "3"], "--image-size 64, --channels 3: "),
    (["--tiny", "--prior-arch", "ddpm-cifar10"], "applies only to --random-models without --tiny"),
])
def test_benchmark_shape_options_need_random_models(argv, msg, capsys):
    """Without --random-models or --tiny the shipped 1-channel 32 px checkpoints are measured, and --channels 3 still
    benchmarked (1, 32, 32), --prior-arch ddpm-cifar10 still the shipped prior, --image-size 64 the 32 px victim on
    64 px inputs, while the report named the shipped checkpoints; --tiny silently ignored --prior-arch."""
    bench = load_script("benchmark")
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2 and msg in capsys.readouterr().err
    # the shipped shape itself, and any shape of random models, are fine
    bench.parse_args(["--image-size", "32", "--channels", "1", "--prior-arch", "small"])
    bench.parse_args(["--random-models", "--image-size", "64", "--channels", "3", "--prior-arch", "ddpm-cifar10"])
    args = bench.parse_args(["--tiny", "--channels", "3", "--image-size", "16"])
    assert bench.build_models(args, torch.device("cpu"))[2] == (3, 16, 16)


def test_benchmark_refuses_an_unwritable_json_before_any_work(tmp_path, monkeypatch, capsys):
    """An unwritable --json path was found only when writing the report, after all the measurements (a traceback);
    the check probes the folder and leaves nothing behind (a missing folder is fine: it is created at the end)."""
    bench = load_script("benchmark")
    monkeypatch.setattr(bench, "build_models", no_work)
    (tmp_path / "file").write_text("")
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")  # a broken link: the walk went past it to tmp_path
    bad = [str(tmp_path / "file" / "b.json"), str(tmp_path / "broken" / "b.json")] + (
        ["/proc/nope/b.json"] if Path("/proc/self").is_dir() else [])
    for path in bad:
        with pytest.raises(SystemExit) as exc:
            bench.main(["--tiny", "--steps", "1", "--users", "1", "--batch-sizes", "2", "--json", path])
        assert exc.value.code == 2 and f"--json {path} cannot be written" in capsys.readouterr().err, path
    for path in (tmp_path / "b.json", tmp_path / "new" / "sub" / "b.json"):
        assert bench.parse_args(["--tiny", "--json", str(path)]).json == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "file"]  # no probe file or folder left


def test_check_checkpoints_refuses_unwritable_outputs_before_any_work(tmp_path, monkeypatch, capsys):
    """--json or --grid in an unwritable place was discovered only when writing, after the accuracies and the
    sampling (~40 min for the full run)."""
    import datamodules.fashion_mnist as fm

    monkeypatch.setattr(fm, "load_split", no_work)
    mod = load_script("check_checkpoints")
    monkeypatch.setattr(mod, "prior_sample_report", no_work)
    (tmp_path / "file").write_text("")
    bad = str(tmp_path / "file" / "r.json")
    for flag in ("--json", "--grid"):
        for argv in ([flag, bad, "--n-test", "10"], [flag, bad, "--prior-only"]):
            with pytest.raises(SystemExit) as exc:
                mod.main(argv)
            assert exc.value.code == 2 and f"{flag} {bad} cannot be written" in capsys.readouterr().err, argv
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_check_checkpoints_names_data_root_when_the_test_split_is_missing(tmp_path, monkeypatch, capsys):
    """--data-root without the test split ended in a DataNotFoundError traceback whose fix named the configs'
    --data.root / --users.init_args.root, which this script does not take."""
    missing = str(tmp_path / "nonexistent")
    code = run_as_script("check_checkpoints", ["--data-root", missing, "--n-test", "10", "--n-samples", "1",
                                               "--ddim-steps", "1"], monkeypatch)
    line = one_error_line(capsys.readouterr().err, "check_checkpoints.py")
    assert code == 2 and missing in line and "--data-root FOLDER" in line, line
    assert "data.root" not in line and "users.init_args" not in line, line


def test_check_checkpoints_loads_every_checkpoint_before_any_work(tmp_path, monkeypatch, capsys):
    """--checkpoints with empty model folders ended in a FileNotFoundError traceback ('lacks config.json'), and a
    broken ddpm_32 was found only after the test split and both accuracies: each is now one error line naming the
    folder, before the test split is read."""
    import datamodules.fashion_mnist as fm

    monkeypatch.setattr(fm, "load_split", no_work)
    empty = tmp_path / "empty"
    for name in ("victim_resnet18", "evaluator_convnet", "ddpm_32"):
        (empty / name).mkdir(parents=True)
    for argv in ([], ["--prior-only"]):
        code = run_as_script("check_checkpoints", ["--checkpoints", str(empty), "--n-test", "10", *argv], monkeypatch)
        line = one_error_line(capsys.readouterr().err, "check_checkpoints.py")
        assert code == 2 and str(empty / ("evaluator_convnet" if argv else "victim_resnet18")) in line, line
        assert "lacks config.json" in line, line
    no_prior = tmp_path / "no_prior"
    (no_prior / "ddpm_32").mkdir(parents=True)
    for name in ("victim_resnet18", "evaluator_convnet"):
        (no_prior / name).symlink_to(ROOT / "checkpoints" / "fashion_mnist" / name)
    code = run_as_script("check_checkpoints", ["--checkpoints", str(no_prior), "--n-test", "10"], monkeypatch)
    line = one_error_line(capsys.readouterr().err, "check_checkpoints.py")
    assert code == 2 and f"{no_prior / 'ddpm_32'} is not a diffusers DDPM folder" in line, line
