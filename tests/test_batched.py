"""BatchedMatching (inversion/batched.py): U users' matching losses and image gradients in one vmapped pass equal U
one-at-a-time computations (the attack's path: autograd.grad with create_graph + gradient_matching_loss).

Tolerance: float32, losses and image gradients within rtol 1e-4, atol 1e-6 (the gradients are ~1e-2 here; the
batched path sums in another order, and 'unfold' computes convolutions as matmuls).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from inversion.batched import BatchedMatching, UnfoldConv2d, stack_targets, unfold_convolutions
from inversion.objectives import gradient_matching_loss, sliding_window_weights
from inversion.scenario import fedsgd_gradient, make_server_view, victim_parameters
from tests.helpers import tiny_victim

RTOL, ATOL = 1e-4, 1e-6
U = 3


def one_at_a_time(victim, x, y_soft, targets, weights=None, names=None):
    """Reference: the attack's single-user path, looped over users."""
    params = victim_parameters(victim)
    names = list(params) if names is None else names
    plist = [params[n] for n in names]
    losses, grads = [], []
    for u in range(x.shape[0]):
        xu = x[u : u + 1].clone().requires_grad_(True)
        logits = victim(xu)
        ce = -(y_soft[u : u + 1] * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        dummy = torch.autograd.grad(ce, plist, create_graph=True)
        w = None if weights is None else (weights if weights.dim() == 1 else weights[u])
        loss = gradient_matching_loss([targets[u][n] for n in names], dummy, w)
        grads.append(torch.autograd.grad(loss, xu)[0][0])
        losses.append(loss.detach())
    return torch.stack(losses), torch.stack(grads)


def make_users(victim, shape, num_classes=10, n=U, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for u in range(n):
        B = 2 + u
        imgs = torch.rand((B, *shape), generator=g)
        labels = torch.randint(0, num_classes, (B,), generator=g)
        targets.append(fedsgd_gradient(victim, imgs, labels))
    x = torch.rand((n, *shape), generator=g)
    y = F.one_hot(torch.randint(0, num_classes, (n,), generator=g), num_classes).float()
    y[0] = torch.softmax(torch.randn(num_classes, generator=g), 0)  # one soft target
    return targets, x, y


class TinyMLP(nn.Sequential):
    def __init__(self):
        torch.manual_seed(1)
        super().__init__(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 10))
        # non-trivial running statistics, eval mode
        self[2].running_mean.uniform_(-0.2, 0.2)
        self[2].running_var.uniform_(0.5, 1.5)
        self.eval()


@pytest.fixture(scope="module")
def resnet_case():
    victim, _ = tiny_victim(8)
    targets, x, y = make_users(victim, (1, 8, 8))
    bm = BatchedMatching(victim)
    return victim, bm, targets, x, y


def assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("weighting", ["uniform", "window", "per_user"])
def test_resnet_batched_equals_one_at_a_time(resnet_case, weighting):
    victim, bm, targets, x, y = resnet_case
    L = bm.num_layers
    if weighting == "uniform":
        w = None
    elif weighting == "window":
        w = sliding_window_weights(L, 0.7 * (L - 1), 12.0, 24.0)
    else:
        w = torch.stack([sliding_window_weights(L, c * (L - 1), 6.0, 12.0, 0.1) for c in (1.0, 0.5, 0.0)])
    losses, grads = bm.matching_loss_and_grad(x, y, stack_targets(targets, bm.param_names), w)
    ref_l, ref_g = one_at_a_time(victim, x, y, targets, w)
    assert losses.shape == (U,) and grads.shape == x.shape and losses.dtype == torch.float32
    assert_close(losses, ref_l)
    assert_close(grads, ref_g)
    assert ref_g.abs().max() > 1e-4  # a non-trivial comparison
    assert not torch.allclose(grads[0], grads[1])  # users differ


def test_single_user_equals_attack_module(resnet_case):
    """U = 1 gives the user-level attack module's own matching loss and image gradient."""
    from lightning_modules.user_level_inversion import UserLevelInversion

    victim, bm, targets, x, y = resnet_case
    g = torch.Generator().manual_seed(5)
    imgs, labels = torch.rand(3, 1, 8, 8, generator=g), torch.tensor([4, 4, 7])
    view = make_server_view(victim, imgs, labels, 10, reveal_labels=True)
    attack = UserLevelInversion(steps=2, use_prior=False, final_denoise=False, label_strategy="known").bind(view)
    x1 = x[:1].clone().requires_grad_(True)
    w, _ = attack.layer_weights(0.3)
    ref_loss = attack.matching_loss(x1, w)
    ref_grad = torch.autograd.grad(ref_loss, x1)[0]
    losses, grads = bm.matching_loss_and_grad(
        x[:1], attack.y_soft, stack_targets([view.target_gradient], bm.param_names), w
    )
    assert_close(losses, ref_loss.detach().reshape(1))
    assert_close(grads, ref_grad)


def test_mlp_and_param_subset():
    victim = TinyMLP()
    targets, x, y = make_users(victim, (1, 8, 8))
    bm = BatchedMatching(victim)
    losses, grads = bm(x, y, stack_targets(targets, bm.param_names))
    ref_l, ref_g = one_at_a_time(victim, x, y, targets)
    assert_close(losses, ref_l)
    assert_close(grads, ref_g)
    names = ["4.weight", "4.bias", "1.weight"]  # any subset, any order
    bm_sub = BatchedMatching(victim, param_names=names)
    w = torch.tensor([1.0, 0.5, 2.0])
    losses, grads = bm_sub(x, y, stack_targets(targets, names), w)
    ref_l, ref_g = one_at_a_time(victim, x, y, targets, w, names=names)
    assert_close(losses, ref_l)
    assert_close(grads, ref_g)


def test_native_convolutions_and_chunks():
    victim, _ = tiny_victim(8, arch="convnet", seed=2)
    targets, x, y = make_users(victim, (1, 8, 8))
    ref_l, ref_g = one_at_a_time(victim, x, y, targets)
    for kw in ({"conv_impl": "native"}, {"chunk_size": 2}):
        bm = BatchedMatching(victim, **kw)
        losses, grads = bm(x, y, stack_targets(targets, bm.param_names))
        assert_close(losses, ref_l)
        assert_close(grads, ref_g)
    assert all(type(m) is nn.Conv2d for m in victim.modules() if isinstance(m, nn.Conv2d))  # victim untouched


def test_unfold_conv_matches_conv2d():
    torch.manual_seed(0)
    for kw in ({"kernel_size": 3, "padding": 1}, {"kernel_size": (3, 2), "stride": 2, "padding": (2, 1), "dilation": 2}, {"kernel_size": 1, "stride": 2, "bias": False}):
        conv = nn.Conv2d(3, 5, **kw)
        x = torch.randn(2, 3, 9, 7)
        ref = conv(x)
        assert unfold_convolutions(conv) == 1 and isinstance(conv, UnfoldConv2d)
        torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)
    assert unfold_convolutions(nn.Conv2d(4, 4, 3, groups=2)) == 0


@pytest.mark.parametrize("model", ["mlp", "resnet"])
def test_bf16_autocast_cpu_runs(model, resnet_case):
    if model == "mlp":
        victim = TinyMLP()
        targets, x, y = make_users(victim, (1, 8, 8))
        bm = BatchedMatching(victim)
    else:
        victim, bm, targets, x, y = resnet_case
    T = stack_targets(targets, bm.param_names)
    ref_l, ref_g = bm(x, y, T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, grads = bm(x, y, T)
    assert losses.dtype == torch.float32 and grads.dtype == x.dtype == torch.float32
    assert torch.isfinite(losses).all() and torch.isfinite(grads).all()
    assert (losses - ref_l).abs().max() < 0.05  # bf16 matmuls: loose agreement only
    assert F.cosine_similarity(grads.flatten(), ref_g.flatten(), dim=0) > 0.9


def test_bad_shapes_raise():
    victim = TinyMLP()
    targets, x, y = make_users(victim, (1, 8, 8))
    bm = BatchedMatching(victim)
    T = stack_targets(targets, bm.param_names)
    L = bm.num_layers
    with pytest.raises(ValueError, match="U, C, H, W"):
        bm(x[0], y, T)
    with pytest.raises(ValueError, match="y_soft"):
        bm(x, y[:2], T)
    with pytest.raises(ValueError, match="target layers"):
        bm(x, y, T[:-1])
    with pytest.raises(ValueError, match="must have shape"):
        bm(x[:2], y[:2], T)  # targets stacked for 3 users
    with pytest.raises(ValueError, match="must have shape"):
        bm(x, y, [T[1]] + T[1:])
    with pytest.raises(ValueError, match="weights"):
        bm(x, y, T, torch.ones(L + 1))
    with pytest.raises(ValueError, match="weights"):
        bm(x, y, T, torch.ones(2, L))
    with pytest.raises(ValueError, match="no entry"):
        stack_targets([targets[0], {k: v for k, v in list(targets[1].items())[1:]}], bm.param_names)
    with pytest.raises(ValueError, match="differ in shape"):
        stack_targets([targets[0], {k: v[..., :1] for k, v in targets[1].items()}], bm.param_names)
    with pytest.raises(ValueError, match="at least one"):
        stack_targets([], bm.param_names)
    with pytest.raises(ValueError, match="unknown victim parameter"):
        BatchedMatching(victim, param_names=["nope.weight"])
    with pytest.raises(ValueError, match="conv_impl"):
        BatchedMatching(victim, conv_impl="fast")


def test_a_target_too_large_for_float32_norms_gives_finite_losses_and_gradients():
    """A DP defense with noise std 1e18 (accepted: sigma x clip_norm below float32's max) made sum(g**2) overflow to
    inf in every cosine distance: the user-level attack (one user and many users per step) and Inverting Gradients
    gave NaN image gradients (the run stopped as 'diverged'). The user-level attack multiplies its target by exact
    powers of two when it binds it (pow2_rescale), IG's distance does so per call: finite, and the same values as
    before on an ordinary target."""
    import dataclasses
    from collections import OrderedDict

    from inversion.defenses import GaussianDP
    from inversion.objectives import layer_cosine_distances, pow2_rescale
    from lightning_modules.baselines import cosine_gradient_distance
    from lightning_modules.user_level_inversion import UserLevelInversion

    torch.manual_seed(0)
    victim = TinyMLP()
    params = victim_parameters(victim)
    names = list(params)
    view = make_server_view(victim, torch.rand(4, 1, 8, 8), torch.tensor([1, 2, 3, 1]), 10, reveal_labels=True)
    clean = view.target_gradient
    noisy = GaussianDP(clip_norm=1.0, noise_multiplier=1e18, seed=0)(OrderedDict(clean))
    assert not torch.isfinite(sum(g.pow(2).sum() for g in noisy.values()))  # the overflow this is about
    noisy_view = dataclasses.replace(view, target_gradient=noisy)
    xd = torch.rand(1, 1, 8, 8, requires_grad=True)
    dummy = torch.autograd.grad(F.cross_entropy(victim(xd), torch.tensor([1])), list(params.values()),
                                create_graph=True)

    def image_grad(loss):
        return torch.autograd.grad(loss, xd, retain_graph=True)[0]

    raw = layer_cosine_distances([noisy[n] for n in names], dummy).mean()
    assert not torch.isfinite(image_grad(raw)).all()  # unscaled: NaN (why the attacks rescale)
    for target in (clean, noisy):
        whole = cosine_gradient_distance(dummy, [target[n] for n in names])
        scaled = layer_cosine_distances([pow2_rescale(target[n]) for n in names], dummy)
        for loss in (whole, scaled.mean()):
            assert torch.isfinite(loss) and torch.isfinite(image_grad(loss)).all() and image_grad(loss).abs().max() > 0
    unscaled = layer_cosine_distances([clean[n] for n in names], dummy)
    assert torch.equal(layer_cosine_distances([pow2_rescale(clean[n]) for n in names], dummy), unscaled)
    ref = [t.flatten() for t in clean.values()]  # IG's formula without the rescaling: the same value
    dot = sum((a.flatten() * b).sum() for a, b in zip(dummy, ref))
    norm = lambda v: sum(a.pow(2).sum() for a in v).sqrt()  # noqa: E731
    assert torch.equal(cosine_gradient_distance(dummy, list(clean.values())), 1 - dot / (norm(dummy) * norm(ref)))

    x = torch.rand(2, 1, 8, 8)
    for views in ([noisy_view], [noisy_view, view]):  # one user; two users per step (BatchedMatching)
        attack = UserLevelInversion(steps=2, use_prior=False, final_denoise=False, label_strategy="known").bind(views)
        w, _ = attack.layer_weights(0.3)
        for u in range(len(views)):
            xu = x[u : u + 1].clone().requires_grad_(True)
            loss = attack.matching_loss(xu, w, user=u)
            assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, xu)[0]).all()
        if len(views) == 2:
            losses, grads = BatchedMatching(victim).matching_loss_and_grad(x, attack.y_soft, attack._stacked_target, w)
            assert torch.isfinite(losses).all() and torch.isfinite(grads).all() and grads[0].abs().max() > 0
