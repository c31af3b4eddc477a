#!/usr/bin/env bash
# One-shot set-up on a fresh machine (Debian/Ubuntu, Python 3.11, x86_64): the Fashion-MNIST data package, a virtual
# environment in .venv with torch/torchvision first, the project (editable) with its test extras, and the offline
# evaluation assets (LPIPS AlexNet weights, dlib/ONNX face models). Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]]; then
  SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
  $SUDO apt-get install -y -q dataset-fashion-mnist || { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; }
fi

PY_SYS="${PYTHON_SYS:-python3}"
if [[ ! -x .venv/bin/python || ! -f .venv/pyvenv.cfg ]]; then  # none, or a half-made one (interrupted)
  rm -rf .venv
  if ! "$PY_SYS" -m venv .venv; then  # Debian splits venv/ensurepip into python3-venv
    rm -rf .venv
    SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
    $SUDO apt-get install -y -q python3-venv || { $SUDO apt-get update -q && $SUDO apt-get install -y -q python3-venv; }
    "$PY_SYS" -m venv .venv
  fi
fi
.venv/bin/python -m pip --version >/dev/null 2>&1 || .venv/bin/python -m ensurepip --upgrade  # e.g. a venv made by uv
PY=.venv/bin/python
"$PY" -m pip install -q --upgrade pip
# torch first (a CUDA build that also runs on CPU; on these machines pip takes it from local disk)
"$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$PY" -m pip install -q -e ".[test]"
PYTHON="$PY" bash scripts/setup_offline_assets.sh
echo "[setup] done: activate with 'source .venv/bin/activate'"
