#!/usr/bin/env bash
# The attack issue's bars at full fidelity (configs/attack/fashion_mnist_full.yaml: 4,000 steps) on one CPU core,
# for one half of the 20 users, continued across sessions:
#   mkdir -p runs/full20
#   nohup bash reports/fmnist_full_20users_cpu/queue_half.sh 0  > runs/full20/queue_u0.log  2>&1 &
#   nohup bash reports/fmnist_full_20users_cpu/queue_half.sh 10 > runs/full20/queue_u10.log 2>&1 &
# 0.25 s per step with one half per core of a 2-core machine: ~16.5 minutes per user, ~2.8 hours per cell. Cells in
# order: the bar's (trained victim) B = 10, 100, 50, then the random victim's B = 10, 100, 50 (B = 10 random was
# started second before session 21 moved the trained cells first: its partial run is resumed when its turn comes).
# Each cell checkpoints every 500 steps and is continued with attack.py --resume (scripts/queue_lib.sh).
# Before the machine goes away: `kill PID` of each queue (its attack.py stops 'interrupted'), then
# `bash reports/fmnist_full_20users_cpu/persist.sh` and commit kept_runs/ (the next machine copies them back; a user
# in progress there restarts, as checkpoints are not kept in git).
set -uo pipefail
FIRST="${1:?usage: queue_half.sh FIRST_USER (0 or 10)}"
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/queue_lib.sh"
queue_init runs/full20 reports/fmnist_full_20users_cpu/kept_runs
QUEUE_COMMON=(--config configs/attack/fashion_mnist_full.yaml --users.init_args.num_users 10
              --users.init_args.first_user "$FIRST" --checkpoint_every 500
              --logger.backend csv --trainer.enable_progress_bar false --output.root "$QUEUE_OUT")
for victim in trained random; do
  random_init=false; [[ $victim == random ]] && random_init=true
  for b in 10 100 50; do
    queue_run_cell "B${b}_${victim}_u$FIRST" --users.init_args.batch_size "$b" --victim.random_init "$random_init"
  done
done
echo "[queue] done ($(date))"
