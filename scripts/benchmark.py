#!/usr/bin/env python
"""Cost of the attacks on this machine: seconds per step, users per hour, achieved FLOP/s, peak memory.

Measures, with the shipped victim (``checkpoints/fashion_mnist/victim_resnet18``) when present, else a random
small-stem ResNet-18 (C x S x S, 10 classes), and the shipped DDPM prior (``checkpoints/fashion_mnist/ddpm_32``)
when present, else a random diffusers UNet2DModel (block_out_channels (32, 64, 64, 128), layers_per_block 1):

1. The user-level attack step without Lightning (``UserLevelStep``: a ``UserLevelInversion`` with the attack
   settings of 3. computes its own image gradient for one user: dummy gradient with create_graph, window weighted
   matching loss, its image gradient, ``DiffusionPrior.prior_loss`` and its gradient, dynamic clipping; then Adam and
   the box) with target gradients of B = 10, 50, 100 images. B only enters the (one-off) target computation, so the
   step time should not depend on it: target t(B_max) / t(B_min) <= 1.05. This isolates the step's own cost. The
   "target grad s" column is the client's FedSGD gradient at B (``make_server_view``), timed after one untimed
   victim forward/backward, so the process's start-up cost (cuDNN/cuBLAS handles, kernel loading, allocator growth)
   does not land in whichever B runs first.
2. Inverting Gradients' step at the same B (B reconstructions, 1 restart: batched dummy gradient over B images,
   ``cosine_gradient_distance`` + ``total_variation``, signed Adam, box).
3. Users per hour through the product's code path: for each U in ``--users`` (and U = 1, the one-at-a-time
   baseline, always), U ServerViews of random batches of B = min(``--batch-sizes``) images
   (``inversion.scenario.make_server_view``: FedSGD, batch size revealed) are bound to one
   :class:`lightning_modules.user_level_inversion.UserLevelInversion` with the attack settings of
   ``configs/attack/fashion_mnist.yaml`` (prior on, clipping kappa 10, sliding window, t annealing; ``steps =
   --attack-steps`` so the schedules are the real ones; final denoising off, it is not part of a step), as attack.py
   binds a chunk of ``users_per_step`` users, and a Lightning ``Trainer`` (accelerator ``--device``, ``max_steps =
   --warmup + --steps``, no logger, checkpointing, progress bar or model summary) fits it. A callback records the wall
   time at every ``on_train_batch_end`` (CUDA synchronised first); s/step(U) is the median of the intervals after the
   warm-up, so it includes everything the Trainer does per step (the module's per-user logging, NaN checks, lr
   scheduler). users/h = 3600 * U / (s/step(U) * attack_steps); speedup(U) = users/h(U) / users/h(1). Target: >= 3x.
   The report also gives s/step(U = 1) against the bare step of 1. at the same B (the Trainer's and module's
   overhead).
4. Achieved FLOP/s (``torch.utils.flop_counter.FlopCounterMode``: matmul/conv/attention FLOPs only, elementwise ops
   are not counted) of one ``UserLevelInversion`` training step (the warm-up step of 3.'s fit, counted by the same
   callback) at U = 1 and at the largest U, against a measured peak in the precision the steps run in (``32-true``,
   as attack.py: float32 with TF32 off, so on CUDA the FP32 peak, not the tensor cores' TF32/bf16 one): a float32
   matmul, 2048^2 on the CPU with the current threads, 8192^2 on CUDA with TF32 off.
5. Peak memory. CUDA: each measurement's own peak, ``max_memory_allocated`` during it minus ``memory_allocated`` at
   its start (taken after ``gc.collect`` and ``empty_cache``; earlier B's target gradients and steps are released as
   soon as they are no longer needed). What was allocated before the measurement began is not counted: the models,
   the measurement's inputs (its users' target gradients, one victim-sized copy per user) and any objects of earlier
   measurements still alive (the user-level steps of 1. are all alive together, they are timed interleaved), so a
   figure does not depend on which measurements ran before it. The overall figure is the models plus the heaviest
   measurement on its own (its own peak plus its inputs' target gradients). CPU: only the process's ``ru_maxrss``
   (monotone), no per-measurement figures.

Times are medians over ``--steps`` timed steps after ``--warmup`` (default 1) warm-up steps; the user-level steps of
the different B are timed interleaved (one step of each B per round, the starting B rotating from round to round)
so that load drift and position in the round affect every B alike. Run with
``OMP_NUM_THREADS=1 nice -n 10`` next to trainings. ``--tiny`` (8 px, random tiny models, B = 2, 5, 10,
U = 1, 2, 4, 2 steps) finishes in seconds; it checks the script, its numbers mean little.

``--image-size``, ``--channels`` and ``--prior-arch`` shape the random models: without ``--random-models`` or
``--tiny`` the shipped 1-channel 32 px checkpoints are measured, and any other value of them is an error (they would
feed the 32 px victim other images, or be ignored, while the report names the shipped checkpoints); ``--prior-arch``
needs ``--random-models`` without ``--tiny`` (``--tiny`` has its own tiny UNet). Bad input (options, an existing or
unwritable ``--json`` path) ends in one ``benchmark.py: error:`` line before any measurement.

Usage: python scripts/benchmark.py [--device cuda] [--steps N] [--tiny] [--json OUT]
       python scripts/benchmark.py --random-models [--image-size S] [--channels C] [--prior-arch small|ddpm-cifar10]
       python scripts/benchmark.py --device cuda --image-size 64 --random-models --channels 3 --prior-arch ddpm-cifar10
           (the paper's setting: 64x64 RGB faces, a CIFAR-10-sized DDPM, 4,000 steps per attack)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning import Trainer  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from inversion.fsutils import output_path_problem  # noqa: E402
from inversion.prior import DiffusionPrior  # noqa: E402
from inversion.scenario import ServerView, make_server_view, victim_parameters  # noqa: E402
from inversion.cli import parse_device  # noqa: E402
from lightning_modules.base_attack import intended_warnings_silenced  # noqa: E402
from lightning_modules.baselines import cosine_gradient_distance, total_variation  # noqa: E402
from lightning_modules.user_level_inversion import UserLevelInversion  # noqa: E402

VICTIM_DIR = ROOT / "checkpoints" / "fashion_mnist" / "victim_resnet18"
PRIOR_DIR = ROOT / "checkpoints" / "fashion_mnist" / "ddpm_32"
ATTACK_CONFIG = ROOT / "configs" / "attack" / "fashion_mnist.yaml"  # section 3 takes its attack settings from here
NUM_CLASSES = 10
SHIPPED_SHAPE = {"--image-size": ("image_size", 32), "--channels": ("channels", 1), "--prior-arch": ("prior_arch", "small")}
PRECISION = "32-true"  # the precision of every measured step (Trainer of 3.; attack.full_float32 for the whole run)


# ------------------------------------------------------------------------------------------------------ utilities
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[], None], steps: int, device: torch.device, warmup: int = 1) -> list[float]:
    """Seconds of each of ``steps`` calls of fn after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def tracks_memory(device: torch.device) -> bool:
    """Whether per-measurement memory is known: CUDA's allocator statistics (the CPU has only ru_maxrss)."""
    return device.type == "cuda"


def allocated_mib(device: torch.device) -> float:
    """Memory allocated now (CUDA memory_allocated), MiB; 0 where not tracked."""
    return torch.cuda.memory_allocated(device) / 2**20 if tracks_memory(device) else 0.0


def reset_peak(device: torch.device) -> int:
    """Start a memory measurement: free what is no longer referenced (gc.collect, empty_cache), reset CUDA's peak and
    return the bytes allocated now, the baseline that :func:`section_peak_mib` subtracts (0 where not tracked)."""
    if not tracks_memory(device):
        return 0
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def section_peak_mib(device: torch.device, base: int) -> Optional[float]:
    """A measurement's own peak: CUDA max_memory_allocated since :func:`reset_peak` minus ``base``, the bytes allocated
    then, so memory held from before (models, inputs, earlier measurements' objects) is not counted and a figure does
    not depend on what ran before it; None on the CPU, where only the process's lifetime peak is known (it never
    falls, so per-B columns would show earlier sections' peaks)."""
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20 if tracks_memory(device) else None


def gradient_mib(gradient: dict) -> float:
    """Size of one target gradient (name -> tensor), MiB."""
    return sum(t.numel() * t.element_size() for t in gradient.values()) / 2**20


def fmt_mib(v: Optional[float]) -> str:
    """A peak in MiB for the tables; '-' when not measured per section (CPU)."""
    return "-" if v is None else f"{v:.0f}"


def peak_mib(device: torch.device) -> float:
    """CUDA: max_memory_allocated since the last reset; CPU: the process's peak RSS (ru_maxrss, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class _GlobalOnlyTracker:
    """Stand-in for FlopCounterMode's module tracker: its module hooks break ``autograd.grad`` with
    ``create_graph`` ("A leaf node was passed to _will_engine_execute_node ..."); we only need the total."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


PEAK_DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}


def peak_precision_label(device: torch.device, precision: str) -> str:
    """The arithmetic of :func:`peak_flops`' matmul, e.g. 'float32, TF32 off' (CUDA at 32-true), 'float32' (CPU)."""
    dtype = PEAK_DTYPES[precision]
    name = str(dtype).replace("torch.", "")
    return f"{name}, TF32 off" if dtype == torch.float32 and device.type == "cuda" else name


def peak_flops(device: torch.device, tiny: bool, precision: str = PRECISION) -> tuple[float, str]:
    """Measured matmul FLOP/s in the precision the measured steps run in: ``32-true`` a float32 matmul with TF32 off
    (as attack.full_float32 runs the attack: on CUDA the FP32 peak, about 15x below the tensor cores' bf16 one on an
    H200), ``bf16-mixed`` a bfloat16 one. n = 8192 on CUDA (best of 20), 2048 on the CPU (512 when tiny, best of 3).
    The TF32 flag is restored afterwards. Returns (FLOP/s, how it was measured)."""
    if precision not in PEAK_DTYPES:
        raise ValueError(f"no peak measurement for precision {precision!r}; known: {sorted(PEAK_DTYPES)}")
    dtype = PEAK_DTYPES[precision]
    n, reps = (8192, 20) if device.type == "cuda" else ((512 if tiny else 2048), 3)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 stays float32 (no effect on bf16 or the CPU)
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        times = time_steps(lambda: a @ b, reps, device, warmup=1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    how = f"{n}x{n} {peak_precision_label(device, precision)} matmul, best of {reps} (the measured steps' {precision})"
    return 2 * n**3 / min(times), how


# ------------------------------------------------------------------------------------------------------ models
def build_models(args, device: torch.device):
    """(victim, prior, image_shape, sources) on device; shipped checkpoints unless --tiny or absent."""
    from diffusers import DDPMScheduler, UNet2DModel

    from lightning_modules.classifier import build_classifier, load_classifier

    S = args.image_size
    torch.manual_seed(0)
    shipped = not (args.tiny or args.random_models)
    if VICTIM_DIR.is_dir() and shipped:
        victim, cfg = load_classifier(VICTIM_DIR, device)
        C = int(cfg["in_channels"])
        vsrc = str(VICTIM_DIR.relative_to(ROOT))
    else:
        C = args.channels
        victim = build_classifier("resnet18", C, NUM_CLASSES, S).to(device).eval()
        vsrc = f"random resnet18 small-stem ({C}x{S}x{S}, {NUM_CLASSES} classes)"
    shape = (C, S, S)
    if PRIOR_DIR.is_dir() and shipped:
        prior = DiffusionPrior.from_pretrained(str(PRIOR_DIR), shape)
        psrc = str(PRIOR_DIR.relative_to(ROOT))
    else:
        layers, groups = 1, 8
        if args.tiny:
            boc, down, up = (16, 32), ("DownBlock2D",) * 2, ("UpBlock2D",) * 2
        elif args.prior_arch == "ddpm-cifar10":
            # the architecture of google/ddpm-cifar10-32 (Ho et al. 2020): 35.7M parameters, attention at 16x16
            boc, layers, groups = (128, 256, 256, 256), 2, 32
            down = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
            up = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
        else:
            boc, down, up = (32, 64, 64, 128), ("DownBlock2D",) * 4, ("UpBlock2D",) * 4
        unet = UNet2DModel(
            sample_size=S, in_channels=C, out_channels=C, layers_per_block=layers, block_out_channels=boc,
            down_block_types=down, up_block_types=up, norm_num_groups=groups,
        )
        prior = DiffusionPrior(unet, DDPMScheduler(num_train_timesteps=1000), shape)
        n_params = sum(p.numel() for p in unet.parameters())
        psrc = f"random UNet2DModel block_out_channels={boc}, layers_per_block={layers} ({n_params / 1e6:.1f}M parameters)"
    prior = prior.to(device).eval()
    victim.requires_grad_(True)  # parameters must be differentiable targets (the weights are never stepped)
    return victim, prior, shape, {"victim": vsrc, "prior": psrc}


def random_batch(shape, B: int, device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B uniform random images (B, *shape) in [0, 1] and int64 labels (B,), drawn from a generator seeded with seed."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand((B, *shape), generator=g).to(device)
    labels = torch.randint(0, NUM_CLASSES, (B,), generator=g).to(device)
    return imgs, labels


def random_view(victim, shape, B: int, device, seed: int) -> ServerView:
    """One user's ServerView of a random batch: FedSGD update, batch size revealed, labels not (the threat of
    configs/attack/fashion_mnist.yaml), built by :func:`inversion.scenario.make_server_view` as attack.py's client."""
    imgs, labels = random_batch(shape, B, device, seed)
    return make_server_view(victim, imgs, labels, NUM_CLASSES)


# ------------------------------------------------------------------------------------------------------ section 3
def attack_settings(attack_steps: int) -> dict:
    """``attack.init_args`` of configs/attack/fashion_mnist.yaml (prior on, kappa 10, window, annealing, ...) with
    ``steps = attack_steps`` (the window slide and the t / lr schedules run over the full attack) and the final
    denoising off (it runs once per attack, after the timed steps; not part of a step's cost)."""
    import yaml

    attack = yaml.safe_load(ATTACK_CONFIG.read_text())["attack"]
    assert attack["class_path"].endswith("UserLevelInversion"), attack["class_path"]
    kw = dict(attack["init_args"])
    kw.update(steps=attack_steps, final_denoise=False, log_images_every=0)
    return kw


class StepTimer(Callback):
    """Wall time at every ``on_train_batch_end`` (CUDA synchronised first), and optionally the FLOPs of the first
    training step (FlopCounterMode entered at ``on_train_batch_start`` of batch 0 and left at its
    ``on_train_batch_end``: one whole ``training_step`` of the module, its optimizer step included)."""

    def __init__(self, device: torch.device, count_flops: bool = True) -> None:
        self.device = device
        self.count_flops = count_flops
        self.marks: list[float] = []
        self.flops: Optional[int] = None
        self.failed_while_counting = False
        self._fc = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.count_flops and batch_idx == 0:
            from torch.utils.flop_counter import FlopCounterMode

            self._fc = FlopCounterMode(display=False)
            if hasattr(self._fc, "mod_tracker"):
                self._fc.mod_tracker = _GlobalOnlyTracker()
            self._fc.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._fc is not None:
            self._fc.__exit__(None, None, None)
            self.flops = int(self._fc.get_total_flops())
            self._fc = None
        sync(self.device)
        self.marks.append(time.perf_counter())

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._fc is not None:  # never leave the counting mode on the dispatch stack
            self._fc.__exit__(None, None, None)
            self._fc = None
            self.failed_while_counting = True

    def step_times(self, warmup: int) -> list[float]:
        """Seconds of each step after the first ``warmup`` ones (intervals between consecutive batch ends)."""
        m = self.marks[warmup - 1 :]
        return [b - a for a, b in zip(m, m[1:])]


def fit_users(victim, prior, views: list, device: torch.device, settings: dict, steps: int, warmup: int = 1,
              count_flops: bool = True) -> dict:
    """The product path for U = len(views) users: ``UserLevelInversion(**settings, users_per_step=U)`` bound to the U
    views as attack.py binds a chunk, one ``Trainer.fit`` of warmup + steps steps. Returns s/step (median of the timed
    steps), their mean, the FLOPs of the first (warm-up) step, the fit's wall time and the peak memory (the fit's
    own: from before the module is built, the views' target gradients and the models excluded; None on the CPU)."""
    U = len(views)
    mem_base = reset_peak(device)
    attack = UserLevelInversion(**{**settings, "users_per_step": U})
    if U == 1:
        attack.bind(views[0], prior)
    else:  # as attack.py binds a chunk of users: the attack's seed for every user, one log prefix each
        attack.bind(views, prior, log_prefixes=[f"user{u}/" for u in range(U)])
    timer = StepTimer(device, count_flops=count_flops)
    pl_log = logging.getLogger("lightning.pytorch")
    level = pl_log.level
    pl_log.setLevel(logging.WARNING)  # no "GPU available" / "max_steps reached" lines per fit
    with tempfile.TemporaryDirectory(prefix="benchmark_") as tmp:
        trainer = Trainer(
            accelerator=device.type, devices=[device.index] if device.index is not None else 1, precision=PRECISION, max_steps=warmup + steps, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, callbacks=[timer], default_root_dir=tmp,
        )
        t0 = time.perf_counter()
        try:
            with intended_warnings_silenced():
                trainer.fit(attack)
        except Exception as exc:
            if not timer.failed_while_counting:
                raise
            # FlopCounterMode's support depends on the torch version: measure again without counting
            print(f"[benchmark] FlopCounterMode failed in the step: {type(exc).__name__}: {exc}", file=sys.stderr)
            victim.to(device)
            prior.to(device)
            return fit_users(victim, prior, views, device, settings, steps, warmup, count_flops=False)
        finally:
            pl_log.setLevel(level)
        fit_s = time.perf_counter() - t0
    peak = section_peak_mib(device, mem_base)
    # Lightning's teardown moves the module, hence the shared victim and prior, to the CPU: put them back
    victim.to(device)
    prior.to(device)
    ts = timer.step_times(warmup)
    if len(ts) != steps or attack.global_step != warmup + steps:
        raise RuntimeError(f"expected {warmup + steps} steps, the fit ran {attack.global_step} ({len(timer.marks)} batch ends)")
    return {"s_per_step": statistics.median(ts), "s_per_step_mean": statistics.fmean(ts), "flops_per_step": timer.flops,
            "fit_s": fit_s, "peak_mib": peak}


# ------------------------------------------------------------------------------------------------------ steps
class UserLevelStep:
    """One step of the user-level attack for one user, outside Lightning: a :class:`UserLevelInversion` bound to
    ``view`` (``settings``: the attack's init args) computes its own image gradient (the code of its
    ``training_step``: matching, prior, clipping), then Adam and the box, as the step does. No Trainer, no logging."""

    def __init__(self, view: ServerView, prior, device, settings: dict):
        self.attack = UserLevelInversion(**settings).bind(view, prior).to(device)
        self.attack.on_fit_start()  # the target to the device, the per-user noise streams
        self.opt = torch.optim.Adam([self.attack.x_hat], lr=settings.get("lr", 0.05))
        self.total, self.step_idx = settings["steps"], 0

    def __call__(self) -> dict:
        progress = (self.step_idx % self.total) / max(1, self.total - 1)
        self.step_idx += 1
        grad, values = self.attack._one_user_gradient(progress)
        x = self.attack.x_hat
        self.opt.zero_grad()
        x.grad = grad.to(x.dtype)
        self.opt.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
        return values[0]


class InvertingGradientsStep:
    """One step of Inverting Gradients with 1 restart: B dummy images, cosine distance + TV, signed Adam, box."""

    def __init__(self, victim, target, labels, shape, device, tv_weight: float = 1e-2):
        self.victim, self.tv_weight = victim, tv_weight
        params = victim_parameters(victim)
        self.params = list(params.values())
        self.target = [target[n] for n in params]
        B = labels.shape[0]
        g = torch.Generator().manual_seed(1)
        self.x = torch.nn.Parameter((0.5 + 0.5 * torch.randn((B, *shape), generator=g)).clamp(0, 1).to(device))
        self.y = labels
        self.opt = torch.optim.Adam([self.x], lr=0.1)

    def __call__(self) -> dict:
        x = self.x
        dummy = torch.autograd.grad(F.cross_entropy(self.victim(x), self.y), self.params, create_graph=True)
        gl = cosine_gradient_distance(dummy, self.target)
        loss = gl + self.tv_weight * total_variation(x)
        self.opt.zero_grad()
        x.grad = torch.autograd.grad(loss, x)[0].sign()
        self.opt.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
        return {"grad_loss": float(gl.detach())}


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 5; 2 with --tiny)")
    p.add_argument("--image-size", type=int, default=None, help="S of the S x S images (default 32; 8 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny random models and sizes: a smoke run in seconds")
    p.add_argument("--random-models", action="store_true",
                   help="random victim (C x S x S) and prior instead of the shipped 1-channel 32 px checkpoints")
    p.add_argument("--channels", type=int, default=1, help="C of the random models (3 for CelebA-like RGB)")
    p.add_argument("--prior-arch", default="small", choices=("small", "ddpm-cifar10"),
                   help="random prior: the shipped small UNet (2.9M) or google/ddpm-cifar10-32's architecture (35.7M)")
    p.add_argument("--batch-sizes", default=None, help="comma list of B (default 10,50,100; 2,5,10 with --tiny)")
    p.add_argument("--users", default=None, help="comma list of U (default 1,8,32; 1,2,4 with --tiny)")
    p.add_argument("--attack-steps", type=int, default=4000,
                   help="steps per user (paper: 4000): the users/hour divisor and the attack's own steps (schedules)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones (default 1)")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    # None (not given) takes the default; an explicit 0 must reach the >= 1 check below, not become the default
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 5)
    args.image_size = args.image_size if args.image_size is not None else (8 if args.tiny else 32)
    try:
        args.batch_sizes = [int(b) for b in (args.batch_sizes or ("2,5,10" if args.tiny else "10,50,100")).split(",")]
        args.users = sorted({int(u) for u in (args.users or ("1,2,4" if args.tiny else "1,8,32")).split(",")})
    except ValueError as exc:
        p.error(f"--batch-sizes and --users take comma lists of integers, e.g. 10,50,100 ({exc})")
    try:
        parse_device(args.device)
    except ValueError as exc:
        p.error(str(exc))
    if args.steps < 1 or args.warmup < 1 or args.image_size < 1 or min(args.batch_sizes) < 1 or min(args.users) < 1:
        p.error("--steps, --warmup, --image-size, batch sizes and user counts must be >= 1")
    if args.attack_steps < args.warmup + args.steps:
        p.error(f"--attack-steps ({args.attack_steps}) must be at least --warmup + --steps ({args.warmup + args.steps})")
    if not (args.random_models or args.tiny):  # the shipped checkpoints fix the images and the prior
        other = [f"{flag} {getattr(args, key)}" for flag, (key, shipped) in SHIPPED_SHAPE.items()
                 if getattr(args, key) != shipped]
        if other:
            p.error(f"{', '.join(other)}: --image-size, --channels and --prior-arch apply only to random models "
                    f"(--random-models or --tiny); without them the shipped 1-channel 32 px checkpoints "
                    f"({VICTIM_DIR.relative_to(ROOT)}, {PRIOR_DIR.relative_to(ROOT)}) are measured. Add --random-models "
                    "to measure random models")
    elif args.tiny and args.prior_arch != "small":
        p.error(f"--prior-arch {args.prior_arch} applies only to --random-models without --tiny (--tiny measures a "
                "tiny random UNet); drop --tiny")
    problem = args.json and output_path_problem("--json", args.json)  # last: the other checks cost nothing
    if problem:
        p.error(problem)
    return args


def fmt_row(cells, widths):
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)  # checked by parse_args (inversion.cli.parse_device)
    from attack import full_float32

    full_float32(PRECISION)  # what attack.py runs at this precision: CUDA convolutions without TF32
    t_start = time.perf_counter()
    victim, prior, shape, sources = build_models(args, device)
    models_mib = allocated_mib(device)
    steps = args.steps
    report: dict = {
        "machine": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "config": {
            "image_shape": list(shape), "steps": steps, "batch_sizes": args.batch_sizes, "users": args.users,
            "attack_steps": args.attack_steps, "warmup": args.warmup, "tiny": args.tiny, **sources,
        },
    }

    # 1 + 2: user-level step and Inverting Gradients' step against B. The user-level steps of the different B are
    # timed interleaved (one step of each B per round), so that load drift on a shared machine hits every B alike:
    # their work is identical (B only enters the one-off target), and the ratio is what the target is about.
    # Memory: each figure is the measurement's own (peak minus what was allocated at its start, see section_peak_mib);
    # the user-level steps of all B stay alive until their interleaved timing ends, the targets until their IG step.
    user_level, ig, ul_steps, targets = {}, {}, {}, {}
    settings = attack_settings(args.attack_steps)
    b_lo, b_hi = min(args.batch_sizes), max(args.batch_sizes)
    # untimed warm-up: the process's first victim forward/backward pays the start-up cost (cuDNN/cuBLAS handles,
    # kernel loading, allocator growth), which would otherwise land in the "target grad s" of whichever B runs first
    make_server_view(victim, *random_batch(shape, b_lo, device, seed=0), NUM_CLASSES)
    sync(device)
    for B in args.batch_sizes:
        imgs, labels = random_batch(shape, B, device, seed=B)
        sync(device)
        t0 = time.perf_counter()
        view = make_server_view(victim, imgs, labels, NUM_CLASSES)  # the client's FedSGD update
        sync(device)
        targets[B] = (view.target_gradient, labels, time.perf_counter() - t0)
        del imgs
        mem_base = reset_peak(device)
        ul_steps[B] = UserLevelStep(view, prior, device, settings)
        for _ in range(args.warmup):
            ul_steps[B]()
        sync(device)
        user_level[B] = {"target_s": targets[B][2], "peak_mib": section_peak_mib(device, mem_base)}
        del view
    ul_times = {B: [] for B in args.batch_sizes}
    order = list(ul_steps)
    for r in range(steps):  # round r starts at a different B (rotation), so no B always runs first or last
        for B in order[r % len(order):] + order[: r % len(order)]:
            ul_times[B].extend(time_steps(ul_steps[B], 1, device, warmup=0))
    for B, ts in ul_times.items():
        user_level[B].update(s_per_step=statistics.median(ts), s_per_step_mean=statistics.fmean(ts))
    del ul_steps
    target_mib = gradient_mib(targets[b_lo][0])  # one victim-sized copy per user, the same for every B
    for B in list(targets):  # the distinct B in --batch-sizes order
        target, labels, _ = targets.pop(B)  # released after its IG step: later measurements do not hold it
        mem_base = reset_peak(device)
        ig_step = InvertingGradientsStep(victim, target, labels, shape, device)
        ts = time_steps(ig_step, steps, device, warmup=args.warmup)
        ig[B] = {"s_per_step": statistics.median(ts), "s_per_step_mean": statistics.fmean(ts),
                 "peak_mib": section_peak_mib(device, mem_base)}
        del target, labels, ig_step
    del targets
    ratio = user_level[b_hi]["s_per_step"] / user_level[b_lo]["s_per_step"]
    report["user_level_step"] = {str(b): v for b, v in user_level.items()}
    report["user_level_ratio"] = {"B_lo": b_lo, "B_hi": b_hi, "ratio": ratio, "target": 1.05,
                                  "met": (ratio <= 1.05) if b_hi != b_lo else None}  # one B: nothing to compare
    report["inverting_gradients_step"] = {str(b): v for b, v in ig.items()}

    # 3: users per hour through the product path: UserLevelInversion bound to U users, one Trainer fit per U
    throughput = {}
    for U in sorted({1, *args.users}):  # U = 1 is the one-at-a-time baseline, measured even when not listed
        views = [random_view(victim, shape, b_lo, device, seed=1000 + u) for u in range(U)]
        throughput[U] = fit_users(victim, prior, views, device, settings, steps, warmup=args.warmup)
        del views
    rate_1 = 1.0 / throughput[1]["s_per_step"]
    for U, v in throughput.items():
        rate = U / v["s_per_step"]
        v.update(user_steps_per_s=rate, users_per_hour=3600 * rate / args.attack_steps, speedup_vs_one_at_a_time=rate / rate_1)
    one = throughput[1]
    hand = user_level[b_lo]["s_per_step"]
    best_U = max(args.users, key=lambda u: throughput[u]["speedup_vs_one_at_a_time"])
    report["users_per_hour"] = {
        "how": (f"UserLevelInversion ({ATTACK_CONFIG.relative_to(ROOT)} attack, steps={args.attack_steps}, final "
                f"denoising off) bound to U random users (B={b_lo}), Trainer.fit of {args.warmup}+{steps} steps; "
                f"s/step = median time between on_train_batch_end calls after {args.warmup} warm-up step(s)"),
        "B": b_lo,
        "attack_settings": settings,
        "one_at_a_time": {"U": 1, "s_per_step": one["s_per_step"], "user_steps_per_s": rate_1,
                          "users_per_hour": one["users_per_hour"], "peak_mib": one["peak_mib"], "hand_step_s_per_step": hand,
                          "trainer_over_hand_step": one["s_per_step"] / hand},
        "batched": {str(u): throughput[u] for u in args.users},
        "best_U": best_U,
        "best_speedup": throughput[best_U]["speedup_vs_one_at_a_time"],
        "target_speedup": 3.0,
        "met": throughput[best_U]["speedup_vs_one_at_a_time"] >= 3.0,
    }

    # 4: FLOP/s of one step against a measured peak
    peak, peak_how = peak_flops(device, args.tiny, PRECISION)
    U_last = max(args.users)
    fl = {"peak_flops": peak, "peak_measured_by": peak_how,
          "peak_precision": peak_precision_label(device, PRECISION),  # the steps' arithmetic, e.g. 'float32, TF32 off'
          "counted": "matmul/conv/attention FLOPs (FlopCounterMode) of one UserLevelInversion training_step (the warm-up step)"}
    for k, U in (("one_at_a_time", 1), (f"batched_U{U_last}", U_last)):
        f, t = throughput[U]["flops_per_step"], throughput[U]["s_per_step"]
        fl[k] = {"U": U, "flops_per_step": f, "s_per_step": t, "flops_per_s": f / t if f else None,
                 "fraction_of_peak": f / t / peak if f else None}
    report["flops"] = fl
    if tracks_memory(device):
        # the heaviest measurement on its own: its own peak plus its inputs (1 target gradient per B, U per fit)
        heaviest = max([v["peak_mib"] + target_mib for v in (*user_level.values(), *ig.values())]
                       + [v["peak_mib"] + U * target_mib for U, v in throughput.items()])
        report["peak_memory_mib"] = {
            "how": ("CUDA: per measurement its own peak (max_memory_allocated minus memory_allocated at its start: "
                    "models, inputs and earlier measurements' objects not counted); overall = models + the heaviest "
                    "measurement with its inputs' target gradients"),
            "models": models_mib, "target_gradient_per_user": target_mib, "overall": models_mib + heaviest,
        }
    else:
        report["peak_memory_mib"] = {"how": "process ru_maxrss (monotone; no per-measurement figures on the CPU)",
                                     "overall": peak_mib(device)}
    report["wall_s"] = time.perf_counter() - t_start
    print_report(report)
    if args.json:
        from attack import atomic_write_text

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")  # temp file, then rename
        print(f"wrote {args.json}")
    return report


def print_report(r: dict) -> None:
    m, c = r["machine"], r["config"]
    print("=" * 96)
    print(f"BENCHMARK  device={m['device']} ({m['device_name']})  torch {m['torch']}  threads={m['threads']}")
    print(f"victim: {c['victim']}")
    print(f"prior:  {c['prior']}")
    print(f"images {tuple(c['image_shape'])}, {c['steps']} timed steps (median), users/hour at {c['attack_steps']} steps/user")
    print("-" * 96)
    print("[1] seconds per step vs client batch size B")
    print("    (target grad s: the client's gradient at B, after an untimed warm-up; own peak MiB: the measurement's "
          "peak above what was allocated at its start)")
    w = (6, 22, 18, 14, 26, 14)
    print(fmt_row(["B", "user-level s/step", "target grad s", "own peak MiB", "Inverting Gradients s/step",
                   "own peak MiB"], w))
    for b, v in r["user_level_step"].items():
        g = r["inverting_gradients_step"][b]
        print(fmt_row([b, f"{v['s_per_step']:.4f}", f"{v['target_s']:.4f}", fmt_mib(v['peak_mib']),
                       f"{g['s_per_step']:.4f}", fmt_mib(g['peak_mib'])], w))
    q = r["user_level_ratio"]
    print(f"user-level t(B={q['B_hi']})/t(B={q['B_lo']}) = {q['ratio']:.3f}  (target <= {q['target']}: "
          f"{'n/a: one B' if q['met'] is None else 'MET' if q['met'] else 'NOT MET'})")
    print("-" * 96)
    print("[2] users per hour: UserLevelInversion through a Lightning Trainer, U users per step (U = 1: one at a time)")
    u = r["users_per_hour"]
    print(f"    {u['how']}")
    w = (16, 12, 18, 16, 22, 10)
    print(fmt_row(["mode", "s/step", "user-steps/s", "users/hour", "speedup vs 1-at-a-time", "own peak MiB"], w))
    o = u["one_at_a_time"]
    print(fmt_row(["one-at-a-time", f"{o['s_per_step']:.4f}", f"{o['user_steps_per_s']:.3f}", f"{o['users_per_hour']:.2f}", "1.00x", fmt_mib(o['peak_mib'])], w))
    for U, v in u["batched"].items():
        print(fmt_row([f"batched U={U}", f"{v['s_per_step']:.4f}", f"{v['user_steps_per_s']:.3f}", f"{v['users_per_hour']:.2f}",
                       f"{v['speedup_vs_one_at_a_time']:.2f}x", fmt_mib(v['peak_mib'])], w))
    print(f"one-at-a-time through the Trainer / the bare step of [1] at B={u['B']}: "
          f"{o['s_per_step']:.4f} / {o['hand_step_s_per_step']:.4f} s = {o['trainer_over_hand_step']:.2f}x")
    print(f"best speedup {u['best_speedup']:.2f}x at U={u['best_U']}  (target >= {u['target_speedup']}x: "
          f"{'MET' if u['met'] else 'NOT MET'})")
    print("-" * 96)
    f = r["flops"]
    print(f"[3] achieved FLOP/s ({f['counted']}); peak {f['peak_flops'] / 1e9:.1f} GFLOP/s measured by {f['peak_measured_by']}")
    for k, v in f.items():
        if isinstance(v, dict):
            if v["flops_per_s"] is None:
                print(f"{k:<16} FLOP count unavailable")
            else:
                print(f"{k:<16} {v['flops_per_step'] / 1e9:.3f} GFLOP/step  {v['flops_per_s'] / 1e9:.2f} GFLOP/s  "
                      f"{100 * v['fraction_of_peak']:.1f}% of the {f['peak_precision']} peak")
    print("-" * 96)
    pm = r["peak_memory_mib"]
    print(f"[4] peak memory {pm['overall']:.0f} MiB ({pm['how']})")
    if "models" in pm:
        print(f"    models {pm['models']:.0f} MiB, target gradient {pm['target_gradient_per_user']:.0f} MiB per user")
    print(f"wall time {r['wall_s']:.1f} s")
    print("=" * 96)


if __name__ == "__main__":
    from inversion.cli import run_main

    run_main(main, "benchmark.py")  # a missing or damaged checkpoint file: one error line, not a traceback
