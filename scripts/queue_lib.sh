# Shared by the CPU queues that run a report's cells across sessions on a 2-core machine, one half of the users per
# core (reports/*/queue_half.sh) and keep partial run directories in git (reports/*/persist.sh). Source it, then:
#   queue_init OUT KEPT         cd to the repository, activate .venv, one thread per process, offline hub and W&B;
#                               set QUEUE_OUT=OUT and copy back the kept runs (queue_restore OUT KEPT)
#   queue_restore OUT KEPT      copy committed run directories from KEPT back to OUT where OUT lacks them
#   queue_run_cell NAME ARGS..  run attack.py "${QUEUE_COMMON[@]}" ARGS.. --output.name NAME under $QUEUE_OUT:
#                               --resume the newest OUT/NAME-* run when there is one (attack.py checks its config is
#                               this one and says "nothing to resume" when it is finished), else start a new run; a
#                               run that diverged is not retried (it would diverge again): one line says so
#   queue_refinish RUN ARGS..   scripts/refinish.py RUN ARGS..; only its "incomplete" exit (1) lets the caller go on
#   queue_persist OUT KEPT      copy OUT/*-2*/ to KEPT, keeping config.yaml, results.csv, summary.json, models.json,
#                               attack_seed.txt, defense_seeds.txt, each user's raw.pt, raw.png, denoised.png, grid.png
#                               (~18 KB per user) and the mid-user checkpoint of a user in progress
#                               (checkpoints/<user>/last.ckpt: the dummy image and Adam's state, ~50 KB; attack.py deletes
#                               a user's checkpoint when the user finishes), so the next session resumes that user at its
#                               last checkpoint (--checkpoint_every) instead of restarting it
# Stopping: `kill PID` (SIGTERM) of the queue's bash sends SIGTERM to the running attack.py, which stops as on
# Ctrl-C (status "interrupted"; finished users and checkpoints kept), and the queue exits (130) without starting
# another cell; so do SIGINT (Ctrl-C in a terminal) and SIGHUP where the queue does not ignore them (`nohup ... &`
# from a script starts it with both ignored: use SIGTERM). attack.py runs in its own process group, so a terminal's
# Ctrl-C reaches it once, through the queue; a SIGKILL of the queue leaves it running. The trap is set by the
# first queue_run_cell (persist.sh and queue_restore keep the default: a signal just ends them).

QUEUE_CHILD=""
QUEUE_STOPPED=""
queue_stop() {
  QUEUE_STOPPED=1
  if [[ -n "$QUEUE_CHILD" ]]; then kill -TERM "$QUEUE_CHILD" 2>/dev/null; fi
}

queue_attack() {  # python attack.py ARGS.. as a child that a signal to the queue stops cleanly; its exit status
  if [[ -n "$QUEUE_STOPPED" ]]; then echo "[queue] stopped ($(date))"; exit 130; fi
  # A script's background child starts with SIGINT ignored, and Python then never raises KeyboardInterrupt: reset
  # it (for a Ctrl-C or kill -INT sent to attack.py itself), and give attack.py its own process group.
  python -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.setpgid(0, 0); os.execvp(sys.argv[1], sys.argv[1:])' \
    python attack.py "$@" &
  QUEUE_CHILD=$!
  if [[ -n "$QUEUE_STOPPED" ]]; then kill -TERM "$QUEUE_CHILD" 2>/dev/null; fi  # a signal just before $! was set
  local rc
  wait "$QUEUE_CHILD"; rc=$?
  while (( rc > 128 )) && kill -0 "$QUEUE_CHILD" 2>/dev/null; do  # wait ended early by a trapped signal
    wait "$QUEUE_CHILD"; rc=$?
  done
  QUEUE_CHILD=""
  if [[ -n "$QUEUE_STOPPED" ]]; then echo "[queue] stopped ($(date))"; exit 130; fi
  return "$rc"
}

QUEUE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
queue_init() {
  cd "$QUEUE_ROOT"
  source .venv/bin/activate
  export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
  QUEUE_OUT="$1"
  queue_restore "$1" "$2"
}

queue_init_report() {  # queue_init OUT KEPT for a report script: keeps the caller's OMP_NUM_THREADS (default 1)
  local threads="${OMP_NUM_THREADS:-1}"
  queue_init "$@"
  export OMP_NUM_THREADS="$threads"
}

queue_refinish() {  # python scripts/refinish.py RUN ARGS..: a run still going ('incomplete', exit 1) is refinished
  # for its finished users and the caller goes on; any other failure (a config error: 2, Ctrl-C: 130) ends the caller
  python scripts/refinish.py "$@" || { local rc=$?; ((rc == 1)) || exit $rc; }
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
  trap queue_stop INT TERM HUP
  local name="$1"; shift
  local newest status
  newest=$(queue_newest "$QUEUE_OUT" "$name")
  if [[ -n "$newest" ]]; then
    status=$(python -c "from inversion.fsutils import run_status; import sys; print(run_status(sys.argv[1]) or '')" "$newest" 2>/dev/null)
    if [[ "$status" == diverged* ]]; then
      echo "[queue] $name: $status ($newest); not retried: move that directory aside to run the cell again"
      return 0
    fi
    echo "[queue] $name: ${status:-unfinished} ($newest): attack.py --resume ($(date))"
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
for img in sorted([p for name in ("raw.png", "raw.pt", "denoised.png", "grid.png") for p in src.glob(f"users/*/{name}")]
                  + list(src.glob("checkpoints/*/last.ckpt"))):
    (dst / img.parent.relative_to(src)).mkdir(parents=True, exist_ok=True)
    shutil.copy2(img, dst / img.relative_to(src))
PY
    chmod 755 "$tmp/$name"
    rm -rf "$kept/$name.old"; [[ -e "$kept/$name" ]] && mv "$kept/$name" "$kept/$name.old"
    mv "$tmp/$name" "$kept/$name" && rm -rf "$kept/$name.old" "$tmp"
    echo "kept $kept/$name ($(($(wc -l 2>/dev/null < "$kept/$name/results.csv" || echo 1) - 1)) users)"
  done
}
