#!/usr/bin/env bash
# Keep the methods cells' run directories (finished or partial) in git, so that the next session's machine can
# continue them: copies runs/methods20/<name>-*/ to reports/fmnist_b10_methods_20users_cpu/runs/ without Lightning's
# folders and mid-user checkpoints (results.csv, config.yaml, summary.json and the per-user images stay; a resumed
# run needs only config.yaml and results.csv). queue_half.sh copies them back. Then `git add` the folder and commit.
#   bash reports/fmnist_b10_methods_20users_cpu/persist.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
KEPT=reports/fmnist_b10_methods_20users_cpu/runs
mkdir -p "$KEPT"
for d in runs/methods20/*-2*/; do
  [[ -f "$d/config.yaml" ]] || continue
  name=$(basename "$d")
  tmp=$(mktemp -d "$KEPT/.tmp-XXXXXX")
  python3 -c "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2], ignore=shutil.ignore_patterns('lightning', 'checkpoints', 'wandb'))" "$d" "$tmp/$name"
  chmod 755 "$tmp/$name"
  rm -rf "$KEPT/$name.old"; [[ -e "$KEPT/$name" ]] && mv "$KEPT/$name" "$KEPT/$name.old"
  mv "$tmp/$name" "$KEPT/$name" && rm -rf "$KEPT/$name.old" "$tmp"
  echo "kept $KEPT/$name ($(($(wc -l < "$KEPT/$name/results.csv" 2>/dev/null || echo 1) - 1)) users)"
done
