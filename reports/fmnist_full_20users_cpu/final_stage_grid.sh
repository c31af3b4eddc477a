#!/usr/bin/env bash
# Final stages compared on the full-fidelity cells' optimised images (no optimisation repeated: scripts/refinish.py
# reruns only the final stage, ~1-15 s per user on a CPU core). Each half cell's newest run under runs/full20 whose
# name matches CELL (default B10_trained) is refinished with every setting below into runs/full20_grid/<time>/, then
# inversion.report pools the halves into one row per final stage.
#   bash reports/fmnist_full_20users_cpu/final_stage_grid.sh [CELL] [OUT]
# OUT default: reports/fmnist_full_20users_cpu/grid_<CELL> (never overwritten: the report picks OUT-1, ... if it exists).
# Settings: the final-selection extension's (N 32, t_final 400, mu_sel 1) with a larger t_final (more of the image
# redrawn by the prior: more varied candidates), more candidates, and the score's output term weighted 0 / 1 / 3.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/queue_lib.sh"
queue_init_report runs/full20 reports/fmnist_full_20users_cpu/kept_runs  # on a fresh machine: the kept runs
CELL="${1:-B10_trained}"
OUT="${2:-reports/fmnist_full_20users_cpu/grid_$CELL}"
GRID="runs/full20_grid/$(date +%Y%m%d-%H%M%S)"
SETTINGS=(  # N t_final mu_sel
  "1 100 1" "32 400 1" "32 600 1" "32 800 1" "64 400 1" "64 600 1" "32 600 0" "32 400 3" "32 600 3"
)
runs=()
for first in 0 10; do
  newest=$(queue_newest runs/full20 "${CELL}_u${first}")
  [[ -n "$newest" && -s "$newest/results.csv" ]] || continue
  runs+=("$newest")
done
[[ ${#runs[@]} -gt 0 ]] || { echo "no finished users of $CELL under runs/full20 yet"; exit 1; }
for run in "${runs[@]}"; do
  for s in "${SETTINGS[@]}"; do
    read -r n t mu <<<"$s"
    queue_refinish "$run" --config configs/extension/final_selection.yaml \
      --attack.init_args.final_candidates "$n" --attack.init_args.t_final "$t" \
      --attack.init_args.selection_output_weight "$mu" --output.name "grid_N${n}_t${t}_mu${mu}" \
      --logger.backend csv --output.root "$GRID" --trainer.enable_progress_bar false
  done
done
shopt -s nullglob
done_runs=("$GRID"/*/)
[[ ${#done_runs[@]} -gt 0 ]] || { echo "no refinished run under $GRID"; exit 1; }
python -m inversion.report "${done_runs[@]}" --pool-run-names --out "$OUT"
