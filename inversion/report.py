"""Aggregate attack run directories into a summary table and figures.

Usage::

    python -m inversion.report RUN_DIR [RUN_DIR ...] --out OUT_DIR [--wandb] [--gallery-users 4]

Each RUN_DIR (written by ``attack.py``) holds ``results.csv`` (one row per user, method and batch size B, with at
least ``user, method, B`` and metric columns such as ``mse_nearest, psnr_mean, ssim_*, lpips_*, evaluator_correct,
steps, seconds``; empty cells = not measurable), ``config.yaml`` and ``users/user_0000/grid.png`` (the user's batch
beside the reconstructions). A ``grid`` / ``grid_path`` / ``user_dir`` column, if present, names the user's folder or
grid image relative to RUN_DIR (needed when one run holds several B or methods in separate folders).

Writes, into a new OUT_DIR (an existing one is never touched: a free ``OUT_DIR-1``, ``-2``... is used instead), built
in a temporary folder next to it and renamed into place at the end:

* ``summary.csv``: per (method, B): ``n_users`` (distinct users), ``evaluator_accuracy`` (mean of
  ``evaluator_correct``) with its 95% Wilson interval ``evaluator_accuracy_ci_low`` / ``_ci_high`` (over users; empty
  when a user has several rows, e.g. several seeds), ``label_accuracy`` (mean of ``inferred_dominant ==
  dominant_class``, or of the inferred class holding a top count tied with it in ``true_histogram``), and for each numeric
  metric column ``M``: ``M_avg`` (mean over users), ``M_std`` (sample std over users, ddof 1; empty for one user) and
  ``M_n`` (users with a value). Runs of the same user under other ``--seed`` values are repeated measurements: each
  is a row (means, stds and ``M_n`` are over rows), the user counts once in ``n_users``, and an ``n_rows`` column
  (``rows`` in summary.md) follows ``n_users`` when some row has more rows than users;
* ``summary.md``: the same table (avg ± std, n when some users were not measurable) and the figures;
* ``metrics_vs_B.png``: each metric against B per method, mean ± std band over users and every user as a dot
  (evaluator accuracy: its 95% Wilson interval as error bars);
* ``gallery.png``: a few users' ``grid.png`` per (method, B).

Extra grouping, only when the runs differ in it (so a report of one kind of run is unchanged): ``protocol``,
``victim_init``, ``defense`` + ``defense_strength`` (columns of results.csv; a run without them counts as
``defense = none``, strength NaN), ``final_stage`` (results.csv's column, else derived from the run's config.yaml:
'denoise t=100 ddim/10', 'select N=32 t=400 mu=1 ddim/10', ...) and ``run_name`` (``output.name`` from each run's ``config.yaml``, else the run
folder name without its ``-YYYYmmdd-HHMMSS-hex`` suffix; only when runs alike in the keys before it have different
names, so names that only restate B, ``B10_ig`` and ``B50_ig``, leave one series along B). Last, ``setting`` (:func:`setting_of`: a hash of the
run's config apart from what runs of one experiment may differ in, :data:`POOLED_CONFIG_KEYS`: seeds, user range,
defenses, output, logging, device; paths compared as real paths; a config attack.py no longer parses compared only on
the keys it sets), only when runs alike in every other key have different configs (a 5-step and a
60-step run of one name; two refinished ablations both named ``extension_final_selection``), followed by
``setting_diff``: the config entries in which that setting differs from the others of its method and B, e.g.
``attack.init_args.steps=5``. These become extra key columns of ``summary.csv`` (after ``method, B``), so e.g. an
ablation table (full vs no_prior vs no_window ..., one ``output.name`` each) comes out directly, and the figures
draw one line per method and extra key. ``--variants final_stage,victim_init`` (any subset of these keys) groups
by exactly those instead, e.g. to pool runs of different names that share a final stage (a note says when that
pools runs of different settings). ``--pool-run-names`` pools runs whose names differ but whose settings agree (the
halves ``..._u0`` / ``..._u10`` of a split cell) while every other key still splits rows.

Before pooling: a user found twice with the same run name, setting, seeds and defenses (a rerun, a resumed copy, an
interrupted sweep cell and its re-run: :func:`drop_duplicate_users`) counts once, from the newest finished run, and a
warning names the runs; runs whose summary.json says they did not finish ('interrupted', 'diverged: ...',
'failed: ...') or that have none keep their finished users, and a note names them (both printed and listed under
Notes in summary.md). When more than one defense (or strength) is present, also:

* ``privacy.csv``: per (method, B, defense, defense_strength), pooled over run names (kept apart by protocol,
  victim_init, final_stage and setting, with setting_diff, when the runs differ in them; summary.md shows these
  columns too): n_users,
  ``evaluator_accuracy`` with ``evaluator_accuracy_ci_low`` / ``_ci_high`` (its 95% Wilson interval, as in
  summary.csv), ``label_accuracy`` and avg/std/n of ``psnr_nearest`` and ``lpips_nearest`` (when present);
* ``privacy_curve.png``: attack success (evaluator accuracy with its Wilson interval as error bars; LPIPS nearest and
  PSNR nearest when measured) against
  the defense strength (the sigma / keep fraction / levels / clip norm of the first defense that has one, see
  attack.defense_label; where another such parameter is what the runs of one composition vary, e.g. the sigma of
  pruning + DP noise or the clip norm of clipping alone, that parameter: :func:`strength_params`, in privacy.csv too,
  while summary.csv keeps results.csv's value; the x axis is named by the parameter when all lines share one),
  one line per method (and per defense kind, per B, protocol, victim_init, final_stage when several). The x axis is logarithmic when the positive
  strengths span more than 10x. ``none`` (no defense) is drawn as a hollow square at the left end of each line with
  the tick label ``none`` (at x = 0 on a linear axis; one decade left of the smallest strength on a log axis, since
  0 has no log position); a strength of exactly 0 (e.g. clipping only, sigma 0) is drawn the same way with the tick
  label ``0`` (then ``none`` moves one more step left). A defense without a strength (e.g. sign_compression) is in
  the tables but not on the curve.

With ``--wandb`` the table (``wandb.Table``) and both figures (uint8 images) are also logged to W&B, offline unless
``WANDB_MODE`` says otherwise.

For hand-built tables (a report's ``table.py``: one row per configuration, its users run in several parts, compared
user by user with a reference row): :func:`newest_run` picks the latest run of an ``output.name``, :func:`pool_users`
joins runs of disjoint users into one per-user frame (a user twice is an error), :func:`pool_newest_runs` both, :func:`paired_counts` and
:func:`changed_count` compare two such frames on their shared users, :func:`count_cell` / :func:`mean_std_cell`
format cells ('k/n', 'mean ± std').
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from inversion.defenses import STRENGTH_KEYS
from inversion.cli import config_groups, mark_raised_during_work
from inversion.fsutils import atomic_write_bytes, find_input_path, publish_dir, run_status  # noqa: F401 (run_status: callers import it from here too)

__all__ = ["GROUP_KEYS", "DuplicateUserError", "aggregate", "aggregate_privacy", "build_report", "changed_count",
           "count_cell", "drop_duplicate_users", "group_keys", "load_runs", "main", "mean_std_cell", "measurement_of",
           "newest_run", "paired_counts", "plot_gallery", "plot_metrics_vs_b", "plot_privacy_curve",
           "pool_newest_runs", "pool_users", "privacy_strengths", "run_notes", "run_status", "setting_diff_labels",
           "setting_of", "strength_params", "user_source_of"]

GROUP_KEYS = ["method", "B"]
# Extra group keys, used only when the runs differ in them (see group_keys); defense and strength go together.
# ``setting`` (the config apart from seeds, user range, output and logging: see setting_of) comes last, and only when
# it splits a row that the other keys leave together (runs of one name and variants but other configs)
VARIANT_KEYS = ["protocol", "victim_init", "defense", "defense_strength", "final_stage", "run_name", "id_gallery",
                "setting"]
PRIVACY_KEYS = ["method", "B", "defense", "defense_strength"]
TEXT_COLUMNS = ("method", "run", "run_dir", "user", "grid", "grid_path", "user_dir", "true_histogram",
                "inferred_counts", "label_strategy", "defense", "protocol", "victim_init", "run_name", "final_stage",
                "setting", "setting_diff", "id_gallery", "user_key", "measurement_key")
NON_METRIC = {"user", "B", "method", "dominant_class", "inferred_dominant", "evaluator_class", "evaluator_correct", "victim_class",
              "evaluator_class_raw", "nearest_index", "true_histogram", "inferred_counts", "label_strategy",
              "run", "run_dir", "grid", "grid_path", "user_dir", "seed", "defense", "defense_strength", "protocol",
              "victim_init", "run_name", "final_stage", "refinish_source", "refinished_from", "setting", "setting_diff",
              "id_gallery", "user_key", "measurement_key", "inferred_informative",
              # the FedAvg local training a row attacked (settings, not measurements; the runs split by `setting`)
              "fedavg_epochs", "fedavg_lr", "fedavg_batch_size", "fedavg_shuffle", "fedavg_local_steps"}
RUN_DIR_SUFFIX = r"-\d{8}-\d{6}-[0-9a-f]{6}$"
# Order of the main metrics in tables and figures; other numeric columns follow.
MAIN_METRICS = ["mse_nearest", "mse_mean", "psnr_nearest", "psnr_mean", "ssim_nearest", "ssim_mean",
                "lpips_nearest", "lpips_mean", "evaluator_prob"]
FIGURE_METRICS = ["psnr_nearest", "ssim_nearest", "lpips_nearest", "mse_nearest", "evaluator_accuracy"]
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "mse": False}


# --------------------------------------------------------------------------------------------------------------------
# loading and aggregation


def _to_number(col: pd.Series) -> pd.Series:
    if col.dtype == bool:
        return col.astype(float)
    if col.dtype == object:
        col = col.replace({"True": 1.0, "False": 0.0, "true": 1.0, "false": 0.0, True: 1.0, False: 0.0})
    return pd.to_numeric(col, errors="coerce")


def run_name_of(run_dir: Path) -> Optional[str]:
    """``output.name`` from the run's config.yaml, else the folder name without attack.py's time-hex suffix (None
    when the folder is not named that way)."""
    import re

    p = run_dir / "config.yaml"
    if p.is_file():
        try:
            import yaml

            cfg = yaml.safe_load(p.read_text()) or {}
            name = (cfg.get("output") or {}).get("name") if isinstance(cfg, dict) else None
            if name:
                return str(name)
        except Exception:  # noqa: BLE001 - an unreadable config only loses the name
            pass
    if re.search(RUN_DIR_SUFFIX, run_dir.name):
        return re.sub(RUN_DIR_SUFFIX, "", run_dir.name)
    return None


# config entries (dotted paths; a key and everything under it) that runs of one privacy-curve setting may differ in:
# where the results go, the seeds, the user range (split runs pool), logging, where the run executed, and the
# defenses themselves (the curve's x); see setting_of
POOLED_CONFIG_KEYS = ("output", "seed", "resume", "checkpoint_every", "image_log_every", "logger", "threat.defenses",
                      "users.init_args.first_user", "users.init_args.num_users", "users.init_args.seed",
                      "attack.init_args.seed", "attack.init_args.log_images_every", "attack.init_args.log_prefix",
                      "victim.init_seed", "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
                      "trainer.strategy", "trainer.enable_progress_bar", "trainer.enable_model_summary",
                      "trainer.log_every_n_steps")


# of the pooled keys, those that change what a run measures (another draw of the attack, of the users' batches, of the
# defense noise, of a random victim); the rest say only where and how visibly it ran (:data:`LOCATION_CONFIG_KEYS`)
SEED_CONFIG_KEYS = ("seed", "threat.defenses", "users.init_args.seed", "attack.init_args.seed", "victim.init_seed")
# runs whose configs differ only in these measured the same users the same way: a rerun, a resumed copy, an
# interrupted sweep cell and its re-run, the same run on another device (see measurement_of)
LOCATION_CONFIG_KEYS = tuple(k for k in POOLED_CONFIG_KEYS if k not in SEED_CONFIG_KEYS)
# the users' range, not which users: left out of a user's identity (see user_source_of)
USER_RANGE_KEYS = ("users.init_args.first_user", "users.init_args.num_users")
# where the users' data lies: left out of the check that pooled or paired runs attacked the same batches per user id
# (the same Fashion-MNIST files under /usr/share/datasets and under a GPU machine's .devdata; see _user_batches_of)
USER_LOCATION_KEYS = ("users.init_args.root",)

_CONFIG_CACHE: dict = {}


def _read_config(path: Path) -> tuple[Optional[dict], bool]:
    """``(entries, parsed)``: the run's config as flat dotted entries and whether attack.py's parser read it (then
    with attack.py's defaults filled in and the keys :func:`attack.comparable_config` drops left out); else the file
    as written (:func:`inversion.cli.flat_entries`), ``parsed`` False; ``(None, False)`` when it cannot be read.
    Values naming an existing file or folder are its real path (:func:`_real_paths`). Cached per file (path, size,
    mtime) and current directory."""
    import contextlib
    import io

    from inversion.cli import flat_entries

    path = Path(path)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, os.getcwd())  # cwd: relative paths resolve from it
    except OSError:
        return None, False
    if key in _CONFIG_CACHE:
        return _CONFIG_CACHE[key]
    result: tuple[Optional[dict], bool] = (None, False)
    try:
        import attack

        parser = attack.build_parser()
        with contextlib.redirect_stderr(io.StringIO()):
            result = (attack.comparable_config(parser, parser.parse_path(str(path))), True)
    except (Exception, SystemExit):  # noqa: BLE001 - an older or foreign config: compare it as written
        try:
            import yaml

            raw = yaml.safe_load(path.read_text()) or {}
            result = (flat_entries(raw) if isinstance(raw, dict) else None, False)
        except Exception:  # noqa: BLE001
            result = (None, False)
    if result[0] is not None:
        result = ({k: _real_paths(v) for k, v in result[0].items()}, result[1])
    _CONFIG_CACHE[key] = result
    return result


def _real_path(value: str) -> str:
    """``value`` as the real path (symlinks resolved) of the file or folder it names, looked up as attack.py does
    (:func:`inversion.fsutils.find_input_path`: as given, then under the repository root); ``value`` itself when it
    names none (not a path, or a path that no longer exists)."""
    if not value or len(value) > 4096 or "\0" in value or "\n" in value:
        return value
    try:
        found = find_input_path(value)
        if found.exists():
            return os.path.realpath(found)
    except (OSError, ValueError):  # a name too long for the file system, ...: not a path
        pass
    return value


def _real_paths(value):
    """A config value with every string naming an existing file or folder replaced by its real path
    (:func:`_real_path`), inside lists and dicts too: so ``checkpoints/x`` and ``/repo/checkpoints/x`` are one
    value and the halves of a run written with either spelling have one setting."""
    if isinstance(value, str):
        return _real_path(value)
    if isinstance(value, list):
        return [_real_paths(v) for v in value]
    if isinstance(value, dict):
        return {k: _real_paths(v) for k, v in value.items()}
    return value


def _config_entries(path: Path) -> Optional[dict]:
    """The run's config as flat dotted entries, with attack.py's defaults filled in when its parser still reads the
    file (:func:`attack.comparable_config`, which also drops keys that :data:`POOLED_CONFIG_KEYS` pools anyway; so an
    option added after the run, e.g. evaluation.face_gallery_users, does not split it from newer runs); else the
    file as written (:func:`inversion.cli.flat_entries`), which :func:`load_runs` compares only on the keys it sets
    (:func:`match_unparsed_settings`), so there too an option added after the run does not split it. Paths are real
    paths (:func:`_real_paths`). None when it cannot be read."""
    return _read_config(path)[0]


def _without(entries: dict, prefixes: Sequence[str]) -> dict:
    return {k: v for k, v in entries.items() if not any(k == p or k.startswith(p + ".") for p in prefixes)}


def _hash(entries: dict, prefix: str) -> str:
    import hashlib
    import json

    text = json.dumps(entries, sort_keys=True, default=str)
    return prefix + hashlib.sha256(text.encode()).hexdigest()[:6]


def setting_entries(entries: Optional[dict]) -> Optional[dict]:
    """The config entries that make a run's setting: ``entries`` (:func:`_config_entries`) without
    :data:`POOLED_CONFIG_KEYS`; None for None."""
    return None if entries is None else _without(entries, POOLED_CONFIG_KEYS)


def setting_of(run_dir: Path) -> Optional[str]:
    """The run's setting apart from its defenses: 'cfg-' and 6 hex digits of the SHA-256 of its config entries
    (:func:`_config_entries`: attack.py's defaults filled in) without :data:`POOLED_CONFIG_KEYS`, so the runs of one
    defense sweep, halves of one run and runs on other devices share it and an ablation run (e.g. the prior off)
    does not; a path spelled relative or absolute (or through a symlink) is one value (:func:`_real_paths`). For a
    config attack.py's parser no longer reads, the hash of the entries it sets (:func:`load_runs` pools it with the
    setting those agree with: :func:`match_unparsed_settings`). None when the config cannot be read (such runs form
    their own group)."""
    kept = setting_entries(_config_entries(Path(run_dir) / "config.yaml"))
    return None if kept is None else _hash(kept, "cfg-")


def _same_value(a, b) -> bool:
    """Config values equal as attack.py would use them (a number written ``1`` is the parser's ``1.0``)."""
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b) or (a != a and b != b)
    return a == b


def _agree(unparsed: dict, parsed: dict) -> bool:
    """Whether a config as written (``unparsed``) says the same as a parsed one on every key it sets that the parsed
    one has (an option since removed or renamed is not compared), and both name the attack (``attack.class_path``):
    a hand-written fragment that does not is never taken for a parsed run's setting."""
    if "attack.class_path" not in unparsed or "attack.class_path" not in parsed:
        return False
    return all(_same_value(unparsed[k], parsed[k]) for k in unparsed.keys() & parsed.keys())


def match_unparsed_settings(entries_by_setting: dict, parsed_by_setting: dict) -> tuple[dict, set]:
    """Settings of configs that attack.py's parser no longer reads (an older run: an option since renamed or
    removed), whose entries are the file as written without the defaults (so they lack every option added since,
    and their hash alone would split them from every parsed run), matched to the parsed settings they agree with on
    the keys they set (:func:`_agree`: keys the written config lacks are not compared). Such a setting takes the one
    parsed setting it agrees with; when it agrees with none, or with several (which one is not known), it stays its
    own (two unparsed configs are compared as written: they have the same setting when they set the same values).

    Returns:
        ``(setting -> the parsed setting it is pooled under (only those matched), the settings from unparsed configs
        left unmatched)``.
    """
    parsed = [s for s in entries_by_setting if parsed_by_setting.get(s, True)]
    merged: dict = {}
    left: set = set()
    for s in entries_by_setting:
        if parsed_by_setting.get(s, True):
            continue
        hits = [p for p in parsed if _agree(entries_by_setting[s], entries_by_setting[p])]
        if len(hits) == 1:
            merged[s] = hits[0]
        else:
            left.add(s)
    return merged, left


def _identity_known(entries: Optional[dict], parsed: bool) -> bool:
    """Whether the config says which users a run attacked and with which seeds: read by attack.py's parser (every
    default filled in) or written by attack.py (it names ``users.class_path``). A hand-written or partial config
    does not, and its users are never taken for another run's."""
    return entries is not None and (parsed or "users.class_path" in entries)


def user_source_of(run_dir: Path) -> Optional[str]:
    """Which users the run's user ids name: 'users-' and 6 hex digits of the SHA-256 of its ``users.*`` config
    entries (class, data, batch size, dominant fraction, the users' seed...) without the user range, so user 3 of
    two runs with the same source is the same user (the same batch). None when the config does not say
    (:func:`_identity_known`)."""
    entries, parsed = _read_config(Path(run_dir) / "config.yaml")
    if not _identity_known(entries, parsed):
        return None
    return _users_hash(entries, USER_RANGE_KEYS)


def _users_hash(entries: dict, left_out: Sequence[str]) -> str:
    """'users-' and 6 hex digits of the SHA-256 of the ``users.*`` entries of a flat config ``entries`` without the
    keys ``left_out`` (:func:`user_source_of`, :func:`_user_batches_of`)."""
    users = {k: v for k, v in entries.items() if k == "users" or k.startswith("users.")}
    return _hash(_without(users, left_out), "users-")


def measurement_of(run_dir: Path) -> Optional[str]:
    """What the run measured on each of its users: 'meas-' and 6 hex digits of the SHA-256 of its config entries
    without :data:`LOCATION_CONFIG_KEYS` (so the setting plus every seed and the defenses), so a rerun, a resumed
    copy or an interrupted cell and its re-run share it while a run with another ``--seed`` does not. None when
    the config does not say (:func:`_identity_known`): such a run's users are never duplicates of another's."""
    entries, parsed = _read_config(Path(run_dir) / "config.yaml")
    if not _identity_known(entries, parsed):
        return None
    return _hash(_without(entries, LOCATION_CONFIG_KEYS), "meas-")


def _run_age(run_dir: Path) -> tuple:
    """Sort key, newest last: finished before not, then attack.py's folder time stamp, then results.csv's mtime."""
    import re

    d = Path(run_dir)
    m = re.search(r"-(\d{8}-\d{6})-[0-9a-f]{6}$", d.name)
    try:
        mtime = (d / "results.csv").stat().st_mtime
    except OSError:
        mtime = 0.0
    return (run_status(d) == "finished", m.group(1) if m else "", mtime, d.name)


class UnknownVariantError(ValueError):
    """A ``--variants`` key that is not one of :data:`VARIANT_KEYS`."""


def final_stage_of(run_dir: Path) -> Optional[str]:
    """The user-level attack's final stage (:func:`lightning_modules.user_level_inversion.final_stage_label`) from the
    run's config.yaml, for runs written before results.csv had a ``final_stage`` column; 'none' for other attacks,
    None when the config cannot be read."""
    try:
        import yaml

        attack = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("attack") or {}
    except Exception:  # noqa: BLE001 - no config: the column stays empty for this run
        return None
    if not str(attack.get("class_path", "")).endswith("UserLevelInversion"):
        return "none"
    import inspect

    from lightning_modules.user_level_inversion import UserLevelInversion, final_stage_label

    defaults = {k: p.default for k, p in inspect.signature(UserLevelInversion.__init__).parameters.items()}
    a = {**defaults, **(attack.get("init_args") or {})}  # a hand-written config may leave keys at their defaults
    return final_stage_label(*(a[k] for k in inspect.signature(final_stage_label).parameters))


def load_runs(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate ``RUN_DIR/results.csv`` of every run, adding ``run`` (folder name), ``run_dir``, ``run_name``
    (see :func:`run_name_of`), ``setting`` (:func:`setting_of`), ``user_key`` (which user a row is: the run's
    :func:`user_source_of` and the user id, so one user in two runs has one key; the run folder and the user id when
    the config does not say) and ``measurement_key`` (:func:`measurement_of`) columns; ``defense`` is filled with
    'none' where a run lacks it. ``attrs["setting_entries"]``: each setting's config entries (:func:`setting_entries`);
    a run whose config attack.py's parser no longer reads takes the setting it agrees with on the keys it sets
    (:func:`match_unparsed_settings`; ``attrs["unparsed_settings"]``: the settings left that come from such configs).

    Numeric-looking columns are converted to float (empty cells -> NaN; "True"/"False" -> 1/0); ``B`` to int.

    A run directory of attack.py (config.yaml or summary.json) without results.csv, stopped before its first user
    finished, adds no rows (:func:`run_notes` names it).

    Raises:
        FileNotFoundError: a folder that is no run directory (no results.csv, config.yaml or summary.json).
        ValueError: a results.csv lacks ``user``, ``method`` or ``B``; no run directory has results.csv.
    """
    frames = []
    entries_by_setting: dict = {}  # setting -> its config entries (for the labels of what differs between settings)
    parsed_by_setting: dict = {}  # setting -> whether attack.py's parser read its configs (else: as written)
    for d in run_dirs:
        d = Path(d)
        csv = d / "results.csv"
        if not csv.is_file():
            # scripts/objective_audit.py's run, finished or not (it writes config.yaml first and audit.csv at the end)
            if (d / "audit.csv").is_file() or "audit" in config_groups(d / "config.yaml"):
                raise ValueError(f"{d} is a run directory of scripts/objective_audit.py: its tables are {d}/audit.csv "
                                 f"and {d}/summary.md (`objective_audit.py collect` gathers several), not a report's")
            if (d / "summary.json").is_file() or (d / "config.yaml").is_file():
                continue  # attack.py's run stopped before its first user finished: no rows (run_notes names it)
            if (d / "sweep.json").is_file() and (d / "cells").is_dir():
                raise FileNotFoundError(f"{d} is a sweep directory of sweep.py: its report is in {d}/report (written "
                                        f"when the sweep finished); to report its cells again, give {d}/cells/*")
            inner = sorted(p.parent for p in d.glob("*/results.csv"))[:3]
            raise FileNotFoundError(f"{csv} not found: expected a run directory written by attack.py"
                                    + (f"; {d} holds run directories ({', '.join(str(p) for p in inner)}, ...): give "
                                       f"them, e.g. {d}/*" if inner else ""))
        df = pd.read_csv(csv)
        missing = [c for c in ("user", "method", "B") if c not in df.columns]
        if missing:
            raise ValueError(f"{csv} lacks column(s) {missing}")
        # as written (strings); made integers below only when every run's ids are integers (see _user_ids)
        df["user"] = pd.read_csv(csv, usecols=["user"], dtype=str, keep_default_na=False)["user"].astype(object)
        df["run"] = d.name
        df["run_dir"] = str(d)
        df["run_name"] = run_name_of(d)
        entries, parsed = _read_config(d / "config.yaml")
        kept = setting_entries(entries)
        setting = None if kept is None else _hash(kept, "cfg-")  # = setting_of(d)
        df["setting"] = setting
        if kept is not None:
            entries_by_setting[setting] = kept
            parsed_by_setting[setting] = parsed
        source = user_source_of(d)
        users = df["user"].astype(str)
        # which user a row is (the same user in two runs of one source shares it; unknown: this run's own user)
        df["user_key"] = (source + "|" + users) if source is not None else (str(d) + "|" + users)
        df["measurement_key"] = measurement_of(d)
        if "final_stage" not in df:
            df["final_stage"] = final_stage_of(d)
        frames.append(df)
    if not frames:
        raise ValueError("no run directories given" if not run_dirs else
                         f"none of the {len(run_dirs)} run directories has results.csv (no user finished)")
    df = pd.concat(frames, ignore_index=True)
    df["user"] = _user_ids(df["user"])  # over all runs: one type, so halves of one user source pool and pair
    merged, unparsed = match_unparsed_settings(entries_by_setting, parsed_by_setting)
    df["setting"] = df["setting"].map(lambda s: merged.get(s, s) if isinstance(s, str) else None)
    df.attrs["setting_entries"] = {s: e for s, e in entries_by_setting.items() if merged.get(s, s) == s}
    df.attrs["unparsed_settings"] = unparsed
    df["B"] = pd.to_numeric(df["B"], errors="raise").astype(int)
    df["method"] = df["method"].astype(str)
    if "defense" in df or "defense_strength" in df:
        df["defense"] = df["defense"].fillna("none").astype(str) if "defense" in df else "none"
        df["defense_strength"] = (pd.to_numeric(df["defense_strength"], errors="coerce")
                                  if "defense_strength" in df else math.nan)
    for c in df.columns:
        if c in TEXT_COLUMNS:
            continue
        conv = _to_number(df[c])
        if conv.notna().sum() >= df[c].notna().sum() and (conv.notna().any() or df[c].isna().all()):
            df[c] = conv
    return df


# row columns that tell two measurements of one user apart besides the run's config (measurement_key); run_name
# too: runs of one config under two output.name (a control cell, the same cell in two sweeps) are two table rows, so
# neither loses its users to the other
DUPLICATE_ROW_KEYS = ["method", "B", "protocol", "victim_init", "defense", "defense_strength", "final_stage",
                      "id_gallery", "run_name"]


def drop_duplicate_users(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Keep one row per measurement: rows of one user (``user_key``) with the same ``measurement_key`` (setting,
    seeds and defenses: :func:`measurement_of`) and the same method, B, run name and row variant columns
    (:data:`DUPLICATE_ROW_KEYS`) are one measurement found twice (a rerun, a resumed copy, an interrupted sweep cell
    and its re-run); the row of the newest finished run is kept (finished before not, then the newest folder time
    stamp; within one run, the last row). Rows of one user under another ``--seed`` (another measurement_key) are
    all kept, and rows whose run's config does not say which users and seeds it ran (measurement_key None) are
    never dropped.

    ``df.attrs["pool_run_names"]`` true (:func:`build_report`'s ``pool_run_names``): the run name is left out of
    the key, as it is out of the table's keys, so one user's measurement in two differently named runs (two sweep
    cells that differ only in num_users or execution settings) counts once.

    Returns:
        ``(frame without the duplicates, attrs kept; one message per (dropped run, kept run))``.
    """
    if "measurement_key" not in df or "user_key" not in df or not df["measurement_key"].notna().any():
        return df, []
    known = df[df["measurement_key"].notna()]
    pool_names = bool(df.attrs.get("pool_run_names"))  # names are no table key then: not a measurement's either
    cols = ["measurement_key", "user_key"] + [c for c in DUPLICATE_ROW_KEYS if c in df
                                              and not (pool_names and c == "run_name")]
    key = known[cols].astype(object).where(known[cols].notna(), "nan").astype(str).agg("\x1f".join, axis=1)
    ages = {r: _run_age(Path(r)) for r in known["run_dir"].unique()}
    order = sorted(ages, key=lambda r: ages[r])
    rank = known["run_dir"].map({r: i for i, r in enumerate(order)})
    ranked = pd.DataFrame({"key": key, "rank": rank, "pos": np.arange(len(known))}, index=known.index)
    ranked = ranked.sort_values(["rank", "pos"], kind="stable")
    keep = ~ranked["key"].duplicated(keep="last")
    dropped = ranked.index[~keep.to_numpy()]
    if not len(dropped):
        return df, []
    kept_run = dict(zip(ranked.loc[keep.to_numpy(), "key"], df.loc[ranked.index[keep.to_numpy()], "run_dir"]))
    messages = []
    pairs: dict = {}
    for i in dropped:
        pairs.setdefault((df.at[i, "run_dir"], kept_run[key[i]]), []).append(df.at[i, "user"])
    for (was, kept), users in pairs.items():
        names = ", ".join(str(u) for u in dict.fromkeys(users))
        if was == kept:
            messages.append(f"{was} holds user(s) {names} more than once with the same setting and seeds: "
                            "counted once (the last row)")
        else:
            messages.append(f"{was} repeats user(s) {names} of {kept} with the same setting and seeds (a rerun, a "
                            f"resumed copy, an interrupted run and its re-run?): counted once, from {kept} (the "
                            "newest finished run)")
    out = df.drop(index=dropped)
    out.attrs = dict(df.attrs)
    return out, messages


def run_notes(run_dirs: Sequence[str | Path], df: pd.DataFrame) -> list[str]:
    """One line per run that did not finish (summary.json's status 'interrupted', 'diverged: ...', 'failed: ...',
    or no summary.json): its finished users are in the tables (partial runs are legitimate: the halves of a split
    run pool), but say so."""
    notes = []
    for d in run_dirs:
        status = run_status(Path(d))
        if not (Path(d) / "results.csv").is_file():  # stopped (or killed) before its first user finished
            notes.append(f"{d} has no results.csv (status {status!r}: no user finished): it adds no rows")
            continue
        if status == "finished":
            continue
        n = int((df["run_dir"] == str(d)).sum()) if "run_dir" in df else 0
        if status is None:
            notes.append(f"{d} has no summary.json (still running, or stopped before writing it): its results.csv "
                         f"({n} row(s)) is pooled like any run's")
        else:
            notes.append(f"{d} ended with status {status!r}: its finished users ({n} row(s) in results.csv) are "
                         "pooled like any run's")
    return notes


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric metric columns of a loaded frame, main metrics first (see MAIN_METRICS)."""
    numeric = [c for c in df.columns if c not in NON_METRIC and pd.api.types.is_numeric_dtype(df[c])]
    return [m for m in MAIN_METRICS if m in numeric] + [c for c in numeric if c not in MAIN_METRICS]


def _varies(df: pd.DataFrame, col: str) -> bool:
    return col in df and df[col].astype(object).where(df[col].notna(), None).nunique(dropna=False) > 1


def _splits(df: pd.DataFrame, keys: Sequence[str], col: str) -> bool:
    """Whether ``col`` takes more than one value (None/NaN being one) within some group of ``keys``."""
    if col not in df or not len(df):
        return False
    values = df[col].astype(object).where(df[col].notna(), "\0none")
    return bool(values.groupby([df[k] for k in keys], dropna=False).nunique().max() > 1)


def group_keys(df: pd.DataFrame) -> list[str]:
    """``method, B`` plus the :data:`VARIANT_KEYS` the runs differ in (defense and defense_strength together;
    ``run_name`` only when runs alike in every other key have different names, e.g. two ablations of one method and
    B, not when the names differ only along B; ``setting`` only when runs alike in every other key have different
    configs, so that two runs of one name, e.g. a
    5-step and a 60-step run, or two refinished ablations, are two rows), or exactly the variant keys chosen with
    ``df.attrs["variant_keys"]`` (``--variants``; e.g. ``final_stage`` alone pools runs of different names that share
    a final stage). ``df.attrs["pool_run_names"]`` true (sweep.py's report: its run names are cell slugs, so a seed
    or first_user axis of the grid would split every row per cell): ``run_name`` is a key only as a label, when the
    names split rows and every setting has one name (an ablation sweep: attack=no_prior ...); runs of one setting
    under several names pool, and runs of other configs stay apart through ``setting``."""
    keys = list(GROUP_KEYS)
    chosen = df.attrs.get("variant_keys")
    pool_names = bool(df.attrs.get("pool_run_names"))
    for k in VARIANT_KEYS:
        if chosen is not None:
            if k in chosen and k in df:
                keys.append(k)
            continue
        if k in ("defense", "defense_strength"):
            if (_varies(df, "defense") or _varies(df, "defense_strength")) and k in df:
                keys.append(k)
        elif k == "final_stage":  # only the user-level attack has one: it varies when it does within a method
            if k in df and df.groupby("method")[k].nunique(dropna=False).max() > 1:
                keys.append(k)
        elif k == "run_name" and pool_names:  # a label only: when every setting has one name (ablation cells)
            if ("setting" in df and _splits(df, keys, k) and not _splits(df, keys + ["setting"], k)
                    and df["setting"].notna().all()):
                keys.append(k)
        elif k in ("run_name", "setting"):  # only when it splits rows that every other key leaves together (a
            # run name that only restates B, e.g. B10_ig / B50_ig, would cut the B series into one-point lines)
            if _splits(df, keys, k):
                keys.append(k)
        elif _varies(df, k):
            keys.append(k)
    return keys


def has_defense_levels(df: pd.DataFrame) -> bool:
    """More than one distinct defense or defense strength among the runs."""
    return _varies(df, "defense") or _varies(df, "defense_strength")


def _key_value(v):
    if isinstance(v, (float, np.floating)) and not np.isfinite(v):
        return math.nan
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


_UNSET = object()


def _value_text(v) -> str:
    if v is _UNSET:
        return "(unset)"
    if isinstance(v, str):
        return v
    import json

    text = json.dumps(v, default=str)  # false, null, 5, [..]: as written in a config
    return text if len(text) <= 40 else text[:37] + "..."


def setting_diff_labels(entries_by_setting: dict, settings: Sequence, max_keys: int = 3,
                        unparsed: Sequence = ()) -> dict:
    """Per setting in ``settings``: the config entries in which these settings differ, as ``key=value, ...`` (sorted
    by key; at most ``max_keys``, then '+N more'; a key one config lacks reads '(unset)'), e.g.
    'attack.init_args.steps=5' beside 'attack.init_args.steps=60'; '' for a setting alone, '(config unreadable)'
    for a run without a readable config (setting None). ``entries_by_setting``: setting -> :func:`setting_entries`.
    Settings in ``unparsed`` (configs as written, without defaults: :func:`match_unparsed_settings`) are compared
    only on the keys they share with the parsed ones when a parsed setting is among ``settings`` (their label then
    ends with '(unparsed config)'); among unparsed settings only, as written."""
    settings = list(dict.fromkeys(s if isinstance(s, str) else None for s in settings))
    if len(settings) < 2:
        return {s: "" for s in settings}
    unparsed = set(unparsed)
    known = {s: (entries_by_setting.get(s) if s is not None else None) for s in settings}
    readable = {s: e for s, e in known.items() if e is not None}
    # an unparsed config says nothing about the keys it does not set, beside a parsed one (defaults filled in), and
    # a key no parsed config has (an option since removed) is not compared (as in match_unparsed_settings); among
    # unparsed configs only (compared as written) a key one sets and another does not is a difference
    mixed = any(s not in unparsed for s in readable)
    compared = [e for s, e in readable.items() if not mixed or s not in unparsed]
    names = sorted(set().union(*compared)) if compared else []

    def shown(s, k) -> bool:
        return not mixed or s not in unparsed or k in readable[s]

    diff = [k for k in names if len({_value_text(e.get(k, _UNSET)) for s, e in readable.items() if shown(s, k)}) > 1]
    out = {}
    for s, e in known.items():
        if e is None:
            out[s] = "(config unreadable)"
            continue
        parts = [f"{k}={_value_text(e.get(k, _UNSET))}" for k in diff if shown(s, k)]
        if len(parts) > max_keys:
            parts = parts[:max_keys] + [f"+{len(parts) - max_keys} more"]
        if mixed and s in unparsed:
            parts.append("(unparsed config)")
        out[s] = ", ".join(parts) or "(same config)"
    return out


def _entries_by_setting(df: pd.DataFrame) -> dict:
    """setting -> config entries, from ``df.attrs`` (:func:`load_runs`), else read from a run of that setting."""
    known = dict(df.attrs.get("setting_entries") or {})
    if "setting" in df and "run_dir" in df:
        for setting, run_dir in df.drop_duplicates("setting")[["setting", "run_dir"]].itertuples(index=False):
            if isinstance(setting, str) and setting not in known:
                kept = setting_entries(_config_entries(Path(run_dir) / "config.yaml"))
                if kept is not None:
                    known[setting] = kept
    return known


def _add_setting_diff(out: pd.DataFrame, df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Insert ``setting_diff`` after ``setting``: per row, what its setting's config changes against the other
    settings among the rows alike in every key but setting, defense and strength (:func:`setting_diff_labels`)."""
    scope = [k for k in keys if k not in ("setting", "defense", "defense_strength")]
    entries = _entries_by_setting(df)
    unparsed = df.attrs.get("unparsed_settings") or ()
    labels = pd.Series("", index=out.index, dtype=object)
    for _, g in out.groupby(scope, sort=False, dropna=False):
        by = setting_diff_labels(entries, g["setting"].tolist(), unparsed=unparsed)
        labels[g.index] = [by[s if isinstance(s, str) else None] for s in g["setting"]]
    out.insert(out.columns.get_loc("setting") + 1, "setting_diff", labels)
    return out


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a success rate (e.g. the evaluator accuracy: users whose representative image is
    read as their dominant class, out of the users), from :meth:`scipy.stats.binomtest(...).proportion_ci
    <scipy.stats._result_classes.BinomTestResult.proportion_ci>` (Wilson 1927; sound for small n, unlike the normal
    approximation: 18 of 20 gives (0.699, 0.972) at 95%).

    Returns:
        (low, high) in [0, 1]; (NaN, NaN) when ``trials`` is 0.

    Raises:
        ValueError: ``successes`` outside [0, trials] or ``confidence`` outside (0, 1) (from scipy).
    """
    if trials == 0:
        return math.nan, math.nan
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _tied_top(histogram, cls) -> bool:
    """Whether class ``cls`` holds the top count of a results.csv ``true_histogram`` ('n_0 n_1 ...'); False for a
    missing or unreadable histogram."""
    try:
        counts = [int(float(v)) for v in str(histogram).split()]
        return bool(counts) and 0 <= int(cls) < len(counts) and counts[int(cls)] == max(counts)
    except (TypeError, ValueError):
        return False


def label_hits(df: pd.DataFrame) -> pd.Series:
    """Per row, whether label inference found the user's dominant class: 1.0 when ``inferred_dominant`` is
    ``dominant_class`` or another class tied for the top count of ``true_histogram`` (:func:`_tied_top`), 0.0 when
    not, NaN when either column is empty (not measured). The rule of ``label_accuracy`` (:func:`aggregate`), for
    hand-built tables too (:func:`count_cell` counts it)."""
    out = pd.Series(math.nan, index=df.index, dtype=float)
    if "dominant_class" not in df or "inferred_dominant" not in df:
        return out
    both = df[["dominant_class", "inferred_dominant"]].dropna()
    hits = both["dominant_class"] == both["inferred_dominant"]
    if "true_histogram" in df:  # a class tied for the top count is as right as the one results.csv names
        tied = [_tied_top(h, c) for h, c in zip(df.loc[both.index, "true_histogram"], both["inferred_dominant"])]
        hits = hits | pd.Series(tied, index=both.index, dtype=bool)
    out[both.index] = hits.astype(float)
    return out


def aggregate(df: pd.DataFrame, keys: Optional[Sequence[str]] = None, metrics: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Per group (default :func:`group_keys`: method, B and what the runs differ in): n_users, evaluator/label
    accuracy and avg/std/n over rows of every metric column (or of ``metrics``).

    ``n_users`` counts distinct users (``user_key``: one user attacked under several ``--seed`` values, or found in
    two runs of one user source, is one user); ``n_rows`` (the rows averaged, one per user and seed) follows it only
    when some group has more rows than users. std is the sample standard deviation over rows (ddof 1), NaN for a
    single row; NaN cells (not measurable) are left out of avg/std and counted in ``M_n``. Missing key values (e.g.
    strength NaN for 'none') form their own group. With ``setting`` among the keys, ``setting_diff`` follows it
    (:func:`setting_diff_labels`).
    """
    keys = list(keys) if keys is not None else group_keys(df)
    metrics = metric_columns(df) if metrics is None else [m for m in metrics if m in df]
    rows = []
    for key, g in df.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict = {k: _key_value(v) for k, v in zip(keys, key)}
        row["B"] = int(row["B"])
        row["n_users"] = int(g["user_key"].nunique()) if "user_key" in g else int(len(g))
        row["n_rows"] = int(len(g))
        if "evaluator_correct" in g:
            ok = _to_number(g["evaluator_correct"]).dropna()
            row["evaluator_accuracy"] = float(ok.mean()) if len(ok) else math.nan
            # the interval treats rows as independent users: with repeated seeds of one user it would be too narrow
            independent = "user_key" not in g or g.loc[ok.index, "user_key"].is_unique
            low, high = wilson_interval(int(ok.sum()), len(ok)) if independent else (math.nan, math.nan)
            row["evaluator_accuracy_ci_low"], row["evaluator_accuracy_ci_high"] = low, high
        if "dominant_class" in g and "inferred_dominant" in g:
            hits = label_hits(g).dropna()
            row["label_accuracy"] = float(hits.mean()) if len(hits) else math.nan
        for m in metrics:
            v = g[m].astype(float)
            v = v[np.isfinite(v)]
            row[f"{m}_avg"] = float(v.mean()) if len(v) else math.nan
            row[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
            row[f"{m}_n"] = int(len(v))
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out) and (out["n_rows"] == out["n_users"]).all():
        out = out.drop(columns="n_rows")  # one row per user everywhere: the table as before
    if "setting" in keys and len(out):
        out = _add_setting_diff(out, df, keys)
    if "defense_strength" in keys and len(out):  # no defense ('none', strength NaN) first, then by strength
        order = [k for k in keys if k != "defense"]
        if "defense" in keys:
            order.insert(order.index("defense_strength") + 1, "defense")
        out = out.sort_values(order, na_position="first", kind="stable", ignore_index=True)
    return out


PRIVACY_SPLIT_KEYS = ["protocol", "victim_init", "final_stage", "setting"]


def aggregate_privacy(df: pd.DataFrame) -> pd.DataFrame:
    """Per (method, B, defense, defense_strength), pooled over runs (seeds, run names): accuracies and psnr/lpips
    nearest; runs that differ in protocol, victim initialisation, final stage or any other setting than their
    defenses, seeds and user range (:data:`PRIVACY_SPLIT_KEYS`, each only when it varies; ``setting`` is
    :func:`setting_of`) stay apart: a trained and a random victim are two curves, and an ablation run without the
    prior is not pooled into the undefended point of the full attack."""
    extra = [k for k in PRIVACY_SPLIT_KEYS if _varies(df, k)]
    df = df.assign(defense_strength=privacy_strengths(df, extra))  # a composition's varying parameter (strength_params)
    return aggregate(df, PRIVACY_KEYS + extra, metrics=["psnr_nearest", "lpips_nearest"])


# --------------------------------------------------------------------------------------------------------------------
# hand-built tables: one row per configuration pooled over runs, paired per-user comparisons


class DuplicateUserError(ValueError):
    """A user found in more than one of the runs pooled into one table row."""


def newest_run(roots: Sequence[str | Path], name: str) -> Optional[Path]:
    """The newest run directory of ``output.name`` ``name`` directly under any of ``roots``.

    attack.py names run folders ``NAME-YYYYmmdd-HHMMSS-hex`` (:data:`RUN_DIR_SUFFIX`); the newest is the one with
    the latest timestamp in its name. Copies of one run under two roots (the same folder name: e.g. a partial run
    kept in git beside the copy that goes on) are told apart by finished before not, then more users in
    ``results.csv``, then the later ``results.csv`` modification time, never by the order of ``roots``. Only
    folders holding ``results.csv`` count; a folder whose name merely starts with ``name`` (``B10_ig_u0`` for
    ``B10_ig``) does not match. Missing roots are skipped.

    Returns:
        The folder, or None when no run of that name exists.
    """
    import re

    pattern = re.compile(re.escape(name) + RUN_DIR_SUFFIX)
    found = [d for r in roots if Path(r).is_dir() for d in Path(r).iterdir()
             if pattern.fullmatch(d.name) and (d / "results.csv").is_file()]

    def age(d: Path) -> tuple:
        csv = d / "results.csv"
        try:
            with open(csv, "rb") as fh:
                rows = sum(1 for _ in fh)
            mtime = csv.stat().st_mtime
        except OSError:  # unreadable or gone since: the other copies win
            rows, mtime = -1, 0.0
        return d.name[len(name):], run_status(d) == "finished", rows, mtime

    return max(found, key=age) if found else None


def pool_users(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One configuration's rows pooled over the runs that hold its users (e.g. users 0-9 and 10-19 run apart).

    Loads every ``results.csv`` with :func:`load_runs` (so numeric columns are float, booleans 1/0) and indexes the
    result by ``user``, sorted; ``run`` says which run each user came from.

    Raises:
        DuplicateUserError: a user appears twice (in two runs, or twice in one), since which row to keep would be a
            guess: pass each user's run once (see :func:`newest_run` for picking the latest of reruns).
        ValueError: the runs' users come from different user sources (:func:`_user_batches_of`: another batch size,
            dataset, users seed...; not the data's folder), so one user id would name two different batches; as
            :func:`load_runs`.
        FileNotFoundError: as :func:`load_runs`.
    """
    df = load_runs(run_dirs)
    sources = df.assign(source=_user_source_column(df)).dropna(subset=["source"]).groupby("source")["run"].unique()
    if len(sources) > 1:
        raise ValueError("the pooled runs attack users of different sources (another batch size, data or users seed; "
                         "user ids then name different batches): "
                         + "; ".join(f"{s}: {', '.join(runs)}" for s, runs in sources.items())
                         + ". Pool runs of one user configuration that differ only in the user range.")
    dup = df[df["user"].duplicated(keep=False)]
    if len(dup):
        where = dup.groupby("user")["run"].apply(lambda r: ", ".join(r)).head(5)
        raise DuplicateUserError("user(s) found more than once in the pooled runs: "
                                 + "; ".join(f"user {u} in {r}" for u, r in where.items())
                                 + ". Pool runs of disjoint users (pick one run per rerun).")
    return df.set_index("user").sort_index()


def pool_newest_runs(roots: Sequence[str | Path], names: Sequence[str]) -> Optional[pd.DataFrame]:
    """One table row's users: the newest run of each ``output.name`` in ``names`` (:func:`newest_run`; names with
    no run are skipped) pooled with :func:`pool_users`; None when none of the names has a run.

    Raises:
        DuplicateUserError: two of the runs share a user (see :func:`pool_users`).
    """
    runs = [d for d in (newest_run(roots, n) for n in names) if d is not None]
    return pool_users(runs) if runs else None


def count_cell(values: Optional[pd.Series]) -> str:
    """``'k/n'``: k truthy values among the n measured (non-NaN) ones, e.g. users whose representative image the
    evaluator reads as the dominant class (``evaluator_correct``); '-' when nothing was measured (or ``values`` is
    None: a column the runs lack)."""
    if values is None:
        return "-"
    v = _to_number(values).dropna()
    return f"{int((v != 0).sum())}/{len(v)}" if len(v) else "-"


def mean_std_cell(values: Optional[pd.Series], fmt: str = ".3g") -> str:
    """``'mean ± std'`` over users (sample std, ddof 1, two significant digits; mean alone for one value), NaN
    left out; '-' when nothing was measured (or ``values`` is None: a column the runs lack). ``fmt`` formats the
    mean (a format spec such as '.3g' or '.2f')."""
    if values is None:
        return "-"
    v = _to_number(values).dropna()
    if not len(v):
        return "-"
    return f"{v.mean():{fmt}}" + (f" ± {v.std(ddof=1):.2g}" if len(v) > 1 else "")


def _user_batches_of(run_dir: str | Path) -> Optional[str]:
    """Which batch each user id of the run names: 'users-' and 6 hex digits of the SHA-256 of its ``users.*`` config
    entries without the user range (:data:`USER_RANGE_KEYS`) and the data's location (:data:`USER_LOCATION_KEYS`);
    None unless attack.py's parser reads the run's config (a config as written may lack defaults added since, and
    would differ from a parsed one on those alone)."""
    entries, parsed = _read_config(Path(run_dir) / "config.yaml")
    if not parsed or entries is None:
        return None
    return _users_hash(entries, USER_RANGE_KEYS + USER_LOCATION_KEYS)


def _user_source_column(df: pd.DataFrame) -> pd.Series:
    """Each row's :func:`_user_batches_of` its run directory (``run_dir``); NaN where unknown (no ``run_dir``
    column, or a config attack.py's parser does not read)."""
    if "run_dir" not in df:
        return pd.Series(np.nan, index=df.index, dtype=object)
    by_dir = {d: _user_batches_of(d) for d in df["run_dir"].dropna().unique()}
    return df["run_dir"].map(by_dir)


def _shared_users(a: pd.DataFrame, b: pd.DataFrame, column: str, caller: str, convert=lambda c: c) -> pd.DataFrame:
    """Columns ``a``, ``b``: ``column`` of both per-user frames (``convert`` applied) on the users both measured.

    Raises:
        KeyError: ``column`` missing from either frame.
        ValueError: ``a`` and ``b`` come from different user sources (:func:`_user_batches_of`): their user ids name
            different batches (e.g. user 3 at B = 50 and at B = 100), so no user is shared."""
    for name, d in (("a", a), ("b", b)):
        if column not in d:
            raise KeyError(f"{caller}: column {column!r} not in {name} (has {list(d.columns)[:8]}...)")
    sa, sb = (set(_user_source_column(d).dropna()) for d in (a, b))
    if sa and sb and sa != sb:
        raise ValueError(f"{caller}: a and b attack users of different sources ({sorted(sa)} vs {sorted(sb)}: another "
                         "batch size, data or users seed), so their user ids name different batches; compare runs of "
                         "one user configuration")
    ca, cb = convert(a[column]).rename("a"), convert(b[column]).rename("b")
    if ca.index.dtype != cb.index.dtype:  # ids loaded separately: integers in one, strings in the other
        ca, cb = ca.set_axis(ca.index.astype(str)), cb.set_axis(cb.index.astype(str))
    return pd.concat([ca, cb], axis=1, join="inner").dropna()


def paired_counts(a: pd.DataFrame, b: pd.DataFrame, column: str = "evaluator_correct") -> dict[str, int]:
    """Per-user paired comparison of a success flag between two configurations on the users both measured.

    ``a`` and ``b`` are per-user frames indexed by ``user`` (:func:`pool_users`); ``column`` holds 1/0 (True/False).
    Success counts alone hide whether two configurations win on the same users: 10/20 vs 11/20 can be 10 shared
    users or 1. Returns ``{"n": users in both, "both": , "a_only": , "b_only": , "neither": }``.

    Raises:
        KeyError: ``column`` missing from either frame.
        ValueError: the frames' users come from different user sources (see :func:`_shared_users`).
    """
    joined = _shared_users(a, b, column, "paired_counts", _to_number)
    x, y = joined["a"] != 0, joined["b"] != 0
    return {"n": int(len(joined)), "both": int((x & y).sum()), "a_only": int((x & ~y).sum()),
            "b_only": int((~x & y).sum()), "neither": int((~x & ~y).sum())}


def changed_count(a: pd.DataFrame, b: pd.DataFrame, column: str = "evaluator_class") -> tuple[int, int]:
    """``(k, n)``: on the n users both frames measured (indexed by ``user``), k where ``column`` differs, e.g. the
    evaluator's class of the reconstruction between an ablation and the full attack (or a rerun: the noise floor).

    Raises:
        KeyError: ``column`` missing from either frame.
        ValueError: the frames' users come from different user sources (see :func:`_shared_users`).
    """
    joined = _shared_users(a, b, column, "changed_count")
    return int((joined["a"] != joined["b"]).sum()), int(len(joined))


# --------------------------------------------------------------------------------------------------------------------
# figures


def _series(summary: pd.DataFrame, keys: Sequence[str]):
    """Yield (label, summary rows, key dict) per combination of ``keys`` (NaN-safe)."""
    if not keys:
        yield "", summary, {}
        return
    for key, s in summary.groupby(list(keys), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        kd = dict(zip(keys, key))
        parts = [str(kd["method"])] if "method" in kd else []
        parts += [_setting_text(s, v) if k == "setting" else f"{k}={_fmt_key(v)}" for k, v in kd.items()
                  if k != "method"]
        yield " | ".join(parts), s, kd


def _setting_text(rows: pd.DataFrame, setting) -> str:
    """A figure's label for a setting: what it changes (``setting_diff`` of its rows) when known, else its hash."""
    diff = rows["setting_diff"].iloc[0] if "setting_diff" in rows and len(rows) else ""
    if not (isinstance(diff, str) and diff):
        return f"setting={_fmt_key(setting)}"
    return diff if len(diff) <= 48 else diff[:45] + "..."


def _fmt_key(v) -> str:
    if isinstance(v, float):
        return "-" if not np.isfinite(v) else f"{v:g}"
    return str(v)


def _match(df: pd.DataFrame, kd: dict) -> pd.Series:
    mask = pd.Series(True, index=df.index)
    for k, v in kd.items():
        if k not in df:
            continue
        if isinstance(v, float) and not np.isfinite(v):
            mask &= df[k].isna()
        else:
            mask &= df[k] == v
    return mask


def plot_metrics_vs_b(df: pd.DataFrame, summary: pd.DataFrame, path: Path) -> Optional[Path]:
    """Line plot per metric: avg over users vs B per method (and per extra group key), ± std band, every user as a
    dot. Returns path or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in FIGURE_METRICS if f"{m}_avg" in summary or m in summary]
    metrics = [m for m in metrics if summary.get(f"{m}_avg", summary.get(m)).notna().any()]
    if not metrics:
        return None
    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow), squeeze=False)
    bs = sorted(summary["B"].unique())
    rng = np.random.default_rng(0)
    for ax, m in zip(axes.flat, metrics):
        series_keys = [k for k in summary.columns if k in GROUP_KEYS + VARIANT_KEYS and k != "B"]
        for i, (label, s, kd) in enumerate(_series(summary, series_keys)):
            s = s.sort_values("B")
            color = f"C{i % 10}"
            if m == "evaluator_accuracy":
                ax.plot(s["B"], s[m], "o-", color=color, label=label)
                _wilson_bars(ax, s, s["B"], color)
                continue
            avg, std = s[f"{m}_avg"].to_numpy(float), s[f"{m}_std"].fillna(0).to_numpy(float)
            ax.plot(s["B"], avg, "o-", color=color, label=label)
            ax.fill_between(s["B"], avg - std, avg + std, color=color, alpha=0.2, linewidth=0)
            u = df[_match(df, kd) & np.isfinite(df[m].astype(float))]
            jitter = np.exp(rng.uniform(-0.06, 0.06, len(u))) if len(bs) > 1 else 1.0
            ax.scatter(u["B"] * jitter, u[m], s=8, color=color, alpha=0.35, linewidths=0)
        if len(bs) > 1 and max(bs) / max(min(bs), 1) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.minorticks_off()
        better = HIGHER_IS_BETTER.get(m.split("_")[0])
        ax.set_title(m + ("" if better is None else (" (higher better)" if better else " (lower better)")), fontsize=9)
        ax.set_xlabel("batch size B")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8 if len(summary) <= 8 else 6)
    fig.suptitle("metrics vs batch size: mean ± std over users, dots = users", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _defense_parts(label: str) -> list[tuple[str, list[tuple[str, Optional[str]]]]]:
    """``'gaussian_dp(clip_norm=1.0,sigma=0.01)+topk_pruning(keep_fraction=0.1)'`` (``attack.defense_label``) ->
    ``[('gaussian_dp', [('clip_norm', '1.0'), ('sigma', '0.01')]), ('topk_pruning', [('keep_fraction', '0.1')])]``.
    Commas and parentheses inside brackets (a list value) do not split; an item without '=' is kept as
    ``(item, None)``. [] for 'none' or a label of another form."""
    out, pos, text = [], 0, str(label)
    while True:
        m = re.compile(r"\+?(\w+)\(").match(text, pos)
        if m is None:
            return out if pos == len(text) else []
        depth, j, items, start = 0, m.end(), [], m.end()
        while j < len(text):
            c = text[j]
            if c in "([{":
                depth += 1
            elif c in ")]}" and depth:
                depth -= 1
            elif c == ")" or (c == "," and depth == 0):
                if j > start:
                    items.append(text[start:j])
                start = j + 1
                if c == ")":
                    break
            j += 1
        else:
            return []  # unbalanced
        out.append((m.group(1), [(kv.split("=", 1)[0], kv.split("=", 1)[1]) if "=" in kv else (kv, None)
                                 for kv in items]))
        pos = j + 1


def _default_strength_param(parts) -> Optional[tuple[int, str]]:
    """(defense index, key) of ``attack.defense_label``'s strength: the first defense holding one of
    :data:`inversion.defenses.STRENGTH_KEYS`, the first such key."""
    for i, (_, items) in enumerate(parts):
        keys = [k for k, _ in items]
        key = next((k for k in STRENGTH_KEYS if k in keys), None)
        if key is not None:
            return i, key
    return None


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def strength_params(labels) -> dict[str, Optional[tuple[int, str]]]:
    """For each defense label of one privacy curve's runs (one method, B and setting), the (defense index, key)
    whose value is its strength, the curve's x.

    By default the strength of ``attack.defense_label``: the first defense holding one of
    :data:`inversion.defenses.STRENGTH_KEYS`, the first such key. Among labels of one composition (the same defenses
    with the same keys) another such parameter is taken when it puts more runs on lines of two or more points, each
    line being the labels alike in everything else: e.g. ``topk_pruning(keep_fraction=0.1)+gaussian_dp(clip_norm=1.0,
    sigma=S)`` for several S is one curve over sigma, not one point per S at the keep fraction; and
    ``gaussian_dp(clip_norm=C,sigma=0.0)`` (clipping only) for several C is a curve over the clip norm. A clip norm
    next to nonzero noise is never the strength (the noise std is sigma * clip_norm: the clip norm alone does not
    order the runs by privacy); ties keep the default."""
    parsed = {lab: _defense_parts(lab) for lab in dict.fromkeys(map(str, labels))}
    out = {lab: _default_strength_param(parts) for lab, parts in parsed.items()}
    groups: dict[tuple, list[str]] = {}
    for lab, parts in parsed.items():
        if parts:
            groups.setdefault(tuple((n, tuple(k for k, _ in items)) for n, items in parts), []).append(lab)
    for structure, labs in groups.items():
        default = out[labs[0]]
        values = {lab: [dict(items) for _, items in parsed[lab]] for lab in labs}

        def eligible(i: int, k: str) -> bool:
            if k == "clip_norm" and any(_float(values[lab][i].get(n)) != 0 for lab in labs
                                        for n in ("sigma", "noise_multiplier") if n in values[lab][i]):
                return False
            return all(math.isfinite(_float(values[lab][i][k])) for lab in labs)

        def score(param: tuple[int, str]) -> int:
            lines: dict[str, set] = {}
            for lab in labs:
                lines.setdefault(_defense_kind(lab, param), set()).add(values[lab][param[0]][param[1]])
            return sum(1 for lab in labs if len(lines[_defense_kind(lab, param)]) > 1)

        candidates = [(i, k) for i, (_, keys) in enumerate(structure) for k in STRENGTH_KEYS
                      if k in keys and eligible(i, k)]
        best = max(candidates, key=lambda c: (score(c), c == default), default=None)
        if best is not None and best != default and score(best) > (score(default) if default in candidates else 0):
            for lab in labs:
                out[lab] = best
    return out


def _strength_value(label: str, param: Optional[tuple[int, str]]) -> float:
    try:
        return _float(dict(_defense_parts(label)[param[0]][1])[param[1]])
    except (TypeError, IndexError, KeyError):
        return math.nan


def privacy_strengths(df: pd.DataFrame, split: Sequence[str] = ()) -> pd.Series:
    """``defense_strength`` as the privacy curve reads it: results.csv's value (``attack.defense_label``'s), except
    for the labels :func:`strength_params` gives another parameter, chosen per (method, B, ``split`` keys)."""
    d = df.reset_index(drop=True)
    out = pd.to_numeric(d["defense_strength"], errors="coerce").astype(float).to_numpy(copy=True)
    for _, g in d.groupby(["method", "B", *[k for k in split if k in d]], dropna=False, sort=False):
        params = strength_params(g["defense"])
        for pos, lab in zip(g.index, g["defense"].astype(str)):
            prm = params.get(lab)
            if prm is not None and prm != _default_strength_param(_defense_parts(lab)):
                out[pos] = _strength_value(lab, prm)
    return pd.Series(out, index=df.index, name="defense_strength")


def _defense_kind(label: str, param: Optional[tuple[int, str]] = None) -> str:
    """The line a defense label belongs to: the label without the parameter that is its strength (the curve's x:
    ``param``, (defense index, key) from :func:`strength_params`; by default the first defense holding one of
    :data:`inversion.defenses.STRENGTH_KEYS`, the first such key, as ``attack.defense_label`` picks it), every other
    setting kept: 'gaussian_dp(clip_norm=1.0,sigma=0.01)+topk_pruning(keep_fraction=0.1)' ->
    'gaussian_dp(clip_norm=1.0)+topk_pruning(keep_fraction=0.1)', so two clip norms (beside noise) are two lines."""
    parts = _defense_parts(label)
    if not parts:
        return str(label)
    drop = param if param is not None else _default_strength_param(parts)
    return "+".join(f"{name}({','.join(k if v is None else f'{k}={v}' for k, v in items if drop != (i, k))})"
                    for i, (name, items) in enumerate(parts))


PRIVACY_METRICS = [("evaluator_accuracy", "evaluator accuracy (higher = attack succeeds)"),
                   ("lpips_nearest_avg", "LPIPS nearest (lower = attack succeeds)"),
                   ("psnr_nearest_avg", "PSNR nearest, dB (higher = attack succeeds)")]


def _wilson_bars(ax, rows: pd.DataFrame, x, color) -> None:
    """Error bars from ``evaluator_accuracy_ci_low/high`` (the 95% Wilson interval, :func:`wilson_interval`) at
    ``x`` for the rows that have one: bars, not a band, so a series of one point (one B, the undefended marker)
    shows its interval too."""
    if "evaluator_accuracy_ci_low" not in rows:
        return
    ok = np.isfinite(rows["evaluator_accuracy_ci_low"].to_numpy(float))
    if not ok.any():
        return
    acc = rows["evaluator_accuracy"].to_numpy(float)[ok]
    low = rows["evaluator_accuracy_ci_low"].to_numpy(float)[ok]
    high = rows["evaluator_accuracy_ci_high"].to_numpy(float)[ok]
    ax.errorbar(np.asarray(x, dtype=float)[ok], acc, yerr=[np.clip(acc - low, 0, None), np.clip(high - acc, 0, None)],
                fmt="none", ecolor=color, elinewidth=1, capsize=3, alpha=0.6)


def plot_privacy_curve(privacy: pd.DataFrame, path: Path) -> Optional[Path]:
    """Attack success vs defense strength, one line per method (x defense kind, x B and the privacy split keys when
    several); see the module
    docstring for where 'none' and strength 0 are drawn. Returns path or None when nothing can be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if privacy.empty:
        return None
    p = privacy.copy().reset_index(drop=True)
    split = [k for k in PRIVACY_SPLIT_KEYS if k in p]  # present only when the runs differ in it
    p["defense_strength"] = privacy_strengths(p, split)  # as aggregate_privacy sets it (also for other frames)
    p["kind"] = p["defense"].astype(str)
    x_names = set()
    for _, g in p.groupby(["method", "B", *split], dropna=False, sort=False):
        params = strength_params(g["defense"])
        p.loc[g.index, "kind"] = [_defense_kind(str(lab), params.get(str(lab))) for lab in g["defense"]]
        x_names |= {f"{_defense_parts(lab)[prm[0]][0]} {prm[1]}" for lab, prm in params.items()
                    if prm is not None and math.isfinite(_strength_value(lab, prm))}
    is_none = p["defense"] == "none"
    strength = p["defense_strength"].astype(float)
    on_curve = is_none | np.isfinite(strength)
    pos = strength[~is_none & (strength > 0)]
    has_zero = bool((~is_none & (strength == 0)).any())
    log = len(pos) > 0 and pos.max() / pos.min() > 10
    if log:
        lo = float(pos.min())
        x_zero = lo / 10
        x_none = lo / 100 if has_zero else lo / 10
    else:
        hi = float(pos.max()) if len(pos) else 1.0
        x_zero = 0.0
        x_none = -0.15 * hi if has_zero else 0.0
    p["x"] = np.where(is_none, x_none, np.where(strength == 0, x_zero, strength))
    metrics = [(m, t) for m, t in PRIVACY_METRICS if m in p and p[m].notna().any()]
    if not metrics:
        return None
    multi_b = p["B"].nunique() > 1
    kinds = [k for k in sorted(p.loc[~is_none & on_curve, "kind"].unique())] or ["none"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
    for ax, (m, title) in zip(axes[0], metrics):
        i = 0
        for (method, b, *variant), g in p[on_curve].groupby(["method", "B", *split], sort=True, dropna=False):
            base = g[g["defense"] == "none"]
            for kind in kinds:
                line = g[(g["kind"] == kind) & (g["defense"] != "none")].sort_values("x")
                if line.empty and (base.empty or kind != kinds[0]):
                    continue
                named = [_setting_text(g, v) if k == "setting" else str(v) for k, v in zip(split, variant)]
                label = (str(method) + (f" B={b}" if multi_b else "") + "".join(f" {v}" for v in named)
                         + (f" [{kind}]" if len(kinds) > 1 else ""))
                color = f"C{i % 10}"
                i += 1
                if not line.empty:
                    ax.plot(line["x"], line[m], "o-", color=color, label=label)
                    if m == "evaluator_accuracy":
                        _wilson_bars(ax, line, line["x"], color)
                if not base.empty:
                    ax.plot(base["x"], base[m], "s", color=color, markerfacecolor="none", markersize=8,
                            label=label if line.empty else None)
                    if m == "evaluator_accuracy":
                        _wilson_bars(ax, base, base["x"], color)
                    if not line.empty:
                        ax.plot([base["x"].iloc[0], line["x"].iloc[0]], [base[m].iloc[0], line[m].iloc[0]], "--",
                                color=color, alpha=0.6)
        if log:
            ax.set_xscale("log")
        ticks = sorted(set(p.loc[on_curve, "x"].tolist()))
        names = {x_none: "none"}
        if has_zero:
            names[x_zero] = "0"
        if len(ticks) <= 8:
            ax.set_xticks(ticks, [names.get(t, f"{t:g}") for t in ticks], fontsize=8)
            ax.minorticks_off()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel((next(iter(x_names)) if len(x_names) == 1 else "defense strength") + (" (log scale)" if log else ""))
        if m == "evaluator_accuracy":
            ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("privacy curve: attack success vs defense strength (hollow square = no defense)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _user_ids(raw: pd.Series) -> pd.Series:
    """The ``user`` column of the loaded runs (strings as written, all runs together): integers when every id is
    one written canonically (Fashion-MNIST and CelebA users: ``3``; at most 18 digits), else the strings themselves
    (folder users' names), so ``012`` and ``12`` stay two users and ``NA`` or ``null`` is a name, not a missing value
    (``pd.read_csv`` read all of them as numbers or NaN and merged such users as duplicates). Decided over all the
    runs at once: the two halves of one folder source (``00``-``09`` and ``10``-``19``) get one type."""
    canonical = raw.map(lambda v: isinstance(v, str) and re.fullmatch(r"-?(0|[1-9][0-9]{0,17})", v) is not None)
    return raw.astype("int64") if len(raw) and bool(canonical.all()) else raw.astype(object)


def _grid_path(row: pd.Series) -> Optional[Path]:
    run = Path(row["run_dir"])
    for col in ("grid", "grid_path", "user_dir"):
        if col in row and isinstance(row[col], str) and row[col]:
            p = run / row[col]
            p = p / "grid.png" if p.is_dir() else p
            if p.is_file():
                return p
    user = row["user"]
    try:
        name = f"user_{int(user):04d}"
    except (TypeError, ValueError):
        name = str(user)
    p = run / "users" / name / "grid.png"
    return p if p.is_file() else None


def plot_gallery(df: pd.DataFrame, path: Path, users_per_group: int = 4, max_rows: int = 12) -> Optional[Path]:
    """One panel per user grid.png (batch beside reconstructions), a few users per (method, B). Returns path or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    keys = group_keys(df)
    groups = []
    for key, g in df.groupby(keys, sort=True, dropna=False):
        kd = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        extra = "".join(f" {k}={_fmt_key(v)}" for k, v in kd.items() if k not in GROUP_KEYS)
        groups.append((f"{kd['method']} B={kd['B']}{extra}", g))
    per_group = min(users_per_group, max(1, max_rows // max(1, len(groups))))
    labels: dict[Path, list[str]] = {}  # a grid shared by several (method, B) rows is shown once, with all labels
    for name, g in groups:
        for _, row in g.iterrows():
            p = _grid_path(row)
            if p is not None:
                labels.setdefault(p, []).append(name)
    panels, seen = [], set()
    for _name, g in groups:
        n = 0
        for _, row in g.iterrows():
            p = _grid_path(row)
            if p is None or p in seen:
                continue
            seen.add(p)
            where = f"{row['run']}/{p.parent.name}" if p.name == "grid.png" else f"{row['run']}/{p.name}"
            tags = ", ".join(dict.fromkeys(labels[p]))
            panels.append((f"{where}: {tags if len(tags) < 90 else tags[:87] + '...'}", p))
            n += 1
            if n >= per_group:
                break
    panels = panels[:max_rows]
    if not panels:
        return None
    images = [np.asarray(Image.open(p).convert("RGB")) for _, p in panels]
    aspect = max(im.shape[1] / im.shape[0] for im in images)
    width = min(14.0, 2.2 * aspect + 1)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 2.2 * len(panels)), squeeze=False)
    for ax, (title, _), im in zip(axes[:, 0], panels, images):
        ax.imshow(im, interpolation="nearest")
        ax.set_title(title, fontsize=8, loc="left")
        ax.axis("off")
    fig.suptitle("user batch (left) beside reconstructions (grid.png)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------------
# markdown and output


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return ""
    return f"{x:.4g}"


def _markdown_table(summary: pd.DataFrame, df: pd.DataFrame) -> str:
    metrics = [c[: -len("_avg")] for c in summary.columns if c.endswith("_avg")]
    keys = [k for k in GROUP_KEYS + VARIANT_KEYS if k in summary.columns]
    if "setting_diff" in summary:
        keys.insert(keys.index("setting") + 1 if "setting" in keys else len(keys), "setting_diff")
    counts = ["n_users"] + (["n_rows"] if "n_rows" in summary else [])
    head = (keys + ["users"] + (["rows"] if "n_rows" in summary else [])
            + [c for c in ("evaluator_accuracy", "label_accuracy") if c in summary] + metrics)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in summary.iterrows():
        cells = [_fmt_key(r[k]) if k == "defense_strength" else str(r[k]) for k in keys] + [str(r[c]) for c in counts]
        if "evaluator_accuracy" in summary:  # with its Wilson interval when it has one
            low, high = r.get("evaluator_accuracy_ci_low", math.nan), r.get("evaluator_accuracy_ci_high", math.nan)
            ci = f" [{_fmt(low)}, {_fmt(high)}]" if np.isfinite(low) and np.isfinite(high) else ""
            cells.append(_fmt(r["evaluator_accuracy"]) + ci)
        if "label_accuracy" in summary:
            cells.append(_fmt(r["label_accuracy"]))
        for m in metrics:
            avg, std, n = r[f"{m}_avg"], r[f"{m}_std"], int(r[f"{m}_n"])
            cell = _fmt(avg) if n else "n/a"
            if n > 1 and np.isfinite(std):
                cell += f" ± {_fmt(std)}"
            if 0 < n < r[counts[-1]]:
                cell += f" (n={n})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _config_lines(run_dir: Path, limit: int = 25) -> list[str]:
    p = run_dir / "config.yaml"
    if not p.is_file():
        return ["  - (no config.yaml)"]
    try:
        import yaml

        cfg = yaml.safe_load(p.read_text()) or {}
    except Exception as exc:  # noqa: BLE001 - report, don't fail
        return [f"  - config.yaml unreadable: {exc}"]
    flat: list[str] = []

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif not isinstance(v, (list, tuple)) or len(v) <= 8:
                flat.append(f"  - `{prefix}{k}`: {v}")

    if isinstance(cfg, dict):
        walk(cfg)
    return flat[:limit] + ([f"  - ... ({len(flat) - limit} more in config.yaml)"] if len(flat) > limit else [])


def write_markdown(path: Path, df: pd.DataFrame, summary: pd.DataFrame, run_dirs: Sequence[Path],
                   figures: dict[str, Optional[Path]], privacy: Optional[pd.DataFrame] = None,
                   notes: Sequence[str] = (), left_out: Optional[dict] = None) -> None:
    """Write ``summary.md`` at ``path`` (replaced atomically through a ``.tmp`` sibling).

    Contents: a legend (PSNR in dB with data range 1, MSE on pixels in [0, 1]), the :func:`aggregate` table
    ``summary`` (avg ± std, ``(n=k)`` when only k users were measurable, 'n/a' when none), the privacy table when
    ``privacy`` (from :func:`aggregate_privacy`) is given, one image link per entry of ``figures`` (name -> PNG in
    the same folder, or None: listed as not drawn), ``notes`` (a Notes section: runs that did not finish, duplicate
    users left out) and, per run directory, its row count in ``df`` (from :func:`load_runs`; with the rows
    ``left_out`` (run dir -> count) as duplicates, and its status when not finished) and up to 25 flattened
    ``config.yaml`` entries.
    """
    keys = [k for k in GROUP_KEYS + VARIANT_KEYS if k in summary.columns]
    tables = [summary] + ([privacy] if privacy is not None else [])
    legend = (f"Per {', '.join(keys)}: mean ± sample std (ddof 1) over users; `(n=k)` when only k users had a "
              "measurable value; empty = nothing measurable. `evaluator_accuracy` = mean of `evaluator_correct`; "
              "[low, high] = its 95% Wilson interval over users (`evaluator_accuracy_ci_low/high` in the CSV; none "
              "when a user has several rows); "
              "`label_accuracy` = mean of `inferred_dominant == dominant_class` (or a class tied with it for the top count). PSNR in dB (data range 1), "
              "MSE on pixels in [0, 1], LPIPS = AlexNet v0.1.")
    if any("n_rows" in t for t in tables):
        legend += (" `users` counts distinct users, `rows` the rows averaged: a user attacked under several `--seed` "
                   "values is one user and one row per seed (mean, std and `(n=k)` are over rows).")
    if any("setting" in t for t in tables):
        legend += (" `setting` = the run's config apart from seeds, user range, defenses, output and logging (a "
                   "hash); `setting_diff` = the config entries in which it differs from the other settings of rows "
                   "alike in every other column.")
    lines = ["# Gradient inversion: summary", "", legend, "", _markdown_table(summary, df), ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if privacy is not None:
        lines += ["## Privacy (per method, B, defense, defense_strength; pooled over runs)", "",
                  "`defense_strength` is the sigma / keep fraction / levels / clip norm of the first defense that has one "
                  "(where the runs of one composition vary another such parameter, e.g. the sigma of pruning + noise or the "
                  "clip norm of clipping alone: that one; summary.csv keeps the first); `-` = none. "
                  "In privacy_curve.png 'none' is the hollow square at the left.", "",
                  _markdown_table(privacy, df), ""]
    lines += ["## Figures", ""]
    for name, p in figures.items():
        lines.append(f"![{name}]({p.name})" if p is not None else f"- {name}: not drawn (no data)")
        lines.append("")
    lines += ["## Runs", ""]
    for d in run_dirs:
        n = int((df["run_dir"] == str(d)).sum())
        extra = []
        if (left_out or {}).get(str(d)):
            extra.append(f"{left_out[str(d)]} duplicate rows left out")
        status = run_status(Path(d))
        if status is not None and status != "finished":
            extra.append(f"status {status!r}")
        lines.append(f"- `{d}`: {n} rows" + (f" ({'; '.join(extra)})" if extra else ""))
        lines += _config_lines(Path(d))
    _write_text(path, "\n".join(lines) + "\n")


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _free_out_dir(out: Path) -> Path:
    if not out.exists():
        return out
    for i in range(1, 10000):
        cand = out.with_name(f"{out.name}-{i}")
        if not cand.exists():
            return cand
    raise FileExistsError(f"no free name next to {out}")


def build_report(run_dirs: Sequence[str | Path], out_dir: str | Path, users_per_group: int = 4,
                 use_wandb: bool = False, wandb_project: str = "gradinv-report",
                 variants: Optional[Sequence[str]] = None, pool_run_names: bool = False) -> Path:
    """Build the report (see module docstring) and return the folder it was written to.

    ``variants``: the extra group keys to use (a subset of :data:`VARIANT_KEYS`) instead of every key the runs
    differ in. ``pool_run_names``: ``run_name`` splits no row (:func:`group_keys`; it stays a label where each setting
    has one name): runs whose names differ but whose settings agree (a sweep's seed or first_user cells) are pooled
    as repeated measurements, a shared user counted once (:func:`drop_duplicate_users`). The folder is
    ``out_dir`` or, if that exists, the first free ``out_dir-N``; files are written in a
    temporary sibling folder which is renamed into place at the end, so a crash leaves no half-written report.

    Before anything is pooled, runs that did not finish (:func:`run_notes`) and users found twice
    (:func:`drop_duplicate_users`: counted once) are printed on stderr (``[report] note: ...``, ``[report] warning:
    ...``) and listed under Notes in summary.md; so is a ``variants`` choice that pools runs of different settings
    into one row.

    Raises:
        UnknownVariantError (a ValueError): a variant key that is not one of VARIANT_KEYS (before anything is read).
    """
    if variants is not None:
        bad = [k for k in variants if k not in VARIANT_KEYS]
        if bad:
            raise UnknownVariantError(f"unknown variant key(s) {bad}: choose from {VARIANT_KEYS}")
    run_dirs = [Path(d) for d in run_dirs]
    loaded = load_runs(run_dirs)  # its errors (no results.csv, missing columns) are the report's bad input
    try:
        return _build_report(run_dirs, loaded, out_dir, users_per_group, use_wandb, wandb_project, variants,
                             pool_run_names)
    except (ValueError, FileNotFoundError) as exc:  # from pandas / matplotlib / aggregation: a failure to debug
        raise mark_raised_during_work(exc)


def _build_report(run_dirs: list[Path], loaded: pd.DataFrame, out_dir, users_per_group, use_wandb, wandb_project,
                  variants, pool_run_names) -> Path:
    loaded.attrs["pool_run_names"] = pool_run_names  # before the duplicates are found (drop_duplicate_users)
    notes = run_notes(run_dirs, loaded)
    df, duplicates = drop_duplicate_users(loaded)
    privacy_df = None
    if has_defense_levels(df):  # the curve pools run names, so one user's measurement under two names counts once
        pooled = loaded.copy()
        pooled.attrs = {**loaded.attrs, "pool_run_names": True}
        privacy_df, also = drop_duplicate_users(pooled)
        duplicates += [f"privacy curve: {m}" for m in also if m not in duplicates]
    notes += duplicates
    left_out = loaded["run_dir"].value_counts().sub(df["run_dir"].value_counts(), fill_value=0).astype(int).to_dict()
    printed = list(notes)
    if variants is not None:
        df.attrs["variant_keys"] = list(variants)
        keys = group_keys(df)
        if "setting" not in keys and _splits(df, keys, "setting"):  # as asked; said here and in summary.md
            pooled_note = (f"--variants {','.join(variants) or chr(39) * 2} pools runs of different settings into "
                           "one row (add setting to the variants to keep them apart; to pool only the halves of a "
                           "split cell, use --pool-run-names without --variants)")
            printed.append(pooled_note)
            notes.append(pooled_note)
    for n in printed:
        print(f"[report] {'warning' if n in duplicates else 'note'}: {n}", file=sys.stderr)
    summary = aggregate(df)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        summary.to_csv(tmp / "summary.csv", index=False)
        figures = {
            "metrics_vs_B": plot_metrics_vs_b(df, summary, tmp / "metrics_vs_B.png"),
            "gallery": plot_gallery(df, tmp / "gallery.png", users_per_group),
        }
        privacy = None
        if privacy_df is not None:
            privacy = aggregate_privacy(privacy_df)
            privacy.to_csv(tmp / "privacy.csv", index=False)
            figures["privacy_curve"] = plot_privacy_curve(privacy, tmp / "privacy_curve.png")
        write_markdown(tmp / "summary.md", df, summary, run_dirs, figures, privacy, notes, left_out)
        publish_dir(tmp)  # mkdtemp's 0700 would survive the rename
        while True:
            final = _free_out_dir(out)
            try:
                os.rename(tmp, final)  # atomic; fails if final appeared meanwhile (non-empty)
                break
            except OSError:
                if not final.exists():
                    raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if use_wandb:
        log_to_wandb(final, summary, wandb_project)
    return final


def log_to_wandb(out: Path, summary: pd.DataFrame, project: str) -> None:
    """Log summary (wandb.Table) and the figures (uint8 arrays) to W&B; offline unless WANDB_MODE is set."""
    import wandb
    from PIL import Image

    run = wandb.init(project=project, dir=str(out), job_type="report", mode=os.environ.get("WANDB_MODE", "offline"),
                     config={"report_dir": str(out)})
    try:
        log = {"summary": wandb.Table(dataframe=summary)}
        for name in ("metrics_vs_B", "gallery", "privacy_curve"):
            p = out / f"{name}.png"
            if p.is_file():
                log[name] = wandb.Image(np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8), caption=name)
        run.log(log)
    finally:
        run.finish()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (``python -m inversion.report RUN_DIR ... --out OUT_DIR``): parse ``argv`` (None:
    ``sys.argv[1:]``), run :func:`build_report` and print where it wrote; returns 0.

    Raises:
        SystemExit: (2, from argparse) bad arguments or an unknown ``--variants`` key.
        FileNotFoundError, ValueError: from :func:`load_runs` (a run without results.csv, missing columns); run as
            a module they end in one ``error:`` line and status 2 (:func:`inversion.cli.run_main`).
    """
    ap = argparse.ArgumentParser(prog="python -m inversion.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path, help="run directories holding results.csv")
    ap.add_argument("--out", type=Path, required=True, help="new output folder (never overwritten)")
    ap.add_argument("--gallery-users", type=int, default=4, help="users per (method, B) in gallery.png")
    ap.add_argument("--wandb", action="store_true", help="also log table and figures to W&B (offline by default)")
    ap.add_argument("--wandb-project", default="gradinv-report")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated extra group keys, from {','.join(VARIANT_KEYS)} (default: every key the "
                         "runs differ in; '' for none)")
    ap.add_argument("--pool-run-names", action="store_true",
                    help="pool runs whose names differ but whose settings agree (the halves of a split cell, "
                         "..._u0 and ..._u10; a sweep's seed cells) as one row; other settings still split rows")
    args = ap.parse_args(argv)
    requested = args.out
    variants = None if args.variants is None else [k for k in args.variants.split(",") if k]
    try:
        out = build_report(args.run_dirs, requested, args.gallery_users, args.wandb, args.wandb_project, variants,
                           pool_run_names=args.pool_run_names)
    except UnknownVariantError as exc:
        ap.error(f"--variants: {exc}")
    if out != requested:
        print(f"{requested} exists; wrote to {out} instead", file=sys.stderr)
    order = ["summary.md", "summary.csv", "metrics_vs_B.png", "gallery.png", "privacy.csv", "privacy_curve.png"]
    print(f"wrote {out}/" + ", ".join(f for f in order if (out / f).is_file()))  # a figure without data is not drawn
    return 0


if __name__ == "__main__":
    from inversion.cli import run_main

    run_main(main, "python -m inversion.report")  # a missing results.csv or column: one line, not a traceback
