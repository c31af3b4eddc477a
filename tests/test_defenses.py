"""Client-side defenses: each changes an update exactly as documented; composition, seeding, validation."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from inversion.defenses import (
    DEFENSES,
    Clip,
    Compose,
    GaussianDP,
    Quantize,
    SignCompression,
    TopKPruning,
    build_defenses,
    global_l2_norm,
)


def update(seed: int = 0, scale: float = 1.0) -> "OrderedDict[str, torch.Tensor]":
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        [
            ("conv.weight", scale * torch.randn(4, 1, 3, 3, generator=g)),
            ("conv.bias", scale * torch.randn(4, generator=g)),
            ("fc.weight", scale * torch.randn(10, 37, generator=g)),
        ]
    )


def test_clip_exact_norm_and_no_op_below():
    u = update(scale=3.0)
    assert float(global_l2_norm(u)) > 1.0
    out = Clip(1.0)(u)
    assert float(global_l2_norm(out)) == pytest.approx(1.0, rel=1e-6)
    ratio = u["fc.weight"] / out["fc.weight"]
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))  # one global scale, direction kept
    small = Clip(1e6)(u)
    for n in u:
        assert torch.equal(small[n], u[n])
    assert float(global_l2_norm(update(scale=3.0))) == float(global_l2_norm(u))  # input untouched


def test_gaussian_dp_clips_then_adds_noise_with_exact_statistics():
    # zero update: clipping is a no-op, the output is the noise alone; 200k coordinates
    zero = OrderedDict([("a", torch.zeros(100_000)), ("b", torch.zeros(500, 200))])
    dp = GaussianDP(clip_norm=2.0, noise_multiplier=0.5, seed=7)
    noise = torch.cat([t.flatten() for t in dp(zero).values()])
    std = 0.5 * 2.0
    assert noise.mean().item() == pytest.approx(0.0, abs=4 * std / noise.numel() ** 0.5)
    assert noise.std().item() == pytest.approx(std, rel=0.01)
    # Gaussian shape: P(|z| < 1) = 0.6827 (uniform noise of the same std gives 0.577); binomial sd at 2e5 is 0.001
    assert (noise.abs() < std).float().mean().item() == pytest.approx(0.6827, abs=0.005)
    # i.i.d. across tensors: the two same-sized tensors (1e5 each) of one update get uncorrelated noise, not one
    # draw repeated (|corrcoef| of independent draws ~ 1/sqrt(1e5) = 0.003)
    na, nb = dp(zero)["a"].flatten(), dp(zero)["b"].flatten()
    assert na.numel() == nb.numel() == 100_000
    assert abs(torch.corrcoef(torch.stack([na, nb]))[0, 1].item()) < 0.02
    for t in (na, nb):
        assert (t.abs() < std).float().mean().item() == pytest.approx(0.6827, abs=0.005)
    # seeded: same input -> same noise; another seed -> other noise
    again = torch.cat([t.flatten() for t in GaussianDP(2.0, 0.5, seed=7)(zero).values()])
    other = torch.cat([t.flatten() for t in GaussianDP(2.0, 0.5, seed=8)(zero).values()])
    assert torch.equal(noise, again) and not torch.equal(noise, other)
    # sigma = 0 is exactly clipping; sigma alias
    u = update(scale=3.0)
    for n, t in GaussianDP(1.0, sigma=0.0)(u).items():
        assert torch.equal(t, Clip(1.0)(u)[n])
    # noisy output = clipped + noise drawn from the same seed
    noisy = GaussianDP(1.0, noise_multiplier=0.1, seed=3)(u)
    pure = GaussianDP(1.0, noise_multiplier=0.1, seed=3)(OrderedDict((n, torch.zeros_like(t)) for n, t in u.items()))
    clipped = Clip(1.0)(u)
    for n in u:
        assert torch.allclose(noisy[n], clipped[n] + pure[n], atol=1e-6)


def test_topk_pruning_exact_count_and_largest_kept():
    u = update()
    out = TopKPruning(0.25)(u)
    for n, t in u.items():
        k = max(1, round(0.25 * t.numel()))
        kept = out[n] != 0
        assert int(kept.sum()) == k, n
        assert torch.equal(out[n][kept], t[kept])  # kept entries unchanged
        assert t[kept].abs().min() >= t[~kept].abs().max()  # largest magnitudes per tensor
    for n, t in TopKPruning(1.0)(u).items():
        assert torch.equal(t, u[n])
    assert int((TopKPruning(1e-6)(u)["conv.bias"] != 0).sum()) == 1  # at least one entry per tensor


def test_quantize_levels_error_and_stochastic_unbiased():
    b = torch.randn(50, generator=torch.Generator().manual_seed(1))
    u = OrderedDict([("w", torch.linspace(-1.0, 3.0, 1001)), ("b", b)])
    for levels in (2, 5, 16):
        out = Quantize(levels)(u)
        step = 3.0 / (levels - 1)  # QSGD grid: sign * max|u| * k / (levels - 1)
        k = out["w"] / step
        assert torch.allclose(k, k.round(), atol=1e-4) and k.max().item() == pytest.approx(levels - 1)
        # magnitudes up to 3 on the positive side, up to 1 on the negative side (k <= round((levels - 1) / 3))
        assert out["w"].unique().numel() == levels + round((levels - 1) / 3)
        assert out["b"].unique().numel() <= 2 * levels - 1
        assert (out["w"] - u["w"]).abs().max().item() <= step / 2 + 1e-6
        assert torch.equal(torch.sign(out["w"][out["w"] != 0]), torch.sign(u["w"][out["w"] != 0]))
        assert out["w"][250].item() == 0.0  # linspace(-1, 3, 1001)[250] is exactly 0
    # zeros stay zero: quantising after pruning keeps the sparsity (a min-max grid without 0 would not)
    pruned = TopKPruning(0.1)(u)
    for q in (Quantize(16), Quantize(16, stochastic=True, seed=0)):
        out = Compose([TopKPruning(0.1), q])(u)
        for n in u:  # no pruned entry comes back (a kept one may round to 0)
            assert int(((out[n] != 0) & (pruned[n] == 0)).sum()) == 0
        assert int((out["w"] != 0).sum()) >= 90
    # stochastic rounding on the grid {0, 1}: 0.3 -> 1 with probability 0.3 (unbiased)
    v = OrderedDict([("x", torch.cat([torch.tensor([0.0, 1.0]), torch.full((20_000,), 0.3)]))])
    q = Quantize(2, stochastic=True, seed=0)(v)["x"]
    assert set(q.unique().tolist()) <= {0.0, 1.0}
    assert q[2:].mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.equal(q, Quantize(2, stochastic=True, seed=0)(v)["x"])
    const = OrderedDict([("c", torch.full((5,), 0.7))])
    assert torch.equal(Quantize(4)(const)["c"], const["c"])
    empty = OrderedDict([("e", torch.zeros(0, 3)), ("w", torch.tensor([0.0, 0.4, 1.0]))])
    for q in (Quantize(2), Quantize(2, stochastic=True, seed=0)):
        out = q(empty)
        assert out["e"].shape == (0, 3) and torch.equal(out["w"][[0, 2]], torch.tensor([0.0, 1.0]))


def test_sign_compression():
    u = update()
    u["conv.bias"][0] = 0.0
    out = SignCompression()(u)
    for n, t in u.items():
        m = t.abs().sum() / t.count_nonzero()  # mean magnitude of the non-zero entries
        assert torch.allclose(out[n], torch.sign(t) * m)
        nonzero = out[n][t != 0]
        assert torch.allclose(nonzero.abs(), m.expand_as(nonzero))  # only +-m (and 0 where u = 0)
        assert out[n].abs().sum().item() == pytest.approx(t.abs().sum().item(), rel=1e-5)  # L1 mass kept
    assert out["conv.bias"][0] == 0.0
    # after pruning to 10%, the kept entries carry the kept L1 mass (a mean over all entries would shrink it 10x)
    pruned = TopKPruning(0.1)(u)
    both = Compose([TopKPruning(0.1), SignCompression()])(u)
    for n in u:
        assert both[n].abs().sum().item() == pytest.approx(pruned[n].abs().sum().item(), rel=1e-5)
    assert torch.equal(SignCompression()(OrderedDict(z=torch.zeros(3)))["z"], torch.zeros(3))
    half = SignCompression()(OrderedDict(h=torch.full((1_000_000,), 0.1, dtype=torch.float16)))["h"]
    assert half.dtype == torch.float16 and torch.isfinite(half).all()  # a float16 sum (1e5 > 65504) would overflow
    assert half[0].item() == pytest.approx(0.1, rel=1e-3)


def test_compose_order_and_identity():
    u = update(scale=3.0)
    clip, sign = Clip(1.0), SignCompression()
    a = Compose([clip, sign])(u)
    b = Compose([sign, clip])(u)
    for n in u:
        assert torch.allclose(a[n], sign(clip(u))[n])
        assert torch.allclose(b[n], clip(sign(u))[n])
    assert float(global_l2_norm(b)) == pytest.approx(1.0, rel=1e-6)
    assert float(global_l2_norm(a)) != pytest.approx(1.0, rel=1e-3)  # sign after clip changes the norm
    ident = Compose([])(u)
    for n in u:
        assert torch.equal(ident[n], u[n])


def test_build_defenses_from_config():
    chain = build_defenses(
        [{"name": "clip", "clip_norm": 1.0}, {"name": "topk_pruning", "keep_fraction": 0.5},
         {"name": "gaussian_dp", "clip_norm": 1.0, "sigma": 0.0}]
    )
    assert [type(d) for d in chain.defenses] == [Clip, TopKPruning, GaussianDP]
    assert len(build_defenses(None)) == 0 and len(build_defenses([])) == 0
    assert set(DEFENSES) == {"clip", "gaussian_dp", "topk_pruning", "quantize", "sign_compression"}
    with pytest.raises(ValueError, match=r"defenses\[1\].*unknown defense name 'dp'.*gaussian_dp"):
        build_defenses([{"name": "clip", "clip_norm": 1.0}, {"name": "dp"}])
    with pytest.raises(ValueError, match="unknown parameter.*'norm'.*clip_norm"):
        build_defenses([{"name": "clip", "norm": 1.0}])
    with pytest.raises(ValueError, match="name"):
        build_defenses([{"clip_norm": 1.0}])
    # a defense without settings lists none (it listed object.__init__'s 'args'/'kwargs' and let them through)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['args'\]; accepted: \[\]"):
        build_defenses([{"name": "sign_compression", "args": 1}])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clip_refuses_a_non_finite_update(bad):
    """NaN passed clipping unscaled and inf zeroed every other tensor: one clear error instead."""
    u = update()
    u["conv.bias"][1] = bad
    for defense in (Clip(1.0), GaussianDP(clip_norm=1.0, sigma=0.1, seed=0)):
        with pytest.raises(ValueError, match=r"'conv.bias' holds NaN or inf"):
            defense(u)


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: GaussianDP(clip_norm=1.0, noise_multiplier=-0.1), r"noise_multiplier \(sigma\) must be >= 0"),
        (lambda: GaussianDP(clip_norm=0.0, noise_multiplier=0.1), r"clip_norm must be > 0"),
        # finite for Python, inf for every float32 noise coordinate (a NaN/inf target gradient after the run started)
        (lambda: GaussianDP(clip_norm=1.0, sigma=1e39), r"sigma \* clip_norm = 1e\+39 exceeds float32's largest"),
        (lambda: GaussianDP(clip_norm=1.0), r"noise_multiplier.*required"),
        (lambda: GaussianDP(clip_norm=1.0, noise_multiplier=0.1, sigma=0.2), r"disagree"),
        (lambda: Clip(-1.0), r"clip_norm must be > 0"),
        (lambda: TopKPruning(0.0), r"keep_fraction must be in \(0, 1\]"),
        (lambda: TopKPruning(1.5), r"keep_fraction must be in \(0, 1\]"),
        (lambda: Quantize(1), r"levels must be an integer >= 2"),
        (lambda: Quantize(2.5), r"levels must be an integer >= 2"),
        (lambda: Clip(float("nan")), r"clip_norm must be a finite number"),
        (lambda: build_defenses([{"name": "quantize", "levels": 1}]), r"levels must be an integer >= 2"),
    ],
)
def test_validation_errors(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_reproducible_says_whether_the_output_can_be_redrawn():
    """Defenses drawing from the global RNG (seed None) are not reproducible; seeded or noise-free ones are, and
    the output of a reproducible one is the same on a second call."""
    u = update()
    assert not GaussianDP(clip_norm=1.0, sigma=0.1).reproducible
    assert GaussianDP(clip_norm=1.0, sigma=0.1, seed=3).reproducible and GaussianDP(clip_norm=1.0, sigma=0.0).reproducible
    assert not Quantize(4, stochastic=True).reproducible
    assert Quantize(4, stochastic=True, seed=1).reproducible and Quantize(4).reproducible
    assert Clip(1.0).reproducible and SignCompression().reproducible and TopKPruning(0.5).reproducible
    assert build_defenses([{"name": "clip", "clip_norm": 1.0}, {"name": "quantize", "levels": 4, "seed": 2,
                                                                 "stochastic": True}]).reproducible
    assert not build_defenses([{"name": "clip", "clip_norm": 1.0}, {"name": "gaussian_dp", "clip_norm": 1.0,
                                                                     "sigma": 0.1}]).reproducible
    for d in (GaussianDP(clip_norm=1.0, sigma=0.1, seed=3), Quantize(4, stochastic=True, seed=1)):
        torch.testing.assert_close(d(u)["fc.weight"], d(u)["fc.weight"], rtol=0, atol=0)


def test_two_seeded_defenses_of_one_client_draw_independent_noise():
    """attack.user_defenses: each seeded defense of a client gets its own stream (attack.defense_seed); a later one
    with the same configured seed re-drew the first one's noise exactly before defense_seed took the position."""
    import attack

    dp = {"name": "gaussian_dp", "clip_norm": 1e9, "sigma": 1e-3, "seed": 0}  # noise std 1e6, never clipped
    zero = OrderedDict([("w", torch.zeros(1000))])
    one = attack.user_defenses(attack.ThreatSpec(defenses=[dp]), 3)(zero)["w"] / 1e6
    seed = attack.defense_seed(0, 3, 0)
    torch.testing.assert_close(one, GaussianDP(clip_norm=1e9, sigma=1e-3, seed=seed)(zero)["w"] / 1e6)
    two = attack.user_defenses(attack.ThreatSpec(defenses=[dp, dp]), 3)(zero)["w"] / 1e6
    second = two - one
    assert abs(float(torch.corrcoef(torch.stack([one, second]))[0, 1])) < 0.15  # independent, not a copy
    assert 0.9 < float(second.std()) < 1.1
    assert attack.defense_seed(0, 3, 1) == attack.defense_seed(0, 3, 1) != attack.defense_seed(0, 4, 1)
    # an unseeded defense before a seeded one does not move the seeded one's stream
    prune = {"name": "topk_pruning", "keep_fraction": 1.0}
    after_prune = attack.user_defenses(attack.ThreatSpec(defenses=[prune, dp]), 3)(zero)["w"] / 1e6
    torch.testing.assert_close(after_prune, one)


def test_a_seed_at_the_top_of_torchs_range_works_for_every_user():
    """A seed the defense accepts (2**64 - 1) stays in torch's range for every user: seed + user index built user 0's
    defense and failed at user 1 with torch's 'Overflow when unpacking long'."""
    import attack

    top = 2**64 - 1
    seeds = {attack.defense_seed(s, u, 0) for s in (top, -(2**63), 0, 7) for u in range(6)}
    assert len(seeds) == 24 and all(0 <= s < 2**64 for s in seeds)  # in range, and no two clients share one
    dp = {"name": "gaussian_dp", "clip_norm": 1e9, "sigma": 1e-3, "seed": top}
    zero = OrderedDict([("w", torch.zeros(10))])
    user1 = attack.user_defenses(attack.ThreatSpec(defenses=[dp]), 1)(zero)["w"]
    expected = GaussianDP(clip_norm=1e9, sigma=1e-3, seed=attack.defense_seed(top, 1, 0))(zero)["w"]
    torch.testing.assert_close(user1, expected, rtol=0, atol=0)


def test_client_noise_is_not_the_attacks_own_random_stream():
    """With seed + user index, user 0 of a ``seed: 0`` DP sweep got the noise torch.Generator().manual_seed(0)
    draws: the very numbers the attack (seed 0) drew as its starting image, so the defense's noise was a function of
    the attacker's initialisation. No small attack seed's stream may reappear as a client's noise."""
    import attack

    dp = {"name": "gaussian_dp", "clip_norm": 1e9, "sigma": 1e-3}  # noise std 1e6
    zero = OrderedDict([("w", torch.zeros(4096))])
    for seed in (0, 1, 5):
        for user in range(3):
            noise = attack.user_defenses(attack.ThreatSpec(defenses=[dict(dp, seed=seed)]), user)(zero)["w"] / 1e6
            for attack_seed in range(8):  # the attack's start image: randn from manual_seed(attack seed)
                start = torch.randn(4096, generator=torch.Generator().manual_seed(attack_seed))
                corr = float(torch.corrcoef(torch.stack([noise, start]))[0, 1])
                assert abs(corr) < 0.1, (seed, user, attack_seed, corr)


def test_a_run_whose_client_noise_was_drawn_another_way_is_not_resumed(tmp_path):
    """defense_seed changed on 2026-12-01: a DP run made before (no defense_seeds.txt) resumed silently, its
    remaining users drawing other noise than its finished ones. A run without a random seeded defense is unaffected."""
    from types import SimpleNamespace

    import attack

    dp = {"name": "gaussian_dp", "clip_norm": 1.0, "sigma": 0.01, "seed": 0}
    cfg = lambda *d: SimpleNamespace(threat=attack.ThreatSpec(defenses=list(d)))  # noqa: E731
    with pytest.raises(attack.ConfigError, match=r"--resume .*seed \+ user index .*run without --resume"):
        attack.check_recorded_defense_seeds(tmp_path, cfg(dp), "--resume", "run without --resume")
    attack.check_recorded_defense_seeds(tmp_path, cfg({"name": "clip", "clip_norm": 1.0}), "--resume", "x")
    attack.check_recorded_defense_seeds(tmp_path, cfg(dict(dp, sigma=0.0)), "--resume", "x")  # clipping only
    attack.check_recorded_defense_seeds(tmp_path, cfg({k: v for k, v in dp.items() if k != "seed"}), "--resume", "x")
    (tmp_path / attack.DEFENSE_SEEDS_FILE).write_text(attack.DEFENSE_SEEDS_SCHEME + "\n")
    attack.check_recorded_defense_seeds(tmp_path, cfg(dp), "--resume", "x")
    assert attack.seeded_random_defenses(attack.ThreatSpec(defenses=[{"name": "quantize", "levels": 4,
                                                                       "stochastic": True, "seed": 1}]))


def test_the_same_defense_written_two_ways_gets_one_label_and_one_privacy_curve_line():
    """clip_norm: 1 and clip_norm: 1.0 were two labels ('clip_norm=1' / 'clip_norm=1.0'), so the report drew two
    lines (one with a single point) for one defense; a spelled-out default was a third."""
    import attack
    from inversion.report import _defense_kind

    a = attack.defense_label([{"name": "gaussian_dp", "clip_norm": 1, "sigma": 0.01, "seed": 0}])
    b = attack.defense_label([{"name": "gaussian_dp", "sigma": 0.01, "clip_norm": 1.0}])
    assert a == b == ("gaussian_dp(clip_norm=1.0,sigma=0.01)", 0.01)
    for spelled in ({"noise_multiplier": 0.01}, {"noise_multiplier": 0.01, "sigma": 0.01},  # GaussianDP's alias
                    {"noise_multiplier": 0.01, "sigma": None}):  # 'sigma: null' beside it labelled 'sigma=None'
        assert attack.defense_label([{"name": "gaussian_dp", "clip_norm": 1.0, **spelled}]) == a
    c = attack.defense_label([{"name": "gaussian_dp", "clip_norm": 1.0, "sigma": 0.1, "seed": 0}])
    assert _defense_kind(a[0]) == _defense_kind(c[0])
    assert attack.defense_label([{"name": "quantize", "levels": 4, "stochastic": False}]) == \
        attack.defense_label([{"name": "quantize", "levels": 4.0}]) == ("quantize(levels=4)", 4.0)
    assert attack.defense_label([{"name": "quantize", "levels": 4, "stochastic": True, "seed": 1}])[0] == \
        "quantize(levels=4,stochastic=True)"
    assert attack.defense_label([{"name": "topk_pruning", "keep_fraction": 0.1}, {"name": "sign_compression"}]) == \
        ("topk_pruning(keep_fraction=0.1)+sign_compression()", 0.1)
    assert attack.defense_label([])[0] == "none"
