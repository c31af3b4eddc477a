#!/usr/bin/env python
"""Cost of the attacks on this machine: seconds per step, users per hour, achieved FLOP/s, peak memory.

Measures, with the shipped victim (``checkpoints/fashion_mnist/victim_resnet18``) when present, else a random
small-stem ResNet-18 (C x S x S, 10 classes), and the shipped DDPM prior (``checkpoints/fashion_mnist/ddpm_32``)
when present, else a random diffusers UNet2DModel (block_out_channels (32, 64, 64, 128), layers_per_block 1):

1. The user-level attack step (as ``UserLevelInversion.training_step``: dummy gradient with create_graph, window
   weighted ``gradient_matching_loss``, its image gradient, ``DiffusionPrior.prior_loss`` and its gradient, dynamic
   clipping, Adam, box) with target gradients of B = 10, 50, 100 images. B only enters the (one-off) target
   computation, so the step time should not depend on it: target t(B_max) / t(B_min) <= 1.05.
2. Inverting Gradients' step at the same B (B reconstructions, 1 restart: batched dummy gradient over B images,
   ``cosine_gradient_distance`` + ``total_variation``, signed Adam, box).
3. Users per hour: one user at a time (the step of 1.) against U users per step with
   :class:`inversion.batched.BatchedMatching` (vmapped per-user matching + the prior on the U images + per-user
   clipping), U = 1, 8, 32: users/h = 3600 * U / (t_step(U) * attack_steps). Target: >= 3x one-at-a-time.
4. Achieved FLOP/s of one step (``torch.utils.flop_counter.FlopCounterMode``: matmul/conv/attention FLOPs only,
   elementwise ops are not counted) against a measured peak (CPU: a 2048^2 float32 matmul with the current threads;
   CUDA: an 8192^2 bf16 matmul).
5. Peak memory: CUDA ``max_memory_allocated`` per section; CPU the process's ``ru_maxrss`` (monotone).

Times are medians over ``--steps`` timed steps after one warm-up step. Run with ``OMP_NUM_THREADS=1 nice -n 10``
next to trainings. ``--tiny`` (8 px, random tiny models, B = 2, 5, 10, U = 1, 2, 4, 2 steps) finishes in seconds;
it checks the script, its numbers mean little.

Usage: python scripts/benchmark.py [--device cuda] [--steps N] [--image-size S] [--tiny] [--json OUT]
       python scripts/benchmark.py --device cuda --image-size 64 --random-models --channels 3 --prior-arch ddpm-cifar10
           (the paper's setting: 64x64 RGB faces, a CIFAR-10-sized DDPM, 4,000 steps per attack)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
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

from inversion.batched import BatchedMatching, stack_targets  # noqa: E402
from inversion.objectives import clip_matching_gradient, gradient_matching_loss, sliding_window_weights, timestep_at  # noqa: E402
from inversion.prior import DiffusionPrior  # noqa: E402
from inversion.scenario import fedsgd_gradient, victim_parameters  # noqa: E402
from lightning_modules.baselines import cosine_gradient_distance, total_variation  # noqa: E402

VICTIM_DIR = ROOT / "checkpoints" / "fashion_mnist" / "victim_resnet18"
PRIOR_DIR = ROOT / "checkpoints" / "fashion_mnist" / "ddpm_32"
NUM_CLASSES = 10


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


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


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


def count_flops(fn: Callable[[], None]) -> Optional[int]:
    """FLOPs of one call of fn by FlopCounterMode (None if the counter fails, e.g. on an unsupported transform)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        fc = FlopCounterMode(display=False)
        if hasattr(fc, "mod_tracker"):
            fc.mod_tracker = _GlobalOnlyTracker()
        with fc:
            fn()
        return int(fc.get_total_flops())
    except Exception as exc:  # pragma: no cover - depends on the torch version
        print(f"[benchmark] FlopCounterMode failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def peak_flops(device: torch.device, tiny: bool) -> tuple[float, str]:
    """Measured matmul FLOP/s: CPU float32 (n = 2048, 512 when tiny), CUDA bf16 (n = 8192)."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 20
    else:
        n, dtype, reps = (512 if tiny else 2048), torch.float32, 3
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_steps(lambda: a @ b, reps, device, warmup=1)
    return 2 * n**3 / min(times), f"{n}x{n} {str(dtype).replace('torch.', '')} matmul, best of {reps}"


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


def random_target(victim, shape, B: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand((B, *shape), generator=g).to(device)
    labels = torch.randint(0, NUM_CLASSES, (B,), generator=g).to(device)
    return fedsgd_gradient(victim, imgs, labels), labels


# ------------------------------------------------------------------------------------------------------ steps
class UserLevelStep:
    """One step of the user-level attack for one user (the computation of UserLevelInversion.training_step)."""

    def __init__(self, victim, prior, target, shape, device, total_steps: int = 4000, kappa: float = 1.0):
        self.victim, self.prior, self.kappa = victim, prior, kappa
        self.params = list(victim_parameters(victim).values())
        self.names = list(victim_parameters(victim))
        self.target = [target[n] for n in self.names]
        g = torch.Generator().manual_seed(1)
        self.x = torch.nn.Parameter(torch.rand((1, *shape), generator=g).to(device))
        self.y = F.one_hot(torch.tensor([3]), NUM_CLASSES).float().to(device)
        self.opt = torch.optim.Adam([self.x], lr=0.05)
        self.noise = torch.Generator(device=device).manual_seed(2)
        self.total, self.step_idx = total_steps, 0

    def __call__(self) -> dict:
        progress = (self.step_idx % self.total) / max(1, self.total - 1)
        self.step_idx += 1
        L = len(self.params)
        w = sliding_window_weights(L, (1 - progress) * (L - 1), 12.0, 24.0)
        t = timestep_at(progress, 800, 20)
        x = self.x
        logits = self.victim(x)
        ce = -(self.y * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        dummy = torch.autograd.grad(ce, self.params, create_graph=True)
        l_match = gradient_matching_loss(self.target, dummy, w)
        g_match = torch.autograd.grad(l_match, x)[0]
        l_prior = self.prior.prior_loss(x, t, 1, self.noise)
        g_prior = torch.autograd.grad(l_prior, x)[0]
        g_match, _ = clip_matching_gradient(g_match, g_prior, self.kappa)
        self.opt.zero_grad()
        x.grad = g_match + g_prior
        self.opt.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
        return {"match": float(l_match.detach()), "prior": float(l_prior.detach())}


class BatchedUserLevelStep:
    """The same step for U users at once: BatchedMatching + the prior on (U, C, H, W) + per-user clipping."""

    def __init__(self, bm: BatchedMatching, prior, targets: list, shape, device, total_steps: int = 4000, kappa: float = 1.0):
        self.bm, self.prior, self.kappa = bm, prior, kappa
        U = len(targets)
        self.U = U
        self.targets = stack_targets(targets, bm.param_names)
        g = torch.Generator().manual_seed(1)
        self.x = torch.nn.Parameter(torch.rand((U, *shape), generator=g).to(device))
        self.y = F.one_hot(torch.arange(U) % NUM_CLASSES, NUM_CLASSES).float().to(device)
        self.opt = torch.optim.Adam([self.x], lr=0.05)
        self.noise = torch.Generator(device=device).manual_seed(2)
        self.total, self.step_idx = total_steps, 0

    def __call__(self) -> dict:
        progress = (self.step_idx % self.total) / max(1, self.total - 1)
        self.step_idx += 1
        L = self.bm.num_layers
        w = sliding_window_weights(L, (1 - progress) * (L - 1), 12.0, 24.0)
        t = timestep_at(progress, 800, 20)
        x = self.x
        l_match, g_match = self.bm.matching_loss_and_grad(x.detach(), self.y, self.targets, w)
        # prior_loss averages over the U images: times U gives each image its own single-user loss gradient
        l_prior = self.prior.prior_loss(x, t, 1, self.noise)
        g_prior = torch.autograd.grad(self.U * l_prior, x)[0]
        nm = g_match.flatten(1).norm(dim=1)
        npr = g_prior.flatten(1).norm(dim=1)
        scale = torch.where(nm > self.kappa * npr, self.kappa * npr / nm.clamp_min(1e-30), torch.ones_like(nm))
        self.opt.zero_grad()
        x.grad = g_match * scale.view(-1, 1, 1, 1) + g_prior
        self.opt.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
        return {"match": l_match.tolist(), "prior": float(l_prior.detach())}


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
    p.add_argument("--attack-steps", type=int, default=4000, help="steps per user for users/hour (paper: 4000)")
    p.add_argument("--conv-impl", default="unfold", choices=("unfold", "native"), help="BatchedMatching convolutions")
    p.add_argument("--chunk-size", type=int, default=None, help="BatchedMatching vmap chunk size (default: all U)")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 5)
    args.image_size = args.image_size or (8 if args.tiny else 32)
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("2,5,10" if args.tiny else "10,50,100")).split(",")]
    args.users = [int(u) for u in (args.users or ("1,2,4" if args.tiny else "1,8,32")).split(",")]
    if args.steps < 1 or min(args.batch_sizes) < 1 or min(args.users) < 1:
        p.error("--steps, batch sizes and user counts must be >= 1")
    return args


def fmt_row(cells, widths):
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    t_start = time.perf_counter()
    victim, prior, shape, sources = build_models(args, device)
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
            "attack_steps": args.attack_steps, "conv_impl": args.conv_impl, "chunk_size": args.chunk_size,
            "tiny": args.tiny, **sources,
        },
    }

    # 1 + 2: user-level step and Inverting Gradients' step against B
    user_level, ig = {}, {}
    targets_by_B = {}
    for B in args.batch_sizes:
        t0 = time.perf_counter()
        target, labels = random_target(victim, shape, B, device, seed=B)
        sync(device)
        t_target = time.perf_counter() - t0
        targets_by_B[B] = target
        reset_peak(device)
        step = UserLevelStep(victim, prior, target, shape, device, args.attack_steps)
        ts = time_steps(step, steps, device)
        user_level[B] = {"s_per_step": statistics.median(ts), "s_per_step_mean": statistics.fmean(ts),
                         "target_s": t_target, "peak_mib": peak_mib(device)}
        reset_peak(device)
        ig_step = InvertingGradientsStep(victim, target, labels, shape, device)
        ts = time_steps(ig_step, steps, device)
        ig[B] = {"s_per_step": statistics.median(ts), "s_per_step_mean": statistics.fmean(ts), "peak_mib": peak_mib(device)}
    b_lo, b_hi = min(args.batch_sizes), max(args.batch_sizes)
    ratio = user_level[b_hi]["s_per_step"] / user_level[b_lo]["s_per_step"]
    report["user_level_step"] = {str(b): v for b, v in user_level.items()}
    report["user_level_ratio"] = {"B_lo": b_lo, "B_hi": b_hi, "ratio": ratio, "target": 1.05, "met": ratio <= 1.05}
    report["inverting_gradients_step"] = {str(b): v for b, v in ig.items()}

    # 3: users per hour, one at a time vs U per step
    t_single = user_level[b_lo]["s_per_step"]
    single_rate = 1.0 / t_single
    bm = BatchedMatching(victim, chunk_size=args.chunk_size, conv_impl=args.conv_impl)
    base_target = targets_by_B[b_lo]
    throughput = {}
    last_batched = None
    for U in args.users:
        # U users with different target gradients (reuse the B targets, rescaled so that each user differs)
        user_targets = [{n: g * (1.0 + 0.1 * u) + 0.01 * u * g.roll(1) for n, g in base_target.items()} for u in range(U)]
        reset_peak(device)
        bstep = BatchedUserLevelStep(bm, prior, user_targets, shape, device, args.attack_steps)
        ts = time_steps(bstep, steps, device)
        s = statistics.median(ts)
        rate = U / s
        throughput[U] = {"s_per_step": s, "user_steps_per_s": rate, "users_per_hour": 3600 * rate / args.attack_steps,
                         "speedup_vs_one_at_a_time": rate / single_rate, "peak_mib": peak_mib(device)}
        last_batched = bstep
        del user_targets
    best_U = max(throughput, key=lambda u: throughput[u]["speedup_vs_one_at_a_time"])
    report["users_per_hour"] = {
        "one_at_a_time": {"s_per_step": t_single, "user_steps_per_s": single_rate,
                          "users_per_hour": 3600 * single_rate / args.attack_steps},
        "batched": {str(u): v for u, v in throughput.items()},
        "best_U": best_U,
        "best_speedup": throughput[best_U]["speedup_vs_one_at_a_time"],
        "target_speedup": 3.0,
        "met": throughput[best_U]["speedup_vs_one_at_a_time"] >= 3.0,
    }

    # 4: FLOP/s of one step against a measured peak
    peak, peak_how = peak_flops(device, args.tiny)
    one = UserLevelStep(victim, prior, base_target, shape, device, args.attack_steps)
    flops_one = count_flops(one)
    flops_batched = count_flops(last_batched)
    U_last = args.users[-1]
    fl = {"peak_flops": peak, "peak_measured_by": peak_how, "counted": "matmul/conv FLOPs (FlopCounterMode)"}
    fl["one_at_a_time"] = {"flops_per_step": flops_one, "s_per_step": t_single,
                           "flops_per_s": flops_one / t_single if flops_one else None}
    fl[f"batched_U{U_last}"] = {"flops_per_step": flops_batched, "s_per_step": throughput[U_last]["s_per_step"],
                                "flops_per_s": flops_batched / throughput[U_last]["s_per_step"] if flops_batched else None}
    for k in ("one_at_a_time", f"batched_U{U_last}"):
        fl[k]["fraction_of_peak"] = fl[k]["flops_per_s"] / peak if fl[k]["flops_per_s"] else None
    report["flops"] = fl
    report["peak_memory_mib"] = {
        "how": "torch.cuda.max_memory_allocated per section" if device.type == "cuda" else "process ru_maxrss (monotone)",
        "overall": peak_mib(device) if device.type != "cuda" else max(
            [v["peak_mib"] for v in user_level.values()] + [v["peak_mib"] for v in ig.values()]
            + [v["peak_mib"] for v in throughput.values()]),
    }
    report["wall_s"] = time.perf_counter() - t_start
    print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
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
    w = (6, 22, 18, 14, 26, 14)
    print(fmt_row(["B", "user-level s/step", "target grad s", "peak MiB", "Inverting Gradients s/step", "peak MiB"], w))
    for b, v in r["user_level_step"].items():
        g = r["inverting_gradients_step"][b]
        print(fmt_row([b, f"{v['s_per_step']:.4f}", f"{v['target_s']:.4f}", f"{v['peak_mib']:.0f}",
                       f"{g['s_per_step']:.4f}", f"{g['peak_mib']:.0f}"], w))
    q = r["user_level_ratio"]
    print(f"user-level t(B={q['B_hi']})/t(B={q['B_lo']}) = {q['ratio']:.3f}  (target <= {q['target']}: "
          f"{'MET' if q['met'] else 'NOT MET'})")
    print("-" * 96)
    print("[2] users per hour: one user at a time vs U users per step (BatchedMatching)")
    u = r["users_per_hour"]
    w = (16, 12, 18, 16, 22, 10)
    print(fmt_row(["mode", "s/step", "user-steps/s", "users/hour", "speedup vs 1-at-a-time", "peak MiB"], w))
    o = u["one_at_a_time"]
    print(fmt_row(["one-at-a-time", f"{o['s_per_step']:.4f}", f"{o['user_steps_per_s']:.3f}", f"{o['users_per_hour']:.2f}", "1.00x", "-"], w))
    for U, v in u["batched"].items():
        print(fmt_row([f"batched U={U}", f"{v['s_per_step']:.4f}", f"{v['user_steps_per_s']:.3f}", f"{v['users_per_hour']:.2f}",
                       f"{v['speedup_vs_one_at_a_time']:.2f}x", f"{v['peak_mib']:.0f}"], w))
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
                      f"{100 * v['fraction_of_peak']:.1f}% of peak")
    print("-" * 96)
    pm = r["peak_memory_mib"]
    print(f"[4] peak memory {pm['overall']:.0f} MiB ({pm['how']})")
    print(f"wall time {r['wall_s']:.1f} s")
    print("=" * 96)


if __name__ == "__main__":
    main()
