# Shared by the CPU queues that run a report's cells across sessions on a 2-core machine, one half of the users per
# core (reports/*/queue_half.sh) and keep partial run directories in git (reports/*/persist.sh). Source it, then:
#   queue_restore OUT KEPT      copy committed run directories from KEPT back to OUT where OUT lacks them
#   queue_run_cell NAME ARGS..  run attack.py "${QUEUE_COMMON[@]}" ARGS.. --output.name NAME under $QUEUE_OUT: skip
#                               when the newest OUT/NAME-* run says "finished", --resume it when unfinished, else start
#   queue_persist OUT KEPT      copy OUT/*-2*/ to KEPT, keeping config.yaml, results.csv, summary.json, models.json,
#                               attack_seed.txt and each user's raw.pt / raw.png (~10 KB per user; no checkpoints)
# Every step is safe to kill and restart: attack.py --resume skips finished users and continues a user from its
# last checkpoint when the run wrote them (--checkpoint_every).

queue_restore() {
  local out="$1" kept="$2" d
  mkdir -p "$out"
  [[ -d "$kept" ]] || return 0
  for d in "$kept"/*/; do
    [[ -d "$d" ]] || continue
    [[ -e "$out/$(basename "$d")" ]] || cp -r "$d" "$out/"
  done
}

queue_run_cell() {
  local name="$1"; shift
  local newest status
  newest=$(ls -d "$QUEUE_OUT/$name"-2* 2>/dev/null | sort | tail -n 1)
  if [[ -n "$newest" ]]; then
    status=$(python -c "from inversion.fsutils import run_status; import sys; print(run_status(sys.argv[1]) or '')" "$newest" 2>/dev/null)
    if [[ "$status" == finished ]]; then echo "[queue] $name: finished ($newest)"; return 0; fi
    echo "[queue] $name: continuing $newest ($(date))"
    python attack.py "${QUEUE_COMMON[@]}" "$@" --output.name "$name" --resume "$newest"
  else
    echo "[queue] $name: new run ($(date))"
    python attack.py "${QUEUE_COMMON[@]}" "$@" --output.name "$name"
  fi
}

queue_persist() {
  local out="$1" kept="$2" d name tmp
  mkdir -p "$kept"
  for d in "$out"/*-2*/; do
    [[ -f "$d/config.yaml" ]] || continue
    name=$(basename "$d")
    tmp=$(mktemp -d "$kept/.tmp-XXXXXX")
    python3 - "$d" "$tmp/$name" <<'PY'
import shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True)
for f in ("config.yaml", "results.csv", "summary.json", "models.json", "attack_seed.txt"):
    if (src / f).is_file():
        shutil.copy2(src / f, dst / f)
for img in sorted([*src.glob("users/*/raw.png"), *src.glob("users/*/raw.pt")]):
    (dst / img.parent.relative_to(src)).mkdir(parents=True, exist_ok=True)
    shutil.copy2(img, dst / img.relative_to(src))
PY
    chmod 755 "$tmp/$name"
    rm -rf "$kept/$name.old"; [[ -e "$kept/$name" ]] && mv "$kept/$name" "$kept/$name.old"
    mv "$tmp/$name" "$kept/$name" && rm -rf "$kept/$name.old" "$tmp"
    echo "kept $kept/$name ($(($(wc -l 2>/dev/null < "$kept/$name/results.csv" || echo 1) - 1)) users)"
  done
}
