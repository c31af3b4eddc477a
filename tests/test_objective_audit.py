"""The objective audit (scripts/objective_audit.py) and the attack's layer_distances it builds on."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from inversion.scenario import make_server_view
from lightning_modules.user_level_inversion import UserLevelInversion
from tests.helpers import tiny_victim
from tests.test_attack_e2e import HAVE_FMNIST, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def load_audit():
    spec = importlib.util.spec_from_file_location("objective_audit_script", ROOT / "scripts" / "objective_audit.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass needs its module registered
    spec.loader.exec_module(mod)
    return mod


def _bound(images, labels, **kw):
    victim, _ = tiny_victim(size=8)
    view = make_server_view(victim, images, labels, 10)
    kw = {"use_prior": False, "final_denoise": False, **kw}
    return UserLevelInversion(**kw).bind(view, None)


def test_layer_distances_combine_to_the_attacks_matching_loss():
    torch.manual_seed(0)
    att = _bound(torch.rand(3, 1, 8, 8), torch.tensor([2, 2, 5]), output_weight=1.0)
    x = torch.rand(1, 1, 8, 8)
    d, logits = att.layer_distances(x)
    assert d.shape == (len(att.param_names),) and not d.requires_grad
    for progress in (0.0, 0.3, 1.0):
        w, _ = att.layer_weights(progress)
        expected = att.matching_loss(x.clone().requires_grad_(True), w)
        assert float((w * d).sum() / w.sum()) == pytest.approx(float(expected.detach()), abs=1e-6)
    assert torch.allclose(logits, att.victim(x), atol=1e-6)
    assert float(att.output_loss(x, logits)[0]) == pytest.approx(float(att.output_loss(x)[0].detach()), abs=1e-6)


def test_audit_scores_are_the_attacks_data_term_under_matching_reduction_sum():
    """scores_per_mode ignored matching_reduction: under 'sum' its scores were the 'mean' ones (a mu > 0 ranking
    then weighs the KL against a cosine term 7-62x smaller than the attack's)."""
    torch.manual_seed(2)
    images, labels = torch.rand(3, 1, 8, 8), torch.tensor([2, 2, 5])
    x = torch.rand(2, 1, 8, 8)
    got = {}
    for reduction in ("mean", "sum"):
        att = _bound(images, labels, output_weight=1.0, matching_reduction=reduction)
        got[reduction] = load_audit().scores_per_mode(att, x, progress=[0.3], output_weights=[0.0, 1.0])
        for (mode, mu), scores in got[reduction].items():
            w = att.layer_weights(0.3)[0] if mode.startswith("window") else None
            ref = att.matching_loss(x[:1].clone().requires_grad_(True), w) + mu * att.output_loss(x[:1])[0]
            assert float(scores[0]) == pytest.approx(float(ref.detach()), rel=1e-5)
    L = len(att.param_names)
    torch.testing.assert_close(got["sum"][("uniform", 0.0)], L * got["mean"][("uniform", 0.0)])


def test_layer_distances_vanish_at_a_one_image_users_own_image():
    torch.manual_seed(1)
    x = torch.rand(1, 1, 8, 8)
    att = _bound(x, torch.tensor([7]), label_strategy="idlg", output_weight=1.0)
    assert att.labels.dominant == 7
    d, logits = att.layer_distances(x)
    assert float(d.abs().max()) < 1e-4  # the dummy gradient of the user's own image and label is the target
    assert float(att.output_loss(x, logits)[0]) < 1e-5  # and pbar is that image's own softmax
    assert float(att.layer_distances(torch.rand(1, 1, 8, 8))[0].mean()) > 0.01


@pytest.mark.skipif(not HAVE_FMNIST, reason="needs `apt-get install dataset-fashion-mnist`")
def test_audit_scores_the_users_own_image_as_perfect_and_summarises_the_table(tmp_path):
    audit = load_audit()
    cfg = tiny_config(tmp_path, **{"users.init_args.batch_size": 1, "attack.init_args.label_strategy": "idlg",
                                   "users.init_args.first_user": 5})
    run_dir = audit.main(["--config", str(cfg), "--audit.per_class", "2", "--audit.output_weights", "[0, 1]",
                          "--audit.progress", "[0.0, 1.0]"])
    rows = list(csv.DictReader((run_dir / "audit.csv").open()))
    assert len(rows) == 2 * 3 * 2  # users x (uniform, window@0, window@1) x mu
    assert {r["user"] for r in rows} == {"5", "6"}  # the users' ids, as results.csv has them (was 0, 1)
    assert {(r["mode"], r["output_weight"]) for r in rows} == {
        (m, w) for m in ("uniform", "window@0", "window@1") for w in ("0.0", "1.0")}
    for r in rows:
        assert float(r["own_best_score"]) < 1e-3  # B = 1: the user's own image reproduces the target gradient
        assert float(r["best_score"]) <= float(r["best_score_dominant"])
        correct = int(r["objective_class"]) == int(r["dominant_class"])
        assert int(r["objective_correct"]) == correct and (int(r["dominant_rank"]) == 1) == correct
    summary = json.loads((run_dir / "summary.json").read_text())
    for key, s in summary["modes"].items():
        mode, mu = key.split(" mu=")
        mine = [r for r in rows if r["mode"] == mode and float(r["output_weight"]) == float(mu)]
        assert s["users"] == 2 and s["objective_correct"] == sum(int(r["objective_correct"]) for r in mine)
    assert "| uniform mu=0 | 2 |" in (run_dir / "summary.md").read_text()


@pytest.mark.skipif(not HAVE_FMNIST, reason="needs `apt-get install dataset-fashion-mnist`")
@pytest.mark.parametrize(
    "args, match",
    [
        (["--audit.per_class", "0"], "per_class"),
        (["--audit.progress", "[1.5]"], "progress"),
        (["--audit.output_weights", "[-1]"], "output_weights"),
        (["--attack", "InvertingGradients"], "user-level"),
    ],
)
def test_audit_bad_input_fails_before_any_run_dir(tmp_path, args, match):
    audit = load_audit()
    cfg = tiny_config(tmp_path)
    with pytest.raises(ValueError, match=match):
        audit.main(["--config", str(cfg), *args])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_collect_tabulates_the_runs_summaries(tmp_path):
    audit = load_audit()
    dirs = []
    for B, rnd, correct in ((50, False, 7), (10, True, 3), (10, False, 9)):
        d = tmp_path / f"audit_B{B}_{rnd}"
        d.mkdir()
        modes = {"uniform mu=0": {"users": 10, "objective_correct": correct}}
        if not rnd:
            modes["uniform mu=1"] = {"users": 10, "objective_correct": correct + 1}
        (d / "summary.json").write_text(json.dumps({"B": B, "random_init": rnd, "users": 10, "modes": modes}))
        dirs.append(str(d))
    md = audit.main(["collect", *dirs, "--out", str(tmp_path / "report")])
    rows = list(csv.reader((tmp_path / "report" / "objective_audit.csv").open()))
    assert rows == [
        ["B", "victim", "run", "users", "uniform mu=0", "uniform mu=1"],
        ["10", "trained", "audit_B10_False", "10", "9/10", "10/10"],
        ["50", "trained", "audit_B50_False", "10", "7/10", "8/10"],
        ["10", "random", "audit_B10_True", "10", "3/10", ""],
    ]
    assert "| 50 | trained | audit_B50_False | 10 | 7/10 | 8/10 |" in md.read_text()
    before = md.read_text()
    with pytest.raises(FileExistsError, match="never overwritten"):  # the table is not replaced
        audit.main(["collect", *dirs[:1], "--out", str(tmp_path / "report")])
    assert md.read_text() == before
    with pytest.raises(FileNotFoundError, match="summary.json"):
        audit.main(["collect", str(tmp_path), "--out", str(tmp_path / "r2")])
    attack_run = tmp_path / "fashion_mnist-20261202-000000-abcdef"  # an attack.py run among them: was a KeyError
    attack_run.mkdir()
    (attack_run / "summary.json").write_text(json.dumps({"status": "finished", "users": 3}))
    with pytest.raises(ValueError, match="lacks modes, random_init, B: .* is not an objective-audit run directory"):
        audit.main(["collect", *dirs, str(attack_run), "--out", str(tmp_path / "r3")])
    assert not (tmp_path / "r3").exists()


def test_a_test_split_pool_leaves_the_users_own_images_out(tmp_path):
    """With audit.pool_split test the candidate pool came from the users' own split and could hold their private
    images (which then score best for the wrong reason); they are left out now."""
    audit = load_audit()
    from datamodules.users import FashionMNISTUsers

    source = FashionMNISTUsers(num_users=2, batch_size=5, image_size=8)
    users = source.users()
    own = [j for u in users for j in u.meta["indices"]]
    spec = audit.AuditSpec(per_class=1000, pool_split="test")  # every test image of a class, but the users'
    x, y = audit.candidate_pool(source, spec, exclude=own)
    full_x, full_y = audit.candidate_pool(source, spec)
    assert len(full_x) == 10_000 and len(x) == 10_000 - len(set(own))
    flat = x.flatten(1)
    for u in users:
        for img in u.images.flatten(1):
            assert not (flat == img).all(1).any()


def test_help_describes_the_audit_not_the_attack(capsys):
    """`objective_audit.py --help` used to print attack.py's description ("Run a gradient inversion attack ...")."""
    with pytest.raises(SystemExit) as exit_:
        load_audit().main(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Objective audit: which class does the user-level attack's data term prefer" in out
    assert out.startswith("usage: objective_audit.py")
    assert "--audit.per_class" in out and "collect RUN_DIR" in out
    assert "Run a gradient inversion attack" not in out and "main job" not in out
