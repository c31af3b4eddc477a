"""sweep.py on a tiny setup (tiny victim/evaluator/DDPM, real Fashion-MNIST users) and the report's privacy curve
and run_name grouping on fake run directories."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import attack
import sweep
from inversion import report
from tests.helpers import save_tiny_assets

try:
    from datamodules.fashion_mnist import find_fashion_mnist_root

    find_fashion_mnist_root(download=False)
    HAVE_FMNIST = True
except Exception:  # noqa: BLE001
    HAVE_FMNIST = False

ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(not HAVE_FMNIST, reason="needs `apt-get install dataset-fashion-mnist`")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny attack config (2 users, B 3, 8x8 images, 3 steps, no logger)."""
    return write_tiny_base(tmp_path_factory.mktemp("tiny"))


def write_tiny_base(root: Path) -> Path:
    """``root/tiny.yaml``, the config of :func:`tiny_base`, and its tiny models under ``root/assets``."""
    assets = save_tiny_assets(root / "assets", size=8)
    cfg = {
        "seed": 0,
        "users": {"class_path": "FashionMNISTUsers", "init_args": {"num_users": 2, "batch_size": 3, "image_size": 8}},
        "victim": {"checkpoint": assets["victim"]},
        "prior": {"path": assets["prior"]},
        "attack": {"class_path": "UserLevelInversion",
                   "init_args": {"steps": 3, "t_max": 300, "t_min": 10, "t_final": 20, "denoise_steps": 2}},
        "evaluation": {"evaluator": assets["evaluator"], "lpips": False},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "enable_model_summary": False},
        "logger": {"backend": "none"},
        "output": {"root": str(root / "unused_runs"), "name": "tiny"},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_sweep(path: Path, base: Path, grid: dict, **extra) -> Path:
    cfg = {"name": "tiny_sweep", "root": str(path.parent / "sweep_dir"), "base": str(base), "grid": grid, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------------------ sweep.py
@needs_data
def test_sweep_runs_skips_finished_and_resumes_unfinished(tmp_path, tiny_base, monkeypatch, capsys):
    cfg = write_sweep(tmp_path / "s.yaml", tiny_base, {"users.init_args.batch_size": [2, 3]},
                      fixed={"attack.init_args.steps": 3})
    sweep_dir = tmp_path / "sweep_dir"
    real_main = attack.main
    calls: list[list[str]] = []

    def counting(argv):
        calls.append(list(argv))
        return real_main(argv)

    monkeypatch.setattr(attack, "main", counting)
    assert sweep.main(["--config", str(cfg)]) == 0
    assert len(calls) == 2
    assert all("--logger.group" in a and a[a.index("--logger.group") + 1] == "tiny_sweep" for a in calls)
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    index = json.loads((sweep_dir / "index.json").read_text())
    slugs = ["batch_size=2", "batch_size=3"]
    assert meta["cells"] == slugs and list(index["cells"]) == slugs
    for slug, b in zip(slugs, (2, 3)):
        e = index["cells"][slug]
        run = Path(e["run_dir"])
        assert e["status"] == "finished" and run.parent == sweep_dir / "cells" and run.name.startswith(slug + "-")
        assert json.loads((run / "summary.json").read_text())["status"] == "finished"
        rows = pd.read_csv(run / "results.csv")
        assert set(rows["B"]) == {b} and len(rows) == 2
    s = pd.read_csv(sweep_dir / "report" / "summary.csv")
    assert sorted(s["B"]) == [2, 3] and set(s["n_users"]) == {2}
    assert not list(sweep_dir.rglob("*.tmp"))
    out = capsys.readouterr().out
    assert "[sweep] 1/2 batch_size=2: finished" in out and "[sweep] 2/2 batch_size=3: finished" in out

    # re-running the same sweep: nothing runs again; the report goes to a new folder
    assert sweep.main(["--config", str(cfg)]) == 0
    assert len(calls) == 2
    assert "skipped" in capsys.readouterr().out
    assert (sweep_dir / "report-1" / "summary.csv").is_file()

    # an unfinished cell (interrupted run, and a run dir without summary.json: a hard kill) is resumed in its run
    # dir (attack.py --resume: every user is done, so it only writes the summary)
    first = Path(index["cells"]["batch_size=2"]["run_dir"])
    second = Path(index["cells"]["batch_size=3"]["run_dir"])
    summary = json.loads((first / "summary.json").read_text())
    (first / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    (second / "summary.json").unlink()
    assert sweep.main(["--config", str(cfg), "--no-report"]) == 0
    assert len(calls) == 4
    assert [a[a.index("--resume") + 1] for a in calls[2:]] == [str(first), str(second)]
    index2 = json.loads((sweep_dir / "index.json").read_text())
    for slug, old in zip(slugs, (first, second)):
        e = index2["cells"][slug]
        assert e["status"] == "finished" and Path(e["run_dir"]) == old and e["resumed"]
        assert not e.get("previous_run_dirs") and len(pd.read_csv(old / "results.csv")) == 2
    assert len(list((sweep_dir / "cells").iterdir())) == 2

    # --fresh (alias --no-resume): the old behaviour, a new run dir; the old one is kept and listed
    (first / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    assert sweep.main(["--config", str(cfg), "--no-report", "--no-resume"]) == 0
    assert len(calls) == 5 and "--resume" not in calls[-1]
    e = json.loads((sweep_dir / "index.json").read_text())["cells"]["batch_size=2"]
    assert e["status"] == "finished" and Path(e["run_dir"]) != first and e["previous_run_dirs"] == [str(first)]
    assert first.is_dir()  # the old run dir is kept
    assert "--fresh: " + first.name in capsys.readouterr().out


@needs_data
def test_rerun_resumes_the_interrupted_cell_and_skips_its_finished_users(tmp_path, tiny_base, monkeypatch, capsys):
    """Ctrl-C in the second user of the first cell (checkpoint_every 2, at step 3): re-running the sweep continues
    that cell in the same run dir with attack.py --resume (user 0 is not attacked again, user 1 continues from its
    step-2 checkpoint), then runs the cell the Ctrl-C never reached. The sweep started the cell again in a new run
    dir and attacked user 0 again."""
    from tests.helpers import interrupt_user_at

    cfg = write_sweep(tmp_path / "s.yaml", tiny_base, {"seed": [0, 1]},
                      fixed={"attack.init_args.steps": 4, "checkpoint_every": 2})
    sweep_dir = tmp_path / "sweep_dir"
    spy = interrupt_user_at(monkeypatch, "user_0001/", 3)  # Ctrl-C in the middle of the second user's attack
    assert sweep.main(["--config", str(cfg)]) == 130
    (run_dir,) = (sweep_dir / "cells").iterdir()
    index = json.loads((sweep_dir / "index.json").read_text())
    assert index["cells"]["seed=0"]["status"] == "interrupted" and index["cells"]["seed=0"]["run_dir"] == str(run_dir)
    assert "seed=1" not in index["cells"] and index["interrupted"]
    first = pd.read_csv(run_dir / "results.csv")
    assert list(first["user"]) == [0]
    assert (run_dir / "checkpoints" / "user_0001" / "last.ckpt").is_file()
    assert f"the interrupted cell resumes in {run_dir}" in capsys.readouterr().out
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert sweep.main(["--config", str(cfg), "--dry-run"]) == 0
    assert f"seed=0: resume {run_dir} (was interrupted)" in out.getvalue()
    assert f"--resume {run_dir}" in out.getvalue()

    spy.calls.clear()
    spy.at = None
    assert sweep.main(["--config", str(cfg)]) == 0
    # cell seed=0: user 0 skipped, user 1 from its checkpoint at step 2; cell seed=1: both users, every step
    assert spy.calls[:2] == [("user_0001/", 2), ("user_0001/", 3)]
    assert spy.calls[2:] == [(f"user_000{u}/", s) for u in (0, 1) for s in range(4)]
    out = capsys.readouterr().out
    assert f"[sweep] 1/2 seed=0: resuming {run_dir} (was interrupted; its finished users are kept)" in out
    index = json.loads((sweep_dir / "index.json").read_text())
    e = index["cells"]["seed=0"]
    assert e["run_dir"] == str(run_dir) and e["status"] == "finished" and e["resumed"]
    assert not e.get("previous_run_dirs") and index["cells"]["seed=1"]["status"] == "finished"
    assert len(list((sweep_dir / "cells").iterdir())) == 2  # no second run dir for seed=0
    rows = pd.read_csv(run_dir / "results.csv")
    assert list(rows["user"]) == [0, 1] and list(rows["steps"]) == [4, 4]
    pd.testing.assert_series_equal(rows.iloc[0], first.iloc[0], check_names=False)  # user 0's row as it was
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert not (run_dir / "checkpoints" / "user_0001").exists()
    assert set(pd.read_csv(sweep_dir / "report" / "summary.csv")["n_users"]) == {2}


def _config_runner(calls: list):
    """Stands in for attack.main and writes what --resume checks: attack.py's config.yaml and attack_seed.txt of the
    cell (a new run dir, or the --resume one), a one-row results.csv and summary.json status finished."""
    def runner(argv):
        calls.append(list(argv))
        parser = attack.build_parser()
        cfg = parser.parse_args(argv)
        if cfg.resume:
            run = attack.open_resume_dir(parser, cfg)[0]
        else:
            run = attack.new_run_dir(cfg.output.root, cfg.output.name)
            (run / "config.yaml").write_text(attack.dump_config(parser, cfg))
            seed = attack.effective_attack_seed((cfg.attack.init_args or {}).get("seed") or 0, cfg.seed)
            (run / attack.ATTACK_SEED_FILE).write_text(f"{seed}\n")
        (run / "results.csv").write_text("user,method,B,psnr_nearest\n0,m,3,12.5\n")
        (run / "summary.json").write_text(json.dumps({"status": "finished"}))
        return run
    return runner


@needs_data
@pytest.mark.slow
def test_a_multi_process_cell_runs_as_a_child_attack_py(tmp_path, tiny_base):
    """A cell with several devices (strategy auto: sharded as ddp) ran inside sweep.py, whose command line
    Lightning's launcher re-ran for the second rank: that rank ran the sweep and met its lock. It now runs as a
    child `python attack.py`, which finds its run directory and both processes' users."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cfg = write_sweep(tmp_path / "s.yaml", tiny_base, {"seed": [0]}, fixed={"trainer.devices": 2})
    out = subprocess.run([sys.executable, str(ROOT / "sweep.py"), "--config", str(cfg), "--no-report"], env=env,
                         capture_output=True, text=True, timeout=300)  # as a user runs it (the launcher re-runs argv)
    assert out.returncode == 0, out.stderr[-3000:]
    index = json.loads((tmp_path / "sweep_dir" / "index.json").read_text())
    (entry,) = index["cells"].values()
    run_dir = Path(entry["run_dir"])
    assert entry["status"] == "finished" and run_dir.parent == tmp_path / "sweep_dir" / "cells"
    assert json.loads((run_dir / "summary.json").read_text())["processes"] == 2
    assert len(list(csv_rows(run_dir))) == 2


def csv_rows(run_dir: Path) -> list[dict]:
    import csv

    return list(csv.DictReader((run_dir / "results.csv").open()))


def test_unfinished_cells_resume_or_start_again_by_status(tmp_path, tiny_base, capsys):
    """The policy for a cell's newest run dir: interrupted, failed and stopped hard (no summary.json) are resumed in
    place; diverged starts again in a new run dir; a resume attack.py refuses (its config.yaml differs from the
    cell's) falls back to a new run dir with a note; a newer folder without config.yaml (killed before the attack
    began) is passed over. index.json points at the run dir in use, and lists replaced ones."""
    cfg = write_sweep(tmp_path / "s.yaml", tiny_base, {"seed": [0, 1, 2, 3, 4]})
    s = sweep.load_sweep(cfg)
    calls: list[list[str]] = []
    idx = sweep.run_sweep(s, runner=_config_runner(calls), report=False)
    old = {slug: Path(e["run_dir"]) for slug, e in idx["cells"].items()}
    assert len(calls) == 5 and all(e["status"] == "finished" for e in idx["cells"].values())

    def set_status(slug, status):
        (old[slug] / "summary.json").write_text(json.dumps({"status": status, "run_dir": str(old[slug])}))

    set_status("seed=0", "interrupted")
    set_status("seed=1", "failed: OutOfMemoryError: CUDA out of memory")
    set_status("seed=2", "diverged: attack diverged at step 5: the image gradient is NaN or inf.")
    (old["seed=3"] / "summary.json").unlink()  # SIGKILL / a scheduler's time limit: no summary at all
    set_status("seed=4", "interrupted")
    stored = yaml.safe_load((old["seed=4"] / "config.yaml").read_text())
    stored["attack"]["init_args"]["steps"] = 99  # attack.py would refuse this resume
    (old["seed=4"] / "config.yaml").write_text(yaml.safe_dump(stored))
    (old["seed=0"].parent / "seed=0-29991231-235959-abcdef").mkdir()  # newest, but the attack never began
    capsys.readouterr()

    sweep.dry_run(s, new=False)
    out = capsys.readouterr().out
    assert f"seed=0: resume {old['seed=0']} (was interrupted)" in out
    assert f"seed=1: resume {old['seed=1']} (was failed: OutOfMemoryError" in out
    assert f"seed=2: run ({old['seed=2'].name} diverged: attack diverged at step 5" in out
    assert f"seed=3: resume {old['seed=3']} (was no summary.json: stopped hard)" in out
    assert f"seed=4: run (cannot resume {old['seed=4'].name}: resume directory from another config (differs in " \
        "['attack.init_args.steps']); starting in a new run directory" in out

    calls.clear()
    idx = sweep.run_sweep(s, runner=_config_runner(calls), report=False)
    resumed = {a[a.index("--output.name") + 1]: a[a.index("--resume") + 1] if "--resume" in a else None for a in calls}
    assert resumed == {"seed=0": str(old["seed=0"]), "seed=1": str(old["seed=1"]), "seed=2": None,
                       "seed=3": str(old["seed=3"]), "seed=4": None}
    for slug in ("seed=0", "seed=1", "seed=3"):
        e = idx["cells"][slug]
        assert e["status"] == "finished" and e["run_dir"] == str(old[slug]) and e["resumed"]
    for slug in ("seed=2", "seed=4"):
        e = idx["cells"][slug]
        assert e["status"] == "finished" and e["run_dir"] != str(old[slug]) and not e["resumed"]
        assert e["previous_run_dirs"] == [str(old[slug])] and old[slug].is_dir()
    out = capsys.readouterr().out
    assert f"[sweep] 2/5 seed=1: resuming {old['seed=1']} (was failed: OutOfMemoryError" in out
    assert f"[sweep] 3/5 seed=2: {old['seed=2'].name} diverged: " in out and "new run directory" in out
    assert f"[sweep] 5/5 seed=4: cannot resume {old['seed=4'].name}: resume directory from another config" in out

    # a second sweep.py on the same directory while one runs is refused (it would resume the same run dirs)
    with sweep.sweep_lock(tmp_path / "sweep_dir"):
        with pytest.raises(sweep.SweepError, match="in use by another sweep.py"):
            sweep.run_sweep(s, runner=_config_runner(calls), report=False)


def test_unknown_or_bad_keys_fail_before_any_work(tmp_path, tiny_base, monkeypatch, capsys):
    monkeypatch.setattr(attack, "main", lambda argv: pytest.fail("attack.main must not be called"))
    sweep_dir = tmp_path / "sweep_dir"
    cases = [
        ({"thread.defenses": [[]]}, "'thread.defenses'.*valid top-level groups: users, victim, prior, threat, attack"),
        ({"threat.sigma": [0.1]}, "'threat.sigma'.*threat.defenses"),
        ({"attack.init_args.stepz": [3]},
         "'attack.init_args.stepz' = 3: (attack \\(UserLevelInversion\\): )?Option 'stepz' is not accepted"),
        ({"users.init_args.batch_size": []}, "'users.init_args.batch_size' has an empty list"),
        ({"output.name": ["x"]}, "'output.name' is set by the sweep"),
        ({"attack": ["configs/ablation/no_such.yaml"]}, "no_such.yaml.*not found"),
        # the same experiment twice (it ran as batch_size=3 and batch_size=3-1), or values attack.py reads alike
        ({"users.init_args.batch_size": [3, 3]},
         r"s\.yaml: grid key 'users.init_args.batch_size' lists the value 3 twice: .*remove the duplicate"),
        ({"seed": [0, "0"]}, r"cells 'seed=0-\w+' and 'seed=0-\w+' are the same experiment \(grid key 'seed': 0 and "
                             r"'0', which attack.py reads alike\): remove the duplicate value"),
        ({"attack.init_args.lr": [0.001, "1e-3"], "seed": [0, 1]},  # YAML reads 1e-3 as a string
         r"cells 'lr=0.001__seed=0' and 'lr=1e-3__seed=0' are the same experiment \(grid key 'attack.init_args.lr': "
         r"0.001 and '1e-3', which"),
    ]
    for grid, match in cases:
        cfg = write_sweep(tmp_path / "s.yaml", tiny_base, grid)
        with pytest.raises(sweep.SweepError, match=match):
            sweep.validate(sweep.load_sweep(cfg))
        assert sweep.main(["--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sweep.py: error:") and err.count("\n") <= 3
        assert not sweep_dir.exists()
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"name": "x", "base": str(tmp_path / "missing.yaml"), "grid": {"seed": [0]}}))
    with pytest.raises(sweep.SweepError, match="missing.yaml.*not found"):
        sweep.load_sweep(cfg)
    # a valid grid with an unusable value is refused too, naming the key
    cfg = write_sweep(tmp_path / "s.yaml", tiny_base, {"users.init_args.batch_size": [2, "abc"]})
    with pytest.raises(sweep.SweepError, match="batch_size=abc.*key 'users.init_args.batch_size' = 'abc'"):
        sweep.validate(sweep.load_sweep(cfg))
    assert not sweep_dir.exists()


def _fake_runner(argv):
    """Stands in for attack.main: a finished run dir with a one-row results.csv."""
    root = Path(argv[argv.index("--output.root") + 1])
    name = argv[argv.index("--output.name") + 1]
    run = attack.new_run_dir(str(root), name)
    (run / "results.csv").write_text("user,method,B,psnr_nearest\n0,m,3,12.5\n")
    (run / "config.yaml").write_text(yaml.safe_dump({"output": {"name": name}}))
    (run / "summary.json").write_text(json.dumps({"status": "finished"}))
    return run


def test_changed_config_is_refused_unless_new(tmp_path, tiny_base, capsys):
    cfg = write_sweep(tmp_path / "s.yaml", tiny_base, {"seed": [0, 1]})
    s1 = sweep.load_sweep(cfg)
    sweep.validate(s1)
    idx = sweep.run_sweep(s1, runner=_fake_runner, report=False, max_cells=1)
    assert [e["status"] for e in idx["cells"].values()] == ["finished", "pending"]
    idx = sweep.run_sweep(s1, runner=_fake_runner)  # resumes: runs only the second cell, then the report
    assert sum(1 for _ in (tmp_path / "sweep_dir" / "cells").iterdir()) == 2
    assert Path(idx["report"]).name == "report" and (Path(idx["report"]) / "summary.csv").is_file()
    cfg = write_sweep(tmp_path / "s.yaml", tiny_base, {"seed": [0, 2]})
    with pytest.raises(sweep.SweepError, match="resume directory from another config"):
        sweep.run_sweep(sweep.load_sweep(cfg), runner=_fake_runner)
    assert sweep.main(["--config", str(cfg), "--dry-run"]) == 2
    assert "resume directory from another config" in capsys.readouterr().err
    idx = sweep.run_sweep(sweep.load_sweep(cfg), runner=_fake_runner, new=True, report=False)
    assert Path(idx["sweep_dir"]) == tmp_path / "sweep_dir-1"
    assert json.loads((tmp_path / "sweep_dir" / "sweep.json").read_text())["hash"] == s1.hash()


def test_edited_base_config_is_another_sweep(tmp_path, tiny_base):
    """The hash covers the config files' contents: after an edit of the base config (its steps), the finished cells
    are not reused; the sweep directory is refused as made by another config."""
    base = tmp_path / "base.yaml"
    base.write_text(tiny_base.read_text())
    cfg = write_sweep(tmp_path / "s.yaml", base, {"seed": [0]})
    s1 = sweep.load_sweep(cfg)
    h1 = s1.hash()
    sweep.run_sweep(s1, runner=_fake_runner, report=False)
    assert sweep.load_sweep(cfg).hash() == h1  # unchanged files: the same sweep, resumable
    base.write_text("# a comment added while the sweep runs\n" + tiny_base.read_text())
    assert sweep.load_sweep(cfg).hash() == h1  # comments and layout are not the config (the bytes were hashed)
    meta = tmp_path / "sweep_dir" / "sweep.json"
    legacy = dict(json.loads(meta.read_text()), hash=sweep.load_sweep(cfg).hash(legacy=True))
    meta.write_text(json.dumps(legacy))  # a sweep directory made when the files' bytes were hashed
    sweep.run_sweep(sweep.load_sweep(cfg), runner=_fake_runner, report=False)  # still resumable
    assert json.loads(meta.read_text())["hash"] == h1  # and re-recorded with the content hash
    base.write_text("# another comment\n" + base.read_text())
    sweep.run_sweep(sweep.load_sweep(cfg), runner=_fake_runner, report=False)  # so a later comment edit resumes too
    base.write_text(tiny_base.read_text().replace("steps: 3", "steps: 4"))
    assert sweep.load_sweep(cfg).hash() != h1
    with pytest.raises(sweep.SweepError, match="resume directory from another config"):
        sweep.run_sweep(sweep.load_sweep(cfg), runner=_fake_runner)


def test_a_config_file_edited_while_the_sweep_runs_stops_it_before_the_next_cell(tmp_path, tiny_base):
    """Each cell hands attack.py the config files' paths: an edit of the base config during a sweep changed the
    cells after it silently (the sweep hash was taken once). Now the sweep stops before the next cell, naming the
    file; index.json is saved with no cell left running and the lock is released. A comment edit does not count
    (the hash is over the parsed content); the restored file lets the same command continue."""
    base = tmp_path / "base.yaml"
    base.write_text(tiny_base.read_text())
    cfg = write_sweep(tmp_path / "s.yaml", base, {"seed": [0, 1, 2]})
    s = sweep.load_sweep(cfg)
    calls: list[list[str]] = []

    def editing(argv):
        calls.append(argv)
        if len(calls) == 1:
            base.write_text("# a comment: not a change\n" + tiny_base.read_text())
        if len(calls) == 2:
            base.write_text(tiny_base.read_text().replace("steps: 3", "steps: 30"))
        return _fake_runner(argv)

    with pytest.raises(sweep.SweepError, match=rf"^config file {base} changed while the sweep ran .*sweep\.json "
                                               r"records.*restore it and run the same command again to continue, or "
                                               r"start a new sweep of the edited config with --new$"):
        sweep.run_sweep(s, runner=editing, report=False)
    assert len(calls) == 2  # seed=2 did not run on the edited file
    sweep_dir = tmp_path / "sweep_dir"
    idx = json.loads((sweep_dir / "index.json").read_text())
    assert {k: e["status"] for k, e in idx["cells"].items()} == {"seed=0": "finished", "seed=1": "finished"}
    assert "changed while the sweep ran" in idx["stopped"]
    with sweep.sweep_lock(sweep_dir):  # released
        pass
    with pytest.raises(sweep.SweepError, match="resume directory from another config"):  # the edited file: refused
        sweep.run_sweep(sweep.load_sweep(cfg), runner=editing, report=False)
    base.write_text(tiny_base.read_text())  # restored: the same sweep continues
    idx = sweep.run_sweep(sweep.load_sweep(cfg), runner=_fake_runner, report=False)
    assert [e["status"] for e in idx["cells"].values()] == ["finished"] * 3 and idx["stopped"] is None


def test_a_copied_sweep_directory_uses_its_own_run_dirs(tmp_path, tiny_base):
    """index.json records absolute run dirs: a copy of a sweep directory skipped its cells as finished in the
    original's run dirs (and reported those). Now a recorded run dir outside the sweep's cells/ is ignored and the
    copy's own cells/ scanned: its finished copies are skipped in place, its unfinished ones run."""
    import shutil

    orig = tmp_path / "orig"
    s = sweep.load_sweep(write_sweep(tmp_path / "s.yaml", tiny_base, {"seed": [0, 1]}, root=str(orig)))
    sweep.run_sweep(s, runner=_fake_runner, report=False)
    before = (orig / "index.json").read_text()
    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)
    (unfinished,) = (copy / "cells").glob("seed=1-*")
    (unfinished / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    calls: list[list[str]] = []
    s2 = sweep.load_sweep(write_sweep(tmp_path / "s2.yaml", tiny_base, {"seed": [0, 1]}, root=str(copy)))
    idx = sweep.run_sweep(s2, runner=lambda argv: calls.append(argv) or _fake_runner(argv))
    assert [a[a.index("--output.name") + 1] for a in calls] == ["seed=1"]  # its own copy of seed=1 is unfinished
    (done,) = (copy / "cells").glob("seed=0-*")
    assert idx["cells"]["seed=0"] == {**idx["cells"]["seed=0"], "status": "finished", "run_dir": str(done)}
    assert all(Path(e["run_dir"]).parent == copy / "cells" for e in idx["cells"].values())
    assert all(str(orig) not in d for e in idx["cells"].values() for d in e.get("previous_run_dirs", []))
    assert (orig / "index.json").read_text() == before


def test_slugs_and_config_values():
    s = sweep.Sweep(name="n", root="r", base="configs/attack/fashion_mnist.yaml", configs=[], fixed={},
                    grid={"attack": [None, "configs/method/dlg.yaml"],
                          "threat.defenses": [[], [{"name": "gaussian_dp", "clip_norm": 1.0, "sigma": 0.01}]]})
    cells = sweep.expand_cells(s)
    assert [c.slug for c in cells] == [
        "attack=base__defenses=none", "attack=base__defenses=gaussian_dp-clip_norm1-sigma0.01",
        "attack=dlg__defenses=none", "attack=dlg__defenses=gaussian_dp-clip_norm1-sigma0.01"]
    argv = cells[3].argv(s, Path("out"))
    assert argv[argv.index("--threat.defenses") + 1] == '[{"name": "gaussian_dp", "clip_norm": 1.0, "sigma": 0.01}]'
    assert [a for a in argv if a.endswith(".yaml")][1].endswith("configs/method/dlg.yaml")


def test_a_configs_mapping_is_an_attack_override_in_grid_and_fixed(tmp_path):
    """``configs`` is the alias of the special key ``attack``; a mapping value under it was passed as ``--configs
    {...}``, which attack.py rejects (unrecognized arguments), in the grid and in fixed alike."""
    dlg = {"class_path": "lightning_modules.baselines.DLG", "init_args": {"steps": 5}}
    s = sweep.Sweep(name="n", root="r", base="configs/attack/fashion_mnist.yaml", configs=[], fixed={},
                    grid={"configs": [None, dlg]})
    cells = sweep.expand_cells(s)
    assert [c.slug for c in cells] == ["configs=base", "configs=DLG"]
    argv = cells[1].argv(s, tmp_path)
    assert "--configs" not in argv and argv[argv.index("--attack") + 1] == json.dumps(dlg)
    cfg = attack.build_parser().parse_args(argv)
    assert cfg.attack.class_path == "lightning_modules.baselines.DLG" and cfg.attack.init_args.steps == 5
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "n", "base": "configs/attack/fashion_mnist.yaml",
                                    "fixed": {"configs": dlg}, "grid": {"seed": [3]}}))
    loaded = sweep.load_sweep(path)
    assert loaded.fixed == {"attack": dlg}
    cfg = attack.build_parser().parse_args(loaded.cells[0].argv(loaded, tmp_path))
    assert cfg.attack.init_args.steps == 5 and cfg.seed == 3


def test_cells_whose_values_print_alike_get_names_that_tell_them_apart():
    """A defense's seed, a class_path mapping's init_args and a config path's folders are left out of a cell's
    name; cells that differ only there were named 'x' and 'x-1' (the report's run_name could not say which is
    which). Now those values are spelled out (or hashed); names that do not collide are kept."""
    def slugs(grid):
        return [c.slug for c in sweep.expand_cells(sweep.Sweep(name="n", root="r", base="b.yaml", configs=[],
                                                               fixed={}, grid=grid))]

    dp = {"name": "gaussian_dp", "clip_norm": 1.0, "sigma": 0.01}
    assert slugs({"seed": [0, 1], "threat.defenses": [[{**dp, "seed": 0}], [{**dp, "seed": 1}], []]}) == [
        "seed=0__defenses=gaussian_dp-clip_norm1-sigma0.01-seed0",
        "seed=0__defenses=gaussian_dp-clip_norm1-sigma0.01-seed1", "seed=0__defenses=none",
        "seed=1__defenses=gaussian_dp-clip_norm1-sigma0.01-seed0",
        "seed=1__defenses=gaussian_dp-clip_norm1-sigma0.01-seed1", "seed=1__defenses=none"]
    assert slugs({"threat.defenses": [[{**dp, "seed": 0}], [{**dp, "sigma": 0.1, "seed": 0}]]}) == [
        "defenses=gaussian_dp-clip_norm1-sigma0.01", "defenses=gaussian_dp-clip_norm1-sigma0.1"]  # no collision
    assert slugs({"attack": [{"class_path": "x.DLG", "init_args": {"steps": 5}},
                             {"class_path": "x.DLG", "init_args": {"steps": 50, "lr": 0.1}},
                             {"class_path": "x.InvertingGradients"}]}) == [
        "attack=DLG-steps5", "attack=DLG-steps50-lr0.1", "attack=InvertingGradients"]
    assert slugs({"attack": ["configs/method/dlg.yaml", "configs/sweep/parts/dlg.yaml", None]}) == [
        "attack=configs_method_dlg", "attack=configs_sweep_parts_dlg", "attack=base"]
    h1, h2 = (sweep._value_hash(v) for v in (1, 1.0))
    assert h1 != h2 and slugs({"attack.init_args.lr": [1, 1.0, 2]}) == [f"lr=1-{h1}", f"lr=1-{h2}", "lr=2"]
    with pytest.raises(sweep.SweepError, match=r"^grid key 'seed' lists the value 3 twice: .*remove the duplicate$"):
        slugs({"seed": [3, 3]})  # the same cell listed twice: it ran twice, as seed=3 and seed=3-1


def test_a_key_given_twice_in_a_sweep_yaml_is_an_error(tmp_path):
    """yaml.safe_load keeps the last of two equal keys: grid {seed: [0, 1], seed: [5]} swept seed 5 alone."""
    path = tmp_path / "s.yaml"
    path.write_text("name: n\nbase: configs/attack/fashion_mnist.yaml\ngrid:\n  seed: [0, 1]\n  seed: [5]\n")
    with pytest.raises(sweep.SweepError, match=r"s\.yaml: key 'seed' is given twice in one mapping \(lines 4 and 5\)"):
        sweep.load_sweep(path)
    path.write_text("name: n\nbase: configs/attack/fashion_mnist.yaml\nname: m\n")
    with pytest.raises(sweep.SweepError, match=r"key 'name' is given twice .*lines 1 and 3"):
        sweep.load_sweep(path)
    # anchors and merge keys still work (a merged key may be overridden)
    path.write_text("name: n\nbase: configs/attack/fashion_mnist.yaml\nfixed:\n"
                    "  <<: {seed: 1, users.init_args.batch_size: 4}\n  seed: 2\n"
                    "grid:\n  users.init_args.num_users: [1]\n")
    assert sweep.load_sweep(path).fixed == {"seed": 2, "users.init_args.batch_size": 4}
    # an anchored mapping that itself merges, nested deeper than a later '<<: *it' (PyYAML flattens it in place, so
    # a check at construction saw its merged keys as repeats): valid YAML, loaded as yaml.safe_load loads it
    text = ("common: &common {name: gaussian_dp, clip_norm: 1.0}\n"
            "grid: {threat.defenses: [[&strong {<<: *common, clip_norm: 2.0, sigma: 0.1}]]}\n"
            "x: {<<: *strong}\n")
    from inversion.cli import unique_key_loader

    assert yaml.load(text, Loader=unique_key_loader()) == yaml.safe_load(text)


def test_fixed_configs_mapping_with_a_grid_attack_mapping_is_refused_like_fixed_attack(tmp_path):
    """fixed.configs (a mapping: the --attack override) was renamed to attack after the fixed-vs-grid check, so with
    grid.attack mappings every cell got two --attack overrides silently; fixed.attack was refused."""
    dlg = {"class_path": "lightning_modules.baselines.DLG", "init_args": {"steps": 5}}
    path = tmp_path / "s.yaml"
    for key in ("attack", "configs"):
        path.write_text(yaml.safe_dump({"name": "n", "base": "configs/attack/fashion_mnist.yaml",
                                        "fixed": {key: dlg}, "grid": {"attack": [dlg]}}))
        with pytest.raises(sweep.SweepError, match=r"\['attack'\] are both fixed and in the grid"):
            sweep.load_sweep(path)


# ------------------------------------------------------------------------------------------------ report
def _fake_run(root: Path, name: str, method: str, defense: str, strength: float, rng, users: int = 4) -> pd.DataFrame:
    run = root / f"{name}-20240101-000000-{rng.integers(0, 1 << 24):06x}"
    rows = [{"user": u, "method": method, "B": 10, "dominant_class": u, "inferred_dominant": u,
             "evaluator_correct": int(rng.integers(0, 2)), "evaluator_prob": rng.uniform(0.2, 1),
             "psnr_nearest": rng.uniform(8, 20), "lpips_nearest": rng.uniform(0.1, 0.6),
             "defense": defense, "defense_strength": strength, "protocol": "fedsgd", "victim_init": "trained"}
            for u in range(users)]
    df = pd.DataFrame(rows)
    (run / "users" / "user_0000").mkdir(parents=True)
    df.to_csv(run / "results.csv", index=False)
    (run / "config.yaml").write_text(yaml.safe_dump({"output": {"name": name}}))
    Image.fromarray(rng.integers(0, 255, (10, 40, 3), dtype=np.uint8)).save(run / "users" / "user_0000" / "grid.png")
    df["run_dir"] = str(run)
    return df


def test_report_privacy_curve_values_and_figure(tmp_path):
    rng = np.random.default_rng(0)
    frames, dirs = [], []
    for method in ("UserLevelInversion", "DLG"):
        for sigma in (None, 1e-3, 1e-2, 1e-1):
            defense = "none" if sigma is None else f"gaussian_dp(clip_norm=1.0,sigma={sigma})"
            name = f"{method}_{'none' if sigma is None else sigma}"
            df = _fake_run(tmp_path / "runs", name, method, defense, np.nan if sigma is None else sigma, rng)
            frames.append(df)
            dirs.append(df["run_dir"].iloc[0])
    # a second seed of one cell: pooled in privacy.csv, its own row (run_name) in summary.csv
    df = _fake_run(tmp_path / "runs", "UserLevelInversion_0.01_seed1", "UserLevelInversion",
                   "gaussian_dp(clip_norm=1.0,sigma=0.01)", 0.01, rng)
    frames.append(df)
    dirs.append(df["run_dir"].iloc[0])
    truth = pd.concat(frames, ignore_index=True)
    (tmp_path / "runs" / Path(dirs[0]).name / "results.csv").write_text(  # an old run without defense columns
        truth[truth["run_dir"] == dirs[0]].drop(columns=["defense", "defense_strength", "run_dir"]).to_csv(index=False))
    out = report.build_report(dirs, tmp_path / "rep")
    fig = out / "privacy_curve.png"
    assert fig.is_file() and fig.stat().st_size > 5000
    assert np.asarray(Image.open(fig).convert("L")).std() > 5
    p = pd.read_csv(out / "privacy.csv")
    assert list(p.columns[:4]) == ["method", "B", "defense", "defense_strength"] and len(p) == 8
    truth["key"] = truth["defense_strength"].fillna(-1)
    for (method, strength), g in truth.groupby(["method", "key"]):
        r = p[(p["method"] == method) & (p["defense_strength"].fillna(-1) == strength)]
        assert len(r) == 1
        r = r.iloc[0]
        assert r["defense"] == g["defense"].iloc[0] and r["n_users"] == len(g)
        assert r["evaluator_accuracy"] == pytest.approx(g["evaluator_correct"].mean())
        assert r["lpips_nearest_avg"] == pytest.approx(g["lpips_nearest"].mean())
        assert r["psnr_nearest_std"] == pytest.approx(g["psnr_nearest"].std(ddof=1))
    assert p.loc[p["method"] == "DLG", "defense"].iloc[0] == "none"  # 'none' first (left of the curve)
    s = pd.read_csv(out / "summary.csv")
    assert list(s.columns[:5]) == ["method", "B", "defense", "defense_strength", "run_name"] and len(s) == 9
    assert "protocol" not in s.columns  # same for every run: not a group key
    md = (out / "summary.md").read_text()
    assert "privacy_curve.png" in md and "## Privacy" in md


def test_report_ablation_table_by_run_name(tmp_path):
    rng = np.random.default_rng(1)
    frames, dirs = [], []
    for name in ("full", "ablation_no_prior", "ablation_no_window", "full"):  # two runs of 'full' are pooled
        df = _fake_run(tmp_path / "runs", name, "UserLevelInversion", "none", np.nan, rng, users=3)
        frames.append(df)
        dirs.append(df["run_dir"].iloc[0])
    truth = pd.concat(frames, ignore_index=True)
    truth["run_name"] = [Path(d).name.rsplit("-", 3)[0] for d in truth["run_dir"]]
    out = report.build_report(dirs, tmp_path / "rep")
    s = pd.read_csv(out / "summary.csv")
    assert list(s.columns[:3]) == ["method", "B", "run_name"] and "defense" not in s.columns
    assert sorted(s["run_name"]) == ["ablation_no_prior", "ablation_no_window", "full"]
    for name, g in truth.groupby("run_name"):
        r = s[s["run_name"] == name].iloc[0]
        assert r["n_users"] == len(g) and r["psnr_nearest_avg"] == pytest.approx(g["psnr_nearest"].mean())
    assert not (out / "privacy.csv").exists() and not (out / "privacy_curve.png").exists()
    assert "| UserLevelInversion | 10 | full | 6 |" in (out / "summary.md").read_text()


SHIPPED_SWEEPS = sorted((Path(__file__).resolve().parents[1] / "configs" / "sweep").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_SWEEPS, ids=[p.name for p in SHIPPED_SWEEPS])
def test_every_shipped_sweep_config_validates(path, capsys, tmp_path):
    """Each configs/sweep/*.yaml (and the attack, ablation, method and extension configs it layers) parses with
    attack.py's parser in every cell: a renamed option breaks this test, not a GPU session. (A fresh root: a
    checkout's own runs/sweeps/<name> from an older version of the config is refused, rightly.)"""
    assert sweep.main(["--config", str(path), "--dry-run", "--root", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    assert out.count(": run") >= 2  # every shipped sweep has at least two cells


@pytest.mark.parametrize("overlay", sorted(p.relative_to(p.parents[2]).as_posix() for d in ("ablation", "extension", "method", "threat")
                                           for p in (Path(__file__).resolve().parents[1] / "configs" / d).glob("*.yaml")))
def test_every_overlay_parses_over_the_full_attack_config(overlay):
    """Each overlay changes exactly what it is named for relative to configs/attack/fashion_mnist_full.yaml: its run
    name, the attack options of its ablation/extension (every other option of the full config kept), or, for a
    baseline, the attack class with that class's options only (none of the user-level attack's leaks in)."""
    root = Path(__file__).resolve().parents[1]
    parser = attack.build_parser()
    base = parser.parse_args(["--config", str(root / "configs/attack/fashion_mnist_full.yaml")])
    cfg = parser.parse_args(["--config", str(root / "configs/attack/fashion_mnist_full.yaml"),
                             "--config", str(root / overlay)])
    assert cfg.output.name != "fashion_mnist_full"  # each overlay names its runs
    assert overlay in OVERLAY_CHANGES, f"{overlay}: add what it is meant to change to OVERLAY_CHANGES"
    name, attack_changes, other_changes = OVERLAY_CHANGES[overlay]
    assert cfg.output.name == name

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    b, c = flat(base.as_dict()), flat(cfg.as_dict())
    for d in (b, c):
        d.pop("config")  # the list of --config files
    outside = {k for k in b.keys() | c.keys() if not k.startswith("attack.")}
    changed = {k: c.get(k, "<absent>") for k in outside if b.get(k, "<absent>") != c.get(k, "<absent>")}
    assert changed == {"output.name": name, **other_changes}
    if "class_path" in attack_changes:  # a baseline: its class and exactly its options
        assert cfg.attack.class_path == attack_changes["class_path"]
        assert cfg.attack.init_args.as_dict() == attack_changes["init_args"]
    else:
        assert cfg.attack.class_path == base.attack.class_path
        a, o = base.attack.init_args.as_dict(), cfg.attack.init_args.as_dict()
        assert set(a) == set(o)
        assert {k: o[k] for k in o if o[k] != a[k]} == attack_changes


OVERLAY_CHANGES = {  # overlay: (output.name, attack changes, changes outside attack/output.name)
    "configs/ablation/no_anneal.yaml": ("ablation_no_anneal", {"anneal_t": False}, {}),
    "configs/ablation/no_clipping.yaml": ("ablation_no_clipping", {"use_clipping": False}, {}),
    "configs/ablation/no_denoise.yaml": ("ablation_no_denoise", {"final_denoise": False}, {}),
    "configs/ablation/no_prior.yaml": ("ablation_no_prior", {"use_prior": False}, {}),
    "configs/ablation/no_window.yaml": ("ablation_no_window", {"use_window": False}, {}),
    # selection_output_weight 1.0 is set in the overlay too but is already the default (no change)
    "configs/extension/final_selection.yaml": ("extension_final_selection", {"final_candidates": 32, "t_final": 400},
                                               {}),
    "configs/extension/final_selection_full.yaml": ("extension_final_selection_full",
                                                    {"final_candidates": 32, "t_final": 600}, {}),
    "configs/extension/output_matching.yaml": ("extension_output_matching", {"output_weight": 1.0}, {}),
    "configs/method/dlg.yaml": ("dlg", {"class_path": "lightning_modules.baselines.DLG", "init_args": {
        "steps": 300, "lr": 1.0, "max_iter": 20, "history_size": 100, "line_search_fn": None,
        "label_strategy": "optimize", "seed": 0, "log_images_every": 0}}, {}),
    "configs/method/idlg.yaml": ("idlg", {"class_path": "lightning_modules.baselines.iDLG", "init_args": {
        "steps": 300, "lr": 1.0, "max_iter": 20, "history_size": 100, "line_search_fn": None,
        "label_strategy": "idlg", "seed": 0, "log_images_every": 0}}, {"users.init_args.batch_size": 1}),
    "configs/method/inverting_gradients.yaml": ("inverting_gradients", {
        "class_path": "lightning_modules.baselines.InvertingGradients", "init_args": {
            "steps": 4000, "lr": 0.1, "tv_weight": 0.01, "restarts": 1, "signed": True, "boxed": True,
            "lr_decay": True, "label_strategy": "bias_corrected", "seed": 0, "log_images_every": 0}}, {}),
    "configs/threat/fedavg.yaml": ("fedavg", {}, {"threat.protocol": "fedavg", "threat.fedavg_epochs": 2,
                                                  "threat.fedavg_batch_size": 5, "threat.fedavg_shuffle": True}),
}


def test_privacy_table_keeps_victims_apart(tmp_path):
    """A trained victim (every user read as the class) and a random one (none), each undefended and at sigma 0.01:
    privacy.csv has four rows at accuracy 1.0 / 0.0 (it pooled the two victims into two rows at 0.5), and the curve
    is drawn."""
    rng = np.random.default_rng(0)
    dirs = []
    for victim, ok in (("trained", 1), ("random", 0)):
        for sigma in (None, 0.01):
            defense = "none" if sigma is None else f"gaussian_dp(clip_norm=1.0,sigma={sigma})"
            df = _fake_run(tmp_path / "runs", f"{victim}_{sigma}", "UserLevelInversion", defense,
                           np.nan if sigma is None else sigma, rng, users=3)
            df["victim_init"], df["evaluator_correct"] = victim, ok
            df.drop(columns=["run_dir"]).to_csv(Path(df["run_dir"].iloc[0]) / "results.csv", index=False)
            dirs.append(df["run_dir"].iloc[0])
    out = report.build_report(dirs, tmp_path / "rep")
    p = pd.read_csv(out / "privacy.csv")
    assert len(p) == 4 and set(p["n_users"]) == {3}
    acc = {(r.victim_init, r.defense == "none"): r.evaluator_accuracy for r in p.itertuples()}
    assert acc == {("trained", True): 1.0, ("trained", False): 1.0, ("random", True): 0.0, ("random", False): 0.0}
    assert (out / "privacy_curve.png").stat().st_size > 5000


def test_quiet_sends_lightning_logging_to_the_cell_log(tmp_path, tiny_base, capfd):
    """--quiet: what a logger writes through a handler bound to the terminal's stderr (as Lightning's own handler
    is, installed at import outside pytest) goes to <sweep>/logs/<slug>.log with the rest, not to the terminal; the
    handler is restored afterwards."""
    import logging
    import sys

    lg = logging.getLogger("lightning_like_for_test")
    handler = logging.StreamHandler(sys.__stderr__)  # what Lightning does when the root logger has no handlers
    lg.addHandler(handler)
    lg.propagate = False
    handlers, before = [handler], [sys.__stderr__]

    def chatty(argv):
        lg.warning("GPU available: False, used: False (from a cell)")
        return _fake_runner(argv)

    cfg = write_sweep(tmp_path / "s.yaml", tiny_base, {"seed": [0]})
    capfd.readouterr()
    sweep.run_sweep(sweep.load_sweep(cfg), runner=chatty, report=False, quiet=True)
    out, err = capfd.readouterr()
    assert "from a cell" not in err and "from a cell" not in out
    assert "from a cell" in (tmp_path / "sweep_dir" / "logs" / "seed=0.log").read_text()
    assert [h.stream for h in handlers] == before
    lg.removeHandler(handler)


def test_privacy_table_keeps_an_ablation_apart_from_the_sweeps_undefended_point(tmp_path):
    """An ablation run (prior off, undefended) beside a DP sweep of the full attack: its users are not pooled into the
    sweep's 'none' point (they were: method, B and defense agree), while the sweep's cells, whose configs differ only
    in defenses, seeds, user range and output, share one setting."""
    rng = np.random.default_rng(2)
    base = {"attack": {"class_path": "UserLevelInversion", "init_args": {"use_prior": True, "steps": 300}},
            "users": {"init_args": {"batch_size": 10, "first_user": 0, "num_users": 3}}}
    dirs = []
    cells = [("full_none", None, True, 0, 1), ("full_none_half2", None, True, 3, 1), ("full_dp", 0.01, True, 0, 0),
             ("no_prior", None, False, 0, 0)]
    for name, sigma, prior, first, correct in cells:
        defense = "none" if sigma is None else f"gaussian_dp(clip_norm=1.0,sigma={sigma})"
        df = _fake_run(tmp_path / "runs", name, "UserLevelInversion", defense, np.nan if sigma is None else sigma, rng,
                       users=3)
        df["evaluator_correct"] = correct
        run = Path(df["run_dir"].iloc[0])
        df.drop(columns=["run_dir"]).to_csv(run / "results.csv", index=False)
        cfg = yaml.safe_load(yaml.safe_dump(base))
        cfg["attack"]["init_args"]["use_prior"] = prior
        cfg["users"]["init_args"]["first_user"] = first
        cfg.update(output={"name": name, "root": "runs"}, seed=first,
                   threat={"protocol": "fedsgd", "defenses": [] if sigma is None else
                           [{"name": "gaussian_dp", "clip_norm": 1.0, "sigma": sigma, "seed": 0}]})
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        dirs.append(run)
    settings = {report.setting_of(d) for d in dirs}
    assert len(settings) == 2 and report.setting_of(dirs[0]) == report.setting_of(dirs[2])
    out = report.build_report(dirs, tmp_path / "rep")
    p = pd.read_csv(out / "privacy.csv")
    assert len(p) == 3 and "setting" in p.columns
    none_full = p[(p["defense"] == "none") & (p["setting"] == report.setting_of(dirs[0]))].iloc[0]
    assert none_full["n_users"] == 6 and none_full["evaluator_accuracy"] == 1.0  # both halves, no ablation users
    ablation = p[p["setting"] == report.setting_of(dirs[3])].iloc[0]
    assert ablation["n_users"] == 3 and ablation["evaluator_accuracy"] == 0.0
    assert (out / "privacy_curve.png").stat().st_size > 5000


def test_defense_kind_keeps_every_setting_but_the_strength():
    kind = report._defense_kind
    assert kind("gaussian_dp(clip_norm=1.0,sigma=0.01)") == "gaussian_dp(clip_norm=1.0)"
    assert kind("gaussian_dp(clip_norm=0.1,sigma=0.01)") != kind("gaussian_dp(clip_norm=1.0,sigma=0.1)")
    assert kind("sign_compression()+gaussian_dp(clip_norm=1.0,sigma=0.1)") == \
        "sign_compression()+gaussian_dp(clip_norm=1.0)"  # the strength is the first defense that has one
    assert kind("topk_pruning(keep_fraction=0.1)+quantize(levels=4)") == "topk_pruning()+quantize(levels=4)"
    assert kind("none") == "none"
    label, strength = attack.defense_label([{"name": "gaussian_dp", "clip_norm": 1.0, "sigma": 0.01, "seed": 0}])
    assert (kind(label), strength) == ("gaussian_dp(clip_norm=1.0)", 0.01)


def test_variants_defense_strength_alone(tmp_path):
    """--variants defense_strength (without defense) sorted by a column the table lacks: KeyError 'defense'."""
    rng = np.random.default_rng(3)
    dirs = [_fake_run(tmp_path / "runs", f"dp_{s}", "UserLevelInversion", f"gaussian_dp(clip_norm=1.0,sigma={s})", s,
                      rng)["run_dir"].iloc[0] for s in (0.1, 0.01)]
    out = report.build_report(dirs, tmp_path / "rep", variants=["defense_strength"])
    s = pd.read_csv(out / "summary.csv")
    assert list(s["defense_strength"]) == [0.01, 0.1] and "defense" not in s.columns


@needs_data
@pytest.mark.parametrize("grid, cell, match", [
    ({"users.init_args.batch_size": [3, 0]}, "batch_size=0", "batch_size"),
    ({"attack.init_args.t_final": [20, 1000]}, "t_final=1000", r"t_final \(1000\) must be below the prior's T"),
    ({"attack.init_args.users_per_step": [1, 5]}, "users_per_step=5", r"users_per_step \(5\) is larger than the number of users \(2\)"),
])
def test_a_cell_that_attack_py_would_refuse_stops_the_sweep_before_any_cell(tmp_path, tiny_base, grid, cell, match):
    """Values attack.py rejects only after parsing (a batch size of 0, t_final at the prior's T, more users per step
    than users) failed their cell hours into a sweep; now validation names the cell before anything runs."""
    cfg = write_sweep(tmp_path / "s.yaml", tiny_base, grid)
    s = sweep.load_sweep(cfg)
    with pytest.raises(sweep.SweepError, match=rf"cell '[^']*{cell}[^']*': attack.py would stop before its first user: .*{match}"):
        sweep.validate(s)
    assert not (tmp_path / "sweep_dir").exists()


def test_sweep_hash_does_not_depend_on_the_working_directory(tmp_path, tiny_base, monkeypatch):
    """Config paths are relative to the repository root; their checksums were read relative to the working
    directory, so from elsewhere every checksum was None (edits went unnoticed) and the hash changed."""
    s = sweep.load_sweep(ROOT / "configs" / "sweep" / "dp_noise.yaml")
    here = s.hash()
    assert all(v is not None for v in s.resolved()["config_sha256"].values())
    monkeypatch.chdir(tmp_path)
    assert all(v is not None for v in s.resolved()["config_sha256"].values()) and s.hash() == here


def test_setting_fills_defaults_and_ignores_where_a_run_executed(tmp_path):
    """setting_of reads a config through attack.py's parser: a run written before an option existed (no
    evaluation.face_gallery_users), one on another accelerator or with other seeds/user range/logging shares the
    setting of the same experiment; another attack setting does not."""
    parser = attack.build_parser()
    cfg = parser.parse_args(["--config", str(ROOT / "configs" / "attack" / "fashion_mnist.yaml")])
    base = yaml.safe_load(attack.dump_config(parser, cfg))

    def setting(name, edit):
        c = yaml.safe_load(yaml.safe_dump(base))
        edit(c)
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(c))
        return report.setting_of(tmp_path / name)

    ref = setting("ref", lambda c: None)
    assert setting("old", lambda c: c["evaluation"].pop("face_gallery_users")) == ref
    assert setting("gpu", lambda c: c["trainer"].update(accelerator="gpu", enable_model_summary=False)) == ref
    assert setting("half", lambda c: (c["users"]["init_args"].update(first_user=10, num_users=10),
                                      c["attack"]["init_args"].update(seed=3, log_images_every=50))) == ref
    assert setting("no_prior", lambda c: c["attack"]["init_args"].update(use_prior=False)) != ref
    assert setting("b50", lambda c: c["users"]["init_args"].update(batch_size=50)) != ref


def test_sweep_root_expands_home(tmp_path, tiny_base, monkeypatch):
    """root: ~/... made a literal './~' sweep directory (index, logs, report) while attack.py expands its cells'
    output.root: the two parted and unfinished cells were not found to resume."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = write_sweep(tmp_path / "s.yaml", tiny_base, {"seed": [0, 1]}, root="~/sweeps/t")
    s = sweep.load_sweep(cfg)
    assert s.root == str(tmp_path / "home" / "sweeps" / "t")
    assert sweep.open_sweep_dir(s, new=False) == tmp_path / "home" / "sweeps" / "t" and not (tmp_path / "~").exists()


def test_attack_overrides_on_sweep_py_say_it_takes_none(tmp_path, capsys):
    """`sweep.py --config X --attack.init_args.steps 2` said only 'unrecognized arguments'."""
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--config", str(tmp_path / "s.yaml"), "--attack.init_args.steps", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --attack.init_args.steps 2. sweep.py takes no attack overrides: copy" in err


def test_a_summary_json_that_is_not_an_object_reads_as_no_status(tmp_path, tiny_base, capsys):
    """sweep.py read summary.json with its own reader, which raised AttributeError on a JSON array or string
    (``.get`` of a list), stopping the whole sweep; the shared reader (inversion.fsutils.run_status, also used by
    attack.py, refinish and the report) reads it as no status: the cell is resumed like one stopped hard."""
    from inversion.fsutils import run_status

    assert run_status(None) is None and run_status(tmp_path) is None
    (tmp_path / "summary.json").write_text('{"status": "finished"}')
    assert run_status(tmp_path) == "finished" and run_status(str(tmp_path)) == "finished"
    cfg = write_sweep(tmp_path / "s.yaml", tiny_base, {"seed": [0]})
    s = sweep.load_sweep(cfg)
    idx = sweep.run_sweep(s, runner=_config_runner([]), report=False)
    run_dir = Path(idx["cells"]["seed=0"]["run_dir"])
    for text in ("[]", '"finished"', "[1, 2"):
        (run_dir / "summary.json").write_text(text)
        assert run_status(run_dir) is None
        capsys.readouterr()
        sweep.dry_run(s, new=False)
        assert f"seed=0: resume {run_dir} (was no summary.json: stopped hard)" in capsys.readouterr().out
