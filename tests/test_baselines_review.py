"""Review fixes for the sample-level baselines and label inference (tiny nets, a few steps each).

- precision '64-true' fits of DLG / iDLG / InvertingGradients score and return their reconstructions;
- bias_corrected gives every class with a negative bias gradient at least one image when there are at most B;
- an InvertingGradients restart that goes NaN is frozen and dropped, the attack raises only when all have;
- cosine_gradient_distance has a finite gradient at an exactly zero dummy gradient;
- an all-zero last-layer gradient marks the label inference uninformative, with a warning;
- total_variation's scale under Normalize(0.5, 0.5), behind the InvertingGradients docstring's unit equivalents.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from lightning import Callback, Trainer

from inversion.label_inference import infer_labels
from inversion.scenario import fedsgd_gradient, make_server_view
from lightning_modules.base_attack import AttackDivergedError
from lightning_modules.baselines import DLG, InvertingGradients, cosine_gradient_distance, iDLG, total_variation
from tests.helpers import QUIET_FIT_WARNINGS, tiny_mlp

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = QUIET_FIT_WARNINGS


def images(n: int, seed: int = 100) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def fit(attack, precision="32-true", callbacks=()):
    trainer = Trainer(max_steps=attack.steps, precision=precision, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                      callbacks=list(callbacks))
    trainer.fit(attack)
    return attack.result()


# ---------------------------------------------------------------------------------------------------------------
# 1. trainer precision '64-true'
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DLG, iDLG, InvertingGradients])
def test_precision_64_true_fit_returns_float32_scored_in_float64(cls):
    """Crashed after the whole fit ("mat1 and mat2 must have the same dtype, but got Float and Double"): _finish
    scored float32 images with the float64 victim copy. Now scored in the copy's dtype, returned float32 on the CPU."""
    B = 1 if cls is iDLG else 2
    view = make_server_view(tiny_mlp(), images(B), torch.arange(B), num_classes=4)
    kwargs = {"restarts": 2} if cls is InvertingGradients else {"max_iter": 2}
    attack = cls(steps=2, **kwargs).bind(view)
    res = fit(attack, precision="64-true")
    assert attack.x.dtype == torch.float64 and attack.victim_dtype() == torch.float64  # Lightning converted them
    assert res.reconstructions.dtype == torch.float32 and res.reconstructions.device.type == "cpu"
    assert res.reconstructions.shape == (B, 1, 8, 8)
    assert res.representative.dtype == torch.float32 and res.representative.shape == (1, 1, 8, 8)
    x = (attack.x[res.extras.get("best_restart", 0)] if cls is InvertingGradients else attack.x).detach()
    torch.testing.assert_close(res.reconstructions, x.float().clamp(0, 1).cpu(), rtol=0, atol=0)
    y = attack.current_labels().detach() if isinstance(attack, DLG) else attack.fixed_labels
    if cls is DLG:
        assert res.extras["soft_labels"].dtype == torch.float32
        torch.testing.assert_close(res.extras["soft_labels"], y.float())
    # the scores are the float64 cosine distances of each reported image's own gradient
    for i in range(B):
        g = attack.dummy_gradient(res.reconstructions[i : i + 1].double(), y[i : i + 1], create_graph=False)
        want = float(cosine_gradient_distance([a.detach() for a in g], attack.targets()))
        assert res.extras["image_scores"][i] == pytest.approx(want, rel=1e-6, abs=1e-7)
        assert 0.0 <= res.extras["image_scores"][i] <= 2.0


# ---------------------------------------------------------------------------------------------------------------
# 2. bias_corrected: one image per negative class first
# ---------------------------------------------------------------------------------------------------------------


def misclassifying_linear() -> nn.Module:
    """Linear C = 10 on one-hot features: feature 0 -> class 5 (so an image of class 0 is predicted 5), features 1
    and 2 -> classes 1 and 2 (confidently correct)."""
    m = nn.Linear(4, 10)
    with torch.no_grad():
        m.weight.zero_()
        m.bias.zero_()
        m.weight[5, 0] = m.weight[1, 1] = m.weight[2, 2] = 12.0
    return m


@pytest.mark.parametrize("y, want", [([0, 1, 2], [1, 1, 1]), ([0, 0, 1, 2], [2, 1, 1])])
def test_bias_corrected_gives_each_negative_class_an_image(y, want):
    """The review's case: image 0 (class 0) predicted as 5, bias gradient ~[-1/B, -1e-5, -1e-5, +, +, +1/B, ...].
    Classes 1 and 2 have a (tiny) negative entry, which proves them present; the old estimate gave [B, 0, 0]."""
    feats = torch.eye(4)[y]
    g = fedsgd_gradient(misclassifying_linear(), feats, torch.tensor(y))
    b = g["bias"]
    assert (b[:3] < 0).all() and (b[3:] >= 0).all() and b[5] > 0.3
    inf = infer_labels(g, 10, batch_size=len(y))
    assert inf.counts.tolist() == [float(c) for c in want] + [0.0] * 7
    assert inf.present.nonzero().flatten().tolist() == [0, 1, 2] and inf.dominant == 0 and inf.informative


def test_bias_corrected_more_negative_classes_than_images_keeps_plain_rounding():
    """k = 3 negative classes > B = 2 (noise): documented fallback, the estimates rounded to B. pi = 0.1, shares
    0.5 : 0.3 : 0.2 -> 2 x shares = 1.0, 0.6, 0.4 -> [1, 1, 0]."""
    g = OrderedDict(bias=torch.tensor([-0.4, -0.2, -0.1] + [0.1] * 7))
    inf = infer_labels(g, 10, batch_size=2)
    assert inf.counts.tolist() == [1.0, 1.0] + [0.0] * 8


# ---------------------------------------------------------------------------------------------------------------
# 3. InvertingGradients: a diverged restart is dropped, not the attack
# ---------------------------------------------------------------------------------------------------------------


def ig_view():
    return make_server_view(tiny_mlp(), images(2), torch.tensor([3, 1]), num_classes=4)


def test_inverting_gradients_drops_a_nan_restart_and_keeps_the_others():
    clean = InvertingGradients(steps=3, restarts=2, seed=1).bind(ig_view())
    fit(clean)
    attack = InvertingGradients(steps=3, restarts=2, seed=1).bind(ig_view())
    with torch.no_grad():
        attack.x[1, 0, 0, 0, 0] = float("nan")
    frozen = attack.x[1].detach().clone()
    with pytest.warns(UserWarning, match=r"restart 1 of 2 diverged at step 0 \(gradient loss is NaN or inf\)"):
        res = fit(attack)
    assert attack.diverged == {1: (0, "gradient loss")} and res.extras["diverged_restarts"] == {1: (0, "gradient loss")}
    assert res.extras["best_restart"] == 0
    assert math.isfinite(res.extras["restart_grad_loss"][0]) and res.extras["restart_grad_loss"][1] == math.inf
    torch.testing.assert_close(attack.x[1].detach(), frozen, rtol=0, atol=0, equal_nan=True)  # frozen
    # restart 0 followed exactly the trajectory it has in a run without the NaN (restarts are independent)
    torch.testing.assert_close(attack.x[0].detach(), clean.x[0].detach(), rtol=0, atol=1e-7)
    torch.testing.assert_close(res.reconstructions, clean.x[0].detach().clamp(0, 1), rtol=0, atol=1e-7)
    assert res.steps == 3 and all(math.isfinite(v) for v in res.history["grad_loss"])


class _NanGradientAt(Callback):
    """Just before the optimiser step of ``step``, poisons restart 1's pixel gradient with NaN (Adam then writes NaN
    pixels); records the pixels after every step."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.after = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            pl_module.x.grad[1, 0, 0, 0, 0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(pl_module.x.detach().clone())


def test_inverting_gradients_restart_with_nan_pixels_is_put_back_to_its_last_finite_pixels():
    spy = _NanGradientAt(step=1)
    attack = InvertingGradients(steps=3, restarts=2, seed=1).bind(ig_view())
    with pytest.warns(UserWarning, match="restart 1 of 2 diverged at step 1 \\(image is NaN or inf\\)"):
        res = fit(attack, callbacks=[spy])
    assert attack.diverged == {1: (1, "image")} and res.extras["best_restart"] == 0
    assert len(spy.after) == 3 and torch.isfinite(attack.x).all()
    torch.testing.assert_close(attack.x[1].detach(), spy.after[0][1], rtol=0, atol=0)  # the pixels after step 0
    assert not torch.equal(spy.after[2][0], spy.after[0][0])  # restart 0 kept moving


def test_inverting_gradients_raises_when_every_restart_diverged():
    attack = InvertingGradients(steps=3, restarts=2, seed=1).bind(ig_view())
    with torch.no_grad():
        attack.x[:, 0, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match="diverged at step 0"), pytest.raises(
        AttackDivergedError,
        match=r"attack diverged at step 0: every one of the 2 restarts \(restart 0: gradient loss at step 0, "
              r"restart 1: gradient loss at step 0\) is NaN or inf. Lower attack.lr, or check",
    ) as err:
        fit(attack)
    assert err.value.step == 0 and "prior" not in str(err.value)


def test_a_single_restart_that_diverges_raises_without_saying_the_others_go_on(recwarn):
    """With restarts=1 the warning said '... the other restarts go on' and the attack stopped at once."""
    attack = InvertingGradients(steps=3, restarts=1, seed=1).bind(ig_view())
    with torch.no_grad():
        attack.x[:, 0, 0, 0, 0] = float("nan")
    with pytest.raises(AttackDivergedError, match="every one of the 1 restarts"):
        fit(attack)
    assert not [w for w in recwarn if "go on" in str(w.message)]


# ---------------------------------------------------------------------------------------------------------------
# 4. cosine distance at a zero dummy gradient
# ---------------------------------------------------------------------------------------------------------------


def test_cosine_distance_zero_dummy_gradient_has_finite_gradient():
    t = torch.randn(3, generator=torch.Generator().manual_seed(0))
    d = torch.zeros(3, requires_grad=True)
    loss = cosine_gradient_distance([d * 1.0], [t])
    loss.backward()
    assert loss.item() == 1.0
    assert torch.isfinite(d.grad).all()
    # d/dd (1 - <d, t> / (max(|d|, eps) |t|)) at d = 0 with the floor active: -t / (eps |t|)
    torch.testing.assert_close(d.grad, -t / (1e-12 * t.norm()), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# 5. all-zero last-layer gradient: labels are a guess, and say so
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy, B", [("bias_corrected", 3), ("sign", 3), ("idlg", 1)])
def test_zero_last_layer_gradient_is_flagged_uninformative(strategy, B):
    g = OrderedDict([("fc.weight", torch.zeros(10, 6)), ("fc.bias", torch.zeros(10))])
    with pytest.warns(UserWarning, match=rf"label inference \({strategy}\): the last layer's gradient is all zero.*"
                                         r"are a guess"):
        inf = infer_labels(g, 10, batch_size=B, strategy=strategy)
    assert inf.informative is False
    assert inf.counts.tolist() == [float(B)] + [0.0] * 9 and inf.dominant == 0  # counts unchanged: the fallback
    g["fc.bias"] = torch.tensor([-0.2, 0.2] + [0.0] * 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert infer_labels(g, 10, batch_size=B, strategy=strategy).informative is True
    assert infer_labels(g, 10, 2, "known", known_labels=torch.tensor([1, 1])).informative is True


# ---------------------------------------------------------------------------------------------------------------
# 6. units behind the InvertingGradients docstring
# ---------------------------------------------------------------------------------------------------------------


def test_total_variation_of_normalised_pixels_is_twice_that_of_unit_pixels():
    """Normalize(0.5, 0.5): x_n = 2x - 1, so TV(x_n) = 2 TV(x) and tv_weight w here is w / 2 in inversefed's units."""
    x = images(2)
    torch.testing.assert_close(total_variation(2 * x - 1), 2 * total_variation(x))
