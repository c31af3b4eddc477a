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

Output matching (an extension, off by default: ``output_weight`` = 0 is the paper's method). The cosine matching loss
is blind to how confidently the victim classifies x_hat: for a trained victim and a single-class user, the target's
last-layer residual (mean softmax minus labels) is mostly "-1 on the user's class, + on its look-alikes", and an
image that the victim reads as a look-alike (a sandal user's image read as a sneaker) has nearly the same residual
direction. The server can do better with what it already sees: the final bias gradient is g_b = pbar - n / B
(:mod:`inversion.label_inference`, Eq. 1), so with the inferred label distribution it recovers the victim's mean
softmax output over the user's batch, pbar (:func:`inversion.label_inference.mean_softmax_from_gradient`). With
``output_weight`` mu > 0 the data term becomes L_match + mu KL(pbar || softmax(f_w(x_hat))), i.e. the representative
image should make the victim predict what the user's batch made it predict on average; the sum is what dynamic
clipping compares with the prior's gradient.

Final candidate selection (an extension, off by default: ``final_candidates`` = 1 is the paper's single
denoising). The final denoising is stochastic (the diffusion noise to t_final), and from a larger t_final the
prior redraws more of the image. With ``final_candidates`` N > 1 the server denoises x_hat N times (candidate k from
its own seeded noise) and keeps the candidate with the lowest data term, mean-over-layers cosine distance plus
``selection_output_weight`` times the output-matching KL (:meth:`UserLevelInversion.selection_scores`), i.e. it
uses the prior as a proposal and its own objective as the judge. Motivation and measurements: README, Measured
results (the objective audit).

Many users per step: :meth:`UserLevelInversion.bind` also takes a sequence of U users' views. x_hat is then
U x C x H x W, row u being user u's representative image, and each step does, per user, exactly the computation
above on that user's own target gradient and inferred label: the U dummy gradients and matching losses and their
image gradients come from one vmapped pass (:class:`inversion.batched.BatchedMatching`, torch.func's
per-sample-gradient recipe), the prior loss is evaluated on the U images in one UNet batch and summed over users
(so d/dx_u is user u's own prior gradient), clipping is per user (:func:`inversion.objectives.clip_matching_gradients`),
and Adam, the lr schedule and the box are elementwise, so one parameter for all users is the same as U parameters.
All randomness is per user: user u has its own generators seeded from its seed (``seeds[u]``, default the attack's
``seed``) exactly as a one-user attack with that seed, so user u's image equals, up to float rounding, the image it
gets attacked alone (tested in tests/test_batched_attack.py). U = 1 runs the original one-user code unchanged.
Over thousands of steps on real models the rounding differences grow (Adam scales every pixel's step to about lr),
so at U > 1 a user's final image is another draw of the attack, not the one-at-a-time image: README, "Many users
per step", has the measured divergence.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from inversion.batched import BatchedMatching, stack_targets
from inversion.label_inference import LabelInference, infer_labels, mean_softmax_from_gradient
from inversion.logging_utils import log_image_grid
from inversion.numbers import float32_step_size
from inversion.objectives import (
    clip_matching_gradient,
    clip_matching_gradients,
    gradient_matching_loss,
    layer_cosine_distances,
    pow2_rescale,
    sliding_window_weights,
    timestep_at,
    weighted_layer_mean,
    window_centre,
)
from inversion.prior import DiffusionPrior
from inversion.scenario import ServerView, check_target_gradient, victim_parameters
from lightning_modules.base_attack import AttackDivergedError, AttackResult, GradientInversionAttack

LABEL_TARGETS = ("dominant", "soft")
INITS = ("noise", "gray")
LR_DECAYS = ("none", "cosine", "step")
MATCHING_REDUCTIONS = ("mean", "sum")


def final_stage_label(final_denoise: bool, final_candidates: int, t_final: int, selection_output_weight: float,
                      denoise_method: str = "ddim", denoise_steps: int = 10) -> str:
    """A short name of the attack's final stage for results tables: ``'none'`` (no final denoising),
    ``'denoise t=100 ddim/10'`` (the paper's single denoising from t_final; sampler and DDIM steps, ``ddpm`` runs
    every step from t_final) or ``'select N=32 t=400 mu=1 ddim/10'`` (final candidate selection among N denoisings,
    score with output weight mu).

    The DDIM steps are those that run: :meth:`inversion.prior.DiffusionPrior.denoise` takes at most one step per
    timestep, min(denoise_steps, t_final) (t_final = 20 with 50 steps runs 20, named ``ddim/20``, the same name as
    20 configured steps: the same computation)."""
    if not final_denoise:
        return "none"
    steps = min(max(1, int(denoise_steps or t_final // 10)), int(t_final))  # as DiffusionPrior.denoise clamps them
    sampler = f"ddim/{steps}" if denoise_method == "ddim" else str(denoise_method)
    if final_candidates == 1:
        return f"denoise t={t_final} {sampler}"
    return f"select N={final_candidates} t={t_final} mu={selection_output_weight:g} {sampler}"


class UserLevelInversion(GradientInversionAttack):
    """Recover one representative image of a user from its target gradient (or of U users at once, see :meth:`bind`).

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
        matching_reduction: how the weighted per-layer distances combine. 'mean' (default): sum_l w_l d_l / sum_l w_l
            (in [0, 2]; the plain mean over layers with the window off), as every recorded measurement used.
            'sum': sum_l w_l(s) d_l, the issue's (and the paper's Eq.) literal form: the window's total weight (or
            L with the window off) then scales the matching gradient, which moves with the window and changes when
            dynamic clipping fires (the shipped ResNet-18: sum_l w_l from 7.0 to 19.4 over a run, L = 62); kappa
            and lambda were tuned for 'mean'.
        use_prior: add the diffusion prior loss (needs a prior at :meth:`bind`).
        prior_weight: lambda.
        t_max, t_min: timestep range of the prior loss (T = 1000 for the shipped prior).
        anneal_t: anneal t from t_max to t_min (off: t ~ U[t_min, t_max] each step).
        t_schedule: 'linear', 'cosine' or 'sqrt'; anneal_fraction: part of the run the annealing takes.
        prior_noise_samples: noise draws eps averaged per step.
        use_clipping: dynamic clipping on; kappa: the largest allowed |g_match| / |g_prior|.
        output_weight: mu >= 0 of the output matching term (module docstring; 0 = off, the paper's method). Needs a
            victim whose last layer has a bias.
        final_denoise: run the final denoising; t_final: its starting timestep; denoise_method: 'ddim' or 'ddpm';
            denoise_steps: DDIM steps.
        final_candidates: N >= 1 denoised candidates per user from the final x_hat (N diffusion noises); with N > 1
            the server keeps the one its own data term scores best (:meth:`selection_scores`; an extension, 1 =
            the paper's single denoising). selection_output_weight: mu_sel >= 0 of the output term in that score.
        users_per_step: how many users attack.py binds to one module (one Trainer fit, one batched optimisation);
            1 (default) attacks one user at a time. :meth:`bind` itself accepts any number of users.
        steps, label_strategy, seed, log_images_every, log_prefix: see :class:`GradientInversionAttack`.

    Raises:
        ValueError: an unknown option or an out-of-range setting (at construction, before any work), naming the
            setting and its value. The settings of a switched-off window (use_window) or annealing (anneal_t) are
            not checked; :meth:`check_prior` checks t_max only with use_prior, t_final only with final_denoise.
    """

    supports_many_users = True
    #: 16-mixed would unscale a gradient that was never scaled (the image gradient is set directly, the two terms
    #: clipped against each other); a '-true' half or double precision would convert the shared victim and prior in
    #: place (the next user's client update then fails on a dtype mismatch)
    supported_precisions = ("32-true", "32", "bf16-mixed", "bf16")
    #: Under bf16-mixed the prior's UNet runs in bf16 and the gradient matching (victim forward, dummy gradient with
    #: create_graph, layer distances, output matching and their double backward) in float32: in bf16 the matching
    #: loss at the true image (B = 1) had a floor of 0.018 on the tiny test victim and 7.6e-3 on the ResNet-18
    #: (against ~1e-6 in float32), which hides the data term's fine detail.

    def _float32(self):
        """A context that turns Lightning's autocast off for the gradient matching (see above)."""
        return torch.autocast(self.device.type if self.device.type in ("cpu", "cuda") else "cpu", enabled=False)

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
        matching_reduction: str = "mean",
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
        output_weight: float = 0.0,
        final_denoise: bool = True,
        t_final: int = 100,
        denoise_method: str = "ddim",
        denoise_steps: int = 10,
        final_candidates: int = 1,
        selection_output_weight: float = 1.0,
        users_per_step: int = 1,
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
        if users_per_step < 1:
            raise ValueError(f"attack.users_per_step must be >= 1, got {users_per_step}")
        if matching_reduction not in MATCHING_REDUCTIONS:
            raise ValueError(f"attack.matching_reduction must be one of {MATCHING_REDUCTIONS}, got {matching_reduction!r}")
        # one check per setting, naming it and its value (`not x > 0` also refuses NaN)
        if denoise_method not in ("ddim", "ddpm"):
            raise ValueError(f"attack.denoise_method must be 'ddim' or 'ddpm', got {denoise_method!r}")
        if not denoise_steps >= 1:
            raise ValueError(f"attack.denoise_steps must be >= 1 (DDIM steps), got {denoise_steps}")
        if not t_final >= 1:
            raise ValueError(f"attack.t_final must be >= 1 (the final denoising's starting timestep), got {t_final}")
        if not final_candidates >= 1:
            raise ValueError(f"attack.final_candidates must be >= 1 (1 = the paper's single denoising), got "
                             f"{final_candidates}")
        if not selection_output_weight >= 0:
            raise ValueError(f"attack.selection_output_weight must be >= 0, got {selection_output_weight}")
        float32_step_size("attack.lr (Adam's step size on pixels in [0, 1])", lr)
        if not kappa > 0:
            raise ValueError(f"attack.kappa must be > 0 (the largest allowed |g_match| / |g_prior| of dynamic "
                             f"clipping; to switch clipping off set use_clipping false), got {kappa}")
        if not prior_weight >= 0:
            raise ValueError(f"attack.prior_weight must be >= 0 (lambda of the prior loss), got {prior_weight}")
        if not output_weight >= 0:
            raise ValueError(f"attack.output_weight must be >= 0 (0 = no output matching), got {output_weight}")
        if not prior_noise_samples >= 1:
            raise ValueError(f"attack.prior_noise_samples must be >= 1 (noise draws per step), got {prior_noise_samples}")
        if not 0 <= t_min <= t_max:
            raise ValueError(f"attack.t_min and attack.t_max: need 0 <= t_min <= t_max, got t_min={t_min}, t_max={t_max}")
        # the settings of a mechanism that is switched off are not used, and not checked (an ablation config that
        # switches one off need not also repair its settings)
        if anneal_t:
            timestep_at(0.0, t_max, t_min, t_schedule, anneal_fraction)  # the schedule name and fraction
        if use_window:
            window_centre(2, 0.0, window_slide_fraction)  # validates the fraction
            sliding_window_weights(2, 0.0, window_width_deep, window_width_shallow, window_floor)  # widths and floor
        self.save_hyperparameters(ignore=["log_prefix"])
        self.requires_prior = use_prior or final_denoise
        self.x_hat: Optional[torch.nn.Parameter] = None
        self.view: Optional[ServerView] = None
        self.prior: Optional[DiffusionPrior] = None
        self._denoised: Optional[torch.Tensor] = None
        self.seeds: list[int] = [seed]
        self.log_prefixes: list[str] = [log_prefix]
        self.histories: list[dict[str, list[float]]] = [self.history]
        self.user_labels: list[LabelInference] = []
        self._bm: Optional[BatchedMatching] = None
        self.register_buffer("p_out", None)  # (U, K) recovered mean softmax outputs when output_weight > 0
        self.final_candidate_images: Optional[list[torch.Tensor]] = None  # U x (N, C, H, W) when final_candidates > 1

    # ------------------------------------------------------------------------------------------ set-up
    def check_prior(self, prior) -> None:
        """Check the timesteps against ``prior`` (a :class:`inversion.prior.DiffusionPrior`) before any user: t_max
        (hence t_min <= t_max) when the prior loss is on (use_prior), t_final when the final stage denoises
        (final_denoise), must be below its T. A switched-off mechanism's timesteps are not checked.

        Raises:
            ValueError: naming each setting that is too large, its value, and T.
        """
        hp, T = self.hparams, prior.num_train_timesteps
        problems = []
        if hp.use_prior and hp.t_max >= T:
            problems.append(f"t_max ({hp.t_max}) must be below the prior's T = {T} (the prior loss's timesteps are "
                            f"t_min..t_max)")
        if hp.final_denoise and hp.t_final >= T:
            problems.append(f"t_final ({hp.t_final}) must be below the prior's T = {T} (the final denoising starts "
                            f"there)")
        if problems:
            raise ValueError("; ".join(problems))

    def bind(
        self,
        view: Union[ServerView, Sequence[ServerView]],
        prior: Optional[DiffusionPrior] = None,
        seeds: Optional[Sequence[int]] = None,
        log_prefixes: Optional[Sequence[str]] = None,
    ) -> "UserLevelInversion":
        """Attach what the server sees (and the prior); infers labels and initialises x_hat. Validates first.

        Args:
            view: one user's :class:`ServerView`, or a sequence of U >= 1 users' views (many users per step). All
                views must share the victim object (one global model), the image shape and the class count.
            prior: the DDPM prior (needed when use_prior or final_denoise).
            seeds: U ints, user u's seed (default: the attack's ``seed`` for every user). User u's initialisation,
                noise draws, random t and final-denoising noise come from generators seeded from ``seeds[u]`` exactly
                as a one-user attack with ``seed=seeds[u]`` seeds them.
            log_prefixes: U distinct prefixes of user u's logged keys (default: the attack's ``log_prefix`` for one
                user, ``f"{log_prefix}user{u}/"`` for U > 1).

        After binding: ``x_hat`` float32 (U, C, H, W) in [0, 1]; ``y_soft`` float32 (U, K); ``p_out`` float32 (U, K)
        each user's recovered mean softmax output (only when output_weight > 0, else None); ``user_labels`` U label
        inferences (``labels`` is the single user's for U = 1, None otherwise).

        Raises:
            TargetGradientError: a target gradient does not fit the victim or holds NaN/inf.
            ValueError: no views; views with different victims, image shapes or class counts; seeds or prefixes of
                the wrong length (or repeated prefixes); a prior is needed (use_prior or final_denoise) but none is
                given; T too small for t_max (use_prior) or t_final (final_denoise).
            PriorMismatchError: (from DiffusionPrior) channels differ, or the UNet is unusable.
            ValueError: output_weight > 0 but the victim's last layer has no bias.
        """
        hp = self.hparams
        views = [view] if isinstance(view, ServerView) else list(view)
        U = len(views)
        if U == 0:
            raise ValueError("bind needs at least one user's ServerView")
        view = views[0]
        for u, v in enumerate(views):
            check_target_gradient(v.victim, v.target_gradient)
            if v.victim is not view.victim:
                raise ValueError(f"user {u}'s view has another victim: users attacked together must share the global model")
            if tuple(v.image_shape) != tuple(view.image_shape) or v.num_classes != view.num_classes:
                raise ValueError(
                    f"user {u}'s view has images {tuple(v.image_shape)} and {v.num_classes} classes, user 0's "
                    f"{tuple(view.image_shape)} and {view.num_classes}"
                )
        seeds = [self.seed] * U if seeds is None else [int(s) for s in seeds]
        if len(seeds) != U:
            raise ValueError(f"{len(seeds)} seeds for {U} users: give one per user")
        if log_prefixes is None:
            log_prefixes = [self.log_prefix] if U == 1 else [f"{self.log_prefix}user{u}/" for u in range(U)]
        log_prefixes = [str(p) for p in log_prefixes]
        if len(log_prefixes) != U or len(set(log_prefixes)) != U:
            raise ValueError(f"log_prefixes must be {U} distinct strings, got {log_prefixes}")
        if self.requires_prior:
            if prior is None:
                raise ValueError("this attack config uses the prior (use_prior or final_denoise) but no prior was given")
            self.check_prior(prior)
            if tuple(prior.image_shape) != tuple(view.image_shape):
                raise ValueError(f"prior built for images {prior.image_shape}, the target is {view.image_shape}")
        self.views = views
        self.view = view if U == 1 else None
        self.seeds = seeds
        self.log_prefixes = log_prefixes
        self.victim = view.victim.eval()
        self.prior = prior.eval() if prior is not None else None
        params = victim_parameters(self.victim)
        self.param_names = list(params)
        self._params = list(params.values())
        # each layer's target times an exact power of two (per user; objectives.pow2_rescale): the cosine distances
        # are unchanged, and a huge target (DP noise std 1e18) no longer overflows their float32 squared norms
        if U == 1:
            self.target = [pow2_rescale(view.target_gradient[n]) for n in self.param_names]
            self._stacked_target = None
        else:  # L tensors (U, *shape_l), the layout BatchedMatching takes
            self.target = None
            self._stacked_target = [pow2_rescale(t, dims=range(1, t.dim())) for t in
                                    stack_targets([v.target_gradient for v in views], self.param_names)]
        self.user_labels = [
            infer_labels(v.target_gradient, v.num_classes, v.batch_size, self.label_strategy, known_labels=v.labels)
            for v in views
        ]
        self.labels = self.user_labels[0] if U == 1 else None
        rows = []
        for labels in self.user_labels:
            if hp.label_target == "soft":
                rows.append(labels.proportions.float())
            else:
                rows.append(F.one_hot(torch.tensor(labels.dominant), view.num_classes).float())
        self.register_buffer("y_soft", torch.stack(rows))
        if self._needs_p_out:
            p_out = [mean_softmax_from_gradient(v.target_gradient, lab.proportions) for v, lab in zip(views, self.user_labels)]
            self.p_out = torch.stack(p_out)
        else:
            self.p_out = None
        shape = (1, *view.image_shape)
        x0 = []
        for s in seeds:  # user u's initialisation: the draw a one-user attack with seed s makes
            g = torch.Generator().manual_seed(s)
            if hp.init == "noise":
                x0.append(torch.rand(shape, generator=g))
            else:
                x0.append((0.5 + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1))
        self.x_hat = torch.nn.Parameter(torch.cat(x0))
        self.histories = [{} for _ in range(U)]
        self.history = self.histories[0]
        self._denoised = None
        return self

    @property
    def num_users(self) -> int:
        """U, the users bound (1 before binding)."""
        return len(self.seeds)

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
        if self.num_users == 1:
            self.target = [g.to(self.device) for g in self.target]
        else:
            self._stacked_target = [g.to(self.device) for g in self._stacked_target]
            # built here, after Lightning moved the victim to its device (BatchedMatching snapshots the victim)
            self._bm = BatchedMatching(self.victim)
        # per-user streams, seeded as a one-user attack with seed s seeds its own
        self._noise_gens = [torch.Generator(device=self.device).manual_seed(s + 1) for s in self.seeds]
        self._t_gens = [torch.Generator().manual_seed(s + 2) for s in self.seeds]
        if getattr(self, "_restored_finished", False):  # a checkpoint of the last step: Lightning skips the loop
            self._restored_finished = False               # and on_train_end, so the final stage runs here
            self._denoised = self.final_stage()

    def on_train_start(self) -> None:  # after a checkpoint restore: continue the same noise streams
        rng = getattr(self, "_resume_rng", None)
        if rng is not None:
            noise, ts = rng["noise"], rng["t"]
            if isinstance(noise, torch.Tensor):  # a one-user checkpoint written before many users per step
                noise, ts = [noise], [ts]
            if len(noise) != self.num_users or len(ts) != self.num_users:
                raise ValueError(f"the checkpoint holds {len(noise)} users' RNG states, the attack has {self.num_users} users")
            for g, state in zip(self._noise_gens, noise):
                if state.numel() != g.get_state().numel():
                    raise ValueError(
                        f"the checkpoint's noise generator state ({state.numel()} bytes) is not one of a "
                        f"{g.device.type} generator ({g.get_state().numel()} bytes): it was written on another kind "
                        f"of device; resume on the device it ran on (or start this user afresh)")
                g.set_state(state)
            for g, state in zip(self._t_gens, ts):
                g.set_state(state)
            self._resume_rng = None

    # ------------------------------------------------------------------------------------------ the loop
    def layer_weights(self, progress: float) -> tuple[Optional[torch.Tensor], float]:
        """Window weights (L,) at progress s/S and the window centre (layer index); (None, nan) when off."""
        L = len(self.param_names)
        if not self.hparams.use_window:
            return None, float("nan")
        c = window_centre(L, progress, self.hparams.window_slide_fraction)
        w = sliding_window_weights(L, c, self.hparams.window_width_deep, self.hparams.window_width_shallow, self.hparams.window_floor)
        return w, c

    def matching_scale(self, weights: Optional[torch.Tensor]) -> float:
        """The factor from the normalised matching loss to the configured one: 1 for matching_reduction 'mean',
        sum_l w_l (L with the window off) for 'sum'."""
        if self.hparams.matching_reduction == "mean":
            return 1.0
        return float(weights.sum()) if weights is not None else float(len(self.param_names))

    def timestep(self, progress: float, user: int = 0) -> int:
        """t(s) of the prior loss: annealed (the same for every user), or drawn from ``user``'s own t stream."""
        hp = self.hparams
        if hp.anneal_t:
            return timestep_at(progress, hp.t_max, hp.t_min, hp.t_schedule, hp.anneal_fraction)
        return int(torch.randint(hp.t_min, hp.t_max + 1, (1,), generator=self._t_gens[user]))

    def matching_loss(self, x: torch.Tensor, weights: Optional[torch.Tensor], user: int = 0) -> torch.Tensor:
        """Gradient matching loss of image x (1, C, H, W) in [0, 1] against ``user``'s target gradient and label
        (the one-user autograd path, create_graph=True), reduced as ``matching_reduction`` says; scalar."""
        return self._matching_loss_and_logits(x, weights, *self._user_target(user))[0]

    def _user_target(self, user: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``user``'s target gradient (L tensors) and CE target (1, K)."""
        if self.num_users == 1:
            return self.target, self.y_soft
        return [t[user] for t in self._stacked_target], self.y_soft[user : user + 1]

    def _dummy_gradient(self, x, y, create_graph: bool) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """grad_w CE(f_w(x), y) over the matched parameters, and the logits f_w(x) of that forward pass (float32,
        also under bf16-mixed)."""
        with self._float32():
            logits = self.victim(x.float())
            ce = -(y.float() * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
            return torch.autograd.grad(ce, self._params, create_graph=create_graph), logits

    def _matching_loss_and_logits(self, x, weights, target, y) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`matching_loss` (scaled by :meth:`matching_scale`) and the victim's logits f_w(x) (1, K) of its
        forward pass (reused by output matching, so the one-user step runs the victim forward once); float32, also
        under bf16-mixed."""
        with self._float32():
            dummy, logits = self._dummy_gradient(x, y, create_graph=True)
            return gradient_matching_loss(target, dummy, weights) * self.matching_scale(weights), logits

    def layer_distances(self, x: torch.Tensor, user: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The unweighted ingredients of the data term for an image x (1, C, H, W), pixels in [0, 1], without a
        graph (for scoring candidate images, e.g. ``scripts/objective_audit.py``).

        Returns:
            (distances, logits): float32 (L,) per-layer cosine distances in [0, 2] between ``user``'s target gradient
            and the dummy gradient of x with ``user``'s CE target (layers in :attr:`param_names` order; combine with
            :meth:`layer_weights` as :func:`inversion.objectives.gradient_matching_loss` does), and the victim's
            logits f_w(x) (1, K) for :meth:`output_loss`. Both detached.
        """
        target, y = self._user_target(user)
        with torch.enable_grad():
            dummy, logits = self._dummy_gradient(x, y, create_graph=False)
        return layer_cosine_distances(target, dummy).detach(), logits.detach()

    @property
    def _needs_p_out(self) -> bool:
        hp = self.hparams
        return hp.output_weight > 0 or (hp.final_denoise and hp.final_candidates > 1 and hp.selection_output_weight > 0)

    def output_loss(self, x: torch.Tensor, logits: Optional[torch.Tensor] = None, user: Optional[int] = None) -> torch.Tensor:
        """Output matching losses KL(pbar_u || softmax(f_w(x_u))) of images x (U, C, H, W) in [0, 1] against the bound
        users' recovered mean softmax outputs ``p_out`` (U, K); float32 (U,), in nats, >= 0. Needs output_weight > 0
        (or final candidate selection with an output term) at bind. The victim is in eval mode, so row u depends on
        x_u only. ``logits``: f_w(x) (U, K) when already computed (with x in its graph), else the victim is run on x.
        ``user``: compare every row of x (N, C, H, W) with that one user's pbar instead (returns (N,))."""
        if self.p_out is None:
            raise RuntimeError("output_loss needs attack.output_weight > 0 at bind (p_out is not recovered otherwise)")
        with self._float32():
            logp = F.log_softmax((self.victim(x.float()) if logits is None else logits).float(), dim=1)
        p = self.p_out if user is None else self.p_out[user : user + 1].expand_as(logp)
        return F.kl_div(logp, p.to(logp.device), reduction="none").sum(dim=1)

    def selection_scores(self, candidates: torch.Tensor, user: int = 0) -> torch.Tensor:
        """The server's score of candidate images for ``user`` (final candidate selection); lower is better.

        Score = the mean over all layers of the cosine distances to the user's target gradient
        (:meth:`layer_distances`, uniform weights: the whole gradient, not the window's end position) + mu_sel
        KL(pbar_u || softmax(f_w(x))) with mu_sel = ``selection_output_weight``. Uses only what the server sees.

        Args:
            candidates: float (N, C, H, W) in [0, 1] on the victim's device.
        Returns:
            float32 (N,) scores on the CPU.
        """
        w = self.hparams.selection_output_weight
        out = []
        for x in candidates:
            d, logits = self.layer_distances(x.unsqueeze(0), user=user)
            score = weighted_layer_mean(d)
            if w > 0:
                score = score + w * self.output_loss(x.unsqueeze(0), logits, user=user)[0]
            out.append(float(score))
        return torch.tensor(out)

    def _one_user_gradient(self, progress: float) -> tuple[torch.Tensor, list[dict[str, float]]]:
        """U = 1: the image gradient (1, C, H, W) and the step's logged values (the original one-user code)."""
        hp = self.hparams
        x = self.x_hat
        weights, centre = self.layer_weights(progress)
        l_match, logits = self._matching_loss_and_logits(x, weights, self.target, self.y_soft)
        values = {"match": float(l_match.detach())}
        if hp.output_weight > 0:
            l_out = self.output_loss(x, logits)[0]
            values["output"] = float(l_out.detach())
            l_match = l_match + hp.output_weight * l_out
        g_match = torch.autograd.grad(l_match, x)[0]
        if hp.use_prior:
            t = self.timestep(progress)
            l_prior = self.prior.prior_loss(x, t, hp.prior_noise_samples, self._noise_gens[0])
            g_prior = torch.autograd.grad(hp.prior_weight * l_prior, x)[0]
            if hp.use_clipping:
                g_match, ratio = clip_matching_gradient(g_match, g_prior, hp.kappa)
            else:
                ratio = float(g_match.norm() / g_prior.norm().clamp_min(1e-30))
            grad = g_match + g_prior
            values.update(prior=float(l_prior.detach()), t=t, clip_ratio=ratio)
        else:
            grad = g_match
        if hp.use_window:
            values["window_centre"] = centre
        return grad, [values]

    def _many_users_gradient(self, progress: float) -> tuple[torch.Tensor, list[dict[str, float]]]:
        """U > 1: the image gradients (U, C, H, W), row u user u's own, and each user's logged values.

        Matching: BatchedMatching (vmap over users of the dummy gradient and the window-weighted per-layer cosine
        loss, and its image gradient). Prior: one UNet batch of the U images with per-user timesteps and noise
        streams; sum over users of the per-user losses, so each row of the gradient is that user's own. Clipping:
        per user.
        """
        hp = self.hparams
        x = self.x_hat
        U = x.shape[0]
        weights, centre = self.layer_weights(progress)
        with self._float32():
            l_match, g_match = self._bm.matching_loss_and_grad(x.detach(), self.y_soft, self._stacked_target, weights)
        scale = self.matching_scale(weights)
        if scale != 1.0:
            l_match, g_match = l_match * scale, g_match * scale
        cols = {"match": l_match}
        if hp.output_weight > 0:  # rows are independent (eval-mode victim): the sum's gradient is per user
            l_out = self.output_loss(x)
            g_match = g_match + torch.autograd.grad(hp.output_weight * l_out.sum(), x)[0].to(g_match.dtype)
            cols["output"] = l_out
        ts: list[int] = []
        if hp.use_prior:
            ts = [self.timestep(progress, u) for u in range(U)]
            l_prior = self.prior.prior_loss(x, ts, hp.prior_noise_samples, self._noise_gens, reduction="none")
            g_prior = torch.autograd.grad((hp.prior_weight * l_prior).sum(), x)[0]
            if hp.use_clipping:
                g_match, ratio = clip_matching_gradients(g_match, g_prior, hp.kappa)
            else:
                ratio = g_match.flatten(1).norm(dim=1) / g_prior.flatten(1).norm(dim=1).clamp_min(1e-30)
            grad = g_match + g_prior
            cols.update(prior=l_prior.detach(), clip_ratio=ratio)
        else:
            grad = g_match
        table = torch.stack([c.detach().float() for c in cols.values()], dim=1).cpu().tolist()  # (U, k), one sync
        per_user = []
        for u in range(U):
            row = dict(zip(cols, table[u]))
            values = {"match": row["match"]}
            if "output" in row:
                values["output"] = row["output"]
            if hp.use_prior:
                values.update(prior=row["prior"], t=ts[u], clip_ratio=row["clip_ratio"])
            if hp.use_window:
                values["window_centre"] = centre
            per_user.append(values)
        return grad, per_user

    def _who(self, u: int) -> str:
        return "" if self.num_users == 1 else f" of user {self.log_prefixes[u].rstrip('/') or u}"

    def training_step(self, batch, batch_idx):
        step = self.global_step
        progress = step / max(1, self.steps - 1)
        if self.num_users == 1:
            grad, per_user = self._one_user_gradient(progress)
        else:
            grad, per_user = self._many_users_gradient(progress)
        for u, values in enumerate(per_user):
            for name, v in values.items():
                if v != v or v in (float("inf"), float("-inf")) and name != "clip_ratio":
                    raise AttackDivergedError(step, f"the {name} value{self._who(u)}")
        finite = torch.isfinite(grad.flatten(1)).all(dim=1)
        if not finite.all():
            raise AttackDivergedError(step, f"the image gradient{self._who(int((~finite).nonzero()[0]))}")
        x = self.x_hat
        opt = self.optimizers()
        opt.zero_grad()
        x.grad = grad.to(x.dtype)
        opt.step()
        sch = self.lr_schedulers()
        if sch is not None:
            sch.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
        for u, values in enumerate(per_user):
            self._record_user(u, values, prog_bar=("match", "prior", "t") if u == 0 else ())
        every = self.log_images_every
        if every and (step % every == 0 or step == self.steps - 1):
            for u, prefix in enumerate(self.log_prefixes):
                log_image_grid(self.logger, prefix + "reconstruction", x[u : u + 1].detach(), step=step)

    def _record_user(self, u: int, values: dict[str, float], prog_bar: tuple[str, ...] = ()) -> None:
        """:meth:`record` for user u: its own history and log prefix (U = 1: exactly ``record``)."""
        prefix, history = self.log_prefixes[u], self.histories[u]
        for k, v in values.items():
            history.setdefault(k, []).append(float(v))
            self.log(prefix + k, float(v), prog_bar=k in prog_bar, on_step=True, on_epoch=False)

    def on_train_end(self) -> None:
        self._denoised = self.final_stage()

    def final_stage(self, x: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Step 5 of the attack: final denoising of the representative images, with final candidate selection when
        ``final_candidates`` > 1. Runs after the last step (``on_train_end``) and, on saved images of a finished run,
        from ``scripts/refinish.py``.

        Each user u's image is diffused to ``t_final`` and taken back to 0 by the prior's reverse process
        (``denoise_method``, ``denoise_steps``) with the noise of :meth:`candidate_generators` of ``seeds[u]``; with
        N = ``final_candidates`` > 1, N such denoisings are scored by :meth:`selection_scores` and the lowest kept
        (``histories[u]`` gets ``final_candidate`` and ``final_selection_score``; ``final_candidate_images[u]``
        keeps all N, float32 (N, C, H, W) on the CPU, for the evaluation's diagnostics; None when N = 1).

        Args:
            x: float (U, C, H, W) in [0, 1], row u for bound user u; default: ``x_hat``.
        Returns:
            float32 (U, C, H, W) in [0, 1] on the CPU, or None when final_denoise is off or no prior is bound.
        Raises:
            ValueError: x does not hold one image per bound user of the bound image shape.
        """
        hp = self.hparams
        self.final_candidate_images = None
        if not (hp.final_denoise and self.prior is not None):
            return None
        x = (self.x_hat if x is None else x).detach().float().to(self.device)
        if tuple(x.shape) != (self.num_users, *self.prior.image_shape):
            raise ValueError(f"final_stage takes one image per bound user, shape {(self.num_users, *self.prior.image_shape)}, "
                             f"got {tuple(x.shape)}")
        if hp.final_candidates == 1:  # all users in one denoising batch, user u with its own generator
            gens = [g for s in self.seeds for g in self.candidate_generators(s)]
            with torch.no_grad():
                return self.prior.denoise(
                    x, hp.t_final, hp.denoise_method, hp.denoise_steps, generator=gens[0] if len(gens) == 1 else gens,
                ).cpu()
        chosen, self.final_candidate_images = [], []
        for u, s in enumerate(self.seeds):
            with torch.no_grad():
                cands = self.prior.denoise(
                    x[u : u + 1].expand(hp.final_candidates, -1, -1, -1), hp.t_final, hp.denoise_method,
                    hp.denoise_steps, generator=self.candidate_generators(s),
                )
            scores = self.selection_scores(cands, u)
            k = int(scores.argmin())
            chosen.append(cands[k : k + 1])
            self.final_candidate_images.append(cands.cpu())
            self.histories[u]["final_candidate"] = [float(k)]
            self.histories[u]["final_selection_score"] = [float(scores[k])]
        return torch.cat(chosen).cpu()

    @property
    def final_stage_name(self) -> str:
        """:func:`final_stage_label` of this attack's settings (results.csv's ``final_stage`` column)."""
        hp = self.hparams
        return final_stage_label(hp.final_denoise, hp.final_candidates, hp.t_final, hp.selection_output_weight,
                                 hp.denoise_method, hp.denoise_steps)

    def candidate_generators(self, seed: int) -> list[torch.Generator]:
        """The final_candidates generators of the user with ``seed``: candidate k is seeded ``seed + 3 + 7919 k``,
        so candidate 0 gets the noise of the single final denoising (final_candidates = 1)."""
        return [torch.Generator(device=self.device).manual_seed(seed + 3 + 7919 * k) for k in range(self.hparams.final_candidates)]

    def on_save_checkpoint(self, checkpoint) -> None:
        """The attack's state: x_hat (U, C, H, W), y_soft, the optimiser (Lightning), every user's history and RNG
        states (lists of U noise and U t generator states)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["attack_histories"] = self.histories
        checkpoint["attack_rng"] = {"noise": [g.get_state() for g in self._noise_gens], "t": [g.get_state() for g in self._t_gens]}
        checkpoint["attack_users"] = list(self.log_prefixes)

    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        histories = checkpoint.get("attack_histories") or [self.history]
        if self.x_hat is not None and len(histories) != self.num_users:
            raise ValueError(f"the checkpoint holds {len(histories)} users' attack state, the attack has {self.num_users} users")
        self.histories = histories
        self.history = histories[0]
        self._resume_rng = checkpoint.get("attack_rng")
        self._restored_finished = int(checkpoint.get("global_step", 0)) >= self.steps

    def results(self) -> list[AttackResult]:
        """One :class:`AttackResult` per bound user, in bind order: user u's image (1, C, H, W) in [0, 1] (row u of
        x_hat), its denoised image, label inference and history."""
        x = self.x_hat.detach().float().cpu().clamp(0, 1)
        if self.num_users == 1:
            return [AttackResult(
                representative=x,
                reconstructions=x,
                denoised=self._denoised,
                labels=self.labels,
                steps=self.global_step,
                history=self.history,
                extras=self.candidate_extras(0),
            )]
        out = []
        for u in range(self.num_users):
            xu = x[u : u + 1].clone()
            out.append(AttackResult(
                representative=xu,
                reconstructions=xu,
                denoised=None if self._denoised is None else self._denoised[u : u + 1].clone(),
                labels=self.user_labels[u],
                steps=self.global_step,
                history=self.histories[u],
                extras=self.candidate_extras(u),
            ))
        return out

    def candidate_extras(self, u: int) -> dict:
        """AttackResult extras of user u: ``{"candidates": (N, C, H, W)}`` after a final stage with N > 1 candidates."""
        cands = self.final_candidate_images
        return {} if cands is None else {"candidates": cands[u].clone()}

    def result(self) -> AttackResult:
        """The single user's result (U = 1); use :meth:`results` for U > 1."""
        if self.num_users != 1:
            raise RuntimeError(f"this attack is bound to {self.num_users} users: use results() (one result per user)")
        return self.results()[0]
