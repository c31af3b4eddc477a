"""Resuming training runs: the state Lightning checkpoints leave out (the global random number generators'
states), the warm start's provenance (``init_weights``) and the run's seed (:func:`run_seed`).

LightningCLI seeds every run (``seed_everything``) at start, a resumed run included, and Lightning restores the RNG
states only for its own spawn launcher. Without this, a run resumed from ``last.ckpt`` replays the random stream of
its first steps (the DDPM's noise and timesteps, the classifier's augmentation and shuffling) instead of continuing
it. :class:`Resumable` stores the torch (CPU and every CUDA device), numpy and ``random`` states in the
checkpoint and sets them back when training starts again.
"""

from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch

RNG_KEY = "rng_states"


def collect_rng_states() -> dict[str, Any]:
    """The global RNG states in types ``torch.load(weights_only=True)`` accepts (Lightning loads checkpoints so):
    ``torch`` (uint8 tensor), ``cuda`` (list, one per device; [] without CUDA), ``numpy`` (``np.random.get_state()``
    with its key array as an int64 tensor) and ``python`` (``random.getstate()``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Set the global RNG states from :func:`collect_rng_states`' dict. CUDA states are set only when the number
    of devices matches (a checkpoint from another machine keeps this machine's CUDA streams)."""
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])


def run_seed() -> Optional[int]:
    """The run's seed as Lightning's ``seed_everything`` recorded it (the ``PL_GLOBAL_SEED`` environment variable;
    train.py: the config's ``seed_everything``), or None when no seed was set. Exported configs record it."""
    env = os.environ.get("PL_GLOBAL_SEED")
    return int(env) if env is not None else None


class Resumable:
    """LightningModule mixin (put it before ``LightningModule`` in the bases) for train.py's resumes:

    - checkpoints carry the global RNG states (:data:`RNG_KEY`), and a run resumed from one sets them at
      ``on_fit_start``: after the CLI's re-seeding and the module's restore, before Lightning builds the training
      DataLoader iterator (which draws the shuffling seed and the workers' base seed from the global stream, so a
      restore at ``on_train_start`` came one draw late and replayed epoch 0's shuffling and worker augmentation).
      Strategies that restore the checkpoint only after ``on_fit_start`` get the states at ``on_train_start``, as
      before. The sanity check runs under Lightning's ``isolate_rng`` and leaves the stream alone. Rank 0 writes
      the checkpoint, so every rank resumes with rank 0's states (as ``seed_everything`` gives every rank the same
      seed). Checkpoints without the key (older runs) resume as before;
    - a resume with another ``lr`` or ``weight_decay`` (:attr:`optimiser_hparams`) is refused (see
      :meth:`on_load_checkpoint`);
    - the ``init_weights`` hparam comes back from the checkpoint when the module was built without it: train.py
      drops ``model.init_args.init_weights`` when it restores a checkpoint (the checkpoint's weights replace them,
      and the warm-start folder may be gone), and exported model cards should still name the warm start.
    """

    _resume_rng: Optional[dict] = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[RNG_KEY] = collect_rng_states()

    #: hparams that configure_optimizers reads but a resume cannot change (Lightning restores the saved optimiser)
    optimiser_hparams: tuple[str, ...] = ("lr", "weight_decay")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Keep the checkpoint's RNG states for the resume, and refuse, before anything is trained, a resume whose
        :attr:`optimiser_hparams` differ from the checkpoint's: Lightning restores the saved optimiser (its lr,
        initial_lr and weight decay) and the schedulers' base_lrs over those :meth:`configure_optimizers` builds, so
        new values had no effect on training while the exported model card recorded them.

        Raises:
            ValueError: only while fitting (not for ``load_from_checkpoint`` or validate/test), naming both values.
        """
        super().on_load_checkpoint(checkpoint)
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self.check_resume_hparams(checkpoint.get("hyper_parameters") or {})
        self._resume_rng = checkpoint.get(RNG_KEY)
        saved = (checkpoint.get("hyper_parameters") or {}).get("init_weights")
        if saved and not self.hparams.get("init_weights"):
            self.hparams["init_weights"] = saved

    def check_resume_hparams(self, saved: dict) -> None:
        """Refuse resuming from a checkpoint whose hyper-parameters ``saved`` hold another value of one of
        :attr:`optimiser_hparams` than this module (see :meth:`on_load_checkpoint`); train.py calls it before fit,
        so that the refusal comes before any logger starts in the resumed run's directory.

        Raises:
            ValueError: naming each changed value (``lr 0.0005 -> 0.001``) and what to do instead."""
        changed = [f"{k} {saved[k]!r} -> {self.hparams[k]!r}" for k in self.optimiser_hparams
                   if k in saved and k in self.hparams and float(saved[k]) != float(self.hparams[k])]
        if changed:
            raise ValueError(
                f"model.init_args: {', '.join(changed)} on a resume, but a resumed run keeps the checkpoint's "
                "optimiser (these values would be ignored). Resume with the checkpoint's values, or train on from "
                "the exported weights in a fresh run (model.init_args.init_weights) with the new ones"
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._restore_rng()

    def on_train_start(self) -> None:
        super().on_train_start()
        self._restore_rng()  # strategies with restore_checkpoint_after_setup load the checkpoint after on_fit_start

    def _restore_rng(self) -> None:
        if self._resume_rng is not None:
            set_rng_states(self._resume_rng)
            self._resume_rng = None
