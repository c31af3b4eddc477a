#!/usr/bin/env bash
# Device side (one GPU, 16 CPU cores): benchmark cells that a CPU session cannot finish, all at once as parallel
# processes, then one tarball of their run directories in $OUT. Prepare here first with
# `bash scripts/gpu/prepare_device.sh`, then call the device tool, e.g.
#   run(command="bash scripts/gpu/cells.sh", carry=[".whl", ".devdata"], timeout_s=540)
#   run(command="CELLS='full:10 full:50 full:100' USERS=20 UPS=10 bash scripts/gpu/cells.sh", ...)
# and unpack here: `mkdir -p runs/gpu && tar xzf <files_at>/cells.tar.gz -C runs/gpu`.
# Methods (CELLS="method:B ..."):
#   dlg, ig        the methods table's baselines (reports/fmnist_b10_methods_20users_cpu/: same users, settings and
#                  run names as queue_half.sh there; `table.py runs/b10 runs/bsel runs/gpu` reads them)
#   full, fullrand the attack issue's bars: configs/attack/fashion_mnist_full.yaml (4,000 steps, the paper's final
#                  stage) with the shipped or a randomly initialised victim, bf16-mixed, UPS users per batched
#                  optimisation (a chunk's users finish together); the final-selection extension is applied here
#                  afterwards by `python scripts/refinish.py RUN_DIR --config configs/extension/final_selection.yaml`
# Settings by environment (defaults = the methods table's remaining cells):
#   CELLS="dlg:50 ig:100 dlg:100"   FIRST_USERS="0 10"  USERS=10  UPS=5
#   ACCEL=gpu  EXTRA=""              trainer accelerator; extra attack.py arguments (a CPU smoke test:
#                                    ACCEL=cpu USERS=1 FIRST_USERS=0 CELLS=dlg:10 EXTRA="--attack.init_args.steps 1")
#   SKIP_WHEELS=1                    use the installed packages (no .whl install)
#   LIMIT_S=480                      each process is interrupted after this many seconds (finished users are kept)
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
CELLS="${CELLS:-dlg:50 ig:100 dlg:100}"; FIRST_USERS="${FIRST_USERS:-0 10}"; USERS="${USERS:-10}"
ACCEL="${ACCEL:-gpu}"; LIMIT_S="${LIMIT_S:-480}"; UPS="${UPS:-5}"
[[ -f .devdata/fashion-mnist/t10k-images-idx3-ubyte.gz ]] || { echo "no .devdata/fashion-mnist: carry .devdata" >&2; exit 1; }
"$PY" -c "import torch; print('[cells] torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
pids=()
for cell in $CELLS; do
  method="${cell%%:*}"; b="${cell##*:}"
  base=configs/attack/fashion_mnist.yaml; label="trained_${method}"
  case "$method" in
    ig)  margs=(--config configs/sweep/parts/inverting_gradients_200.yaml --attack.init_args.steps 200) ;;
    dlg) margs=(--config configs/method/dlg.yaml --attack.init_args.steps 10) ;;
    full|fullrand)
      base=configs/attack/fashion_mnist_full.yaml
      margs=(--attack.init_args.users_per_step "$UPS" --trainer.precision bf16-mixed --image_log_every 0)
      if [[ "$method" == fullrand ]]; then margs+=(--victim.random_init true); label=full_random; else label=full_trained; fi ;;
    *) echo "unknown method $method in CELLS (dlg, ig, full or fullrand)" >&2; exit 1 ;;
  esac
  for first in $FIRST_USERS; do
    name="B${b}_${label}_u${first}"
    # shellcheck disable=SC2086
    timeout --signal=INT "$LIMIT_S" "$PY" attack.py --config "$base" \
      --users.init_args.root .devdata/fashion-mnist --users.init_args.num_users "$USERS" \
      --users.init_args.first_user "$first" --users.init_args.batch_size "$b" "${margs[@]}" \
      --trainer.accelerator "$ACCEL" --trainer.enable_progress_bar false --logger.backend csv \
      --output.root "$RUNS" --output.name "$name" $EXTRA > "$OUTDIR/$name.log" 2>&1 &
    pids+=($!)
  done
done
echo "[cells] ${#pids[@]} processes started $(date)"
for p in "${pids[@]}"; do wait "$p"; done
echo "[cells] done $(date)"
grep -h "^\[attack\] .*: dominant" "$OUTDIR"/*.log | head -n 200 > "$OUTDIR/users.txt" || true
tar czf "$OUTDIR/cells.tar.gz" -C "$RUNS" --exclude lightning --exclude checkpoints .
for d in "$RUNS"/*/; do
  echo "$(basename "$d"): $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['status'])" "$d/summary.json" 2>/dev/null), $(($(wc -l < "$d/results.csv" 2>/dev/null || echo 1) - 1)) users"
done
# the logs are in the tarball's runs too; keep at most 8 files in $OUT (the device tool's limit)
tar czf "$OUTDIR/logs.tar.gz" -C "$OUTDIR" $(cd "$OUTDIR" && ls *.log) && rm -f "$OUTDIR"/*.log
ls -la "$OUTDIR"
