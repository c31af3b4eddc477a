#!/usr/bin/env bash
# The attack issue's bars at full fidelity (configs/attack/fashion_mnist_full.yaml: 4,000 steps) on one CPU core,
# for one half of the 20 users, continued across sessions:
#   nohup bash reports/fmnist_full_20users_cpu/queue_half.sh 0  > runs/full20/queue_u0.log  2>&1 &
#   nohup bash reports/fmnist_full_20users_cpu/queue_half.sh 10 > runs/full20/queue_u10.log 2>&1 &
# ~0.42 s per step on a free core: ~28 minutes per user, ~4.7 hours per half cell. Cells in order (the headline
# first): B = 10 trained victim, B = 100 trained, B = 50 trained, then the random victim at B = 10, 100, 50.
# Each cell checkpoints every 500 steps; killing the queue loses at most that much of one user. Before a session
# ends: kill the queues, `bash reports/fmnist_full_20users_cpu/persist.sh`, commit kept_runs/ (the next machine
# copies them back and resumes; a user in progress restarts there, as checkpoints are not kept in git).
set -uo pipefail
FIRST="${1:?usage: queue_half.sh FIRST_USER (0 or 10)}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source .venv/bin/activate
source scripts/queue_lib.sh
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
QUEUE_OUT=runs/full20
queue_restore "$QUEUE_OUT" reports/fmnist_full_20users_cpu/kept_runs
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
