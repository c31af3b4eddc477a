"""The ablation table of README.md from the run directories (pools runs of one row; users matched by id).

    python reports/fmnist_b10_20users_ablations_cpu/table.py runs/abl20 runs/b10

Each row pools the newest run of each of its names (inversion.report.pool_newest_runs); "class differs" counts
the users whose evaluator class differs from the first row's run (inversion.report.changed_count).
"""
import sys

from inversion.report import changed_count, count_cell, label_hits, mean_std_cell, pool_newest_runs

ROWS = [  # (row, run names (output.name) pooled into it)
    ("full attack, U = 1 (the paper's run)", ["B10_trained_mu0"]),
    ("full attack, U = 5 (rerun: float-rounding noise)", ["B10_trained_full_U5_first5", "B10_trained_full_U5_users5to19"]),
    ("no prior", ["B10_trained_no_prior"]),
    ("no layer window", ["B10_trained_no_window"]),
    ("no t annealing (t ~ U[20, 800])", ["B10_trained_no_anneal"]),
    ("no dynamic clipping", ["B10_trained_no_clipping"]),
    ("no final denoising (raw image)", ["B10_trained_no_denoise"]),
    ("Gaussian DP, clip 1, sigma 0.01", ["B10_trained_dp0.01"]),
    ("Gaussian DP, clip 1, sigma 0.1", ["B10_trained_dp0.1"]),
]


def main(roots):
    ref = pool_newest_runs(roots, ROWS[0][1])
    print("| configuration | users | label inference | evaluator accuracy | raw image | class differs from U = 1 run | PSNR nearest (dB) "
          "| SSIM nearest | LPIPS nearest | LPIPS mean | s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, names in ROWS:
        d = pool_newest_runs(roots, names)
        if d is None:
            continue
        changed = "{}/{}".format(*changed_count(d, ref)) if ref is not None else "-"  # no U = 1 run: '-'
        print(f"| {name} | {len(d)} | {count_cell(label_hits(d))} | {count_cell(d.evaluator_correct)} "
              f"| {count_cell(d.evaluator_correct_raw)} | {changed} | {mean_std_cell(d.psnr_nearest)} | {mean_std_cell(d.ssim_nearest)} "
              f"| {mean_std_cell(d.lpips_nearest)} | {mean_std_cell(d.lpips_mean)} | {d.seconds_per_step.mean():.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/abl20", "runs/b10"])
