"""Federated-learning users: clients that each hold a private batch of B images sharing something.

A :class:`User` carries its private batch (what the client computes its update on) and its ground truth (label
histogram, dominant class, identity, attributes). Ground truth is for evaluation only: the attacker never sees it.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Optional

import numpy as np
import torch


@dataclass
class User:
    """One FL client and its private batch.

    Attributes:
        user_id: index of the user within the experiment (int) or a folder/identity name (str).
        images: float32 (B, C, H, W), pixels in [0, 1].
        labels: int64 (B,) class labels the client trains on (for label-free data sets: zeros).
        num_classes: number of classes of the task.
        dominant_class: the most frequent label in the batch (ground truth, evaluation only).
        meta: other ground truth (identity, attributes such as ``Male``, file names, ...).
    """

    user_id: Any
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    dominant_class: int
    meta: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """B, the number of images in the user's private batch (``images.shape[0]``)."""
        return int(self.images.shape[0])

    @property
    def label_histogram(self) -> torch.Tensor:
        """int64 (num_classes,) counts of each label in the batch."""
        return torch.bincount(self.labels, minlength=self.num_classes)


class UserSource:
    """Base class of user sources (the ``users:`` config group of attack.py).

    Subclasses set ``num_classes``, ``image_size`` and ``channels`` and implement :meth:`check` (fast validation,
    before any long work) and :meth:`users` (the list of :class:`User`).
    """

    num_classes: int
    image_size: int
    channels: int
    #: names of the classes by label (printed beside the ids, e.g. "5 Sandal"); None: ids only
    class_names: Optional[tuple] = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the users' images."""
        return (self.channels, self.image_size, self.image_size)

    def check(self) -> None:
        """Validate the data location and settings cheaply, before any long work (attack.py calls it first).

        Raises:
            NotImplementedError: always, here; subclasses override it and raise their own errors (missing data,
                impossible settings).
        """
        raise NotImplementedError

    def users(self) -> list[User]:
        """Build the users: a list of :class:`User` with float32 (B, C, H, W) images in [0, 1], C, H, W as
        :attr:`image_shape`.

        Raises:
            NotImplementedError: always, here; subclasses override it.
        """
        raise NotImplementedError

    def gallery(self, num_users: int) -> "UserSource":
        """The same source restricted to its users ``0 .. num_users - 1`` (same seed, data and batch size), e.g. a
        fixed impostor gallery for identity metrics: a split run (``first_user`` 10) and a full run then compare each
        user with the same photos. A shallow copy with ``num_users`` set and ``first_user`` 0 (when the source has
        it); the source itself is unchanged.

        Raises:
            ValueError: ``num_users`` < 1.
            NotImplementedError: a source without a ``num_users`` setting.
        """
        if num_users < 1:
            raise ValueError(f"a gallery needs at least one user, got num_users={num_users}")
        if not hasattr(self, "num_users"):
            raise NotImplementedError(f"{type(self).__name__} has no num_users setting to restrict")
        out = copy.copy(self)
        out.num_users = num_users
        if hasattr(out, "first_user"):
            out.first_user = 0
        return out


def plan_label_skewed_users(
    labels: torch.Tensor,
    num_users: int,
    batch_size: int,
    num_classes: int,
    dominant_fraction: float = 1.0,
    dirichlet_alpha: Optional[float] = None,
    seed: int = 0,
    first_user: int = 0,
) -> list[dict]:
    """Which images of a labelled split each label-skewed user gets (no image touched): the whole draw of
    :func:`build_label_skewed_users`, so a setting it cannot serve fails here, before any image or model is loaded
    (:meth:`FashionMNISTUsers.check` runs it on the split's labels).

    Args:
        labels: int (N,) class labels of the split; other args: see :func:`build_label_skewed_users`.

    Returns:
        one dict per user ``first_user .. first_user + num_users - 1``: ``user`` (id), ``indices`` (B int indices
        into the split, in batch order) and, without ``dirichlet_alpha``, ``designed_dominant`` (the dominant class
        the user was assigned).

    Raises:
        ValueError: as :func:`build_label_skewed_users`.
    """
    check_user_settings(batch_size, dominant_fraction, dirichlet_alpha, first_user)
    labels = torch.as_tensor(labels).long()
    rng = np.random.default_rng(seed)
    pools = {c: list(rng.permutation(np.flatnonzero(labels.numpy() == c))) for c in range(num_classes)}
    sizes = {c: len(p) for c, p in pools.items()}
    class_order = rng.permutation(num_classes)
    present = [c for c in range(num_classes) if sizes[c] > 0]
    if not present:
        raise ValueError("the split holds no images")
    dominant_order = [c for c in class_order if sizes[c] > 0]  # every class when the split holds them all
    n_dom = dominant_count(dominant_fraction, batch_size)  # images of the dominant class (no Dirichlet)
    if dirichlet_alpha is None and n_dom < batch_size and len(present) < 2:
        raise ValueError(f"dominant_fraction {dominant_fraction} leaves images to draw from other classes, but the split "
                         f"holds only class {present}: use dominant_fraction 1.0 or a split with more classes")

    def take(c: int, k: int, user: int, dominant: bool) -> list[int]:
        """Pop the next k image indices of class c from its pool (reshuffling the whole class, with a warning, when
        fewer than k are left); raises ValueError if the class has fewer than k images at all."""
        if k > sizes[c]:
            smallest = min(sizes[x] for x in present)
            if dirichlet_alpha is not None:
                fix = (f"its Dirichlet(alpha={dirichlet_alpha}) class mix put {k} of its B={batch_size} images in that "
                       f"class. Fix: lower users.batch_size (at most {smallest}, the smallest class, makes every mix "
                       "possible), raise users.dirichlet_alpha (mixes closer to uniform), or change users.seed")
            elif dominant:
                fix = (f"the dominant class takes round(dominant_fraction * B) = {k} images. Fix: lower "
                       "users.batch_size or users.dominant_fraction")
            else:
                fix = (f"the {batch_size - n_dom} images outside the dominant class are drawn at random from the other "
                       "classes. Fix: lower users.batch_size or raise users.dominant_fraction")
            raise ValueError(f"user {user} needs {k} images of class {c} but the split has only {sizes[c]}: {fix}")
        if len(pools[c]) < k:
            warnings.warn(f"class {c} pool exhausted: reshuffling, later users may share images with earlier ones")
            pools[c] = list(rng.permutation(np.flatnonzero(labels.numpy() == c)))
        out, pools[c] = pools[c][:k], pools[c][k:]
        return out

    plans: list[dict] = []
    for i in range(first_user + num_users):
        if dirichlet_alpha is not None:
            q = rng.dirichlet([dirichlet_alpha] * num_classes)
            counts = rng.multinomial(batch_size, q)
        else:
            dom = int(dominant_order[i % len(dominant_order)])
            others = [c for c in present if c != dom]
            counts = np.zeros(num_classes, dtype=int)
            counts[dom] = n_dom
            if batch_size - n_dom > 0:
                counts += np.bincount(rng.choice(others, size=batch_size - n_dom), minlength=num_classes)
        idx = [j for c in range(num_classes)
               for j in take(c, int(counts[c]), i, dirichlet_alpha is None and c == dom)]
        idx = [int(idx[j]) for j in rng.permutation(len(idx))]
        if i < first_user:
            continue
        plan = {"user": i, "indices": idx}
        if dirichlet_alpha is None:
            plan["designed_dominant"] = dom
        plans.append(plan)
    return plans


def build_label_skewed_users(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_users: int,
    batch_size: int,
    num_classes: int,
    dominant_fraction: float = 1.0,
    dirichlet_alpha: Optional[float] = None,
    seed: int = 0,
    first_user: int = 0,
) -> list[User]:
    """Build label-skewed users from a held-out labelled split.

    Each user gets B = ``batch_size`` images. Either (default) a dominant class takes
    ``round(dominant_fraction * B)`` images and the rest come from the other classes uniformly, or, when
    ``dirichlet_alpha`` is given, class proportions are drawn from Dirichlet(alpha) and the counts from a multinomial.
    Dominant classes go round-robin over a seeded permutation of the classes present in the split, so classes are
    balanced over users. The draw is :func:`plan_label_skewed_users` (labels only); this function gathers the images.

    Images are drawn without replacement from per-class pools shuffled once with ``seed``, users in order 0, 1, ...:
    user i gets the same images for the same seed, whatever ``num_users`` is, and no image is shared between users
    while the pool lasts; when a class pool runs out it is reshuffled (with a warning).

    Args:
        images: float (N, C, H, W) in [0, 1]; labels: int (N,).
        num_users: users to build (ids ``first_user .. first_user + num_users - 1``).
        batch_size: B, images per user.
        dominant_fraction: p in (0, 1], share of the dominant class.
        dirichlet_alpha: if set (> 0), use Dirichlet(alpha) class mixtures instead of ``dominant_fraction``.
        seed: seed of the pools, the class order and the mixtures.
        first_user: id of the first user returned (earlier users are built and skipped, to keep disjointness).

    Returns:
        list of :class:`User`, labels int64, ``meta`` holding the image indices into the split.

    Raises:
        ValueError: bad fraction/alpha/batch size/first user (:func:`check_user_settings`), a user needing more
            images of a class than the split holds (the message gives the advice of the mode: ``dominant_fraction``
            or ``batch_size`` for a dominant class; ``batch_size``, ``dirichlet_alpha`` or ``seed`` for a Dirichlet
            mix), or a fraction below 1 on a split with a single class.
    """
    labels = torch.as_tensor(labels).long()
    users: list[User] = []
    for plan in plan_label_skewed_users(labels, num_users, batch_size, num_classes, dominant_fraction,
                                        dirichlet_alpha, seed, first_user):
        idx = plan["indices"]
        y = labels[idx]
        hist = torch.bincount(y, minlength=num_classes)
        dominant = int(hist.argmax())  # ties (p <= 0.5) go to the designed dominant class, not the lowest id
        meta = {"indices": list(idx)}
        if "designed_dominant" in plan:
            dom = plan["designed_dominant"]
            meta["designed_dominant"] = dom
            if hist[dom] == hist.max():
                dominant = dom
        users.append(
            User(
                user_id=plan["user"],
                images=images[idx].float(),
                labels=y,
                num_classes=num_classes,
                dominant_class=dominant,
                meta=meta,
            )
        )
    return users


def dominant_count(dominant_fraction: float, batch_size: int) -> int:
    """Images of the dominant class in a batch of B: round(p * B) with halves rounded up (Python's round() sends
    2.5 to 2), at least 1. p is read as the decimal it is written as (``Fraction(str(p))``): in floating point
    0.7 * 45 is 31.499999999999996, which rounded down to 31 instead of 32."""
    exact = Fraction(str(dominant_fraction)) * batch_size
    return max(1, math.floor(exact + Fraction(1, 2)))


def check_image_settings(channels: int, image_size: int) -> None:
    """The users' image settings, checked in ``check()`` before any model loads (they failed in ``users()``, after).

    Raises:
        ValueError: ``channels`` not 1 or 3, or ``image_size`` not an integer >= 1 (naming the config key).
    """
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"users.init_args.channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"users.init_args.image_size must be an integer >= 1 (pixels), got {image_size!r}")


def check_user_settings(batch_size: int, dominant_fraction: float, dirichlet_alpha: Optional[float],
                        first_user: int) -> None:
    """The label-skew settings' ranges (see :func:`build_label_skewed_users`), checked before any data is loaded.

    Raises:
        ValueError: batch_size < 1, dominant_fraction outside (0, 1], dirichlet_alpha <= 0, first_user < 0.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"users.batch_size must be an integer >= 1, got {batch_size!r}")
    if not 0.0 < dominant_fraction <= 1.0:
        raise ValueError(f"users.dominant_fraction must be in (0, 1], got {dominant_fraction}")
    if dirichlet_alpha is not None and not dirichlet_alpha > 0:
        raise ValueError(f"users.dirichlet_alpha must be > 0 (or null for a dominant class), got {dirichlet_alpha}")
    if first_user < 0:
        raise ValueError(f"users.first_user must be >= 0, got {first_user}")


class FashionMNISTUsers(UserSource):
    """Label-skewed users built from the Fashion-MNIST *test* split (never seen by the victim or the prior).

    Args:
        num_users, batch_size, dominant_fraction, dirichlet_alpha, seed, first_user: see
            :func:`build_label_skewed_users`.
        root, image_size, channels: see :class:`datamodules.fashion_mnist.FashionMNISTDataModule`.
    """

    num_classes = 10

    @property
    def class_names(self) -> tuple:
        """torchvision's FashionMNIST.classes, by label (imported here: datamodules.fashion_mnist loads Lightning)."""
        from datamodules.fashion_mnist import CLASSES

        return CLASSES

    def __init__(
        self,
        num_users: int = 4,
        batch_size: int = 10,
        dominant_fraction: float = 1.0,
        dirichlet_alpha: Optional[float] = None,
        seed: int = 0,
        first_user: int = 0,
        root: Optional[str] = None,
        image_size: int = 32,
        channels: int = 1,
    ) -> None:
        if num_users < 1:
            raise ValueError(f"num_users must be >= 1, got {num_users}")
        self.num_users = num_users
        self.batch_size = batch_size
        self.dominant_fraction = dominant_fraction
        self.dirichlet_alpha = dirichlet_alpha
        self.seed = seed
        self.first_user = first_user
        self.root = root
        self.image_size = image_size
        self.channels = channels

    def check(self) -> None:
        """Fail early (before any model is loaded) when the settings are impossible or the test split (the users'
        only data) is missing or damaged: it is read once here (about 0.05 s), so a truncated or corrupt idx file is
        one ValueError naming it and the fix instead of a traceback after the models load. The users' whole draw
        is then run on its labels (:func:`plan_label_skewed_users`), so a B some class cannot serve fails here too,
        with the advice of the mode (dominant class or Dirichlet mix).

        Raises:
            ValueError: settings out of range (:func:`check_user_settings`), a damaged idx file
                (:func:`datamodules.fashion_mnist.read_idx`), or a user needing more images of a class than the
                split holds.
            DataNotFoundError: the test split's files are missing.
        """
        from datamodules.fashion_mnist import load_split

        check_user_settings(self.batch_size, self.dominant_fraction, self.dirichlet_alpha, self.first_user)
        check_image_settings(self.channels, self.image_size)
        _, labels = load_split("test", self.root)  # users come from the test split alone; reading it finds damage
        plan_label_skewed_users(torch.from_numpy(labels.astype(np.int64)), self.num_users, self.batch_size,
                                self.num_classes, self.dominant_fraction, self.dirichlet_alpha, self.seed,
                                self.first_user)

    def users(self) -> list[User]:
        """Run :meth:`check`, load the test split and build the users with :func:`build_label_skewed_users`.

        Returns:
            ``num_users`` users (ids ``first_user ..``), images float32 (B, channels, image_size, image_size) in
            [0, 1] (see :func:`datamodules.fashion_mnist.to_tensor_images`), labels int64 (B,) in 0..9.

        Raises:
            DataNotFoundError, ValueError: from :meth:`check` or :func:`build_label_skewed_users`.
        """
        from datamodules.fashion_mnist import load_split, to_tensor_images

        self.check()
        raw, labels = load_split("test", self.root)
        x = to_tensor_images(raw, self.image_size, self.channels)
        return build_label_skewed_users(
            x,
            torch.from_numpy(labels.astype(np.int64)),
            num_users=self.num_users,
            batch_size=self.batch_size,
            num_classes=self.num_classes,
            dominant_fraction=self.dominant_fraction,
            dirichlet_alpha=self.dirichlet_alpha,
            seed=self.seed,
            first_user=self.first_user,
        )
