"""A pretrained DDPM used as an image prior: loading, the prior loss, and the final denoising.

Loads any diffusers DDPM (a folder written by ``DDPMPipeline.save_pretrained``, e.g. the one train.py exports, a
folder with a UNet2DModel and its scheduler config at the root, or a hub id such as ``google/ddpm-cifar10-32`` in
either layout, online or from the HF cache) through the same code (:func:`load_ddpm_parts`). Pixels cross the boundary explicitly:
the attack's images are in [0, 1] at the victim's resolution; the prior works in [-1, 1] at its own
``sample_size``; :meth:`DiffusionPrior.to_prior` / :meth:`DiffusionPrior.from_prior` resize and rescale.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel


#: one torch.Generator, a sequence of per-image generators, or None (the global RNG)
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def randn_per_image(
    shape: Sequence[int], generator: Generators, num_images: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise of ``shape`` (rows = ``num_images`` consecutive blocks of ``shape[0] // num_images``).

    ``generator`` None or one Generator: a single ``torch.randn`` draw (as before). A sequence of ``num_images``
    generators: block n is ``torch.randn((shape[0] // num_images, *shape[1:]), generator=generator[n])``, i.e. the same
    numbers image n would get from its generator when drawn alone (the per-user streams of the many-users attack).

    A generator on another device than ``device`` (e.g. a CPU generator for CUDA images) draws on its own device and
    the noise is moved, as diffusers' ``randn_tensor`` does; the numbers are then those of that device's generator.

    Raises:
        ValueError: the number of generators differs from ``num_images``.
    """

    def draw(size, g):
        if g is None:
            return torch.randn(size, device=device, dtype=dtype)
        return torch.randn(size, generator=g, device=g.device, dtype=dtype).to(device)

    if generator is None or isinstance(generator, torch.Generator):
        return draw(tuple(shape), generator)
    gens = list(generator)
    if len(gens) != num_images:
        raise ValueError(f"{len(gens)} generators for {num_images} images: give one per image")
    per = (shape[0] // num_images, *shape[1:])
    return torch.cat([draw(per, g) for g in gens])


class PriorMismatchError(ValueError):
    """The prior cannot be used with the data (channels differ), or its UNet is not one this wrapper can use
    (class-conditional, unsupported output channels, no or a non-square ``sample_size``)."""


#: where the UNet and the scheduler config lie in the two layouts diffusers loads a DDPM from
PIPELINE_LAYOUT = ("unet", "scheduler")  # DDPMPipeline.save_pretrained: unet/config.json, scheduler/scheduler_config.json
ROOT_LAYOUT = (None, None)  # single-model repos (google/ddpm-cifar10-32): config.json, scheduler_config.json at the root


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its repr when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it (at its import; the value its downloads obey)."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE)


def _hub_offline_and_uncached(repo_id: str) -> bool:
    """True when the Hugging Face hub is off (:func:`_hub_offline`) and its cache holds neither ``unet/config.json``
    nor ``config.json`` of ``repo_id`` (nothing of it was ever downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    if not _hub_offline():
        return False
    try:
        cached = [try_to_load_from_cache(repo_id, name) for name in ("unet/config.json", "config.json")]
    except Exception:  # an id huggingface_hub refuses: nothing of it can be cached either
        return True
    return not any(isinstance(c, str) for c in cached)


def _local_ddpm_layout(folder: Path, need_scheduler: bool) -> tuple[Optional[str], Optional[str], bool]:
    """``(unet subfolder, scheduler subfolder, has scheduler)`` of a local DDPM folder (subfolder None: the folder's
    root; has scheduler false only when ``need_scheduler`` is false and the folder has no scheduler config).

    The pipeline layout (``unet/config.json``) first, then the root layout: a root ``config.json`` whose
    ``_class_name`` is ``UNet2DModel``. The scheduler: ``scheduler/scheduler_config.json``, then a root
    ``scheduler_config.json``.

    Raises:
        ValueError: neither UNet layout (e.g. a classifier folder, whose config.json has no ``_class_name``), or no
            scheduler config while ``need_scheduler``.
    """
    import json

    if (folder / "unet" / "config.json").is_file():
        unet_sub = "unet"
    else:
        root_cfg = folder / "config.json"
        cfg = {}
        if root_cfg.is_file():
            try:
                cfg = json.loads(root_cfg.read_text())
            except (OSError, ValueError):
                cfg = {}
        if not isinstance(cfg, dict) or cfg.get("_class_name") != "UNet2DModel":
            what = ("it has no config.json either" if not root_cfg.is_file() else
                    f"its config.json is not a diffusers UNet2DModel config (_class_name "
                    f"{cfg.get('_class_name') if isinstance(cfg, dict) else None!r}"
                    + ("; it looks like a classifier folder (victim or evaluator), not a prior)"
                       if isinstance(cfg, dict) and "arch" in cfg else ")"))
            raise ValueError(
                f"{folder} is not a diffusers DDPM folder: no unet/config.json (the DDPMPipeline layout train.py "
                f"exports) and {what}. Give a DDPM folder: a DDPMPipeline folder (unet/ and scheduler/) or a "
                "UNet2DModel saved at the folder's root with its scheduler_config.json (the layout of "
                "google/ddpm-cifar10-32)")
        unet_sub = None
    if (folder / "scheduler" / "scheduler_config.json").is_file():
        return unet_sub, "scheduler", True
    if (folder / "scheduler_config.json").is_file():
        return unet_sub, None, True
    if need_scheduler:
        raise ValueError(
            f"{folder} holds a UNet2DModel ({'unet/' if unet_sub else 'at its root'}) but no scheduler config "
            "(neither scheduler/scheduler_config.json nor scheduler_config.json): save the DDPMScheduler the model was "
            "trained with next to it (scheduler.save_pretrained)")
    return unet_sub, None, False


def load_ddpm_parts(path_or_id: str, need_scheduler: bool = True) -> tuple[UNet2DModel, Optional[DDPMScheduler]]:
    """The UNet and the scheduler of a diffusers DDPM folder or hub id, in either layout diffusers uses.

    The one loader behind :func:`load_ddpm` (the attack's prior) and ``DDPMPrior(init_weights=...)`` (a warm start).
    Layouts, tried in this order:

    - pipeline: ``unet/`` (config.json, diffusion_pytorch_model.*) and ``scheduler/scheduler_config.json``, as
      ``DDPMPipeline.save_pretrained`` and train.py write them;
    - root: the UNet's ``config.json`` and weights and ``scheduler_config.json`` at the top, as single-model hub
      repos such as ``google/ddpm-cifar10-32`` or ``google/ddpm-cat-256`` keep them (diffusers' pipeline loader
      falls back to the root too).

    A local folder is accepted when it has ``unet/config.json`` or a root ``config.json`` whose ``_class_name`` is
    ``UNet2DModel``; a hub id is tried in the pipeline layout, then at the root (from the HF cache when
    HF_HUB_OFFLINE is set). Weights load in float32 unless saved otherwise (safetensors preferred), on the CPU.

    Args:
        path_or_id: a local folder (``~`` expanded) or a hub id ``owner/name``.
        need_scheduler: False: return None for the scheduler when the source has no scheduler config (a warm start
            needs the UNet only) instead of raising.

    Returns:
        ``(unet, scheduler)``; the scheduler is a DDPMScheduler built from the source's scheduler config, or None
        (only with ``need_scheduler`` false).

    Raises:
        FileNotFoundError: a local-looking path that does not exist (the message says which train.py config makes
            it, or names a DDPM to use instead); a hub id that could not be loaded in either layout (both errors
            quoted; when HF_HUB_OFFLINE is set and the HF cache holds nothing of that id, the message says to
            download it first).
        ValueError: a local folder that is not a DDPM folder (e.g. a classifier folder), or one without a scheduler
            config while ``need_scheduler``.
    """
    if path_or_id.startswith("~"):
        path_or_id = os.path.expanduser(path_or_id)
    local = Path(path_or_id)
    looks_local = local.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1
    if looks_local and not local.is_dir():
        from inversion.fsutils import producing_train_config

        made_by = producing_train_config(local)
        raise FileNotFoundError(
            f"prior {path_or_id!r} not found: "
            + (f"train it with `python train.py --config {made_by}`, or give another diffusers DDPM folder or hub id"
               if made_by else
               "give a diffusers DDPM folder (e.g. checkpoints/fashion_mnist/ddpm_32, written by `python train.py "
               "--config configs/train/ddpm_fashion_mnist.yaml`) or a hub id such as google/ddpm-cifar10-32")
        )
    if looks_local:
        unet_sub, sched_sub, has_scheduler = _local_ddpm_layout(local, need_scheduler)
        # the subfolder itself, not subfolder=: diffusers takes root weights over unet/'s when a folder has both
        unet = UNet2DModel.from_pretrained(str(local / unet_sub) if unet_sub else path_or_id, low_cpu_mem_usage=False)
        scheduler = (DDPMScheduler.from_pretrained(str(local / sched_sub) if sched_sub else path_or_id)
                     if has_scheduler else None)
        return unet, scheduler
    errors = []
    unet = None
    for sub in (PIPELINE_LAYOUT[0], ROOT_LAYOUT[0]):
        try:
            unet = UNet2DModel.from_pretrained(path_or_id, subfolder=sub, low_cpu_mem_usage=False)
            break
        except OSError as exc:  # diffusers' EnvironmentError: no such file in the repo or in the cache
            errors.append(f"{sub + '/config.json' if sub else 'config.json at the repo root'}: {_first_line(exc)}")
    scheduler = None
    if unet is not None:
        for sub in (PIPELINE_LAYOUT[1], ROOT_LAYOUT[1]):
            try:
                scheduler = DDPMScheduler.from_pretrained(path_or_id, subfolder=sub)
                break
            except OSError as exc:
                errors.append(f"{sub + '/' if sub else ''}scheduler_config.json"
                              f"{'' if sub else ' at the repo root'}: {_first_line(exc)}")
        if scheduler is not None or not need_scheduler:
            return unet, scheduler
    hint = ""
    if _hub_offline_and_uncached(path_or_id):
        from huggingface_hub import constants

        hint = (f" HF_HUB_OFFLINE is set and the Hugging Face cache ({constants.HF_HUB_CACHE}) holds nothing of "
                f"{path_or_id}: download it once while online (e.g. `python -c \"from diffusers import DDPMPipeline; "
                f"DDPMPipeline.from_pretrained('{path_or_id}')\"`) or give a local DDPM folder.")
    raise FileNotFoundError(
        f"could not load the DDPM {path_or_id!r} from the Hugging Face hub"
        + (" or its cache" if hint or _hub_offline() else "")
        + " in the pipeline layout (unet/, scheduler/) or the root layout (config.json, scheduler_config.json): "
        + "; ".join(errors) + "." + hint
    )


def load_ddpm(path_or_id: str, device: str | torch.device = "cpu") -> tuple[UNet2DModel, DDPMScheduler]:
    """Load the UNet and the scheduler of a diffusers DDPM folder or hub id with :func:`load_ddpm_parts` (the
    pipeline layout ``unet/`` + ``scheduler/``, or the root layout of single-model repos such as
    ``google/ddpm-cifar10-32``; safetensors preferred); the UNet is frozen, in eval mode, on ``device``.

    Raises:
        FileNotFoundError: a local-looking path that does not exist, or a hub id that could not be loaded (while
            offline and not in the HF cache the message says how to pre-download it); the message says how to
            train one (train.py) or what else to give.
        ValueError: the folder holds no UNet2DModel (e.g. a classifier folder) or no scheduler config, or its
            scheduler is not epsilon-prediction.
    """
    unet, scheduler = load_ddpm_parts(path_or_id)
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"{path_or_id}: prediction_type {scheduler.config.prediction_type!r}; the prior loss needs epsilon")
    return unet.to(device).eval().requires_grad_(False), scheduler


class DiffusionPrior(nn.Module):
    """Frozen epsilon-prediction DDPM with the operations the attack needs.

    Args:
        unet, scheduler: from :func:`load_ddpm` (or any UNet2DModel / DDPMScheduler pair). The UNet must be
            unconditional, with ``out_channels`` equal to ``in_channels`` (epsilon only), or twice ``in_channels``
            with a scheduler ``variance_type`` of 'learned' / 'learned_range' (epsilon and a learned variance, as
            improved-DDPM models: the first ``in_channels`` output channels are epsilon_theta; the DDPM denoising
            passes the variance half to the scheduler, the prior loss and DDIM use epsilon only); and a square
            ``sample_size`` (an int S or (S, S)), the resolution the prior works at. The scheduler's
            ``prediction_type`` must be 'epsilon'.
        image_shape: (C, H, W) of the victim's images; C must equal the UNet's channels.

    Raises:
        PriorMismatchError: channel counts differ (e.g. a 3-channel CIFAR prior with 1-channel Fashion-MNIST); a
            class-conditional UNet (``num_class_embeds`` or ``class_embed_type`` set); ``out_channels`` neither
            ``in_channels`` nor 2 x ``in_channels`` with a learned-variance scheduler (or a learned-variance
            scheduler with an epsilon-only UNet); ``sample_size`` missing (None) or not square; a scheduler whose
            ``prediction_type`` is not 'epsilon' (v_prediction, sample). All at construction,
            before any optimisation.
    """

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        cfg = unet.config
        c = cfg.in_channels
        prediction = getattr(scheduler.config, "prediction_type", "epsilon")
        if prediction != "epsilon":
            raise PriorMismatchError(
                f"the prior's scheduler has prediction_type {prediction!r}: the prior loss (|eps_theta - eps|^2) and "
                "the denoising read the UNet's output as the noise epsilon; use an epsilon-prediction DDPM (train.py "
                "trains those)")
        if c != image_shape[0]:
            raise PriorMismatchError(
                f"the prior has {c} channel(s) but the images have {image_shape[0]}; use a prior trained on "
                f"{image_shape[0]}-channel data (train.py with data channels={image_shape[0]}) or set the data's "
                f"channels to {c}"
            )
        class_embeds = getattr(cfg, "num_class_embeds", None)
        class_type = getattr(cfg, "class_embed_type", None)
        if class_embeds is not None or class_type is not None or getattr(unet, "class_embedding", None) is not None:
            raise PriorMismatchError(
                f"the prior's UNet is class-conditional (num_class_embeds={class_embeds}, class_embed_type="
                f"{class_type!r}): the attack uses an unconditional prior (it has no class labels to give the UNet); "
                "use an unconditional DDPM (train.py trains unconditional ones)")
        out = getattr(cfg, "out_channels", c)
        variance_type = str(getattr(scheduler.config, "variance_type", None) or "")
        learned = variance_type in ("learned", "learned_range")  # the types DDPMScheduler.step splits the output for
        #: the UNet also predicts the variance: its output is (N, 2C, H, W), epsilon_theta the first C channels
        self.learned_variance = learned and out == 2 * c
        if out != c and not self.learned_variance:
            raise PriorMismatchError(
                f"the prior's UNet has out_channels={out} for in_channels={c} (scheduler variance_type "
                f"{variance_type or None!r}): the prior needs an epsilon-prediction UNet with out_channels = "
                f"in_channels, or out_channels = 2 x in_channels ({2 * c}) with variance_type 'learned' or "
                "'learned_range' (epsilon and a learned variance)")
        if learned and out == c:
            raise PriorMismatchError(
                f"the prior's scheduler has variance_type {variance_type!r} but its UNet predicts no variance "
                f"(out_channels = in_channels = {c}); set the scheduler's variance_type to the one the model was "
                "trained with (e.g. 'fixed_small', diffusers' default), or use a UNet with out_channels = "
                f"{2 * c}")
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.image_shape = tuple(image_shape)
        size = cfg.sample_size
        if size is None:
            raise PriorMismatchError(
                "the prior's UNet has no sample_size (None in unet/config.json): this wrapper resizes the images to "
                "the prior's own resolution; set sample_size in the prior's unet/config.json to the image side it "
                "was trained at (e.g. 32)")
        if not isinstance(size, int):
            if len(size) != 2 or int(size[0]) != int(size[1]):
                raise PriorMismatchError(
                    f"the prior's UNet has a non-square sample_size {tuple(size)}: this wrapper resizes images to a "
                    "square S x S prior resolution; use a square DDPM (train.py trains square ones)")
            size = size[0]
        self.prior_size = int(size)
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().float(), persistent=False)

    def predict_noise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """epsilon_theta(x, t): (N, C, S, S) for x (N, C, S, S) in the prior's space and t (N,) int64 timesteps (the
        first C output channels of a learned-variance UNet)."""
        out = self.unet(x, t).sample
        return out[:, : self.image_shape[0]] if self.learned_variance else out

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of diffusion timesteps the DDPM was trained with (valid timesteps are 0 .. T-1)."""
        return int(self.scheduler.config.num_train_timesteps)

    @classmethod
    def from_pretrained(cls, path_or_id: str, image_shape: tuple[int, int, int]) -> "DiffusionPrior":
        """Load a diffusers DDPM folder or hub id with :func:`load_ddpm` (on the CPU) and wrap it for images of
        ``image_shape`` (C, H, W).

        Raises:
            FileNotFoundError, ValueError: see :func:`load_ddpm`.
            PriorMismatchError: the prior's channels differ from ``image_shape[0]``, or its UNet is not usable (see
                the class docstring: class-conditional, unsupported out_channels, no or a non-square sample_size).
        """
        unet, scheduler = load_ddpm(path_or_id)
        return cls(unet, scheduler, image_shape)

    # ------------------------------------------------------------------ scale and resolution conversions
    def to_prior(self, x01: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) pixels in [0, 1] at the victim's size -> [-1, 1] at the prior's ``sample_size``."""
        if x01.shape[-1] != self.prior_size or x01.shape[-2] != self.prior_size:
            x01 = F.interpolate(x01, size=(self.prior_size, self.prior_size), mode="bilinear", align_corners=False, antialias=True)
        return x01 * 2.0 - 1.0

    def from_prior(self, xpm1: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) in [-1, 1] at the prior's size -> [0, 1] at the victim's (H, W), clamped."""
        H, W = self.image_shape[1:]
        x01 = (xpm1 + 1.0) / 2.0
        if x01.shape[-2:] != (H, W):
            x01 = F.interpolate(x01, size=(H, W), mode="bilinear", align_corners=False, antialias=True)
        return x01.clamp(0.0, 1.0)

    # ------------------------------------------------------------------ prior loss
    def prior_loss(
        self,
        x01: torch.Tensor,
        t: Union[int, Sequence[int], torch.Tensor],
        num_noise: int = 1,
        generator: Generators = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Diffusion prior loss (Graikos et al. 2022, "Diffusion models as plug-and-play priors", eq. 6-7).

        The DDPM bound at q(x0) = delta(x0 - x_hat) at one timestep:
        L = mean_eps |eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) - eps|^2, differentiable w.r.t. x_hat
        through eps_theta.

        Args:
            x01: (N, C, H, W) pixels in [0, 1] (victim resolution); gradients flow back to it.
            t: timestep in [0, T-1]: one int for all images, or N ints (a sequence or an int64 (N,) tensor), one per
                image (the many-users attack with random t draws each user's own).
            num_noise: noise samples eps averaged per image.
            generator: torch.Generator for the noise (seeded runs), or a sequence of N generators, one per image:
                image n's ``num_noise`` draws then come from generator n alone, exactly the numbers that image would
                get alone (N = 1) with that generator.
            reduction: 'mean' (scalar: mean over images, noise samples and pixels) or 'none' ((N,): each image's
                loss, the mean over its noise samples and pixels; ``sum()`` of it gives each image its own
                single-image loss gradient).

        Returns:
            float32 scalar ('mean') or (N,) ('none') loss (float64 when the UNet runs in float64).

        Raises:
            ValueError: an unknown reduction, a timestep outside [0, T-1] (a negative one would index
                alphas_cumprod from the end while the UNet sees the negative value), or a wrong number of timesteps.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if not isinstance(t, (torch.Tensor, Sequence)):  # an int, a numpy integer or a numpy array
            t = torch.as_tensor(t)
        if isinstance(t, torch.Tensor) and t.dim() == 0:
            t = int(t)
        t_check = torch.as_tensor(t)
        T = self.alphas_cumprod.numel()
        if t_check.numel() and (int(t_check.min()) < 0 or int(t_check.max()) >= T):
            raise ValueError(f"timestep t must be in [0, {T - 1}] (the prior's T = {T}), got {t_check.tolist()}")
        N = x01.shape[0]
        x0 = self.to_prior(x01)
        if num_noise > 1:
            x0 = x0.repeat_interleave(num_noise, dim=0)
        eps = randn_per_image(x0.shape, generator, N, x0.device, x0.dtype)
        if not (isinstance(t, Sequence) or (isinstance(t, torch.Tensor) and t.dim() > 0)):  # one timestep
            tt = torch.full((x0.shape[0],), int(t), device=x0.device, dtype=torch.long)
            abar = self.alphas_cumprod[int(t)].to(x0.device)
        else:
            t_img = torch.as_tensor(t, dtype=torch.long).flatten()
            if t_img.numel() != N:
                raise ValueError(f"t must be one int or {N} timesteps (one per image), got {t_img.numel()}")
            tt = t_img.to(x0.device).repeat_interleave(num_noise)
            abar = self.alphas_cumprod.to(x0.device)[tt].view(-1, *([1] * (x0.dim() - 1)))
        xt = abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps
        eps_hat = self.predict_noise(xt, tt)
        dtype = torch.promote_types(eps_hat.dtype, torch.float32)  # fp32 under autocast, fp64 stays fp64
        if reduction == "mean":
            return F.mse_loss(eps_hat.to(dtype), eps.to(dtype))
        return (eps_hat.to(dtype) - eps.to(dtype)).square().reshape(N, -1).mean(dim=1)

    # ------------------------------------------------------------------ final denoising
    @torch.no_grad()
    def denoise(
        self,
        x01: torch.Tensor,
        t_final: int,
        method: str = "ddim",
        num_steps: Optional[int] = None,
        generator: Generators = None,
    ) -> torch.Tensor:
        """Diffuse images to ``t_final`` and run the prior's reverse process back to t = 0 (SDEdit-style).

        Args:
            x01: (N, C, H, W) in [0, 1].
            t_final: starting timestep (small, e.g. 50-200 of T = 1000).
            method: 'ddpm' (ancestral, every timestep t_final..0, diffusers DDPMScheduler.step with custom
                timesteps) or 'ddim' (deterministic eta = 0 updates on ``num_steps`` evenly spaced timesteps).
            num_steps: DDIM steps (default: t_final // 10, at least 1; at most t_final, one per timestep).
            generator: a torch.Generator, or a sequence of N generators, one per image (each image then gets exactly
                the noise it would get denoised alone with its generator: the initial diffusion noise, and for 'ddpm'
                each ancestral step's noise, through diffusers' per-sample generator lists).

        Returns:
            (N, C, H, W) float32 in [0, 1] at the victim's resolution.

        Raises:
            ValueError: t_final outside [1, T-1] or an unknown method.
        """
        T = self.num_train_timesteps
        if not 1 <= t_final < T:
            raise ValueError(f"t_final must be in [1, {T - 1}], got {t_final}")
        x0 = self.to_prior(x01.float())
        eps = randn_per_image(x0.shape, generator, x0.shape[0], x0.device, x0.dtype)
        if generator is not None and not isinstance(generator, torch.Generator):
            generator = list(generator)  # diffusers' schedulers take per-sample generators as a list
        abar = self.alphas_cumprod.to(x0.device)
        x = abar[t_final].sqrt() * x0 + (1 - abar[t_final]).sqrt() * eps
        if method == "ddpm":
            sched = DDPMScheduler.from_config(self.scheduler.config)
            sched.set_timesteps(timesteps=list(range(t_final, -1, -1)))
            for t in sched.timesteps:
                # the full output: a learned-variance UNet's variance half is split off and used by the scheduler
                e = self.unet(x, t.to(x.device).expand(x.shape[0])).sample.float()
                x = sched.step(e, t, x, generator=generator).prev_sample
        elif method == "ddim":
            n = min(max(1, num_steps or t_final // 10), t_final)  # more steps than timesteps would repeat some
            ts = torch.linspace(t_final, 0, n + 1).round().long().tolist()
            for t, t_prev in zip(ts[:-1], ts[1:]):
                e = self.predict_noise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).float()
                x0_pred = (x - (1 - abar[t]).sqrt() * e) / abar[t].sqrt()
                x0_pred = x0_pred.clamp(-1, 1)
                x = abar[t_prev].sqrt() * x0_pred + (1 - abar[t_prev]).sqrt() * e if t_prev > 0 else x0_pred
        else:
            raise ValueError(f"denoise method must be 'ddpm' or 'ddim', got {method!r}")
        return self.from_prior(x)
