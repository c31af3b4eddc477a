"""sweep.py and scripts/refinish.py against model files that changed since a run (``models.json``): a sweep does not
resume (attack.py would refuse) nor skip (the report would pool two models) such a cell, it runs it again in a new
run directory; refinish refuses a run whose victim or prior changed, and records the models it used."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from diffusers import DDPMPipeline, DDPMScheduler

import attack
import sweep
from lightning_modules.classifier import save_classifier
from tests.helpers import QUIET_FIT_WARNINGS, tiny_unet, tiny_victim
from tests.test_attack_e2e import tiny_config
from tests.test_refinish import load_refinish

pytestmark = QUIET_FIT_WARNINGS


def retrain(assets: dict[str, str], role: str) -> None:
    """Replace one tiny model's files in place with other weights (a retrained checkpoint at the same path)."""
    if role == "prior":
        DDPMPipeline(unet=tiny_unet(8, 1, seed=7), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
            assets["prior"], safe_serialization=True)
    else:
        model, cfg = tiny_victim(8, 1, seed=7, arch="resnet18" if role == "victim" else "convnet")
        save_classifier(model, cfg, Path(assets[role]))


@pytest.fixture
def tiny(tmp_path) -> tuple[Path, dict[str, str]]:
    """A tiny attack config (tests/test_attack_e2e.tiny_config: its own tiny victim, DDPM and evaluator, which the
    tests retrain) and the paths of those three models."""
    path = tiny_config(tmp_path, **{"attack.init_args.steps": 3, "logger.backend": "none",
                                    "output.root": str(tmp_path / "unused_runs")})
    cfg = yaml.safe_load(path.read_text())
    return path, {"victim": cfg["victim"]["checkpoint"], "prior": cfg["prior"]["path"],
                  "evaluator": cfg["evaluation"]["evaluator"]}


def two_finished_cells(tmp_path: Path, tiny):
    """A sweep over seed 0 and 1 on the tiny config, run once: (sweep, runner calls, index, slug -> run dir)."""
    s = sweep.load_sweep(write_sweep(tmp_path, tiny[0], {"seed": [0, 1]}))
    calls: list[list[str]] = []
    idx = sweep.run_sweep(s, runner=models_runner(calls), report=False)
    return s, calls, idx, {slug: Path(e["run_dir"]) for slug, e in idx["cells"].items()}


def write_sweep(tmp_path: Path, base: Path, grid: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "models_sweep", "root": str(tmp_path / "sweep_dir"), "base": str(base),
                                    "grid": grid}))
    return path


def models_runner(calls: list):
    """Stands in for attack.main with attack.run's model bookkeeping: a new run dir gets config.yaml,
    attack_seed.txt and models.json (the fingerprints of the files now); ``--resume`` is refused as attack.run
    refuses it (:func:`attack.open_resume_dir`, then :func:`attack.check_model_fingerprints`). Each run writes a
    one-row results.csv and summary.json status finished."""
    def runner(argv):
        calls.append(list(argv))
        parser = attack.build_parser()
        cfg = parser.parse_args(argv)
        now = attack.model_fingerprints(cfg, True)  # the tiny UserLevelInversion uses the prior
        if cfg.resume:
            run = attack.open_resume_dir(parser, cfg)[0]
            attack.check_model_fingerprints(run, now)
        else:
            run = attack.new_run_dir(cfg.output.root, cfg.output.name)
            (run / "config.yaml").write_text(attack.dump_config(parser, cfg))
            seed = attack.effective_attack_seed((cfg.attack.init_args or {}).get("seed") or 0, cfg.seed)
            (run / attack.ATTACK_SEED_FILE).write_text(f"{seed}\n")
            (run / attack.MODELS_FILE).write_text(json.dumps(now, indent=1) + "\n")
        (run / "results.csv").write_text("user,method,B,psnr_nearest\n0,m,3,12.5\n")
        (run / "summary.json").write_text(json.dumps({"status": "finished", "run_dir": str(run)}))
        return run
    return runner


def resumed_from(argv: list[str]):
    return argv[argv.index("--resume") + 1] if "--resume" in argv else None


# ------------------------------------------------------------------------------------------------ sweep.py
def test_an_unfinished_cell_whose_prior_changed_starts_in_a_new_run_dir(tmp_path, tiny, capsys):
    """The cell's interrupted run dir was made with a prior retrained since: attack.py --resume would refuse it
    ("the prior model files changed"), and the sweep resumed it anyway, recorded the cell failed, and did so again
    on every re-run. Now the plan notes why and starts the cell in a new run dir; the old one is kept and listed."""
    s, calls, idx, old = two_finished_cells(tmp_path, tiny)
    assets = tiny[1]
    for run in old.values():
        (run / "summary.json").write_text(json.dumps({"status": "interrupted", "run_dir": str(run)}))

    # unchanged models: both cells resume in place
    plans = {c.slug: sweep.plan_cell(s, c, tmp_path / "sweep_dir" / "cells", str(old[c.slug])) for c in s.cells}
    assert [(p.action, p.run_dir) for p in plans.values()] == [("resume", old["seed=0"]), ("resume", old["seed=1"])]

    retrain(assets, "prior")
    plan = sweep.plan_cell(s, s.cells[0], tmp_path / "sweep_dir" / "cells", str(old["seed=0"]))
    assert plan.action == "new" and plan.run_dir == old["seed=0"]
    assert f"cannot resume {old['seed=0'].name}: the prior model files changed" in plan.why
    assert "run without --resume" not in plan.why  # attack.py's advice is what the sweep does: not repeated
    capsys.readouterr()
    calls.clear()
    idx = sweep.run_sweep(s, runner=models_runner(calls), report=False)
    assert [resumed_from(a) for a in calls] == [None, None]
    for slug in ("seed=0", "seed=1"):
        e = idx["cells"][slug]
        assert e["status"] == "finished" and e["run_dir"] != str(old[slug]) and not e["resumed"]
        assert e["previous_run_dirs"] == [str(old[slug])] and old[slug].is_dir()
    out = capsys.readouterr().out
    assert f"[sweep] 1/2 seed=0: cannot resume {old['seed=0'].name}: the prior model files changed" in out
    # the next re-run: every cell finished with the current models, nothing runs
    calls.clear()
    sweep.run_sweep(s, runner=models_runner(calls), report=False)
    assert calls == []


@pytest.mark.parametrize("role", ["victim", "prior", "evaluator"])
def test_a_finished_cell_whose_models_changed_runs_again_in_a_new_run_dir(tmp_path, tiny, capsys, role):
    """A finished cell was skipped even when its victim or prior (or evaluator: attack.py --resume compares all
    three) was retrained in place since, and the sweep's report pooled old-model and new-model cells. Now it runs
    again in a new run dir with a note naming the changed model; with --max-cells reached it is pending, not
    finished (the report leaves it out); the old run dir is kept."""
    s, calls, idx, old = two_finished_cells(tmp_path, tiny)
    assets = tiny[1]
    sweep.run_sweep(s, runner=models_runner(calls), report=False)
    assert len(calls) == 2  # unchanged: both skipped
    capsys.readouterr()

    retrain(assets, role)
    idx = sweep.run_sweep(s, runner=models_runner(calls), report=False, max_cells=0)
    assert [e["status"] for e in idx["cells"].values()] == ["pending", "pending"] and len(calls) == 2
    sweep.dry_run(s, new=False)
    out = capsys.readouterr().out
    assert f"seed=0: run ({old['seed=0'].name} finished, but the {role} model files changed since it ran" in out

    calls.clear()
    idx = sweep.run_sweep(s, runner=models_runner(calls), report=False)
    assert [resumed_from(a) for a in calls] == [None, None]
    for slug in ("seed=0", "seed=1"):
        e = idx["cells"][slug]
        new = Path(e["run_dir"])
        assert e["status"] == "finished" and new != old[slug] and e["previous_run_dirs"] == [str(old[slug])]
        assert old[slug].is_dir() and (old[slug] / "summary.json").is_file()
        assert json.loads((new / "models.json").read_text()) != json.loads((old[slug] / "models.json").read_text())
    out = capsys.readouterr().out
    assert f"[sweep] 2/2 seed=1: {old['seed=1'].name} finished, but the {role} model files changed since it ran" in out
    assert "new run directory (the old one is kept)" in out
    calls.clear()
    sweep.run_sweep(s, runner=models_runner(calls), report=False)
    assert calls == []  # the new run dirs are skipped


def test_a_newer_unfinished_run_dir_is_resumed_after_a_finished_one_with_old_models(tmp_path, tiny):
    """The finished run dir used the old prior; the cell's rerun (new prior) was interrupted: the rerun is resumed,
    not started a third time, and the finished old-prior run dir is not counted."""
    base, assets = tiny
    s = sweep.load_sweep(write_sweep(tmp_path, base, {"seed": [0]}))
    calls: list[list[str]] = []
    first = Path(sweep.run_sweep(s, runner=models_runner(calls), report=False)["cells"]["seed=0"]["run_dir"])
    retrain(assets, "prior")
    time.sleep(1.1)  # run dirs are ordered by their names' time to the second (the hex after it is random)
    second = Path(sweep.run_sweep(s, runner=models_runner(calls), report=False)["cells"]["seed=0"]["run_dir"])
    assert second != first
    (second / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    calls.clear()
    idx = sweep.run_sweep(s, runner=models_runner(calls), report=False)
    assert [resumed_from(a) for a in calls] == [str(second)]
    assert idx["cells"]["seed=0"]["run_dir"] == str(second) and idx["cells"]["seed=0"]["status"] == "finished"


def test_a_run_dir_without_models_json_is_not_checked(tmp_path, tiny):
    """Run dirs made before models.json existed: skipped when finished, resumed when not (as attack.py --resume
    does not check them)."""
    s, calls, idx, old = two_finished_cells(tmp_path, tiny)
    assets = tiny[1]
    for run in old.values():
        (run / "models.json").unlink()
    (old["seed=1"] / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    retrain(assets, "victim")
    calls.clear()
    idx = sweep.run_sweep(s, runner=models_runner(calls), report=False)
    assert [resumed_from(a) for a in calls] == [str(old["seed=1"])]
    assert {slug: e["run_dir"] for slug, e in idx["cells"].items()} == {k: str(v) for k, v in old.items()}


def test_the_fingerprints_are_hashed_once_per_model_set(tmp_path, tiny, monkeypatch):
    """Planning a sweep of many cells on the same models hashes each model file once, and again after it
    changed (a model retrained while a long sweep runs)."""
    base, assets = tiny
    s = sweep.load_sweep(write_sweep(tmp_path, base, {"seed": [0, 1, 2, 3]}))
    sweep.run_sweep(s, runner=models_runner([]), report=False)
    digests: list[str] = []
    real = attack._files_digest
    monkeypatch.setattr(attack, "_files_digest", lambda path, only=None: digests.append(Path(path).name)
                        or real(path, only))
    sweep._FINGERPRINTS.clear()
    sweep.dry_run(s, new=False)
    assert sorted(digests) == ["ddpm", "evaluator", "victim"]
    digests.clear()
    sweep.dry_run(s, new=False)
    assert digests == []
    retrain(assets, "evaluator")
    sweep.dry_run(s, new=False)
    assert sorted(digests) == ["ddpm", "evaluator", "victim"]


# ------------------------------------------------------------------------------------------------ refinish.py
try:
    from datamodules.fashion_mnist import find_fashion_mnist_root

    find_fashion_mnist_root(download=False)
    HAVE_FMNIST = True
except Exception:  # noqa: BLE001
    HAVE_FMNIST = False
needs_data = pytest.mark.skipif(not HAVE_FMNIST, reason="needs `apt-get install dataset-fashion-mnist`")


def fake_run(tmp_path: Path, base: Path) -> Path:
    """A run directory as refinish reads it up to its model check: config.yaml, a results.csv, models.json now."""
    parser = attack.build_parser()
    cfg = parser.parse_args(["--config", str(base)])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(attack.dump_config(parser, cfg))
    (run / "results.csv").write_text("user\n0\n")
    (run / "models.json").write_text(json.dumps(attack.model_fingerprints(cfg, True)))
    return run


@needs_data
@pytest.mark.parametrize("role", ["victim", "prior"])
def test_refinish_refuses_a_run_whose_victim_or_prior_changed(tmp_path, tiny, role):
    """Refinish checked the attack and defense seeds but never models.json: after the prior was retrained it
    finished the saved images with the new prior, silently. Now one ConfigError names the model, before any
    output."""
    base, assets = tiny
    run = fake_run(tmp_path, base)
    retrain(assets, role)
    rf = load_refinish()
    with pytest.raises(attack.ConfigError, match=rf"refinish {run}: the {role} model files changed since this run "
                       r"was made .*put the original files back, or run attack.py for a new run"):
        rf.main([str(run), "--logger.backend", "none", "--output.root", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@needs_data
@pytest.mark.slow
def test_refinish_records_its_models_allows_another_evaluator_and_warns_without_models_json(tmp_path, tiny, capsys):
    """The refinished directory gets models.json (atomically, as attack.py writes it); an evaluator retrained
    since the run is no refusal (the evaluation group is a refinish setting); a run without models.json is
    refinished with a warning that it cannot be checked."""
    base, assets = tiny
    run = attack.main(["--config", str(base), "--output.root", str(tmp_path / "runs")])
    recorded = json.loads((run / "models.json").read_text())
    rf = load_refinish()
    out = rf.main([str(run), "--logger.backend", "none"])
    assert json.loads((out / "models.json").read_text()) == recorded
    assert not list(out.rglob("*.tmp"))

    retrain(assets, "evaluator")
    out2 = rf.main([str(run), "--logger.backend", "none", "--output.name", "new_evaluator"])
    got = json.loads((out2 / "models.json").read_text())
    assert got["evaluator"] != recorded["evaluator"]
    assert {k: v for k, v in got.items() if k != "evaluator"} == {k: v for k, v in recorded.items() if k != "evaluator"}
    assert "warning" not in capsys.readouterr().err

    (run / "models.json").unlink()
    retrain(assets, "prior")
    out3 = rf.main([str(run), "--logger.backend", "none", "--output.name", "unchecked"])
    assert json.loads((out3 / "summary.json").read_text())["status"] == "finished"
    err = capsys.readouterr().err
    assert f"[refinish] warning: {run} has no models.json" in err and "cannot check" in err
    # unchecked in, unchecked out: no models.json that would vouch for models the raw images may not come from
    assert not (out3 / "models.json").exists() and "gets no models.json either" in err
    # a checked refinish is checked in turn when refinished again
    retrain(assets, "victim")
    with pytest.raises(attack.ConfigError, match="the prior, victim model files changed"):
        rf.main([str(out), "--logger.backend", "none", "--output.name", "again"])


def test_the_stat_signature_sees_an_in_place_copy_that_keeps_mtime_and_size(tmp_path):
    """cp -p / rsync --inplace rewrite a model with its old mtime and size: the cached fingerprint stayed."""
    import os

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 64)
    st = f.stat()
    before = sweep._stat_signature(f)
    time.sleep(0.02)
    with open(f, "r+b") as fh:  # same inode, same size
        fh.write(b"b" * 64)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size
    assert sweep._stat_signature(f) != before
