#!/usr/bin/env bash
# Keep the methods cells' run directories (finished or partial) in git, so that the next session's machine can
# continue them: copies runs/methods20/<name>-*/ to reports/fmnist_b10_methods_20users_cpu/kept_runs/, keeping only
# config.yaml, results.csv and summary.json (a resumed run needs config.yaml and results.csv; the report tables read
# results.csv) and each user's raw.png (the representative image, ~3 KB): about 10 KB per user, so that the repo
# stays small (the device tool sends the whole working tree, 64 MiB at most). queue_half.sh copies them back.
# Then `git add` the folder and commit.
#   bash reports/fmnist_b10_methods_20users_cpu/persist.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
KEPT=reports/fmnist_b10_methods_20users_cpu/kept_runs
mkdir -p "$KEPT"
for d in runs/methods20/*-2*/; do
  [[ -f "$d/config.yaml" ]] || continue
  name=$(basename "$d")
  tmp=$(mktemp -d "$KEPT/.tmp-XXXXXX")
  python3 - "$d" "$tmp/$name" <<'PY'
import shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True)
for f in ("config.yaml", "results.csv", "summary.json", "models.json", "attack_seed.txt"):
    if (src / f).is_file():
        shutil.copy2(src / f, dst / f)
for png in sorted(src.glob("users/*/raw.png")):
    (dst / png.parent.relative_to(src)).mkdir(parents=True, exist_ok=True)
    shutil.copy2(png, dst / png.relative_to(src))
PY
  chmod 755 "$tmp/$name"
  rm -rf "$KEPT/$name.old"; [[ -e "$KEPT/$name" ]] && mv "$KEPT/$name" "$KEPT/$name.old"
  mv "$tmp/$name" "$KEPT/$name" && rm -rf "$KEPT/$name.old" "$tmp"
  echo "kept $KEPT/$name ($(($(wc -l < "$KEPT/$name/results.csv" 2>/dev/null || echo 1) - 1)) users)"
done
