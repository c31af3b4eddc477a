"""Review fixes of the prior's UNet checks, the final stage's name, and the attack's setting checks.

1. DiffusionPrior checks the UNet at construction: a learned-variance UNet (out_channels = 2 C, scheduler
   variance_type 'learned' / 'learned_range') is used through its epsilon half (it broadcast (N, 2C) against (N, C) in
   the prior loss and crashed the DDIM denoising after all steps); other output channel counts, class-conditional
   UNets and a missing sample_size are refused with one clear PriorMismatchError.
2. final_stage_name records the DDIM steps that run, min(denoise_steps, t_final).
3. check_prior checks t_max only with use_prior, t_final only with final_denoise.
4. The constructor names the setting that broke a check and its value.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from lightning.pytorch import Trainer

from inversion.prior import DiffusionPrior, PriorMismatchError
from inversion.scenario import make_server_view
from lightning_modules.user_level_inversion import UserLevelInversion, final_stage_label
from tests.helpers import tiny_unet, tiny_victim


def unet(seed: int = 0, **kw) -> UNet2DModel:
    """A tiny 1-channel 8 x 8 UNet2DModel; ``kw`` overrides its config (out_channels, num_class_embeds, ...)."""
    torch.manual_seed(seed)
    args = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)
    args.update(kw)
    return UNet2DModel(**args).eval()


class EpsilonHalf(nn.Module):
    """An epsilon-only UNet made of a learned-variance one: its output's first C channels (the reference)."""

    def __init__(self, inner: UNet2DModel) -> None:
        super().__init__()
        self.inner = inner
        self.config = SimpleNamespace(**{**dict(inner.config), "out_channels": inner.config.in_channels})

    def forward(self, x, t):
        return SimpleNamespace(sample=self.inner(x, t).sample[:, : self.config.in_channels])


def _trainer(steps: int) -> Trainer:
    return Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", devices=1)


# ------------------------------------------------------------------------------------------- 1a learned variance
def test_learned_variance_prior_uses_the_epsilon_half_in_the_loss_and_both_denoisings():
    sched = DDPMScheduler(num_train_timesteps=100, variance_type="learned_range")
    lv = unet(out_channels=2)
    prior = DiffusionPrior(lv, sched, (1, 8, 8))
    ref = DiffusionPrior(EpsilonHalf(lv), DDPMScheduler(num_train_timesteps=100), (1, 8, 8))
    assert prior.learned_variance and not ref.learned_variance
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the broadcast (N, 2, 8, 8) vs (N, 1, 8, 8) warned
        loss = prior.prior_loss(x, 30, num_noise=2, generator=torch.Generator().manual_seed(2))
        per = prior.prior_loss(x, [10, 60], generator=torch.Generator().manual_seed(3), reduction="none")
    # by hand: |eps_theta(x_t, t)[:, :1] - eps|^2 with the same noise
    g = torch.Generator().manual_seed(2)
    x0 = (x * 2 - 1).repeat_interleave(2, dim=0)
    eps = torch.randn(x0.shape, generator=g)
    abar = sched.alphas_cumprod[30]
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    with torch.no_grad():
        expected = (lv(xt, torch.full((4,), 30)).sample[:, :1] - eps).square().mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(per, ref.prior_loss(x, [10, 60], generator=torch.Generator().manual_seed(3),
                                                   reduction="none"))
    # DDIM: the epsilon half (it crashed: "expected input[2, 2, 8, 8] to have 1 channels")
    out = prior.denoise(x, 20, "ddim", 4, generator=torch.Generator().manual_seed(4))
    assert out.shape == (2, 1, 8, 8) and 0 <= float(out.min()) and float(out.max()) <= 1
    torch.testing.assert_close(out, ref.denoise(x, 20, "ddim", 4, generator=torch.Generator().manual_seed(4)))
    # DDPM: diffusers' step gets the whole output and uses the variance half (learned_range)
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    ddpm = prior.denoise(x, 5, "ddpm", generator=gens)
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    fixed = ref.denoise(x, 5, "ddpm", generator=gens)
    assert ddpm.shape == (2, 1, 8, 8) and not torch.allclose(ddpm, fixed)  # the learned variance is used


def test_attack_with_a_learned_variance_prior_finishes_its_ddim_final_stage():
    model, _ = tiny_victim()
    view = make_server_view(model, torch.rand(2, 1, 8, 8), torch.tensor([1, 1]), 10)
    prior = DiffusionPrior(unet(out_channels=2), DDPMScheduler(num_train_timesteps=100, variance_type="learned"),
                           (1, 8, 8))
    atk = UserLevelInversion(steps=2, t_max=50, t_min=5, t_final=20, denoise_steps=3).bind(view, prior)
    _trainer(2).fit(atk)
    res = atk.result()
    assert res.denoised.shape == (1, 1, 8, 8) and len(res.history["prior"]) == 2
    assert all(v == v and 0 < v < 10 for v in res.history["prior"])  # |eps_hat - eps|^2 of an untrained UNet: ~1


# ------------------------------------------------------------------------------------------- 1a-c refused UNets
@pytest.mark.parametrize("kw, variance_type, match", [
    ({"out_channels": 2}, "fixed_small", r"out_channels=2 for in_channels=1 \(scheduler variance_type 'fixed_small'\)"),
    ({"out_channels": 3}, "learned_range", r"out_channels=3 for in_channels=1"),
    ({"out_channels": 1}, "learned_range", r"variance_type 'learned_range' but its UNet predicts no variance"),
    ({"num_class_embeds": 10}, "fixed_small", r"class-conditional \(num_class_embeds=10"),
    ({"class_embed_type": "timestep"}, "fixed_small", r"class-conditional .*class_embed_type='timestep'"),
    ({"sample_size": None}, "fixed_small", r"no sample_size .*set sample_size in the prior's unet/config.json"),
])
def test_unusable_unets_are_refused_at_construction(kw, variance_type, match):
    with pytest.raises(PriorMismatchError, match=match):
        DiffusionPrior(unet(**kw), DDPMScheduler(num_train_timesteps=100, variance_type=variance_type), (1, 8, 8))


def test_a_class_conditional_prior_folder_is_refused_at_load(tmp_path):
    """It crashed only in the final denoising ("class_labels should be provided"), after every step."""
    DDPMPipeline(unet=unet(num_class_embeds=10), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(
        str(tmp_path / "ddpm"), safe_serialization=True)
    with pytest.raises(PriorMismatchError, match="unconditional"):
        DiffusionPrior.from_pretrained(str(tmp_path / "ddpm"), (1, 8, 8))


# ------------------------------------------------------------------------------------------- 2 final stage name
def test_final_stage_name_records_the_ddim_steps_that_run():
    a = UserLevelInversion(t_final=20, denoise_steps=50)
    b = UserLevelInversion(t_final=20, denoise_steps=20)
    assert a.final_stage_name == b.final_stage_name == "denoise t=20 ddim/20"
    assert UserLevelInversion(t_final=100, denoise_steps=10).final_stage_name == "denoise t=100 ddim/10"
    assert UserLevelInversion(t_final=5, denoise_steps=8, final_candidates=3).final_stage_name == \
        "select N=3 t=5 mu=1 ddim/5"
    assert UserLevelInversion(t_final=5, denoise_steps=8, denoise_method="ddpm").final_stage_name == "denoise t=5 ddpm"
    assert final_stage_label(True, 1, 20, 1.0, "ddim", 50) == "denoise t=20 ddim/20"  # report.final_stage_of's path
    # the same computation: 50 configured steps from t_final 20 are the 20 steps of denoise_steps = 20
    prior = DiffusionPrior(tiny_unet(8), DDPMScheduler(num_train_timesteps=100), (1, 8, 8))
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prior.denoise(x, 20, "ddim", 50, generator=torch.Generator().manual_seed(1)),
                               prior.denoise(x, 20, "ddim", 20, generator=torch.Generator().manual_seed(1)))


# ------------------------------------------------------------------------------------------- 3 check_prior
def test_check_prior_checks_only_the_timesteps_of_mechanisms_that_are_on():
    prior = DiffusionPrior(tiny_unet(8), DDPMScheduler(num_train_timesteps=200), (1, 8, 8))
    UserLevelInversion(use_prior=False, t_max=300, t_final=20).check_prior(prior)  # t_max unused: was refused
    UserLevelInversion(final_denoise=False, t_max=100, t_final=500).check_prior(prior)
    with pytest.raises(ValueError, match=r"t_max \(300\) must be below the prior's T = 200") as info:
        UserLevelInversion(t_max=300, t_final=20).check_prior(prior)
    assert "t_final" not in str(info.value)  # t_final = 20 is fine: not named
    with pytest.raises(ValueError, match=r"^t_final \(250\) must be below the prior's T = 200"):
        UserLevelInversion(use_prior=False, t_max=300, t_final=250).check_prior(prior)
    with pytest.raises(ValueError, match=r"t_max \(300\) .*; t_final \(250\) must be below the prior's T = 200"):
        UserLevelInversion(t_max=300, t_final=250).check_prior(prior)
    # the ablation binds and runs with its unused t_max
    model, _ = tiny_victim()
    view = make_server_view(model, torch.rand(2, 1, 8, 8), torch.tensor([1, 1]), 10)
    atk = UserLevelInversion(steps=1, use_prior=False, t_max=300, t_final=20, denoise_steps=2).bind(view, prior)
    _trainer(1).fit(atk)
    assert atk.result().denoised.shape == (1, 1, 8, 8)


# ------------------------------------------------------------------------------------------- 4 named settings
@pytest.mark.parametrize("kw, match", [
    ({"kappa": 0.0}, r"^attack\.kappa must be > 0 .*got 0\.0$"),
    ({"kappa": float("nan")}, r"^attack\.kappa must be > 0 .*got nan$"),
    ({"lr": 0.0}, r"^attack\.lr .*must be a finite number > 0, got 0\.0$"),
    ({"prior_weight": -1.0}, r"^attack\.prior_weight must be >= 0 .*got -1\.0$"),
    ({"prior_noise_samples": 0}, r"^attack\.prior_noise_samples must be >= 1 .*got 0$"),
    ({"output_weight": -0.5}, r"^attack\.output_weight must be >= 0 .*got -0\.5$"),
    ({"denoise_method": "heun"}, r"^attack\.denoise_method must be 'ddim' or 'ddpm', got 'heun'$"),
    ({"denoise_steps": 0}, r"^attack\.denoise_steps must be >= 1 .*got 0$"),
    ({"t_final": 0}, r"^attack\.t_final must be >= 1 .*got 0$"),
    ({"final_candidates": 0}, r"^attack\.final_candidates must be >= 1 .*got 0$"),
    ({"selection_output_weight": -1.0}, r"^attack\.selection_output_weight must be >= 0, got -1\.0$"),
    ({"t_min": 900, "t_max": 100}, r"need 0 <= t_min <= t_max, got t_min=900, t_max=100"),
])
def test_constructor_names_the_setting_that_broke_a_check(kw, match):
    with pytest.raises(ValueError, match=match):
        UserLevelInversion(**kw)


def test_kappa_0_is_named_alone():
    """kappa 0 gave 'attack.lr and attack.kappa must be > 0, prior_weight and output_weight >= 0, ...': every
    constraint, no value."""
    with pytest.raises(ValueError) as info:
        UserLevelInversion(kappa=0.0)
    assert not any(other in str(info.value) for other in ("attack.lr", "prior_weight", "prior_noise_samples"))
