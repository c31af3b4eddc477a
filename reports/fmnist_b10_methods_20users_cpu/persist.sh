#!/usr/bin/env bash
# Keep the methods cells' run directories (finished or partial) in git, so that the next session's machine can
# continue them: copies runs/methods20/<name>-*/ to reports/fmnist_b10_methods_20users_cpu/kept_runs/, keeping only
# config.yaml, results.csv and summary.json (a resumed run needs config.yaml and results.csv; the report tables read
# results.csv) and each user's raw.pt / raw.png (the representative image, a few KB): about 10 KB per user, so that
# the repo stays small (the device tool sends the whole working tree, 64 MiB at most). queue_half.sh copies them
# back. Shared with the other CPU queues: scripts/queue_lib.sh. Then `git add` the folder and commit.
#   bash reports/fmnist_b10_methods_20users_cpu/persist.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
source scripts/queue_lib.sh
queue_persist runs/methods20 reports/fmnist_b10_methods_20users_cpu/kept_runs
