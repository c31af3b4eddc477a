"""CelebA (aligned) in torchvision's layout: reader, FL users (one identity per user) and a training DataModule.

CelebA cannot be downloaded automatically (Google Drive quota); users get it from
https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and point ``root`` at it. Expected layout (``root`` may also be
the ``celeba`` folder itself)::

    root/celeba/img_align_celeba/000001.jpg ...     178x218 aligned faces
    root/celeba/identity_CelebA.txt                 "000001.jpg 2880" (file, identity) per line
    root/celeba/list_attr_celeba.txt                line 1: count; line 2: the 40 attribute names;
                                                    then "000001.jpg -1  1 ..." (values -1/1)
    root/celeba/list_eval_partition.txt             "000001.jpg 0" (0 train, 1 valid, 2 test)

The official partition is identity-disjoint (8192 / 985 / 1000 identities for train / valid / test).

Preprocessing (the usual one for 64x64 CelebA generative models): centre crop 178x178, resize (PIL bilinear,
anti-aliased) to ``image_size``, RGB, float32 pixels in [0, 1]; i.e. torchvision's
``Compose([CenterCrop(178), Resize(image_size), ToTensor()])``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from datamodules.base import ImageDataModule
from datamodules.fashion_mnist import DataNotFoundError
from datamodules.folder import ImageListDataset, _choose, load_image, load_images, raise_if_unreadable
from datamodules.users import User, UserSource, check_image_settings

CROP = 178
IMAGE_DIR = "img_align_celeba"
IDENTITY_FILE = "identity_CelebA.txt"
ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
SPLITS = {"train": 0, "valid": 1, "test": 2}
_SPLIT_ALIASES = {"val": "valid", "validation": "valid"}

_LAYOUT = (
    "Expected torchvision's layout: ROOT/celeba/img_align_celeba/000001.jpg ..., ROOT/celeba/identity_CelebA.txt, "
    "ROOT/celeba/list_attr_celeba.txt, ROOT/celeba/list_eval_partition.txt (ROOT may also be the celeba folder "
    "itself). Get CelebA (aligned & cropped images, identities, attributes, partition) from "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html and set `data.init_args.root` (training) or "
    "`users.init_args.root` (FL users) to ROOT."
)


def find_celeba_root(root: Optional[str | os.PathLike]) -> Path:
    """Return the ``celeba`` folder (the one holding ``img_align_celeba/`` and the three txt files).

    ``root/celeba`` is used when it exists or when ``root`` holds none of CelebA's entries, else ``root`` itself;
    missing entries are named by absolute path.

    Raises:
        DataNotFoundError: ``root`` unset or a required file/folder missing; one error naming every missing entry,
            the expected layout and the config keys to set.
    """
    if root is None or str(root) == "":
        raise DataNotFoundError("CelebA root is not set. " + _LAYOUT)
    base = given = Path(root).expanduser().absolute()
    entries = (IMAGE_DIR, IDENTITY_FILE, ATTR_FILE, PARTITION_FILE, f"{IMAGE_DIR}.zip")
    if (base / "celeba").is_dir() or not any((base / e).exists() for e in entries):
        # torchvision's layout ROOT/celeba/...; ROOT itself only when it already holds part of CelebA (so a root with
        # nothing in it reports the paths README names, e.g. /abs/data/celeba/img_align_celeba/, not data/...)
        base = base / "celeba"
    missing = [str(base / IMAGE_DIR) + "/"] if not (base / IMAGE_DIR).is_dir() else []
    missing += [str(base / f) for f in (IDENTITY_FILE, ATTR_FILE, PARTITION_FILE) if not (base / f).is_file()]
    if missing:
        zips = [d for d in dict.fromkeys((base, given)) if (d / f"{IMAGE_DIR}.zip").is_file()]
        zip_hint = (f" ({zips[0] / IMAGE_DIR}.zip is there: unzip it so that {base / IMAGE_DIR}/ holds the images.)"
                    if zips else "")
        raise DataNotFoundError(f"CelebA not found: missing {', '.join(missing)}.{zip_hint} " + _LAYOUT)
    return base


@dataclass(frozen=True)
class CelebAIndex:
    """The parsed txt files, one row per image, ordered like ``identity_CelebA.txt``.

    Attributes:
        base: the ``celeba`` folder.
        files: image file names (N,), e.g. '000001.jpg'.
        identities: int64 (N,) CelebA identity ids (1 .. 10177).
        attributes: uint8 (N, A) attribute values mapped -1 -> 0, 1 -> 1.
        attribute_names: the A attribute names (40 in CelebA: '5_o_Clock_Shadow', ..., 'Male', ..., 'Young').
        partition: int64 (N,) 0 train, 1 valid, 2 test.
    """

    base: Path
    files: tuple
    identities: np.ndarray
    attributes: np.ndarray
    attribute_names: tuple
    partition: np.ndarray

    def image_path(self, row: int) -> Path:
        """Path of the image at index row ``row``: ``base/img_align_celeba/<file>`` (existence not checked)."""
        return self.base / IMAGE_DIR / self.files[row]

    def split_rows(self, split: str) -> np.ndarray:
        """int64 row indices of ``split`` ('train', 'valid' (or 'val'), 'test' or 'all')."""
        split = _SPLIT_ALIASES.get(split, split)
        if split == "all":
            return np.arange(len(self.files))
        if split not in SPLITS:
            raise ValueError(f"split must be one of 'train', 'valid', 'test', 'all', got {split!r}")
        return np.flatnonzero(self.partition == SPLITS[split])

    def attribute_column(self, name: str) -> int:
        """Column of attribute ``name`` in :attr:`attributes` (its position in ``attribute_names``, 0-based).

        Raises:
            ValueError: ``name`` is not one of the attribute names (the message lists them).
        """
        if name not in self.attribute_names:
            raise ValueError(
                f"unknown CelebA attribute {name!r}; target must be 'identity' or one of: "
                + ", ".join(self.attribute_names)
            )
        return self.attribute_names.index(name)


_REFETCH = ("the file is damaged or not CelebA's original: get it again from "
            "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html")


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def _first_bad_line(path: Path, first_line: int, ok) -> str:
    """``" line <n>: '<text>'"`` for the first non-blank line (1-based, from ``first_line`` on) whose
    whitespace-split fields ``ok`` rejects, or "" when every line passes. Only called once a file is known to be bad,
    so the extra read costs nothing on good data."""
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        for no, line in enumerate(fh, 1):
            if no >= first_line and line.strip() and not ok(line.split()):
                text = line.rstrip("\r\n")
                return f" line {no}: {text[:100]!r}" + (" ..." if len(text) > 100 else "")
    return ""


def _refuse_duplicates(path: Path, files: pd.Index, first_line: int) -> None:
    """One error naming the first file name listed twice in ``path`` (``files``: its names in file order; data lines
    start at ``first_line``) and the lines that list it: a repeated line would put one image twice in a batch.

    Raises:
        ValueError: some name is repeated.
    """
    repeated = files[files.duplicated()]
    if len(repeated) == 0:
        return
    name = repeated[0]
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        where = [no for no, line in enumerate(fh, 1) if no >= first_line and line.split()[:1] == [name]]
    more = f" ({repeated.nunique()} names are repeated)" if repeated.nunique() > 1 else ""
    raise ValueError(
        f"{path}: {name} is listed {len(where)} times (lines {', '.join(map(str, where))}){more}; every image must be "
        f"listed once per file (a repeated identity line would put one image twice in a batch). Fix: delete the "
        f"repeated lines, or {_REFETCH}"
    )


def _read_two_columns(path: Path, what: str) -> pd.Series:
    """``<file> <integer>`` lines as a Series of int64 indexed by file name.

    Raises:
        ValueError: a line without exactly two fields or with a non-integer second field (the message names the
            file and the first bad line); a file name listed twice (:func:`_refuse_duplicates`).
    """
    def ok(fields: list) -> bool:
        return len(fields) == 2 and _is_int(fields[1])

    try:
        df = pd.read_csv(path, sep=r"\s+", header=None, names=["file", what], dtype={"file": str}, engine="c")
    except Exception as exc:
        raise ValueError(f"{path}: cannot be parsed as '<file> <integer {what}>' lines"
                         f"{_first_bad_line(path, 1, ok) or ''} ({exc}). Fix: {_REFETCH}") from exc
    if df.empty:
        raise ValueError(f"{path}: is empty (expected one '<file> <integer {what}>' line per image). Fix: {_REFETCH}")
    # pandas 3 reads a column holding a word as its string dtype (np.issubdtype cannot take it): pandas' predicate
    if df[what].isna().any() or not pd.api.types.is_integer_dtype(df[what].dtype):
        raise ValueError(f"{path}: expected '<file> <integer {what}>' on every line, but"
                         f"{_first_bad_line(path, 1, ok) or ' some line is not'}. Fix: {_REFETCH}")
    _refuse_duplicates(path, pd.Index(df["file"]), first_line=1)
    return df.set_index("file")[what].astype(np.int64)


def _read_attributes(path: Path) -> tuple[tuple, pd.DataFrame]:
    """``list_attr_celeba.txt``: line 1 the image count, line 2 the attribute names, then ``<file> <-1|1 ...>``.

    Returns:
        (attribute names, DataFrame of int values -1/1 indexed by file name, one column per name).

    Raises:
        ValueError: line 1 is not a single integer or line 2 is not a list of names (e.g. the count line is
            missing); a row without one -1/1 value per name (the message names the file and the first bad line);
            a file name listed twice (:func:`_refuse_duplicates`).
    """
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        first, second = fh.readline(), fh.readline()
    count, names = first.split(), tuple(second.split())
    if len(count) != 1 or not _is_int(count[0]) or not names or any(_is_int(n) for n in names):
        raise ValueError(
            f"{path}: line 1 must be the image count, line 2 the 40 attribute names (CelebA's header: '202599', then "
            f"'5_o_Clock_Shadow Arched_Eyebrows ...'); found line 1 {first.strip()[:60]!r}, line 2 "
            f"{second.strip()[:60]!r}. Fix: restore the two header lines, or {_REFETCH}"
        )

    def ok(fields: list) -> bool:
        return len(fields) == len(names) + 1 and all(_is_int(f) and int(f) in (-1, 1) for f in fields[1:])

    try:
        attrs = pd.read_csv(
            path, sep=r"\s+", header=None, skiprows=2, names=("file",) + names, dtype={"file": str}, engine="c"
        ).set_index("file")
    except Exception as exc:
        raise ValueError(f"{path}: cannot be parsed{_first_bad_line(path, 3, ok) or ''} ({exc}). "
                         f"Fix: {_REFETCH}") from exc
    if not all(pd.api.types.is_integer_dtype(t) for t in attrs.dtypes) or not np.isin(attrs.to_numpy(), (-1, 1)).all():
        raise ValueError(f"{path}: every row needs {len(names)} values of -1 or 1 after the file name, but"
                         f"{_first_bad_line(path, 3, ok) or ' some row has not'}. Fix: {_REFETCH}")
    _refuse_duplicates(path, attrs.index, first_line=3)
    return names, attrs


@lru_cache(maxsize=4)
def _load_index_cached(base: str, stamp: tuple) -> CelebAIndex:
    base_p = Path(base)
    ident = _read_two_columns(base_p / IDENTITY_FILE, "identity")
    part = _read_two_columns(base_p / PARTITION_FILE, "partition")
    names, attrs = _read_attributes(base_p / ATTR_FILE)
    files = ident.index
    for name, table in ((PARTITION_FILE, part), (ATTR_FILE, attrs)):
        lacking = files.difference(table.index)
        if len(lacking):
            raise ValueError(
                f"{base_p / name} lacks {len(lacking)} image(s) listed in {IDENTITY_FILE}, e.g. {lacking[0]}"
            )
    part = part.reindex(files)
    values = attrs.reindex(files).to_numpy()
    if not set(np.unique(part.to_numpy()).tolist()) <= {0, 1, 2}:
        bad_part = _first_bad_line(base_p / PARTITION_FILE, 1, lambda f: int(f[1]) in (0, 1, 2))
        raise ValueError(f"{base_p / PARTITION_FILE}: partition values must be 0, 1 or 2, but{bad_part}")
    return CelebAIndex(
        base=base_p,
        files=tuple(files),
        identities=ident.to_numpy().astype(np.int64),
        attributes=(values > 0).astype(np.uint8),
        attribute_names=names,
        partition=part.to_numpy().astype(np.int64),
    )


def load_celeba_index(root: Optional[str | os.PathLike]) -> CelebAIndex:
    """Parse the three CelebA txt files under ``root`` (cached per folder and file modification times).

    Raises:
        DataNotFoundError: see :func:`find_celeba_root`.
        ValueError: a malformed txt file (the message names it and its first bad line), or files listed in one txt
            file and missing from another.
    """
    base = find_celeba_root(root)
    stamp = tuple((base / f).stat().st_mtime_ns for f in (IDENTITY_FILE, ATTR_FILE, PARTITION_FILE))
    return _load_index_cached(str(base.resolve()), stamp)


def load_celeba_image(path: str | os.PathLike, image_size: int = 64) -> torch.Tensor:
    """One CelebA image as float32 (3, image_size, image_size) in [0, 1]: centre crop 178x178, then resize."""
    return load_image(path, image_size, channels=3, crop=CROP)


def check_images_present(index: CelebAIndex, rows: np.ndarray, what: str = "data.init_args.root") -> None:
    """Fail early when image files of ``rows`` (int row indices into ``index``) are missing from
    ``img_align_celeba/``: one directory listing (``os.scandir``) compared with the listed names, so 200k files take
    well under a second (no per-file stat).

    Raises:
        DataNotFoundError: some are missing; the message gives how many of how many, the first few names, whether
            ``img_align_celeba.zip`` lies next to the folder, and the fix (extract the images completely, or point
            ``what`` at a complete copy).
    """
    folder = index.base / IMAGE_DIR
    with os.scandir(folder) as it:
        present = {e.name for e in it}
    needed = sorted({index.files[r] for r in np.asarray(rows).tolist()})
    missing = [f for f in needed if f not in present]
    if missing:
        zip_hint = f" ({IMAGE_DIR}.zip lies in {index.base}: unzip it completely there.)" if (
            index.base / f"{IMAGE_DIR}.zip"
        ).is_file() else ""
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataNotFoundError(
            f"{len(missing)} of the {len(needed)} CelebA images used (listed in {IDENTITY_FILE}) are missing from "
            f"{folder}: {shown}. Is {IMAGE_DIR}/ fully extracted?{zip_hint} Fix: extract all 202,599 images "
            f"into {folder}, or set `{what}` to a complete copy. " + _LAYOUT
        )


def identity_holdout_split(index: CelebAIndex, identity_holdout: float, seed: int) -> dict[str, np.ndarray]:
    """The split of the official train partition that :class:`CelebADataModule` uses with target 'identity': a
    seeded ``identity_holdout`` share of the train-partition images is held out (``numpy.random.default_rng(seed)``
    permutation of the partition's rows in file order; ``round(identity_holdout * N)`` images), its first half for
    validation, the second half for test; the rest is trained on. :class:`CelebAUsers` with ``split='holdout'``
    calls the same function, so its users are exactly the photos the victim did not train on.

    Returns:
        ``{"train", "val", "test", "holdout"}`` -> sorted int64 row indices into ``index`` ("holdout" = val + test).
    """
    rows = index.split_rows("train")
    perm = np.random.default_rng(seed).permutation(len(rows))
    n_hold = int(round(identity_holdout * len(rows)))
    hold, train = np.sort(perm[:n_hold]), np.sort(perm[n_hold:])
    val, test = hold[: n_hold // 2], hold[n_hold // 2 :]
    return {"train": rows[train], "val": rows[val], "test": rows[test], "holdout": rows[hold]}


def _check_target(index: CelebAIndex, target: str) -> None:
    if target != "identity":
        index.attribute_column(target)


class CelebAUsers(UserSource):
    """FL users from CelebA: each user is one identity and holds B images of that person.

    The identities of ``split`` (sorted by id; with ``min_images``, only those having at least that many images in
    the split) are permuted with ``numpy.random.default_rng(seed)``; user i (``first_user <= i < first_user +
    num_users``) is the i-th identity of that permutation and gets B of its images chosen with
    ``default_rng([seed, i])``. So user i is the same for a seed whatever ``num_users``/``first_user`` are, and
    users never share an identity.

    CelebA identities have at most about 35 images (about 20 on average; 30 is common), fewer within a split. When a
    chosen identity has fewer than B images in the split, :meth:`check` (and :meth:`users`) raise a ``ValueError``
    before any image is loaded, unless ``allow_replacement`` (then all its images once plus seeded draws with
    replacement, so images repeat; ``meta['replacement']`` is True).

    Labels (``target``):
        'identity': every image gets the identity's class index: the position of the identity in the sorted list of
            all identities present in ``split`` (the train partition for ``split='holdout'``;
            :attr:`identity_to_class`; class k <-> identity ``classes[k]``), ``num_classes`` = number of those
            identities. :meth:`check` accepts it only with ``split='train'`` or ``'holdout'``: that is
            :class:`CelebADataModule`'s mapping for ``target='identity'`` (the sorted train identities), while the
            other splits hold other people (the official partition is identity-disjoint), so their class indices
            would name unrelated identities of an identity victim.
        an attribute name (e.g. 'Male'): each image's 0/1 value (1 = attribute present), ``num_classes`` 2.
    ``dominant_class`` is the identity's class, or the attribute's majority value (ties -> 0).

    What the models saw (target 'identity'): an identity victim (:class:`CelebADataModule`, target 'identity')
    knows every train-partition person (they are its classes) and trains on all their photos except a seeded
    ``identity_holdout`` share (10% by default), and ``configs/train/ddpm_celeba.yaml`` trains the prior on the whole
    train partition. With ``split='train'`` about 90% of the users' photos were therefore in the victim's training
    set and all of them in the prior's, which inflates reconstruction and identity metrics; :meth:`check` warns.
    ``split='holdout'`` draws the users from exactly the photos the victim held out (:func:`identity_holdout_split`
    with ``identity_holdout`` and ``holdout_seed``, which must equal the victim's ``data.init_args.identity_holdout``
    and ``data.init_args.seed``): photos the victim never trained on, of people it knows (about 10% of each
    person's photos, 2 on average, so B above 2-3 needs ``allow_replacement`` or ``min_images``). A prior trained
    on the train partition (the shipped config) has still seen them; :meth:`check` warns about that too. Users
    that neither model saw at all are only possible with an attribute target and ``split='test'``.

    ``meta``: ``identity`` (CelebA id), ``files`` (B file names), ``attributes`` ({name: majority 0/1 over the B
    images}), ``image_attributes`` ({name: list of B 0/1 values}), ``attribute_fractions`` ({name: share of 1s}),
    ``num_available`` (images of the identity in the split), ``replacement``, ``split``, ``target``.

    Args:
        root: CelebA root (see :func:`find_celeba_root`).
        num_users: users to build; batch_size: B, images per user.
        split: 'test' (default; held out from training), 'valid', 'train', 'all' or 'holdout' (the identity
            victim's held-out train-partition photos; target 'identity' only); with target 'identity' only 'train'
            or 'holdout' (see Labels and What the models saw).
        image_size: output side in pixels (after the 178x178 centre crop).
        seed: seed of the identity order and of the image choice.
        first_user: index of the first user returned.
        allow_replacement: allow identities with fewer than B images (images repeat).
        min_images: consider only identities with at least this many images in the split (e.g. = B).
        target: a CelebA attribute name (default 'Male', the target of the shipped CelebA victim config and of
            configs/attack/celeba.yaml) or 'identity' (with ``split='train'`` or ``'holdout'``).
        identity_holdout, holdout_seed: with ``split='holdout'``, the victim's ``data.init_args.identity_holdout``
            (in (0, 1); default 0.1 as CelebADataModule's) and ``data.init_args.seed`` (default 0); ignored
            otherwise.

    Raises:
        ValueError (at construction): num_users, batch_size or first_user out of range, an unknown split,
            ``split='holdout'`` with an attribute target, or ``identity_holdout`` outside (0, 1) with it.
    """

    def __init__(
        self,
        root: Optional[str] = None,
        num_users: int = 4,
        batch_size: int = 8,
        split: str = "test",
        image_size: int = 64,
        seed: int = 0,
        first_user: int = 0,
        allow_replacement: bool = False,
        min_images: Optional[int] = None,
        target: str = "Male",
        identity_holdout: float = 0.1,
        holdout_seed: int = 0,
    ) -> None:
        if num_users < 1:
            raise ValueError(f"users.init_args.num_users must be >= 1, got {num_users}")
        if batch_size < 1:
            raise ValueError(f"users.init_args.batch_size must be >= 1, got {batch_size}")
        if first_user < 0:
            raise ValueError(f"users.init_args.first_user must be >= 0, got {first_user}")
        split = _SPLIT_ALIASES.get(split, split)
        if split not in (*SPLITS, "all", "holdout"):
            raise ValueError(f"users.init_args.split must be 'train', 'valid', 'test', 'all' or 'holdout', got "
                             f"{split!r}")
        if split == "holdout":
            if target != "identity":
                raise ValueError(
                    f"users.init_args.split='holdout' (the photos an identity victim held out) needs target: "
                    f"identity, got target {target!r}; an attribute victim trains on the whole train partition. "
                    "Fix: use split: test with an attribute target (people neither model saw).")
            if not 0.0 < identity_holdout < 1.0:
                raise ValueError(f"users.init_args.identity_holdout must be in (0, 1) with split 'holdout' (the "
                                 f"victim's data.init_args.identity_holdout), got {identity_holdout}")
        self.root = root
        self.num_users = num_users
        self.batch_size = batch_size
        self.split = split
        self.image_size = image_size
        self.seed = seed
        self.first_user = first_user
        self.allow_replacement = allow_replacement
        self.min_images = min_images
        self.target = target
        self.identity_holdout = identity_holdout
        self.holdout_seed = holdout_seed
        self.channels = 3

    # --------------------------------------------------------------------------------------------- bookkeeping
    def index(self) -> CelebAIndex:
        """The parsed CelebA txt files under ``root`` (:func:`load_celeba_index`, cached).

        Raises:
            DataNotFoundError, ValueError: see :func:`load_celeba_index`.
        """
        return load_celeba_index(self.root)

    def split_rows(self, index: CelebAIndex) -> np.ndarray:
        """int64 row indices of the users' pool: ``index.split_rows(split)``, or for ``split='holdout'`` the identity
        victim's held-out rows (:func:`identity_holdout_split` with ``identity_holdout`` and ``holdout_seed``)."""
        if self.split == "holdout":
            return identity_holdout_split(index, self.identity_holdout, self.holdout_seed)["holdout"]
        return index.split_rows(self.split)

    @property
    def classes(self) -> np.ndarray:
        """int64 (K,) sorted identity ids of the split (of the train partition for ``split='holdout'``, as the
        identity victim's classes); class k is identity ``classes[k]`` (target 'identity')."""
        index = self.index()
        return np.unique(index.identities[index.split_rows("train" if self.split == "holdout" else self.split)])

    @property
    def identity_to_class(self) -> dict[int, int]:
        """CelebA identity id -> class index k in 0..K-1 (its position in the sorted :attr:`classes` of ``split``);
        the labels of target 'identity'."""
        return {int(ident): k for k, ident in enumerate(self.classes)}

    @property
    def num_classes(self) -> int:
        """K, the number of identities in ``split``, for target 'identity' (parses the txt files); 2 for an
        attribute."""
        return len(self.classes) if self.target == "identity" else 2

    @property
    def class_names(self) -> Optional[tuple]:
        """``('not <attr>', '<attr>')`` for an attribute target (printed beside the label); None for identities
        (class k is identity ``classes[k]``: the printed ids are the class indices)."""
        return (f"not {self.target}", self.target) if self.target != "identity" else None

    def plan(self) -> list[dict]:
        """Which identity and which images each user gets, without loading any image.

        Returns:
            one dict per user: ``user`` (i), ``identity``, ``rows`` (int (B,) rows into the index),
            ``num_available``, ``replacement``.

        Raises:
            DataNotFoundError: CelebA missing; ValueError: unknown target, too many users, or (without
            ``allow_replacement``) an identity with fewer than B images.
        """
        index = self.index()
        _check_target(index, self.target)
        rows = self.split_rows(index)
        ids = index.identities[rows]
        order = np.argsort(ids, kind="stable")  # rows grouped by identity, file order kept inside a group
        rows, ids = rows[order], ids[order]
        uniq, start, counts = np.unique(ids, return_index=True, return_counts=True)
        group = {int(u): rows[s : s + c] for u, s, c in zip(uniq, start, counts)}
        eligible = uniq if self.min_images is None else uniq[counts >= self.min_images]
        need = self.first_user + self.num_users
        if need > len(eligible):
            extra = f" with >= {self.min_images} images" if self.min_images is not None else ""
            raise ValueError(
                f"users.init_args.first_user + num_users = {need} but CelebA split {self.split!r} has only "
                f"{len(eligible)} identities{extra}; lower num_users/first_user"
                + (" or min_images" if self.min_images is not None else "")
            )
        perm = np.random.default_rng(self.seed).permutation(eligible)
        chosen = [int(c) for c in perm[self.first_user : need]]
        short = [(c, len(group[c])) for c in chosen if len(group[c]) < self.batch_size]
        if short and not self.allow_replacement:
            enough = int((counts >= self.batch_size).sum())
            raise ValueError(
                f"users.init_args.batch_size={self.batch_size} but {len(short)} chosen CelebA identit"
                + ("y has" if len(short) == 1 else "ies have")
                + f" fewer images in split {self.split!r}: "
                + ", ".join(f"identity {c} ({n})" for c, n in short[:5])
                + (" ..." if len(short) > 5 else "")
                + f". The split's largest identity has {int(counts.max())} images and {enough} identities have "
                f">= {self.batch_size}. Fix: lower batch_size, set min_images: {self.batch_size} (only identities "
                "with enough images), or set allow_replacement: true (images then repeat within a batch)."
            )
        plans = []
        for i, ident in zip(range(self.first_user, need), chosen):
            rng = np.random.default_rng([self.seed, i])
            idx, repeated = _choose(len(group[ident]), self.batch_size, rng, self.allow_replacement)
            plans.append(
                {
                    "user": i,
                    "identity": ident,
                    "rows": group[ident][idx],
                    "num_available": len(group[ident]),
                    "replacement": repeated,
                }
            )
        return plans

    def check(self) -> None:
        """Fail early (before any long work): missing files, bad target/split, impossible B, missing images, images
        whose header PIL cannot read or whose end shows them truncated (:func:`datamodules.folder.unreadable_images`;
        no pixel is decoded).

        Warns (UserWarning, once, on rank 0): target 'identity' users, drawn from train-partition photos that the
        victim (split 'train') and a prior trained on the train partition (both splits) have seen (see the class
        docstring).

        Raises:
            DataNotFoundError: a listed image is missing. ValueError: target 'identity' with a split other than
                'train' or 'holdout' (see the class docstring); see :meth:`plan`; or unreadable images (how many,
                the first few, the fix).
        """
        if self.target == "identity" and self.split not in ("train", "holdout"):
            raise ValueError(
                f"users.init_args.target='identity' with split {self.split!r}: the labels would be class indices of "
                f"the sorted {self.split!r} identities, but a victim trained with target 'identity' "
                "(CelebADataModule) has the train partition's identities as its classes, and the official partition "
                "is identity-disjoint, so every client gradient would be computed for an unrelated identity. Fix: "
                "use an attribute target with this split (e.g. target: Male, the gender attribute of the shipped "
                "configs; the identity stays in each user's meta for the face metrics), or split: holdout (the "
                "identity victim's held-out photos) or train for identity labels."
            )
        check_image_settings(self.channels, self.image_size)
        index = self.index()
        paths = []
        for p in self.plan():
            for r in p["rows"]:
                if not index.image_path(r).is_file():
                    raise DataNotFoundError(
                        f"CelebA image {index.image_path(r)} (listed in {IDENTITY_FILE}) is missing; is "
                        f"{IMAGE_DIR}/ fully extracted? " + _LAYOUT
                    )
                paths.append(index.image_path(r))
        raise_if_unreadable(paths, f"the {len(paths)} CelebA images these users use",
                            f"extract {IMAGE_DIR}/ again from the original archive (a damaged or partial copy).")
        if self.target == "identity":
            self._warn_seen()

    def _warn_seen(self) -> None:
        """The warning of :meth:`check` for target 'identity' (which photos the victim and the prior saw)."""
        from lightning.pytorch.utilities import rank_zero_warn

        prior = ("configs/train/ddpm_celeba.yaml trains the prior on the whole train partition (these photos "
                 "included)")
        if self.split == "train":
            rank_zero_warn(
                "users.init_args.target='identity' with split 'train': these users' photos come from the CelebA train "
                "partition, on which an identity victim (CelebADataModule, target identity) trains except a seeded "
                f"identity_holdout share (10% by default), and {prior}: most of the users' photos were seen by both "
                "models, so reconstruction and identity metrics are optimistic. Fix: split: holdout (the victim's "
                "held-out photos; set users.init_args.identity_holdout / holdout_seed to the victim's "
                "data.init_args.identity_holdout / seed), or an attribute target with split: test.")
        else:
            rank_zero_warn(
                "users.init_args.split='holdout': the identity victim did not train on these photos (if "
                f"identity_holdout={self.identity_holdout} and holdout_seed={self.holdout_seed} match its "
                f"data.init_args.identity_holdout and seed), but it knows these people, and {prior}: a prior "
                "trained that way has seen them. For people neither model saw use an attribute target with "
                "split: test.")

    def users(self) -> list[User]:
        """Build the users: images float32 (B, 3, image_size, image_size) in [0, 1], labels int64 (B,)."""
        self.check()
        index = self.index()
        to_class = self.identity_to_class
        num_classes = self.num_classes
        out = []
        for p in self.plan():
            rows = p["rows"]
            x = load_images([index.image_path(r) for r in rows], self.image_size, 3, CROP)
            attrs = index.attributes[rows].astype(np.int64)  # (B, A)
            if self.target == "identity":
                y = torch.full((len(rows),), to_class[p["identity"]], dtype=torch.int64)
            else:
                y = torch.from_numpy(attrs[:, index.attribute_column(self.target)].copy())
            b = len(rows)
            out.append(
                User(
                    user_id=p["user"],
                    images=x,
                    labels=y,
                    num_classes=num_classes,
                    dominant_class=int(torch.bincount(y, minlength=num_classes).argmax()),
                    meta={
                        "identity": p["identity"],
                        "files": [index.files[r] for r in rows],
                        "attributes": {n: int(2 * attrs[:, k].sum() > b) for k, n in enumerate(index.attribute_names)},
                        "image_attributes": {n: attrs[:, k].tolist() for k, n in enumerate(index.attribute_names)},
                        "attribute_fractions": {
                            n: float(attrs[:, k].mean()) for k, n in enumerate(index.attribute_names)
                        },
                        "num_available": p["num_available"],
                        "replacement": p["replacement"],
                        "split": self.split,
                        "target": self.target,
                    },
                )
            )
        return out


class CelebADataModule(ImageDataModule):
    """CelebA for training a victim/evaluator classifier or a DDPM prior (64x64 by default).

    Batches are ``(images, labels)``: images float32 (B, 3, image_size, image_size) in [0, 1] (178 centre crop,
    resize), labels int64 (B,). Images are loaded lazily with PIL in the Dataset (nothing kept in memory);
    ``setup`` checks, before training, that every image file the three splits use exists
    (:func:`check_images_present`) and, with ``check_images``, that its header is readable and its end is intact
    (:func:`datamodules.folder.unreadable_images`: a header read and one small read at the end of each file, no pixel
    decoded; catches the truncated or empty files an interrupted unzip leaves).

    Targets:
        a binary attribute (e.g. 'Male'): labels 0/1, ``num_classes`` 2; train / val / test are the official
            train / valid / test partition.
        'identity': labels are the identities of the official *train* partition remapped to 0..K-1 in sorted
            id order (class k <-> identity ``classes[k]``; K = ``num_classes`` = 8192 on full CelebA). Since the
            partition is identity-disjoint, the valid/test partitions hold no image of these identities, so a seeded
            ``identity_holdout`` share of the train-partition images is held out instead: its first half is the
            validation set, the second half the test set (:func:`identity_holdout_split`). FL users of an identity
            victim must be these people (:class:`CelebAUsers` accepts target 'identity' only with split 'train' or
            'holdout'), so they are never people this classifier has never seen: with split 'train' about
            ``1 - identity_holdout`` of their photos are in its training set; split 'holdout' uses only the photos
            held out here (same ``identity_holdout`` and ``seed``). Users of an attribute victim drawn from the
            test partition are people it has never seen.

    Args:
        root: CelebA root (see :func:`find_celeba_root`).
        target: 'identity' or an attribute name.
        image_size: output side in pixels.
        batch_size: training batch size.
        num_workers: DataLoader workers.
        augment: random horizontal flips for training.
        identity_holdout: share of the train partition held out for val/test with target 'identity', in [0, 1).
        seed: seed of that holdout.
        check_images: check every used image's header and end in ``setup`` (default true; false skips that pass,
            the existence check still runs).
    """

    channels = 3

    def __init__(
        self,
        root: Optional[str] = None,
        target: str = "identity",
        image_size: int = 64,
        batch_size: int = 64,
        num_workers: int = 0,
        augment: bool = False,
        identity_holdout: float = 0.1,
        seed: int = 0,
        check_images: bool = True,
    ) -> None:
        super().__init__(root, image_size, batch_size, num_workers, augment, seed)
        if not 0.0 <= identity_holdout < 1.0:
            raise ValueError(f"data.init_args.identity_holdout must be in [0, 1), got {identity_holdout}")
        self.save_hyperparameters()
        self.target = target
        self.identity_holdout = identity_holdout
        self.check_images = check_images

    def index(self) -> CelebAIndex:
        """The parsed CelebA txt files under ``root`` (:func:`load_celeba_index`, cached), after checking ``target``.

        Raises:
            DataNotFoundError: see :func:`find_celeba_root`.
            ValueError: a malformed txt file, or ``target`` is neither 'identity' nor an attribute name.
        """
        index = load_celeba_index(self.root)
        _check_target(index, self.target)
        return index

    @property
    def classes(self) -> np.ndarray:
        """int64 (K,) sorted identity ids of the train partition (target 'identity'): class k <-> ``classes[k]``."""
        index = self.index()
        return np.unique(index.identities[index.split_rows("train")])

    @property
    def num_classes(self) -> int:
        """2 for an attribute; the number of train-partition identities for 'identity' (parses the txt files)."""
        return 2 if self.target != "identity" else len(self.classes)

    @property
    def class_names(self) -> tuple:
        """Names of the classes, by label: ``('not <attr>', '<attr>')`` for an attribute target, else the K
        train-partition identity ids as strings (class k -> ``str(classes[k])``)."""
        if self.target != "identity":
            return (f"not {self.target}", self.target)
        return tuple(str(c) for c in self.classes)

    def prepare_data(self) -> None:
        self.index()  # fail early: missing files, unknown target

    def _dataset(self, index: CelebAIndex, rows: np.ndarray, labels: np.ndarray, train: bool) -> ImageListDataset:
        return ImageListDataset(
            [index.image_path(r) for r in rows],
            labels,
            image_size=self.image_size,
            channels=3,
            crop=CROP,
            hflip=train and self.augment,
        )

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the train / val / test datasets (once; ``stage`` is ignored), after checking that every image
        exists and (``check_images``) has a readable header and an intact end.

        Raises:
            DataNotFoundError: txt files missing (:func:`find_celeba_root`) or image files of the splits missing
                (:func:`check_images_present`: how many, the first few, the fix).
            ValueError: malformed txt files, unknown target, fewer training images than ``batch_size``, or image
                files that cannot be read or are truncated (how many, the first few with the reason, the fix).
        """
        if self._train is not None:
            return
        index = self.index()
        if self.target == "identity":
            split = identity_holdout_split(index, self.identity_holdout, self.seed)
            classes = self.classes
            parts = {name: (split[name], np.searchsorted(classes, index.identities[split[name]]))
                     for name in ("train", "val", "test")}
        else:
            col = index.attribute_column(self.target)
            parts = {}
            for name, split in (("train", "train"), ("val", "valid"), ("test", "test")):
                rows = index.split_rows(split)
                parts[name] = (rows, index.attributes[rows, col].astype(np.int64))
        n_train, n_other = len(parts["train"][0]), len(parts["val"][0]) + len(parts["test"][0])
        self.check_train_size(
            n_train + n_other, n_other, f"CelebA (target {self.target!r})",
            "lower batch_size or identity_holdout." if self.target == "identity" else "lower batch_size.",
            held_out="validation and test",
        )
        used = np.concatenate([rows for rows, _ in parts.values()])
        check_images_present(index, used)
        if self.check_images:
            raise_if_unreadable([index.image_path(r) for r in used.tolist()],
                                f"the {len(used)} CelebA images used (listed in {IDENTITY_FILE})",
                                f"extract {IMAGE_DIR}/ again completely from the original archive (a damaged or "
                                "partial copy: an interrupted unzip leaves truncated or empty files).")
        self._train = self._dataset(index, *parts["train"], train=True)
        self._val = self._dataset(index, *parts["val"], train=False)
        self._test = self._dataset(index, *parts["test"], train=False)
