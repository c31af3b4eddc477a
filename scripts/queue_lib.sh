# Shared by the CPU queues that run a report's cells across sessions on a 2-core machine, one half of the users per
# core (reports/*/queue_half.sh) and keep partial run directories in git (reports/*/persist.sh). Source it, then:
#   queue_restore OUT KEPT      copy committed run directories from KEPT back to OUT where OUT lacks them
#   queue_run_cell NAME ARGS..  run attack.py "${QUEUE_COMMON[@]}" ARGS.. --output.name NAME under $QUEUE_OUT:
#                               --resume the newest OUT/NAME-* run when there is one (attack.py checks its config is
#                               this one and says "nothing to resume" when it is finished), else start a new run; a
#                               run that diverged is not retried (it would diverge again): one line says so
#   queue_persist OUT KEPT      copy OUT/*-2*/ to KEPT, keeping config.yaml, results.csv, summary.json, models.json,
#                               attack_seed.txt, defense_seeds.txt and each user's raw.pt, raw.png, denoised.png, grid.png
#                               (~15 KB per user; no checkpoints)
# Stopping: a SIGINT, SIGTERM or SIGHUP to the queue's bash (`kill PID`, Ctrl-C) sends SIGINT to the running
# attack.py, which stops as on Ctrl-C (finished users and checkpoints kept), and the queue exits (130) without
# starting the next cell. attack.py runs in its own process group (a SIGKILL of the queue leaves it running). Every step is safe to restart: a resume skips finished users and continues a user from its last
# checkpoint when the run wrote them (--checkpoint_every).

QUEUE_CHILD=""
QUEUE_STOPPED=""
queue_stop() {
  QUEUE_STOPPED=1
  if [[ -n "$QUEUE_CHILD" ]]; then kill -INT "$QUEUE_CHILD" 2>/dev/null; fi
}
trap queue_stop INT TERM HUP

queue_attack() {  # python attack.py ARGS.. as a child that a signal to the queue stops cleanly; its exit status
  # A script's background child starts with SIGINT ignored, and Python then never raises KeyboardInterrupt: reset
  # it before exec'ing attack.py. Its own process group: a Ctrl-C in a terminal reaches the queue only, which
  # forwards one SIGINT (a second one, straight from the terminal, would cut Lightning's graceful stop short).
  python -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.setpgid(0, 0); os.execvp(sys.argv[1], sys.argv[1:])' \
    python attack.py "$@" &
  QUEUE_CHILD=$!
  local rc
  while :; do  # wait returns early (> 128) when a trapped signal arrives: wait again until the child has ended
    wait "$QUEUE_CHILD"; rc=$?
    kill -0 "$QUEUE_CHILD" 2>/dev/null || break
  done
  QUEUE_CHILD=""
  if [[ -n "$QUEUE_STOPPED" ]]; then echo "[queue] stopped ($(date))"; exit 130; fi
  return "$rc"
}

queue_newest() {  # the newest run directory OUT/NAME-2*, not a persist leftover (*.old)
  local d newest=""
  for d in "$1/$2"-2*/; do
    [[ -d "$d" && "$d" != *.old/ ]] && newest="${d%/}"
  done
  echo "$newest"
}

queue_restore() {
  local out="$1" kept="$2" d
  mkdir -p "$out"
  [[ -d "$kept" ]] || return 0
  for d in "$kept"/*/; do
    [[ -d "$d" && "$d" != *.old/ ]] || continue
    [[ -e "$out/$(basename "$d")" ]] || cp -r "$d" "$out/"
  done
}

queue_run_cell() {
  local name="$1"; shift
  local newest status
  newest=$(queue_newest "$QUEUE_OUT" "$name")
  if [[ -n "$newest" ]]; then
    status=$(python -c "from inversion.fsutils import run_status; import sys; print(run_status(sys.argv[1]) or '')" "$newest" 2>/dev/null)
    if [[ "$status" == diverged* ]]; then
      echo "[queue] $name: $status ($newest); not retried: move that directory aside to run the cell again"
      return 0
    fi
    echo "[queue] $name: ${status:-unfinished}, resuming $newest ($(date))"
    queue_attack "${QUEUE_COMMON[@]}" "$@" --output.name "$name" --resume "$newest"
  else
    echo "[queue] $name: new run ($(date))"
    queue_attack "${QUEUE_COMMON[@]}" "$@" --output.name "$name"
  fi
}

queue_persist() {
  local out="$1" kept="$2" d name tmp
  mkdir -p "$kept"
  for d in "$out"/*-2*/; do
    [[ -f "$d/config.yaml" && "$d" != *.old/ ]] || continue
    name=$(basename "$d")
    tmp=$(mktemp -d "$kept/.tmp-XXXXXX")
    python3 - "$d" "$tmp/$name" <<'PY'
import shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True)
for f in ("config.yaml", "results.csv", "summary.json", "models.json", "attack_seed.txt", "defense_seeds.txt"):
    if (src / f).is_file():
        shutil.copy2(src / f, dst / f)
for img in sorted(p for name in ("raw.png", "raw.pt", "denoised.png", "grid.png") for p in src.glob(f"users/*/{name}")):
    (dst / img.parent.relative_to(src)).mkdir(parents=True, exist_ok=True)
    shutil.copy2(img, dst / img.relative_to(src))
PY
    chmod 755 "$tmp/$name"
    rm -rf "$kept/$name.old"; [[ -e "$kept/$name" ]] && mv "$kept/$name" "$kept/$name.old"
    mv "$tmp/$name" "$kept/$name" && rm -rf "$kept/$name.old" "$tmp"
    echo "kept $kept/$name ($(($(wc -l 2>/dev/null < "$kept/$name/results.csv" || echo 1) - 1)) users)"
  done
}
