#!/usr/bin/env bash
# The methods table's baseline cells at B = 50 and 100 on one CPU core, for one half of the 20 users:
#   mkdir -p runs/methods20
#   nohup bash reports/fmnist_b10_methods_20users_cpu/queue_half.sh 0  > runs/methods20/queue_u0.log  2>&1 &
#   nohup bash reports/fmnist_b10_methods_20users_cpu/queue_half.sh 10 > runs/methods20/queue_u10.log 2>&1 &
# Cells in order: DLG B = 50, IG B = 100, DLG B = 100 (10 users each, first_user 0 or 10). Each cell's newest run
# directory (runs/methods20/<name>-*) is continued with attack.py --resume (it checks the config, skips finished
# users, says "nothing to resume" for a finished run); otherwise a new run starts. `kill PID` stops it cleanly;
# safe to restart. Run directories also come back from kept_runs/ (see persist.sh and scripts/queue_lib.sh).
set -uo pipefail
FIRST="${1:?usage: queue_half.sh FIRST_USER (0 or 10)}"
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/queue_lib.sh"
queue_init runs/methods20 reports/fmnist_b10_methods_20users_cpu/kept_runs
QUEUE_COMMON=(--config configs/attack/fashion_mnist.yaml --users.init_args.num_users 10
              --users.init_args.first_user "$FIRST"
              --logger.backend csv --trainer.enable_progress_bar false --output.root "$QUEUE_OUT")
ig=(--config configs/sweep/parts/inverting_gradients_200.yaml --attack.init_args.steps 200)
dlg=(--config configs/method/dlg.yaml --attack.init_args.steps 10)

# IG B = 50 finished on 2026-11-30 (its figures are in README.md here; its run directories were not kept)
queue_run_cell "B50_trained_dlg_u$FIRST" --users.init_args.batch_size 50 "${dlg[@]}"
queue_run_cell "B100_trained_ig_u$FIRST" --users.init_args.batch_size 100 "${ig[@]}"
queue_run_cell "B100_trained_dlg_u$FIRST" --users.init_args.batch_size 100 "${dlg[@]}"
echo "[queue] done ($(date))"
