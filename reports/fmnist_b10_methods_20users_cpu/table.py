"""The methods tables (20 users; one table per B with runs) from the run directories; users matched by id.

    python reports/fmnist_b10_methods_20users_cpu/table.py runs/b10 runs/bsel runs/methods20

Baselines reconstruct B images per user. "Representative" is the image a method reports: the user-level attack's
final image, a baseline's reconstruction that best matches the target gradient (attack.py's ``representative``).
"All B" columns average over every reconstruction of a baseline: the share the evaluator reads as the user's
dominant class (``all_evaluator_dominant_share``) and each image's LPIPS to its nearest batch image
(``all_lpips_nearest_mean``); "most read as the class": users for whom more than half of the B
reconstructions are read as the user's dominant class (a majority vote, the user-level reading of a sample-level
attack). "Paired with the paper's stage": on the same users, both / this row only / the paper's stage only read as
the class (inversion.report.paired_counts).
"""
import sys

from inversion.report import count_cell, label_hits, mean_std_cell, paired_counts, pool_newest_runs

ROWS = [  # (row, run names (output.name) pooled into it per B, optimisation steps shown)
    ("user-level, paper's final stage (one denoising from t 100)",
     {10: ["B10_trained_mu0"], 50: ["B50_trained_paper_refinished"], 100: ["B100_trained_paper_refinished"]}, "300"),
    ("user-level, final selection among 32 candidates (extension)",
     {10: ["B10_explore_select32_t400"], 50: ["B50_explore_select32_t400"],
      100: ["B100_trained_select32_t400_refinished"]}, "300"),
    ("Inverting Gradients (cosine + TV, signed Adam, boxed)",
     {10: ["B10_trained_ig"], 50: ["B50_trained_ig_u0", "B50_trained_ig_u10"],
      100: ["B100_trained_ig_u0", "B100_trained_ig_u10"]}, "200"),
    ("DLG (L2, L-BFGS, soft labels)",
     {10: ["B10_trained_dlg"], 50: ["B50_trained_dlg_u0", "B50_trained_dlg_u10"],
      100: ["B100_trained_dlg_u0", "B100_trained_dlg_u10"]}, "10 x 20 evaluations"),
]


def main(roots, bs=(10, 50, 100)):
    """One table per B that has any of the rows' runs (users of a baseline's parts pooled); the paired column needs
    the paper's-stage run of that B ('-' without it: the 2026-11-30 run directories were not kept)."""
    for b in bs:
        ref = pool_newest_runs(roots, ROWS[0][1][b])
        if all(pool_newest_runs(roots, names[b]) is None for _, names, _ in ROWS):
            continue
        print(f"| method (B = {b}, trained victim) | users | steps | label inference | evaluator accuracy (representative) "
              "| paired with the paper's stage: both / this only / paper only "
              "| all B: share read as the class | all B: most read as the class | PSNR nearest (dB) | SSIM nearest | LPIPS nearest | LPIPS mean "
              "| all B: LPIPS nearest | s/user |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for i, (name, names, steps) in enumerate(ROWS):
            d = pool_newest_runs(roots, names[b])
            if d is None:
                continue
            p = paired_counts(d, ref) if i and ref is not None else None
            paired = f"{p['both']} / {p['a_only']} / {p['b_only']}" if p else "-"
            share = most = "-"
            if "all_evaluator_dominant_share" in d:
                share = mean_std_cell(d.all_evaluator_dominant_share, ".2f")
                most = count_cell((d.all_evaluator_dominant_share > 0.5).where(d.all_evaluator_dominant_share.notna()))
            secs = d.seconds + (d.refinish_seconds if "refinish_seconds" in d else 0)
            print(f"| {name} | {len(d)} | {steps} | {count_cell(label_hits(d))} | {count_cell(d.evaluator_correct)} "
                  f"| {paired} | {share} | {most} | {mean_std_cell(d.psnr_nearest)} | {mean_std_cell(d.ssim_nearest)} "
                  f"| {mean_std_cell(d.lpips_nearest)} | {mean_std_cell(d.lpips_mean)} "
                  f"| {mean_std_cell(d.get('all_lpips_nearest_mean'))} | {secs.mean():.0f} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/b10", "runs/bsel", "runs/methods20"])
