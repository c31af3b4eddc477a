"""Entry points and their pre-run checks:

- attack.prepare (what sweep.py's pre-check of every cell and refinish call) refuses a negative --seed or
  --checkpoint_every, an output.name that is not a plain folder name and a negative user seed, before any run dir;
- a ValueError raised inside the attack loop (a failure, not bad input) keeps its traceback under run_main, while
  the pre-run bad-input errors stay one line with status 2;
- ``python -m inversion.report`` on a folder without results.csv: one error line, status 2.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import attack
from inversion.cli import mark_raised_during_work, run_main
from inversion.fsutils import check_run_name, new_run_dir
from tests.test_attack_e2e import HAVE_FMNIST, tiny_config

ROOT = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="needs `apt-get install dataset-fashion-mnist`")


@needs_fmnist
@pytest.mark.parametrize("argv, match", [
    (["--seed", "-1"], r"--seed must be an integer in \[0, 2\*\*32 - 1\]"),
    (["--checkpoint_every", "-5"], "--checkpoint_every must be >= 0"),
    (["--output.name", "a/b"], "output.name must be one plain folder name"),
    (["--output.name", ".."], "output.name must be one plain folder name"),
    (["--users.init_args.seed", "-1"], r"users.init_args.seed must be an integer >= 0"),
    (["--image_log_every", "-1"], "--image_log_every must be >= 0"),  # step % -1 == 0: an image every step
    (["--attack.init_args.log_images_every", "-2"], "log_images_every must be >= 0"),
])
def test_prepare_refuses_bad_run_settings_before_any_run_dir(tmp_path, argv, match):
    """sweep.py validates every cell with attack.prepare: --seed -1 and --checkpoint_every -5 were checked only in
    attack.run (a grid cell with them failed hours into a sweep); output.name 'a/b' failed with a raw errno after the
    models loaded, '..' made the run directory outside output.root; a negative user seed said only numpy's
    "expected non-negative integer"."""
    parser = attack.build_parser()
    cfg = parser.parse_args(["--config", str(tiny_config(tmp_path)), *argv])
    with pytest.raises(attack.ConfigError, match=match):
        attack.prepare(parser, cfg)
    assert not (tmp_path / "runs").exists()


def test_new_run_dir_refuses_a_name_with_a_separator(tmp_path):
    with pytest.raises(ValueError, match="plain folder name"):
        new_run_dir(tmp_path / "root", "../escape")
    assert not (tmp_path / "escape").exists() and not any(tmp_path.glob("escape-*"))
    check_run_name("defenses=gaussian_dp-clip_norm1-sigma0.01")  # a sweep's cell slug is fine
    assert new_run_dir(tmp_path / "root", "B10_u0").name.startswith("B10_u0-")


def test_run_main_keeps_the_traceback_of_a_value_error_raised_during_work(capsys):
    def bad_input():
        raise ValueError("users.batch_size must be an integer >= 1")

    with pytest.raises(SystemExit) as exc:
        run_main(bad_input, "attack.py")
    assert exc.value.code == 2 and capsys.readouterr().err == "attack.py: error: users.batch_size must be an integer >= 1\n"

    def bug():
        raise mark_raised_during_work(ValueError("shapes (2,3) and (4,) not aligned"))

    with pytest.raises(ValueError, match="not aligned"):  # propagates: Python prints the traceback, status 1
        run_main(bug, "attack.py")


@needs_fmnist
@pytest.mark.slow
def test_a_value_error_inside_the_attack_loop_is_not_reported_as_bad_input(tmp_path, monkeypatch, capsys):
    """A ValueError from deep in a run (here: scoring a user) printed as 'attack.py: error: ...' with status 2 and no
    traceback, like a config mistake; now it propagates with its traceback, and summary.json says failed."""
    def broken_row(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(attack, "user_row", broken_row)
    cfg = tiny_config(tmp_path, **{"users.init_args.num_users": 1, "logger.backend": "csv"})
    with pytest.raises(ValueError, match="could not be broadcast"):
        run_main(lambda: attack.main(["--config", str(cfg)]), "attack.py")
    assert "attack.py: error:" not in capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert '"failed: ValueError: operands could not be broadcast together"' in (run_dir / "summary.json").read_text()


def test_report_module_on_a_folder_without_results_is_one_error_line(tmp_path):
    (tmp_path / "empty_run").mkdir()
    proc = subprocess.run([sys.executable, "-m", "inversion.report", str(tmp_path / "empty_run"), "--out",
                           str(tmp_path / "rep")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("python -m inversion.report: error: ") and "Traceback" not in proc.stderr
    assert "results.csv" in proc.stderr and not (tmp_path / "rep").exists()


def test_a_resume_keeps_an_older_runs_output_name():
    """A resume makes no directory: a run made when output.name 'sub/x' was accepted must stay resumable."""
    parser = attack.build_parser()
    cfg = parser.parse_args(["--config", str(ROOT / "configs" / "attack" / "fashion_mnist.yaml"),
                             "--output.name", "sub/x"])
    with pytest.raises(attack.ConfigError, match="plain folder name"):
        attack.check_run_args(cfg)
    cfg.resume = "runs/sub/x-20261201-000000-aaaaaa"
    attack.check_run_args(cfg)


def test_a_value_error_while_building_a_report_keeps_its_traceback(tmp_path, monkeypatch):
    """Only load_runs' errors (no results.csv, missing columns) are the report's bad input; a ValueError from the
    aggregation or plotting printed as one 'error:' line, hiding where it came from."""
    import pandas as pd

    from inversion import report

    run = tmp_path / "r-20261201-000000-aaaaaa"
    run.mkdir()
    pd.DataFrame({"user": [0], "method": "UserLevelInversion", "B": 10, "dominant_class": 0,
                  "evaluator_correct": True, "psnr_nearest": 10.0}).to_csv(run / "results.csv", index=False)

    def broken(*args, **kwargs):
        raise ValueError("cannot reindex on an axis with duplicate labels")

    monkeypatch.setattr(report, "aggregate", broken)
    with pytest.raises(ValueError, match="duplicate labels"):
        run_main(lambda: report.main([str(run), "--out", str(tmp_path / "rep")]), "python -m inversion.report")
    assert not (tmp_path / "rep").exists()


@pytest.mark.slow
def test_train_a_value_error_after_the_first_step_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """train.py: a ValueError from step 2 of a fit printed as 'train.py: error: ...' (status 2, no traceback), like
    a config mistake; errors before the first step stay one line."""
    import train
    from lightning_modules.classifier import ImageClassifier
    from tests.helpers import write_fake_fmnist
    from tests.test_train_runs import _config

    data = tmp_path / "fmnist"
    data.mkdir()
    cfg = _config(tmp_path, write_fake_fmnist(data), tmp_path / "root")
    original = ImageClassifier.training_step

    def step(self, batch, batch_idx):
        if self.global_step >= 1:
            raise ValueError("Expected input batch_size (8) to match target batch_size (7)")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ImageClassifier, "training_step", step)
    with pytest.raises(ValueError, match="to match target batch_size"):
        run_main(lambda: train.main(["--config", str(cfg)]), "train.py")
    assert "train.py: error:" not in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # before any step: still one line
        run_main(lambda: train.main(["--config", str(cfg), "--ckpt_path", str(tmp_path / "missing.ckpt")]), "train.py")
    assert exc.value.code == 2 and "train.py: error:" in capsys.readouterr().err


def test_an_override_before_a_config_that_sets_it_again_is_named(capsys):
    """--attack.init_args.steps 5 --config configs/method/inverting_gradients.yaml ran 4,000 steps silently."""
    base = str(ROOT / "configs" / "attack" / "fashion_mnist.yaml")
    ig = str(ROOT / "configs" / "method" / "inverting_gradients.yaml")
    notes = attack.warn_overrides_replaced_by_later_configs(
        ["--config", base, "--attack.init_args.steps", "5", "--seed", "3", f"--config={ig}"])
    assert len(notes) == 1 and notes[0].startswith(f"--attack.init_args.steps comes before --config {ig}")
    assert "[attack] note: --attack.init_args.steps" in capsys.readouterr().err
    # after every --config, or a key the later file does not set: nothing to say
    assert attack.warn_overrides_replaced_by_later_configs(
        ["--config", base, "--config", ig, "--attack.init_args.steps", "5"]) == []
    assert attack.warn_overrides_replaced_by_later_configs(["--seed", "3", "--config", ig]) == []
    parser = attack.build_parser()
    cfg = parser.parse_args(["--config", base, "--attack.init_args.steps", "5", "--config", ig])
    assert cfg.attack.init_args.steps != 5  # the behaviour the note describes


def test_parse_device_accepts_what_the_machine_has_and_names_the_rest(monkeypatch):
    import torch

    from inversion.cli import parse_device

    assert parse_device("cpu") == torch.device("cpu")
    for text, match in (("gpu", "use cpu, cuda or cuda:N"), ("mps", "use cpu, cuda or cuda:N"),
                        ("cuda:x", "use cpu, cuda or cuda:N")):
        with pytest.raises(ValueError, match=rf"--device '{text}': .*{match}"):
            parse_device(text)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available on this machine"):
        parse_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"this machine has 2 CUDA device\(s\)"):
        parse_device("cuda:2")


def test_benchmark_refuses_cuda_without_cuda_at_parse_time(monkeypatch, capsys):
    """benchmark.py checked CUDA's presence only in main (after parsing), with a bare SystemExit message; it now
    shares check_checkpoints' parse-time check (inversion.cli.parse_device)."""
    import torch

    from tests.test_benchmark import load_benchmark

    bench = load_benchmark()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--device", "cuda:0", "--tiny"])
    assert exc.value.code == 2 and "CUDA is not available on this machine" in capsys.readouterr().err


def test_a_misspelt_option_is_not_taken_as_a_longer_one_it_prefixes(tmp_path, capsys):
    """argparse's prefix matching took --checkpoint_ever for --checkpoint_every and train.py's --trainer.max_step
    for --trainer.max_steps: a misspelling could silently set another option."""
    import train

    with pytest.raises(SystemExit):
        attack.build_parser().parse_args(["--config", str(ROOT / "configs/attack/fashion_mnist.yaml"),
                                          "--checkpoint_ever", "2"])
    assert "unrecognized arguments: --checkpoint_ever" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--config", str(ROOT / "configs/train/evaluator_fashion_mnist.yaml"), "--trainer.max_step", "3",
                    "--print_config"])
    assert "unrecognized arguments: --trainer.max_step" in capsys.readouterr().err


@needs_fmnist
@pytest.mark.parametrize("arg, hint", [("--attack.init_args.step", "did you mean 'steps'?"),
                                       ("--users.init_args.batchsize", "did you mean 'batch_size'?"),
                                       ("--attack.init_args.zzz", None)])
def test_a_misspelt_init_argument_gets_a_suggestion(tmp_path, capsys, arg, hint):
    with pytest.raises(SystemExit):
        attack.main(["--config", str(tiny_config(tmp_path)), arg, "5"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is not accepted" in err and (hint in err if hint else "did you mean" not in err)


def test_train_py_names_a_model_or_data_option_the_class_does_not_take_in_one_line(capsys):
    """train.py printed jsonargparse's Union-subtype dump ending in 'Given value: NestedArg(key='lrr', ...)'."""
    import train
    from inversion.cli import clarify_subclass_error

    with pytest.raises(SystemExit):
        train.main(["--config", str(ROOT / "configs/train/evaluator_fashion_mnist.yaml"), "--model.init_args.lrr", "0.1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: model (ImageClassifier): Option 'lrr' is not accepted (did you mean 'lr'?)"
    assert not any("NestedArg" in line or "NoneType" in line for line in err)
    assert clarify_subclass_error('Parser key "trainer.max_steps": Expected int') == 'Parser key "trainer.max_steps": Expected int'


def test_a_problem_jsonargparse_reports_once_per_union_member_is_one_line():
    from inversion.cli import clarify_subclass_error

    msg = ('Parser key "trainer.logger":\n  Errors:\n'
           "    - Problem with given class_path 'lightning.pytorch.loggers.WandbLogger':\n"
           "        Option 'projct' is not accepted\n"
           "    - Problem with given class_path 'lightning.pytorch.loggers.WandbLogger':\n"
           "        Option 'projct' is not accepted\n  Given value type: <class 'str'>")
    assert clarify_subclass_error(msg) == ("trainer.logger (WandbLogger): Option 'projct' is not accepted "
                                           "(did you mean 'project'?)")


def test_train_py_names_a_missing_warm_start_and_a_config_file_copied_away_in_one_line(tmp_path, capsys):
    """A missing model.init_args.init_weights folder and a config copied out of configs/train/ (its ../model/*.yaml
    gone) printed jsonargparse's Union dumps ('Expected a <class 'NoneType'>', 'Unexpected import path format')."""
    import shutil

    import train
    from inversion.cli import run_main

    cfg = ROOT / "configs/train/victim_fashion_mnist_finetune.yaml"
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: train.main(["--config", str(cfg), "--model.init_args.init_weights", str(tmp_path / "gone"),
                                     "--trainer.default_root_dir", str(tmp_path / "runs")]), "train.py")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"train.py: error: ImageClassifier: classifier checkpoint {tmp_path / 'gone'} not found"), err
    assert "NoneType" not in err and "Union" not in err

    copied = tmp_path / "victim.yaml"
    shutil.copy(ROOT / "configs/train/victim_fashion_mnist.yaml", copied)
    with pytest.raises(SystemExit):
        train.main(["--config", str(copied)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model: the config file ../model/victim_resnet18.yaml was not found. A relative path "
                          "resolves from the current folder on the command line and from the naming file's own folder "
                          "inside a config file"), err
    # a mistyped class is not a missing config file (jsonargparse tries every value as a path first)
    with pytest.raises(SystemExit):
        train.main(["--config", str(ROOT / "configs/train/victim_fashion_mnist.yaml"),
                    "--model", "lightning_modules.classifier.ImageClasifier"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "config file" not in err and "ImageClasifier" in err, err


def test_a_misspelt_top_level_option_gets_a_suggestion(capsys):
    """`--trainer.precison` / `--trainer.max_stepz` gave "unrecognized arguments" alone (attack.py, train.py); the
    closest known option is suggested now (attack.py's trainer options, added lazily, come from Trainer's
    signature less the ones the attack sets itself)."""
    import train

    REPO = Path(__file__).resolve().parents[1]

    with pytest.raises(SystemExit):
        attack.main(["--config", str(REPO / "configs/attack/fashion_mnist.yaml"), "--trainer.precison", "32-true"])
    assert "(--trainer.precison: did you mean --trainer.precision?)" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit):
        train.main(["--config", str(REPO / "configs/train/evaluator_fashion_mnist.yaml"), "--trainer.max_stepz=3"])
    assert "(--trainer.max_stepz: did you mean --trainer.max_steps?)" in " ".join(capsys.readouterr().err.split())
