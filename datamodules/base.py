"""Shared parts of the project's training data modules (Fashion-MNIST, CelebA, image folders)."""

from __future__ import annotations

from typing import Callable, Optional

from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset


class ImageDataModule(LightningDataModule):
    """Base of the data modules that train the victim, the evaluator and the DDPM prior.

    Holds the arguments every module shares and builds the three DataLoaders: training shuffles and drops the last
    partial batch (so every optimiser step sees ``batch_size`` images); validation and test keep every image, in
    batches of ``eval_batch_size`` (``batch_size`` when None). Subclasses fill ``_train`` / ``_val`` / ``_test``
    in ``setup`` (``_test`` None: the test loader reuses the validation set) and may set ``_collate_train``.

    Args:
        root: where the data lives (each subclass documents its layout).
        image_size: output side in pixels, >= 8.
        batch_size: training batch size, >= 1.
        num_workers: DataLoader worker processes (0: load in the main process).
        augment: random horizontal flips for training.
        seed: seed of the subclass's validation split.

    Raises:
        ValueError: image_size < 8 or batch_size < 1 (naming the config key). Subclasses' ``setup`` raises one too
            when fewer than ``batch_size`` images are left for training (:meth:`check_train_size`).
    """

    eval_batch_size: Optional[int] = None
    _collate_train: Optional[Callable] = None

    def __init__(
        self, root: Optional[str], image_size: int, batch_size: int, num_workers: int, augment: bool, seed: int
    ) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"data.init_args.image_size must be >= 8, got {image_size}")
        if batch_size < 1:
            raise ValueError(f"data.init_args.batch_size must be >= 1, got {batch_size}")
        self.root = root
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.seed = seed
        self._train: Optional[Dataset] = None
        self._val: Optional[Dataset] = None
        self._test: Optional[Dataset] = None

    def check_train_size(self, total: int, n_val: int, source: str, fix: str, held_out: str = "validation") -> None:
        """The split check every subclass runs in ``setup`` before building its datasets: of ``total`` images,
        ``n_val`` held out for validation (or in other splits) must leave at least ``batch_size`` for training. The
        training loader drops the last partial batch, so fewer would run no training step at all and train.py
        would export an untrained model.

        Args:
            total: images available for training and validation; n_val: those not used for training.
            source: what holds them (a folder, "the Fashion-MNIST train split"), for the message.
            fix: the settings to change (e.g. "lower batch_size or val_size").
            held_out: what the ``n_val`` images are for, for the message.

        Raises:
            ValueError: ``n_val`` < 0 or ``total - n_val`` < ``batch_size``; the message gives the numbers and
                ``fix``.
        """
        if n_val < 0:
            raise ValueError(f"{source}: {n_val} images held out for {held_out}; it must be >= 0. Fix: {fix}")
        if total - n_val < self.batch_size:
            raise ValueError(
                f"{source} holds {total} images, {total - n_val} for training after holding out {n_val} for "
                f"{held_out}: fewer than data.init_args.batch_size={self.batch_size} (the last partial batch is "
                f"dropped, so no training step would run). Fix: {fix}"
            )

    def _eval_loader(self, dataset: Optional[Dataset]) -> DataLoader:
        return DataLoader(dataset, batch_size=self.eval_batch_size or self.batch_size, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self._train,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=self._collate_train,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._val)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._test if self._test is not None else self._val)
