"""DDPM image prior: diffusers ``UNet2DModel`` + ``DDPMScheduler`` trained on epsilon-prediction MSE with EMA.

Follows diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` (Ho et al. 2020, eq. 14):
x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, loss = |eps_theta(x_t, t) - eps|^2. Exported with
``DDPMPipeline.save_pretrained`` so that the attack loads it exactly like any diffusers DDPM folder or hub id.
"""

from __future__ import annotations

import copy
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
        block_out_channels: UNet widths per resolution level.
        layers_per_block: ResNet blocks per level.
        attention: use attention blocks at the two lowest resolutions.
        num_train_timesteps: T of the forward process.
        beta_schedule: diffusers beta schedule name ('linear', 'squaredcos_cap_v2', ...).
        lr: AdamW learning rate; warmup_steps: linear warm-up.
        ema_decay: maximal EMA decay (with diffusers' EMA warm-up, power 3/4).
        sample_every_n_steps: log a seeded DDIM sample grid every so many optimiser steps (0: never).
        sample_grid_size: number of images in that grid; sample_inference_steps: DDIM steps for it.
        init_weights: optional diffusers DDPM folder (e.g. a shipped prior; looked up as given, then under the
            repository root: :func:`inversion.fsutils.find_input_path`) or hub id whose UNet initialises both the trained
            and the EMA weights (warm start); its UNet config must equal the one built here. The EMA warm-up starts
            again from step 0 (decay 1 - (1 + k)^-3/4 after k steps), so a short second stage averages over fewer
            steps than ``ema_decay`` implies (the shipped prior's 6,518-step stage ended at decay ~0.9986). Ignored
            when train.py restores a checkpoint (its weights replace it; the name is kept for the model card).
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
        )
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type="epsilon"
        )
        if init_weights:
            from inversion.fsutils import find_input_path  # as given, else under the repository root

            found = find_input_path(init_weights)
            start = UNet2DModel.from_pretrained(str(found) if found.exists() else init_weights, subfolder="unet",
                                                low_cpu_mem_usage=False)
            try:
                self.unet.load_state_dict(start.state_dict())
            except RuntimeError as exc:
                raise ValueError(f"init_weights {init_weights}: its UNet differs from this config: {str(exc).splitlines()[0]}") from exc
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
