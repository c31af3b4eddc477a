"""Fashion-MNIST: idx readers, a training DataModule, and the held-out split used to build FL users.

The files are the ones torchvision downloads (``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``); on Debian
they ship in the package ``dataset-fashion-mnist`` under ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from datamodules.base import ImageDataModule

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataNotFoundError(FileNotFoundError):
    """Raised when a data set cannot be found on disk; the message says how to get it."""


_REFETCH = ("Fix: re-install the Debian package (`sudo apt-get install --reinstall dataset-fashion-mnist`), or delete "
            "the damaged copy and download Fashion-MNIST again")


def _open_idx(path: Path) -> tuple[bytes, Path]:
    """The bytes of ``path.gz`` (decompressed) or else ``path``, and which of the two was read.

    Raises:
        DataNotFoundError: neither exists.
        ValueError: the file cannot be read to its end (a truncated or corrupt gzip: an interrupted download or
            copy); the message names it and the fix.
    """
    for candidate in (path.with_name(path.name + ".gz"), path):
        if candidate.is_file():
            opener = gzip.open if candidate.suffix == ".gz" else open
            try:
                with opener(candidate, "rb") as fh:
                    return fh.read(), candidate
            except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
                raise ValueError(
                    f"{candidate}: cannot be read ({type(exc).__name__}: {exc}); the file is truncated or corrupt "
                    f"(an interrupted download or copy?). {_REFETCH}"
                ) from exc
    raise DataNotFoundError(str(path))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one idx file (gzipped or not) into a numpy array of dtype uint8.

    Args:
        path: path without the ``.gz`` suffix (``~`` expanded); ``path.gz`` is tried first.

    Returns:
        uint8 array of shape (N,) for labels or (N, 28, 28) for images.

    Raises:
        DataNotFoundError: neither ``path.gz`` nor ``path`` exists.
        ValueError: the file is truncated or corrupt (gzip errors, a short header or data) or not a uint8 idx
            file; the message names it and the fix.
    """
    raw, path = _open_idx(Path(path).expanduser())
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated idx file ({len(raw)} bytes, no header). {_REFETCH}")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file (magic {raw[:4]!r}). {_REFETCH}")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated idx file ({len(raw)} bytes, header cut short). {_REFETCH}")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated idx file ({data.size} values for shape {shape}). {_REFETCH}")
    return data.reshape(shape)


def _has_split(root: Path, split: str) -> bool:
    return all((root / f).is_file() or (root / (f + ".gz")).is_file() for f in _FILES[split])


def find_fashion_mnist_root(root: Optional[str] = None, download: bool = True,
                            splits: Sequence[str] = ("train", "test")) -> Path:
    """Locate the Fashion-MNIST idx files (plain or ``.gz``) of ``splits`` ('train', 'test'; both by default: the
    attack's users need only 'test').

    Search order: with ``root`` (``~`` expanded), that folder (also ``root/FashionMNIST/raw``, torchvision's
    layout) and nothing else, never downloading into it (a mistyped root must fail, not get a folder created in
    it); without,
    ``/usr/share/datasets/fashion-mnist`` (Debian package), then torchvision's download into
    ``~/.cache/fashion-mnist`` when ``download`` is true and the network is reachable.

    Raises:
        DataNotFoundError: none found; the message names the places looked in, the apt package and the config key
            to set.
    """
    # an explicit root is the only place looked at (a mistyped one must not fall back to the system copy silently)
    root = os.path.expanduser(str(root)) if root else root  # '~/data' as a shell would read it
    candidates = [Path(root), Path(root) / "FashionMNIST" / "raw"] if root else [Path(DEBIAN_ROOT)]
    bad = [x for x in splits if x not in _FILES]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty subset of {sorted(_FILES)}, got {list(splits)!r}")
    for cand in candidates:
        if all(_has_split(cand, x) for x in splits):
            return cand
    download_error = None
    if download and not root:  # an explicit root is only read: a mistyped one must not get a folder created in it
        target = Path.home() / ".cache" / "fashion-mnist"
        try:  # users with internet: torchvision fetches the same files
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(str(target), train=train, download=True)
            raw = target / "FashionMNIST" / "raw"
            if all(_has_split(raw, x) for x in splits):
                return raw
        except Exception as exc:  # offline: fall through to the clear error below
            download_error = exc
    raise DataNotFoundError(
        "Fashion-MNIST idx files not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + (f"; download failed: {download_error}" if download_error else "")
        + ("; an explicit root is not downloaded into: check its spelling, or leave it unset to use the Debian copy "
           "or download into ~/.cache/fashion-mnist" if root else "")
        + "). Fix: `sudo apt-get install dataset-fashion-mnist` (installs them in "
        f"{DEBIAN_ROOT}), or set `data.root` (e.g. `--data.root /path/to/fashion-mnist`; for attack.py "
        "`--users.init_args.root`) to a folder holding "
        + ", ".join(f"{f}.gz" for x in splits for f in _FILES[x]) + "."
    )


def load_split(split: str, root: Optional[str] = None, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load one split as (images uint8 (N, 28, 28), labels uint8 (N,)). ``split`` is 'train' or 'test'; ``root``
    and ``download`` as in :func:`find_fashion_mnist_root`.

    Raises:
        DataNotFoundError: the split's files are missing (:func:`find_fashion_mnist_root`).
        ValueError: a bad ``split``, a damaged idx file (:func:`read_idx`), or images and labels of different counts.
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    base = find_fashion_mnist_root(root, download, splits=(split,))
    images = read_idx(base / _FILES[split][0])
    labels = read_idx(base / _FILES[split][1])
    if len(images) != len(labels):
        raise ValueError(f"{base}: {len(images)} images but {len(labels)} labels in split {split!r}")
    return images, labels


def to_tensor_images(images: np.ndarray, image_size: int = 32, channels: int = 1) -> torch.Tensor:
    """Convert uint8 (N, 28, 28) images into float32 (N, channels, image_size, image_size) pixels in [0, 1].

    ``image_size`` 28 is the native image (``uint8 / 255``, no resampling); 32 (the default) zero-pads it (2 px each
    side, the usual LeNet/DDPM convention; the garment keeps its pixels); other sizes above 28 are padded to 32 and
    then resized bilinearly; sizes below 28 are resized from 28 directly (bilinear, antialiased, no padding).
    ``channels`` 3 replicates the grey channel.

    Raises:
        ValueError: ``channels`` is not 1 or 3.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size == 28:  # native: padding to 32 and resampling back would shrink and blur the garment
        x = torch.from_numpy(images.copy()).float().div_(255.0).unsqueeze(1)
    elif image_size < 28:
        x = torch.from_numpy(images.copy()).float().div_(255.0).unsqueeze(1)
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    else:
        x = torch.from_numpy(images.copy()).float().div_(255.0).unsqueeze(1)
        x = F.pad(x, (2, 2, 2, 2))
        if image_size != 32:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0)
    return x.repeat(1, channels, 1, 1) if channels == 3 else x


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST for training the victim, the evaluator and the DDPM prior.

    Batches are ``(images, labels)``: images float32 (B, channels, image_size, image_size) in [0, 1], labels int64.
    Training uses the train split (minus ``val_size`` held out for validation); the test split is never used for
    training, since FL users are built from it.

    Args:
        root: folder with the idx files (``~`` expanded; never downloaded into); None searches the Debian package
            path, then downloads into ~/.cache/fashion-mnist when online.
        image_size: output side in pixels: 32 (default) zero-pads the 28x28 images by 2 px each side; 28 gives the
            native images unchanged; other sizes are resampled bilinearly (see :func:`to_tensor_images`).
        channels: 1, or 3 to replicate the grey channel.
        batch_size: training batch size.
        val_size: images of the train split held out for validation (seeded), an integer >= 0 that must leave at
            least ``batch_size`` training images (60000 - val_size on Fashion-MNIST).
        num_workers: DataLoader workers.
        augment: random horizontal flips for training (used for the prior; fine for garments).
        seed: seed of the validation split.

    Raises:
        ValueError: val_size < 0 (at construction); fewer than ``batch_size`` training images left after holding
            out ``val_size`` (in ``setup``, right after reading the train split, before training;
            :meth:`~datamodules.base.ImageDataModule.check_train_size`); a damaged idx file (:func:`read_idx`).
        DataNotFoundError: the idx files are missing (``prepare_data``/``setup``).
    """

    num_classes = 10
    class_names = CLASSES
    eval_batch_size = 512

    def __init__(
        self,
        root: Optional[str] = None,
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(root, image_size, batch_size, num_workers, augment, seed)
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0:
            raise ValueError(f"data.init_args.val_size must be an integer >= 0, got {val_size!r}")
        self.save_hyperparameters()
        self.channels = channels
        self.val_size = val_size

    def prepare_data(self) -> None:
        find_fashion_mnist_root(self.root)  # fail early with the install hint

    def setup(self, stage: Optional[str] = None) -> None:
        if self._train is None:
            images, labels = load_split("train", self.root)
            self.check_train_size(len(images), self.val_size, "the Fashion-MNIST train split",
                                  "lower data.init_args.val_size or batch_size.")
            x = to_tensor_images(images, self.image_size, self.channels)
            y = torch.from_numpy(labels.astype(np.int64))
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
            val_idx, train_idx = perm[: self.val_size], perm[self.val_size :]
            self._train = TensorDataset(x[train_idx], y[train_idx])
            self._val = TensorDataset(x[val_idx], y[val_idx])
        if stage in (None, "test") and self._test is None:
            images, labels = load_split("test", self.root)
            self._test = TensorDataset(
                to_tensor_images(images, self.image_size, self.channels), torch.from_numpy(labels.astype(np.int64))
            )

    def _collate_train(self, batch):
        x = torch.stack([b[0] for b in batch])
        y = torch.stack([b[1] for b in batch])
        if self.augment:
            flip = torch.rand(len(x)) < 0.5
            x[flip] = x[flip].flip(-1)
        return x, y
