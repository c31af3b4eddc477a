"""Train the victim classifier, the evaluator or the DDPM prior with LightningCLI.

    python train.py --config configs/train/ddpm_fashion_mnist.yaml
    python train.py --config configs/train/victim_fashion_mnist.yaml
    python train.py --config configs/train/ddpm_fashion_mnist.yaml --ckpt_path last     # resume the newest run

A config pins one run: ``model`` (class_path/init_args), ``data``, ``trainer`` (with ``logger`` and
``callbacks``). Group files under configs/data and configs/model are given to their group's option
(``--data configs/data/fashion_mnist.yaml``, ``--model configs/model/evaluator_convnet.yaml``; not to ``--config``,
whose files hold the whole config; the configs/train files include configs/model ones by path).
W&B runs offline unless ``WANDB_MODE`` says otherwise: train.py sets ``WANDB_MODE=offline`` when it is unset, and the
shipped configs' WandbLogger have no ``offline: true`` (Lightning's ``offline=True`` forces ``WANDB_MODE=dryrun`` over
any setting), so ``WANDB_MODE=online python train.py ...`` logs online. After fit, classifiers are tested on the test
split.

Last checkpoint at the end. A ModelCheckpoint with ``save_last: true`` writes ``last.ckpt`` every
``every_n_train_steps``, but Lightning writes it at the end of training only when no checkpoint was ever saved: a
run stopped by ``max_time`` or a ``max_steps`` off that grid would resume up to N-1 steps before its export.
train.py adds :class:`SaveLastAtTrainEnd`, which then writes ``last.ckpt`` at the final step, from the final batch's
``on_train_batch_end`` as Lightning's own checkpoints are (before the stopped epoch is counted as completed, so a
resume trains the rest of that epoch).

Run directories. Every fresh run writes into a new directory ``<default_root_dir>/<YYYYmmdd-HHMMSS>-<6 hex>``
(``train_runs/`` when ``trainer.default_root_dir`` is unset), printed at start. Every configured path under
``default_root_dir`` is re-rooted into it before anything is built: ``trainer.default_root_dir`` itself, the
loggers' ``save_dir``/``dir`` and the ``dirpath`` of ``ModelCheckpoint``/``OnExceptionCheckpoint`` callbacks (so
``train_runs/x/ckpt`` becomes ``train_runs/x/<run>/ckpt``). Paths outside ``default_root_dir`` are left alone (a
warning before training names those the run will share with every other run); so are export folders
(``callbacks.export.ExportModel``), which are replaced atomically where configured. The config as given is saved as
``<run>/config.yaml`` (written to a temporary file, then linked into place; never over an existing file) at fit
start: after the pre-training checks and the weights' restore, before Lightning restores the optimiser and loop state
(so a resume that fails there still leaves its config-resume file, and a run that fails in its sanity check keeps
its config beside its logs).

A different root on the command line. ``--trainer.default_root_dir DIR`` replaces the config's root as a whole:
the paths under the config's own ``default_root_dir`` (``train_runs/`` when it has none) move with it, so
``--config configs/train/victim_fashion_mnist.yaml --trainer.default_root_dir /tmp/v`` writes W&B into
``/tmp/v/<run>/`` and checkpoints into ``/tmp/v/<run>/ckpt`` (not into ``train_runs/victim_fashion_mnist``), and
``--ckpt_path last`` with the same flag continues the newest run under ``/tmp/v``. The saved config names those
paths under ``DIR``. (Found by parsing the command line once more without that flag; a root set another way, e.g. in
a second ``--config``, moves only the paths under it, and the warning names the rest.)

Before anything is created (run directory, loggers): a fresh run (no ``--ckpt_path``) whose ExportModel folder
exists fails unless that callback has ``overwrite: true``, and any run whose export folder cannot be created (e.g. a
path under a regular file, or in a folder without write permission) fails too
(:func:`callbacks.export.check_export_parent`; ExportModel tries a probe folder there again at fit start).

Resuming. ``--ckpt_path last`` continues the newest run directory under ``default_root_dir`` that holds a
``last.ckpt`` where its ModelCheckpoint writes (``<run>/ckpt/last.ckpt`` for the shipped configs): training goes on
from that checkpoint's step and writes into that same directory, whose config is saved as ``config-resume-<k>.yaml``
(the first free k) at fit start. With no such checkpoint it fails before
building anything, naming ``default_root_dir``. A
config whose checkpoint folder lies outside ``default_root_dir`` (shared by every run) continues from the newest
``last.ckpt`` there, in a fresh run directory. ``~`` in the paths is expanded, as Lightning does. An
explicit ``--ckpt_path some/file.ckpt`` restores that file into a fresh run directory. Lightning's Timer restores
the elapsed time too: a run that stopped at ``trainer.max_time`` needs a larger ``--trainer.max_time`` to go on.

Several processes: the directory is chosen by rank 0; processes started by Lightning's own launcher
(``--trainer.devices N`` with ``ddp``) inherit it through ``$GRADINV_TRAIN_RUN_DIR``. Under torchrun/SLURM the other
ranks create nothing themselves (loggers, checkpoints and the config are written by rank 0 only).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("WANDB_MODE", "offline")

from lightning import Callback, LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback  # noqa: E402

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RUN_DIR_ENV = "GRADINV_TRAIN_RUN_DIR"
DEFAULT_ROOT = "train_runs"
LAST_CKPT = "last.ckpt"
RUN_NAME = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")
_CKPT_CALLBACKS = ("lightning.pytorch.callbacks.ModelCheckpoint", "lightning.pytorch.callbacks.OnExceptionCheckpoint")
_LOGGER_PATH_KEYS = ("save_dir", "dir", "root_dir")


class ConfigMismatchError(ValueError):
    """Data and model disagree on image size, channels or classes."""


class NoCheckpointError(FileNotFoundError):
    """``--ckpt_path last`` found no run directory with a last checkpoint under ``default_root_dir``."""


def check_data_model_agree(model: LightningModule, data: LightningDataModule) -> None:
    """Raise :class:`ConfigMismatchError` when model and data disagree on image_size, channels or num_classes."""
    hp = model.hparams
    pairs = [
        ("image_size", hp.get("image_size"), getattr(data, "image_size", None)),
        ("channels", hp.get("in_channels"), getattr(data, "channels", None)),
        ("num_classes", hp.get("num_classes"), getattr(data, "num_classes", None)),
    ]
    import inspect

    data_options = inspect.signature(type(data).__init__).parameters
    for name, m, d in pairs:
        if m is not None and d is not None and m != d:
            model_key = f"model.init_args.{'in_channels' if name == 'channels' else name}"
            if name in data_options:
                fix = f"Set {model_key} and data.init_args.{name} to the same value in your config."
            else:  # the data module derives it (e.g. CelebA's target: 2 for an attribute, the identities' count)
                fix = f"The data ({type(data).__name__}) gives {d} from its other settings: set {model_key}: {d}."
            raise ConfigMismatchError(f"model and data disagree on {name}: model has {m}, data has {d}. {fix}")


def log_model_hparams_only_on_clash(model: LightningModule, data: LightningDataModule) -> list[str]:
    """When model and data have an hparam of the same name with different values (e.g. the DDPM's sample-grid
    ``seed`` and the data module's validation-split ``seed``), Lightning refuses to merge them for the loggers and
    stops the run at fit start ("Error while merging hparams"). Then log the model's hparams only (the data module's
    stay in the saved config and the checkpoints) and return the clashing names; [] (nothing changed) otherwise."""
    if not (getattr(model, "_log_hyperparams", False) and getattr(data, "_log_hyperparams", False)):
        return []
    m, d = model.hparams_initial, data.hparams_initial
    clash = sorted(k for k in m.keys() & d.keys() if k != "_class_path"
                   and (type(m[k]) is not type(d[k]) or bool(m[k] != d[k])))
    if clash:
        data._log_hyperparams = False
    return clash


# ------------------------------------------------------------------------------------------------ run directories
def new_run_dir(root: str | os.PathLike) -> Path:
    """:func:`inversion.fsutils.new_run_dir` without a name under ``root`` with ``~`` expanded (as Lightning does):
    ``root/<YYYYmmdd-HHMMSS>-<6 hex>``.

    Raises:
        RuntimeError: no free name after 100 tries.
    """
    from inversion.fsutils import new_run_dir as make_run_dir

    return make_run_dir(os.path.expanduser(str(root)))


def relative_to_root(path: str | os.PathLike, root: str | os.PathLike) -> Optional[Path]:
    """``path`` relative to ``root`` (both made absolute against the working directory, ``~`` expanded), or None
    when ``path`` is not ``root`` or inside it. ``Path('.')`` when ``path`` is ``root`` itself."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    r = Path(os.path.abspath(os.path.expanduser(str(root))))
    try:
        return p.relative_to(r)
    except ValueError:
        return None


def _nearest_root(path: str | os.PathLike, roots: list) -> Optional[tuple[int, Path]]:
    """``(i, path relative to roots[i])`` for the deepest of ``roots`` (None entries skipped) that holds ``path``
    (:func:`relative_to_root`), or None when none does."""
    found = [(len(rel.parts), i, rel) for i, r in enumerate(roots) if r is not None
             for rel in [relative_to_root(path, r)] if rel is not None]
    if not found:
        return None
    _, i, rel = min(found, key=lambda t: t[:2])
    return i, rel


def relative_to_roots(path: str | os.PathLike, roots: list) -> Optional[Path]:
    """``path`` relative to the deepest of ``roots`` that holds it (None entries skipped), or None."""
    hit = _nearest_root(path, roots)
    return hit[1] if hit else None


def _callback_class(class_path: Optional[str]) -> Optional[type]:
    """The class a ``class_path`` names (imported), or None when it cannot be imported."""
    if not class_path:
        return None
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return cls if isinstance(cls, type) else None


def _is_checkpoint_callback(class_path: Optional[str]) -> bool:
    """True for ModelCheckpoint / OnExceptionCheckpoint and their subclasses (the class is imported)."""
    from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

    cls = _callback_class(class_path)
    return cls is not None and issubclass(cls, (ModelCheckpoint, OnExceptionCheckpoint))


def _as_list(value: Any) -> list:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def checkpoint_dirpaths(trainer_cfg: Any) -> list[str]:
    """The ``dirpath`` of every ModelCheckpoint/OnExceptionCheckpoint in ``trainer_cfg['callbacks']`` (a dict or
    jsonargparse Namespace with ``class_path``/``init_args`` entries, one or a list), in config order; None skipped."""
    out = []
    for cb in _as_list(trainer_cfg.get("callbacks")):
        args = cb.get("init_args") if hasattr(cb, "get") else None
        if _is_checkpoint_callback(cb.get("class_path") if hasattr(cb, "get") else None) and args is not None:
            if args.get("dirpath"):
                out.append(str(args.get("dirpath")))
    return out


def _path_entries(trainer_cfg: Any) -> list[tuple[Any, str, str]]:
    """``(holder, key, label)`` for every path the run writes to that is set in ``trainer_cfg``: the
    ``save_dir``/``dir``/``root_dir`` of the logger (one entry or a list) and the ``dirpath`` of checkpoint callbacks
    (ModelCheckpoint, OnExceptionCheckpoint); ``label`` as ``trainer.callbacks[0].dirpath``."""
    out = []
    for i, logger in enumerate(_as_list(trainer_cfg.get("logger"))):
        args = logger.get("init_args") if hasattr(logger, "get") else None
        if args is not None:
            out += [(args, key, f"trainer.logger[{i}].{key}") for key in _LOGGER_PATH_KEYS
                    if key in args and args.get(key)]
    for i, cb in enumerate(_as_list(trainer_cfg.get("callbacks"))):
        args = cb.get("init_args") if hasattr(cb, "get") else None
        if args is not None and _is_checkpoint_callback(cb.get("class_path")) and args.get("dirpath"):
            out.append((args, "dirpath", f"trainer.callbacks[{i}].dirpath"))
    return out


def reroot_trainer_config(trainer_cfg: Any, root: str | os.PathLike, run_dir: str | os.PathLike,
                          config_root: str | os.PathLike | None = None) -> list[str]:
    """Rewrite, in place, every path of ``trainer_cfg`` (the parsed ``trainer`` section, dict or Namespace) that lies
    under ``root`` so that it lies at the same place under ``run_dir``: ``default_root_dir`` (set to ``run_dir``),
    the ``save_dir``/``dir``/``root_dir`` of the logger (one entry or a list) and the ``dirpath`` of checkpoint
    callbacks (ModelCheckpoint, OnExceptionCheckpoint). Other callbacks (e.g. ExportModel) and paths outside
    ``root`` are left alone.

    ``config_root``: the config's own ``default_root_dir`` when the command line replaced it with ``root``; paths
    under it move into ``run_dir`` too (``config_root/ckpt`` -> ``run_dir/ckpt``), as if the config had been written
    for ``root``. A path under both goes by the deeper of the two. Returns the rewritten entries as
    ``'key: old -> new'`` lines."""
    changes = []
    trainer_cfg["default_root_dir"] = str(run_dir)
    for holder, key, label in _path_entries(trainer_cfg):
        old = holder.get(key)
        rel = relative_to_roots(old, [root, config_root])
        if rel is not None:
            new = str(Path(run_dir) / rel)
            holder[key] = new
            changes.append(f"{label}: {old} -> {new}")
    return changes


def move_config_root_paths(trainer_cfg: Any, config_root: str | os.PathLike, root: str | os.PathLike) -> list[str]:
    """Rewrite, in place, the paths of ``trainer_cfg`` (as :func:`reroot_trainer_config`) that lie under
    ``config_root`` (and not deeper under ``root``) to the same place under ``root``: the config as the user meant it
    with ``--trainer.default_root_dir root``, saved into the run directory so that ``--config <run>/config.yaml``
    starts the next run under ``root`` too. ``default_root_dir`` itself is left as given. Returns the rewritten
    entries as ``'key: old -> new'`` lines."""
    changes = []
    for holder, key, label in _path_entries(trainer_cfg):
        old = holder.get(key)
        hit = _nearest_root(old, [root, config_root])
        if hit is not None and hit[0] == 1:
            new = str(Path(root) / hit[1])
            holder[key] = new
            changes.append(f"{label}: {old} -> {new}")
    return changes


def shared_paths(trainer_cfg: Any, run_dir: str | os.PathLike) -> list[str]:
    """The logger and checkpoint paths of ``trainer_cfg`` (after re-rooting) outside ``run_dir``, as
    ``'key: path'`` lines: every run of the config writes there (a later run's last.ckpt replaces an earlier one's)."""
    return [f"{label}: {holder.get(key)}" for holder, key, label in _path_entries(trainer_cfg)
            if relative_to_root(holder.get(key), run_dir) is None]


def check_export_targets(trainer_cfg: Any, resuming: bool) -> None:
    """Run :func:`callbacks.export.check_export_target` on every ExportModel callback of ``trainer_cfg`` (its
    ``dirpath`` and ``overwrite`` as configured), before anything is created.

    Raises:
        FileExistsError: an export folder exists, ``resuming`` is false and that callback's ``overwrite`` is false.
    """
    from callbacks.export import ExportModel, check_export_target

    for cb in _as_list(trainer_cfg.get("callbacks")):
        if not hasattr(cb, "get"):
            continue
        cls, args = _callback_class(cb.get("class_path")), cb.get("init_args")
        if cls is not None and issubclass(cls, ExportModel) and args is not None and args.get("dirpath"):
            check_export_target(args.get("dirpath"), bool(args.get("overwrite", False)), resuming)


_ROOT_FLAG = "--trainer.default_root_dir"


def without_root_override(argv: list) -> Optional[list]:
    """``argv`` without its ``--trainer.default_root_dir X`` / ``--trainer.default_root_dir=X`` arguments, or None
    when it has none."""
    out, i, found = [], 0, False
    while i < len(argv):
        arg = str(argv[i])
        if arg == _ROOT_FLAG:
            found, i = True, i + 2
        elif arg.startswith(_ROOT_FLAG + "="):
            found, i = True, i + 1
        else:
            out.append(argv[i])
            i += 1
    return out if found else None


def list_run_dirs(root: str | os.PathLike) -> list[Path]:
    """The run directories (names ``YYYYmmdd-HHMMSS-<6 hex>``) directly under ``root``, oldest name first; []
    when ``root`` does not exist. One ``os.scandir``."""
    try:
        with os.scandir(os.path.expanduser(str(root))) as it:
            names = [e.name for e in it if RUN_NAME.match(e.name) and e.is_dir()]
    except FileNotFoundError:
        return []
    return [Path(os.path.expanduser(str(root))) / n for n in sorted(names)]


def _last_in_run(run: Path, rels: list[Path]) -> list[Path]:
    """The existing ``last.ckpt`` files of one run directory: ``run/<rel>/last.ckpt`` for each checkpoint folder
    ``rel`` (relative to default_root_dir), or any ``last.ckpt`` below ``run`` when ``rels`` is empty."""
    files = [run / r / LAST_CKPT for r in rels] if rels else list(run.rglob(LAST_CKPT))
    return [f for f in files if f.is_file()]


def find_last_checkpoint(root: str | os.PathLike, ckpt_dirpaths: list[str],
                         config_root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The run directory to resume and its last checkpoint, for ``--ckpt_path last``.

    ``ckpt_dirpaths`` are the configured checkpoint ``dirpath`` values (before re-rooting); those under ``root`` (or
    under ``config_root``, the config's own root that ``--trainer.default_root_dir`` replaced: see
    :func:`reroot_trainer_config`) say where each run keeps ``last.ckpt`` (``root/ckpt`` -> ``<run>/ckpt/last.ckpt``);
    with none under either, any ``last.ckpt`` inside a run directory counts. The newest run directory by name (its
    start time; same-second ties by the checkpoint's modification time) that holds one wins.

    Returns:
        (run directory, checkpoint file).

    Raises:
        NoCheckpointError (a FileNotFoundError): no run directory under ``root`` holds a last checkpoint; the
            message names ``root``, where it looked, and a checkpoint of the old fixed layout when one exists.
    """
    rels = [r for r in (relative_to_roots(p, [root, config_root]) for p in ckpt_dirpaths) if r is not None]
    runs = list_run_dirs(root)
    found = [(run.name[:15], ckpt.stat().st_mtime_ns, run, ckpt) for run in runs for ckpt in _last_in_run(run, rels)]
    if found:
        _, _, run, ckpt = max(found, key=lambda t: t[:2])
        return run, ckpt
    where = " or ".join(f"<run>/{r.as_posix()}/{LAST_CKPT}" for r in rels) or f"<run>/**/{LAST_CKPT}"
    legacy = [Path(p) / LAST_CKPT for p in ckpt_dirpaths if (Path(p) / LAST_CKPT).is_file()]
    hint = (
        f" A checkpoint outside the run directories exists: {legacy[0]}; to continue from it pass "
        f"--ckpt_path {legacy[0]} (it gets a fresh run directory)."
        if legacy
        else ""
    )
    raise NoCheckpointError(
        f"--ckpt_path last: no run under default_root_dir {root} has a last checkpoint (looked for {where} in "
        f"{len(runs)} run director{'y' if len(runs) == 1 else 'ies'} <YYYYmmdd-HHMMSS>-<hex>).{hint} Start a fresh "
        "run without --ckpt_path, set trainer.default_root_dir to the folder holding the run, or pass a .ckpt file."
    )


def write_new_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path``, which must not exist: the text goes to a temporary file next to it that is then
    hard-linked into place, so ``path`` is either absent or complete and an existing file is never replaced.

    Raises:
        FileExistsError: ``path`` exists.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: check, then rename
            if path.exists():
                raise FileExistsError(f"{path} exists")
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_empty_dirs(top: Path) -> None:
    """Remove ``top`` and its sub-folders bottom-up where they are empty (files are never deleted)."""
    if not top.is_dir():
        return
    for dirpath, _, _ in sorted(os.walk(top), key=lambda t: -len(t[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


def _process_rank() -> int:
    """This process's rank from the launcher's environment (as Lightning reads it); 0 when none is set."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 0


class SaveLastAtTrainEnd(Callback):
    """Write ``last.ckpt`` of every ModelCheckpoint with ``save_last=True`` at the step where training stops, when
    that checkpoint's last save was at another step (train.py adds this callback to every Trainer).

    Lightning 2.6's ModelCheckpoint writes ``last.ckpt`` at train end only when it never saved a checkpoint: a run
    stopped by ``max_time``, or by a ``max_steps`` that is not a multiple of ``every_n_train_steps``, kept the
    ``last.ckpt`` of up to N-1 steps before the end while the export (written at fit end) had the final weights, and
    ``--ckpt_path last`` resumed from the older step.

    When. The checkpoint is written where Lightning's own ModelCheckpoint would write it, so that it resumes the same
    way: in ``on_train_batch_end`` of the final batch when ``max_steps`` is reached or ``trainer.should_stop`` is set
    there (Lightning's ``max_time`` Timer), or in ``on_validation_end`` when a validation sets ``should_stop``. Both
    come before Lightning counts the (possibly partial) epoch as completed: a checkpoint written in ``on_train_end``
    recorded epoch e+1 and a completed epoch, so a resume skipped the rest of an interrupted epoch (a run with
    ``max_epochs`` trained fewer batches than configured). ``on_train_end`` still writes it when training ended at an
    epoch's end (``max_epochs``, or a stop set at the epoch's end), where the epoch is complete. This callback moves
    itself to the end of ``trainer.callbacks`` at setup, so it runs after the Timer and the ModelCheckpoints.

    Runs on every rank (saving is collective); nothing happens when the final step is already saved, no step was
    taken, for ``save_last='link'`` (a link names an existing checkpoint), or under ``fast_dev_run``. Uses the
    ModelCheckpoint's own ``_save_last_checkpoint`` (as its ``on_train_end`` does), so the file name, versioning and
    state are Lightning's.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Run after every other callback (the Timer that ``max_time`` adds last, the ModelCheckpoints)."""
        if trainer.callbacks and trainer.callbacks[-1] is not self:
            # a new list: Lightning is iterating over the old one while it calls ``setup``
            trainer.callbacks = [cb for cb in trainer.callbacks if cb is not self] + [self]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._stops_now(trainer):
            self._save_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and self._stops_now(trainer):
            self._save_last(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_last(trainer)

    @staticmethod
    def _stops_now(trainer) -> bool:
        """Whether the fit loop ends after this batch: ``max_steps`` reached, or ``should_stop`` set and the
        ``min_steps``/``min_epochs`` met (the conditions of Lightning's fit and epoch loops, read without their
        log lines)."""
        if trainer.max_steps is not None and trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            return True
        return bool(trainer.should_stop) and trainer.fit_loop._can_stop_early

    #: the step at which this callback last wrote the last.ckpt files (so a later hook at the same step does not
    #: write them again after the epoch is counted complete)
    saved_step: Optional[int] = None

    def _save_last(self, trainer) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.trainer.states import TrainerFn

        if (trainer.fast_dev_run or trainer.global_step == 0 or trainer.state.fn != TrainerFn.FITTING
                or self.saved_step == trainer.global_step):
            return
        for cb in trainer.checkpoint_callbacks:
            if (isinstance(cb, ModelCheckpoint) and cb.save_last is True
                    and getattr(cb, "_last_global_step_saved", trainer.global_step) != trainer.global_step
                    and hasattr(cb, "_save_last_checkpoint")):
                before = cb._last_global_step_saved
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
                # the ModelCheckpoint's own saves at this step (its top-k checkpoint at the validation that follows
                # this batch, a save it deferred until then) still happen: Lightning skips every save at a step it
                # has recorded as saved
                cb._last_global_step_saved = before
        self.saved_step = trainer.global_step


class MarkTrainingStarted(Callback):
    """Records that this process ran a training step (train.py adds it to every Trainer): an exception after that is
    a failure of the run, not bad input, so :func:`main` marks it (:func:`inversion.cli.mark_raised_during_work`)
    and ``run_main`` shows its traceback even for a ValueError. Errors before the first step (config checks,
    ExportModel's fit-start probe, a checkpoint that does not fit) stay one ``error:`` line."""

    stepped = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stepped = True


class SaveRunConfig(SaveConfigCallback):
    """Saves the config as given (paths before re-rooting) into the run directory on rank 0 at fit start (after the
    other callbacks' start checks and the weights' restore; Lightning restores the optimiser and loop state after
    ``on_fit_start``, so a resume that fails there leaves its file): ``config.yaml`` for a fresh run,
    ``config-resume-<k>.yaml`` (the first free k >= 1) when resuming in an existing run directory. Written before
    the sanity check, so a run that fails there keeps its config beside its logs. Never replaces a file (:func:`write_new_text`). Built by LightningCLI
    with ``run_dir``, ``original`` and ``resume`` from :class:`TrainCLI`."""

    def __init__(self, parser, config, run_dir: str = "", original: Any = None, resume: bool = False) -> None:
        super().__init__(parser, config, overwrite=False, save_to_log_dir=False)
        self.run_dir = Path(run_dir)
        self.original = original if original is not None else config
        self.resume = resume
        self.saved_path: Optional[Path] = None

    def save_config(self, trainer, pl_module, stage: str) -> None:
        """Nothing: the file is written in :meth:`on_fit_start`."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Nothing (the base class would write into ``trainer.log_dir`` here, before the start checks)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        """Write the config file (rank 0 only; once per callback)."""
        if self.already_saved or not trainer.is_global_zero:
            return
        text = self.parser.dump(self.original, skip_none=False)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        k = 0
        while True:
            name = "config.yaml" if not self.resume and k == 0 else f"config-resume-{max(k, 1)}.yaml"
            try:
                write_new_text(self.run_dir / name, text)
                break
            except FileExistsError:
                if not self.resume:
                    raise
                k = max(k, 1) + 1
        self.saved_path = self.run_dir / name
        self.already_saved = True


class TrainArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with one readable line for an option the model or data class does not take
    (:func:`inversion.cli.clarify_subclass_error`: ``model (ImageClassifier): Option 'lrr' is not accepted (did you
    mean 'lr'?)`` instead of jsonargparse's Union-subtype dump)."""

    def error(self, message: str, ex: Optional[Exception] = None):  # type: ignore[override]
        from inversion.cli import clarify_subclass_error, suggest_for_unrecognized

        return super().error(suggest_for_unrecognized(clarify_subclass_error(message), self._option_string_actions), ex)


class TrainCLI(LightningCLI):
    """LightningCLI with ``--ckpt_path`` / ``--test_after_fit`` and one run directory per run (module docstring).

    After construction: ``run_dir`` (Path), ``resolved_ckpt_path`` (the checkpoint file to restore, or None),
    ``resuming`` (True for ``--ckpt_path last``: writing into the resumed run's directory), ``created_run_dir``
    (this process created ``run_dir``) and ``config_root`` (the config's own ``default_root_dir`` when
    ``--trainer.default_root_dir`` replaced it on the command line, else None).
    """

    run_dir: Optional[Path] = None
    resolved_ckpt_path: Optional[str] = None
    resuming: bool = False
    created_run_dir: bool = False
    config_root: Optional[str] = None

    def parse_arguments(self, parser, args) -> None:
        """As LightningCLI's; then, when the command line has ``--trainer.default_root_dir``, parse it once more
        without that to learn the config's own root (``config_root``), whose paths move with the new root."""
        super().parse_arguments(parser, args)
        argv = sys.argv[1:] if args is None else args
        stripped = without_root_override(list(argv)) if isinstance(argv, (list, tuple)) else None
        if stripped is None:
            return
        import contextlib
        import io

        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                base = parser.parse_args(stripped)
        except (Exception, SystemExit):  # cannot tell: the paths stay, with the warning of before_instantiate_classes
            return
        config_root = os.path.expanduser(base["trainer"].get("default_root_dir") or DEFAULT_ROOT)
        root = os.path.expanduser(self.config["trainer"].get("default_root_dir") or DEFAULT_ROOT)
        if relative_to_root(config_root, root) != Path("."):
            self.config_root = config_root

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str, default=None, help="Lightning checkpoint to resume from, or 'last' (the newest run under trainer.default_root_dir).")
        parser.add_argument("--test_after_fit", type=bool, default=True, help="Run trainer.test after fit when the model has test_step.")

    def before_instantiate_classes(self) -> None:
        """Resolve ``--ckpt_path``, choose (resume) or create (fresh) the run directory and re-root the trainer's
        paths into it; nothing is created when the checkpoint cannot be found.

        Raises:
            FileNotFoundError: an explicit ``--ckpt_path`` that is not a file.
            NoCheckpointError: ``--ckpt_path last`` with no resumable run under ``default_root_dir``.
        """
        original = self.config.clone()
        trainer_cfg = self.config["trainer"]
        root = os.path.expanduser(trainer_cfg.get("default_root_dir") or DEFAULT_ROOT)  # Lightning expands ~ too
        roots = [root, self.config_root]
        ckpt_path = self.config.get("ckpt_path")
        inherited = os.environ.get(RUN_DIR_ENV) if _process_rank() != 0 else None
        dirpaths = checkpoint_dirpaths(trainer_cfg)
        rels = [r for r in (relative_to_roots(p, roots) for p in dirpaths) if r is not None]
        outside = [Path(os.path.expanduser(p)) / LAST_CKPT for p in dirpaths if relative_to_roots(p, roots) is None]
        outside = [f for f in outside if f.is_file()]
        if ckpt_path == "last" and not rels and outside:
            # checkpoints kept outside default_root_dir (shared by every run): continue from the newest, as
            # Lightning's own 'last' would, in a fresh run directory (as an explicit --ckpt_path FILE)
            ckpt_path = str(max(outside, key=lambda f: f.stat().st_mtime_ns))
        if ckpt_path == "last":
            if inherited and _last_in_run(Path(inherited), rels):  # a child of rank 0's launcher: the same run
                run_dir = Path(inherited)
                ckpt = max(_last_in_run(run_dir, rels), key=lambda f: f.stat().st_mtime_ns)
            else:
                run_dir, ckpt = find_last_checkpoint(root, dirpaths, self.config_root)
            self.resolved_ckpt_path, self.resuming = str(ckpt), True
        else:
            ckpt_path = os.path.expanduser(ckpt_path) if ckpt_path else ckpt_path
            if ckpt_path and Path(ckpt_path).is_dir():
                raise FileNotFoundError(
                    f"--ckpt_path {ckpt_path} is a folder; pass a Lightning .ckpt file or 'last' (an export folder "
                    "holds weights, not a training state: start from them with model.init_args.init_weights)")
            if ckpt_path and not Path(ckpt_path).is_file():
                raise FileNotFoundError(f"--ckpt_path {ckpt_path} does not exist; pass a .ckpt file or 'last'")
            self.resolved_ckpt_path = ckpt_path or None
            check_export_targets(trainer_cfg, resuming=bool(self.resolved_ckpt_path))  # before anything is created
            if inherited:
                run_dir = Path(inherited)
            elif _process_rank() == 0:
                run_dir, self.created_run_dir = new_run_dir(root), True
            else:  # torchrun/SLURM rank > 0: a name only; rank 0 writes everything
                run_dir = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        self.run_dir = run_dir
        moved = reroot_trainer_config(trainer_cfg, root, run_dir, self.config_root)
        if self.config_root is not None:
            move_config_root_paths(original["trainer"], self.config_root, root)
        if self.resolved_ckpt_path:
            self.drop_warm_start()
        self.save_config_kwargs = {"run_dir": str(run_dir), "original": original, "resume": self.resuming}
        if _process_rank() == 0:
            os.environ[RUN_DIR_ENV] = str(run_dir)  # for the processes Lightning's launcher starts
            what = f"resuming {self.resolved_ckpt_path}" if self.resuming else "new run"
            if self.resolved_ckpt_path and not self.resuming:
                what += f", weights and state from {self.resolved_ckpt_path}"
            print(f"[train] run directory: {run_dir} ({what})", flush=True)
            if self.config_root is not None:
                lines = "".join(f"\n  {m}" for m in moved)
                print(f"[train] --trainer.default_root_dir {root} replaces the config's {self.config_root}: its "
                      f"paths move into the run directory{':' + lines if lines else ''}", flush=True)
            shared = shared_paths(trainer_cfg, run_dir)
            if shared:
                print("[train] warning: these paths lie outside the run directory and default_root_dir, so every "
                      "run of this config writes into them (a later run's last.ckpt replaces this one's):"
                      + "".join(f"\n  {line}" for line in shared), file=sys.stderr, flush=True)

    def drop_warm_start(self) -> None:
        """With a checkpoint to restore, build the model without ``model.init_args.init_weights``: the checkpoint's
        weights replace the warm start anyway, and its folder (a stage-1 export) may no longer exist. The saved
        config keeps it, and the model reads it back from the checkpoint's hparams (for its model card)."""
        init_args = self.config["model"].get("init_args") if hasattr(self.config["model"], "get") else None
        if init_args is not None and init_args.get("init_weights"):
            if _process_rank() == 0:
                print(f"[train] model.init_args.init_weights ({init_args['init_weights']}) not loaded: the "
                      "checkpoint's weights are restored instead", flush=True)
            init_args["init_weights"] = None

    def instantiate_classes(self) -> None:
        """As LightningCLI's; a fresh run directory left empty by a failure here is removed."""
        try:
            super().instantiate_classes()
        except BaseException:
            self.discard_empty_run_dir()
            raise

    def discard_empty_run_dir(self) -> None:
        """Remove the run directory this process created when nothing was written into it (empty folders only)."""
        if self.created_run_dir and self.run_dir is not None:
            _remove_empty_dirs(self.run_dir)

    def discard_fresh_run_dir(self) -> None:
        """Remove the run directory this process created, files included, for a run that failed before its config
        was saved and before any step (all it can hold is what the loggers wrote at start, e.g. an offline W&B run
        folder). An active W&B run is finished first. Rank 0 only; other ranks remove empty folders only."""
        if not (self.created_run_dir and self.run_dir is not None):
            return
        if _process_rank() != 0:
            _remove_empty_dirs(self.run_dir)
            return
        try:
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=1)
        except Exception:  # noqa: BLE001  (removing the folder does not depend on W&B shutting down cleanly)
            pass
        shutil.rmtree(self.run_dir, ignore_errors=True)


def main(args=None) -> None:
    """Command line entry point: build the model and data module from the config with LightningCLI (``args``: the
    argument list, None for ``sys.argv``; seed 0 unless ``seed_everything`` is set), fit in a run directory (see the
    module docstring), then run ``trainer.test`` when ``--test_after_fit`` (default true) and the model overrides
    ``test_step`` (the classifiers, not the DDPM). ``--ckpt_path FILE`` restores a Lightning checkpoint into a fresh
    run directory; ``--ckpt_path last`` continues the newest run under ``trainer.default_root_dir``.

    Raises:
        ConfigMismatchError (a ValueError): model and data disagree on image size, channels or classes.
        FileNotFoundError: ``--ckpt_path`` is neither 'last' nor an existing file; or (NoCheckpointError)
            ``--ckpt_path last`` with no run holding a last checkpoint under ``trainer.default_root_dir``.
        SystemExit: a bad command line (from the CLI's parser).
    """
    cli = TrainCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=args,
        seed_everything_default=0,
        save_config_callback=SaveRunConfig,
        # appended to the config's (not parsed or saved)
        trainer_defaults={"callbacks": [SaveLastAtTrainEnd(), MarkTrainingStarted()]},
        parser_kwargs={"default_env": False, "allow_abbrev": False},  # --trainer.max_step is not --max_steps
        parser_class=TrainArgumentParser,
    )
    try:
        check_data_model_agree(cli.model, cli.datamodule)
        if cli.resolved_ckpt_path and hasattr(cli.model, "check_resume_hparams"):
            # before fit: Resumable.on_load_checkpoint refuses it too, but only after the loggers started (a W&B run
            # in the resumed run's folder, its latest-run link moved to the refused attempt)
            import torch

            try:
                saved = torch.load(cli.resolved_ckpt_path, map_location="cpu", weights_only=False)
                hparams = saved.get("hyper_parameters") or {}
            except Exception as exc:  # noqa: BLE001 - README.md, a .safetensors export, a truncated last.ckpt
                what = f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
                if cli.resuming:  # 'last' found this file: saying "pass 'last'" would go round in a circle
                    raise ValueError(f"--ckpt_path last: the newest run's checkpoint {cli.resolved_ckpt_path} cannot be "
                                     f"read {what}; move it aside (an earlier .ckpt of the run can be passed as "
                                     "--ckpt_path FILE), or start a fresh run") from None
                raise ValueError(f"--ckpt_path {cli.resolved_ckpt_path} is not a Lightning checkpoint train.py can "
                                 f"read {what}; pass a .ckpt file a train.py run saved (its ckpt/last.ckpt), or "
                                 "'last'") from None
            cli.model.check_resume_hparams(hparams)
            del saved
        clash = log_model_hparams_only_on_clash(cli.model, cli.datamodule)
        if clash and _process_rank() == 0:
            print(f"[train] model and data both set {', '.join(clash)} to different values; the loggers get the "
                  "model's hyper-parameters only (the data's are in the saved config and the checkpoints)",
                  file=sys.stderr, flush=True)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resolved_ckpt_path)
        if cli.config.get("test_after_fit") and type(cli.model).test_step is not LightningModule.test_step:
            cli.trainer.test(cli.model, datamodule=cli.datamodule)
    except BaseException as exc:
        stepped = any(isinstance(cb, MarkTrainingStarted) and cb.stepped for cb in cli.trainer.callbacks)
        saved = any(isinstance(cb, SaveRunConfig) and cb.already_saved for cb in cli.trainer.callbacks)
        if not stepped and not saved:  # failed in setup (e.g. the data's checks), before its config was written:
            cli.discard_fresh_run_dir()  # the loggers' start files alone are no run (W&B would sync it)
        else:
            cli.discard_empty_run_dir()
        if stepped:
            from inversion.cli import mark_raised_during_work

            mark_raised_during_work(exc)  # a ValueError from step N is a crash to debug: keep its traceback
        raise
    finally:
        if _process_rank() == 0:
            os.environ.pop(RUN_DIR_ENV, None)


if __name__ == "__main__":
    from inversion.cli import run_main

    run_main(main, "train.py")
