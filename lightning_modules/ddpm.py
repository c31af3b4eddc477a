"""DDPM image prior: diffusers ``UNet2DModel`` + ``DDPMScheduler`` trained on epsilon-prediction MSE with EMA.

What matches diffusers' ``examples/unconditional_image_generation/train_unconditional.py``: the objective (Ho et al.
2020, eq. 14): images mapped to [-1, 1], t uniform in 0..T-1, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
loss = |eps_theta(x_t, t) - eps|^2 (MSE); the EMA's warm-up form (power 3/4, inv_gamma 1, applied after
each optimiser step; here one count ahead, see :meth:`DDPMPrior._ema_step_decay`); the export
(``DDPMPipeline.save_pretrained``, so the attack loads it like any diffusers DDPM folder or hub id).

What differs (the recipe the shipped priors were trained with; kept as it is): the optimiser is AdamW with torch's
default betas (0.9, 0.999) and eps 1e-8, ``weight_decay`` from the config (default 0), the learning rate ``lr``
with a linear warm-up over ``warmup_steps`` and then constant (no decay), and no gradient-norm clipping (Lightning's
``trainer.gradient_clip_val`` is unset in the shipped configs). That script uses AdamW betas (0.95, 0.999), weight
decay 1e-6, lr 1e-4 with a 500-step warm-up and a cosine decay, and clips the gradient norm to 1.0. Its EMA's
maximal decay is 0.9999 (here ``ema_decay``, 0.999 by default), and its UNet is larger (widths 128..512, six
levels); here the widths, depth, attention, T and beta schedule are ``model.init_args``.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from lightning import LightningModule

from inversion.logging_utils import log_image_grid
from lightning_modules.resumable import Resumable


class DDPMPrior(Resumable, LightningModule):
    """Unconditional DDPM on images in [0, 1] (mapped to the prior's [-1, 1] inside).

    Args:
        image_size: side of the square images in pixels (the UNet's ``sample_size``).
        in_channels: image channels (1 for Fashion-MNIST, 3 for faces).
        block_out_channels: UNet widths per resolution level, each a multiple of 32 (the UNet's GroupNorm groups,
            :func:`check_unet_widths`).
        layers_per_block: ResNet blocks per level.
        attention: use attention blocks at the two lowest resolutions.
        num_train_timesteps: T of the forward process.
        beta_schedule: diffusers beta schedule name ('linear', 'squaredcos_cap_v2', ...).
        lr: AdamW learning rate; warmup_steps: linear warm-up.
        ema_decay: maximal EMA decay (with diffusers' EMA warm-up, power 3/4).
        sample_every_n_steps: log a seeded DDIM sample grid every so many optimiser steps (0: never).
        sample_grid_size: number of images in that grid (>= 1); sample_inference_steps: DDIM steps for it
            (1..num_train_timesteps). Both checked at construction when sampling is on (:func:`check_sampling`).
        init_weights: optional diffusers DDPM folder (e.g. a shipped prior; looked up as given, then under the
            repository root: :func:`inversion.fsutils.find_input_path`) or hub id, in the pipeline layout (unet/,
            scheduler/) or the root layout of single-model repos (:func:`inversion.prior.load_ddpm_parts`), whose UNet
            initialises both the trained and the EMA weights (warm start). Its UNet config must equal the one built
            here and its noise schedule (when it has a scheduler config) this config's: see :func:`check_warm_start`
            (ValueError naming the differing keys, before any training). The EMA warm-up starts
            again from step 0 (decay 1 - (1 + k)^-3/4 after k steps), so a short second stage averages over fewer
            steps than ``ema_decay`` implies (the shipped prior's 6,518-step stage ended at decay ~0.9986). Ignored
            when train.py restores a checkpoint (its weights replace it; the name is kept for the model card).

    Raises:
        ValueError: at construction, before any training, naming the ``model.init_args`` key: a width of
            ``block_out_channels`` that is not a multiple of 32 (:func:`check_unet_widths`); an ``image_size`` that
            is not a multiple of 2**(levels - 1); with sampling on, a ``sample_grid_size`` < 1 or a
            ``sample_inference_steps`` outside 1..num_train_timesteps (:func:`check_sampling`); an ``init_weights``
            of another UNet config or noise schedule (:func:`check_warm_start`).
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 1,
        block_out_channels: Sequence[int] = (32, 64, 64, 128),
        layers_per_block: int = 2,
        attention: bool = False,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 200,
        ema_decay: float = 0.999,
        sample_every_n_steps: int = 1000,
        sample_grid_size: int = 64,
        sample_inference_steps: int = 50,
        seed: int = 0,
        init_weights: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_unet_widths(block_out_channels)
        check_sampling(sample_every_n_steps, sample_grid_size, sample_inference_steps, num_train_timesteps)
        n = len(block_out_channels)
        if image_size < 1 or image_size % 2 ** (n - 1):
            raise ValueError(
                f"model.init_args.image_size {image_size} must be a multiple of 2**(levels - 1) = {2 ** (n - 1)}: the "
                f"UNet halves the image {n - 1} times ({n} block_out_channels); pad the data (e.g. Fashion-MNIST to "
                "32) or use fewer levels"
            )
        down = ["DownBlock2D"] * n
        up = ["UpBlock2D"] * n
        if attention:
            down[-2:] = ["AttnDownBlock2D"] * min(2, n)
            up[:2] = ["AttnUpBlock2D"] * min(2, n)
        self.unet = UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=in_channels,
            layers_per_block=layers_per_block,
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            norm_num_groups=NORM_NUM_GROUPS,  # UNet2DModel's default, spelled out for check_unet_widths
        )
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type="epsilon"
        )
        if init_weights:
            from inversion.fsutils import find_input_path  # as given, else under the repository root
            from inversion.prior import load_ddpm_parts  # the attack's loader: pipeline layout, then the root

            found = find_input_path(init_weights)
            start, start_scheduler = load_ddpm_parts(str(found) if found.exists() else init_weights,
                                                     need_scheduler=False)
            check_warm_start(init_weights, start, start_scheduler, self.unet, self.scheduler)
            self.unet.load_state_dict(start.state_dict())  # equal configs (checked above): equal keys and shapes
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_unet.eval()
        self.ema_decay = ema_decay

    # ----------------------------------------------------------------------------------------------- training
    def diffusion_loss(self, x01: torch.Tensor, generator: Optional[torch.Generator] = None,
                       unet: Optional[UNet2DModel] = None) -> torch.Tensor:
        """Epsilon-prediction MSE (Ho et al. 2020, Eq. 14) on a batch of images in [0, 1], shape (B, C, H, W), of
        ``unet`` (default: the trained UNet); t uniform in 0..T-1; returns a float32 scalar."""
        unet = self.unet if unet is None else unet
        x0 = x01 * 2.0 - 1.0
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = torch.randint(
            0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device, generator=generator
        )
        xt = self.scheduler.add_noise(x0, noise, t)
        eps = unet(xt, t).sample
        return F.mse_loss(eps.float(), noise.float())

    def on_fit_start(self) -> None:
        """Silence Lightning's "Found N module(s) in eval mode at the start of training" for exactly the EMA UNet's
        modules (frozen and in eval mode by design; any other module in eval mode changes N and still warns) until
        :meth:`on_train_start` (Lightning warns just before it), then :class:`Resumable`'s restore."""
        n = sum(1 for _ in self.ema_unet.modules())
        self._eval_mode_filter = warnings.catch_warnings()  # restores the filters as they were at on_train_start
        self._eval_mode_filter.__enter__()
        warnings.filterwarnings("ignore", message=rf"Found {n} module\(s\) in eval mode at the start of training\.")
        super().on_fit_start()

    def on_train_start(self) -> None:
        """Drop :meth:`on_fit_start`'s warning filter (a later fit in this process warns again), then
        :class:`Resumable`'s late restore."""
        if getattr(self, "_eval_mode_filter", None) is not None:
            self._eval_mode_filter.__exit__(None, None, None)
            self._eval_mode_filter = None
        super().on_train_start()

    def training_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        loss = self.diffusion_loss(x)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        """``val/loss``: the trained UNet's epsilon MSE; ``val/loss_ema``: the EMA UNet's (the one exported and used
        as the prior), on the same noise and timesteps (seeded per batch)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        g = torch.Generator(device=x.device).manual_seed(1000 + batch_idx)
        loss = self.diffusion_loss(x, generator=g)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True)
        g = torch.Generator(device=x.device).manual_seed(1000 + batch_idx)
        self.log("val/loss_ema", self.diffusion_loss(x, generator=g, unet=self.ema_unet), on_epoch=True,
                 sync_dist=True)

    def _ema_step_decay(self, step: Optional[int] = None) -> float:
        """EMA decay after ``step`` optimiser steps (default: the global step): min(ema_decay, 1 - (1 + step)^-3/4),
        the form of diffusers' EMAModel warm-up (power 3/4, inv_gamma 1) one count ahead of it (diffusers' k-th update
        uses 1 - k^-3/4, 0 at the first); 0 at step 0."""
        step = self.global_step if step is None else step
        return min(self.ema_decay, 1.0 - (1.0 + step / 1.0) ** -0.75) if step > 0 else 0.0

    def setup(self, stage: str) -> None:
        """Refuse true-half precision before training: it would convert the EMA UNet too, and a bf16/fp16 EMA stops
        moving once 1 - decay falls below the format's resolution (about 2**-9 for bf16, after a few thousand steps)."""
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        if precision in ("bf16-true", "16-true"):
            raise ValueError(
                f"trainer.precision {precision} would keep the EMA weights in half precision, where the EMA update "
                "stalls; use bf16-mixed or 16-mixed (the weights and the EMA stay float32)"
            )

    def optimizer_step(self, *args, **kwargs) -> None:
        """Step the optimiser, then the EMA (diffusers' EMAModel.step after optimizer.step), so that callbacks
        running at the end of the batch (checkpoints, exports) save the EMA of the weights they save."""
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * weights, with the warm-up decay of :meth:`_ema_step_decay` at the
        step count including the step just taken (Lightning counts it only after ``optimizer_step`` returns)."""
        decay = self._ema_step_decay(self.global_step + 1)
        for p_ema, p in zip(self.ema_unet.parameters(), self.unet.parameters()):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - decay)

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        every = self.hparams.sample_every_n_steps
        step = self.global_step
        # once per optimiser step: with accumulate_grad_batches > 1 several batches end at one global step
        if every and step > 0 and step % every == 0 and step != getattr(self, "_sampled_at_step", None):
            self._sampled_at_step = step
            self.log_samples()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warm = max(1, self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint) -> None:  # EMA weights travel with the Lightning checkpoint
        super().on_save_checkpoint(checkpoint)  # the RNG states (Resumable)
        checkpoint["ema_decay"] = self.ema_decay

    # ----------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, n: int, num_inference_steps: int = 50, seed: int = 0, use_ema: bool = True) -> torch.Tensor:
        """Seeded DDIM (eta = 0) samples, float32 (n, C, H, W) in [0, 1]."""
        unet = self.ema_unet if use_ema else self.unet
        return sample_ddim(unet, self.scheduler, n, num_inference_steps, seed, device=self.device)

    def log_samples(self) -> None:
        """Log a grid of ``sample_grid_size`` EMA samples under ``samples/ddim_ema`` at the current global step.

        The samples come from :meth:`sample` (seeded DDIM, eta = 0, ``sample_inference_steps`` steps, seed
        ``hparams.seed``, so the grid shows the same initial noise every time), pixels in [0, 1]; logged with
        :func:`inversion.logging_utils.log_image_grid` (nothing is logged without a logger).
        """
        imgs = self.sample(self.hparams.sample_grid_size, self.hparams.sample_inference_steps, self.hparams.seed)
        log_image_grid(self.logger, "samples/ddim_ema", imgs, step=self.global_step)

    # ----------------------------------------------------------------------------------------------- export
    def export(self, dirpath: str | Path, use_ema: bool = True, dtype: torch.dtype = torch.float32) -> Path:
        """Write a diffusers ``DDPMPipeline`` folder (safetensors) with the EMA UNet; returns the folder."""
        unet = copy.deepcopy(self.ema_unet if use_ema else self.unet).to("cpu", dtype)
        pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(self.scheduler.config))
        pipe.save_pretrained(str(dirpath), safe_serialization=True)
        return Path(dirpath)


#: GroupNorm groups of every UNet normalisation layer (UNet2DModel's default; not configurable in DDPMPrior)
NORM_NUM_GROUPS = 32


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_unet_widths(block_out_channels: Sequence[int]) -> None:
    """Refuse UNet widths that the UNet's GroupNorm layers cannot split into groups, before the UNet is built.

    Every normalisation layer of the UNet splits its channels into :data:`NORM_NUM_GROUPS` (32) groups, so every
    width must be a multiple of 32 (torch's own error, 'num_channels (8) must be divisible by num_groups (32)',
    names neither the config key nor the fix).

    Args:
        block_out_channels: UNet widths per resolution level (``model.init_args.block_out_channels``).

    Raises:
        ValueError: the list is empty, or a width is not a positive integer multiple of 32; names
            ``model.init_args.block_out_channels`` and the offending widths.
    """
    widths = list(block_out_channels)
    bad = [c for c in widths if not _is_int(c) or c < 1 or c % NORM_NUM_GROUPS]
    if not widths or bad:
        raise ValueError(
            f"model.init_args.block_out_channels {widths} must be a non-empty list of positive multiples of "
            f"{NORM_NUM_GROUPS} (the UNet's GroupNorm layers split every width into norm_num_groups = "
            f"{NORM_NUM_GROUPS} groups, fixed by DDPMPrior)" + (f"; not: {bad}" if bad else ""))


def check_sampling(sample_every_n_steps: int, sample_grid_size: int, sample_inference_steps: int,
                   num_train_timesteps: int) -> None:
    """Refuse periodic-sampling settings that would fail only at the first sample, after training started.

    Checked only when sampling is on (``sample_every_n_steps`` != 0): the grid size and DDIM steps are unused
    otherwise.

    Args:
        sample_every_n_steps: optimiser steps between sample grids, an integer >= 0 (0: no sampling).
        sample_grid_size: images per grid, an integer >= 1.
        sample_inference_steps: DDIM steps, an integer in 1..``num_train_timesteps`` (DDIM takes at most one step
            per training timestep; diffusers refuses more).
        num_train_timesteps: T of the forward process.

    Raises:
        ValueError: naming the ``model.init_args`` key, its value and the allowed range.
    """
    if not _is_int(sample_every_n_steps) or sample_every_n_steps < 0:
        raise ValueError(f"model.init_args.sample_every_n_steps must be an integer >= 0 (0: no sample grids), got "
                         f"{sample_every_n_steps!r}")
    if sample_every_n_steps == 0:
        return
    off = "; or set model.init_args.sample_every_n_steps: 0 for no sample grids"
    if not _is_int(sample_grid_size) or sample_grid_size < 1:
        raise ValueError(f"model.init_args.sample_grid_size must be an integer >= 1, got {sample_grid_size!r}{off}")
    if not _is_int(sample_inference_steps) or not 1 <= sample_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"model.init_args.sample_inference_steps must be an integer in 1..{num_train_timesteps} "
            f"(model.init_args.num_train_timesteps: DDIM takes at most one step per training timestep), got "
            f"{sample_inference_steps!r}{off}")


#: UNet2DModel config keys a warm start may change: they do not change the function the weights compute in eval mode
#: (dropout is active in training only; DDPMPrior builds dropout 0)
WARM_START_FREE_UNET_KEYS = ("dropout",)
#: scheduler config keys that define the noise schedule (with the betas they give) and the training target
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas", "prediction_type")
#: where a UNet config key is set in a train.py config (the others are fixed by DDPMPrior)
_UNET_KEY_ARGS = {"sample_size": "image_size", "in_channels": "in_channels", "out_channels": "in_channels",
                  "block_out_channels": "block_out_channels", "layers_per_block": "layers_per_block",
                  "down_block_types": "attention", "up_block_types": "attention"}


def _plain(value):
    """A config value with tuples as lists (diffusers stores block types as lists after a JSON round trip)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_warm_start(name: str, source_unet: UNet2DModel, source_scheduler: Optional[DDPMScheduler],
                     unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
    """Refuse a warm start whose weights would compute another function here.

    - UNet: every public key of the source's config (keys starting with '_' are diffusers bookkeeping) must equal
      ``unet.config``'s, except :data:`WARM_START_FREE_UNET_KEYS` (dropout: training only). Equal weight shapes are
      not enough: ``flip_sin_to_cos``, ``freq_shift``, ``norm_num_groups``, ``norm_eps``, ``act_fn``,
      ``time_embedding_type``, ``resnet_time_scale_shift`` ... change eps_theta with the same weights, and
      ``sample_size`` is the resolution the prior was trained at.
    - Scheduler (only when the source has a scheduler config): the same number of timesteps T, the same betas (so
      the keys of :data:`SCHEDULE_KEYS` that set them may differ only where they have no effect, e.g. beta_start of a
      cosine schedule) and the same ``prediction_type``. A fine-tune under another schedule is refused, not warned
      about: eps_theta(x_t, t) was learned for the source's noise level at each t, so the run would start from a
      model that is wrong at every t, and the export would name this config's schedule as if the weights had been
      trained with it. Train from scratch (no init_weights) for another schedule.

    Args:
        name: the ``init_weights`` value, for the message.
        source_unet, source_scheduler: the warm start's UNet and scheduler (None: it has no scheduler config).
        unet, scheduler: the ones this module built.

    Raises:
        ValueError: naming every differing key with both values and where it is set (``model.init_args.*``), or
            that DDPMPrior fixes it.
    """
    src, here = source_unet.config, unet.config
    keys = sorted(k for k in set(src) | set(here) if not k.startswith("_") and k not in WARM_START_FREE_UNET_KEYS)
    missing = object()
    diffs = [(k, src.get(k, missing), here.get(k, missing)) for k in keys
             if _plain(src.get(k, missing)) != _plain(here.get(k, missing))]
    if diffs:
        def shown(value):
            return "(absent)" if value is missing else _plain(value)

        lines = "; ".join(
            f"{k}: source {shown(a)}, here {shown(b)}"
            + (f" (model.init_args.{_UNET_KEY_ARGS[k]})" if k in _UNET_KEY_ARGS else " (fixed by DDPMPrior)")
            for k, a, b in diffs)
        raise ValueError(
            f"init_weights {name}: its UNet config differs from the one this config builds: {lines}. The same "
            "weights compute another function under another UNet config; set the model.init_args named to the "
            "source's values, or warm-start from a DDPM that DDPMPrior built (train.py's export)")
    if source_scheduler is None:
        return
    s_cfg, h_cfg = source_scheduler.config, scheduler.config
    same = (int(s_cfg.num_train_timesteps) == int(h_cfg.num_train_timesteps)
            and torch.allclose(source_scheduler.betas.double(), scheduler.betas.double(), rtol=1e-5, atol=1e-8)
            and s_cfg.get("prediction_type", "epsilon") == h_cfg.get("prediction_type", "epsilon"))
    if same:
        return
    diffs = [(k, _plain(s_cfg.get(k)), _plain(h_cfg.get(k))) for k in SCHEDULE_KEYS
             if _plain(s_cfg.get(k)) != _plain(h_cfg.get(k))]
    where = {"num_train_timesteps": "model.init_args.num_train_timesteps",
             "beta_schedule": "model.init_args.beta_schedule"}
    lines = "; ".join(f"{k}: source {a}, here {b} ({where.get(k, 'fixed by DDPMPrior')})" for k, a, b in diffs)
    raise ValueError(
        f"init_weights {name}: its noise schedule differs from the one this config builds: "
        f"{lines or 'the betas differ'}. The source's eps_theta was trained for its own noise level at each "
        "timestep; set the model.init_args named to the source's values, or train from scratch without init_weights")


@torch.no_grad()
def sample_ddim(
    unet: UNet2DModel,
    scheduler_config_source,
    n: int,
    num_inference_steps: int = 100,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 250,
) -> torch.Tensor:
    """Seeded DDIM (eta = 0, Song et al. 2021) samples from an epsilon-prediction UNet.

    Args:
        unet: diffusers UNet2DModel; scheduler_config_source: a scheduler whose config gives betas and T.
        n: number of images; num_inference_steps: DDIM steps; seed: torch seed of the initial noise.

    Returns:
        float32 tensor (n, C, H, W), pixels in [0, 1].
    """
    sched = DDIMScheduler.from_config(scheduler_config_source.config)
    sched.set_timesteps(num_inference_steps)
    cfg = unet.config
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=gen)
    dtype = next(unet.parameters()).dtype
    out = []
    for chunk in x.split(batch_size):
        xt = chunk.to(device)
        for t in sched.timesteps:
            eps = unet(xt.to(dtype), t.to(device)).sample.float()
            xt = sched.step(eps, t, xt, eta=0.0).prev_sample
        out.append(((xt.clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out)
