"""scripts/refinish.py: the final stage rerun on a finished run's saved images equals the attack's own."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attack
from tests.test_attack_e2e import HAVE_FMNIST, tiny_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not HAVE_FMNIST, reason="needs `apt-get install dataset-fashion-mnist`")

SELECT = {"attack.init_args.final_candidates": 3, "attack.init_args.selection_output_weight": 1.0}


def load_refinish():
    spec = importlib.util.spec_from_file_location("refinish_script", ROOT / "scripts" / "refinish.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def rows(run_dir: Path) -> list[dict]:
    return list(csv.DictReader((run_dir / "results.csv").open()))


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny attack run with one final denoising, and the same attack run with final candidate selection."""
    tmp = tmp_path_factory.mktemp("refinish")
    base = {"logger.backend": "csv", "attack.init_args.t_final": 60}
    single = attack.main(["--config", str(tiny_config(tmp / "a", **base))])
    select = attack.main(["--config", str(tiny_config(tmp / "b", **base, **SELECT))])
    return single, select


@pytest.mark.slow
def test_refinish_with_selection_equals_the_attack_run_with_selection(runs, monkeypatch):
    single, select = runs
    rf = load_refinish()
    source_before = {p.relative_to(single): p.read_bytes() for p in sorted(single.rglob("*")) if p.is_file()}
    monkeypatch.chdir(single.parent)  # the run given by a relative path
    out = rf.main([single.name, "--attack.init_args.final_candidates", "3",
                   "--attack.init_args.selection_output_weight", "1.0", "--logger.backend", "csv"]).resolve()
    assert out.parent == single.parent and out.name.startswith("tiny_refinished-")
    summary = json.loads((out / "summary.json").read_text())  # absolute paths, like attack.py's summary.json
    assert summary["run_dir"] == str(out.resolve()) and summary["refinished_from"] == str(single.resolve())
    got, want = rows(out), rows(select)
    assert [r["user"] for r in got] == [r["user"] for r in want] == ["0", "1"]
    for g, w in zip(got, want):
        # the optimisation does not depend on the final stage: same raw image, so the same candidates and choice
        assert g["raw_psnr_nearest"] == w["raw_psnr_nearest"]
        for key in ("evaluator_class", "evaluator_prob", "victim_class", "psnr_nearest", "mse_mean", "psnr_mean"):
            assert float(g[key]) == pytest.approx(float(w[key]), abs=1e-4), key
        assert g["refinish_source"] == "raw.pt" and g["refinished_from"] == single.name
        assert g["final_stage"] == w["final_stage"] == "select N=3 t=60 mu=1 ddim/2"
        assert g["steps"] == rows(single)[0]["steps"] and 0 <= int(g["final_candidate"]) < 3
        assert g["evaluator_candidates_correct"] == w["evaluator_candidates_correct"]
        assert 0 <= int(g["evaluator_candidates_correct"]) <= 3
        assert int(g["evaluator_correct"]) <= int(g["evaluator_any_candidate_correct"])  # the choice is a candidate
    for uid in ("user_0000", "user_0001"):
        assert np.abs(png(out / "users" / uid / "denoised.png") - png(select / "users" / uid / "denoised.png")).max() <= 1
        assert torch.equal(torch.load(out / "users" / uid / "raw.pt"), torch.load(single / "users" / uid / "raw.pt"))
        assert np.array_equal(png(out / "users" / uid / "candidates.png"), png(select / "users" / uid / "candidates.png"))
        assert not (single / "users" / uid / "candidates.png").exists()  # one denoising: no candidates
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["users"] == 2
    assert summary["changed"] == ["attack.init_args.final_candidates"]  # selection_output_weight: 1.0 already
    source_after = {p.relative_to(single): p.read_bytes() for p in sorted(single.rglob("*")) if p.is_file()}
    assert source_after == source_before  # the source run is untouched: no file changed, added or removed


@pytest.mark.slow
def test_refinish_without_changes_reproduces_the_run_and_reads_old_png_runs(runs):
    single, _ = runs
    rf = load_refinish()
    out = rf.main([str(single), "--logger.backend", "none"])
    for g, w in zip(rows(out), rows(single)):
        assert g["evaluator_class"] == w["evaluator_class"] and g["psnr_nearest"] == w["psnr_nearest"]
        assert g["final_candidate"] == "0"
    # a run written before raw.pt existed: the uint8 raw.png is used, and said so
    for uid in ("user_0000", "user_0001"):
        (single / "users" / uid / "raw.pt").unlink()
    out2 = rf.main([str(single), "--logger.backend", "none", "--output.name", "from_png"])
    assert out2.name.startswith("from_png-")
    for g, w in zip(rows(out2), rows(single)):
        assert g["refinish_source"] == "raw.png (uint8)"
        assert abs(float(g["raw_psnr_nearest"]) - float(w["raw_psnr_nearest"])) < 0.2  # quantised to 1/255


@pytest.mark.slow
def test_refinishing_an_unfinished_run_is_incomplete_not_finished(runs, tmp_path):
    """An interrupted run's refinish wrote status 'finished' with only the users the run had finished, so the report
    and sweeps took it for a whole run."""
    import shutil

    single, _ = runs
    src = tmp_path / single.name
    shutil.copytree(single, src)
    summary = json.loads((src / "summary.json").read_text())
    (src / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    rf = load_refinish()
    with pytest.raises(SystemExit) as exit_info:
        rf.main([str(src), "--logger.backend", "none", "--output.root", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    (out,) = (tmp_path / "out").iterdir()
    status = json.loads((out / "summary.json").read_text())["status"]
    assert status.startswith("incomplete: refinished the 2 finished users of a run whose status is 'interrupted'")
    assert len(rows(out)) == 2


@pytest.mark.parametrize("args, match", [
    (["--attack.init_args.steps", "8"], r"attack\.init_args\.steps"),
    (["--users.init_args.batch_size", "4"], r"users\.init_args\.batch_size"),
    (["--victim.random_init", "true"], r"victim\.random_init"),
])
def test_refinish_refuses_changes_to_the_optimisation(tmp_path, args, match):
    rf = load_refinish()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = tiny_config(tmp_path)
    (run_dir / "config.yaml").write_text(cfg.read_text())
    (run_dir / "results.csv").write_text("user\n0\n")
    with pytest.raises(attack.ConfigError, match=match):
        rf.main([str(run_dir), *args])
    assert not (tmp_path / "runs").exists()  # nothing written


def test_refinish_refuses_what_is_not_a_finished_run(tmp_path):
    rf = load_refinish()
    with pytest.raises(attack.ConfigError, match="not a run directory"):
        rf.main([str(tmp_path)])
    with pytest.raises(attack.ConfigError, match="usage"):
        rf.main([])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(tiny_config(tmp_path, **{"attack.class_path": "InvertingGradients",
                                                                  "attack.init_args": {"steps": 2}}).read_text())
    (run_dir / "results.csv").write_text("user\n0\n")
    with pytest.raises(attack.ConfigError, match="final stage"):
        rf.main([str(run_dir)])
    # with a final-stage option: the same line (was "attack (InvertingGradients): Option 'final_candidates' is not
    # accepted", from parsing the override before the check)
    with pytest.raises(attack.ConfigError, match=f"refinish reruns the user-level attack's final stage; {run_dir} ran"):
        rf.main([str(run_dir), "--attack.init_args.final_candidates", "2"])


def test_evaluate_counts_the_candidates_of_the_users_class():
    """evaluate() with final candidates: how many the evaluator reads as the user's class, on a known evaluator."""
    from datamodules.users import User
    from inversion.label_inference import LabelInference

    def evaluator(x):  # class 1 for bright images, class 0 for dark ones
        bright = (x.flatten(1).mean(1) > 0.5).float()
        return torch.stack([1 - bright, bright], 1) * 10.0

    user = User(0, torch.full((2, 1, 8, 8), 0.8), torch.tensor([1, 1]), 2, 1)
    cands = torch.cat([torch.full((2, 1, 8, 8), 0.9), torch.full((3, 1, 8, 8), 0.1)])
    labels = LabelInference(counts=torch.tensor([0.0, 2.0]), present=torch.tensor([False, True]), dominant=1, strategy="known")
    result = attack.AttackResult(representative=cands[:1], reconstructions=cands[:1], denoised=cands[2:3],
                                 labels=labels, steps=1, extras={"candidates": cands})
    row = attack.evaluate(result, user, evaluator, lpips=False)
    assert row["evaluator_candidates_correct"] == 2 and row["evaluator_any_candidate_correct"] == 1
    assert row["evaluator_correct"] == 0  # the chosen (denoised) image is a dark one
    result.extras = {"candidates": cands[2:]}
    row = attack.evaluate(result, user, evaluator, lpips=False)
    assert row["evaluator_candidates_correct"] == 0 and row["evaluator_any_candidate_correct"] == 0
    result.extras = {}
    assert "evaluator_candidates_correct" not in attack.evaluate(result, user, evaluator, lpips=False)


@pytest.mark.slow
def test_refinish_rejects_bad_final_stage_settings_before_any_output(runs):
    single, _ = runs
    rf = load_refinish()
    before = sorted(single.parent.iterdir())
    with pytest.raises(attack.ConfigError, match="t_final"):
        rf.main([str(single), "--attack.init_args.t_final", "5000"])  # beyond the prior's T
    with pytest.raises(ValueError, match="denoise_method"):
        rf.main([str(single), "--attack.init_args.denoise_method", "heun"])
    assert sorted(single.parent.iterdir()) == before  # no run directory was started


def test_refinish_refuses_a_run_with_an_unseeded_stochastic_defense(tmp_path):
    rf = load_refinish()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = tiny_config(tmp_path, **{"threat.defenses": [{"name": "gaussian_dp", "clip_norm": 1.0, "sigma": 0.1}]})
    (run_dir / "config.yaml").write_text(cfg.read_text())
    (run_dir / "results.csv").write_text("user\n0\n")
    with pytest.raises(attack.ConfigError, match="without a seed"):
        rf.main([str(run_dir)])


@pytest.mark.slow
def test_a_refinished_user_whose_results_write_is_interrupted_is_counted_nowhere(runs, monkeypatch):
    """The row was added to the summary's rows before results.csv was written: a Ctrl-C during the second user's
    write left summary.json counting 2 users and results.csv holding 1."""
    single, _ = runs
    rf = load_refinish()
    original, calls = attack.write_results, []

    def write_results(run_dir, rows_, name="results.csv"):
        calls.append(len(rows_))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(run_dir, rows_, name)

    monkeypatch.setattr(attack, "write_results", write_results)
    with pytest.raises(SystemExit):
        rf.main([str(single), "--logger.backend", "none", "--output.name", "cut"])
    (out,) = single.parent.glob("cut-*")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["users"] == 1
    assert [r["user"] for r in rows(out)] == ["0"]
