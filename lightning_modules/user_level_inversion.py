"""User-level gradient inversion with a diffusion prior (arXiv 2409.07291), as a Lightning module.

The representative image x_hat (1 x C x H x W, pixels in [0, 1]) is the module's only trainable parameter; the victim
and the DDPM prior are frozen and kept in eval mode. Each step s of S:

1. dummy gradient g_hat = grad_w CE(f_w(x_hat), y_hat), with ``create_graph=True``;
2. gradient matching loss: per-layer cosine distances weighted by a sliding asymmetric Hamming window over the layer
   index (deepest layers first, shallowest later; uniform when the window is off);
3. prior loss L_prior = E_eps |eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) - eps|^2 at x0 = 2 x_hat - 1
   (Graikos et al. 2022), with t(s) annealed from t_max to t_min (uniformly random in [t_min, t_max] when off);
4. dynamic clipping: g_match is rescaled to kappa |g_prior| when larger; Adam steps on g_match + g_prior; pixels are
   boxed to [0, 1];
5. after the last step, final denoising: diffuse x_hat to t_final and run the prior's reverse process back to 0.

Every mechanism is switchable for ablations (``use_window``, ``anneal_t``, ``use_clipping``, ``use_prior``,
``final_denoise``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from inversion.label_inference import infer_labels
from inversion.logging_utils import log_image_grid
from inversion.objectives import (
    clip_matching_gradient,
    gradient_matching_loss,
    sliding_window_weights,
    timestep_at,
    window_centre,
)
from inversion.prior import DiffusionPrior
from inversion.scenario import ServerView, check_target_gradient, victim_parameters
from lightning_modules.base_attack import AttackDivergedError, AttackResult, GradientInversionAttack

LABEL_TARGETS = ("dominant", "soft")
INITS = ("noise", "gray")
LR_DECAYS = ("none", "cosine", "step")


class UserLevelInversion(GradientInversionAttack):
    """Recover one representative image of a user from its target gradient.

    Args:
        steps: optimisation steps S (paper: 4000).
        lr: Adam learning rate on pixels in [0, 1]; lr_decay: 'none', 'cosine' (to 1% of lr) or 'step'
            (x0.1 at 3/8, 5/8 and 7/8 of S, as Inverting Gradients).
        label_strategy: label inference strategy ('bias_corrected', 'sign', 'idlg', 'known').
        label_target: 'dominant' (one-hot on the inferred dominant class) or 'soft' (the inferred label
            distribution as a soft CE target).
        init: 'noise' (uniform [0, 1]) or 'gray' (0.5 plus N(0, 0.05)).
        use_window: sliding layer window on (off: uniform layer weights).
        window_slide_fraction: part of the run over which the centre slides from deepest to shallowest.
        window_width_deep, window_width_shallow: window half-widths in layers (parameter tensors), toward deeper
            and toward shallower layers.
        window_floor: weight of layers outside the window.
        use_prior: add the diffusion prior loss (needs a prior at :meth:`bind`).
        prior_weight: lambda.
        t_max, t_min: timestep range of the prior loss (T = 1000 for the shipped prior).
        anneal_t: anneal t from t_max to t_min (off: t ~ U[t_min, t_max] each step).
        t_schedule: 'linear', 'cosine' or 'sqrt'; anneal_fraction: part of the run the annealing takes.
        prior_noise_samples: noise draws eps averaged per step.
        use_clipping: dynamic clipping on; kappa: the largest allowed |g_match| / |g_prior|.
        final_denoise: run the final denoising; t_final: its starting timestep; denoise_method: 'ddim' or 'ddpm';
            denoise_steps: DDIM steps.
        steps, label_strategy, seed, log_images_every, log_prefix: see :class:`GradientInversionAttack`.

    Raises:
        ValueError: an unknown option or an out-of-range setting (at construction, before any work).
    """

    def __init__(
        self,
        steps: int = 4000,
        lr: float = 0.05,
        lr_decay: str = "cosine",
        label_strategy: str = "bias_corrected",
        label_target: str = "dominant",
        init: str = "noise",
        use_window: bool = True,
        window_slide_fraction: float = 0.5,
        window_width_deep: float = 12.0,
        window_width_shallow: float = 24.0,
        window_floor: float = 0.0,
        use_prior: bool = True,
        prior_weight: float = 1.0,
        t_max: int = 800,
        t_min: int = 20,
        anneal_t: bool = True,
        t_schedule: str = "linear",
        anneal_fraction: float = 1.0,
        prior_noise_samples: int = 1,
        use_clipping: bool = True,
        kappa: float = 1.0,
        final_denoise: bool = True,
        t_final: int = 100,
        denoise_method: str = "ddim",
        denoise_steps: int = 10,
        seed: int = 0,
        log_images_every: int = 0,
        log_prefix: str = "",
    ) -> None:
        super().__init__(steps=steps, label_strategy=label_strategy, seed=seed, log_images_every=log_images_every, log_prefix=log_prefix)
        if label_target not in LABEL_TARGETS:
            raise ValueError(f"attack.label_target must be one of {LABEL_TARGETS}, got {label_target!r}")
        if init not in INITS:
            raise ValueError(f"attack.init must be one of {INITS}, got {init!r}")
        if lr_decay not in LR_DECAYS:
            raise ValueError(f"attack.lr_decay must be one of {LR_DECAYS}, got {lr_decay!r}")
        if lr <= 0 or kappa <= 0 or prior_weight < 0 or prior_noise_samples < 1:
            raise ValueError("attack.lr and attack.kappa must be > 0, prior_weight >= 0, prior_noise_samples >= 1")
        if not 0 <= t_min <= t_max:
            raise ValueError(f"need 0 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}")
        timestep_at(0.0, t_max, t_min, t_schedule, anneal_fraction)  # validates the schedule name
        window_centre(2, 0.0, window_slide_fraction)  # validates the fraction
        sliding_window_weights(2, 0.0, window_width_deep, window_width_shallow)  # validates the widths
        self.save_hyperparameters(ignore=["log_prefix"])
        self.requires_prior = use_prior or final_denoise
        self.x_hat: Optional[torch.nn.Parameter] = None
        self.view: Optional[ServerView] = None
        self.prior: Optional[DiffusionPrior] = None
        self._denoised: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------------------------------ set-up
    def bind(self, view: ServerView, prior: Optional[DiffusionPrior] = None) -> "UserLevelInversion":
        """Attach what the server sees (and the prior); infers labels and initialises x_hat. Validates first.

        Raises:
            TargetGradientError: the target gradient does not fit the victim or holds NaN/inf.
            ValueError: a prior is needed (use_prior or final_denoise) but none is given; T too small for t_max.
            PriorMismatchError: (from DiffusionPrior) channels differ.
        """
        hp = self.hparams
        check_target_gradient(view.victim, view.target_gradient)
        if self.requires_prior:
            if prior is None:
                raise ValueError("this attack config uses the prior (use_prior or final_denoise) but no prior was given")
            T = prior.num_train_timesteps
            if hp.t_max >= T or (hp.final_denoise and hp.t_final >= T):
                raise ValueError(f"t_max ({hp.t_max}) and t_final ({hp.t_final}) must be below the prior's T = {T}")
            if tuple(prior.image_shape) != tuple(view.image_shape):
                raise ValueError(f"prior built for images {prior.image_shape}, the target is {view.image_shape}")
        self.view = view
        self.victim = view.victim.eval()
        self.prior = prior.eval() if prior is not None else None
        params = victim_parameters(self.victim)
        self.param_names = list(params)
        self._params = list(params.values())
        self.target = [view.target_gradient[n].float() for n in self.param_names]
        self.labels = infer_labels(
            view.target_gradient, view.num_classes, view.batch_size, self.label_strategy, known_labels=view.labels
        )
        if hp.label_target == "soft":
            soft = self.labels.proportions.float()
        else:
            soft = F.one_hot(torch.tensor(self.labels.dominant), view.num_classes).float()
        self.register_buffer("y_soft", soft.unsqueeze(0))
        g = torch.Generator().manual_seed(self.seed)
        shape = (1, *view.image_shape)
        if hp.init == "noise":
            x0 = torch.rand(shape, generator=g)
        else:
            x0 = (0.5 + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)
        self.x_hat = torch.nn.Parameter(x0)
        return self

    def train(self, mode: bool = True):
        """Lightning puts the module in train mode at fit start; the victim and the prior stay in eval mode."""
        super().train(mode)
        for m in (getattr(self, "victim", None), self.prior):
            if m is not None:
                m.eval()
        return self

    def configure_optimizers(self):
        if self.x_hat is None:
            raise RuntimeError("call bind(view, prior) before fitting the attack")
        opt = torch.optim.Adam([self.x_hat], lr=self.hparams.lr)
        S, decay = self.steps, self.hparams.lr_decay
        if decay == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=S, eta_min=0.01 * self.hparams.lr)
        elif decay == "step":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(S * f) for f in (3 / 8, 5 / 8, 7 / 8)], gamma=0.1)
        else:
            return opt
        return {"optimizer": opt, "lr_scheduler": sched}

    def on_fit_start(self) -> None:
        self.target = [g.to(self.device) for g in self.target]
        self._noise_gen = torch.Generator(device=self.device).manual_seed(self.seed + 1)
        self._t_gen = torch.Generator().manual_seed(self.seed + 2)

    def on_train_start(self) -> None:  # after a checkpoint restore: continue the same noise streams
        rng = getattr(self, "_resume_rng", None)
        if rng is not None:
            self._noise_gen.set_state(rng["noise"])
            self._t_gen.set_state(rng["t"])

    # ------------------------------------------------------------------------------------------ the loop
    def layer_weights(self, progress: float) -> tuple[Optional[torch.Tensor], float]:
        """Window weights (L,) at progress s/S and the window centre (layer index); (None, nan) when off."""
        L = len(self.param_names)
        if not self.hparams.use_window:
            return None, float("nan")
        c = window_centre(L, progress, self.hparams.window_slide_fraction)
        w = sliding_window_weights(L, c, self.hparams.window_width_deep, self.hparams.window_width_shallow, self.hparams.window_floor)
        return w, c

    def timestep(self, progress: float) -> int:
        hp = self.hparams
        if hp.anneal_t:
            return timestep_at(progress, hp.t_max, hp.t_min, hp.t_schedule, hp.anneal_fraction)
        return int(torch.randint(hp.t_min, hp.t_max + 1, (1,), generator=self._t_gen))

    def matching_loss(self, x: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        """Gradient matching loss of images x (1, C, H, W) in [0, 1] against the target gradient; scalar."""
        logits = self.victim(x)
        ce = -(self.y_soft.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        dummy = torch.autograd.grad(ce, self._params, create_graph=True)
        return gradient_matching_loss(self.target, dummy, weights)

    def training_step(self, batch, batch_idx):
        hp = self.hparams
        step = self.global_step
        progress = step / max(1, self.steps - 1)
        x = self.x_hat
        weights, centre = self.layer_weights(progress)
        l_match = self.matching_loss(x, weights)
        g_match = torch.autograd.grad(l_match, x)[0]
        values = {"match": float(l_match)}
        if hp.use_prior:
            t = self.timestep(progress)
            l_prior = self.prior.prior_loss(x, t, hp.prior_noise_samples, self._noise_gen)
            g_prior = torch.autograd.grad(hp.prior_weight * l_prior, x)[0]
            ratio = float(g_match.norm() / g_prior.norm().clamp_min(1e-30))
            if hp.use_clipping:
                g_match, ratio = clip_matching_gradient(g_match, g_prior, hp.kappa)
            grad = g_match + g_prior
            values.update(prior=float(l_prior), t=t, clip_ratio=ratio)
        else:
            grad = g_match
        if hp.use_window:
            values["window_centre"] = centre
        for name, v in values.items():
            if v != v or v in (float("inf"), float("-inf")) and name != "clip_ratio":
                raise AttackDivergedError(step, f"the {name} value")
        if not torch.isfinite(grad).all():
            raise AttackDivergedError(step, "the image gradient")
        opt = self.optimizers()
        opt.zero_grad()
        x.grad = grad.to(x.dtype)
        opt.step()
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
        self.record(values, prog_bar=("match", "prior", "t"))
        every = self.log_images_every
        if every and (step % every == 0 or step == self.steps - 1):
            log_image_grid(self.logger, self.log_prefix + "reconstruction", x.detach(), step=step)

    def on_train_end(self) -> None:
        hp = self.hparams
        if hp.final_denoise and self.prior is not None:
            g = torch.Generator(device=self.device).manual_seed(self.seed + 3)
            self._denoised = self.prior.denoise(
                self.x_hat.detach().float(), hp.t_final, hp.denoise_method, hp.denoise_steps, generator=g
            ).cpu()

    def on_save_checkpoint(self, checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["attack_rng"] = {"noise": self._noise_gen.get_state(), "t": self._t_gen.get_state()}

    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        self._resume_rng = checkpoint.get("attack_rng")

    def result(self) -> AttackResult:
        x = self.x_hat.detach().float().cpu().clamp(0, 1)
        return AttackResult(
            representative=x,
            reconstructions=x,
            denoised=self._denoised,
            labels=self.labels,
            steps=self.global_step,
            history=self.history,
        )
