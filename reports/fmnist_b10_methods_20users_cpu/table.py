"""The methods table of README.md (B = 10, 20 users) from the run directories; users matched by id.

    python reports/fmnist_b10_methods_20users_cpu/table.py runs/b10 runs/bsel runs/methods20

Baselines reconstruct B images per user. "Representative" is the image a method reports: the user-level attack's
final image, a baseline's reconstruction that best matches the target gradient (attack.py's ``representative``).
"All B" columns average over every reconstruction of a baseline: the share the evaluator reads as the user's
dominant class (``all_evaluator_dominant_share``) and each image's LPIPS to its nearest batch image
(``all_lpips_nearest_mean``); "most read as the class": users for whom more than half of the B
reconstructions are read as the user's dominant class (a majority vote, the user-level reading of a sample-level
attack).
"""
import glob
import sys

import pandas as pd

ROWS = [  # (row, run-directory name prefix, optimisation steps shown)
    ("user-level, paper's final stage (one denoising from t 100)", "B10_trained_mu0-", "300"),
    ("user-level, final selection among 32 candidates (extension)", "B10_explore_select32_t400-", "300"),
    ("Inverting Gradients (cosine + TV, signed Adam, boxed)", "B10_trained_ig-", "200"),
    ("DLG (L2, L-BFGS, soft labels)", "B10_trained_dlg-", "10 x 20 evaluations"),
]


def load(roots, prefix):
    dirs = sorted(d for r in roots for d in glob.glob(f"{r}/{prefix}*/results.csv"))
    return pd.read_csv(dirs[-1]).drop_duplicates("user").sort_values("user") if dirs else None


def ms(d, c, f=".3g"):
    if c not in d or d[c].isna().all():
        return "-"
    return f"{d[c].mean():{f}} ± {d[c].std():.2g}"


def main(roots):
    print("| method (B = 10, trained victim) | users | steps | label inference | evaluator accuracy (representative) "
          "| all B: share read as the class | all B: most read as the class | PSNR nearest (dB) | SSIM nearest | LPIPS nearest | LPIPS mean "
          "| all B: LPIPS nearest | s/user |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, prefix, steps in ROWS:
        d = load(roots, prefix)
        if d is None:
            continue
        n = len(d)
        labels = int((d.inferred_dominant == d.dominant_class).sum())
        share = ms(d, "all_evaluator_dominant_share", ".2f")
        most = (f"{int((d.all_evaluator_dominant_share > 0.5).sum())}/{n}" if "all_evaluator_dominant_share" in d
                else "-")
        secs = d.seconds + (d.refinish_seconds if "refinish_seconds" in d else 0)
        print(f"| {name} | {n} | {steps} | {labels}/{n} | {int(d.evaluator_correct.sum())}/{n} | {share} | {most} "
              f"| {ms(d, 'psnr_nearest')} | {ms(d, 'ssim_nearest')} | {ms(d, 'lpips_nearest')} | {ms(d, 'lpips_mean')} "
              f"| {ms(d, 'all_lpips_nearest_mean')} | {secs.mean():.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/b10", "runs/bsel", "runs/methods20"])
