"""FedAvg client update: one local step equals FedSGD, multi-step SGD replicated by hand, seeded shuffling, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from inversion.fedavg import fedavg_client_update, fedavg_pseudo_gradient, local_steps_for
from inversion.scenario import check_target_gradient, fedsgd_gradient, make_server_view, victim_parameters


def bn_convnet(seed: int = 0) -> nn.Module:
    """Normalize-free conv net with BatchNorm and dropout on 1x8x8 images (eval mode must freeze both)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5), nn.Linear(256, 4)
    )
    net[1].running_mean.uniform_(-0.2, 0.2)
    net[1].running_var.uniform_(0.5, 1.5)
    return net


def batch(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_local_steps_for():
    assert local_steps_for(10, 2, 3) == 8
    assert local_steps_for(10, 1, 10) == 1
    assert local_steps_for(4, 3, 100) == 3  # local batch above B: one full-batch step per epoch
    for args in ((0, 1, 1), (4, 0, 1), (4, 1, 0)):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            local_steps_for(*args)


def test_single_step_equals_fedsgd():
    x, y = batch(5)
    victim = bn_convnet()
    victim.train()  # the client switches to eval itself
    before = copy.deepcopy(victim.state_dict())
    up = fedavg_client_update(victim, x, y, epochs=1, local_lr=0.5, local_batch_size=5)
    g = fedsgd_gradient(victim, x, y)
    assert up.local_steps == 1 and list(up.pseudo_gradient) == list(g)
    for n in g:
        assert torch.allclose(up.pseudo_gradient[n], g[n], rtol=1e-4, atol=1e-6), n
        assert torch.allclose(up.delta[n], 0.5 * g[n], rtol=1e-4, atol=1e-7), n
    for k, v in victim.state_dict().items():  # caller's model untouched, BN running stats included
        assert torch.equal(v, before[k])
    assert victim.training
    # the pseudo-gradient is a valid target for the server view
    check_target_gradient(victim, up.pseudo_gradient)
    view = make_server_view(victim, x, y, num_classes=4, gradient=up.pseudo_gradient)
    view.meta.update(up.meta)
    assert view.meta["local_steps"] == 1


def test_multi_step_matches_manual_sgd_and_pseudo_gradient():
    x, y = batch(5)
    victim = bn_convnet().eval()
    up = fedavg_client_update(victim, x, y, epochs=2, local_lr=0.1, local_batch_size=2)
    assert up.local_steps == local_steps_for(5, 2, 2) == 6 and len(up.losses) == 6
    model = copy.deepcopy(victim).eval()
    params = victim_parameters(model)
    w0 = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(2):
        for s in (slice(0, 2), slice(2, 4), slice(4, 5)):  # deterministic order, last mini-batch smaller
            grads = torch.autograd.grad(F.cross_entropy(model(x[s]), y[s]), list(params.values()))
            with torch.no_grad():
                for p, gr in zip(params.values(), grads):
                    p.sub_(0.1 * gr)
    for n, p in params.items():
        assert torch.allclose(up.delta[n], w0[n] - p.detach(), atol=1e-6), n
        assert torch.allclose(up.pseudo_gradient[n], up.delta[n] / (0.1 * 6), atol=1e-6)
    pg = fedavg_pseudo_gradient(up.delta, 0.1, 6)
    for n in pg:
        assert torch.allclose(pg[n], up.pseudo_gradient[n])


def test_seeded_shuffle():
    x, y = batch(6, seed=1)
    victim = bn_convnet().eval()
    a = fedavg_client_update(victim, x, y, epochs=1, local_lr=0.2, local_batch_size=1, shuffle=True, seed=3)
    b = fedavg_client_update(victim, x, y, epochs=1, local_lr=0.2, local_batch_size=1, shuffle=True, seed=3)
    c = fedavg_client_update(victim, x, y, epochs=1, local_lr=0.2, local_batch_size=1, shuffle=True, seed=4)
    assert all(torch.equal(a.delta[n], b.delta[n]) for n in a.delta)
    assert a.losses != c.losses  # another permutation visits the images in another order


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(epochs=0), "epochs must be an integer >= 1"),
        (dict(local_batch_size=0), "local_batch_size must be an integer >= 1"),
        (dict(local_lr=0.0), "local_lr must be a finite number > 0"),
        (dict(local_lr=float("inf")), "local_lr must be a finite number > 0"),
        (dict(local_lr=1e-300), "local_lr = 1e-300 is outside float32's range"),  # was 0 / 0: a NaN target later
    ],
)
def test_invalid_settings_raise_before_work(kwargs, pattern):
    x, y = batch(3)
    with pytest.raises(ValueError, match=pattern):
        fedavg_client_update(bn_convnet(), x, y, **kwargs)


def test_empty_batch_and_bad_pseudo_gradient_args():
    x, y = batch(3)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        fedavg_client_update(bn_convnet(), x[:0], y[:0])
    with pytest.raises(ValueError, match="labels"):
        fedavg_client_update(bn_convnet(), x, y[:2])
    with pytest.raises(ValueError, match="local_steps"):
        fedavg_pseudo_gradient({"w": torch.ones(2)}, 0.1, 0)
    with pytest.raises(ValueError, match="local_lr"):
        fedavg_pseudo_gradient({"w": torch.ones(2)}, -0.1, 1)


def test_fedavg_defenses_act_on_the_weight_difference_the_client_sends():
    """DP-FedAvg clips the model delta: a clip norm C bounds ||delta||, so the server's pseudo-gradient has norm
    C / (lr * steps) (it was C: the clip hit the pseudo-gradient, 1 / (lr * steps) = 50x too hard here); a clip
    above ||delta|| leaves the update as it was. Without reveal_batch_size the metadata reveals no B."""
    import attack
    from datamodules.users import User

    x, y = batch(4)
    victim = bn_convnet()
    user = User(user_id=0, images=x, labels=y, num_classes=4, dominant_class=int(y[0]))
    norm = lambda d: float(torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())))  # noqa: E731
    plain = attack.client_update(victim, user, attack.ThreatSpec(protocol="fedavg", fedavg_epochs=2, fedavg_lr=0.01), 4)
    up = fedavg_client_update(victim, x, y, epochs=2, local_lr=0.01)
    d_norm, steps = norm(up.delta), up.local_steps
    assert steps == 2 and norm(plain.target_gradient) == pytest.approx(d_norm / (0.01 * steps), rel=1e-5)
    clip = d_norm / 3
    threat = attack.ThreatSpec(protocol="fedavg", fedavg_epochs=2, fedavg_lr=0.01, defenses=[{"name": "clip", "clip_norm": clip}])
    clipped = attack.client_update(victim, user, threat, 4)
    assert norm(clipped.target_gradient) == pytest.approx(clip / (0.01 * steps), rel=1e-5)
    for n, g in plain.target_gradient.items():  # clipping only rescales
        torch.testing.assert_close(clipped.target_gradient[n], g / 3, rtol=1e-4, atol=1e-9)
    loose = dict(threat.__dict__, defenses=[{"name": "clip", "clip_norm": 2 * d_norm}])
    same = attack.client_update(victim, user, attack.ThreatSpec(**loose), 4)
    for n, g in plain.target_gradient.items():
        torch.testing.assert_close(same.target_gradient[n], g)
    assert plain.meta["local_batch_size"] == 4 and plain.meta["local_steps"] == 2
    hidden = attack.client_update(victim, user, attack.ThreatSpec(protocol="fedavg", reveal_batch_size=False), 4)
    assert hidden.batch_size is None and hidden.meta["local_batch_size"] is None and "local_steps" not in hidden.meta


def test_defense_noise_follows_the_user_not_its_position_in_the_run():
    """User 10's DP noise is the same when it is the first user of a half-run (first_user 10) as in one 20-user
    run, and differs from user 0's (seeding by position gave users 0 and 10 of pooled halves the same draw)."""
    import attack
    from datamodules.users import User

    x, y = batch(4)
    victim = bn_convnet()
    threat = attack.ThreatSpec(defenses=[{"name": "gaussian_dp", "clip_norm": 1.0, "sigma": 0.1, "seed": 5}])
    u10 = User(user_id=10, images=x, labels=y, num_classes=4, dominant_class=0)
    u0 = User(user_id=0, images=x, labels=y, num_classes=4, dominant_class=0)
    in_half = attack.client_update(victim, u10, threat, 4, user_index=0).target_gradient
    in_full = attack.client_update(victim, u10, threat, 4, user_index=10).target_gradient
    first = attack.client_update(victim, u0, threat, 4, user_index=0).target_gradient
    for n in in_full:
        torch.testing.assert_close(in_half[n], in_full[n], rtol=0, atol=0)
    assert any(not torch.equal(in_half[n], first[n]) for n in first)
    named = User(user_id="alice", images=x, labels=y, num_classes=4, dominant_class=0, meta={"index": 10})
    assert attack.stable_user_index(named, 3) == 10
    assert attack.stable_user_index(User("bob", x, y, 4, 0), 3) == 3


def test_pseudo_gradient_reaches_fedsgd_at_small_lr_only_when_b_divides_B():
    """delta / (lr * steps) -> (1/K) sum_k (mean gradient of mini-batch k) as lr -> 0: the FedSGD gradient when the
    local batch size b divides B, but not otherwise (the short last mini-batch weighs as much as a full one), as the
    docstrings of inversion.fedavg say. float64 net and images, lr = 1e-7 (the O(lr) drift is negligible)."""
    victim = bn_convnet().double()

    def rel(a, b):
        num = sum((a[n].double() - b[n]).pow(2).sum() for n in b).sqrt()
        return float(num / sum(b[n].pow(2).sum() for n in b).sqrt())

    for B, b, epochs in ((4, 2, 1), (6, 3, 2), (6, 1, 1), (3, 5, 2)):  # b divides B (or b >= B)
        x, y = batch(B)
        up = fedavg_client_update(victim, x.double(), y, epochs=epochs, local_lr=1e-7, local_batch_size=b)
        assert rel(up.pseudo_gradient, fedsgd_gradient(victim, x.double(), y)) < 1e-5, (B, b, epochs)
    x, y = batch(5)
    x = x.double()
    up = fedavg_client_update(victim, x, y, epochs=1, local_lr=1e-7, local_batch_size=2)  # mini-batches 2, 2, 1
    assert up.local_steps == 3
    assert rel(up.pseudo_gradient, fedsgd_gradient(victim, x, y)) > 0.1
    means = [fedsgd_gradient(victim, x[s : s + 2], y[s : s + 2]) for s in (0, 2, 4)]
    assert rel(up.pseudo_gradient, {n: sum(m[n] for m in means) / 3 for n in means[0]}) < 1e-5


def test_a_diverging_local_loss_names_the_step_the_lr_and_what_to_lower():
    x, y = batch(6)
    with pytest.raises(ValueError, match=r"NaN/inf at epoch \d+, step \d+ \(local lr 1e\+20, 3 epochs\).*"
                                         r"BatchNorm in eval mode.*lower threat.fedavg_lr"):
        fedavg_client_update(bn_convnet(), x, y, epochs=3, local_lr=1e20, local_batch_size=2)
    fedavg_client_update(bn_convnet(), x, y, epochs=3, local_lr=0.01, local_batch_size=2)  # a small lr runs


def test_client_update_records_the_update_norm_before_defenses_outside_the_servers_view():
    """results.csv's update_norm: the norm of what the defenses receive (FedSGD gradient, FedAvg weight difference),
    given to the evaluation through ``record`` and never placed in the server's view."""
    import attack
    from datamodules.users import User

    x, y = batch(4)
    victim = bn_convnet()
    user = User(user_id=0, images=x, labels=y, num_classes=4, dominant_class=int(y[0]))
    norm = lambda d: float(torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())))  # noqa: E731
    g_norm = norm(fedsgd_gradient(victim, x, y))
    clip = [{"name": "clip", "clip_norm": g_norm / 10}]
    record: dict = {}
    view = attack.client_update(victim, user, attack.ThreatSpec(defenses=clip), 4, record=record)
    assert record == {"update_norm": pytest.approx(g_norm, rel=1e-3)} and "update_norm" not in view.meta
    assert norm(view.target_gradient) == pytest.approx(g_norm / 10, rel=1e-4)  # the server saw the clipped one
    record = {}
    attack.client_update(victim, user, attack.ThreatSpec(protocol="fedavg", fedavg_epochs=2, fedavg_lr=0.01,
                                                         defenses=clip), 4, record=record)
    delta = fedavg_client_update(victim, x, y, epochs=2, local_lr=0.01).delta
    assert record["update_norm"] == pytest.approx(norm(delta), rel=1e-3)
