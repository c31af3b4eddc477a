"""Scenario, label inference, objectives, prior loss and the user-level attack on tiny models."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from diffusers import DDPMScheduler
from lightning import Trainer

from inversion.label_inference import infer_labels, mean_softmax_from_gradient, round_to_total
from inversion.objectives import (
    clip_matching_gradient,
    gradient_matching_loss,
    layer_cosine_distances,
    sliding_window_weights,
    timestep_at,
    window_centre,
)
from inversion.prior import DiffusionPrior, PriorMismatchError
from inversion.scenario import TargetGradientError, check_target_gradient, fedsgd_gradient, make_server_view
from lightning_modules.base_attack import AttackDivergedError
from lightning_modules.user_level_inversion import UserLevelInversion
from tests.helpers import tiny_unet, tiny_victim


def _trainer(steps: int) -> Trainer:
    return Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", devices=1)


# ------------------------------------------------------------------------------------------- scenario
def test_fedsgd_gradient_equals_manual_gradient_and_uses_eval_mode():
    model, _ = tiny_victim()
    model.train()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 2])
    g = fedsgd_gradient(model, x, y)
    assert model.training, "the client must restore the victim's mode"
    model.eval()
    loss = nn.functional.cross_entropy(model(x), y)
    ref = torch.autograd.grad(loss, [p for p in model.parameters()])
    assert list(g) == [n for n, _ in model.named_parameters()]
    for (n, a), b in zip(g.items(), ref):
        torch.testing.assert_close(a, b)
    # a parameter that does not reach the output: one clear error, and the victim's mode is still restored
    class WithUnusedHead(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.unused_head = net, nn.Linear(2, 2)

        def forward(self, inp):
            return self.net(inp)

    wrapped = WithUnusedHead(model).train()
    with pytest.raises(ValueError, match=r"\['unused_head.weight', 'unused_head.bias'\] do not affect the output"):
        fedsgd_gradient(wrapped, x, y)
    assert wrapped.training
    # the same error from the FedAvg client (before any local step moves a weight) and from the shared check that
    # attack.py runs once before any user; a victim whose parameters all reach the output passes it
    from inversion.fedavg import fedavg_client_update
    from inversion.scenario import check_victim_parameters_used

    with pytest.raises(ValueError, match=r"\['unused_head.weight', 'unused_head.bias'\] do not affect the output"):
        fedavg_client_update(wrapped, x, y, epochs=2, local_lr=0.1)
    with pytest.raises(ValueError, match=r"\['unused_head.weight', 'unused_head.bias'\] do not affect the output"):
        check_victim_parameters_used(wrapped, (1, 8, 8))
    assert wrapped.training
    check_victim_parameters_used(model, (1, 8, 8))
    assert all(p.grad is None for p in model.parameters())


def test_target_gradient_checks_shapes_names_and_nan():
    model, _ = tiny_victim()
    g = fedsgd_gradient(model, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))
    bad = OrderedDict(g)
    name = next(iter(bad))
    bad[name] = bad[name][:1]
    with pytest.raises(TargetGradientError, match="shape"):
        check_target_gradient(model, bad)
    nan = OrderedDict(g)
    nan[name] = nan[name].clone().fill_(float("nan"))
    with pytest.raises(TargetGradientError, match="NaN"):
        check_target_gradient(model, nan)
    missing = OrderedDict(list(g.items())[1:])
    with pytest.raises(TargetGradientError, match="missing"):
        check_target_gradient(model, missing)


def test_server_view_holds_no_images():
    model, _ = tiny_victim()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([3, 3, 3, 1])
    view = make_server_view(model, x, y, 10)
    assert view.labels is None and view.batch_size == 4 and view.image_shape == (1, 8, 8)
    assert not any(isinstance(v, torch.Tensor) and v.shape == x.shape for v in vars(view).values())


def _tensors(obj, seen=None):
    """Every tensor reachable from a server view: its fields, meta (nested dicts/lists), the target gradient and the
    victim's state (parameters and buffers)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, nn.Module):
        yield from obj.state_dict().values()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, seen)
    elif hasattr(obj, "__dict__"):
        yield from _tensors(vars(obj), seen)


@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
def test_no_private_image_reaches_the_server_view(protocol):
    """The attacker's view (fields, meta, target gradient, victim state) holds no copy of any private image, in any
    shape, under FedSGD and FedAvg (several local steps); the victim's state is the global model's, untouched."""
    import attack
    from datamodules.users import User

    model, _ = tiny_victim()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([3, 3, 3, 1])
    user = User(user_id=0, images=x, labels=y, num_classes=10, dominant_class=3)
    threat = attack.ThreatSpec(protocol=protocol, fedavg_epochs=2, fedavg_batch_size=2)
    view = attack.client_update(model, user, threat, 10, user_index=0)
    flat = [img.flatten() for img in x] + [x.flatten()]
    leaked = [t for t in _tensors(view) for f in flat
              if t.numel() == f.numel() and torch.allclose(t.detach().flatten().float(), f, atol=1e-6)]
    assert not leaked
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert view.labels is None and len(list(_tensors(view))) > len(before)  # the walk saw the gradient too


# ------------------------------------------------------------------------------------------- labels
class LinearHead(nn.Module):
    def __init__(self, zero: bool):
        super().__init__()
        self.fc = nn.Linear(6, 10)
        if zero:
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(torch.relu(x.flatten(1)[:, :6]) + 0.1)


@pytest.mark.parametrize("counts", [[0, 3, 0, 1, 0, 0, 2, 0, 0, 0], [5, 0, 0, 0, 0, 0, 0, 0, 0, 0], [3, 0, 0, 0, 0, 0, 0, 0, 0, 1]])
def test_bias_corrected_counts_exact_for_uniform_outputs(counts):
    model = LinearHead(zero=True)  # uniform softmax: eq. (1) with pbar = 1/C, the estimator is exact
    y = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])
    g = fedsgd_gradient(model, torch.rand(len(y), 1, 8, 8), y)
    inf = infer_labels(g, 10, batch_size=len(y))
    assert inf.counts.tolist() == [float(c) for c in counts]
    assert inf.dominant == max(range(10), key=lambda c: counts[c])


def test_bias_corrected_counts_subtract_the_offset_of_absent_classes():
    """Counts [6, 2, 2, 0, ...] at B = 10 under a uniform output: g = [-0.5, -0.1, -0.1, 0.1, ...], pi = 0.1, and
    n_c = B (pi - g_c) / (C pi) gives exactly 6, 2, 2 (dropping pi, i.e. shares 0.5 : 0.1 : 0.1, gives 7, 1, 2)."""
    counts = [6, 2, 2, 0, 0, 0, 0, 0, 0, 0]
    model = LinearHead(zero=True)
    y = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])
    g = fedsgd_gradient(model, torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)), y)
    torch.testing.assert_close(g["fc.bias"], torch.tensor([-0.5, -0.1, -0.1] + [0.1] * 7), rtol=0, atol=1e-6)
    inf = infer_labels(g, 10, batch_size=10)
    assert inf.counts.tolist() == [float(c) for c in counts]
    assert inf.present.nonzero().flatten().tolist() == [0, 1, 2] and inf.dominant == 0
    # without B: the same estimate as proportions
    torch.testing.assert_close(infer_labels(g, 10).counts, torch.tensor(counts, dtype=torch.float32) / 10,
                               rtol=0, atol=1e-5)


def test_single_class_batch_exact_on_resnet_and_dominant_at_b50():
    model, _ = tiny_victim(seed=3)
    x = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    g = fedsgd_gradient(model, x, torch.full((50,), 7))
    inf = infer_labels(g, 10, batch_size=50)
    assert inf.counts[7] == 50 and inf.counts.sum() == 50
    # dominant class at B = 50 with 80% dominant share on a random-init ResNet-18
    y = torch.tensor([4] * 40 + [0] * 5 + [9] * 5)
    g = fedsgd_gradient(model, x, y)
    inf = infer_labels(g, 10, batch_size=50)
    assert inf.dominant == 4 and inf.counts.sum() == 50


def test_a_tied_bias_signal_under_sign_compression_picks_the_dominant_class_by_the_weight_rows():
    """Sign compression makes every present class's bias entry equal: the dominant class was the lowest present id
    (1 here, against a true 4). The last layer's weight-row sums break the tie (break_dominant_tie)."""
    from inversion.defenses import SignCompression
    from inversion.label_inference import break_dominant_tie, last_layer_signal

    model, _ = tiny_victim(seed=3)
    y = torch.tensor([4] * 6 + [1] * 2 + [2] * 2)
    for seed in range(3):
        g = SignCompression()(fedsgd_gradient(model, torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(seed)), y))
        signal = last_layer_signal(g, 10)
        assert (signal[[1, 2, 4]] == signal.min()).all()  # the tie
        for strategy in ("sign", "bias_corrected"):
            inf = infer_labels(g, 10, batch_size=10, strategy=strategy)
            assert inf.dominant == 4 and inf.counts[4] == inf.counts.max() and inf.counts.sum() == 10, (strategy, inf)
            assert inf.present.nonzero().flatten().tolist() == [1, 2, 4]
    zeroed = OrderedDict((n, torch.zeros_like(t) if n.endswith("bias") else t) for n, t in g.items())
    with pytest.warns(UserWarning, match="no class is proven present"):
        guess = infer_labels(zeroed, 10, batch_size=10)  # a zeroed bias: nothing proven present, the fallback stays
    assert not guess.informative and guess.dominant == 0
    untied = infer_labels(fedsgd_gradient(model, torch.rand(10, 1, 8, 8), y), 10, batch_size=10)
    assert break_dominant_tie(untied, torch.arange(10.0), -torch.arange(10.0)) is untied  # no tie: unchanged


def test_sign_strategy_gives_the_leftover_images_to_the_most_negative_classes():
    """B = 3 over two present classes: the spare image went to a tied remainder picked by argsort (class 3 got 2,
    the dominant class 5 got 1), so inferred_dominant and inferred_counts named different classes."""
    signal = torch.tensor([0.15, 0.51, 2.57, -1.76, 0.37, -1.83])
    g = OrderedDict([("fc.weight", torch.zeros(6, 4)), ("fc.bias", signal)])
    inf = infer_labels(g, 6, batch_size=3, strategy="sign")
    assert inf.dominant == 5 and inf.counts.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0, 2.0]
    inf = infer_labels(g, 6, batch_size=7, strategy="sign")
    assert inf.counts.tolist() == [0.0, 0.0, 0.0, 3.0, 0.0, 4.0]
    assert infer_labels(g, 6, strategy="sign").counts.tolist() == [0.0, 0.0, 0.0, 0.5, 0.0, 0.5]


def test_idlg_sign_known_and_errors():
    model = LinearHead(zero=False)
    g = fedsgd_gradient(model, torch.rand(1, 1, 8, 8), torch.tensor([6]))
    assert infer_labels(g, 10, 1, "idlg").dominant == 6
    assert infer_labels(g, 10, 1, "sign").present.nonzero().flatten().tolist() == [6]
    known = infer_labels(g, 10, 3, "known", known_labels=torch.tensor([1, 1, 2]))
    assert known.counts[1] == 2 and known.dominant == 1
    with pytest.raises(ValueError, match="unknown label strategy"):
        infer_labels(g, 10, 1, "magic")
    with pytest.raises(ValueError, match="B = 1"):
        infer_labels(g, 10, 4, "idlg")
    assert round_to_total(torch.tensor([0.26, 0.26, 0.48]), 10).tolist() == [3.0, 2.0, 5.0]


# ------------------------------------------------------------------------------------------- objectives
def test_window_endpoints_widths_and_uniform():
    L = 21
    assert window_centre(L, 0.0, 0.5) == 20.0
    assert window_centre(L, 0.5, 0.5) == 0.0 and window_centre(L, 1.0, 0.5) == 0.0
    assert window_centre(L, 0.25, 0.5) == pytest.approx(10.0)
    w = sliding_window_weights(L, centre=10, width_deep=4, width_shallow=8)
    assert w[10] == pytest.approx(1.0)
    assert w[14] == pytest.approx(0.08) and w[15] == 0.0  # deep side: width 4
    assert w[2] == pytest.approx(0.08) and w[1] == 0.0  # shallow side: width 8
    assert w[12] == pytest.approx(0.54 + 0.46 * math.cos(math.pi * 2 / 4))
    assert w[6] == pytest.approx(0.54 + 0.46 * math.cos(math.pi * 4 / 8))
    # uniform weights equal the plain mean of the layer distances
    t = [torch.randn(3, 4), torch.randn(5)]
    d = [torch.randn(3, 4), torch.randn(5)]
    assert gradient_matching_loss(t, d) == pytest.approx(float(layer_cosine_distances(t, d).mean()))
    # scale-invariant down to tiny gradients (each norm floored on its own, not their product), zero gradient -> 1
    ref = layer_cosine_distances(t, d)
    torch.testing.assert_close(layer_cosine_distances([1e-8 * x for x in t], [1e-7 * x for x in d]), ref)
    assert layer_cosine_distances([torch.zeros(3)], [torch.ones(3)]).tolist() == [1.0]
    with pytest.raises(ValueError):
        sliding_window_weights(5, 2, 0, 3)
    # a floor above the Hamming end value (0.08): weights still fall monotonically away from the centre
    wf = sliding_window_weights(10, centre=9.0, width_deep=2, width_shallow=4, floor=0.2)
    assert wf[9] == pytest.approx(1.0) and wf[5] == pytest.approx(0.2) and wf[0] == pytest.approx(0.2)
    assert all(wf[i] <= wf[i + 1] for i in range(9))
    with pytest.raises(ValueError, match="floor"):
        sliding_window_weights(5, 2, 1, 3, floor=-0.1)


def test_t_schedule_endpoints():
    for sched in ("linear", "cosine", "sqrt"):
        assert timestep_at(0.0, 800, 20, sched) == 800
        assert timestep_at(1.0, 800, 20, sched) == 20
    assert timestep_at(0.5, 800, 20, "linear") == 410
    assert timestep_at(0.6, 800, 20, "linear", anneal_fraction=0.5) == 20
    with pytest.raises(ValueError):
        timestep_at(0.1, 10, 20)


def test_clipping_rule():
    gp = torch.tensor([3.0, 4.0])  # norm 5
    gm = torch.tensor([30.0, 0.0])  # norm 30 > 2 * 5
    clipped, ratio = clip_matching_gradient(gm, gp, kappa=2.0)
    assert ratio == pytest.approx(6.0)
    assert clipped.norm() / gp.norm() == pytest.approx(2.0)
    torch.testing.assert_close(clipped / clipped.norm(), gm / gm.norm())
    small = torch.tensor([1.0, 1.0])
    same, ratio = clip_matching_gradient(small, gp, kappa=2.0)
    assert torch.equal(same, small) and ratio == pytest.approx(math.sqrt(2) / 5)


def test_matching_loss_zero_at_true_image_b1():
    model, _ = tiny_victim(seed=1)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([5])
    view = make_server_view(model, x, y, 10)
    atk = UserLevelInversion(steps=1, use_prior=False, final_denoise=False, label_strategy="idlg").bind(view)
    assert atk.labels.dominant == 5
    assert float(atk.matching_loss(x, None)) == pytest.approx(0.0, abs=1e-5)
    assert float(atk.matching_loss(torch.rand_like(x), None)) > 1e-3


def test_mean_softmax_recovered_from_bias_gradient_exactly():
    """pbar = g_b + n / B (FedSGD, mean CE): the server reads the victim's mean softmax over the user's batch."""
    model, _ = tiny_victim(seed=4)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3, 3, 3, 3, 7, 1])
    view = make_server_view(model, x, y, 10)
    proportions = torch.bincount(y, minlength=10).float() / 6
    with torch.no_grad():
        truth = model(x).softmax(dim=1).mean(dim=0)
    torch.testing.assert_close(mean_softmax_from_gradient(view.target_gradient, proportions), truth, rtol=0, atol=1e-6)
    no_bias = OrderedDict((k, v) for k, v in view.target_gradient.items() if not k.endswith("fc.bias"))
    with pytest.raises(ValueError, match="output_weight: 0"):
        mean_softmax_from_gradient(no_bias, proportions)


def test_output_matching_zero_at_true_image_and_lowered_by_the_attack():
    model, _ = tiny_victim(seed=1)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(30.0)  # peaked outputs (a tiny random victim predicts nearly uniformly)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    view = make_server_view(model, x, torch.tensor([5]), 10)
    atk = UserLevelInversion(steps=15, lr=0.05, use_prior=False, final_denoise=False, label_strategy="idlg",
                             output_weight=1.0).bind(view)
    with torch.no_grad():
        truth = model(x).softmax(dim=1)
    torch.testing.assert_close(atk.p_out, truth, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert float(atk.output_loss(x)[0]) == pytest.approx(0.0, abs=1e-5)
        before = float(atk.output_loss(atk.x_hat)[0])
    assert before > 1e-3
    _trainer(15).fit(atk)
    res = atk.result()
    assert res.history["output"][0] == pytest.approx(before, rel=1e-5)
    with torch.no_grad():
        assert float(atk.output_loss(res.representative)[0]) < 0.5 * before
    # off by default (the paper's method): nothing recovered, no 'output' in the history
    plain = UserLevelInversion(steps=1, use_prior=False, final_denoise=False).bind(view)
    assert plain.p_out is None and "output" not in plain.history
    with pytest.raises(ValueError, match="output_weight"):
        UserLevelInversion(output_weight=-1.0)


# ------------------------------------------------------------------------------------------- prior
def test_prior_loss_gradient_matches_finite_difference():
    torch.manual_seed(0)
    prior = DiffusionPrior(tiny_unet(8).double(), DDPMScheduler(num_train_timesteps=1000), (1, 8, 8))
    prior.alphas_cumprod = prior.alphas_cumprod.double()
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)

    def loss(z):
        return prior.prior_loss(z, t=300, generator=torch.Generator().manual_seed(5)).double()

    g = torch.autograd.grad(loss(x), x)[0]
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    direction = torch.randn_like(x)
    h = 1e-4
    fd = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
    assert float((g * direction).sum()) == pytest.approx(float(fd), rel=1e-3, abs=1e-7)


def test_prior_channel_mismatch_and_denoise_range():
    with pytest.raises(PriorMismatchError, match="channel"):
        DiffusionPrior(tiny_unet(8, channels=3), DDPMScheduler(), (1, 8, 8))
    prior = DiffusionPrior(tiny_unet(16), DDPMScheduler(), (1, 8, 8))  # prior at 16 px, images at 8 px
    x = torch.rand(2, 1, 8, 8)
    for method in ("ddim", "ddpm"):
        out = prior.denoise(x, t_final=20, method=method, num_steps=4, generator=torch.Generator().manual_seed(0))
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError):
        prior.denoise(x, t_final=0)
    seen = []  # DDIM asked for more steps than timesteps: each of t_final .. 1 once (no repeated, no-op pairs)
    hook = prior.unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1][0])))
    prior.denoise(x, t_final=5, method="ddim", num_steps=10)
    hook.remove()
    assert seen == [5, 4, 3, 2, 1]
    # prior-loss timesteps: outside [0, T-1] one clear error (a negative t used to index alphas_cumprod from the
    # end); a numpy array of per-image timesteps works like a list
    import numpy as np

    for bad in (-3, 1000, [5, 1000], torch.tensor([-1, 2])):
        with pytest.raises(ValueError, match=r"timestep t must be in \[0, 999\]"):
            prior.prior_loss(x, bad)
    with torch.no_grad():
        a = prior.prior_loss(x, np.array([10, 700]), generator=torch.Generator().manual_seed(1), reduction="none")
        b = prior.prior_loss(x, [10, 700], generator=torch.Generator().manual_seed(1), reduction="none")
        c = prior.prior_loss(x[:1], np.int64(10), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert torch.isfinite(c)


def test_prior_loss_is_the_noise_prediction_mse_of_the_rescaled_image():
    """L = mean |eps_theta(sqrt(abar_t) (2 x - 1) + sqrt(1 - abar_t) eps, t) - eps|^2 with eps from the generator's
    randn draw, computed here by hand; to_prior maps [0, 1] to [-1, 1] and from_prior inverts it."""
    torch.manual_seed(0)
    unet = tiny_unet(8)
    abar_all = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    prior = DiffusionPrior(unet, DDPMScheduler(num_train_timesteps=1000), (1, 8, 8))
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def by_hand(x01, t, eps):
        abar = abar_all[t].view(-1, 1, 1, 1)
        xt = abar.sqrt() * (2 * x01 - 1) + (1 - abar).sqrt() * eps
        return (unet(xt, t).sample - eps).square()

    with torch.no_grad():
        # one timestep, one generator: a single randn draw of the batch's shape; 'mean' over everything
        got = prior.prior_loss(x, 300, generator=torch.Generator().manual_seed(5))
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        ref = by_hand(x, torch.full((2,), 300), eps)
        torch.testing.assert_close(got, ref.mean(), rtol=1e-5, atol=0)
        # per-image timesteps and generators, reduction 'none': image n's loss with its own noise
        got = prior.prior_loss(x, [10, 700], generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
                               reduction="none")
        eps = torch.cat([torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
        ref = by_hand(x, torch.tensor([10, 700]), eps).flatten(1).mean(dim=1)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
        # two noise samples per image: rows repeat_interleave'd, noise one draw of (2 N, C, H, W)
        got = prior.prior_loss(x, 50, num_noise=2, generator=torch.Generator().manual_seed(6))
        eps = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(6))
        ref = by_hand(x.repeat_interleave(2, dim=0), torch.full((4,), 50), eps)
        torch.testing.assert_close(got, ref.mean(), rtol=1e-5, atol=0)
    # the pixel scale: 0 -> -1, 1 -> 1, x -> 2 x - 1; from_prior inverts it at equal sizes (and clamps)
    assert torch.equal(prior.to_prior(torch.zeros(1, 1, 8, 8)), torch.full((1, 1, 8, 8), -1.0))
    assert torch.equal(prior.to_prior(torch.ones(1, 1, 8, 8)), torch.ones(1, 1, 8, 8))
    torch.testing.assert_close(prior.to_prior(x), 2 * x - 1)
    torch.testing.assert_close(prior.from_prior(prior.to_prior(x)), x)
    assert torch.equal(prior.from_prior(torch.full((1, 1, 8, 8), -1.5)), torch.zeros(1, 1, 8, 8))
    # a prior at 16 px: a constant image keeps its (rescaled) value through the resize
    big = DiffusionPrior(tiny_unet(16), DDPMScheduler(), (1, 8, 8))
    up = big.to_prior(torch.full((1, 1, 8, 8), 0.25))
    assert up.shape == (1, 1, 16, 16)
    torch.testing.assert_close(up, torch.full((1, 1, 16, 16), -0.5))
    torch.testing.assert_close(big.from_prior(up), torch.full((1, 1, 8, 8), 0.25))


# ------------------------------------------------------------------------------------------- the attack
def test_attack_lowers_matching_loss_and_denoises():
    torch.manual_seed(0)
    model, _ = tiny_victim(seed=2)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    view = make_server_view(model, x, torch.full((4,), 2), 10)
    prior = DiffusionPrior(tiny_unet(8), DDPMScheduler(num_train_timesteps=1000), (1, 8, 8))
    atk = UserLevelInversion(steps=20, lr=0.02, t_max=500, t_min=10, kappa=10.0, prior_weight=0.1, t_final=30,
                             denoise_steps=3).bind(view, prior)
    before = float(atk.matching_loss(atk.x_hat.detach(), None))
    _trainer(20).fit(atk)
    res = atk.result()
    after = float(atk.matching_loss(res.representative, None))
    assert after < before
    assert res.steps == 20 and len(res.history["match"]) == 20
    assert res.history["t"][0] == 500 and res.history["t"][-1] == 10
    assert res.representative.shape == (1, 1, 8, 8) and res.denoised.shape == (1, 1, 8, 8)
    assert 0 <= float(res.representative.min()) and float(res.representative.max()) <= 1
    assert not model.training and all(p.grad is None for p in model.parameters())


def _grad_before_step_recorder():
    """A Lightning callback recording x_hat.grad each time the attack's optimizer is about to step, and its list."""
    from lightning.pytorch.callbacks import Callback

    seen: list[torch.Tensor] = []

    class Recorder(Callback):
        def on_train_start(self, trainer, pl_module):
            trainer.optimizers[0].register_step_pre_hook(
                lambda opt, args, kwargs: seen.append(pl_module.x_hat.grad.detach().clone()))

    return Recorder(), seen


def _one_step_with(atk, callback) -> None:
    Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", devices=1, callbacks=[callback]).fit(atk)


def test_attack_step_clips_the_matching_gradient_to_kappa_times_the_prior_gradient():
    """One step, t = t_max: the image gradient Adam receives is clip(g_match) + g_prior with g_match rescaled to norm
    kappa |g_prior| (here |g_match| / |g_prior| > kappa); without clipping it is g_match + g_prior."""
    model, _ = tiny_victim(seed=2)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    view = make_server_view(model, x, torch.tensor([4, 4]), 10)
    prior = DiffusionPrior(tiny_unet(8), DDPMScheduler(num_train_timesteps=1000), (1, 8, 8))
    kw = dict(steps=1, lr=0.01, lr_decay="none", use_window=False, t_max=400, t_min=10, prior_weight=0.5,
              final_denoise=False, seed=11)
    atk = UserLevelInversion(kappa=0.1, **kw).bind(view, prior)
    x0 = atk.x_hat.detach().clone()
    # the two terms by hand at x0: the matching gradient, and lambda times the prior loss's gradient at t_max with the
    # attack's noise stream (seeded seed + 1)
    z = x0.clone().requires_grad_(True)
    g_match = torch.autograd.grad(atk.matching_loss(z, None), z)[0]
    z = x0.clone().requires_grad_(True)
    l_prior = prior.prior_loss(z, 400, generator=torch.Generator().manual_seed(12))
    g_prior = torch.autograd.grad(0.5 * l_prior, z)[0]
    ratio = float(g_match.norm() / g_prior.norm())
    assert ratio > 0.5  # well above kappa = 0.1: the step must clip
    callback, seen = _grad_before_step_recorder()
    _one_step_with(atk, callback)
    assert len(seen) == 1
    grad = seen[0]
    part = grad - g_prior
    assert float(part.norm()) == pytest.approx(0.1 * float(g_prior.norm()), rel=1e-4)
    torch.testing.assert_close(part, g_match * (0.1 * g_prior.norm() / g_match.norm()), rtol=1e-4, atol=1e-9)
    assert atk.history["clip_ratio"][0] == pytest.approx(ratio, rel=1e-4)
    assert atk.history["clip_ratio"][0] > 0.1
    assert atk.history["t"] == [400.0] and atk.history["prior"][0] == pytest.approx(float(l_prior.detach()), rel=1e-5)
    # clipping off: the plain sum, same logged ratio
    off = UserLevelInversion(kappa=0.1, use_clipping=False, **kw).bind(view, prior)
    assert torch.equal(off.x_hat.detach(), x0)
    callback, seen = _grad_before_step_recorder()
    _one_step_with(off, callback)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], g_match + g_prior, rtol=1e-4, atol=1e-9)
    assert off.history["clip_ratio"][0] == pytest.approx(ratio, rel=1e-4)


def test_attack_layer_window_slides_from_the_deepest_layer_and_is_off_when_disabled():
    model, _ = tiny_victim(seed=2)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    view = make_server_view(model, x, torch.tensor([4, 4]), 10)
    kw = dict(steps=3, lr=0.01, use_prior=False, final_denoise=False, window_slide_fraction=0.5, seed=5)
    atk = UserLevelInversion(**kw).bind(view)
    assert atk.labels.dominant == 4
    L = len(atk.param_names)
    assert L > 30  # a ResNet-18: enough layers for the window to matter
    w0, c0 = atk.layer_weights(0.0)
    assert c0 == L - 1 and int(w0.argmax()) == L - 1 and w0[L - 1] == pytest.approx(1.0)
    assert float(w0[: L - 1 - 24].abs().max()) == 0.0  # shallow layers beyond the window get nothing at first
    assert atk.layer_weights(0.25)[1] == pytest.approx((L - 1) / 2)
    for progress in (0.5, 1.0):  # the end of the slide and after it
        w_end, c_end = atk.layer_weights(progress)
        assert c_end == 0.0 and int(w_end.argmax()) == 0 and float(w_end[13:].abs().max()) == 0.0
    x0 = atk.x_hat.detach().clone()
    windowed = float(atk.matching_loss(x0, w0))
    uniform = float(atk.matching_loss(x0, None))
    assert abs(windowed - uniform) > 1e-3  # the window changes the loss: the checks below can tell them apart
    _trainer(3).fit(atk)
    assert atk.history["window_centre"] == [float(L - 1), 0.0, 0.0]
    assert atk.history["match"][0] == pytest.approx(windowed, rel=1e-5)
    # window off: no weights, no centre logged, the logged loss is the unweighted mean of the layer distances
    off = UserLevelInversion(use_window=False, **kw).bind(view)
    w, c = off.layer_weights(0.0)
    assert w is None and math.isnan(c)
    z = off.x_hat.detach().clone()
    assert torch.equal(z, x0)
    ce = nn.functional.cross_entropy(model(z), torch.tensor([4]))
    dummy = torch.autograd.grad(ce, off._params)
    expected = float(gradient_matching_loss(off.target, dummy))
    assert expected == pytest.approx(uniform, rel=1e-5)
    _trainer(3).fit(off)
    assert "window_centre" not in off.history
    assert off.history["match"][0] == pytest.approx(expected, rel=1e-5)


def test_attack_without_prior_and_window_lowers_the_matching_loss_substantially():
    """B = 1, prior and window off, 30 Adam steps at lr 0.1: the matching loss falls to ~0.25 of its start (0.593 ->
    0.148 measured); asserted below half."""
    model, _ = tiny_victim(seed=2)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    view = make_server_view(model, x, torch.tensor([2]), 10)
    atk = UserLevelInversion(steps=30, lr=0.1, lr_decay="none", use_prior=False, use_window=False,
                             final_denoise=False, label_strategy="idlg", seed=0).bind(view)
    assert atk.labels.dominant == 2
    before = float(atk.matching_loss(atk.x_hat.detach(), None))
    assert before > 0.3
    _trainer(30).fit(atk)
    res = atk.result()
    after = float(atk.matching_loss(res.representative, None))
    assert after < 0.5 * before
    assert res.history["match"][0] == pytest.approx(before, rel=1e-5)
    assert min(res.history["match"][-5:]) < 0.5 * before


def test_attack_validation_and_nan():
    with pytest.raises(ValueError, match="label_target"):
        UserLevelInversion(label_target="hard")
    with pytest.raises(ValueError, match="t_min"):
        UserLevelInversion(t_min=900, t_max=100)
    with pytest.raises(ValueError, match="floor"):
        UserLevelInversion(window_floor=1.5)
    model, _ = tiny_victim()
    view = make_server_view(model, torch.rand(2, 1, 8, 8), torch.tensor([1, 1]), 10)
    with pytest.raises(ValueError, match="no prior"):
        UserLevelInversion(steps=2).bind(view, None)
    atk = UserLevelInversion(steps=3, use_prior=False, final_denoise=False).bind(view)
    with torch.no_grad():
        atk.x_hat[0, 0, 0, 0] = float("nan")  # e.g. an overflow in the previous step
    with pytest.raises(AttackDivergedError, match="step 0"):
        _trainer(3).fit(atk)
    # a '-true' half precision would convert the caller's victim in place: refused before Lightning converts it
    atk = UserLevelInversion(steps=1, use_prior=False, final_denoise=False).bind(view)
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1, precision="bf16-true")
    with pytest.raises(ValueError, match="does not run under trainer.precision 'bf16-true'"):
        trainer.fit(atk)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_final_candidate_selection_keeps_the_candidate_the_servers_score_prefers():
    model, _ = tiny_victim(seed=1)
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    view = make_server_view(model, x, torch.tensor([5, 5, 2]), 10)
    prior = DiffusionPrior(tiny_unet(8), DDPMScheduler(num_train_timesteps=1000), (1, 8, 8))
    kw = dict(steps=3, t_max=500, t_min=10, kappa=10.0, t_final=200, denoise_steps=4, seed=7)
    atk = UserLevelInversion(final_candidates=5, selection_output_weight=2.0, **kw).bind(view, prior)
    assert atk.p_out is not None and atk.hparams.output_weight == 0  # pbar recovered for the selection only
    _trainer(3).fit(atk)
    res = atk.result()
    with torch.no_grad():
        cands = prior.denoise(res.representative.expand(5, -1, -1, -1), 200, "ddim", 4,
                              generator=atk.candidate_generators(7))
    scores = atk.selection_scores(cands)
    k = int(scores.argmin())
    assert scores.unique().numel() == 5  # distinct candidates: a real choice
    torch.testing.assert_close(res.denoised, cands[k : k + 1])
    assert res.history["final_candidate"] == [float(k)]
    assert res.history["final_selection_score"][0] == pytest.approx(float(scores[k]))
    # the score is the mean layer distance plus mu_sel times the output KL
    d, logits = atk.layer_distances(cands[:1])
    expected = float(d.mean()) + 2.0 * float(atk.output_loss(cands[:1], logits)[0])
    assert float(scores[0]) == pytest.approx(expected, rel=1e-5)
    # candidate 0 is the single denoising of final_candidates = 1 (same seed, same x_hat)
    single = UserLevelInversion(**kw).bind(view, prior)
    _trainer(3).fit(single)
    torch.testing.assert_close(single.result().representative, res.representative)
    torch.testing.assert_close(single.result().denoised, cands[:1])
    with pytest.raises(ValueError, match="final_candidates"):
        UserLevelInversion(final_candidates=0)


def test_matching_runs_in_float32_under_bf16_autocast():
    """Lightning's bf16-mixed wraps training_step in autocast: the matching loss at the true image (B = 1) stays at
    float32's ~1e-6 (it was 0.018 with the double backward in bf16); the prior's UNet may stay in bf16."""
    model, _ = tiny_victim(seed=1)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    view = make_server_view(model, x, torch.tensor([5]), 10)
    atk = UserLevelInversion(steps=1, use_prior=False, final_denoise=False, label_strategy="idlg").bind(view)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = atk.matching_loss(x, None)
        assert loss.dtype == torch.float32 and float(loss) == pytest.approx(0.0, abs=1e-5)
        assert float(atk.matching_loss(torch.rand_like(x), None)) > 1e-3


@pytest.mark.parametrize("users", [1, 2])
def test_matching_reduction_sum_scales_the_matching_term_by_the_window_weight_total(users):
    """'mean' (default) divides sum_l w_l d_l by sum_l w_l; 'sum' is the issue's literal sum_l w_l(s) d_l. The
    factor reaches dynamic clipping: the logged |g_match| / |g_prior| (before clipping) scales with it."""
    model, _ = tiny_victim(seed=2)
    views = [make_server_view(model, torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3 + u)),
                              torch.tensor([4, 4 + u]), 10) for u in range(users)]
    prior = DiffusionPrior(tiny_unet(8), DDPMScheduler(num_train_timesteps=1000), (1, 8, 8))
    kw = dict(steps=10, kappa=1e6, final_denoise=False, seed=5)
    got = {}
    for reduction in ("mean", "sum"):
        atk = UserLevelInversion(matching_reduction=reduction, **kw).bind(views if users > 1 else views[0], prior)
        atk.on_fit_start()  # the per-user noise streams and the batched matching, as a fit sets them up
        step = atk._many_users_gradient if users > 1 else atk._one_user_gradient
        got[reduction] = (step(0.3), atk)
    (g_mean, v_mean), atk = got["mean"]
    (g_sum, v_sum), _ = got["sum"]
    w, _ = atk.layer_weights(0.3)
    total = float(w.sum())
    assert 1.5 < total < len(atk.param_names)  # a partial window: neither 1 nor L
    for a, b in zip(v_mean, v_sum):
        assert b["match"] == pytest.approx(total * a["match"], rel=1e-5)
        assert b["clip_ratio"] == pytest.approx(total * a["clip_ratio"], rel=1e-4)
        assert b["prior"] == pytest.approx(a["prior"], rel=1e-6)  # the prior term is untouched
    assert float((g_sum - g_mean).norm()) > 1e-3 * float(g_mean.norm())
    off = UserLevelInversion(matching_reduction="sum", use_window=False, **kw).bind(views[0], prior)
    assert off.matching_scale(None) == float(len(off.param_names))  # window off: the plain sum over L layers
    with pytest.raises(ValueError, match="matching_reduction must be one of"):
        UserLevelInversion(matching_reduction="median")
