"""Many users per step: UserLevelInversion bound to U users equals U one-user attacks with the same seeds.

Tolerance: float32 on CPU, representative and denoised images within atol 1e-4 and every logged value (match, prior,
clip ratio) within rel 1e-4 / abs 1e-6 (t and the window centre exactly). Measured on the tiny models below: images
differ by at most 7e-7 after 10 steps and logged values by at most 4e-7 relative (one thread; see IMAGE_ATOL for
two); the batched path computes the
convolutions as matmuls (BatchedMatching's 'unfold') and runs the UNet on a batch of U, which rounds differently.
U = 1 runs the original one-user code (bitwise equal to the code before many users per step).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from inversion.objectives import clip_matching_gradient, clip_matching_gradients
from inversion.prior import DiffusionPrior
from inversion.scenario import make_server_view
from lightning_modules.user_level_inversion import UserLevelInversion
from tests.helpers import tiny_unet, tiny_victim

# Float rounding only: batched and single-user passes reduce in different orders, and Adam's normalised steps carry the
# differences forward. Measured after 10 steps with 1 thread: images 7e-7 apart; with 2 threads intra-op parallel sums
# split differently for the two shapes (images 3.8e-5, matching loss 8e-4 relative), so the module's tests run on one
# thread (the autouse fixture below), which makes them independent of the machine's core count.
IMAGE_ATOL = 1e-4
VALUE_REL, VALUE_ABS = 1e-4, 1e-6


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
STEPS = 10
SEEDS = [0, 3, 8]

ALL_ON = dict(steps=STEPS, lr=0.05, t_max=500, t_min=10, kappa=0.4, t_final=30, denoise_steps=3)  # window,
# annealing, prior, clipping (kappa 0.4 clips some steps of each user, not others) and DDIM denoising on
RANDOM_T = dict(ALL_ON, anneal_t=False, prior_noise_samples=2, denoise_method="ddpm", label_target="soft", init="gray",
                lr_decay="step")  # per-user random t, 2 noise draws per step, ancestral (noisy) denoising
OUTPUT = dict(ALL_ON, output_weight=0.5)  # plus output matching (its gradient joins the matching gradient pre-clipping)
SELECT = dict(OUTPUT, final_candidates=3, t_final=60)  # plus final candidate selection (3 denoisings per user)


def _trainer(steps: int, **kw) -> Trainer:
    kw.setdefault("enable_checkpointing", False)
    return Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   accelerator="cpu", devices=1, **kw)


@pytest.fixture(scope="module")
def case():
    victim, _ = tiny_victim(8, seed=2)
    prior = DiffusionPrior(tiny_unet(8), DDPMScheduler(num_train_timesteps=1000), (1, 8, 8))
    g = torch.Generator().manual_seed(11)
    views = []
    for labels in ([2, 2], [5, 5, 1], [7, 3, 7, 7]):  # B differs per user, so do the label inferences
        imgs = torch.rand((len(labels), 1, 8, 8), generator=g)
        views.append(make_server_view(victim, imgs, torch.tensor(labels), 10))
    return victim, prior, views


def _assert_same_user(alone, together, output: bool = False):
    torch.testing.assert_close(together.representative, alone.representative, rtol=0, atol=IMAGE_ATOL)
    torch.testing.assert_close(together.denoised, alone.denoised, rtol=0, atol=IMAGE_ATOL)
    assert together.representative.shape == alone.representative.shape == (1, 1, 8, 8)
    assert together.labels.dominant == alone.labels.dominant
    assert torch.equal(together.labels.counts, alone.labels.counts)
    assert together.steps == alone.steps == STEPS
    keys = ["match"] + (["output"] if output else []) + ["prior", "t", "clip_ratio", "window_centre"]
    if "final_candidate" in alone.history:  # the same candidate chosen, with the same score
        assert together.history.pop("final_candidate") == alone.history.pop("final_candidate")
        assert together.history.pop("final_selection_score")[0] == pytest.approx(
            alone.history.pop("final_selection_score")[0], rel=VALUE_REL, abs=VALUE_ABS)
    assert list(together.history) == list(alone.history) == keys
    for key in ("t", "window_centre"):
        assert together.history[key] == alone.history[key], key
    for key in [k for k in keys if k not in ("t", "window_centre")]:
        assert len(together.history[key]) == STEPS
        for a, b in zip(alone.history[key], together.history[key]):
            assert b == pytest.approx(a, rel=VALUE_REL, abs=VALUE_ABS), key


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", [ALL_ON, RANDOM_T, OUTPUT, SELECT],
    ids=["anneal_window_clip_ddim", "random_t_2noise_ddpm", "output_matching", "final_candidate_selection"],
)
def test_many_users_equal_one_at_a_time(case, config):
    _, prior, views = case
    alone = []
    for view, seed in zip(views, SEEDS):
        atk = UserLevelInversion(seed=seed, **config).bind(view, prior)
        _trainer(STEPS).fit(atk)
        alone.append(atk.result())
    together = UserLevelInversion(seed=99, **config).bind(views, prior, seeds=SEEDS)
    assert together.x_hat.shape == (3, 1, 8, 8) and together.y_soft.shape == (3, 10)
    _trainer(STEPS).fit(together)
    results = together.results()
    assert len(results) == 3
    for a, b in zip(alone, results):
        _assert_same_user(a, b, output="output_weight" in config)
    # users differ, and clipping was active for some steps and not others (the per-user rule is exercised)
    assert not torch.allclose(results[0].representative, results[1].representative)
    ratios = [r for res in results for r in res.history["clip_ratio"]]
    assert min(ratios) < config["kappa"] < max(ratios)
    if not config.get("anneal_t", True):  # each user draws its own random t
        assert results[0].history["t"] != results[1].history["t"]
    with pytest.raises(RuntimeError, match="results()"):
        together.result()


@pytest.mark.slow
def test_many_users_checkpoint_resume_is_exact(case, tmp_path):
    """A checkpoint at step 5 restores x_hat, Adam, every user's history and RNG streams: resuming gives the
    uninterrupted run's numbers exactly."""
    _, prior, views = case
    views = views[:2]
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), filename="{step}", every_n_train_steps=5, save_top_k=-1)
    full = UserLevelInversion(**RANDOM_T).bind(views, prior, seeds=[4, 6], log_prefixes=["a/", "b/"])
    _trainer(STEPS, enable_checkpointing=True, callbacks=[ckpt]).fit(full)
    saved = torch.load(tmp_path / "step=5.ckpt", weights_only=False)
    assert len(saved["attack_rng"]["noise"]) == len(saved["attack_rng"]["t"]) == 2
    assert saved["attack_users"] == ["a/", "b/"] and len(saved["attack_histories"][1]["match"]) == 5
    resumed = UserLevelInversion(**RANDOM_T).bind(views, prior, seeds=[4, 6], log_prefixes=["a/", "b/"])
    _trainer(STEPS).fit(resumed, ckpt_path=str(tmp_path / "step=5.ckpt"))
    for a, b in zip(full.results(), resumed.results()):
        assert torch.equal(a.representative, b.representative) and torch.equal(a.denoised, b.denoised)
        assert a.history == b.history
    one = UserLevelInversion(**RANDOM_T).bind(views[0], prior)
    with pytest.raises(ValueError, match="2 users"):
        _trainer(STEPS).fit(one, ckpt_path=str(tmp_path / "step=5.ckpt"))
    # a checkpoint of the last step: Lightning skips the loop and on_train_end; the final stage still runs, as in
    # the uninterrupted run (it was skipped: the raw image was scored as if denoised)
    at_end = UserLevelInversion(**RANDOM_T).bind(views, prior, seeds=[4, 6], log_prefixes=["a/", "b/"])
    _trainer(STEPS).fit(at_end, ckpt_path=str(tmp_path / f"step={STEPS}.ckpt"))
    for a, b in zip(full.results(), at_end.results()):
        assert b.denoised is not None and torch.equal(a.denoised, b.denoised)
        assert torch.equal(a.representative, b.representative) and b.steps == STEPS
    # a CUDA generator's 16-byte state cannot continue a CPU generator: one clear error, not a bare size mismatch
    saved["attack_rng"]["noise"] = [torch.zeros(16, dtype=torch.uint8)] * 2
    torch.save(saved, tmp_path / "other_device.ckpt")
    other = UserLevelInversion(**RANDOM_T).bind(views, prior, seeds=[4, 6], log_prefixes=["a/", "b/"])
    with pytest.raises(ValueError, match="written on another kind of device"):
        _trainer(STEPS).fit(other, ckpt_path=str(tmp_path / "other_device.ckpt"))


def test_one_user_checkpoint_rng_of_the_old_format_still_loads(case):
    _, prior, views = case
    atk = UserLevelInversion(**RANDOM_T).bind(views[0], prior)
    atk.on_fit_start()
    state = torch.Generator().manual_seed(123).get_state()
    atk._resume_rng = {"noise": state, "t": state}  # a checkpoint written before many users per step
    atk.on_train_start()
    assert torch.equal(atk._noise_gens[0].get_state(), state) and torch.equal(atk._t_gens[0].get_state(), state)


def test_bind_many_users_validation(case):
    victim, prior, views = case
    atk = UserLevelInversion(**ALL_ON)
    with pytest.raises(ValueError, match="at least one"):
        atk.bind([], prior)
    with pytest.raises(ValueError, match="seeds"):
        atk.bind(views, prior, seeds=[1, 2])
    with pytest.raises(ValueError, match="distinct"):
        atk.bind(views, prior, log_prefixes=["a/", "a/", "b/"])
    other, _ = tiny_victim(8, seed=5)
    stranger = make_server_view(other, torch.rand(2, 1, 8, 8), torch.tensor([1, 1]), 10)
    with pytest.raises(ValueError, match="another victim"):
        atk.bind([views[0], stranger], prior)
    with pytest.raises(ValueError, match="users_per_step"):
        UserLevelInversion(users_per_step=0)
    bound = UserLevelInversion(log_prefix="run/", **ALL_ON).bind(views, prior)
    assert bound.num_users == 3 and bound.seeds == [0, 0, 0] and bound.labels is None
    assert bound.log_prefixes == ["run/user0/", "run/user1/", "run/user2/"]
    assert [lab.dominant for lab in bound.user_labels] == [2, 5, 7]


def test_per_image_prior_noise_and_timesteps_equal_one_image_calls(case):
    _, prior, _ = case
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ts, seeds = [40, 300, 700], [1, 2, 3]
    for num_noise in (1, 2):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        batched = prior.prior_loss(x, ts, num_noise, gens, reduction="none")
        alone = torch.stack([prior.prior_loss(x[u : u + 1], ts[u], num_noise, torch.Generator().manual_seed(seeds[u]))
                             for u in range(3)])
        assert batched.shape == (3,)
        torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
        mean = prior.prior_loss(x, 40, num_noise, torch.Generator().manual_seed(1))
        assert mean.dim() == 0
    for method in ("ddim", "ddpm"):
        together = prior.denoise(x, 30, method, 3, generator=[torch.Generator().manual_seed(s) for s in seeds])
        for u, s in enumerate(seeds):
            alone = prior.denoise(x[u : u + 1], 30, method, 3, generator=torch.Generator().manual_seed(s))
            torch.testing.assert_close(together[u : u + 1], alone, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one per image"):
        prior.prior_loss(x, 40, 1, [torch.Generator()])
    with pytest.raises(ValueError, match="timesteps"):
        prior.prior_loss(x, [40, 50], 1)
    with pytest.raises(ValueError, match="reduction"):
        prior.prior_loss(x, 40, reduction="sum")


def test_per_user_clipping_equals_the_one_user_rule():
    g = torch.Generator().manual_seed(0)
    g_match = torch.randn(4, 2, 3, 3, generator=g) * torch.tensor([10.0, 0.1, 1.0, 5.0]).view(4, 1, 1, 1)
    g_prior = torch.randn(4, 2, 3, 3, generator=g)
    g_prior[3] = 0.0  # no prior gradient: ratio inf, not clipped
    clipped, ratios = clip_matching_gradients(g_match, g_prior, kappa=1.5)
    assert ratios.shape == (4,) and ratios.dtype == torch.float32
    for u in range(4):
        ref, ratio = clip_matching_gradient(g_match[u], g_prior[u], 1.5)
        torch.testing.assert_close(clipped[u], ref)
        assert float(ratios[u]) == pytest.approx(ratio, rel=1e-6) or (math.isinf(ratio) and math.isinf(float(ratios[u])))
    assert clipped[0].norm() == pytest.approx(1.5 * float(g_prior[0].norm()), rel=1e-5)  # clipped
    assert torch.equal(clipped[1], g_match[1]) and torch.equal(clipped[3], g_match[3])  # not clipped


# ------------------------------------------------------------------------------------------- attack.py end to end
def _e2e():
    import attack
    from tests.test_attack_e2e import HAVE_FMNIST, tiny_config

    if not HAVE_FMNIST:
        pytest.skip("needs `apt-get install dataset-fashion-mnist`")
    return attack, tiny_config


TIMING = ("seconds", "seconds_per_step", "users_per_step")


def _rows(run_dir: Path) -> list[dict]:
    return list(csv.DictReader((run_dir / "results.csv").open()))


def _assert_same_rows(one: list[dict], other: list[dict], exact: bool = False) -> None:
    assert [r["user"] for r in other] == [r["user"] for r in one]
    for a, b in zip(one, other):
        assert set(b) - set(TIMING) == set(a) - set(TIMING)
        for key in a:
            if key in TIMING:
                continue
            try:
                va, vb = float(a[key]), float(b[key])
            except ValueError:
                assert a[key] == b[key], key
                continue
            if exact or math.isnan(va):
                assert (math.isnan(va) and math.isnan(vb)) or va == vb, key
            else:  # the CSV rounds metrics to 4-5 decimals: a last-digit flip is within 1e-4
                assert vb == pytest.approx(va, rel=1e-4, abs=1e-4), key


@pytest.mark.slow
def test_attack_py_users_per_step_2_writes_the_same_results(tmp_path):
    attack, tiny_config = _e2e()
    base = {"users.init_args.num_users": 3, "logger.backend": "csv"}  # chunks (user 0, user 1) and (user 2)
    one = attack.main(["--config", str(tiny_config(tmp_path / "one", **base))])
    two = attack.main(["--config", str(tiny_config(tmp_path / "two", **base, **{"attack.init_args.users_per_step": 2}))])
    rows_one, rows_two = _rows(one), _rows(two)
    _assert_same_rows(rows_one, rows_two)
    assert "users_per_step" not in rows_one[0]  # the default writes the table as before
    assert [r["users_per_step"] for r in rows_two] == ["2", "2", "1"]
    for uid in ("user_0000", "user_0001", "user_0002"):
        for png in ("batch.png", "raw.png", "denoised.png", "grid.png"):
            assert (two / "users" / uid / png).stat().st_size > 0
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["users"] == 3
    logged = {p.name for p in (two / "logs").rglob("*.png")}  # each user's images under its own prefix
    for uid in ("user_0000", "user_0001", "user_0002"):
        assert {f"{uid}_reconstruction_{s:07d}.png" for s in (0, 2, 3)} <= logged, uid


@pytest.mark.slow
def test_attack_py_users_per_step_resume_continues_the_chunk_and_skips_finished_users(tmp_path, monkeypatch):
    """--resume: an interrupted chunk continues from its checkpoint (the same chunk forms again), finished users
    are skipped, and the final table equals an uninterrupted run's exactly."""
    attack, tiny_config = _e2e()
    cfg = tiny_config(tmp_path, **{"users.init_args.num_users": 3, "logger.backend": "csv",
                                   "attack.init_args.users_per_step": 2})
    reference = _rows(attack.main(["--config", str(cfg), "--output.name", "reference"]))
    original = UserLevelInversion.training_step
    calls: list[tuple[str, int]] = []

    def interrupt_at(prefix):
        def step(self, batch, batch_idx):
            calls.append((self.log_prefix, self.global_step))
            if self.log_prefix == prefix and self.global_step == 3:
                raise KeyboardInterrupt
            return original(self, batch, batch_idx)
        return step

    args = ["--config", str(cfg), "--checkpoint_every", "2"]
    monkeypatch.setattr(UserLevelInversion, "training_step", interrupt_at("user_0000_to_user_0001/"))
    with pytest.raises(SystemExit):
        attack.main(args)
    (run_dir,) = [d for d in (tmp_path / "runs").iterdir() if d.name.startswith("tiny-")]
    assert not (run_dir / "results.csv").exists()
    assert (run_dir / "checkpoints" / "user_0000_to_user_0001" / "last.ckpt").is_file()

    calls.clear()
    monkeypatch.setattr(UserLevelInversion, "training_step", interrupt_at("user_0002/"))
    with pytest.raises(SystemExit):
        attack.main(args + ["--resume", str(run_dir)])
    assert calls[:2] == [("user_0000_to_user_0001/", 2), ("user_0000_to_user_0001/", 3)]  # continued at step 2
    assert calls[2:] == [("user_0002/", s) for s in range(4)]
    assert [r["user"] for r in _rows(run_dir)] == ["0", "1"]

    calls.clear()
    monkeypatch.setattr(UserLevelInversion, "training_step", interrupt_at(None))
    assert attack.main(args + ["--resume", str(run_dir)]) == run_dir
    assert calls == [("user_0002/", 2), ("user_0002/", 3)]  # users 0 and 1 skipped, user 2 continued
    _assert_same_rows(reference, _rows(run_dir), exact=True)
    assert not any((run_dir / "checkpoints").iterdir())


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"attack.init_args.users_per_step": 0}, "ConfigError", "users_per_step must be an integer >= 1"),
        ({"attack.init_args.users_per_step": 3}, "ConfigError", r"users_per_step \(3\) is larger than the number of users \(2\)"),
    ],
)
def test_users_per_step_bad_input_fails_before_any_run_dir(tmp_path, overrides, error, match):
    attack, tiny_config = _e2e()
    cfg = tiny_config(tmp_path, **overrides)
    with pytest.raises(getattr(attack, error), match=match):
        attack.main(["--config", str(cfg)])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_users_per_step_is_not_an_option_of_the_baselines(tmp_path, capsys):
    attack, tiny_config = _e2e()
    cfg = tiny_config(tmp_path, attack={"class_path": "DLG", "init_args": {"steps": 2, "users_per_step": 2}})
    with pytest.raises(SystemExit):
        attack.main(["--config", str(cfg)])
    assert "users_per_step" in capsys.readouterr().err
    with pytest.raises(attack.ConfigError, match="one user per run"):
        attack.users_per_step_of(attack.resolve_attack_class("lightning_modules.baselines.DLG"), {"users_per_step": 2})


def test_user_chunks_are_cut_from_the_whole_shard_before_finished_users_are_dropped():
    import attack

    class U:
        def __init__(self, i):
            self.user_id = i

    users = [U(i) for i in range(7)]
    shard = [(i, u) for i, u in enumerate(users) if i % 2 == 1]  # rank 1 of 2: users 1, 3, 5
    assert [[i for i, _ in c] for c in attack.user_chunks(shard, 2, set())] == [[1, 3], [5]]
    every = [(i, u) for i, u in enumerate(users)]
    assert [[i for i, _ in c] for c in attack.user_chunks(every, 3, {"0", "1", "5"})] == [[2], [3, 4], [6]]
    assert [[i for i, _ in c] for c in attack.user_chunks(every, 3, {"0", "1", "2"})] == [[3, 4, 5], [6]]
    assert attack.chunk_name(["user_0003"]) == "user_0003"
    assert attack.chunk_name(["user_0003", "user_0004", "user_0005"]) == "user_0003_to_user_0005"


@pytest.mark.slow
def test_two_process_cpu_ddp_makes_chunks_within_each_shard(tmp_path):
    """4 users on 2 ranks with users_per_step 2: each rank attacks its 2 users in one chunk; the table equals one
    process attacking one user at a time."""
    import os
    import subprocess
    import sys

    attack, tiny_config = _e2e()
    cfg = tiny_config(tmp_path, **{"logger.backend": "none", "users.init_args.num_users": 4})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(attack.__file__).parent))
    script = str(Path(attack.__file__))
    runs = (([], "one"), (["--trainer.strategy", "ddp", "--trainer.devices", "2", "--attack.init_args.users_per_step", "2"], "two"))
    for extra, name in runs:
        out = subprocess.run([sys.executable, script, "--config", str(cfg), "--output.name", name, *extra],
                             env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    one = _rows(next((tmp_path / "runs").glob("one-*")))
    two_dir = next((tmp_path / "runs").glob("two-*"))
    two = _rows(two_dir)
    assert json.loads((two_dir / "summary.json").read_text())["processes"] == 2
    assert [r["user"] for r in two] == ["0", "1", "2", "3"]
    assert [r["users_per_step"] for r in two] == ["2"] * 4  # rank 0: users 0 and 2, rank 1: users 1 and 3
    _assert_same_rows(one, two)
    assert len(list((two_dir / "users").iterdir())) == 4


def test_bf16_mixed_matches_in_float32_for_one_and_many_users(case):
    """Under bf16-mixed the matching term is computed in float32 (one user and many users per step): the first
    step's matching loss equals the 32-true run's (in bf16 it differed by ~1e-2); the run finishes with finite
    images."""
    _, prior, views = case
    cfg = dict(ALL_ON, steps=2)
    ref = []
    for view, seed in zip(views[:2], SEEDS):
        atk = UserLevelInversion(seed=seed, **cfg).bind(view, prior)
        _trainer(2).fit(atk)
        ref.append(atk.result().history["match"][0])
    one = UserLevelInversion(seed=SEEDS[0], **cfg).bind(views[0], prior)
    _trainer(2, precision="bf16-mixed").fit(one)
    assert one.result().history["match"][0] == pytest.approx(ref[0], rel=1e-5, abs=1e-6)
    many = UserLevelInversion(seed=0, **cfg).bind(views[:2], prior, seeds=SEEDS[:2])
    _trainer(2, precision="bf16-mixed").fit(many)
    for r, expected in zip(many.results(), ref):
        assert r.history["match"][0] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert torch.isfinite(r.representative).all() and torch.isfinite(r.denoised).all()
