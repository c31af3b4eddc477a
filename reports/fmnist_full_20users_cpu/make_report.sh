#!/usr/bin/env bash
# The full-fidelity cells' report, from whatever the queues have finished so far (runs/full20; partial cells count
# their finished users, named under Notes): each half cell's newest run is refinished with the final-selection
# extensions (configs/extension/final_selection_full.yaml: 32 candidates from t_final 600, chosen on these cells'
# B = 10 trained cell; configs/extension/final_selection.yaml: from t_final 400, chosen at 300 steps; seconds per
# user, no optimisation repeated) into a new folder under runs/full20_refinished/, then inversion.report pools the
# halves (--pool-run-names) into one row per cell and final stage (the paper's 'denoise t=100', 'select N=32 t=600'
# and 'select N=32 t=400').
#   bash reports/fmnist_full_20users_cpu/make_report.sh [OUT]    # OUT default: reports/fmnist_full_20users_cpu/report
# OUT is never overwritten (inversion.report picks OUT-1, OUT-2, ... when it exists).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/queue_lib.sh"
queue_init_report runs/full20 reports/fmnist_full_20users_cpu/kept_runs  # on a fresh machine: the kept runs
OUT="${1:-reports/fmnist_full_20users_cpu/report}"
REFINISHED="runs/full20_refinished/$(date +%Y%m%d-%H%M%S)"
runs=()
for cell in B10 B100 B50; do
  for victim in trained random; do
    for first in 0 10; do
      newest=$(queue_newest runs/full20 "${cell}_${victim}_u${first}")
      [[ -n "$newest" && -s "$newest/results.csv" ]] || continue
      runs+=("$newest")
      for ext in final_selection_full final_selection; do  # a run still going: its finished users
        queue_refinish "$newest" --config "configs/extension/$ext.yaml" --logger.backend csv \
          --output.root "$REFINISHED" --trainer.enable_progress_bar false
      done
    done
  done
done
[[ ${#runs[@]} -gt 0 ]] || { echo "no finished users under runs/full20 yet"; exit 1; }
shopt -s nullglob
python -m inversion.report "${runs[@]}" "$REFINISHED"/*/ --pool-run-names --out "$OUT"
