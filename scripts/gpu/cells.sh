#!/usr/bin/env bash
# Device side (one GPU, 16 CPU cores): benchmark cells that a CPU session cannot finish, all at once as parallel
# processes, then one small tarball of their results in $OUT. Prepare here first with
# `bash scripts/gpu/prepare_device.sh`, then call the device tool with BUDGET_S equal to its timeout_s, e.g.
#   run(command="BUDGET_S=540 bash scripts/gpu/cells.sh", carry=[".whl", ".devdata"], timeout_s=540)
#   run(command="BUDGET_S=540 CELLS='full:10 full:100' USERS=8 bash scripts/gpu/cells.sh", ...)
# and unpack here: `mkdir -p runs/gpu && tar xzf <files_at>/cells.tar.gz -C runs/gpu`.
# Methods (CELLS="method:B ..."):
#   dlg, ig        the methods table's baselines (reports/fmnist_b10_methods_20users_cpu/: same users, settings and
#                  run names as queue_half.sh there; `table.py runs/b10 runs/bsel runs/gpu` reads them)
#   full, fullrand the attack issue's bars: configs/attack/fashion_mnist_full.yaml (4,000 steps, the paper's final
#                  stage) with the shipped or a randomly initialised victim, bf16-mixed, all USERS of a process in
#                  one batched optimisation (UPS; a chunk's users finish together, so a chunk cut by the deadline
#                  is lost); the final-selection extension is applied here afterwards by
#                  `python scripts/refinish.py RUN_DIR --config configs/extension/final_selection_full.yaml`
# Settings by environment (defaults = the methods table's remaining cells):
#   CELLS="ig:100 dlg:100"          FIRST_USERS="0 10"  USERS=10  UPS=USERS (full cells)
#   BUDGET_S=540                     the device call's limit: the attacks are interrupted (finished users kept)
#                                    so that the tarball is written before it (LIMIT_S overrides the attacks' time).
#                                    The tool lowers a call's limit to the device time left (status: budget_left_s,
#                                    less the start-up of a cold machine): pass min(timeout_s, that), not always 540.
#                                    A chunk of UPS users is one optimisation and counts only when it finishes: at
#                                    4,000 steps it needs 4000 x (s/step at that U) < LIMIT_S, or it comes back empty.
#   ACCEL=gpu  EXTRA=""              trainer accelerator; extra attack.py arguments (a CPU smoke test:
#                                    ACCEL=cpu USERS=1 FIRST_USERS=0 CELLS=dlg:10 EXTRA="--attack.init_args.steps 1")
#   SKIP_WHEELS=1                    use the installed packages (no .whl install)
# The tarball (config, results, summary, partial rows, each user's raw/denoised/grid PNGs and raw.pt; no logged
# images, checkpoints or batches) is refreshed every 60 s, so a call cut short still returns what finished. The exit
# status is 1 when the preflight fails or every attack process failed; failing logs' tails are printed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [[ -z "${SKIP_WHEELS:-}" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: run scripts/gpu/prepare_device.sh here and carry .whl" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
fi
PY="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TORCH_HOME="$PWD/.devdata/torch"
OUTDIR="${OUT:-/tmp/cells_out}"; mkdir -p "$OUTDIR"
RUNS="$(mktemp -d /tmp/cells.XXXXXX)"
CELLS="${CELLS:-ig:100 dlg:100}"; FIRST_USERS="${FIRST_USERS:-0 10}"; USERS="${USERS:-10}"
ACCEL="${ACCEL:-gpu}"; UPS="${UPS:-$USERS}"; EXTRA="${EXTRA:-}"; BUDGET_S="${BUDGET_S:-540}"
[[ -f .devdata/fashion-mnist/t10k-images-idx3-ubyte.gz ]] || { echo "no .devdata/fashion-mnist: carry .devdata" >&2; exit 1; }

# preflight (about a minute at worst): imports, the device, LPIPS's offline weights
"$PY" - "$ACCEL" <<'EOF' || { echo "[cells] preflight failed: nothing started" >&2; exit 1; }
import sys, time
t0 = time.time()
import torch
import attack  # noqa: F401  (diffusers, jsonargparse, lightning)
from inversion.metrics import get_lpips_model
get_lpips_model()
ok = torch.cuda.is_available()
print("[cells] torch", torch.__version__, "cuda", ok, torch.cuda.get_device_name(0) if ok else "",
      f"preflight {time.time() - t0:.0f} s", flush=True)
if sys.argv[1] == "gpu" and not ok:
    sys.exit("ACCEL=gpu but torch sees no CUDA device")
EOF
# the attacks stop LIMIT_S after this point: the budget less what has run and ~75 s for shutdown and the tarball
LIMIT_S="${LIMIT_S:-$((BUDGET_S - SECONDS - 75))}"
(( LIMIT_S >= 30 )) || { echo "[cells] only ${LIMIT_S}s left for the attacks (BUDGET_S=$BUDGET_S): nothing started" >&2; exit 1; }
echo "[cells] attacks interrupted after ${LIMIT_S}s"

pack() {  # the small result files of every run directory -> $OUTDIR/cells.tar.gz (atomically)
  (cd "$RUNS" && find . \( -name config.yaml -o -name results.csv -o -name summary.json -o -path '*/partial/*' \
      -o -path '*/users/*/raw.png' -o -path '*/users/*/denoised.png' -o -path '*/users/*/grid.png' \
      -o -path '*/users/*/raw.pt' \) -type f -print0 | tar czf "$OUTDIR/.cells.tar.gz.tmp" --null -T -) \
    && mv "$OUTDIR/.cells.tar.gz.tmp" "$OUTDIR/cells.tar.gz"
}

for cell in $CELLS; do  # every cell checked before any starts (a bad one would leave the others running)
  m="${cell%%:*}"; b="${cell##*:}"
  [[ "$cell" == *:* && "$b" =~ ^[0-9]+$ && "$b" -ge 1 ]] || { echo "bad cell '$cell' in CELLS: method:B with B >= 1" >&2; exit 1; }
  [[ "$m" =~ ^(dlg|ig|full|fullrand)$ ]] || { echo "unknown method $m in CELLS (dlg, ig, full or fullrand)" >&2; exit 1; }
done

pids=(); names=()
for cell in $CELLS; do
  method="${cell%%:*}"; b="${cell##*:}"
  base=configs/attack/fashion_mnist.yaml; label="trained_${method}"
  case "$method" in
    ig)  margs=(--config configs/sweep/parts/inverting_gradients_200.yaml --attack.init_args.steps 200 --image_log_every 0) ;;
    dlg) margs=(--config configs/method/dlg.yaml --attack.init_args.steps 10 --image_log_every 0) ;;
    full|fullrand)
      base=configs/attack/fashion_mnist_full.yaml
      margs=(--attack.init_args.users_per_step "$UPS" --trainer.precision bf16-mixed --image_log_every 0)
      if [[ "$method" == fullrand ]]; then margs+=(--victim.random_init true); label=full_random; else label=full_trained; fi ;;
    *) echo "unknown method $method in CELLS (dlg, ig, full or fullrand)" >&2; exit 1 ;;
  esac
  for first in $FIRST_USERS; do
    name="B${b}_${label}_u${first}"
    # shellcheck disable=SC2086
    timeout -k 20 --signal=INT "$LIMIT_S" "$PY" attack.py --config "$base" \
      --users.init_args.root .devdata/fashion-mnist --users.init_args.num_users "$USERS" \
      --users.init_args.first_user "$first" --users.init_args.batch_size "$b" "${margs[@]}" \
      --trainer.accelerator "$ACCEL" --trainer.enable_progress_bar false --logger.backend csv \
      --output.root "$RUNS" --output.name "$name" $EXTRA > "$OUTDIR/$name.log" 2>&1 &
    pids+=($!); names+=("$name")
  done
done
echo "[cells] ${#pids[@]} processes started $(date)"
# the packer: its own output closed (an orphaned sleep would hold the call's stdout open), and a stop request waits
# for a pack in progress to finish (two tars must never write the tarball at once)
( exec >/dev/null 2>&1; trap 'kill "$s" 2>/dev/null; exit 0' TERM
  while :; do sleep 60 & s=$!; wait "$s"; pack; done ) & packer=$!
failed=0
for k in "${!pids[@]}"; do
  wait "${pids[$k]}"; rc=$?
  if (( rc == 124 )); then  # interrupted at the limit: its finished users are kept
    echo "[cells] ${names[$k]}: interrupted at ${LIMIT_S}s"
  elif (( rc != 0 )); then
    failed=$((failed + 1)); echo "[cells] ${names[$k]}: exit $rc; log tail:"; tail -n 5 "$OUTDIR/${names[$k]}.log"
  fi
done
kill "$packer" 2>/dev/null; wait "$packer" 2>/dev/null
echo "[cells] done $(date) (${SECONDS}s)"
pack
grep -h "^\[attack\] .*: dominant" "$OUTDIR"/*.log | head -n 200 > "$OUTDIR/users.txt" || true
python3 - "$RUNS" <<'EOF'
import csv, json, sys
from pathlib import Path
for d in sorted(Path(sys.argv[1]).iterdir()):  # per run: status, finished users, evaluator hits, seconds per step
    try:
        status = json.loads((d / "summary.json").read_text()).get("status")
    except Exception:
        status = "no summary"
    rows = list(csv.DictReader((d / "results.csv").open())) if (d / "results.csv").is_file() else []
    hits = sum(r.get("evaluator_correct") in ("True", "1", "1.0") for r in rows)
    sps = [float(r["seconds_per_step"]) for r in rows if r.get("seconds_per_step")]
    line = f"[cells] {d.name}: {status}, {len(rows)} users, evaluator {hits}/{len(rows)}"
    print(line + (f", s/step {sum(sps) / len(sps):.4f}" if sps else ""))
EOF
# keep at most 8 files in $OUT (the device tool's limit)
tar czf "$OUTDIR/logs.tar.gz" -C "$OUTDIR" $(cd "$OUTDIR" && ls *.log) && rm -f "$OUTDIR"/*.log
find "$OUTDIR" -type f -size +15M -exec echo "[cells] warning: {} is over 15 MB and may not come back" \;
ls -la "$OUTDIR"
(( failed < ${#pids[@]} )) || { echo "[cells] every attack process failed" >&2; exit 1; }
