"""Tests of inversion.report on small fake run directories laid out as attack.py writes them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from inversion import report

ROOT = Path(__file__).resolve().parents[1]


def _fake_run(root: Path, name: str, methods=("diffusion", "tv"), bs=(1, 4, 16), users=3, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    run = root / name
    rows = []
    for method in methods:
        for b in bs:
            for u in range(users):
                rows.append({
                    "user": u, "method": method, "B": b, "dominant_class": u % 10, "inferred_dominant": u % 10,
                    "evaluator_class": u % 10, "evaluator_prob": rng.uniform(0.3, 1.0),
                    "evaluator_correct": bool(rng.integers(0, 2)),
                    "mse_nearest": rng.uniform(0.01, 0.1), "mse_mean": rng.uniform(0.05, 0.2),
                    "psnr_nearest": rng.uniform(10, 25), "psnr_mean": rng.uniform(8, 15),
                    "ssim_nearest": rng.uniform(0, 1), "ssim_mean": rng.uniform(0, 0.5),
                    "lpips_nearest": rng.uniform(0, 0.5), "lpips_mean": rng.uniform(0.2, 0.7),
                    "steps": 100, "seconds": rng.uniform(1, 3), "nearest_index": int(rng.integers(0, b)),
                    "true_histogram": str(b), "label_strategy": "count",
                })
    df = pd.DataFrame(rows)
    df.loc[1, "lpips_nearest"] = np.nan  # not measurable for one user
    df.loc[2, "ssim_mean"] = np.nan
    df.loc[0, "inferred_dominant"] = 99  # one wrong label inference
    (run / "users").mkdir(parents=True)
    df.to_csv(run / "results.csv", index=False)
    (run / "config.yaml").write_text("dataset: fashion_mnist\nattack:\n  steps: 100\n  lr: 0.1\n")
    for u in range(users):
        d = run / "users" / f"user_{u:04d}"
        d.mkdir()
        for f in ("batch", "raw", "denoised"):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{f}.png")
        Image.fromarray(rng.integers(0, 255, (34, 100, 3), dtype=np.uint8)).save(d / "grid.png")
    return df


def test_aggregate_values_equal_inputs(tmp_path):
    df = _fake_run(tmp_path, "run_a")
    out = report.build_report([tmp_path / "run_a"], tmp_path / "rep")
    assert out == tmp_path / "rep"
    s = pd.read_csv(out / "summary.csv")
    assert "nearest_index_avg" not in s.columns and "true_histogram_avg" not in s.columns
    assert len(s) == 6 and set(s["method"]) == {"diffusion", "tv"} and sorted(set(s["B"])) == [1, 4, 16]
    for (method, b), g in df.groupby(["method", "B"]):
        r = s[(s["method"] == method) & (s["B"] == b)].iloc[0]
        assert r["n_users"] == len(g)
        assert r["evaluator_accuracy"] == pytest.approx(g["evaluator_correct"].astype(float).mean())
        # the 95% Wilson score interval, from its formula (z = 1.959964)
        n, p, z = len(g), g["evaluator_correct"].astype(float).mean(), 1.959964
        centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert (r["evaluator_accuracy_ci_low"], r["evaluator_accuracy_ci_high"]) == pytest.approx((centre - half, centre + half), abs=1e-5)
        assert r["label_accuracy"] == pytest.approx((g["dominant_class"] == g["inferred_dominant"]).mean())
        for m in ("mse_nearest", "psnr_mean", "lpips_nearest", "ssim_mean", "seconds"):
            v = g[m].dropna()
            assert r[f"{m}_avg"] == pytest.approx(v.mean())
            assert r[f"{m}_std"] == pytest.approx(v.std(ddof=1))
            assert r[f"{m}_n"] == len(v)
    from inversion.report import wilson_interval

    assert wilson_interval(18, 20) == pytest.approx((0.69897, 0.97213), abs=1e-5)  # 18 of 20 users: not surely >= 80%
    assert wilson_interval(0, 6)[0] == 0.0 and all(np.isnan(wilson_interval(0, 0)))
    first = s[(s["method"] == "diffusion") & (s["B"] == 1)].iloc[0]
    assert first["lpips_nearest_n"] == 2 and first["label_accuracy"] == pytest.approx(2 / 3)
    md = (out / "summary.md").read_text()
    assert "| diffusion | 1 | 3 |" in md and "(n=2)" in md and "fashion_mnist" in md
    for fig in ("metrics_vs_B.png", "gallery.png"):
        p = out / fig
        assert p.is_file() and p.stat().st_size > 5000
        im = np.asarray(Image.open(p).convert("L"))
        assert im.std() > 5  # not a blank canvas
    assert not list(tmp_path.glob(".rep.tmp-*"))  # temp folder renamed away


def test_existing_out_dir_is_never_overwritten_and_cli(tmp_path):
    _fake_run(tmp_path, "run_a", methods=("diffusion",), bs=(2,))
    _fake_run(tmp_path, "run_b", methods=("tv",), bs=(2, 8), seed=1)
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "keep.txt").write_text("mine")
    res = subprocess.run([sys.executable, "-m", "inversion.report", str(tmp_path / "run_a"), str(tmp_path / "run_b"),
                          "--out", str(tmp_path / "rep")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "rep" / "keep.txt").read_text() == "mine" and not (tmp_path / "rep" / "summary.csv").exists()
    s = pd.read_csv(tmp_path / "rep-1" / "summary.csv")
    assert list(zip(s["method"], s["B"])) == [("diffusion", 2), ("tv", 2), ("tv", 8)]
    assert "rep-1" in res.stderr
    assert res.stdout.strip() == f"wrote {tmp_path / 'rep-1'}/summary.md, summary.csv, metrics_vs_B.png, gallery.png"


def test_missing_columns_and_empty_metrics(tmp_path):
    run = tmp_path / "run_c"
    (run / "users").mkdir(parents=True)
    pd.DataFrame({"user": [0, 1], "method": ["m", "m"], "B": [4, 4], "psnr_nearest": [12.0, 14.0],
                  "lpips_nearest": [np.nan, np.nan]}).to_csv(run / "results.csv", index=False)
    out = report.build_report([run], tmp_path / "rep")
    s = pd.read_csv(out / "summary.csv")
    assert s.loc[0, "psnr_nearest_avg"] == pytest.approx(13.0) and s.loc[0, "lpips_nearest_n"] == 0
    assert "evaluator_accuracy" not in s.columns
    assert "n/a" in (out / "summary.md").read_text()
    assert (out / "metrics_vs_B.png").is_file() and not (out / "gallery.png").exists()
    with pytest.raises(FileNotFoundError, match="results.csv"):
        report.build_report([tmp_path / "nothing"], tmp_path / "rep2")
    # the folder above the run directories: the error points at them
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path} holds run directories \({run}, \.\.\.\): give them, e\.g\. "):
        report.build_report([tmp_path], tmp_path / "rep3")
    # a sweep directory (was "results.csv not found") and an objective audit's run (was "no user finished")
    sweep_dir = tmp_path / "mysweep"
    (sweep_dir / "cells").mkdir(parents=True)
    (sweep_dir / "sweep.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"{sweep_dir} is a sweep directory of sweep.py: its report is in "):
        report.build_report([sweep_dir], tmp_path / "rep4")
    audit = tmp_path / "audit_run"
    audit.mkdir()
    (audit / "config.yaml").write_text("users: {}\naudit:\n  per_class: 2\n")  # stopped before audit.csv
    with pytest.raises(ValueError, match=rf"{audit} is a run directory of scripts/objective_audit.py"):
        report.build_report([audit], tmp_path / "rep5")
    (audit / "audit.csv").write_text("user\n0\n")
    (audit / "config.yaml").write_text("{}")
    with pytest.raises(ValueError, match=rf"{audit} is a run directory of scripts/objective_audit.py"):
        report.build_report([audit], tmp_path / "rep6")


def test_wandb_offline_logging(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _fake_run(tmp_path, "run_a", methods=("diffusion",), bs=(1, 2), users=2)
    out = report.build_report([tmp_path / "run_a"], tmp_path / "rep", use_wandb=True)
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_final_stage_variants_pool_runs_of_one_final_stage(tmp_path):
    """--variants final_stage: runs with different names but one final stage form one group; a run written before
    the final_stage column gets it from its config.yaml."""
    a = _fake_run(tmp_path, "paper", methods=("UserLevelInversion",), bs=(10,), seed=1)
    b = _fake_run(tmp_path, "sel_a", methods=("UserLevelInversion",), bs=(10,), seed=2)
    c = _fake_run(tmp_path, "sel_b", methods=("UserLevelInversion",), bs=(10,), seed=3)
    for name, df, stage in (("paper", a, "denoise t=100 ddim/10"), ("sel_a", b, "select N=8 t=400 mu=1 ddim/10")):
        df.assign(final_stage=stage).to_csv(tmp_path / name / "results.csv", index=False)
    (tmp_path / "sel_b" / "config.yaml").write_text(
        "attack:\n  class_path: lightning_modules.user_level_inversion.UserLevelInversion\n"
        "  init_args: {final_candidates: 8, t_final: 400, selection_output_weight: 1.0}\n")
    assert report.final_stage_of(tmp_path / "sel_b") == "select N=8 t=400 mu=1 ddim/10"  # defaults: DDIM, 10 steps
    runs = [tmp_path / n for n in ("paper", "sel_a", "sel_b")]
    s = pd.read_csv(report.build_report(runs, tmp_path / "rep", variants=["final_stage"]) / "summary.csv")
    assert "run_name" not in s.columns and sorted(s["final_stage"]) == ["denoise t=100 ddim/10", "select N=8 t=400 mu=1 ddim/10"]
    sel = s[s["final_stage"].str.startswith("select")].iloc[0]
    pooled = pd.concat([b, c])
    assert sel["n_users"] == len(pooled) == 6
    assert sel["psnr_nearest_avg"] == pytest.approx(pooled["psnr_nearest"].mean())
    assert sel["evaluator_accuracy"] == pytest.approx(pooled["evaluator_correct"].astype(float).mean())
    s_all = pd.read_csv(report.build_report(runs, tmp_path / "rep_all") / "summary.csv")
    # default: every key the runs differ in, the setting too: sel_b's config.yaml is not sel_a's, so the two are
    # two rows (one final stage, other configs), told apart by setting and what differs (setting_diff)
    assert len(s_all) == 3 and "final_stage" in s_all.columns and "setting" in s_all.columns
    sel_rows = s_all[s_all["final_stage"].str.startswith("select")]
    assert len(sel_rows) == 2 and sel_rows["setting"].nunique() == 2 and sel_rows["setting_diff"].str.len().min() > 0
    with pytest.raises(ValueError, match="unknown variant key"):
        report.build_report(runs, tmp_path / "rep_bad", variants=["colour"])


def _user_run(root: Path, folder: str, users, correct, classes=None) -> Path:
    """A one-method run directory with the given users and evaluator_correct flags (written as True/False)."""
    run = root / folder
    run.mkdir(parents=True)
    classes = classes if classes is not None else [0] * len(users)
    pd.DataFrame({"user": users, "method": "user_level", "B": 10, "dominant_class": 0, "inferred_dominant": 0,
                  "evaluator_class": classes, "evaluator_correct": correct,
                  "psnr_nearest": [10.0 + u for u in users]}).to_csv(run / "results.csv", index=False)
    return run


def test_newest_run_picks_latest_timestamp_of_that_exact_name(tmp_path):
    old = _user_run(tmp_path / "a", "B10_ig-20261130-090000-aaaaaa", [0], [True])
    new = _user_run(tmp_path / "b", "B10_ig-20261130-100000-000000", [0], [False])
    _user_run(tmp_path / "b", "B10_ig_u0-20261130-110000-bbbbbb", [0], [True])  # another name sharing the prefix
    (tmp_path / "b" / "B10_ig-20261130-120000-cccccc").mkdir()  # newer but no results.csv (crashed at start)
    assert report.newest_run([tmp_path / "a", tmp_path / "b", tmp_path / "missing"], "B10_ig") == new
    assert report.newest_run([tmp_path / "a"], "B10_ig") == old
    assert report.newest_run([tmp_path / "b"], "B10_ig_u0").name.startswith("B10_ig_u0-")
    assert report.newest_run([tmp_path / "a", tmp_path / "b"], "B10_dlg") is None


def test_pool_users_joins_disjoint_runs_and_refuses_a_user_twice(tmp_path):
    a = _user_run(tmp_path, "first-20261130-090000-aaaaaa", [1, 0], [True, False])
    b = _user_run(tmp_path, "rest-20261130-090000-bbbbbb", [3, 2], [True, True])
    d = report.pool_users([a, b])
    assert list(d.index) == [0, 1, 2, 3]
    assert list(d["run"]) == [a.name, a.name, b.name, b.name]
    assert list(d["evaluator_correct"]) == [0.0, 1.0, 1.0, 1.0]  # "True"/"False" read as 1/0
    assert list(d["psnr_nearest"]) == [10.0, 11.0, 12.0, 13.0]
    c = _user_run(tmp_path, "rerun-20261130-100000-cccccc", [2], [False])
    with pytest.raises(report.DuplicateUserError, match=r"user 2 in rest-.*, rerun-"):
        report.pool_users([a, b, c])
    # the newest run of each name, pooled; a name without a run is skipped
    pooled = report.pool_newest_runs([tmp_path], ["first", "rest", "absent"])
    assert list(pooled.index) == [0, 1, 2, 3] and list(pooled["run"]) == list(d["run"])
    assert report.pool_newest_runs([tmp_path], ["absent"]) is None


def test_cells_and_paired_counts_on_known_values():
    assert report.count_cell(pd.Series([True, False, True, np.nan])) == "2/3"
    assert report.count_cell(pd.Series([np.nan])) == "-" and report.count_cell(None) == "-"
    assert report.mean_std_cell(pd.Series([1.0, 2.0, 3.0, np.nan])) == "2 ± 1"
    assert report.mean_std_cell(pd.Series([0.25, 0.75]), ".2f") == "0.50 ± 0.35"
    assert report.mean_std_cell(pd.Series([4.0])) == "4" and report.mean_std_cell(None) == "-"
    a = pd.DataFrame({"evaluator_correct": [1, 1, 0, 0, 1], "evaluator_class": [3, 3, 1, 2, 3]}, index=[0, 1, 2, 3, 4])
    b = pd.DataFrame({"evaluator_correct": [1, 0, 1, 0, np.nan, 1], "evaluator_class": [3, 5, 3, 2, 3, 3]},
                     index=[0, 1, 2, 3, 4, 9])
    # users 0-3 are measured in both (4 lacks b's value, 9 is only in b)
    assert report.paired_counts(a, b) == {"n": 4, "both": 1, "a_only": 1, "b_only": 1, "neither": 1}
    assert report.changed_count(a, b) == (2, 5)  # users 1 and 2 differ; user 4 has a class in both
    with pytest.raises(KeyError, match="lpips"):
        report.paired_counts(a, b, "lpips")


def test_wilson_interval_is_drawn_for_a_single_point():
    """A series of one B (or the undefended marker of a privacy curve) showed no interval: a band of one point has
    no area. Error bars span the interval at every point that has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from inversion.report import _wilson_bars, wilson_interval

    low, high = wilson_interval(18, 20)
    rows = pd.DataFrame({"evaluator_accuracy": [0.9, 0.5], "evaluator_accuracy_ci_low": [low, np.nan],
                         "evaluator_accuracy_ci_high": [high, np.nan]})
    fig, ax = plt.subplots()
    _wilson_bars(ax, rows, [10, 50], "C0")
    (bars,) = ax.containers
    (segments,) = [c.get_segments() for c in bars.lines[2]]
    assert len(segments) == 1  # the row without an interval has no bar
    assert segments[0][:, 0].tolist() == [10, 10] and segments[0][:, 1] == pytest.approx([low, high])
    plt.close(fig)


def test_fedavg_settings_columns_are_not_averaged_as_metrics(tmp_path):
    """results.csv's fedavg_* columns (the local training's settings) are not measurements: no fedavg_*_avg column
    in summary.csv (the boolean fedavg_shuffle passed pandas' numeric test and was averaged)."""
    tmp = tmp_path
    df = _fake_run(tmp, "run_a", methods=("diffusion",), bs=(4,))
    df = df.assign(protocol="fedavg", fedavg_epochs=2, fedavg_lr=0.05, fedavg_batch_size=2, fedavg_shuffle=True,
                   fedavg_local_steps=4)
    df.to_csv(tmp / "run_a" / "results.csv", index=False)
    s = pd.read_csv(report.build_report([tmp / "run_a"], tmp / "rep") / "summary.csv")
    assert not [c for c in s.columns if c.startswith("fedavg")]
    assert len(s) == 1 and abs(s["psnr_nearest_avg"].iloc[0] - df["psnr_nearest"].mean()) < 1e-6


def test_folder_user_names_that_look_like_numbers_stay_apart(tmp_path):
    """Folder users are named by their folder: '012', '12' and 'NA' are three users. pd.read_csv read them as 12, 12
    and NaN, so the report merged the first two as one duplicated user (n_users 1 of 2 measured) and lost 'NA'."""
    run = tmp_path / "faces-20261201-000000-abcdef"
    run.mkdir()
    (run / "results.csv").write_text("user,method,B,dominant_class,evaluator_class,evaluator_correct,psnr_nearest\n"
                                     "012,user_level,4,0,0,True,11.0\n12,user_level,4,0,1,False,13.0\n"
                                     "NA,user_level,4,0,0,True,15.0\n")
    df = report.load_runs([run])
    assert list(df["user"]) == ["012", "12", "NA"]
    assert sorted(report.pool_users([run]).index) == ["012", "12", "NA"]
    s = pd.read_csv(report.build_report([run], tmp_path / "rep") / "summary.csv")
    assert s["n_users"].iloc[0] == 3 and s["psnr_nearest_avg"].iloc[0] == 13.0
    # numbered users (Fashion-MNIST, CelebA) stay integers
    _user_run(tmp_path, "B10_a-20261201-000000-aaaaaa", [3, 10], [True, False])
    assert list(report.load_runs([tmp_path / "B10_a-20261201-000000-aaaaaa"])["user"]) == [3, 10]


def test_run_names_that_only_restate_b_do_not_cut_the_b_series(tmp_path):
    """Sweeps name their runs by B (B10_ig, B50_ig): run_name then says nothing that B does not, and grouping by it
    gave one-point series in metrics_vs_B. Two names of one method and B (two ablations) stay two rows."""
    for name in ("B10_ig-20261201-000000-aaaaaa", "B50_ig-20261201-000000-bbbbbb"):
        _user_run(tmp_path / "byb", name, [0, 1], [True, False])
    df = report.load_runs(sorted((tmp_path / "byb").iterdir()))
    df.loc[df["run_name"] == "B50_ig", "B"] = 50
    assert report.group_keys(df) == ["method", "B"]
    for name in ("no_prior-20261201-000000-aaaaaa", "no_window-20261201-000000-bbbbbb"):
        _user_run(tmp_path / "abl", name, [0, 1], [True, False])
    df = report.load_runs(sorted((tmp_path / "abl").iterdir()))
    assert report.group_keys(df) == ["method", "B", "run_name"]
    assert len(report.aggregate(df)) == 2


def test_halves_of_one_folder_source_pool_and_pair_whatever_their_ids_look_like(tmp_path):
    """The int-or-string choice was made per run: folder users 00-09 stayed strings and 10-19 became integers, so
    pooling the halves crashed (sorting int against str) and pairing a half with the whole found no user."""
    def run(name, users):
        d = tmp_path / name
        d.mkdir()
        pd.DataFrame({"user": users, "method": "user_level", "B": 4, "dominant_class": 0,
                      "evaluator_correct": [u % 2 == 0 for u in range(len(users))],
                      "psnr_nearest": 10.0}).to_csv(d / "results.csv", index=False)
        return d

    ids = [f"{u:02d}" for u in range(20)]
    a = run("faces_u0-20261201-000000-aaaaaa", ids[:10])
    b = run("faces_u10-20261201-000000-bbbbbb", ids[10:])
    full = run("faces-20261201-000000-cccccc", ids)
    pooled = report.pool_users([a, b])
    assert list(pooled.index) == ids
    assert report.paired_counts(pooled, report.pool_users([b]))["n"] == 10
    assert report.paired_counts(report.pool_users([full]), report.pool_users([b]))["n"] == 10
    for odd in ("--3", "\u00b2", "1" * 20):  # look numeric to str.isdigit or overflow int64: names, no crash
        assert list(report.load_runs([run(f"odd{len(odd)}-20261201-000000-dddddd", [odd, "1"])])["user"]) == [odd, "1"]
