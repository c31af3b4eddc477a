"""Image folders that users supply themselves: one subfolder per FL user (LFW, VGGFace2) or one unlabelled folder
(FFHQ-like) for training the prior.

Layouts:

* :class:`FolderUsers`: ``root/<user_id>/*.jpg|*.jpeg|*.png`` (e.g. LFW's ``lfw/Aaron_Eckhart/Aaron_Eckhart_0001.jpg``
  or VGGFace2's ``train/n000002/0001_01.jpg``). Each subfolder is one user; only the image files directly inside it
  count.
* :class:`ImageFolderDataModule`: every ``*.jpg|*.jpeg|*.png`` under ``root``, recursively (FFHQ's
  ``images1024x1024/00000/00000.png``, or a flat folder).

Every image is centre-cropped to the largest square and resized (PIL bilinear, anti-aliased) to ``image_size``;
pixels are float32 in [0, 1]. Extensions are matched case-insensitively; other files (``.txt``, ``.DS_Store``) are
ignored, and so are hidden files and folders (names starting with '.', e.g. macOS AppleDouble ``._x.jpg`` files left
by copying or unzipping on a Mac). A file with an image extension that PIL cannot decode raises a ``ValueError``
naming it; :class:`ImageFolderDataModule` (in ``setup``) and :class:`FolderUsers` (in ``check``) check every file's
header and end (:func:`unreadable_images`: a truncated JPEG/PNG is caught) before training or attacking.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from datamodules.base import ImageDataModule
from datamodules.fashion_mnist import DataNotFoundError
from datamodules.users import User, UserSource, check_image_settings

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def is_image_file(path: str | os.PathLike) -> bool:
    """True for file names ending in .jpg/.jpeg/.png (any case) that are not hidden: a name (the last path part)
    starting with '.' is never an image to use (macOS AppleDouble ``._x.jpg`` metadata files, ``.hidden.png``)."""
    name = os.path.basename(str(path))
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


# bytes some writers leave after a JPEG's end-of-image marker (zero or whitespace padding); anything else there
# means the file was cut short (an interrupted copy, download or unzip)
_JPEG_PADDING = b"\x00 \t\r\n"
_TAIL_BYTES = 4096  # read from the end of each file for the tail check


def _damaged_end(fh, fmt: Optional[str]) -> Optional[str]:
    """Why the end of the open binary file ``fh`` (any position; PIL format ``fmt``) shows it truncated, or None.

    JPEG (and MPO, the multi-picture JPEG of some cameras): after stripping trailing zero/whitespace padding the file
    must end with the end-of-image marker FF D9. PNG: its last ``_TAIL_BYTES`` bytes must hold the ``IEND`` chunk.
    Other formats: None (no end check). Reads one ``_TAIL_BYTES`` block from the end (more only while it is all
    padding)."""
    if fmt not in ("JPEG", "MPO", "PNG"):
        return None
    end = fh.seek(0, os.SEEK_END)
    if fmt == "PNG":
        fh.seek(max(0, end - _TAIL_BYTES))
        return None if b"IEND" in fh.read() else "truncated: no PNG IEND chunk at the end of the file"
    data = b""
    while end > 0:  # backwards block by block while what was read is padding (nearly always one block)
        start = max(0, end - _TAIL_BYTES)
        fh.seek(start)
        data = (fh.read(end - start) + data).rstrip(_JPEG_PADDING)
        end = start
        if len(data) >= 2:
            break
    if data.endswith(b"\xff\xd9"):
        return None
    return "truncated: the file does not end with the JPEG end-of-image marker FF D9"


def _decodes(path: str | os.PathLike) -> bool:
    """Whether PIL decodes every pixel of ``path`` (truncated files refused): the check of the rare files whose end
    does not look like an image's end, which may be a valid image with data appended after it."""
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def unreadable_images(paths: Sequence[str | os.PathLike]) -> list[tuple[str, str]]:
    """The files among ``paths`` that are missing, whose header PIL cannot read, or whose end shows them truncated
    (what an interrupted copy or unzip leaves), without decoding any pixel.

    Per file: ``Image.open`` parses the header only, then one small block is read from the end of the file
    (:func:`_damaged_end`): a JPEG must end with its end-of-image marker FF D9 (trailing zero/whitespace padding
    allowed), a PNG must hold its ``IEND`` chunk near the end; other formats get the header check only. A file that
    fails the end check is then decoded in full and passes when it decodes (a valid image followed by appended data,
    as motion photos and some metadata writers leave, ends with other bytes). About 50
    microseconds a file when the files are in the page cache (2,000 CelebA JPEGs: 0.1 s; 200k: about 10 s), more on
    a cold disk (two small reads per file). Damage inside the pixel data of a complete file is not detected: it
    fails when the image is loaded.

    Returns:
        ``(path, reason)`` for each bad file, in the order of ``paths``; [] when all are fine.
    """
    bad = []
    for p in paths:
        try:
            with open(p, "rb") as fh:
                with Image.open(fh) as img:
                    w, h = img.size
                    fmt = img.format
                if w < 1 or h < 1:
                    bad.append((str(p), f"size {w}x{h}"))
                    continue
                why = _damaged_end(fh, fmt)
            if why and not _decodes(p):  # data appended after the image (motion photos, metadata) decodes fine
                bad.append((str(p), why))
        except UnidentifiedImageError:  # its message would show the file object, not the path
            empty = os.path.getsize(p) == 0
            bad.append((str(p), "empty file (0 bytes)" if empty else "PIL cannot identify it as an image"))
        except (OSError, SyntaxError, ValueError) as exc:
            bad.append((str(p), f"{type(exc).__name__}: {exc}"))
    return bad


def raise_if_unreadable(paths: Sequence[str | os.PathLike], what: str, fix: str) -> None:
    """One error for the files among ``paths`` that :func:`unreadable_images` rejects (missing, unreadable header,
    truncated end), before any pixel is decoded: ``"<n bad> of <what> cannot be read as images: <first 3 (reason)>.
    Fix: <fix>"``.

    Raises:
        ValueError: some file is bad.
    """
    bad = unreadable_images(paths)
    if bad:
        raise ValueError(f"{len(bad)} of {what} cannot be read as images: "
                         + _examples([f"{p} ({why})" for p, why in bad], 3) + f". Fix: {fix}")


def _examples(items: Sequence[str], k: int = 5) -> str:
    """The first ``k`` of ``items`` joined by ', ' with ' ...' when there are more."""
    return ", ".join(items[:k]) + (" ..." if len(items) > k else "")


def grey_to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit grey PIL image ('I;16*', 'I', 'F') as an 8-bit 'L' image scaled to full range; any other
    mode is returned unchanged. Pillow's ``convert('L'/'RGB')`` clips these modes at 255 (a 16-bit photo turns white).

    Scale: 'I;16*' (and 'I' with values above 255) from 0..65535; 'I' with 8-bit values from 0..255; 'F' as [0, 1]
    when its maximum is <= 1, else divided by its maximum. Rounded to nearest.
    """
    if not (img.mode.startswith("I;16") or img.mode in ("I", "F")):
        return img
    arr = np.asarray(img, dtype=np.float32)
    peak = float(arr.max()) if arr.size else 0.0
    if img.mode == "F":  # float images: [0, 1] as they come, else scaled by their maximum
        top = 1.0 if peak <= 1.0 else peak
    else:  # 16-bit grey ('I;16*', or 'I' from older Pillow): full scale 65535 (8-bit data in 'I': 255)
        top = 65535.0 if img.mode.startswith("I;16") or peak > 255 else 255.0
    return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def load_image(
    path: str | os.PathLike, image_size: int = 64, channels: int = 3, crop: Optional[int] = None
) -> torch.Tensor:
    """Read one image file into float32 (channels, image_size, image_size) pixels in [0, 1].

    The EXIF orientation is applied (camera photos); 16-bit grey images are scaled from 0..65535 (Pillow's convert
    would clip them at 255). The image is converted to RGB (``channels=3``) or grey (``channels=1``), centre-cropped to a square of side
    ``crop`` (None: the shorter side; a crop larger than the image is clipped to the shorter side), then resized to
    ``image_size`` with PIL bilinear (anti-aliased when shrinking). With ``crop=178`` this is exactly torchvision's
    ``Compose([CenterCrop(178), Resize(image_size), ToTensor()])``, the usual CelebA preprocessing.

    Raises:
        ValueError: bad ``channels``/``image_size``, or the file cannot be decoded (the message names it).
        FileNotFoundError: the file does not exist.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)  # camera photos: apply the EXIF orientation (sideways otherwise)
            img = grey_to_8bit(img).convert("RGB" if channels == 3 else "L")
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(
            f"{path}: cannot be decoded as an image ({exc}); delete the file or re-encode it as JPEG/PNG"
        ) from exc
    w, h = img.size
    side = min(w, h) if crop is None else min(int(crop), w, h)
    left, top = int(round((w - side) / 2.0)), int(round((h - side) / 2.0))  # torchvision CenterCrop's rounding
    if side != w or side != h:
        img = img.crop((left, top, left + side, top + side))
    if side != image_size:
        img = img.resize((image_size, image_size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).float().div_(255.0)
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1).contiguous()


def load_images(
    paths: Sequence[str | os.PathLike], image_size: int = 64, channels: int = 3, crop: Optional[int] = None
) -> torch.Tensor:
    """Stack :func:`load_image` over ``paths``: float32 (N, channels, image_size, image_size) in [0, 1]."""
    return torch.stack([load_image(p, image_size, channels, crop) for p in paths])


class ImageListDataset(Dataset):
    """Lazily loaded images (PIL on each ``__getitem__``, nothing kept in memory).

    Items are ``(image, label)``: image float32 (channels, image_size, image_size) in [0, 1], label an int64 scalar
    tensor (so the default collate gives int64 (B,)).

    Args:
        paths: image files (N,).
        labels: int (N,) or None for zeros.
        image_size, channels, crop: see :func:`load_image`.
        hflip: flip each image horizontally with probability 1/2 (training augmentation; uses torch's RNG).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Optional[Sequence[int] | np.ndarray | torch.Tensor] = None,
        image_size: int = 64,
        channels: int = 3,
        crop: Optional[int] = None,
        hflip: bool = False,
    ) -> None:
        self.paths = [str(p) for p in paths]
        if labels is None:
            self.labels = torch.zeros(len(self.paths), dtype=torch.int64)
        else:
            self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} images but {len(self.labels)} labels")
        self.image_size = image_size
        self.channels = channels
        self.crop = crop
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = load_image(self.paths[i], self.image_size, self.channels, self.crop)
        if self.hflip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x, self.labels[i]


def _list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p.name))


def _choose(n: int, batch_size: int, rng: np.random.Generator, allow_replacement: bool) -> tuple[np.ndarray, bool]:
    """Pick ``batch_size`` indices into ``n`` items: without replacement when ``n >= batch_size``; otherwise (only
    with ``allow_replacement``) every item once plus ``batch_size - n`` draws with replacement, shuffled.
    Returns (indices int (B,), whether any item repeats)."""
    if n >= batch_size:
        return rng.choice(n, size=batch_size, replace=False), False
    if not allow_replacement:  # callers check this before loading anything; kept as a guard
        raise ValueError(f"{batch_size} images needed but only {n} available")
    idx = np.concatenate([np.arange(n), rng.choice(n, size=batch_size - n, replace=True)])
    return rng.permutation(idx), True


class FolderUsers(UserSource):
    """FL users from a folder of per-user subfolders: ``root/<user_id>/*.jpg|*.jpeg|*.png`` (LFW, VGGFace2).

    Users are the subfolders sorted by name (those with at least ``min_images`` images when it is set; subfolders
    without any image are skipped with a warning), the first ``num_users`` of them (all when None). User ``k`` gets
    ``batch_size`` images of its folder chosen with the seeded generator ``numpy.random.default_rng([seed, k])``,
    so a user's batch depends only on ``seed`` and its position, never on ``num_users``. Users are disjoint (one
    folder each). When a folder holds fewer than B images a ``ValueError`` is raised before any image is loaded,
    unless ``allow_replacement`` (then every image once plus seeded draws with replacement).

    Labels: ``label_mode='zeros'`` (default): label-free, ``User.labels`` all 0 and ``num_classes`` 1 (or
    ``num_classes`` when given). ``label_mode='index'``: the user's position k among the selected users for all B
    images, ``num_classes`` = number of selected users (or ``num_classes`` when given, which must be larger than
    every index).

    ``User.user_id`` is the folder name; ``meta``: ``identity`` (folder name), ``index`` (k), ``files`` (B file
    names, relative to the folder), ``num_available`` (images in the folder), ``replacement`` (whether images repeat),
    ``label_free`` (``label_mode='zeros'``: the labels are placeholders, so attack.py does not score the
    evaluator's or the victim's class against them).

    Args:
        root: folder holding one subfolder per user (``~`` expanded).
        batch_size: B, images per user.
        num_users: users to build (None: every subfolder).
        image_size: output side (centre crop to square, then resize); channels: 3 (RGB) or 1 (grey).
        seed: seed of the image choice.
        allow_replacement: allow users with fewer than B images (some images repeat).
        min_images: keep only subfolders with at least this many images (LFW: most people have a single image).
        label_mode: 'zeros' or 'index'; num_classes: override of the number of classes.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 8,
        num_users: Optional[int] = None,
        image_size: int = 64,
        channels: int = 3,
        seed: int = 0,
        allow_replacement: bool = False,
        min_images: Optional[int] = None,
        label_mode: str = "zeros",
        num_classes: Optional[int] = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"users.init_args.batch_size must be >= 1, got {batch_size}")
        if num_users is not None and num_users < 1:
            raise ValueError(f"users.init_args.num_users must be >= 1 (or null for all), got {num_users}")
        if label_mode not in ("zeros", "index"):
            raise ValueError(f"users.init_args.label_mode must be 'zeros' or 'index', got {label_mode!r}")
        if channels not in (1, 3):
            raise ValueError(f"users.init_args.channels must be 1 or 3, got {channels}")
        self.root = root
        self.batch_size = batch_size
        self.num_users = num_users
        self.image_size = image_size
        self.channels = channels
        self.seed = seed
        self.allow_replacement = allow_replacement
        self.min_images = min_images
        self.label_mode = label_mode
        self._num_classes = num_classes

    def user_folders(self) -> list[tuple[str, list[Path]]]:
        """The selected users as (folder name, sorted image files) in user order; no image is decoded.

        Raises:
            DataNotFoundError: ``root`` missing or holding no subfolder with images.
            ValueError: fewer subfolders than ``num_users``.
        """
        root = Path(self.root).expanduser() if self.root else None
        layout = "expected layout: root/<user_id>/*.jpg|*.jpeg|*.png, one subfolder per user (LFW, VGGFace2)"
        if root is None or not root.is_dir():
            raise DataNotFoundError(
                f"user folder {self.root!r} does not exist ({layout}). Fix: set `users.init_args.root` to it."
            )
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))  # no .ipynb_checkpoints
        folders, empty = [], []
        for d in subdirs:
            files = _list_images(d)
            (folders if files else empty).append((d.name, files))
        if empty:
            warnings.warn(
                f"{len(empty)} subfolder(s) of {root} hold no .jpg/.jpeg/.png image and are skipped: "
                + ", ".join(name for name, _ in empty[:5])
                + (" ..." if len(empty) > 5 else "")
            )
        if not folders:
            loose = [p.name for p in root.iterdir() if p.is_file() and is_image_file(p.name)]
            hint = (
                f" {len(loose)} image(s) lie directly in {root}: move each user's images into its own subfolder "
                "(or train a prior on them with datamodules.folder.ImageFolderDataModule)."
                if loose
                else ""
            )
            raise DataNotFoundError(
                f"no user subfolder with images in {root} ({layout}).{hint} Fix: set `users.init_args.root` to the "
                "folder that holds the per-user subfolders."
            )
        if self.min_images is not None:
            folders = [(n, f) for n, f in folders if len(f) >= self.min_images]
            if not folders:
                raise ValueError(
                    f"no subfolder of {root} has min_images={self.min_images} images; lower "
                    "users.init_args.min_images"
                )
        if self.num_users is not None:
            if self.num_users > len(folders):
                raise ValueError(
                    f"users.init_args.num_users={self.num_users} but {root} has only {len(folders)} user subfolders "
                    + (f"with >= {self.min_images} images " if self.min_images is not None else "with images ")
                    + "; lower num_users (or min_images)"
                )
            folders = folders[: self.num_users]
        return folders

    @property
    def num_classes(self) -> int:
        """The ``num_classes`` argument when given; else 1 for ``label_mode='zeros'`` and the number of selected
        users for 'index' (which lists the folders, so it raises as :meth:`user_folders` does)."""
        if self._num_classes is not None:
            return self._num_classes
        return 1 if self.label_mode == "zeros" else len(self.user_folders())

    def check(self) -> None:
        """Fail early (before any long work): missing root, too few users, a ``num_classes`` too small for
        ``label_mode='index'``, a user with fewer than B images (these need only the folder listing, so they come
        first), then an image of a selected folder whose header PIL cannot read or whose end shows it truncated
        (:func:`unreadable_images`: reads every selected folder's images; no pixel decoded).

        Raises:
            DataNotFoundError: see :meth:`user_folders`. ValueError: the cases above, with the fix.
        """
        check_image_settings(self.channels, self.image_size)
        folders = self.user_folders()
        if self.label_mode == "index" and self._num_classes is not None and self._num_classes < len(folders):
            raise ValueError(
                f"users.init_args.num_classes={self._num_classes} but label_mode='index' needs at least "
                f"{len(folders)} classes"
            )
        if not self.allow_replacement:
            short = [(name, len(files)) for name, files in folders if len(files) < self.batch_size]
            if short:
                most = max(len(f) for _, f in folders)
                raise ValueError(
                    f"users.init_args.batch_size={self.batch_size} but {len(short)} user folder(s) of {self.root} "
                    "hold fewer images: "
                    + ", ".join(f"{name} ({n})" for name, n in short[:5])
                    + (" ..." if len(short) > 5 else "")
                    + f" (largest selected folder: {most}). Fix: lower batch_size, set min_images: {self.batch_size}"
                    " to skip small folders, or set allow_replacement: true (images then repeat within a batch)."
                )
        # last: the only check that reads files (every selected image's header and end)
        paths = [f for _, files in folders for f in files]
        raise_if_unreadable(paths, f"the {len(paths)} images of the selected user folders under {self.root}",
                            "delete these files or re-encode them as JPEG/PNG (a truncated file: copy it again "
                            "from its source).")

    def users(self) -> list[User]:
        """Build the users: images float32 (B, channels, image_size, image_size) in [0, 1], labels int64 (B,)."""
        self.check()
        folders = self.user_folders()
        num_classes = self.num_classes
        out = []
        for k, (name, files) in enumerate(folders):
            rng = np.random.default_rng([self.seed, k])
            idx, repeated = _choose(len(files), self.batch_size, rng, self.allow_replacement)
            chosen = [files[j] for j in idx]
            x = load_images(chosen, self.image_size, self.channels)
            label = 0 if self.label_mode == "zeros" else k
            out.append(
                User(
                    user_id=name,
                    images=x,
                    labels=torch.full((self.batch_size,), label, dtype=torch.int64),
                    num_classes=num_classes,
                    dominant_class=label,
                    meta={
                        "identity": name,
                        "index": k,
                        "files": [p.name for p in chosen],
                        "num_available": len(files),
                        "label_free": self.label_mode == "zeros",
                        "replacement": repeated,
                    },
                )
            )
        return out


# The folders of FFHQ's download script (NVlabs/ffhq-dataset download_ffhq.py): the same faces at other resolutions.
FFHQ_VERSIONS = ("images1024x1024", "thumbnails128x128", "in-the-wild-images", "tfrecords")


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every .jpg/.jpeg/.png under ``root`` (``~`` expanded; recursively), sorted by path. Hidden files and folders
    (names starting with '.', e.g. AppleDouble ``._x.jpg``) are skipped (:func:`is_image_file`).

    Symlinked folders are followed, as torchvision's ``ImageFolder`` does (``os.walk(followlinks=True)``): a dataset
    assembled from links to folders elsewhere is listed whole (they were skipped silently, so a prior trained on a
    subset). Each real folder is listed once: a link to a folder already listed, or to one of its own ancestors (a
    cycle), is not descended into (real paths compared, :func:`os.path.realpath`), so the walk ends and no image is
    listed twice: a folder reachable by two paths is listed under the first one the top-down walk (names sorted)
    queues. A symlinked root is followed too.

    Returns:
        the image paths, as found under ``root`` (links not resolved), sorted.

    Raises:
        DataNotFoundError: ``root`` missing or holding no image (the message names the path and the config key).
        ValueError: images in more than one of FFHQ's download folders (:data:`FFHQ_VERSIONS`) under ``root``.
    """
    base = Path(root).expanduser() if root else None
    if base is None or not base.is_dir():
        raise DataNotFoundError(
            f"image folder {root!r} does not exist. Fix: set `data.init_args.root` to a folder holding "
            ".jpg/.jpeg/.png images (searched recursively, e.g. FFHQ's images1024x1024)."
        )
    files = []
    seen = {os.path.realpath(base)}  # real paths of the folders listed or queued: a link to one of them is a repeat
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        files += [Path(dirpath) / f for f in filenames if is_image_file(f)]
    if not files:
        raise DataNotFoundError(
            f"no .jpg/.jpeg/.png image under {base} (searched recursively). Fix: set `data.init_args.root` to the "
            "folder holding the images."
        )
    found: dict[str, Path] = {}  # FFHQ version folder name -> the first such folder (at any depth under base)
    for f in files:
        parts = f.relative_to(base).parts[:-1]
        for i, part in enumerate(parts):
            if part in FFHQ_VERSIONS:
                found.setdefault(part, base.joinpath(*parts[: i + 1]))
    if len(found) > 1:
        versions = sorted(found)
        raise ValueError(
            f"{base} holds FFHQ's {' and '.join(versions)} side by side: every face would be listed once per "
            "version (a prior trained on duplicates, and the same face in the training and the validation split). "
            f"Fix: set `data.init_args.root` to one of them, e.g. {found[versions[0]]}."
        )
    return sorted(files)


class ImageFolderDataModule(ImageDataModule):
    """Unlabelled images under one folder (FFHQ-like), for training the DDPM prior.

    Batches are ``(images, labels)``: images float32 (B, channels, image_size, image_size) in [0, 1] (centre crop
    to square, resize), labels int64 zeros (so :class:`lightning_modules.ddpm.DDPMPrior`, which takes ``batch[0]``,
    works unchanged). Images are loaded lazily with PIL. A seeded ``val_fraction`` of the files is held out for
    validation (at least one file when the fraction is > 0); the test loader reuses the validation files. Hidden
    files and folders are not listed (:func:`find_images`); ``setup`` reads every listed file's header and a small
    block of its end (:func:`unreadable_images`: unreadable headers and truncated JPEG/PNG files; no pixel decoded)
    and raises one error naming the bad files, so such a file fails the run before training instead of inside a
    DataLoader worker hours in.

    Args:
        root: folder searched recursively for .jpg/.jpeg/.png (``~`` expanded; symlinked folders are followed, each
            real folder once: :func:`find_images`).
        image_size: output side in pixels; channels: 3 (RGB) or 1 (grey).
        batch_size: training batch size (must not exceed the training images, since the last partial batch is
            dropped).
        val_fraction: share of the files held out for validation, in [0, 1).
        num_workers: DataLoader workers.
        augment: random horizontal flips for training.
        seed: seed of the validation split.
        check_images: check every image's header and end in ``setup`` (default true; false skips the check).

    Raises (``setup``):
        DataNotFoundError: ``root`` missing or without images.
        ValueError: fewer training images than ``batch_size``; or files PIL cannot open or that are truncated (the
            message gives their number, the first few with the reason, and the fix).
    """

    num_classes = 1

    def __init__(
        self,
        root: Optional[str] = None,
        image_size: int = 64,
        channels: int = 3,
        batch_size: int = 64,
        val_fraction: float = 0.02,
        num_workers: int = 0,
        augment: bool = False,
        seed: int = 0,
        check_images: bool = True,
    ) -> None:
        super().__init__(root, image_size, batch_size, num_workers, augment, seed)
        if channels not in (1, 3):
            raise ValueError(f"data.init_args.channels must be 1 or 3, got {channels}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.init_args.val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.channels = channels
        self.val_fraction = val_fraction
        self.check_images = check_images

    def prepare_data(self) -> None:
        find_images(self.root)  # fail early with the path and the config key

    def setup(self, stage: Optional[str] = None) -> None:
        """List the images, check their headers and ends (``check_images``), split off validation (once; ``stage``
        is ignored). Raises as documented on the class."""
        if self._train is not None:
            return
        files = find_images(self.root)
        if self.check_images:
            raise_if_unreadable(files, f"{len(files)} image files under {self.root}",
                                "delete these files or re-encode them as JPEG/PNG (a truncated file: copy it again "
                                "from its source; hidden files such as macOS '._*' "
                                "are already skipped).")
        n_val = int(round(self.val_fraction * len(files)))
        if self.val_fraction > 0:
            n_val = max(1, n_val)
        self.check_train_size(len(files), n_val, str(self.root), "lower batch_size or val_fraction, or add images.")
        perm = np.random.default_rng(self.seed).permutation(len(files))
        val = sorted(perm[:n_val].tolist())
        train = sorted(perm[n_val:].tolist())
        kw = dict(image_size=self.image_size, channels=self.channels)
        self._train = ImageListDataset([files[i] for i in train], hflip=self.augment, **kw)
        self._val = ImageListDataset([files[i] for i in val], **kw)
