"""Measure the shipped Fashion-MNIST checkpoints against their bars and print a report.

    python scripts/check_checkpoints.py                      # full: 10,000 test images, 500 prior samples
    python scripts/check_checkpoints.py --n-test 500 --n-samples 100 --ddim-steps 20   # quick
    python scripts/check_checkpoints.py --prior-only --device cuda   # the prior's bar alone (no test split needed)

Bars (issue 3): victim and evaluator top-1 accuracy >= 90% on the Fashion-MNIST test split; 500 prior samples
(DDIM, 100 steps, eta 0, seed 0) classified by the evaluator with mean top-1 probability >= 0.8 and every class
between 0.5x and 2x of uniform. Exit status 1 when a bar fails (with --strict).

Bad input (options, a checkpoint folder without its files, a --data-root without the test split, an existing or
unwritable --json/--grid path) ends in one ``check_checkpoints.py: error:`` line and exit status 2 before any work.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from inversion.cli import parse_device  # noqa: E402
from inversion.fsutils import output_path_problem  # noqa: E402


def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``model`` on images x (N, C, H, W) in [0, 1] with labels y (N,)."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(x)


def prior_sample_report(prior_dir: Path, evaluator, n: int, steps: int, seed: int = 0, device: str = "cpu",
                        ddpm: Optional[tuple] = None) -> dict:
    """Sample ``n`` images with DDIM and classify them with the evaluator; returns the figures of the bar.
    ``ddpm``: the (unet, scheduler) of ``prior_dir`` already loaded (:func:`inversion.prior.load_ddpm`), else it is
    loaded here."""
    from inversion.prior import load_ddpm
    from lightning_modules.ddpm import sample_ddim

    unet, scheduler = ddpm if ddpm is not None else load_ddpm(str(prior_dir), device)
    t0 = time.time()
    imgs = sample_ddim(unet, scheduler, n, num_inference_steps=steps, seed=seed, device=device)
    seconds = time.time() - t0
    with torch.no_grad():
        probs = torch.softmax(evaluator.to(device)(imgs.to(device)), dim=1).cpu()
    imgs = imgs.cpu()
    top1 = probs.max(1).values
    counts = np.bincount(probs.argmax(1).numpy(), minlength=probs.shape[1])
    uniform = n / probs.shape[1]
    return {
        "n_samples": n,
        "ddim_steps": steps,
        "sampling_seconds": round(seconds, 1),
        "mean_top1_prob": round(float(top1.mean()), 4),
        "class_counts": counts.tolist(),
        "class_ratio_min": round(float(counts.min() / uniform), 3),
        "class_ratio_max": round(float(counts.max() / uniform), 3),
        "bar_mean_top1": bool(top1.mean() >= 0.8),
        "bar_class_balance": bool(counts.min() >= 0.5 * uniform and counts.max() <= 2 * uniform),
    }, imgs


def load_test_split(data_root: Optional[str]) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's test split (images uint8 (N, 28, 28), labels), from ``--data-root`` when given.

    Raises:
        DataNotFoundError (a FileNotFoundError): the split is not there; unlike the data module's own message (which
            names the configs' ``data.root``), the fix names this script's ``--data-root``.
        ValueError: a damaged idx file (the message names it).
    """
    from datamodules.fashion_mnist import DataNotFoundError, load_split

    try:
        return load_split("test", root=data_root)
    except DataNotFoundError as exc:
        looked = str(exc).split(" Fix: ")[0].rstrip(".")  # "Fashion-MNIST idx files not found (looked in ...)"
        raise DataNotFoundError(
            f"{looked}. Fix: pass --data-root FOLDER, a folder holding t10k-images-idx3-ubyte.gz and "
            "t10k-labels-idx1-ubyte.gz (plain or .gz), or install them with `sudo apt-get install "
            "dataset-fashion-mnist` and leave --data-root out (--prior-only needs no test split)"
        ) from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", default=str(ROOT / "checkpoints" / "fashion_mnist"))
    ap.add_argument("--n-test", type=int, default=10000, help="test images for the accuracies (max 10000)")
    ap.add_argument("--n-samples", type=int, default=500)
    ap.add_argument("--ddim-steps", type=int, default=100)
    ap.add_argument("--json", default=None, help="also write the report as JSON here")
    ap.add_argument("--grid", default=None, help="save the first 100 prior samples as a PNG grid here")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a bar fails")
    ap.add_argument("--prior-only", action="store_true", help="only the prior's bar (skips the test-split accuracies)")
    ap.add_argument("--device", default="cpu", help="where the prior samples (cpu or cuda)")
    ap.add_argument("--data-root", default=None,
                    help="folder holding Fashion-MNIST's t10k-*-ubyte.gz (default: the Debian package's, else a download)")
    args = ap.parse_args(argv)
    if not 1 <= args.n_test <= 10000 or args.n_samples < 1 or args.ddim_steps < 1:
        ap.error(f"--n-test must be in 1..10000 and --n-samples, --ddim-steps >= 1 (got {args.n_test}, "
                 f"{args.n_samples}, {args.ddim_steps})")
    try:  # a bad or unavailable device failed only at the prior, after the test-split accuracies
        parse_device(args.device)
    except ValueError as exc:
        ap.error(str(exc))
    for flag, path in (("--json", args.json), ("--grid", args.grid)):
        problem = path and output_path_problem(flag, path)  # before the minutes of work, not after them
        if problem:
            ap.error(problem)
    if args.json and args.grid and Path(args.json).resolve() == Path(args.grid).resolve():
        ap.error(f"--json and --grid name the same file {args.json}; give two paths")
    for name in (("evaluator_convnet", "ddpm_32") if args.prior_only else ("victim_resnet18", "evaluator_convnet", "ddpm_32")):
        if not (Path(args.checkpoints) / name).is_dir():
            ap.error(f"{Path(args.checkpoints) / name} not found: --checkpoints must hold victim_resnet18, "
                     "evaluator_convnet and ddpm_32 (as checkpoints/fashion_mnist does)")

    from attack import atomic_write_bytes, atomic_write_text
    from datamodules.fashion_mnist import to_tensor_images
    from inversion.prior import load_ddpm
    from lightning_modules.classifier import load_classifier

    ck = Path(args.checkpoints)
    names = () if args.prior_only else ("victim_resnet18", "evaluator_convnet")
    # every checkpoint loaded before any work: a folder without its config.json or weights (FileNotFoundError) or a
    # damaged one (ValueError) is one error line naming it, not a traceback after the accuracies
    classifiers = {name: load_classifier(ck / name) for name in (names or ("evaluator_convnet",))}
    ddpm = load_ddpm(str(ck / "ddpm_32"), args.device)
    if names:
        raw, labels = load_test_split(args.data_root)
        x = to_tensor_images(raw[: args.n_test], 32, 1)
        y = torch.from_numpy(labels[: args.n_test].astype(np.int64))
    report: dict = {"n_test": len(x) if names else 0}
    evaluator = classifiers["evaluator_convnet"][0]
    for name in names:
        model, cfg = classifiers[name]
        t0 = time.time()
        acc = accuracy(model, x, y)
        report[name] = {"arch": cfg["arch"], "test_accuracy": round(acc, 4), "seconds": round(time.time() - t0, 1), "bar": acc >= 0.9}
    prior, imgs = prior_sample_report(ck / "ddpm_32", evaluator, args.n_samples, args.ddim_steps, device=args.device,
                                      ddpm=ddpm)
    report["ddpm_32"] = prior
    if args.grid:
        from PIL import Image

        from inversion.logging_utils import to_uint8_hwc

        buf = io.BytesIO()
        Image.fromarray(to_uint8_hwc(imgs[:100], nrow=10)).save(buf, format="PNG")
        atomic_write_bytes(Path(args.grid), buf.getvalue())  # temp file, then rename

    print(f"Fashion-MNIST checkpoints ({ck})")
    for name in names:
        r = report[name]
        print(f"  {name:18s} test accuracy {100 * r['test_accuracy']:.2f}% on {len(x)} images  [bar >= 90%: {'PASS' if r['bar'] else 'FAIL'}]")
    print(
        f"  ddpm_32            {prior['n_samples']} DDIM-{prior['ddim_steps']} samples: evaluator mean top-1 prob "
        f"{prior['mean_top1_prob']:.3f} [bar >= 0.8: {'PASS' if prior['bar_mean_top1'] else 'FAIL'}]; class counts "
        f"{prior['class_counts']} -> {prior['class_ratio_min']:.2f}x..{prior['class_ratio_max']:.2f}x of uniform "
        f"[bar 0.5x..2x: {'PASS' if prior['bar_class_balance'] else 'FAIL'}]"
    )
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    ok = all(report[n]["bar"] for n in names) and prior["bar_mean_top1"] and prior["bar_class_balance"]
    print("ALL BARS PASS" if ok else "SOME BARS FAIL")
    return 0 if ok or not args.strict else 1


def _cli() -> None:
    raise SystemExit(main())  # 1 when a bar fails under --strict


if __name__ == "__main__":
    from inversion.cli import run_main

    run_main(_cli, "check_checkpoints.py")  # bad input: one error line and exit status 2, not a traceback
