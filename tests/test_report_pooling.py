"""What inversion.report pools into one table row: runs of other configs stay apart (the ``setting`` column and
what differs, only when it splits a row), a user found twice (a rerun, a resumed copy, an interrupted cell and its
re-run) counts once, runs of other ``--seed`` values stay as more rows of the same users, and runs that did not
finish are named. Run directories are written as attack.py writes them (config.yaml from attack.py's own parser)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import attack
from inversion import report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_config() -> dict:
    parser = attack.build_parser()
    cfg = parser.parse_args(["--config", str(ROOT / "configs" / "attack" / "fashion_mnist.yaml")])
    return yaml.safe_load(attack.dump_config(parser, cfg))


def _edit(cfg: dict, **dotted) -> dict:
    """A copy of ``cfg`` with ``a__b__c=value`` set at a.b.c."""
    cfg = yaml.safe_load(yaml.safe_dump(cfg))
    for key, value in dotted.items():
        *path, leaf = key.split("__")
        node = cfg
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def _run(root: Path, cfg: dict, stamp: str, users: dict, status: str | None = "finished",
         hexid: str = "000000") -> Path:
    """A run directory ``<output.name>-<stamp>-<hexid>`` under ``root``: ``users`` maps user id -> psnr_nearest;
    summary.json with ``status`` (None: no summary.json, as a run killed hard)."""
    run = root / f"{cfg['output']['name']}-{stamp}-{hexid}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    pd.DataFrame({"user": list(users), "method": "UserLevelInversion", "B": 10, "dominant_class": 0,
                  "inferred_dominant": 0, "evaluator_correct": True, "psnr_nearest": list(users.values()),
                  "steps": cfg["attack"]["init_args"].get("steps", 0)}).to_csv(run / "results.csv", index=False)
    if status is not None:
        (run / "summary.json").write_text(json.dumps({"status": status, "users": len(users)}))
    return run


def test_runs_of_other_configs_are_two_rows_and_what_differs_is_named(tmp_path, base_config):
    """Two runs of one output.name, 5 and 60 steps, were one row ('steps 32.5 ± 29.4'); a second half of the
    5-step run (other user range and seeds) still pools with it."""
    five = _edit(base_config, attack__init_args__steps=5)
    sixty = _edit(base_config, attack__init_args__steps=60)
    half2 = _edit(five, users__init_args__first_user=2, seed=3)
    runs = [_run(tmp_path, five, "20261201-100000", {0: 10.0, 1: 12.0}),
            _run(tmp_path, sixty, "20261201-110000", {0: 20.0, 1: 22.0}),
            _run(tmp_path, half2, "20261201-120000", {2: 14.0})]
    out = report.build_report(runs, tmp_path / "rep")
    s = pd.read_csv(out / "summary.csv")
    assert len(s) == 2 and list(s.columns[:4]) == ["method", "B", "setting", "setting_diff"]
    rows = {r.setting_diff: r for r in s.itertuples()}
    assert set(rows) == {"attack.init_args.steps=5", "attack.init_args.steps=60"}
    assert rows["attack.init_args.steps=5"].n_users == 3 and rows["attack.init_args.steps=5"].steps_avg == 5
    assert rows["attack.init_args.steps=5"].psnr_nearest_avg == pytest.approx(12.0)
    assert rows["attack.init_args.steps=60"].n_users == 2 and rows["attack.init_args.steps=60"].steps_std == 0
    md = (out / "summary.md").read_text()
    assert "| method | B | setting | setting_diff | users |" in md and "attack.init_args.steps=60 | 2 |" in md


def test_refinished_runs_of_two_ablations_are_two_rows(tmp_path, base_config):
    """scripts/refinish.py names both refinished ablations extension_final_selection: no_prior's and no_window's
    were pooled as one row of 4 users."""
    sel = _edit(base_config, output__name="extension_final_selection", attack__init_args__final_candidates=32,
                attack__init_args__t_final=400)
    runs = [_run(tmp_path, _edit(sel, attack__init_args__use_prior=False), "20261201-100000", {0: 8.0, 1: 9.0}),
            _run(tmp_path, _edit(sel, attack__init_args__use_window=False), "20261201-100100", {0: 7.0, 1: 6.0})]
    s = pd.read_csv(report.build_report(runs, tmp_path / "rep") / "summary.csv")
    assert len(s) == 2 and list(s["n_users"]) == [2, 2]
    assert sorted(s["setting_diff"]) == ["attack.init_args.use_prior=false, attack.init_args.use_window=true",
                                         "attack.init_args.use_prior=true, attack.init_args.use_window=false"]


def test_runs_of_one_setting_give_the_table_as_before(tmp_path, base_config):
    """Halves of one run, other seeds and another device: one row, and no setting, setting_diff, rows or key
    columns, no notes (what every report of consistent runs looked like)."""
    runs = [_run(tmp_path, base_config, "20261201-100000", {0: 10.0, 1: 11.0}),
            _run(tmp_path, _edit(base_config, users__init_args__first_user=2, trainer__accelerator="gpu"),
                 "20261201-110000", {2: 12.0, 3: 13.0})]
    out = report.build_report(runs, tmp_path / "rep")
    s = pd.read_csv(out / "summary.csv")
    assert list(s.columns[:3]) == ["method", "B", "n_users"] and len(s) == 1 and s.loc[0, "n_users"] == 4
    assert not {"setting", "setting_diff", "n_rows", "user_key", "measurement_key"} & set(s.columns)
    md = (out / "summary.md").read_text()
    assert "| method | B | users |" in md and "## Notes" not in md and "rows (" not in md


def test_a_user_found_twice_counts_once_and_other_seeds_are_more_rows(tmp_path, base_config, capsys):
    """A rerun (same config and seeds) of users 0 and 1 and an interrupted newer copy of user 0: each user once,
    from the newest finished run; a --seed 7 run of the same users: the same 2 users, 2 more rows."""
    old = _run(tmp_path, base_config, "20261201-100000", {0: 1.0, 1: 1.0}, hexid="aaaaaa")
    rerun = _run(tmp_path, base_config, "20261201-110000", {0: 10.0, 1: 12.0}, hexid="bbbbbb")
    cut = _run(tmp_path, base_config, "20261201-120000", {0: 5.0}, status="interrupted", hexid="cccccc")
    seed7 = _run(tmp_path, _edit(base_config, seed=7), "20261201-130000", {0: 14.0, 1: 16.0}, hexid="dddddd")
    out = report.build_report([old, rerun, cut, seed7], tmp_path / "rep")
    s = pd.read_csv(out / "summary.csv")
    assert len(s) == 1 and s.loc[0, "n_users"] == 2 and s.loc[0, "n_rows"] == 4  # was n_users 7
    assert s.loc[0, "psnr_nearest_avg"] == pytest.approx((10 + 12 + 14 + 16) / 4)  # the rerun's rows and seed 7's
    assert s.loc[0, "psnr_nearest_n"] == 4
    # 4 rows of 2 users are not 4 independent trials: no Wilson interval (it would be too narrow)
    assert s.loc[0, "evaluator_accuracy"] == 1.0 and np.isnan(s.loc[0, "evaluator_accuracy_ci_low"])
    err = capsys.readouterr().err
    assert f"{old} repeats user(s) 0, 1 of {rerun}" in err and f"{cut} repeats user(s) 0 of {rerun}" in err
    assert str(seed7) + " repeats" not in err
    md = (out / "summary.md").read_text()
    assert "| UserLevelInversion | 10 | 2 | 4 |" in md and "| users | rows |" in md
    assert f"`{old}`: 0 rows (2 duplicate rows left out)" in md


def test_runs_that_did_not_finish_are_named(tmp_path, base_config, capsys):
    """An interrupted run, a diverged one and one without summary.json (killed) keep their users in the table, and
    the report says which runs they are (they were pooled silently)."""
    runs = [_run(tmp_path, _edit(base_config, users__init_args__first_user=u), f"20261201-10000{u}", {u: 10.0 + u},
                 status=st) for u, st in enumerate(["finished", "interrupted", "diverged: NaN loss at step 3", None])]
    out = report.build_report(runs, tmp_path / "rep")
    assert pd.read_csv(out / "summary.csv").loc[0, "n_users"] == 4
    err = capsys.readouterr().err
    assert f"{runs[1]} ended with status 'interrupted'" in err and f"{runs[2]} ended with status 'diverged" in err
    assert f"{runs[3]} has no summary.json" in err and str(runs[0]) not in err
    md = (out / "summary.md").read_text()
    assert "## Notes" in md and f"{runs[1]} ended with status 'interrupted'" in md
    # a run interrupted before its first user finished has no results.csv: it refused the whole report
    early = _run(tmp_path, _edit(base_config, users__init_args__first_user=9), "20261201-110000", {9: 1.0},
                 status="interrupted", hexid="eeeeee")
    (early / "results.csv").unlink()
    out = report.build_report([*runs, early], tmp_path / "rep2")
    assert pd.read_csv(out / "summary.csv").loc[0, "n_users"] == 4
    assert f"{early} has no results.csv (status 'interrupted': no user finished)" in (out / "summary.md").read_text()
    with pytest.raises(ValueError, match="none of the 1 run directories has results.csv"):
        report.build_report([early], tmp_path / "rep3")


def test_privacy_markdown_shows_the_setting_when_it_varies(tmp_path, base_config):
    """A DP sweep of the full attack beside an undefended no-prior ablation: privacy.csv had a setting column but
    summary.md's privacy table did not, so the two undefended rows looked the same."""
    dp = [{"name": "gaussian_dp", "clip_norm": 1.0, "sigma": 0.01, "seed": 0}]
    runs = []
    for i, (cfg, defenses) in enumerate([(base_config, []), (base_config, dp),
                                         (_edit(base_config, attack__init_args__use_prior=False), [])]):
        run = _run(tmp_path, _edit(cfg, threat__defenses=defenses), f"20261201-10000{i}", {0: 10.0, 1: 11.0})
        rows = pd.read_csv(run / "results.csv").assign(defense="gaussian_dp(clip_norm=1.0,sigma=0.01)" if defenses
                                                       else "none", defense_strength=0.01 if defenses else None)
        rows.to_csv(run / "results.csv", index=False)
        runs.append(run)
    out = report.build_report(runs, tmp_path / "rep")
    p = pd.read_csv(out / "privacy.csv")
    assert len(p) == 3 and p["setting"].nunique() == 2
    md = (out / "summary.md").read_text()
    privacy_md = md.split("## Privacy", 1)[1].split("## Figures", 1)[0]
    assert "| setting | setting_diff |" in privacy_md
    assert "attack.init_args.use_prior=false" in privacy_md and "attack.init_args.use_prior=true" in privacy_md


def test_the_privacy_curve_counts_a_measurement_found_under_two_run_names_once(tmp_path, base_config):
    """The same undefended cell under another output.name (a control copy) stays a row of its own in the tables,
    but the privacy curve pools run names: it counted each of its users twice (4 PSNR values for 2 users, no Wilson
    interval)."""
    dp = [{"name": "gaussian_dp", "clip_norm": 1.0, "sigma": 0.01, "seed": 0}]
    runs = []
    for i, (name, defenses) in enumerate([("cell", []), ("control_none", []), ("cell", dp)]):
        run = _run(tmp_path, _edit(base_config, threat__defenses=defenses, output__name=name), f"20261201-10000{i}",
                   {0: 10.0, 1: 11.0})
        rows = pd.read_csv(run / "results.csv").assign(defense="gaussian_dp(clip_norm=1.0,sigma=0.01)" if defenses
                                                       else "none", defense_strength=0.01 if defenses else None)
        rows.to_csv(run / "results.csv", index=False)
        runs.append(run)
    out = report.build_report(runs, tmp_path / "rep")
    none = pd.read_csv(out / "privacy.csv").query("defense == 'none'").iloc[0]
    assert none["n_users"] == 2 and none["psnr_nearest_n"] == 2 and not np.isnan(none["evaluator_accuracy_ci_low"])
    assert "privacy curve: " in (out / "summary.md").read_text()  # which copy was left out of the curve


def test_setting_diff_labels_name_what_differs():
    entries = {"cfg-a": {"attack.steps": 5, "attack.use_prior": True, "k": [1, 2]},
               "cfg-b": {"attack.steps": 60, "attack.use_prior": True, "k": [1, 2], "new": None},
               "cfg-c": {"attack.steps": 5, "attack.use_prior": False, "k": [1, 3], "new": "x"}}
    assert report.setting_diff_labels(entries, ["cfg-a", "cfg-b"]) == {
        "cfg-a": "attack.steps=5, new=(unset)", "cfg-b": "attack.steps=60, new=null"}
    labels = report.setting_diff_labels(entries, ["cfg-a", "cfg-c", None], max_keys=2)
    assert labels == {"cfg-a": "attack.use_prior=true, k=[1, 2], +1 more",
                      "cfg-c": "attack.use_prior=false, k=[1, 3], +1 more", None: "(config unreadable)"}
    assert report.setting_diff_labels(entries, ["cfg-a", "cfg-a"]) == {"cfg-a": ""}  # alone in its row group


def test_runs_of_one_config_under_two_names_keep_their_users(tmp_path, base_config, capsys):
    """A control cell and the same cell of another sweep (one config, two output.name): the older run's users were
    dropped as duplicates of the newer run's and its run_name row disappeared (a warning instead)."""
    ctrl = _run(tmp_path, _edit(base_config, output__name="A_ctrl"), "20261201-100000", {0: 10.0, 1: 11.0})
    full = _run(tmp_path, _edit(base_config, output__name="B_full"), "20261201-110000", {0: 20.0, 1: 21.0})
    out = report.build_report([ctrl, full], tmp_path / "rep")
    s = pd.read_csv(out / "summary.csv")
    assert list(s["run_name"]) == ["A_ctrl", "B_full"] and list(s["n_users"]) == [2, 2]
    assert list(s["psnr_nearest_avg"]) == [pytest.approx(10.5), pytest.approx(20.5)]
    assert "repeats user(s)" not in capsys.readouterr().err
    # the same name twice is still a rerun: counted once
    rerun = _run(tmp_path, _edit(base_config, output__name="B_full"), "20261201-120000", {0: 30.0, 1: 31.0})
    s = pd.read_csv(report.build_report([ctrl, full, rerun], tmp_path / "rep2") / "summary.csv")
    assert list(s["n_users"]) == [2, 2] and list(s["psnr_nearest_avg"]) == [pytest.approx(10.5), pytest.approx(30.5)]
    assert f"{full} repeats user(s) 0, 1 of {rerun}" in capsys.readouterr().err


def test_path_spellings_do_not_split_a_run(tmp_path, base_config, monkeypatch):
    """The halves of one run, one written with relative paths (from the current directory, or from the repository
    root as attack.py also resolves them) and one with absolute ones or through a symlink, were two rows."""
    work = tmp_path / "work"
    (work / "ckpt" / "victim").mkdir(parents=True)
    (work / "ckpt" / "prior").mkdir()
    (work / "ckpt" / "evaluator.ckpt").write_text("x")
    (tmp_path / "link").symlink_to(work / "ckpt", target_is_directory=True)
    monkeypatch.chdir(work)
    rel = _edit(base_config, victim__checkpoint="ckpt/victim", prior__path="ckpt/prior",
                evaluation__evaluator="ckpt/evaluator.ckpt", users__init_args__root="configs/attack")
    absolute = _edit(rel, victim__checkpoint=str(work / "ckpt" / "victim"), prior__path=str(tmp_path / "link/prior"),
                     evaluation__evaluator=str(work / "ckpt/./evaluator.ckpt"),
                     users__init_args__root=str(ROOT / "configs" / "attack"), users__init_args__first_user=2)
    runs = [_run(tmp_path / "runs", rel, "20261201-100000", {0: 10.0, 1: 11.0}),
            _run(tmp_path / "runs", absolute, "20261201-110000", {2: 12.0, 3: 13.0})]
    s = pd.read_csv(report.build_report(runs, tmp_path / "rep") / "summary.csv")
    assert len(s) == 1 and s.loc[0, "n_users"] == 4 and "setting" not in s.columns
    # a path that names another folder still splits; a string naming nothing is kept as written
    other = _edit(rel, victim__checkpoint="ckpt/prior", users__init_args__first_user=4)
    runs.append(_run(tmp_path / "runs", other, "20261201-120000", {4: 14.0}))
    s = pd.read_csv(report.build_report(runs, tmp_path / "rep2") / "summary.csv")
    assert sorted(s["n_users"]) == [1, 4] and s["setting_diff"].str.startswith("victim.checkpoint=").all()
    assert report._real_path("no/such/thing") == "no/such/thing" and report._real_path("ckpt") == str(work / "ckpt")


def _unparsed(cfg: dict, **dotted) -> dict:
    """``cfg`` as an older attack.py wrote it: an option since removed (the parser no longer reads the file) and
    without the options added since (evaluation.face_gallery_users)."""
    cfg = _edit(cfg, evaluation__retired_option=3, **dotted)
    del cfg["evaluation"]["face_gallery_users"]
    return cfg


def test_a_config_the_parser_no_longer_reads_pools_on_the_keys_it_sets(tmp_path, base_config):
    """An older run's config (the raw YAML, no defaults) was its own setting beside a newer run of the same config
    (setting_diff 'evaluation.face_gallery_users=(unset)' vs '=0'); now it pools with the parsed setting it agrees
    with on every key it sets, and an old ablation (another value of a key it sets) stays apart, labelled."""
    old = _run(tmp_path, _unparsed(base_config), "20261201-100000", {0: 10.0, 1: 11.0})
    assert report._read_config(old / "config.yaml")[1] is False  # the raw-YAML fallback
    new = _run(tmp_path, _edit(base_config, users__init_args__first_user=2), "20261201-110000", {2: 12.0, 3: 13.0})
    s = pd.read_csv(report.build_report([old, new], tmp_path / "rep") / "summary.csv")
    assert len(s) == 1 and s.loc[0, "n_users"] == 4 and "setting" not in s.columns
    ablation = _run(tmp_path, _unparsed(base_config, attack__init_args__use_prior=False, users__init_args__first_user=4),
                    "20261201-120000", {4: 14.0})
    s = pd.read_csv(report.build_report([old, new, ablation], tmp_path / "rep2") / "summary.csv")
    rows = {r.setting_diff: r.n_users for r in s.itertuples()}
    assert rows == {"attack.init_args.use_prior=true": 4,
                    "attack.init_args.use_prior=false, (unparsed config)": 1}
    # agreeing with two parsed settings (it does not set the key they differ in): which one is not known, kept apart
    sixty = _run(tmp_path, _edit(base_config, attack__init_args__steps=60), "20261201-130000", {0: 20.0})
    vague = _unparsed(base_config, users__init_args__first_user=6)
    del vague["attack"]["init_args"]["steps"]
    vague_run = _run(tmp_path, vague, "20261201-140000", {6: 9.0})
    s = pd.read_csv(report.build_report([old, new, sixty, vague_run], tmp_path / "rep3") / "summary.csv")
    assert sorted(s["n_users"]) == [1, 1, 4] and "(unparsed config)" in set(s["setting_diff"])


def test_sweep_reports_pool_cells_that_differ_only_in_seed_or_user_range(tmp_path, base_config):
    """sweep.py names each cell by its grid values (seed=0, seed=1): run_name split every row per cell, so a seed
    axis gave one row per seed instead of repeated measurements of the same users. With pool_run_names (what
    sweep.py passes) they pool; a cell of another config still gets its own row through setting."""
    s0 = _run(tmp_path, _edit(base_config, output__name="seed=0", seed=0), "20261201-100000", {0: 10.0, 1: 12.0})
    s1 = _run(tmp_path, _edit(base_config, output__name="seed=1", seed=1), "20261201-110000", {0: 14.0, 1: 16.0})
    other = _run(tmp_path, _edit(base_config, output__name="steps=5", attack__init_args__steps=5),
                 "20261201-120000", {0: 30.0})
    split = pd.read_csv(report.build_report([s0, s1], tmp_path / "split") / "summary.csv")
    assert list(split["run_name"]) == ["seed=0", "seed=1"]  # the default: names are experiments
    pooled = pd.read_csv(report.build_report([s0, s1, other], tmp_path / "pooled", pool_run_names=True)
                         / "summary.csv")
    assert "run_name" not in pooled.columns and len(pooled) == 2
    rows = {r.setting_diff: r for r in pooled.itertuples()}
    assert set(rows) == {"attack.init_args.steps=200", "attack.init_args.steps=5"}
    seeds = rows["attack.init_args.steps=200"]  # both seeds' rows of users 0 and 1: 2 users, 4 measurements
    assert seeds.n_users == 2 and seeds.psnr_nearest_avg == pytest.approx(13.0)
    assert rows["attack.init_args.steps=5"].n_users == 1 and rows["attack.init_args.steps=5"].psnr_nearest_avg == 30.0
    # one name per setting (an ablation sweep's cells): the names stay as the rows' labels
    abl = pd.read_csv(report.build_report([s0, other], tmp_path / "abl", pool_run_names=True) / "summary.csv")
    assert list(abl["run_name"]) == ["seed=0", "steps=5"] and list(abl["n_users"]) == [2, 1]


def test_pooled_cell_names_count_a_shared_user_once(tmp_path, base_config):
    """With pool_run_names the run name was still part of a measurement's identity: two cells that differ only in
    num_users (users 0-1 and 0-3, same seeds) were one row with users 0 and 1 counted twice (PSNR mean 19.0)."""
    a = _run(tmp_path, _edit(base_config, output__name="num_users=2", users__init_args__num_users=2),
             "20261201-100000", {0: 10.0, 1: 12.0})
    b = _run(tmp_path, _edit(base_config, output__name="num_users=4", users__init_args__num_users=4),
             "20261201-110000", {0: 20.0, 1: 22.0, 2: 24.0, 3: 26.0})
    s = pd.read_csv(report.build_report([a, b], tmp_path / "rep", pool_run_names=True) / "summary.csv")
    assert len(s) == 1 and s["n_users"].iloc[0] == 4
    assert s["psnr_nearest_avg"].iloc[0] == pytest.approx(23.0)  # the newer cell's rows of users 0 and 1


def test_label_hits_count_a_tied_top_class_and_leave_unmeasured_rows_out():
    """The hand-built tables counted label inference as inferred == dominant: a class tied for the top count was a
    miss and an empty cell a failure, unlike the report's label_accuracy."""
    df = pd.DataFrame({"dominant_class": [0, 3, 1], "inferred_dominant": [2, 3, np.nan],
                       "true_histogram": ["5 0 5", "0 0 0 9", "0 4"]})
    assert report.label_hits(df).tolist()[:2] == [1.0, 1.0] and np.isnan(report.label_hits(df).iloc[2])
    assert report.count_cell(report.label_hits(df)) == "2/2"
    assert report.aggregate(df.assign(method="m", B=10, user=[0, 1, 2]), keys=["method", "B"]).loc[0, "label_accuracy"] == 1.0


def test_pooling_and_pairing_refuse_users_of_different_sources(tmp_path, base_config):
    """pool_users and paired_counts matched users by bare id: user 3 at B = 50 and user 3 at B = 100 (different
    batches) were pooled or paired as one user. Halves that differ only in the user range and the data's folder (a
    GPU machine's copy of the files) still pool."""
    b50 = _edit(base_config, users__init_args__batch_size=50, output__name="b50")
    b50_u10 = _edit(b50, users__init_args__first_user=10, users__init_args__root=str(tmp_path))  # data elsewhere
    b100 = _edit(base_config, users__init_args__batch_size=100, output__name="b100")
    r50 = _run(tmp_path, b50, "20260101-000000", {0: 10.0, 1: 11.0})
    r50b = _run(tmp_path, b50_u10, "20260101-000001", {10: 12.0})
    r100 = _run(tmp_path, b100, "20260101-000000", {0: 9.0, 1: 8.0})
    r100b = _run(tmp_path, _edit(b100, users__init_args__first_user=20), "20260101-000001", {20: 9.0})
    assert list(report.pool_users([r50, r50b]).index) == [0, 1, 10]
    with pytest.raises(ValueError, match="attack users of different sources .*b50-20260101-000000-000000.*"
                                         "Pool runs of one user configuration"):
        report.pool_users([r50, r100b])  # disjoint ids: this pooled B = 50 and B = 100 users into one row
    with pytest.raises(ValueError, match="paired_counts: a and b attack users of different sources"):
        report.paired_counts(report.pool_users([r50]), report.pool_users([r100]))
    with pytest.raises(ValueError, match="changed_count: a and b attack users of different sources"):
        report.changed_count(report.pool_users([r50]), report.pool_users([r100]), "psnr_nearest")
    assert report.paired_counts(report.pool_users([r50]), report.pool_users([r50, r50b]))["n"] == 2


def test_newest_run_prefers_the_fuller_copy_of_one_run_whatever_the_root_order(tmp_path, base_config):
    """Two copies of one run folder (a partial run kept in git and the copy that went on) tied on the name, and the
    first root given won however many users it held."""
    cfg = _edit(base_config, output__name="dlg")
    stale = _run(tmp_path / "kept", cfg, "20260101-000000", {0: 1.0, 1: 1.0, 2: 1.0}, status="interrupted")
    live = _run(tmp_path / "runs", cfg, "20260101-000000", {u: 1.0 for u in range(8)}, status="interrupted")
    for roots in ([tmp_path / "kept", tmp_path / "runs"], [tmp_path / "runs", tmp_path / "kept"]):
        assert report.newest_run(roots, "dlg") == live
    (stale / "summary.json").write_text(json.dumps({"status": "finished"}))  # finished beats more rows
    assert report.newest_run([tmp_path / "runs", tmp_path / "kept"], "dlg") == stale
    newer = _run(tmp_path / "kept", cfg, "20260102-000000", {0: 1.0}, status=None)  # a later stamp still wins
    assert report.newest_run([tmp_path / "runs", tmp_path / "kept"], "dlg") == newer


def _load_table(folder: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"table_{folder}", ROOT / "reports" / folder / "table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _table_run(root: Path, cfg: dict, name: str, extra: dict) -> Path:
    run = _run(root, _edit(cfg, output__name=name), "20260101-000000", {0: 7.0, 1: 8.0})
    df = pd.read_csv(run / "results.csv")
    for col in ("ssim_nearest", "lpips_nearest", "lpips_mean", "seconds", "seconds_per_step"):
        df[col] = 1.0
    df["evaluator_correct_raw"] = 1
    for col, values in extra.items():
        df[col] = values
    df.to_csv(run / "results.csv", index=False)
    return run


def test_the_report_tables_leave_unmeasured_users_out_and_run_without_their_reference(tmp_path, base_config, capsys):
    """The methods table counted a user without a measured all-B share as not 'most read as the class' (NaN > 0.5
    is False) while the share column beside it left that user out; the ablation table raised TypeError when its
    U = 1 reference run was missing."""
    _table_run(tmp_path, base_config, "B100_trained_ig_u0", {"all_evaluator_dominant_share": [0.8, float("nan")]})
    _load_table("fmnist_b10_methods_20users_cpu").main([tmp_path], bs=(100,))
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| Inverting Gradients"))
    assert "| 0.80 | 1/1 |" in row, row  # was "| 0.80 | 1/2 |"
    _table_run(tmp_path, base_config, "B10_trained_no_prior", {"evaluator_class": [3, 4]})
    _load_table("fmnist_b10_20users_ablations_cpu").main([tmp_path])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| no prior"))
    assert row.startswith("| no prior | 2 | 2/2 | 2/2 | 2/2 | - |"), row


def test_pool_run_names_on_the_command_line_pools_the_halves_of_split_cells_but_not_two_victims(tmp_path, base_config,
                                                                                               capsys):
    """The README said the halves of a split cell (`..._u0`, `..._u10`) pool with `--variants ''`, which also pooled
    the trained and the random victim's cells into one row (a note on stderr only). `--pool-run-names` pools the
    halves and keeps the victims apart; `--variants ''` now says what it pooled under Notes in summary.md too."""
    runs = []
    for victim, psnr in (("trained", 10.0), ("random", 20.0)):
        for first in (0, 10):
            cfg = _edit(base_config, output__name=f"B10_{victim}_u{first}", users__init_args__first_user=first,
                        victim__random_init=victim == "random")
            runs.append(_run(tmp_path, cfg, f"2026120{1 + len(runs)}-100000",
                             {first: psnr + first / 10, first + 1: psnr + first / 10}))
    assert report.main([*map(str, runs), "--out", str(tmp_path / "rep"), "--pool-run-names"]) in (0, None)
    s = pd.read_csv(tmp_path / "rep" / "summary.csv")
    assert "run_name" not in s.columns and len(s) == 2
    by_victim = {"random" if "random_init=true" in r.setting_diff.lower() else "trained": r for r in s.itertuples()}
    assert by_victim["trained"].n_users == 4 and by_victim["trained"].psnr_nearest_avg == pytest.approx(10.5)
    assert by_victim["random"].n_users == 4 and by_victim["random"].psnr_nearest_avg == pytest.approx(20.5)
    report.main([*map(str, runs), "--out", str(tmp_path / "mixed"), "--variants", ""])
    mixed = tmp_path / "mixed"
    assert len(pd.read_csv(mixed / "summary.csv")) == 1
    assert "pools runs of different settings into one row" in (mixed / "summary.md").read_text()


def test_a_composition_whose_second_defense_varies_is_one_privacy_curve_over_that_parameter(tmp_path, base_config):
    """pruning(keep 0.1) + DP noise at two sigmas: the strength was the pruning's keep fraction (the first defense
    holding a strength key) for both, so the two sigmas were one x and two one-point lines; now the sigma is the x
    of the privacy table and curve (summary.csv keeps results.csv's value)."""
    runs = []
    for i, sigma in enumerate([None, 0.001, 0.01]):
        run = _run(tmp_path, _edit(base_config, output__name="cell"), f"20261201-10000{i}", {0: 10.0 + i, 1: 11.0 + i})
        label = "none" if sigma is None else f"topk_pruning(keep_fraction=0.1)+gaussian_dp(clip_norm=1.0,sigma={sigma})"
        rows = pd.read_csv(run / "results.csv").assign(defense=label, defense_strength=None if sigma is None else 0.1)
        rows.to_csv(run / "results.csv", index=False)
        runs.append(run)
    out = report.build_report(runs, tmp_path / "rep")
    privacy = pd.read_csv(out / "privacy.csv")
    defended = privacy[privacy["defense"] != "none"].sort_values("defense_strength")
    assert list(defended["defense_strength"]) == [0.001, 0.01]
    assert list(defended["psnr_nearest_avg"]) == pytest.approx([11.5, 12.5])
    assert set(pd.read_csv(out / "summary.csv")["defense_strength"].dropna()) == {0.1}


def test_strength_params_choose_the_parameter_that_makes_curves():
    comp = "topk_pruning(keep_fraction={k})+gaussian_dp(clip_norm=1.0,sigma={s})"
    sweep = [comp.format(k=0.1, s=s) for s in (0.001, 0.01, 0.1)]
    assert report.strength_params(sweep) == {lab: (1, "sigma") for lab in sweep}
    assert {report._defense_kind(lab, (1, "sigma")) for lab in sweep} == {
        "topk_pruning(keep_fraction=0.1)+gaussian_dp(clip_norm=1.0)"}
    # one more cell at another keep fraction does not turn the sigma sweep back into one-point lines
    more = sweep + [comp.format(k=0.5, s=0.01)]
    assert set(report.strength_params(more).values()) == {(1, "sigma")}
    # clipping only (sigma 0): a curve over the clip norm; next to nonzero noise the clip norm is not a strength
    clip = [f"gaussian_dp(clip_norm={c},sigma=0.0)" for c in (0.1, 1.0, 10.0)]
    assert set(report.strength_params(clip + ["none"]).values()) == {(0, "clip_norm"), None}
    noisy = [f"gaussian_dp(clip_norm={c},sigma=0.5)" for c in (0.1, 1.0)]
    assert set(report.strength_params(noisy).values()) == {(0, "sigma")}
    # nothing varies: attack.defense_label's choice
    assert report.strength_params(["gaussian_dp(clip_norm=1.0,sigma=0.01)"]) == {
        "gaussian_dp(clip_norm=1.0,sigma=0.01)": (0, "sigma")}
    # a list value's commas and brackets do not split; an item without '=' stays as written
    assert report._defense_parts("foo(a=[1, 2],sigma=0.1)+bar(x)") == [
        ("foo", [("a", "[1, 2]"), ("sigma", "0.1")]), ("bar", [("x", None)])]
    assert report._defense_kind("foo(a=[1, 2],sigma=0.1)+bar(x)") == "foo(a=[1, 2])+bar(x)"
    assert report._defense_parts("none") == [] and report._defense_kind("none") == "none"
