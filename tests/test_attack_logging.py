"""What attack.py sends to the logger and says on the console: loss curves, W&B across a resume, the run seed,
the FedAvg target when B is hidden."""

from __future__ import annotations

import csv
import json
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attack
from tests.test_attack_e2e import tiny_config


def test_typed_table_gives_each_column_one_type():
    """Rows read back from results.csv on --resume hold strings where new rows hold numbers (W&B's Table refused
    the mix: 'Number not assignable to None or String')."""
    rows = [
        {"user": "0", "steps": "4", "psnr": "12.5", "correct": "True", "name": "012", "lpips": "", "labels": "3;3"},
        {"user": 1, "steps": 4, "psnr": 13.0, "correct": False, "name": "013", "lpips": 0.1, "labels": [3, 3]},
    ]
    keys = list(rows[0])
    data = attack.typed_table(rows, keys)
    assert data[0] == [0, 4, 12.5, True, "012", None, "3;3"]
    assert data[1] == [1, 4, 13.0, False, "013", 0.1, "[3, 3]"]  # a column of strings and lists: all strings
    assert type(data[0][0]) is int and type(data[0][2]) is float
    # an int column whose string does not parse as an int: strings throughout, never a mix
    assert attack.typed_table([{"k": "2.5"}, {"k": 3}], ["k"]) == [["2.5"], ["3"]]
    # only strings (a run that resumed with nothing left to do): left as they are
    assert attack.typed_table([{"k": "1"}, {"k": ""}], ["k"]) == [["1"], [""]]


def test_log_final_reads_resumed_users_grids_from_their_png(tmp_path):
    """The final grid has every user: those of this process from their tensors, those finished before a resume
    from users/<uid>/grid.png, stacked in row order exactly as one make_grid of all of them would be."""
    from torchvision.utils import make_grid

    class Logger:
        images: list = []

        def log_image(self, key, images, step=None, caption=None):
            self.images.append(images[0])

        def log_metrics(self, metrics, step=None):
            pass

    g0 = torch.rand(5, 3, 4, 4)
    g1 = torch.rand(4, 3, 4, 4)
    attack.save_png(tmp_path / "users" / "user_0000" / "grid.png", g0, nrow=len(g0))  # as write_user saves it
    rows = [{"user": "0", "user_dir": "users/user_0000"}, {"user": 1, "user_dir": "users/user_0001"}]
    log = Logger()
    attack.log_final(log, tmp_path, rows, {"1": g1})
    (img,) = log.images
    padded = torch.cat([g0, g1, torch.ones(1, 3, 4, 4)])  # user 1 right-padded with a white image
    want = (make_grid(padded, nrow=5, padding=2, pad_value=1.0).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert img.shape == want.shape and np.abs(img.astype(int) - want.astype(int)).max() <= 1


def test_loss_curves_have_a_point_per_step_for_short_attacks(tmp_path):
    """Lightning's default log_every_n_steps (50) left a 4-step attack with no matching/prior curve at all."""
    assert attack.default_log_every(4) == 1 and attack.default_log_every(300) == 1
    assert attack.default_log_every(4000) == 20
    cfg = tiny_config(tmp_path, **{"logger.backend": "csv", "users.init_args.num_users": 1, "image_log_every": 0})
    run_dir = attack.main(["--config", str(cfg)])
    (metrics,) = run_dir.glob("logs/**/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    steps = sorted({int(r["step"]) for r in rows if r.get("user_0000/match")})
    assert steps == [0, 1, 2, 3]
    # the run's final/* summary reaches the CSV too (CSVLogger wrote only every 100 steps: it was never flushed)
    final = [r for r in rows if r.get("final/psnr_nearest_mean")]
    (result,) = list(csv.DictReader((run_dir / "results.csv").open()))
    assert len(final) == 1 and float(final[0]["final/psnr_nearest_mean"]) == pytest.approx(float(result["psnr_nearest"]))
    assert final[0]["step"] == "4"  # after the attack's steps 0-3 (it was 0: the CSV buffer's length after a flush)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert Path(summary["run_dir"]).is_absolute() and Path(summary["run_dir"]) == run_dir.resolve()


def test_attack_init_args_log_images_every_is_honoured(tmp_path):
    """--attack.init_args.log_images_every was accepted, written to config.yaml and then overwritten by the
    top-level image_log_every (0): no reconstruction was logged."""
    cfg = tiny_config(tmp_path, **{"logger.backend": "csv", "users.init_args.num_users": 1, "image_log_every": 0,
                                   "attack.init_args.log_images_every": 2})
    run_dir = attack.main(["--config", str(cfg)])
    recs = sorted(p.name for p in run_dir.glob("logs/**/images/*reconstruction*.png"))
    assert len(recs) == 3, recs  # steps 0 and 2, and the last step


def test_run_seed_changes_the_attack_but_not_the_users(tmp_path):
    """--seed only called seed_everything, which the attack's own generators ignore: a sweep over seed ran the
    same attack twice."""
    assert attack.effective_attack_seed(5, 0) == 5
    assert attack.effective_attack_seed(0, 1) != attack.effective_attack_seed(1, 0)
    assert attack.effective_attack_seed(0, 1) != attack.effective_attack_seed(0, 2)
    cfg = tiny_config(tmp_path, **{"logger.backend": "none", "users.init_args.num_users": 1, "image_log_every": 0})
    a = attack.main(["--config", str(cfg)])
    b = attack.main(["--config", str(cfg), "--seed", "3"])
    c = attack.main(["--config", str(cfg), "--seed", "3"])
    u = Path("users/user_0000")
    assert (a / u / "batch.png").read_bytes() == (b / u / "batch.png").read_bytes()  # the same client
    ra, rb, rc = (torch.load(d / u / "raw.pt") for d in (a, b, c))
    # another attack, reproducibly (to float rounding: CI runs torch with 2 threads, whose CPU reductions in the double
    # backward may round differently from run to run; bit-equal with OMP_NUM_THREADS=1)
    assert (ra - rb).abs().max() > 1e-2 and torch.allclose(rb, rc, atol=1e-4, rtol=0)


def test_fedavg_target_with_hidden_batch_size_uses_only_what_the_server_knows():
    """With B hidden and mini-batches of b, the server cannot divide by the local steps E * ceil(B / b): the target
    was delta / (lr * steps) all the same, a scale that gave B away."""
    from datamodules.users import User
    from inversion.fedavg import fedavg_client_update
    from tests.helpers import tiny_victim

    victim, _ = tiny_victim(8, 1, num_classes=10, seed=0)
    g = torch.Generator().manual_seed(0)
    user = User(3, torch.rand(6, 1, 8, 8, generator=g), torch.tensor([1, 1, 1, 2, 1, 1]), 1, 0)
    upd = fedavg_client_update(victim, user.images, user.labels, epochs=2, local_lr=0.05, local_batch_size=2, seed=3)
    assert upd.local_steps == 6
    for reveal, steps in ((True, 6), (False, 2)):  # hidden B: lr x epochs
        threat = attack.ThreatSpec(protocol="fedavg", fedavg_epochs=2, fedavg_lr=0.05, fedavg_batch_size=2,
                                   reveal_batch_size=reveal)
        view = attack.client_update(victim, user, threat, 10)
        assert view.meta["pseudo_gradient_steps"] == steps
        for name, d in upd.delta.items():
            torch.testing.assert_close(view.target_gradient[name], d / (0.05 * steps))
    # full-batch local steps: one per epoch, known to the server even without B
    threat = attack.ThreatSpec(protocol="fedavg", fedavg_epochs=2, fedavg_lr=0.05, reveal_batch_size=False)
    view = attack.client_update(victim, user, threat, 10)
    assert view.meta["pseudo_gradient_steps"] == 2 and "local_steps" not in view.meta


def test_fedavg_shuffle_reorders_the_local_mini_batches_per_user():
    """threat.fedavg_shuffle reaches the client: its mini-batches follow a per-epoch permutation seeded by the user
    (the option existed in inversion/fedavg.py but attack.py always trained in data order)."""
    from datamodules.users import User
    from inversion.fedavg import fedavg_client_update
    from tests.helpers import tiny_victim

    victim, _ = tiny_victim(8, 1, num_classes=10, seed=0)
    g = torch.Generator().manual_seed(0)
    user = User(3, torch.rand(6, 1, 8, 8, generator=g), torch.tensor([1, 1, 1, 2, 1, 1]), 1, 0)
    kw = dict(protocol="fedavg", fedavg_epochs=2, fedavg_lr=0.1, fedavg_batch_size=2)
    plain = attack.client_update(victim, user, attack.ThreatSpec(**kw), 10).target_gradient
    mixed = attack.client_update(victim, user, attack.ThreatSpec(**kw, fedavg_shuffle=True), 10).target_gradient
    upd = fedavg_client_update(victim, user.images, user.labels, epochs=2, local_lr=0.1, local_batch_size=2,
                               shuffle=True, seed=3)
    for name, d in upd.delta.items():
        torch.testing.assert_close(mixed[name], d / (0.1 * 6))
    assert any(not torch.allclose(plain[n], mixed[n]) for n in plain)


@pytest.mark.slow
def test_wandb_run_survives_an_interrupt_and_a_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C: the W&B run is closed as failed with the finished user's table, and the message gives a resume
    command that works. The resume starts a second W&B run (offline runs cannot resume: a fresh id, the same
    group), its table mixes the resumed (string) and new rows without W&B refusing it, and its final grid has both
    users."""
    from tests.helpers import interrupt_user_at

    cfg = tiny_config(tmp_path, **{"image_log_every": 0})
    spy = interrupt_user_at(monkeypatch, "user_0001/", 1)
    with pytest.raises(SystemExit):
        attack.main(["--config", str(cfg)])
    (run_dir,) = (tmp_path / "runs").iterdir()
    err = capsys.readouterr().err
    hint = f"python attack.py --config {run_dir / 'config.yaml'} --resume {run_dir}"
    assert hint in err
    ((run_id, _),) = attack.wandb_attempts(run_dir)
    (first,) = run_dir.glob(f"wandb/offline-run-*-{run_id}")
    (table,) = (first / "files" / "media" / "table" / "final").glob("results_*.table.json")
    assert len(json.loads(table.read_text())["data"]) == 1  # the finished user, logged although interrupted

    spy.at = None
    argv = hint.split()[2:]  # the printed command, as a user would paste it
    assert attack.main(argv) == run_dir
    runs = sorted(run_dir.glob("wandb/offline-run-*"))
    ((_, _), (new_id, mode)) = attack.wandb_attempts(run_dir)
    assert len(runs) == 2 and new_id != run_id and mode == "offline"  # a new W&B run, not a clobbering same id
    (second,) = [r for r in runs if r != first]
    assert second.name.endswith(new_id)
    (table,) = (second / "files" / "media" / "table" / "final").glob("results_*.table.json")
    data = json.loads(table.read_text())
    assert [row[data["columns"].index("user")] for row in data["data"]] == [0, 1]
    (grid,) = (second / "files" / "media" / "images" / "final").glob("grid_*.png")
    h = np.asarray(Image.open(grid)).shape[0]
    assert h == 2 * (8 + 2) + 2  # two users' rows of 8-pixel images


def test_a_diverged_user_is_named_and_the_finished_users_are_kept(tmp_path, monkeypatch, capsys):
    """NaN in the loss: the run stops, says which user and at which step, keeps the finished user's row and images,
    and its summary says diverged (the message named the step only, for a one-user chunk)."""
    from lightning_modules.user_level_inversion import UserLevelInversion

    original = UserLevelInversion._matching_loss_and_logits

    def nan_for_user_1(self, *args, **kwargs):
        loss, logits = original(self, *args, **kwargs)
        nan = self.log_prefix == "user_0001/" and self.global_step >= 2
        return (loss * float("nan") if nan else loss), logits

    monkeypatch.setattr(UserLevelInversion, "_matching_loss_and_logits", nan_for_user_1)
    cfg = tiny_config(tmp_path, **{"logger.backend": "none", "image_log_every": 0})
    with pytest.raises(SystemExit) as exit_info:
        attack.main(["--config", str(cfg)])
    assert exit_info.value.code == 1
    (run_dir,) = (tmp_path / "runs").iterdir()
    err = capsys.readouterr().err
    assert "[attack] user_0001: stopped: attack diverged at step 2" in err and ".." not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"].startswith("diverged: attack diverged at step 2") and summary["users"] == 1
    assert [r["user"] for r in csv.DictReader((run_dir / "results.csv").open())] == ["0"]
    assert (run_dir / "users" / "user_0000" / "raw.png").is_file() and not (run_dir / "users" / "user_0001").exists()


def test_label_free_users_are_not_scored_against_their_placeholder_label(tmp_path):
    """Folder users with label_mode 'zeros' have placeholder labels (all 0): the evaluator's class was scored
    against class 0 (evaluator_correct 1 for any image it read as class 0). Their rows keep the evaluator's and the
    victim's reading, without a correctness."""
    from datamodules.folder import FolderUsers
    from datamodules.users import User
    from inversion.label_inference import LabelInference

    for k in range(2):
        d = tmp_path / "users" / f"p{k}"
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i + 10, np.uint8)).save(d / f"{i}.png")
    zeros = FolderUsers(str(tmp_path / "users"), batch_size=2, image_size=8).users()
    index = FolderUsers(str(tmp_path / "users"), batch_size=2, image_size=8, label_mode="index").users()
    assert [u.meta["label_free"] for u in zeros] == [True, True] and not index[0].meta["label_free"]

    def evaluator(x):  # always class 0, with probability ~1
        return torch.tensor([[10.0, 0.0]]).expand(len(x), 2)

    img = torch.full((1, 3, 8, 8), 0.5)
    labels = LabelInference(counts=torch.tensor([2.0]), present=torch.tensor([True]), dominant=0, strategy="known")
    result = attack.AttackResult(representative=img, reconstructions=img, denoised=None, labels=labels, steps=1)
    victim = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))  # reads class 1
    torch.nn.init.zeros_(victim[1].weight)
    victim[1].bias.data = torch.tensor([0.0, 5.0])
    free = attack.evaluate(result, zeros[0], evaluator, lpips=False, victim=victim)
    assert free["evaluator_class"] == 0 and free["victim_class"] == 1
    for key in ("evaluator_correct", "evaluator_correct_raw", "evaluator_prob_of_dominant", "victim_correct",
                "evaluator_topk_overlap"):
        assert key not in free
    labelled = User(0, zeros[0].images, torch.zeros(2, dtype=torch.long), 2, 0)
    assert attack.evaluate(result, labelled, evaluator, lpips=False)["evaluator_correct"] == 1


def test_a_resume_with_a_run_seed_needs_the_recorded_attack_seed(tmp_path):
    """Run directories made before --seed was mixed into the attack's seed attacked their users with the unmixed
    seed: a resume under --seed S would have mixed the two. The effective seed is recorded and checked."""
    cfg = tiny_config(tmp_path, **{"logger.backend": "none", "users.init_args.num_users": 1, "image_log_every": 0})
    run_dir = attack.main(["--config", str(cfg), "--seed", "3"])
    want = attack.effective_attack_seed(0, 3)
    assert (run_dir / attack.ATTACK_SEED_FILE).read_text().strip() == str(want)
    assert json.loads((run_dir / "summary.json").read_text())["attack_seed"] == want
    assert attack.main(["--config", str(cfg), "--seed", "3", "--resume", str(run_dir)]) == run_dir  # nothing left
    (run_dir / attack.ATTACK_SEED_FILE).unlink()  # as an older run directory
    with pytest.raises(attack.ConfigError, match="attack seed is not recorded"):
        attack.main(["--config", str(cfg), "--seed", "3", "--resume", str(run_dir)])
    from tests.test_refinish import load_refinish

    with pytest.raises(attack.ConfigError, match="refinish .* attack seed is not recorded"):  # its final stage too
        load_refinish().main([str(run_dir)])


def test_fedavg_settings_that_do_not_do_what_they_say_are_warned_about(tmp_path, recwarn, monkeypatch):
    """A local batch size that does not divide B biases the pseudo-gradient (inversion/fedavg.py), and FedAvg
    settings under protocol fedsgd are ignored: both ran silently. A setting that does what it says warns nothing."""
    parser = attack.build_parser()
    base = ["--config", str(tiny_config(tmp_path))]  # B = 3
    cases = [(["--threat.protocol", "fedavg", "--threat.fedavg_batch_size", "2"], "does not divide B = 3"),
             (["--threat.fedavg_epochs", "2", "--threat.fedavg_shuffle", "true"], "apply to FedAvg only"),
             (["--threat.protocol", "fedavg", "--threat.fedavg_batch_size", "3"], None),
             (["--threat.protocol", "fedavg", "--threat.fedavg_batch_size", "5"], None)]  # b > B: one full batch
    for extra, warned in cases:
        recwarn.clear()
        attack.prepare(parser, parser.parse_args(base + extra))
        said = [str(w.message) for w in recwarn if "threat." in str(w.message)]
        if warned is None:
            assert said == []
        else:
            assert len(said) == 1 and warned in said[0], said
    # once per run, not once per DDP process: ranks > 0 (which run prepare() too) stay quiet
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    recwarn.clear()
    attack.prepare(parser, parser.parse_args(base + cases[0][0]))
    assert not [w for w in recwarn if "threat." in str(w.message)]


def test_the_resume_command_runs_from_where_it_is_printed(tmp_path, monkeypatch):
    """The Ctrl-C message said 'python attack.py ...', which does not run outside the repository root."""
    run_dir = tmp_path / "my runs" / "tiny-1"
    monkeypatch.chdir(attack.ROOT)
    assert attack.resume_command(run_dir) == (f"python attack.py --config '{run_dir}/config.yaml' --resume '{run_dir}'")
    monkeypatch.chdir(tmp_path)
    assert attack.resume_command(run_dir).startswith(f"python {attack.ROOT / 'attack.py'} --config ")


def test_an_attack_setting_error_names_its_config_group(tmp_path):
    """The attack's own checks said 'anneal_fraction must be ...' without the key a user sets; the error is a
    ConfigError (exit 2, before any run directory) naming attack.init_args and the attack class."""
    parser = attack.build_parser()
    cfg = parser.parse_args(["--config", str(tiny_config(tmp_path)), "--attack.init_args.anneal_fraction", "0"])
    with pytest.raises(attack.ConfigError, match=r"^attack.init_args \(UserLevelInversion\): anneal_fraction must"):
        attack.prepare(parser, cfg)
    assert not (tmp_path / "runs").exists()


def test_results_rows_record_the_fedavg_local_training():
    """results.csv says which local training a FedAvg row attacked (E, lr, effective b, shuffle, local SGD steps);
    it said only 'fedavg', so rows of a FedAvg sweep could not be told apart without their config.yaml. FedSGD rows
    have none of these columns."""
    from types import SimpleNamespace

    from datamodules.users import User

    user = User(3, torch.zeros(10, 1, 8, 8), torch.tensor([1] * 10), 1, 0)
    inferred = SimpleNamespace(dominant=1, counts=torch.tensor([0.0, 10.0]), strategy="bias_corrected", informative=True)

    def row(**threat):
        init = SimpleNamespace(threat=attack.ThreatSpec(**threat), victim=SimpleNamespace(random_init=False))
        return attack.scenario_columns("UserLevelInversion", user, inferred, init)

    fedsgd = row()
    assert fedsgd["protocol"] == "fedsgd" and not any(k.startswith("fedavg") for k in fedsgd)
    r = row(protocol="fedavg", fedavg_epochs=2, fedavg_lr=0.05, fedavg_batch_size=4, fedavg_shuffle=True)
    assert {k: r[k] for k in r if k.startswith("fedavg")} == {
        "fedavg_epochs": 2, "fedavg_lr": 0.05, "fedavg_batch_size": 4, "fedavg_shuffle": True, "fedavg_local_steps": 6}
    for b in (0, 50):  # the whole batch (0, or b above B): one step per epoch
        r = row(protocol="fedavg", fedavg_epochs=3, fedavg_batch_size=b)
        assert (r["fedavg_batch_size"], r["fedavg_local_steps"], r["fedavg_shuffle"]) == (10, 3, False)


def test_small_metric_values_keep_their_digits_and_indices_stay_integers():
    """evaluate rounded every image metric to 5 decimals: an MSE of 1e-6 was stored as 0.0 beside its finite PSNR
    (60 dB), and nearest_index was written as a float (1.0)."""
    from datamodules.users import User
    from inversion.label_inference import LabelInference

    g = torch.Generator().manual_seed(0)
    batch = torch.rand(3, 1, 8, 8, generator=g) * 0.9 + 0.05
    close = batch[1:2] + 1e-3  # MSE 1e-6 to batch image 1: PSNR 60 dB
    labels = LabelInference(counts=torch.tensor([3.0]), present=torch.tensor([True]), dominant=0, strategy="known")
    result = attack.AttackResult(representative=close, reconstructions=close, denoised=None, labels=labels, steps=1)
    row = attack.evaluate(result, User(0, batch, torch.zeros(3, dtype=torch.long), 0, 0), None, lpips=False)
    assert row["mse_nearest"] == pytest.approx(1e-6, rel=1e-3) and row["psnr_nearest"] == pytest.approx(60.0, abs=1e-3)
    assert row["nearest_index"] == 1 and isinstance(row["nearest_index"], int)


def test_a_client_whose_fedavg_training_diverges_stops_the_run_as_diverged(tmp_path, capsys):
    """A NaN local loss in the client's FedAvg training (a huge fedavg_lr) printed a traceback and recorded the run as
    'failed: ValueError'; it is a divergence: one line naming the user, epoch and step, status 'diverged', exit 1."""
    cfg = tiny_config(tmp_path, **{"logger.backend": "none", "image_log_every": 0, "threat.protocol": "fedavg",
                                   "threat.fedavg_lr": 1e30, "threat.fedavg_epochs": 3})
    with pytest.raises(SystemExit) as exit_info:
        attack.main(["--config", str(cfg)])
    assert exit_info.value.code == 1
    (run_dir,) = (tmp_path / "runs").iterdir()
    err = capsys.readouterr().err
    assert re.search(r"\[attack\] user_0000: stopped: FedAvg: local loss is NaN/inf at epoch \d+, step \d+", err), err
    assert "Traceback" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"].startswith("diverged: FedAvg: local loss is NaN/inf") and summary["users"] == 0


def test_resume_without_config_uses_the_run_directorys_own_config(tmp_path, capsys):
    """`attack.py --resume RUN_DIR` alone failed with "the following arguments are required: attack, users"."""
    cfg = tiny_config(tmp_path, **{"logger.backend": "none", "image_log_every": 0})
    run_dir = attack.main(["--config", str(cfg)])
    capsys.readouterr()
    before = sorted(p for p in run_dir.rglob("*"))
    assert attack.main(["--resume", str(run_dir)]) == run_dir  # finished: nothing left to attack
    out = capsys.readouterr()
    assert f"using {run_dir / 'config.yaml'}" in out.err and "is finished (2 users); nothing to resume" in out.out
    assert sorted(p for p in run_dir.rglob("*")) == before  # no new logger run, no file rewritten
    with pytest.raises(SystemExit) as exit_info:
        attack.main(["--resume", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--resume {tmp_path}: {tmp_path / 'config.yaml'} not found" in err
    assert "add --config" not in err  # a resume needs the run's config.yaml whatever --config says
    # another tool's run directory: named (was "Option 'audit.per_class' is not accepted" / "Group 'trainer' does
    # not accept option 'logger.init_args.name'")
    for folder, text, says in (("audit", "users: {}\naudit:\n  per_class: 2\n", "scripts/objective_audit.py's"),
                               ("train", "trainer: {}\nmodel: {}\ndata: {}\n", "train.py's")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.yaml").write_text(text)
        with pytest.raises(SystemExit):
            attack.main(["--resume", str(tmp_path / folder)])
        assert f"this is {says}" in " ".join(capsys.readouterr().err.split())


def test_a_resume_of_a_run_directory_in_use_stops_before_any_work(tmp_path, capsys):
    """Two `attack.py --resume D` at once both attacked the same users and wrote the same results.csv; the running
    process holds D/attack.lock, so the second stops with one line naming it, and D is left as it was."""
    from inversion.fsutils import exclusive_lock

    cfg = tiny_config(tmp_path, **{"logger.backend": "none", "image_log_every": 0, "users.init_args.num_users": 1})
    run_dir = attack.main(["--config", str(cfg)])
    (run_dir / "summary.json").unlink()  # as if it had been stopped
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != attack.RUN_LOCK_FILE}
    with exclusive_lock(run_dir / attack.RUN_LOCK_FILE, RuntimeError):  # another process's run
        with pytest.raises(attack.ConfigError, match=f"{run_dir} is in use by another attack.py .*pid {os.getpid()}"):
            attack.main(["--config", str(cfg), "--resume", str(run_dir)])
    assert before == {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != attack.RUN_LOCK_FILE}
    assert attack.main(["--config", str(cfg), "--resume", str(run_dir)]) == run_dir  # free again: it resumes
    assert (run_dir / attack.RUN_LOCK_FILE).read_text() == ""  # a finished run's lock names no (dead) holder


def test_the_lock_file_is_emptied_when_its_holder_ends_normally_or_by_an_exception(tmp_path):
    from inversion.fsutils import exclusive_lock

    lock = tmp_path / "x.lock"
    with pytest.raises(KeyError), exclusive_lock(lock, RuntimeError):
        assert f"pid {os.getpid()}" in lock.read_text()
        raise KeyError("stop")
    assert lock.read_text() == ""
    with exclusive_lock(lock, RuntimeError):
        assert f"pid {os.getpid()}" in lock.read_text()
    assert lock.exists() and lock.read_text() == ""


@pytest.mark.parametrize("variable", ["LOCAL_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "JSM_NAMESPACE_RANK"])
def test_the_run_lock_is_taken_by_the_first_process_only(tmp_path, monkeypatch, variable):
    """A multi-process resume takes the lock before the processes meet: under srun/LSF/MPI (no RANK/LOCAL_RANK)
    every task tried it and all but one stopped with 'in use'."""
    import contextlib

    from inversion.fsutils import exclusive_lock

    with exclusive_lock(tmp_path / attack.RUN_LOCK_FILE, RuntimeError), contextlib.ExitStack() as locks:
        monkeypatch.setenv(variable, "1")
        attack.lock_run_dir(locks, tmp_path)  # another rank of the same run: shares it
        monkeypatch.setenv(variable, "0")
        with pytest.raises(attack.ConfigError, match="in use by another attack.py"):
            attack.lock_run_dir(locks, tmp_path)


def test_a_resume_in_a_read_only_run_directory(tmp_path, monkeypatch, capsys):
    """`--resume D` of a finished run in a read-only D failed with a PermissionError traceback (from creating
    attack.lock); now it says "nothing to resume". An unfinished one gets one line saying D is not writable."""
    import errno

    cfg = tiny_config(tmp_path, **{"logger.backend": "none", "image_log_every": 0, "users.init_args.num_users": 1})
    run_dir = attack.main(["--config", str(cfg)])
    capsys.readouterr()

    def read_only(path, busy):  # as open(path, "a+") in a read-only directory (chmod does not stop root)
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(attack, "exclusive_lock", read_only)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert attack.main(["--resume", str(run_dir)]) == run_dir
    assert "is finished (1 users); nothing to resume" in capsys.readouterr().out
    (run_dir / "summary.json").unlink()  # as if it had been stopped
    with pytest.raises(attack.ConfigError, match=rf"--resume {run_dir}: the directory is not writable \(Permission"):
        attack.main(["--resume", str(run_dir)])
    before.pop(run_dir / "summary.json")
    assert before == {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_the_run_says_once_what_it_optimises_instead_of_a_model_summary_per_user(tmp_path, capfd):
    """Lightning's model summary, printed at every user's fit, listed the victim's 11.2 M weights as "trainable"
    (they require grad for the dummy gradient); a new user read that as training the victim."""
    cfg = tiny_config(tmp_path, **{"logger.backend": "none", "image_log_every": 0, "users.init_args.num_users": 2})
    attack.main(["--config", str(cfg)])
    out = capfd.readouterr().out
    assert out.count("[attack] optimised: the dummy image(s) only; fixed: the victim's weights (") == 1
    assert "the prior's UNet (" in out
    assert "Trainable params" not in out
    # classes are named beside their ids (torchvision's FashionMNIST.classes)
    from datamodules.fashion_mnist import CLASSES

    import re

    line = re.search(r"\[attack\] user_0000: dominant (\d+) (.+?), inferred (\d+) (.+?), evaluator (\d+) (.+?) \(p=", out)
    assert line, out
    for k in (0, 2, 4):
        assert line.group(k + 2) == CLASSES[int(line.group(k + 1))]


def test_a_resume_names_a_run_config_or_results_file_it_cannot_read(tmp_path):
    """A kept run's config.yaml that this version cannot parse gave argparse's usage line ("Option 'foo' is not
    accepted"), read as a fault of the command line; a results.csv without its header gave KeyError: 'user'."""
    cfg = tiny_config(tmp_path, **{"logger.backend": "none", "image_log_every": 0, "users.init_args.num_users": 1})
    run_dir = attack.main(["--config", str(cfg)])
    (run_dir / "summary.json").unlink()  # as if it had been stopped
    config = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(config + "foo: 1\n")
    with pytest.raises(attack.ConfigError, match=r"its config\.yaml does not parse with this version .*foo"):
        attack.main(["--config", str(cfg), "--resume", str(run_dir)])
    (run_dir / "config.yaml").write_text(config)
    results = (run_dir / "results.csv").read_text()
    (run_dir / "results.csv").write_text(results.split("\n", 1)[1])  # the header line lost
    with pytest.raises(attack.ConfigError, match="its results.csv has no header row naming a 'user' column"):
        attack.main(["--config", str(cfg), "--resume", str(run_dir)])
    assert (run_dir / "results.csv").read_text() == results.split("\n", 1)[1]  # left as it was
