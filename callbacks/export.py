"""Export a trained model (safetensors / diffusers folder) with a model card, atomically, during and after fit."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from inversion.fsutils import fsync_dir, fsync_tree, publish_dir

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def atomic_replace_dir(tmp_dir: Path, target: Path) -> None:
    """Move a finished folder ``tmp_dir`` into place at ``target``; an older ``target`` is swapped out, then removed.

    Two renames on the same file system: a reader sees the old folder or the new one complete, never a half-written
    one, but between the renames ``target`` is briefly absent (POSIX has no atomic swap of non-empty folders). If
    the second rename fails, the old folder is put back before the error propagates. ``tmp_dir``'s files are
    fsynced before the renames and the parent folder after them (:func:`inversion.fsutils.fsync_tree`, best
    effort), so a power loss cannot leave ``target`` with empty or truncated weights.

    Raises:
        OSError: a rename failed (``target`` is then as it was).
    """
    fsync_tree(tmp_dir)
    old = None
    if target.exists():
        old = target.with_name(target.name + f".old-{int(time.time() * 1000)}")
        target.rename(old)
    try:
        tmp_dir.rename(target)
    except BaseException:
        if old is not None and not target.exists():
            old.rename(target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_export_parent(dirpath: str | Path, create: bool = False) -> None:
    """Check that the export folder ``dirpath`` (``~`` expanded) can be written: its parent folder must exist and be
    writable, or be creatable (its nearest existing ancestor a writable folder), and ``dirpath`` itself must not be
    a file.

    ``create`` false (train.py's check before anything is created): looks only (``os.access``, which root passes).
    ``create`` true (:meth:`ExportModel.on_fit_start`): creates the parent folders (the export would create them at
    its end anyway) and makes and removes a temporary folder in the parent, as the export does, so whatever the file
    system refuses is found before training.

    Raises:
        NotADirectoryError: ``dirpath`` or one of its ancestors is a file (e.g. a path under a regular file).
        PermissionError: the parent (or its nearest existing ancestor) is not writable.
        OSError: creating the parent or the probe folder failed otherwise; the message names the path.
    """
    target = Path(os.path.expanduser(str(dirpath)))
    fix = "choose an ExportModel.dirpath in a writable folder"
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"export folder {dirpath} is a file, not a folder; remove it or {fix}")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise NotADirectoryError(
            f"export folder {dirpath} cannot be created: {ancestor} is a file, not a folder; {fix}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"export folder {dirpath} cannot be created: {ancestor} is not writable; {fix}")
    if not create:
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.probe.", dir=target.parent))
    except FileExistsError as exc:  # mkdir of a path held by a file
        raise NotADirectoryError(f"export folder {dirpath} cannot be created: {exc.filename} is a file; {fix}") from exc
    except OSError as exc:
        raise type(exc)(f"export folder {dirpath} cannot be written: creating a folder in {target.parent} failed "
                        f"({exc.strerror or exc}); {fix}") from exc


def check_export_target(dirpath: str | Path, overwrite: bool = False, resuming: bool = False) -> None:
    """The export folder check of :class:`ExportModel`, on its arguments alone (train.py runs it on the config
    before creating the run directory or any logger; the callback repeats it at fit start): the folder must be
    creatable (:func:`check_export_parent`, looking only) and, on a fresh run, new.

    Raises:
        NotADirectoryError, PermissionError: see :func:`check_export_parent` (e.g. ``dirpath`` under a regular
            file), before any training.
        FileExistsError: ``dirpath`` exists, the run restores no checkpoint (``resuming`` false) and ``overwrite`` is
            false.
    """
    check_export_parent(dirpath)
    if Path(os.path.expanduser(str(dirpath))).exists() and not overwrite and not resuming:
        raise FileExistsError(
            f"export folder {dirpath} already exists; choose another ExportModel.dirpath, resume with "
            "--ckpt_path last, or set overwrite: true for this callback"
        )


class ExportModel(Callback):
    """Write ``pl_module.export(folder)`` plus ``MODEL_CARD.md`` and ``training_summary.json`` into ``dirpath``.

    The export is written to a temporary folder next to ``dirpath`` and renamed into place, so a reader never sees
    a half-written checkpoint. Wall time accumulates across resumes (it is stored in the Lightning checkpoint).

    A periodic export at step N waits for that step's validation when one runs (Lightning validates after the
    batch-end hooks), so its summary's metrics are step N's; when no validation runs at step N it is written before
    the next batch's optimiser step, with the weights of step N. ``training_summary.json`` names the step of the
    validation its metrics come from (``validated_at_step``; None before the first validation).

    Args:
        dirpath: export folder (e.g. ``checkpoints/fashion_mnist/ddpm_32``; ``~`` expanded).
        every_n_steps: also export every so many optimiser steps (0: only at the end of fit).
        dtype: 'float32', 'float16' or 'bfloat16' for the exported weights.
        overwrite: allow replacing an existing folder on a fresh (non-resumed) run.
        sample_grid: for modules with ``sample(n, steps, seed)``: save a seeded DDIM grid as ``samples.png``
            (``sample_grid_size`` images, 8 per row, ``sample_steps`` DDIM steps, seed 0; the default 64 x 100 steps
            takes minutes on a CPU: turn it off or shrink it for quick trials).
        sample_grid_size, sample_steps: the grid's number of samples (>= 1) and DDIM steps (>= 1, and at most the
            module's ``scheduler.config.num_train_timesteps``: checked at fit start, :meth:`check_sampling`).
        title: first line of the model card.

    Several ExportModel callbacks may share a Trainer (e.g. float32 and float16 exports) when their ``dirpath``
    differ: the state key names the folder (:attr:`state_key`).

    Raises:
        ValueError: at construction, ``sample_grid_size`` or ``sample_steps`` < 1; at fit start, before training,
            ``sample_steps`` above the module's number of training timesteps (:meth:`check_sampling`).
        FileExistsError: at fit start, when ``dirpath`` exists, the run is not a resume and ``overwrite`` is false.
        NotADirectoryError, PermissionError, OSError: at fit start, before training, when ``dirpath`` cannot be
            created or written (e.g. it lies under a regular file): :func:`check_export_parent`.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 0,
        dtype: str = "float32",
        overwrite: bool = False,
        sample_grid: bool = True,
        sample_grid_size: int = 64,
        sample_steps: int = 100,
        title: str = "model",
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"ExportModel.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dirpath = Path(os.path.expanduser(str(dirpath)))  # as Lightning's ModelCheckpoint expands its dirpath
        self.every_n_steps = every_n_steps
        self.dtype = dtype
        self.overwrite = overwrite
        if sample_grid_size < 1 or sample_steps < 1:
            raise ValueError(f"ExportModel: sample_grid_size and sample_steps must be >= 1, got {sample_grid_size}, "
                             f"{sample_steps} (set sample_grid: false for no grid)")
        self.sample_grid = sample_grid
        self.sample_grid_size = sample_grid_size
        self.sample_steps = sample_steps
        self.title = title
        self.wall_time_s = 0.0
        self._t0: Optional[float] = None
        self._pending_step: Optional[int] = None  # a periodic export waiting for its step's validation
        self._exported_step: Optional[int] = None  # the step of the last periodic export
        self._validated_at_step: Optional[int] = None
        self.command = " ".join(shlex.quote(a) for a in ["python"] + sys.argv)

    def check_target(self, resuming: bool) -> None:
        """Raise FileExistsError when a fresh run would replace an existing export, NotADirectoryError /
        PermissionError when the folder cannot be created (:func:`check_export_target`)."""
        check_export_target(self.dirpath, self.overwrite, resuming)

    @property
    def state_key(self) -> str:
        """``ExportModel{'dirpath': '<dirpath>'}``: one state per export folder, so that several exports (e.g. a
        float32 and a float16 one into two folders) can share a Trainer. Checkpoints of the older code keep the
        state under ``ExportModel`` (the class name): :meth:`on_load_checkpoint` moves it to this key."""
        return self._generate_state_key(dirpath=str(self.dirpath))

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Find this callback's state in a checkpoint saved under another key and move it under :attr:`state_key`
        (Lightning then restores it with :meth:`load_state_dict`): the plain class name ``ExportModel`` of
        checkpoints written before ExportModel had a state key (Lightning's own legacy fallback looks up the class
        object, not its name), or, when this Trainer has one ExportModel and the checkpoint one ExportModel state,
        that state under another folder's key (the export folder was renamed between the runs). Lightning warns
        about the unmatched old key before this hook runs; the state is restored all the same."""
        states = checkpoint.get("callbacks")
        if not isinstance(states, dict) or self.state_key in states:
            return
        legacy = type(self).__qualname__
        if legacy in states:
            states[self.state_key] = states.pop(legacy)
            return
        mine = [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, ExportModel)]
        theirs = [k for k in states if isinstance(k, str) and k.startswith(legacy + "{")]
        if len(mine) == 1 and len(theirs) == 1:
            states[self.state_key] = states.pop(theirs[0])

    def state_dict(self) -> dict:
        return {"wall_time_s": self._elapsed(), "validated_at_step": self._validated_at_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.wall_time_s = float(state_dict.get("wall_time_s", 0.0))
        self._validated_at_step = state_dict.get("validated_at_step")

    def _elapsed(self) -> float:
        return self.wall_time_s + (time.time() - self._t0 if self._t0 is not None else 0.0)

    def check_sampling(self, pl_module) -> None:
        """Refuse a sample grid the export could not draw: with ``sample_grid`` on and a module that has ``sample``
        and a ``scheduler`` whose config has ``num_train_timesteps`` T, ``sample_steps`` must be <= T (DDIM takes
        at most one step per training timestep; diffusers' ``set_timesteps`` refuses more).

        Raises:
            ValueError: ``sample_steps`` > T, naming this callback's ``sample_steps`` and
                ``model.init_args.num_train_timesteps``.
        """
        if not (self.sample_grid and hasattr(pl_module, "sample")):
            return
        config = getattr(getattr(pl_module, "scheduler", None), "config", None)
        steps = config.get("num_train_timesteps") if isinstance(config, dict) else None
        if isinstance(steps, int) and self.sample_steps > steps:
            raise ValueError(
                f"ExportModel (dirpath {self.dirpath}): sample_steps {self.sample_steps} exceeds the model's "
                f"num_train_timesteps {steps} (model.init_args.num_train_timesteps; DDIM takes at most one step per "
                f"training timestep): set this callback's init_args.sample_steps to at most {steps}, or "
                "sample_grid: false")

    def on_fit_start(self, trainer, pl_module) -> None:  # after a checkpoint restore, before the first step
        """Before training: refuse a sample grid the export could not draw (:meth:`check_sampling`), an existing
        folder on a fresh run (:meth:`check_target`) and, on rank 0, create the parent folders and write a probe
        folder there (:func:`check_export_parent`), so an export folder that cannot be written fails now, not after
        the training."""
        self.check_sampling(pl_module)
        self.check_target(resuming=bool(trainer.ckpt_path))
        if getattr(trainer, "is_global_zero", True):
            check_export_parent(self.dirpath, create=True)
        self._t0 = time.time()
        from lightning_modules.resumable import run_seed

        self._seed_everything = run_seed()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._pending_step = step  # written after this step's validation, or before the next step

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._validated_at_step = trainer.global_step
        self._flush(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._flush(trainer, pl_module)  # no validation ran at the pending step: the weights are still step N's

    def _flush(self, trainer, pl_module) -> None:
        # once per step: with accumulate_grad_batches > 1 several batches end at one global step
        if (self._pending_step is not None and self._pending_step == trainer.global_step
                and self._pending_step != self._exported_step):
            self.export(trainer, pl_module)
            self._exported_step = self._pending_step
        self._pending_step = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self._pending_step = None
        self.export(trainer, pl_module)

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Add the test metrics (e.g. test/acc on the held-out split) to the exported summary and model card."""
        summary_path = self.dirpath / "training_summary.json"
        if not summary_path.is_file():
            return
        summary = json.loads(summary_path.read_text())
        summary["metrics"].update(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/") and torch.is_tensor(v)}
        )
        for name, text in (("training_summary.json", json.dumps(summary, indent=2, default=str) + "\n"),
                           ("MODEL_CARD.md", render_model_card(summary))):
            tmp = self.dirpath / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.dirpath / name)

    @rank_zero_only
    def export(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the export folder now (rank 0 only), replacing ``dirpath`` atomically via :func:`atomic_replace_dir`.

        Contents: ``pl_module.export(tmp, dtype=...)`` (the module's own weights format), ``training_summary.json``
        (title, command, global step, the epochs those steps amount to (:func:`epochs_trained`: ``epoch`` = full
        epochs completed, ``epochs_trained`` = fractional, ``batches_per_epoch``, ``accumulate_grad_batches``), wall
        time in seconds, the scalar ``callback_metrics``, hparams, precision, torch version), ``MODEL_CARD.md``
        (:func:`render_model_card`) and, when ``sample_grid`` and the module has ``sample``, ``samples.png``: a grid,
        8 images per row (all in one row when fewer; the last row may be partial), of ``sample(sample_grid_size,
        num_inference_steps=sample_steps, seed=0)`` (64 and 100 by default: an 8x8 grid).
        The module is put in eval mode meanwhile and its previous mode restored; the temporary folder is removed if
        anything fails before it is moved into place.
        """
        self.dirpath.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.dirpath.name}.", dir=self.dirpath.parent))
        publish_dir(tmp)  # mkdtemp's 0700 would survive the rename
        was_training = pl_module.training
        pl_module.eval()
        try:
            pl_module.export(tmp, dtype=_DTYPES[self.dtype])
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
            summary = {
                "title": self.title,
                "command": self.command,
                "global_step": trainer.global_step,
                **epochs_trained(trainer),
                "wall_time_s": round(self._elapsed(), 1),
                "metrics": metrics,
                "validated_at_step": self._validated_at_step,
                "hparams": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(pl_module.hparams).items()},
                "precision": str(trainer.precision),
                "seed_everything": getattr(self, "_seed_everything", None),
                "torch": torch.__version__,
            }
            if self.sample_grid and hasattr(pl_module, "sample"):
                from PIL import Image

                from inversion.logging_utils import to_uint8_hwc

                n, k = self.sample_grid_size, self.sample_steps
                imgs = pl_module.sample(n, num_inference_steps=k, seed=0)
                Image.fromarray(to_uint8_hwc(imgs, nrow=8)).save(tmp / "samples.png")
                summary["sample_grid"] = f"samples.png ({n} seeded DDIM samples, {k} steps, EMA weights, seed 0)"
            (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
            (tmp / "MODEL_CARD.md").write_text(render_model_card(summary))
            atomic_replace_dir(tmp, self.dirpath)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            pl_module.train(was_training)


def epochs_trained(trainer: Trainer) -> dict:
    """How many epochs the optimiser steps so far amount to, for the training summary.

    Lightning's ``trainer.current_epoch`` counts an epoch as done when fit stops at ``max_steps`` part-way through
    it (250 steps of an 859-batch epoch read as 1), so it is not used. Instead, with ``B`` training batches per epoch
    (``trainer.num_training_batches``, after ``limit_train_batches``) and ``A = accumulate_grad_batches``, an epoch
    takes ``ceil(B / A)`` optimiser steps (Lightning also steps on an epoch's last, partial accumulation), and

    - ``epochs_trained`` = ``global_step / ceil(B / A)`` (= ``global_step * A / B`` when A divides B), rounded to 4
      decimals: the fraction of the training split the optimiser has seen;
    - ``epoch`` = ``global_step // ceil(B / A)``: full epochs completed.

    Both assume the batches per epoch did not change across resumes. None when ``B`` is unknown (an iterable dataset
    without a length, or no fit running) or 0. Returns ``{"epoch", "epochs_trained", "batches_per_epoch",
    "accumulate_grad_batches"}``.
    """
    batches = getattr(trainer, "num_training_batches", None)  # float('inf') without a length; None: not fitting
    accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
    batches = int(batches) if isinstance(batches, (int, float)) and math.isfinite(batches) and batches > 0 else None
    if batches is None:
        return {"epoch": None, "epochs_trained": None, "batches_per_epoch": None, "accumulate_grad_batches": accumulate}
    steps_per_epoch = -(-batches // accumulate)
    return {
        "epoch": trainer.global_step // steps_per_epoch,
        "epochs_trained": round(trainer.global_step / steps_per_epoch, 4),
        "batches_per_epoch": batches,
        "accumulate_grad_batches": accumulate,
    }


def _epochs_line(summary: dict) -> str:
    """The model card's steps line: optimiser steps and the epochs they amount to (:func:`epochs_trained`)."""
    steps = f"- optimiser steps: {summary['global_step']}"
    if summary.get("epochs_trained") is None:
        if "batches_per_epoch" in summary:  # this code's summary, no epoch length known
            return steps + " (epochs: unknown, no length of the training data loader)"
        # a summary of the older code: its 'epoch' was Lightning's current_epoch, 1 too high after a partial epoch
        return steps + f" (Lightning's epoch counter: {summary.get('epoch')}; it counts a partly trained epoch)"
    acc = summary.get("accumulate_grad_batches") or 1
    per = f"{summary['batches_per_epoch']} batches per epoch" + (f", {acc} per optimiser step" if acc > 1 else "")
    return (steps + f" = {summary['epochs_trained']:g} epochs of the training split ({per}; full epochs "
            f"completed: {summary['epoch']})")


def render_model_card(summary: dict) -> str:
    """Markdown model card from a training summary dict (command, steps, wall time, final metrics)."""
    lines = [
        f"# {summary['title']}",
        "",
        "Produced by this project's own `train.py`:",
        "",
        "```bash",
        summary["command"],
        "```",
        "",
        _epochs_line(summary),
        f"- wall time: {summary['wall_time_s'] / 60:.1f} min ({summary['wall_time_s']:.0f} s), precision {summary['precision']}, torch {summary['torch']}"
        + (f", seed_everything {summary['seed_everything']}" if summary.get("seed_everything") is not None else ""),
        "- final logged metrics" + (f" (validation at step {summary['validated_at_step']}):"
                                      if summary.get("validated_at_step") is not None else ":"),
    ]
    lines += [f"  - `{k}`: {v:.4f}" for k, v in sorted(summary["metrics"].items())]
    if "sample_grid" in summary:
        lines += ["", f"![samples](samples.png) — {summary['sample_grid']}"]
    lines += ["", "Hyper-parameters:", "", "```json", json.dumps(summary["hparams"], indent=2, default=str), "```", ""]
    return "\n".join(lines)
