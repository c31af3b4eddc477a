#!/usr/bin/env bash
# Keep the full-fidelity cells' run directories (finished or partial) in git so that the next session's machine can
# continue them (queue_half.sh copies them back): see scripts/queue_lib.sh (queue_persist). Then commit kept_runs/.
#   bash reports/fmnist_full_20users_cpu/persist.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/queue_lib.sh
queue_persist runs/full20 reports/fmnist_full_20users_cpu/kept_runs
