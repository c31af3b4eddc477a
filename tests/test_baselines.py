"""Sample-level baselines (DLG, iDLG, Inverting Gradients) on tiny nets, driven by a real Lightning Trainer."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
from lightning import Callback, Trainer

from inversion.scenario import make_server_view
from lightning_modules.base_attack import AttackDivergedError
from lightning_modules.baselines import (
    ATTACKS,
    DLG,
    InvertingGradients,
    cosine_gradient_distance,
    iDLG,
    l2_gradient_distance,
    resolve_attack,
    total_variation,
)

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings(r"ignore:.*module\(s\) in eval mode.*"),  # the frozen victim, intentionally
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),  # inside lightning, not ours
]


def tiny_mlp(seed: int = 0) -> nn.Module:
    """Normalize-free 2-layer MLP on 1x8x8 images, 4 classes (sigmoid: twice differentiable, as DLG assumes)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 4))


def tiny_bn_convnet(seed: int = 0) -> nn.Module:
    """Small conv net with BatchNorm (non-trivial running stats) on 1x8x8 images, 4 classes."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Sigmoid(), nn.Flatten(), nn.Linear(256, 4)
    )
    net[1].running_mean.uniform_(-0.2, 0.2)
    net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


def images(n: int, seed: int = 100) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def fit(attack, callbacks=()):
    trainer = Trainer(
        max_steps=attack.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=list(callbacks),
    )
    trainer.fit(attack)
    return attack.result()


# ---------------------------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------------------------


def test_total_variation_hand_computed():
    x = torch.tensor([[0.0, 1.0], [2.0, 4.0]]).view(1, 1, 2, 2)
    # along W: |1-0|, |4-2| -> mean 1.5; along H: |2-0|, |4-1| -> mean 2.5
    assert total_variation(x).item() == pytest.approx(4.0)
    assert total_variation(torch.full((2, 3, 5, 5), 0.3)).item() == 0.0


def test_gradient_distances():
    a = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    b = [torch.tensor([0.0, 2.0]), torch.tensor([[1.0]])]
    assert l2_gradient_distance(a, b).item() == pytest.approx(1.0 + 4.0)
    assert cosine_gradient_distance(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_gradient_distance(a, [-t for t in a]).item() == pytest.approx(2.0)
    c = [torch.randn_like(t) for t in a]
    torch.testing.assert_close(cosine_gradient_distance([1e-8 * t for t in a], [1e-7 * t for t in c]),
                               cosine_gradient_distance(a, c))  # scale-invariant for tiny gradients too
    assert cosine_gradient_distance(a, [5 * t for t in a]).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    # layers are concatenated: <a,b> = 4 + 3 = 7, |a| = sqrt(14), |b| = sqrt(5)
    assert cosine_gradient_distance(a, b).item() == pytest.approx(1 - 7 / (14**0.5 * 5**0.5), rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        l2_gradient_distance(a, [b[0], torch.zeros(2)])


# ---------------------------------------------------------------------------------------------------------------
# DLG / iDLG
# ---------------------------------------------------------------------------------------------------------------


def test_dlg_recovers_single_image_and_soft_label():
    x, y = images(1), torch.tensor([2])
    victim = tiny_mlp()
    before = copy.deepcopy(victim.state_dict())
    view = make_server_view(victim, x, y, num_classes=4)
    res = fit(DLG(steps=8, seed=0).bind(view))
    # Measured: MSE <= 1.6e-6 over 10 seeds (images, nets, inits) with 5 steps, typically ~3e-10. The bound 1e-4
    # (RMSE 0.01, ~2.5 grey levels of 255) leaves two orders of magnitude of slack while a failed run
    # (random init, MSE ~0.3) is far above it.
    assert ((res.representative - x) ** 2).mean().item() < 1e-4
    assert res.reconstructions.shape == (1, 1, 8, 8) and res.denoised is None
    assert res.labels.dominant == 2 and res.labels.strategy == "dlg"
    assert res.extras["soft_labels"].shape == (1, 4)
    assert res.steps == 8 and len(res.history["grad_loss"]) == 8
    assert 0.0 <= res.representative.min() and res.representative.max() <= 1.0
    for k, v in victim.state_dict().items():  # the caller's victim is untouched
        assert torch.equal(v, before[k])


def test_idlg_label_exact_and_single_image_only():
    for s in range(3):
        x, y = images(1, seed=200 + s), torch.tensor([s + 1])
        view = make_server_view(tiny_mlp(s), x, y, num_classes=4)
        attack = iDLG(steps=3, seed=s).bind(view)
        assert attack.fixed_labels.tolist() == [s + 1]  # analytic label, before any optimisation
        res = fit(attack)
        assert res.labels.dominant == s + 1 and res.labels.strategy == "idlg"
        assert ((res.representative - x) ** 2).mean().item() < 1e-4
    two = make_server_view(tiny_mlp(), images(2), torch.tensor([0, 1]), num_classes=4)
    with pytest.raises(ValueError, match="B = 1"):
        iDLG(steps=1).bind(two)
    with pytest.raises(ValueError, match="label_strategy"):
        iDLG(label_strategy="sign")


def test_sample_level_attacks_need_batch_size():
    view = make_server_view(tiny_mlp(), images(1), torch.tensor([0]), num_classes=4, reveal_batch_size=False)
    for cls in (DLG, iDLG, InvertingGradients):
        with pytest.raises(ValueError, match="batch size B"):
            cls(steps=1).bind(view)


class _LogNet(nn.Module):
    """log(x) then linear: finite for the client's pixels in (0.1, 1], NaN for DLG's N(0.5, 0.5^2) initial pixels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc(torch.log(x).flatten(1))


def test_divergence_raises_through_trainer():
    x = 0.1 + 0.9 * images(1)
    view = make_server_view(_LogNet(), x, torch.tensor([1]), num_classes=4)
    with pytest.raises(AttackDivergedError, match="gradient loss") as err:
        fit(DLG(steps=3).bind(view))
    assert err.value.step == 0
    # the fix it suggests is DLG's own: the user-level attack's "raise the prior weight" named a knob DLG lacks
    assert "line_search_fn strong_wolfe" in str(err.value) and "prior" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# Inverting Gradients
# ---------------------------------------------------------------------------------------------------------------


class _BoxCheck(Callback):
    def __init__(self) -> None:
        self.ranges = []
        self.victim_training = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ranges.append((pl_module.x.min().item(), pl_module.x.max().item()))
        self.victim_training.append(pl_module.victim.training)


def test_inverting_gradients_boxed_schedule_restarts_and_frozen_victim():
    x, y = images(2), torch.tensor([3, 1])
    victim = tiny_bn_convnet()
    before = copy.deepcopy(victim.state_dict())
    view = make_server_view(victim, x, y, num_classes=4)
    attack = InvertingGradients(steps=16, lr=0.1, tv_weight=1e-2, restarts=2, seed=1, label_strategy="bias_corrected")
    attack.bind(view)
    assert sorted(attack.fixed_labels.tolist()) == [1, 3]  # counts from label inference expanded to B labels
    box = _BoxCheck()
    res = fit(attack, [box])

    # boxed to [0, 1] after every step, victim kept in eval mode (Lightning puts the module in train mode)
    assert len(box.ranges) == 16
    assert all(lo >= 0.0 and hi <= 1.0 for lo, hi in box.ranges)
    assert not any(box.victim_training)
    # the bound copy keeps the BN running stats and weights (never stepped); the caller's victim is untouched
    for k, v in attack.victim.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in attack.victim.parameters())
    for k, v in victim.state_dict().items():
        assert torch.equal(v, before[k])

    # lr decay x0.1 at 3/8, 5/8, 7/8 of 16 steps = steps 6, 10, 14
    lrs = res.history["lr"]
    assert lrs[:6] == pytest.approx([0.1] * 6)
    assert lrs[6:10] == pytest.approx([0.01] * 4)
    assert lrs[10:14] == pytest.approx([1e-3] * 4)
    assert lrs[14:] == pytest.approx([1e-4] * 2)

    # result: best restart by final gradient loss, representative = best single-image gradient match
    losses = res.extras["restart_grad_loss"]
    assert len(losses) == 2 and res.extras["best_restart"] == min(range(2), key=lambda i: losses[i])
    assert torch.equal(res.reconstructions, attack.x[res.extras["best_restart"]].detach().clamp(0, 1))
    assert res.reconstructions.shape == (2, 1, 8, 8)
    scores = res.extras["image_scores"]
    i = res.extras["representative_index"]
    assert i == min(range(2), key=lambda j: scores[j])
    assert torch.equal(res.representative, res.reconstructions[i : i + 1])
    assert res.history["grad_loss"][-1] < res.history["grad_loss"][0]


def test_inverting_gradients_tv_prior_smooths_the_reconstruction():
    """The TV term is in the loss: from the same seed, a large tv_weight ends far smoother than tv_weight = 0.

    Measured (4 seeds of images/net/init, 16 steps): final TV ~0.22-0.28 at tv_weight 1 against ~0.64-0.68 at 0
    (ratio <= 0.42; initial TV ~0.78). The bound 0.6 leaves slack while a loss without TV gives a ratio of 1.
    """
    x, y = images(2), torch.tensor([3, 1])
    view = make_server_view(tiny_bn_convnet(), x, y, num_classes=4)
    final_tv = {}
    for w in (0.0, 1.0):
        attack = InvertingGradients(steps=16, lr=0.1, tv_weight=w, restarts=2, seed=1).bind(view)
        fit(attack)
        final_tv[w] = [total_variation(attack.x[r].detach()).item() for r in range(2)]
    for r in range(2):
        assert final_tv[1.0][r] < 0.6 * final_tv[0.0][r], final_tv


class _GradSpy(Callback):
    """Records, just before every optimizer step, the gradient the optimizer sees and the raw gradient of the
    documented loss (sum over restarts of cosine distance + tv_weight * TV) at the same pixels."""

    def __init__(self) -> None:
        self.seen = []

    def on_train_start(self, trainer, pl_module):
        def hook(optimizer, args, kwargs):
            (p,) = optimizer.param_groups[0]["params"]
            assert p is pl_module.x
            with torch.enable_grad():
                raw = torch.zeros_like(p)
                for r in range(pl_module.restarts):
                    gl, tv = pl_module.restart_loss(r, create_graph=True)
                    raw += torch.autograd.grad(gl + pl_module.tv_weight * tv, p)[0]
            self.seen.append((p.grad.detach().clone(), raw.detach()))

        trainer.optimizers[0].register_step_pre_hook(hook)


@pytest.mark.parametrize("signed", [True, False])
def test_inverting_gradients_adam_sees_the_signed_gradient(signed):
    """signed=True (Geiping's default): Adam steps on sign(grad), values in {-1, 0, 1} with the raw gradient's signs;
    signed=False: on the raw gradient itself."""
    x, y = images(2), torch.tensor([3, 1])
    view = make_server_view(tiny_bn_convnet(), x, y, num_classes=4)
    spy = _GradSpy()
    fit(InvertingGradients(steps=4, lr=0.1, tv_weight=1e-2, restarts=2, seed=1, signed=signed).bind(view), [spy])
    assert len(spy.seen) == 4
    for g, raw in spy.seen:
        assert g.shape == (2, 2, 1, 8, 8)
        clear = raw.abs() > 1e-6  # signs of float-noise-sized entries are not compared
        assert clear.float().mean() > 0.9
        if signed:
            assert set(g.unique().tolist()) <= {-1.0, 0.0, 1.0}
            assert torch.equal(g[clear], raw.sign()[clear])
        else:
            torch.testing.assert_close(g, raw, rtol=1e-5, atol=1e-9)
            assert g.abs().max() < 0.1  # raw cosine/TV gradients here are ~1e-3, far from +-1


def test_inverting_gradients_validation():
    with pytest.raises(ValueError, match="restarts"):
        InvertingGradients(restarts=0)
    with pytest.raises(ValueError, match="tv_weight"):
        InvertingGradients(tv_weight=-1.0)
    with pytest.raises(ValueError, match="steps"):
        InvertingGradients(steps=0)
    for kw in ({"lr": float("nan")}, {"lr": float("inf")}, {"tv_weight": float("nan")}):  # passed before
        with pytest.raises(ValueError, match="finite"):
            InvertingGradients(**kw)
    with pytest.raises(ValueError, match="DLG lr .*finite"):
        DLG(lr=float("nan"))
    from lightning_modules.user_level_inversion import UserLevelInversion

    # beyond float32 (a Python float is finite far beyond): DLG/IG raised deep inside the optimiser, the user-level
    # attack inside Adam ("value cannot be converted to type float without overflow")
    for make in (DLG, InvertingGradients, UserLevelInversion):
        for lr in (1e38 * 10, 1e-300):
            with pytest.raises(ValueError, match=r"lr.* outside float32's range"):
                make(lr=lr)
    with pytest.raises(RuntimeError, match="bind"):
        InvertingGradients(steps=1).configure_optimizers()


# ---------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------


def test_resolve_attack():
    assert resolve_attack("dlg") is DLG
    assert resolve_attack("idlg") is iDLG
    assert resolve_attack("inverting_gradients") is InvertingGradients
    assert set(ATTACKS) == {"user_level", "dlg", "idlg", "inverting_gradients"}
    with pytest.raises(ValueError, match="inverting_gradients"):
        resolve_attack("deep_leakage")


def test_inverting_gradients_resumed_from_a_checkpoint_counts_every_step(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    x, y = images(2), torch.tensor([3, 1])
    view = make_server_view(tiny_bn_convnet(), x, y, num_classes=4)

    def trainer(max_steps, ckpt=None):
        cbs = [ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)] if ckpt is None else []
        return Trainer(max_steps=max_steps, logger=False, enable_checkpointing=ckpt is None, enable_progress_bar=False,
                       enable_model_summary=False, accelerator="cpu", callbacks=cbs)

    full = InvertingGradients(steps=6, lr=0.1, seed=1).bind(view)
    trainer(6).fit(full)
    resumed = InvertingGradients(steps=6, lr=0.1, seed=1).bind(view)
    trainer(6, ckpt=True).fit(resumed, ckpt_path=str(next(tmp_path.glob("*step=3.ckpt"))))
    a, b = full.result(), resumed.result()
    assert a.steps == b.steps == 6  # was 3: the counter restarted at bind
    assert torch.allclose(a.reconstructions, b.reconstructions, atol=1e-6)


def test_users_with_fewer_classes_than_the_victims_outputs():
    """The server's label space is the victim's outputs (10 here), not the users' classes (3): attack.py passes
    victim_num_outputs to the client update, and every attack binds and steps (label inference looked for a last
    layer with 3 outputs; DLG's soft labels had 3 columns against 10 logits)."""
    import attack
    from datamodules.users import User
    from inversion.scenario import victim_num_outputs
    from lightning_modules.baselines import DLG, InvertingGradients

    torch.manual_seed(0)
    victim = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    victim.train()
    assert victim_num_outputs(victim, (1, 8, 8)) == 10 and victim.training  # mode restored
    victim.eval()
    user = User(0, torch.rand(4, 1, 8, 8), torch.tensor([0, 0, 1, 2]), 3, 0)
    view = attack.client_update(victim, user, attack.ThreatSpec(), victim_num_outputs(victim, (1, 8, 8)))
    assert view.num_classes == 10
    for module in (DLG(steps=1), DLG(steps=1, label_strategy="bias_corrected"), InvertingGradients(steps=1)):
        module.bind(view)
        labels = module.current_labels() if isinstance(module, DLG) else module.fixed_labels
        x = module.x if isinstance(module, DLG) else module.x[0]  # IG: (restarts, B, C, H, W)
        loss = sum(g.square().sum() for g in module.dummy_gradient(x, labels))
        assert torch.isfinite(loss)


def test_label_strategy_is_checked_at_construction():
    """A misspelt label_strategy fails when the attack is built (attack.py's probe, before any user), naming the
    values this attack accepts (DLG's own 'optimize' included); it failed at the first bind, without 'optimize'."""
    from lightning_modules.baselines import DLG, InvertingGradients
    from lightning_modules.user_level_inversion import UserLevelInversion

    with pytest.raises(ValueError, match=r"DLG: unknown label_strategy 'optimise'; choose one of \['optimize', "):
        DLG(label_strategy="optimise")
    with pytest.raises(ValueError, match=r"InvertingGradients: unknown label_strategy 'optimize'; choose one of "
                                         r"\['idlg', 'sign', 'bias_corrected', 'known'\]"):
        InvertingGradients(label_strategy="optimize")
    with pytest.raises(ValueError, match="UserLevelInversion: unknown label_strategy 'bias'"):
        UserLevelInversion(label_strategy="bias")
    assert DLG(label_strategy="known").label_strategy == "known"
    assert "optimize" not in InvertingGradients.label_strategies() and "sign" in InvertingGradients.label_strategies()
