"""The ablation table of README.md from the run directories (pools runs of one row; users matched by id).

    python reports/fmnist_b10_20users_ablations_cpu/table.py runs/abl20 runs/b10
"""
import glob
import sys

import pandas as pd

ROWS = [  # (row, run-directory name prefixes pooled into it)
    ("full attack, U = 1 (the paper's run)", ["B10_trained_mu0-"]),
    ("full attack, U = 5 (rerun: float-rounding noise)", ["B10_trained_full_U5_first5-", "B10_trained_full_U5_users5to19-"]),
    ("no prior", ["B10_trained_no_prior-"]),
    ("no layer window", ["B10_trained_no_window-"]),
    ("no t annealing (t ~ U[20, 800])", ["B10_trained_no_anneal-"]),
    ("no dynamic clipping", ["B10_trained_no_clipping-"]),
    ("no final denoising (raw image)", ["B10_trained_no_denoise-"]),
    ("Gaussian DP, clip 1, sigma 0.01", ["B10_trained_dp0.01-"]),
    ("Gaussian DP, clip 1, sigma 0.1", ["B10_trained_dp0.1-"]),
]


def load(roots, prefixes):
    frames = []
    for p in prefixes:
        dirs = sorted(d for r in roots for d in glob.glob(f"{r}/{p}*/results.csv"))
        frames += [pd.read_csv(d) for d in dirs[-1:]]  # the newest run of that name
    return pd.concat(frames).drop_duplicates("user").sort_values("user") if frames else None


def main(roots):
    ref = load(roots, ROWS[0][1]).set_index("user")
    print("| configuration | users | label inference | evaluator accuracy | raw image | class differs from U = 1 run | PSNR nearest (dB) "
          "| SSIM nearest | LPIPS nearest | LPIPS mean | s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, prefixes in ROWS:
        df = load(roots, prefixes)
        if df is None:
            continue
        d = df.set_index("user")
        common = d.index.intersection(ref.index)
        differs = int((d.loc[common, "evaluator_class"] != ref.loc[common, "evaluator_class"]).sum())
        ms = lambda c: f"{d[c].mean():.3g} ± {d[c].std():.2g}"
        labels = int((d.inferred_dominant == d.dominant_class).sum())
        print(f"| {name} | {len(d)} | {labels}/{len(d)} | {int(d.evaluator_correct.sum())}/{len(d)} | {int(d.evaluator_correct_raw.sum())}/{len(d)} "
              f"| {differs}/{len(common)} | {ms('psnr_nearest')} | {ms('ssim_nearest')} | {ms('lpips_nearest')} "
              f"| {ms('lpips_mean')} | {d.seconds_per_step.mean():.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/abl20", "runs/b10"])
