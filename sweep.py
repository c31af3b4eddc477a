"""Run a grid of attack.py experiments (a sweep), resumably, and report them together.

    python sweep.py --config configs/sweep/dp_noise.yaml [--dry-run] [--max-cells N] [--new] [--fresh] [--root DIR]

A sweep YAML::

    name: dp_noise                       # W&B group of every cell (logger.group) and default root runs/sweeps/<name>
    root: runs/sweeps/dp_noise           # the sweep directory (relative to the current directory, like output.root)
    base: configs/attack/fashion_mnist.yaml   # attack config every cell starts from
    configs: []                          # optional: more config files layered over base in every cell
    fixed:                               # optional: dotted-key overrides for every cell
      users.init_args.batch_size: 10
    grid:                                # dotted key -> list of values; the cartesian product gives the cells
      threat.defenses:
        - []
        - [{name: gaussian_dp, clip_norm: 1.0, sigma: 0.01}]
      seed: [0, 1]
      attack: [null, configs/method/dlg.yaml]   # special: config files layered over base (null: none)

Config file paths (base, configs, ``attack`` grid values) are looked up next to the sweep file first, then in the
repository root, then in the current directory. A grid value of the special key ``attack`` (alias ``configs``) is a
config path, a list of paths, or null (no extra file); a mapping value (under either name, in grid or fixed) is
passed as an ``--attack`` override instead.
Other keys are any attack.py option (``users.init_args.batch_size``, ``threat.defenses``, ``seed``...), given as
``--key value`` after the config files (order: base, configs, attack files, fixed, grid, then ``--output.root
<sweep>/cells --output.name <cell slug> --logger.group <name>``). ``output.root``, ``output.name`` and
``logger.group`` belong to the sweep and may not be set in fixed or grid.

A cell's slug (its run directory's and the report's ``run_name``) is ``lastkey=value`` per grid key
(:func:`cell_slug`); cells whose values print alike get those values spelled out, then hashed
(:func:`expand_cells`). A key given twice in one mapping of the sweep YAML is an error (YAML would keep the last).

Before any work every key is checked against attack.py's parser and every cell is parsed: an unknown key, an empty
value list, a missing config file or a value attack.py refuses stops the sweep with one error naming the key. So
does a grid value listed twice (``batch_size: [3, 3]``), or two values attack.py reads alike (``seed: [0, "0"]``,
``lr: [0.001, 1e-3]``): two cells would run the same experiment (they ran twice, as ``x`` and ``x-1``).

The sweep directory holds ``sweep.json`` (the resolved sweep config and its sha256 ``hash``), ``index.json`` (cell
slug -> run dir, status, overrides; rewritten atomically after each cell), ``cells/<slug>-<time>-<hex>/`` (the
attack.py run directories) and ``report/`` (:func:`inversion.report.build_report` over every finished cell, with
``pool_run_names``: cells that differ only in what the report pools, e.g. a ``seed`` or ``first_user`` axis, are one
row of repeated measurements, not one row per slug; ``report-1``... when it exists). A sweep directory made from a different sweep config is refused unless ``--new`` (then a fresh
``<root>-1``, ``-2``... is used). Cells run in this process, one after the other (``attack.main``; a cell with
``trainer.strategy: ddp`` or several devices runs as a child ``python attack.py``, see :func:`run_attack_cell`); a
cell that fails or diverges is recorded and the sweep goes on; Ctrl-C, or a SIGTERM to sweep.py, stops the sweep (the
cell is recorded as interrupted). A child ``attack.py`` runs in its own process group: a SIGINT, SIGTERM or SIGHUP to
sweep.py is forwarded to it and its ranks as SIGINT, and sweep.py waits for them to stop (killing them after
:data:`CHILD_STOP_TIMEOUT` seconds) before it releases its lock. A config file (base, configs, ``attack`` files)
edited while the sweep runs stops it before the next cell (exit status 2, naming the file; the finished cells ran the
old config): restore the file to continue, or use ``--new``. Exit status: 0 when every cell finished, 1 otherwise,
130 on Ctrl-C or SIGTERM, 2 for a refused config.

Re-running the same sweep skips the cells whose run dir has ``summary.json`` status ``finished`` and continues the
others where they stopped. What happens to a cell depends on its newest run dir (the newest ``<slug>-<time>-<hex>``
that holds attack.py's ``config.yaml``; only run dirs under this sweep directory's ``cells/`` count: the index of a
copied sweep directory names the original's, which are ignored):

* ``interrupted`` (Ctrl-C), no ``summary.json`` (stopped hard: SIGKILL, a scheduler's time limit, the machine went
  down) or ``failed: ...`` (an exception: out of memory, a full disk, a bug fixed since): the cell is re-run as
  ``attack.py ... --resume <that dir>`` in the same run dir. Its finished users are kept, and the user (chunk) it
  stopped in continues from ``checkpoints/<uid>/last.ckpt`` when the cell sets ``checkpoint_every`` (otherwise that
  user starts over). Finished users are kept across a code change, as finished cells are: after a fix that changes
  the numbers, use ``--fresh`` (or ``--new`` for the whole sweep).
* ``diverged: ...`` (NaN/inf): the cell starts again in a new run dir. Its numbers went wrong, the checkpoint it left
  lies on the way to the NaN, and re-running it is worth it only after a fix (unchanged, it diverges again).
* A resume attack.py would refuse (the run dir's config differs from the cell's, e.g. an attack.py default changed
  since, or a model file it used changed since: its ``models.json`` records other fingerprints than the victim,
  prior or evaluator files hash to now) is noted and the cell starts in a new run dir.

A finished cell whose ``models.json`` records other model fingerprints than the cell's files hash to now (the
victim, prior or evaluator retrained or replaced in place; the rule of ``attack.py --resume``,
:func:`attack.check_model_fingerprints`) is not skipped: it runs again in a new run dir, with a note naming the
changed model, so the report never pools cells attacked with two versions of a model. Run dirs made before
``models.json`` existed are not checked (as ``--resume`` does not check them).

``--fresh`` (alias ``--no-resume``) starts every unfinished cell in a new run dir (the behaviour before resuming
existed). An old run dir is never deleted: ``index.json`` points at the cell's current run dir and lists the ones
it replaced in ``previous_run_dirs``. While it runs, a sweep holds ``<sweep dir>/sweep.lock``: a second sweep.py on
the same sweep directory is refused (it would resume the run dir the first one is writing into).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import itertools
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("WANDB_MODE", "offline")

from inversion.cli import DuplicateKeyError, unique_key_loader  # noqa: E402
from inversion.fsutils import atomic_write_bytes, exclusive_lock, run_status  # noqa: E402

CONFIG_KEYS = ("attack", "configs")  # grid keys whose values are config files layered over base
MANAGED_KEYS = ("output.root", "output.name", "logger.group", "config", "resume")
SWEEP_FIELDS = {"name", "root", "base", "configs", "fixed", "grid"}
RUN_DIR_RE = r"-\d{8}-\d{6}-[0-9a-f]{6}$"


class SweepError(ValueError):
    """A sweep config or sweep directory that cannot be used; raised before any cell runs (or before the next cell,
    for a config file edited while the sweep runs: :func:`config_files_changed`)."""


# ------------------------------------------------------------------------------------------------ small helpers
def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (non-JSON values through ``str``) to ``path`` atomically and durably
    (:func:`inversion.fsutils.atomic_write_bytes`: temp file, fsync, rename)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def _display(path: Path) -> str:
    """A resolved config path as stored in sweep.json (and hashed): relative to the repository root when inside it,
    so the same sweep hashes alike from any checkout or working directory."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path.resolve())


def _absolute(p: str) -> str:
    path = Path(p)
    return str(path if path.is_absolute() else ROOT / path)


def resolve_path(p: str, sweep_file: Optional[Path]) -> Path:
    """A config path: absolute, else next to the sweep file, else in the repository root, else in the cwd."""
    path = Path(p).expanduser()
    if path.is_absolute():
        return path
    for base in ([sweep_file.parent] if sweep_file else []) + [ROOT, Path.cwd()]:
        cand = (base / path)
        if cand.is_file():
            return cand.resolve()
    return path


def _short(v: Any, detail: bool = False) -> str:
    """A short, filename-safe text for a grid value (used in cell slugs).

    The plain text (``detail`` false, the names of every cell whose text is its own) drops what rarely tells cells
    apart: a defense's ``seed``, a ``class_path`` mapping's ``init_args`` (the class alone) and a path's folders (the
    file's stem). ``detail`` true keeps them (``gaussian_dp-clip_norm1-sigma0.01-seed1``,
    ``DLG-steps50-lr0.1``, ``configs_method_dlg``): :func:`expand_cells` uses it for the keys of cells whose plain
    names would coincide.
    """
    if v is None:
        return "none"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (int, str)):
        s = str(v)
        if isinstance(v, str) and (s.endswith(".yaml") or s.endswith(".yml") or "/" in s):
            s = str(Path(s).with_suffix("")) if detail else Path(s).stem
        return s
    if isinstance(v, dict):
        if "name" in v:  # a defense spec
            params = "-".join(f"{k}{_short(x, detail)}" for k, x in v.items()
                              if k != "name" and (detail or k != "seed"))
            return f"{v['name']}" + (f"-{params}" if params else "")
        if "class_path" in v:
            text = str(v["class_path"]).rsplit(".", 1)[-1]
            if detail:
                rest = {**{k: x for k, x in v.items() if k not in ("class_path", "init_args")},
                        **(v.get("init_args") if isinstance(v.get("init_args"), dict) else {})}
                text += "".join(f"-{k}{_short(x, detail)}" for k, x in rest.items())
            return text
        return "-".join(f"{k}{_short(x, detail)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "+".join(_short(x, detail) for x in v) if v else "none"
    return str(v)


def _sanitize(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._=+-]+", "_", s)
    return s.strip("._-") or "x"


def _value_hash(v: Any) -> str:
    """6 hex digits of a grid value's canonical JSON: stable across runs and machines (tells 1 from 1.0 apart)."""
    return hashlib.sha1(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:6]


def cell_slug(assignment: dict[str, Any], detail: Optional[dict[str, int]] = None) -> str:
    """``lastkey=value`` parts joined by ``__`` (e.g. ``batch_size=10__defenses=gaussian_dp-clip_norm1-sigma0.01``;
    a config file shows as its stem, a null config value as ``base``, an empty list as ``none``).

    ``detail`` (grid key -> level) spells some keys' values out for cells whose names would otherwise coincide (see
    :func:`expand_cells`): level 1 :func:`_short`'s ``detail`` text, level 2 that text, ``-`` and
    :func:`_value_hash` of the value (``lr=1-6b86b2``: for values that print alike even in full, e.g. 1 and 1.0).
    """
    if not assignment:
        return "base"
    detail = detail or {}
    parts = []
    for key, value in assignment.items():
        level = detail.get(key, 0)
        text = "base" if key in CONFIG_KEYS and value is None else _short(value, level >= 1)
        if level >= 2:
            text += "-" + _value_hash(value)
        parts.append(f"{key.rsplit('.', 1)[-1]}={text}")
    slug = _sanitize("__".join(parts))
    if len(slug) > 100:  # keep folder names reasonable; the hash keeps it unique
        slug = slug[:88].rstrip("._-") + "-" + hashlib.sha1(slug.encode()).hexdigest()[:8]
    return slug


def _cli_value(v: Any) -> str:
    """A value as jsonargparse reads it after ``--key``: strings as they are, everything else as JSON."""
    if isinstance(v, str):
        return v
    return json.dumps(v)


# ------------------------------------------------------------------------------------------------ the sweep config
@dataclass
class Cell:
    index: int
    slug: str
    assignment: dict[str, Any]        # grid key -> value
    config_files: list[str]           # extra config files of this cell (after base and configs)
    overrides: list[tuple[str, Any]]  # (dotted key, value) after the config files: fixed then grid

    def argv(self, sweep: "Sweep", cells_root: Path) -> list[str]:
        args = ["--config", _absolute(sweep.base)]
        for c in sweep.configs + self.config_files:
            args += ["--config", _absolute(c)]
        for k, v in self.overrides:
            args += [f"--{k}", _cli_value(v)]
        args += ["--output.root", str(cells_root), "--output.name", self.slug, "--logger.group", sweep.name]
        return args


def _file_sha256(path: str, content: bool = True) -> Optional[str]:
    """SHA-256 of a config file: of its parsed YAML content (``content``; comments and layout do not count), or of
    its bytes (how sweeps hashed before; :meth:`Sweep.hash` ``legacy``). None when it cannot be read or parsed
    (validation names the file)."""
    import yaml

    try:
        data = Path(path).read_bytes()
        if content:
            data = json.dumps(yaml.safe_load(data), sort_keys=True, default=str).encode()
    except (OSError, yaml.YAMLError):
        return None
    return hashlib.sha256(data).hexdigest()


@dataclass
class Sweep:
    name: str
    root: str
    base: str
    configs: list[str]
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]
    source: Optional[Path] = None
    cells: list[Cell] = field(default_factory=list)

    def resolved(self, legacy: bool = False) -> dict[str, Any]:
        """What the hash covers: everything that decides the cells' results (not where they are written), the
        parsed contents of every config file a cell reads included (an edited base config is another sweep; an
        edited comment is not). ``legacy``: the files' bytes instead, as sweeps made before hashed them."""
        files = [self.base, *self.configs, *(f for c in self.cells for f in c.config_files)]
        return {"name": self.name, "base": self.base, "configs": self.configs, "fixed": self.fixed, "grid": self.grid,
                "config_sha256": {f: _file_sha256(_absolute(f), content=not legacy) for f in dict.fromkeys(files)}}

    def hash(self, legacy: bool = False) -> str:
        """SHA-256 of :meth:`resolved` (``legacy``: of the byte-hashed form older sweep.json files recorded)."""
        return hashlib.sha256(json.dumps(self.resolved(legacy), sort_keys=True, default=str).encode()).hexdigest()


def load_sweep(path: str | Path, root_override: Optional[str] = None) -> Sweep:
    """Read and resolve a sweep YAML (paths resolved, cells expanded). A mapping under ``configs`` (in fixed or as
    a grid value) is the ``attack`` override it aliases. Raises :class:`SweepError` on a bad file: invalid YAML, a
    key given twice in one mapping (named with its lines), and the checks below."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep config {path} not found")
    try:
        raw = yaml.load(path.read_text(), Loader=unique_key_loader()) or {}
    except DuplicateKeyError as exc:
        raise SweepError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep config is a mapping with keys {sorted(SWEEP_FIELDS)}")
    unknown = sorted(set(raw) - SWEEP_FIELDS)
    if unknown:
        raise SweepError(f"{path}: unknown sweep field(s) {unknown}; valid fields: {sorted(SWEEP_FIELDS)}")
    name = raw.get("name") or path.stem
    if not isinstance(name, str) or _sanitize(name) != name:
        raise SweepError(f"{path}: name must be a simple word (letters, digits, . _ = + -), got {name!r}")
    if not raw.get("base"):
        raise SweepError(f"{path}: 'base' (the attack config every cell starts from) is required")

    def config_file(p: Any, where: str) -> str:
        if not isinstance(p, str) or not p:
            raise SweepError(f"{path}: {where} must be a config file path, got {p!r}")
        rp = resolve_path(p, path)
        if not rp.is_file():
            places = list(dict.fromkeys(str(d) for d in (path.parent, ROOT, Path.cwd())))
            raise SweepError(f"{path}: {where} config file {p!r} not found (looked in {', '.join(places)})")
        return _display(rp)

    base = config_file(raw["base"], "base")
    configs = raw.get("configs") or []
    if isinstance(configs, str):
        configs = [configs]
    configs = [config_file(c, "configs") for c in configs]
    fixed = raw.get("fixed") or {}
    grid = raw.get("grid") or {}
    if not isinstance(fixed, dict):
        raise SweepError(f"{path}: 'fixed' must be a mapping of dotted keys to values")
    if not isinstance(grid, dict):
        raise SweepError(f"{path}: 'grid' must be a mapping of dotted keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list):
            raise SweepError(f"{path}: grid key {key!r} must map to a list of values, got {values!r}")
        if not values:
            raise SweepError(f"{path}: grid key {key!r} has an empty list of values: a sweep needs at least one")
    for key in list(fixed) + list(grid):
        if key in MANAGED_KEYS:
            raise SweepError(f"{path}: {key!r} is set by the sweep (cells go to <root>/cells/<slug>-..., W&B group = "
                             f"the sweep name); remove it from fixed/grid")
    if isinstance(fixed.get("configs"), dict):  # the alias of a mapping is attack.py's --attack (no --configs);
        # renamed before the fixed-vs-grid check, so fixed.configs with grid.attack is refused as fixed.attack is
        if "attack" in fixed:
            raise SweepError(f"{path}: fixed has both 'attack' and its alias 'configs'; merge them under 'attack'")
        fixed = {("attack" if k == "configs" else k): v for k, v in fixed.items()}
    both = sorted(set(fixed) & set(grid))
    if both:
        raise SweepError(f"{path}: key(s) {both} are both fixed and in the grid")
    for key in fixed:
        if key in CONFIG_KEYS and not isinstance(fixed[key], dict):
            raise SweepError(f"{path}: put config files for every cell in 'configs', not fixed.{key}")

    # config-file grid values, resolved once (the resolved paths are part of the hash)
    grid = copy.deepcopy(grid)
    for key in CONFIG_KEYS:
        if key in grid:
            out = []
            for v in grid[key]:
                if v is None or isinstance(v, dict):
                    out.append(v)
                elif isinstance(v, str):
                    out.append(config_file(v, f"grid.{key}"))
                elif isinstance(v, list):
                    out.append([config_file(x, f"grid.{key}") for x in v])
                else:
                    raise SweepError(f"{path}: grid.{key} values are config paths, lists of them or null; got {v!r}")
            grid[key] = out

    # '~' expanded here, as attack.py expands the cells' output.root (else the index and the cells part ways)
    root = os.path.expanduser(str(root_override or raw.get("root") or f"runs/sweeps/{name}"))
    sweep = Sweep(name=name, root=str(root), base=base, configs=configs, fixed=fixed, grid=grid, source=path)
    try:
        sweep.cells = expand_cells(sweep)
    except SweepError as exc:
        raise SweepError(f"{path}: {exc}") from None
    return sweep


def expand_cells(sweep: Sweep) -> list[Cell]:
    """The cells of ``sweep.grid`` (cartesian product, in grid order), each with its slug, config files and
    ``--key value`` overrides (a mapping value of ``attack``/``configs`` becomes an ``--attack`` override).

    Slugs: :func:`cell_slug` of the assignment. Cells whose slugs coincide (values that print alike: defenses that
    differ only in ``seed``, ``class_path`` mappings that differ only in ``init_args``, config files of one name in
    different folders) get the keys whose values differ among them spelled out in full, then, if still alike, a
    hash of those values (``cell_slug``'s ``detail``). Names of cells that do not collide are unchanged, so their run
    directories are still found.

    Raises:
        SweepError: a grid key that lists one value twice (equal canonical JSON: ``[3, 3]``): two cells would run
            the same experiment (they were named ``x`` and ``x-1``); or, should it ever happen, two cells whose
            names still coincide after the value hash.
    """
    keys = list(sweep.grid)
    for key in keys:  # a value listed twice: every cell with it would run twice
        seen_values: dict[str, Any] = {}
        for v in sweep.grid[key]:
            canon = json.dumps(v, sort_keys=True, default=str)
            if canon in seen_values:
                raise SweepError(f"grid key {key!r} lists the value {v!r} twice: its cells would run the same "
                                 f"experiment twice; remove the duplicate")
            seen_values[canon] = v
    assignments = [dict(zip(keys, combo)) for combo in itertools.product(*(sweep.grid[k] for k in keys))]
    slugs = [cell_slug(a) for a in assignments]
    details: list[dict[str, int]] = [{} for _ in assignments]
    for level in (1, 2):  # spell out, then hash, the keys that tell the colliding cells apart
        groups: dict[str, list[int]] = {}
        for i, slug in enumerate(slugs):
            groups.setdefault(slug, []).append(i)
        for members in groups.values():
            if len(members) < 2:
                continue
            canon = [{k: json.dumps(assignments[i][k], sort_keys=True, default=str) for k in keys} for i in members]
            differ = [k for k in keys if len({c[k] for c in canon}) > 1]  # JSON: 1 and 1.0 differ, 1 == 1.0 not
            for i in members:
                details[i].update(dict.fromkeys(differ, level))
                slugs[i] = cell_slug(assignments[i], details[i])
    twice = sorted(slug for slug in set(slugs) if slugs.count(slug) > 1)
    if twice:  # distinct assignments (checked above) whose value hashes coincide: not expected to happen
        raise SweepError(f"cells of different values get the same name {twice[0]!r} (their value hashes "
                         f"coincide); change one of their values")
    cells: list[Cell] = []
    for i, (assignment, slug) in enumerate(zip(assignments, slugs)):
        files: list[str] = []
        overrides: list[tuple[str, Any]] = list(sweep.fixed.items())
        for k, v in assignment.items():
            if k in CONFIG_KEYS and not isinstance(v, dict):
                files += [] if v is None else ([v] if isinstance(v, str) else list(v))
            else:  # a mapping under the alias 'configs' is attack.py's --attack (it has no --configs)
                overrides.append(("attack" if k in CONFIG_KEYS else k, v))
        cells.append(Cell(index=i, slug=slug, assignment=assignment, config_files=files, overrides=overrides))
    return cells


# ------------------------------------------------------------------------------------------------ validation
def _parser_layout(parser) -> tuple[list[str], set[str], set[str]]:
    """(top-level groups, known dotted keys, groups whose nested keys depend on a class_path)."""
    dests = [a.dest for a in parser._actions if a.dest not in ("help", "config", "print_config")]
    dests = [d for d in dests if not d.endswith(".help")]
    groups = list(dict.fromkeys(d.split(".")[0] for d in dests))
    subclass = {"users", "attack", "trainer"}
    return groups, set(dests), subclass


def validate(sweep: Sweep) -> None:
    """Check every key against attack.py's parser, parse every cell, then run attack.py's pre-run checks on each
    cell (:func:`attack.check_devices` and :func:`attack.prepare`: values, data, checkpoints, the prior's T), so a
    bad cell stops the sweep before the first cell runs; raises :class:`SweepError`."""
    import attack

    parser = attack.build_parser()
    groups, dests, subclass = _parser_layout(parser)
    for where, keys in (("fixed", list(sweep.fixed)), ("grid", list(sweep.grid))):
        for key in keys:
            if where == "grid" and key in CONFIG_KEYS:
                continue
            top = key.split(".")[0]
            if top not in groups:
                raise SweepError(f"unknown {where} key {key!r}: attack.py has no group {top!r}; valid top-level groups: "
                                 f"{', '.join(groups)}")
            if key not in dests and top not in subclass and "." in key:
                valid = sorted(d for d in dests if d.startswith(top + "."))
                raise SweepError(f"unknown {where} key {key!r}: valid keys of {top!r}: {', '.join(valid)}; valid "
                                 f"top-level groups: {', '.join(groups)}")
    cells_root = Path(sweep.root) / "cells"

    def parse(argv: list[str]) -> tuple[Any, Any, Optional[str]]:
        """(parser, parsed config or None, error message or None) of attack.py's parser on ``argv``."""
        p = attack.build_parser()
        p.exit_on_error = False
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                return p, p.parse_args(argv), None
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - jsonargparse raises ArgumentError
            return p, None, _condense(str(exc).strip()) or type(exc).__name__

    parsed = []
    for cell in sweep.cells:
        p, cfg, msg = parse(cell.argv(sweep, cells_root))
        if msg is None:
            parsed.append((cell, p, cfg))
            continue
        # name the culprit: the config files alone, else the first override that fails on its own
        files = ["--config", _absolute(sweep.base)]
        for c in sweep.configs + cell.config_files:
            files += ["--config", _absolute(c)]
        culprit = "its config files " + ", ".join(repr(c) for c in [sweep.base] + sweep.configs + cell.config_files)
        if parse(files)[2] is None:
            culprit = "the combination of " + ", ".join(repr(k) for k, _ in cell.overrides)
            for k, v in cell.overrides:
                if parse(files + [f"--{k}", _cli_value(v)])[2] is not None:
                    culprit = f"key {k!r} = {v!r}"
                    break
        raise SweepError(f"cell {cell.slug!r}: attack.py rejects {culprit}: {msg}\nvalid top-level groups: "
                         f"{', '.join(groups)}")
    same = _same_experiment(sweep, [(cell, cfg) for cell, _, cfg in parsed])
    if same is not None:
        raise SweepError(same)
    for cell, p, cfg in parsed:  # what attack.py checks before its first user (values, data, checkpoints, prior's T)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                attack.check_devices(dict(cfg.trainer))
                attack.prepare(p, cfg)
        except Exception as exc:  # noqa: BLE001 - any of attack.py's pre-run errors, named with its cell
            raise SweepError(f"cell {cell.slug!r}: attack.py would stop before its first user: "
                             f"{type(exc).__name__}: {exc}") from None


def _same_experiment(sweep: Sweep, parsed: list[tuple[Cell, Any]]) -> Optional[str]:
    """None when every cell's parsed attack.py config (``cfg``, its config file list and ``output.name`` aside)
    differs from every other's, else one line naming the grid key(s) whose values attack.py reads alike (``seed: [0,
    "0"]``, ``lr: [0.001, 1e-3]``: YAML reads 1e-3 as a string) and saying to remove the duplicate: those cells
    would run the same experiment twice. (A value listed twice verbatim is refused earlier, by
    :func:`expand_cells`.)"""
    first: dict[str, Cell] = {}
    for cell, cfg in parsed:
        d = cfg.as_dict() if hasattr(cfg, "as_dict") else dict(cfg)
        d.pop("config", None)
        if isinstance(d.get("output"), dict):
            d["output"] = {k: v for k, v in d["output"].items() if k != "name"}
        canon = json.dumps(d, sort_keys=True, default=str)
        other = first.setdefault(canon, cell)
        if other is cell:
            continue
        differ = [k for k in sweep.grid if json.dumps(other.assignment[k], sort_keys=True, default=str)
                  != json.dumps(cell.assignment[k], sort_keys=True, default=str)]
        values = "; ".join(f"grid key {k!r}: {other.assignment[k]!r} and {cell.assignment[k]!r}" for k in differ)
        return (f"cells {other.slug!r} and {cell.slug!r} are the same experiment ({values or 'equal values'}, which "
                f"attack.py reads alike): remove the duplicate value")
    return None


def _condense(msg: str) -> str:
    """jsonargparse's union errors are long; keep the lines that say what is wrong."""
    lines = [ln.strip(" -") for ln in msg.splitlines()]
    keep = [ln for ln in lines if re.search(r"not accepted|unrecognized|Expected a|Got value|not found|invalid|"
                                            r"must be|No action", ln, re.I) and "NoneType" not in ln]
    return "; ".join(dict.fromkeys(keep)) if keep else " ".join(ln for ln in lines if ln)


# ------------------------------------------------------------------------------------------------ sweep directory
def _free_dir(p: Path) -> Path:
    for i in range(1, 10000):
        cand = p.with_name(f"{p.name}-{i}")
        if not cand.exists():
            return cand
    raise SweepError(f"no free directory name next to {p}")


def open_sweep_dir(sweep: Sweep, new: bool, create: bool = True) -> Path:
    """The sweep directory to use: the configured root (resumed when made by the same config) or, with ``new``, a
    fresh suffixed one. Raises :class:`SweepError` for a directory from another config."""
    root = Path(sweep.root)
    meta = root / "sweep.json"
    digest = sweep.hash()  # reads and parses every config file: once
    legacy = None
    if root.exists() and new:
        root = _free_dir(root)
    elif meta.is_file():
        try:
            old = json.loads(meta.read_text())
        except ValueError as exc:
            raise SweepError(f"{meta} is unreadable ({exc}); use --new for a fresh sweep directory") from None
        if old.get("hash") != digest:
            if old.get("hash") != sweep.hash(legacy=True):  # nor a sweep dir recorded with the files' bytes
                raise SweepError(
                    f"resume directory from another config: {root} was made by sweep {old.get('name')!r} (hash "
                    f"{str(old.get('hash'))[:12]}), this config hashes to {digest[:12]}; use --new for a fresh "
                    f"suffixed directory or set another root")
            legacy = old  # recorded with the byte hash: re-recorded below with the content hash
    elif root.exists() and any(root.iterdir()):
        raise SweepError(f"{root} exists, is not empty and holds no sweep.json: not a sweep directory; use --new or "
                         f"another root")
    if create:
        root.mkdir(parents=True, exist_ok=True)
        if legacy is not None:  # so that a later comment edit does not turn this sweep into "another config"
            atomic_write_json(meta, {**legacy, "hash": digest, "config": sweep.resolved()})
        if not (root / "sweep.json").is_file():
            atomic_write_json(root / "sweep.json", {"name": sweep.name, "hash": digest,
                                                    "source": str(sweep.source), "root": str(root),
                                                    "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                    "config": sweep.resolved(),
                                                    "cells": [c.slug for c in sweep.cells]})
    return root


def _recorded_config(sweep_dir: Path, sweep: Sweep) -> tuple[str, dict[str, Optional[str]]]:
    """(sweep hash, config file -> SHA-256 of its parsed content) as ``sweep_dir/sweep.json`` records them (read
    after :func:`open_sweep_dir` checked or wrote it): what :func:`config_files_changed` compares the files with
    before each cell. A sweep.json without them gives what the files hash to now."""
    try:
        meta = json.loads((sweep_dir / "sweep.json").read_text())
    except (OSError, ValueError):
        meta = {}
    files = meta.get("config", {}).get("config_sha256") if isinstance(meta.get("config"), dict) else None
    if not isinstance(meta.get("hash"), str) or not isinstance(files, dict):
        return sweep.hash(), sweep.resolved()["config_sha256"]
    return meta["hash"], files


def config_files_changed(sweep: Sweep, sweep_dir: Path, recorded_hash: str,
                         recorded_files: dict[str, Optional[str]]) -> Optional[str]:
    """None while the sweep's config files (base, configs, ``attack`` files) hash as when the sweep started
    (``recorded_hash``: the sweep hash :meth:`Sweep.hash`, over their parsed contents, so an edited comment does not
    count), else one line naming the changed file(s) (``recorded_files``: their recorded hashes) and saying what to
    do. A cell hands attack.py the files' paths, read when the cell starts: an edit while the sweep runs changed
    the cells after it, silently, and the report pooled them with the cells run before it."""
    if sweep.hash() == recorded_hash:
        return None
    now = sweep.resolved()["config_sha256"]
    changed = [f + (" (now unreadable)" if h is None else "") for f, h in now.items() if h != recorded_files.get(f)]
    changed = changed or list(now)
    return (f"config file{'s' if len(changed) > 1 else ''} {', '.join(changed)} changed while the sweep ran (its "
            f"content no longer hashes as {sweep_dir / 'sweep.json'} records), so the cells left would run another "
            f"config than the finished ones: restore it and run the same command again to continue, or start a new "
            f"sweep of the edited config with --new")


@contextlib.contextmanager
def _logging_to(stream):
    """Point every logging StreamHandler that writes to the terminal (Lightning's own handlers hold the stderr of
    their import time, which ``redirect_stderr`` does not reach) at ``stream`` meanwhile; restored afterwards."""
    import logging

    terminal = {id(sys.__stderr__), id(sys.__stdout__)}
    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    swapped = []
    for lg in loggers:
        for h in lg.handlers:
            if type(h) is logging.StreamHandler and id(h.stream) in terminal:
                swapped.append((h, h.setStream(stream)))
    try:
        yield
    finally:
        for h, old in swapped:
            h.setStream(old)


def load_index(sweep_dir: Path) -> dict:
    p = sweep_dir / "index.json"
    if p.is_file():
        try:
            idx = json.loads(p.read_text())
            idx.setdefault("cells", {})
            return idx
        except ValueError:
            pass
    return {"cells": {}}


def _inside(cells_root: Path, run_dir: Optional[str | Path]) -> bool:
    """Whether ``run_dir`` lies in ``cells_root`` (both resolved: symlinks and ``..`` do not fool it)."""
    if not run_dir:
        return False
    return Path(run_dir).resolve().is_relative_to(cells_root.resolve())


def find_finished_run(cells_root: Path, slug: str, recorded: Optional[str]) -> Optional[Path]:
    """The cell's finished run dir: the one in the index, else the newest finished ``<slug>-<time>-<hex>`` folder
    (a cell that finished just before a crash, before the index was written). A recorded run dir outside
    ``cells_root`` is not this sweep's (the index of a copied or moved sweep directory still names the original's
    run dirs): it is ignored and ``cells_root`` scanned instead."""
    if recorded and _inside(cells_root, recorded) and run_status(recorded) == "finished":
        return Path(recorded)
    if not cells_root.is_dir():
        return None
    pat = re.compile(re.escape(slug) + RUN_DIR_RE)
    for d in sorted((d for d in cells_root.iterdir() if pat.match(d.name)), key=lambda d: d.name, reverse=True):
        if run_status(d) == "finished":
            return d
    return None


def _new_run_dirs(cells_root: Path, slug: str, before: set[str]) -> list[Path]:
    if not cells_root.is_dir():
        return []
    pat = re.compile(re.escape(slug) + RUN_DIR_RE)
    return sorted(d for d in cells_root.iterdir() if pat.match(d.name) and d.name not in before)


def latest_run(cells_root: Path, slug: str) -> Optional[Path]:
    """The cell's newest run dir that attack.py wrote its ``config.yaml`` into (a folder without one was stopped
    before the attack began and holds nothing to resume)."""
    for d in reversed(_new_run_dirs(cells_root, slug, set())):
        if (d / "config.yaml").is_file():
            return d
    return None


def _diverged(status: Optional[str]) -> bool:
    """``diverged: ...`` (or ``rank r: diverged: ...`` from a multi-process run)."""
    return bool(status) and re.match(r"(rank \d+: )?diverged\b", status) is not None


def _status_text(status: Optional[str]) -> str:
    if status is None:
        return "no summary.json: stopped hard"
    return status.rstrip(".") if len(status) <= 120 else status[:117] + "..."


#: model set (victim, random_init, prior or None, evaluator) -> (file signature, fingerprints): current_fingerprints
_FINGERPRINTS: dict[tuple, tuple[tuple, dict[str, str]]] = {}


def _stat_signature(path: Path) -> tuple:
    """The inode, mtime and size of a model file, or of every file under a model folder (no hashing): any rewrite,
    replacement, addition or removal changes it. A path that does not exist (a hub id) gives ``()``."""
    def stat(f: Path) -> tuple:
        st = f.stat()  # ctime too: an in-place copy that keeps mtime and size (cp -p, rsync --inplace) changes it
        return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size

    try:
        if path.is_file():
            return (stat(path),)
        if path.is_dir():
            return tuple((str(f.relative_to(path)), *stat(f)) for f in sorted(path.rglob("*")) if f.is_file())
    except OSError:
        return ("unreadable", time.time_ns())  # never equal: hashed again (and the hash says what is wrong)
    return ()


def _parse_cell(argv: list[str]):
    """(parser, config) of attack.py's parser on ``argv`` (its error output swallowed)."""
    import attack

    p = attack.build_parser()
    p.exit_on_error = False
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return p, p.parse_args(argv)


def current_fingerprints(cfg) -> dict[str, str]:
    """The model fingerprints ``attack.run`` would record in ``models.json`` for the parsed cell config ``cfg`` now:
    :func:`attack.model_fingerprints` of its victim, of its prior when the attack uses one (the attack's
    ``requires_prior`` on a probe built from ``attack.init_args``, as :func:`attack.prepare` decides whether to load
    the prior) and of its evaluator.

    Cached per distinct model set (victim, random_init, prior, evaluator) for as long as the files' inodes, mtimes
    and sizes stay the same (:func:`_stat_signature`), so a sweep of many cells on the same models hashes each
    model once, and a model retrained while a long sweep runs is hashed again for the cells after it."""
    import attack
    from inversion.fsutils import find_input_path

    attack_cls = attack.resolve_attack_class(cfg.attack.class_path)
    kwargs = dict(cfg.attack.init_args or {})
    kwargs["seed"] = attack.effective_attack_seed(kwargs.get("seed") or 0, cfg.seed or 0)
    uses_prior = bool(getattr(attack_cls(**kwargs), "requires_prior", False)) and bool(cfg.prior.path)
    key = (cfg.victim.checkpoint, bool(cfg.victim.random_init), cfg.prior.path if uses_prior else None,
           cfg.evaluation.evaluator)
    signature = tuple((str(found), _stat_signature(found))
                      for found in (find_input_path(v) for v in (key[0], key[2], key[3]) if v))
    hit = _FINGERPRINTS.get(key)
    if hit is not None and hit[0] == signature:
        return dict(hit[1])
    fingerprints = attack.model_fingerprints(cfg, uses_prior)
    _FINGERPRINTS[key] = (signature, dict(fingerprints))
    return fingerprints


def resume_refusal(argv: list[str], run_dir: Path) -> Optional[str]:
    """None when ``attack.py <argv> --resume <run_dir>`` would be accepted, else attack.py's reason (e.g. "resume
    directory from another config (differs in [...])", or "the prior model files changed since this run started
    ..."). Reads only: the parse and attack's own checks, :func:`attack.open_resume_dir` and
    :func:`attack.check_model_fingerprints` of the run dir's ``models.json`` against the cell's model files now
    (:func:`current_fingerprints`, hashed once per model set)."""
    import attack

    try:
        p, cfg = _parse_cell([*argv, "--resume", str(run_dir)])
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            attack.open_resume_dir(p, cfg)
            attack.check_model_fingerprints(run_dir, current_fingerprints(cfg))
    except attack.ConfigError as exc:  # "--resume DIR: resume directory from another config (differs in [...]); ..."
        msg = str(exc).strip().removeprefix(f"--resume {run_dir}: ")
        return msg.split("; run without --resume for a new run directory")[0] or type(exc).__name__
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - e.g. a config.yaml the parser rejects
        return _condense(str(exc).strip()) or type(exc).__name__
    return None


def finished_models_changed(argv: list[str], run_dir: Path) -> Optional[str]:
    """Why the finished run dir ``run_dir`` of the cell ``argv`` no longer counts, or None when it does: its
    ``models.json`` differs from the cell's model files now (:func:`current_fingerprints`) by the rule of
    ``attack.py --resume`` (:func:`attack.check_model_fingerprints`: every recorded model, the evaluator's
    included), e.g. "the prior model files changed since it ran (...)". A run dir without ``models.json`` (made
    before it existed) is not checked, as --resume does not check it; an unreadable one counts as changed."""
    import attack

    models = run_dir / attack.MODELS_FILE
    if not models.is_file():
        return None
    try:
        then = json.loads(models.read_text())
        if not isinstance(then, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return f"its {attack.MODELS_FILE} is unreadable ({exc}), so the model files it used are unknown"
    try:
        now = current_fingerprints(_parse_cell(argv)[1])
    except (Exception, SystemExit):  # noqa: BLE001 - a cell validate() would have refused: not checked here
        return None
    try:
        attack.check_model_fingerprints(run_dir, now)
    except attack.ConfigError as exc:
        changed = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
        if not changed:  # attack's rule and this diff part ways: say what attack.py says
            return str(exc).strip().removeprefix(f"--resume {run_dir}: ").split("; run without --resume")[0]
        return (f"the {', '.join(changed)} model files changed since it ran (retrained or replaced in place; its "
                f"{attack.MODELS_FILE} records other SHA-256)")
    return None


@dataclass
class CellPlan:
    """What a (re-)run does with a cell: ``skip`` (finished in ``run_dir``), ``resume`` (``--resume run_dir``) or
    ``new`` (a new run dir; ``run_dir`` is the unfinished one left as it is, if any). ``why``: for the messages."""
    action: str
    run_dir: Optional[Path] = None
    why: str = ""


def plan_cell(sweep: Sweep, cell: Cell, cells_root: Path, recorded: Optional[str], fresh: bool = False) -> CellPlan:
    """Decide a cell's fate on this run (see the module docstring): finished -> skip, unless a model file it used
    changed since (:func:`finished_models_changed`: then a new run dir, ``run_dir`` the finished one, ``why``
    naming the changed model; a newer unfinished run dir is resumed instead, when it can be); newest run dir
    interrupted, stopped hard or failed -> resume it (unless ``fresh`` or attack.py would refuse, a changed model
    file included: :func:`resume_refusal`); diverged -> a new run dir."""
    argv = cell.argv(sweep, cells_root)
    done = find_finished_run(cells_root, cell.slug, recorded)
    stale = None
    if done is not None:
        stale = finished_models_changed(argv, done)
        if stale is None:
            return CellPlan("skip", done)
    last = latest_run(cells_root, cell.slug)
    if done is not None and (last is None or run_status(last) == "finished"):
        return CellPlan("new", done, f"{done.name} finished, but {stale}; running the cell again in a new run "
                                     f"directory (the old one is kept)")
    if last is None:
        return CellPlan("new")
    status = run_status(last)
    was = _status_text(status)
    if fresh:
        return CellPlan("new", last, f"--fresh: {last.name} ({was}) is kept, starting in a new run directory")
    if _diverged(status):
        return CellPlan("new", last, f"{last.name} {was}; starting again in a new run directory (the old one is kept)")
    refusal = resume_refusal(argv, last)
    if refusal is not None:
        return CellPlan("new", last, f"cannot resume {last.name}: {refusal}; starting in a new run directory (the "
                                     f"old one is kept)")
    return CellPlan("resume", last, was)


def _file_signature(path: Path) -> Optional[tuple[int, int, int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path):
    """Hold ``sweep_dir/sweep.lock`` (``flock``, released when the process ends, however it ends) meanwhile; raises
    :class:`SweepError` when another process holds it. On a filesystem without locks it goes on unlocked
    (:func:`inversion.fsutils.exclusive_lock`)."""
    def busy(who: str) -> SweepError:
        return SweepError(f"{sweep_dir} is in use by another sweep.py ({who}): wait for it to end, or use --new or "
                          "another --root")

    with exclusive_lock(sweep_dir / "sweep.lock", busy):
        yield


# ------------------------------------------------------------------------------------------------ running
def _summary_text(run_dir: Path) -> str:
    try:
        s = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return ""
    bits = []
    for k in ("evaluator_accuracy", "psnr_nearest_mean", "lpips_nearest_mean"):
        if isinstance(s.get(k), (int, float)):
            bits.append(f"{k} {s[k]:.3g}")
    return ", ".join(bits)


#: seconds a child attack.py (and its ranks) gets to stop after the SIGINT that a signal to sweep.py forwards to it
#: (it writes summary.json and gathers its ranks' users), before its process group is killed (SIGKILL)
CHILD_STOP_TIMEOUT = 300.0
#: seconds ranks left behind by a child attack.py that ended get to end too, before they are killed
LEFTOVER_RANK_TIMEOUT = 10.0
FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # to sweep.py: forwarded as SIGINT to a child attack.py


def _signal_group(pgid: int, sig: int) -> None:
    """``os.killpg``, quiet when the group is gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether a process that has not exited is left in the process group ``pgid`` (zombies, exited but not reaped
    yet, do not count; read from /proc where there is one)."""
    proc = Path("/proc")
    if proc.is_dir():
        for d in proc.iterdir():
            if not d.name.isdigit():
                continue
            try:
                state, _ppid, pgrp = (d / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError, IndexError):
                continue
            if int(pgrp) == pgid and state not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _forwarding_signals(target: list[int]):
    """Meanwhile SIGINT, SIGTERM and SIGHUP to this process are forwarded, once, as SIGINT to the process group
    ``target[0]`` (as soon as the list holds it) and recorded in the yielded list (signal numbers): a child in its
    own session is out of reach of a terminal's Ctrl-C and hangup, and of a ``kill`` of sweep.py. Signals this
    process ignores (``nohup``, a script's ``&``) stay ignored (not forwarded); outside the main thread nothing is
    forwarded."""
    import signal
    import threading

    received: list[int] = []

    def forward(signum, _frame):
        if not received and target:
            _signal_group(target[0], signal.SIGINT)
        received.append(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for name in FORWARDED_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            if signal.getsignal(sig) is signal.SIG_IGN:
                if sig == signal.SIGINT:  # ignored here (a script's background job), still ignored meanwhile, but
                    # caught rather than SIG_IGN: an ignored signal stays ignored across exec, so the child would
                    # ignore the SIGINT a SIGTERM forwards
                    previous[sig] = signal.signal(sig, lambda *_: None)
                continue
            previous[sig] = signal.signal(sig, forward)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _run_child(cmd: list[str], **popen_kwargs) -> tuple[int, bool]:
    """Run ``cmd`` in its own session (process group) and wait for it: (its exit status, whether a signal to this
    process stopped it). A SIGINT, SIGTERM or SIGHUP to this process sends SIGINT to the child's process group
    (every DDP rank: attack.py then leaves its run directory consistent, as after Ctrl-C) and waits
    :data:`CHILD_STOP_TIMEOUT` seconds for it to end before killing the group. Returns only once no process of the
    group is left (ranks that outlive the child are killed after :data:`LEFTOVER_RANK_TIMEOUT` seconds), so the
    sweep's lock is never released while one still writes into the run directory."""
    import signal
    import subprocess

    target: list[int] = []
    with _forwarding_signals(target) as received:
        proc = subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
        # the handler forwards only once target holds the pid, and this catch-up only for a signal before that:
        # signals are held back in between, so one signal is never forwarded twice (a second SIGINT could cut
        # attack.py's orderly stop short)
        held = {getattr(signal, n) for n in FORWARDED_SIGNALS if hasattr(signal, n)}
        masked = hasattr(signal, "pthread_sigmask")
        if masked:
            signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            early = bool(received)
            target.append(proc.pid)
        finally:
            if masked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
        if early:  # a signal between the handlers and the child: forward it now
            _signal_group(proc.pid, signal.SIGINT)
        deadline, told = None, 0
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if len(received) > told:  # printed here, not in the signal handler (a print there can re-enter one)
                if deadline is None:
                    deadline = time.monotonic() + CHILD_STOP_TIMEOUT
                    print(f"[sweep] {signal.Signals(received[0]).name}: sent SIGINT to attack.py (pid {proc.pid}) and "
                          f"its ranks; waiting up to {CHILD_STOP_TIMEOUT:.0f} s for them to stop", file=sys.stderr,
                          flush=True)
                else:
                    print(f"[sweep] already stopping attack.py: waiting up to {deadline - time.monotonic():.0f} s more "
                          f"(to kill it now: kill -KILL -{proc.pid})", file=sys.stderr, flush=True)
                told = len(received)
            if deadline is not None and time.monotonic() > deadline:
                print(f"[sweep] attack.py (pid {proc.pid}) did not stop in {CHILD_STOP_TIMEOUT:.0f} s: killing its "
                      f"process group", file=sys.stderr, flush=True)
                _signal_group(proc.pid, signal.SIGKILL)
                code = proc.wait()
                break
        leftover = time.monotonic() + LEFTOVER_RANK_TIMEOUT
        while _group_alive(proc.pid):  # ranks still running after rank 0 ended
            if time.monotonic() > leftover:
                _signal_group(proc.pid, signal.SIGKILL)
                time.sleep(0.2)
                break
            time.sleep(0.1)
    return code, bool(received)


def run_attack_cell(argv: list[str]) -> Optional[Path]:
    """The default cell runner: ``attack.main(argv)`` in this process, returning the run directory; a cell that
    shards its users over several processes (:func:`attack.distributed`: strategy ddp, or several devices) runs as
    ``python attack.py ARGV`` in a child process instead and returns None (the caller finds its run directory).
    Lightning's launcher starts each further rank by re-running the command line, which in this process is
    sweep.py: every rank would have run the sweep (and met its lock).

    The child runs in its own session (:func:`_run_child`): a SIGINT (Ctrl-C), SIGTERM or SIGHUP to sweep.py is
    forwarded to it and its ranks as SIGINT, and this returns only when every one of them has ended (a signal that
    reached sweep.py alone left them running, unsupervised, while the lock was released and a second sweep.py
    could resume the same run directory). Only a SIGKILL of sweep.py still leaves the child running.

    Raises:
        KeyboardInterrupt: a signal to sweep.py stopped the child (the cell is interrupted).
        SystemExit: the child's exit status when it is not 0 (130 after Ctrl-C, 1 when it diverged).
    """
    import attack

    cfg = attack.build_parser().parse_args(argv)
    if not attack.distributed({k: v for k, v in dict(cfg.trainer).items() if v is not None}):
        return attack.main(argv)
    streams = {}
    for name in ("stdout", "stderr"):  # the cell's log file under --quiet, else the terminal
        stream = getattr(sys, name)
        try:
            stream.flush()
            streams[name] = stream.fileno()
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            streams[name] = None
    code, stopped = _run_child([sys.executable, str(Path(attack.__file__).resolve()), *argv], **streams)
    if stopped:
        raise KeyboardInterrupt
    if code != 0:
        raise SystemExit(code)
    return None


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """Meanwhile the first SIGTERM raises KeyboardInterrupt, as Ctrl-C's SIGINT does (later ones are ignored: the
    sweep is stopping): a cell running in this process stops as after Ctrl-C (attack.py writes its summary.json),
    index.json says interrupted and the exit status is 130 (outside Lightning's fit, which handles SIGTERM itself,
    the process died and left its cell's entry "running"). Not where this process ignores SIGTERM, nor outside the
    main thread. (A child attack.py gets SIGTERM's forward instead: :func:`_run_child`.)"""
    import signal
    import threading

    received: list[int] = []

    def interrupt(signum, _frame):
        received.append(signum)
        if len(received) == 1:
            raise KeyboardInterrupt

    installed, previous = False, None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        previous, installed = signal.signal(signal.SIGTERM, interrupt), True
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def run_sweep(sweep: Sweep, *, new: bool = False, max_cells: Optional[int] = None, report: bool = True,
              quiet: bool = False, runner: Optional[Callable[[list[str]], Optional[Path]]] = None,
              fresh: bool = False) -> dict:
    """Run (or continue) the sweep; returns the final index. ``runner`` defaults to :func:`run_attack_cell`
    (``attack.main``, or a child ``attack.py`` for multi-process cells); it returns the cell's run directory, or
    None when the newest new run directory of the cell is it. ``fresh``: an unfinished cell starts in a new run dir
    instead of resuming its newest one (see the module docstring). A SIGTERM stops it as Ctrl-C does.

    Raises:
        SweepError: the sweep directory is from another config or in use (:func:`open_sweep_dir`,
            :func:`sweep_lock`); or a config file changed while the sweep ran (:func:`config_files_changed`, checked
            before each cell: index.json is saved, with the reason under ``stopped``, and the lock released).
    """
    if runner is None:
        runner = run_attack_cell
    sweep_dir = open_sweep_dir(sweep, new)
    with sweep_lock(sweep_dir), _sigterm_as_ctrl_c():
        return _run_cells(sweep, sweep_dir, max_cells=max_cells, report=report, quiet=quiet, runner=runner,
                          fresh=fresh)


def _run_cells(sweep: Sweep, sweep_dir: Path, *, max_cells: Optional[int], report: bool, quiet: bool,
               runner: Callable[[list[str]], Path], fresh: bool) -> dict:
    cells_root = sweep_dir / "cells"
    index = load_index(sweep_dir)
    recorded = _recorded_config(sweep_dir, sweep)
    index.update(name=sweep.name, hash=recorded[0], sweep_dir=str(sweep_dir), stopped=None)
    entries: dict = index["cells"]
    n = len(sweep.cells)
    ran = 0
    interrupted = False
    stopped_in: Optional[Path] = None  # the run dir of the cell a Ctrl-C stopped
    print(f"[sweep] {sweep.name}: {n} cells in {sweep_dir}", flush=True)

    def save() -> None:
        atomic_write_json(sweep_dir / "index.json", index)

    def check_config_files() -> None:
        """Stop the sweep (index saved, :class:`SweepError`) when a config file changed since it started."""
        changed = config_files_changed(sweep, sweep_dir, *recorded)
        if changed is not None:
            index["stopped"] = changed
            save()
            raise SweepError(changed)

    entry: dict = {}
    try:
        for cell in sweep.cells:
            check_config_files()  # before the cell is planned: its argv reads the config files as they are now
            entry = entries.setdefault(cell.slug, {})
            if entry.get("run_dir") and not _inside(cells_root, entry["run_dir"]):  # another sweep directory's
                # (this one was copied or moved): its own cells/ folder is scanned instead
                entry["run_dir"] = None
            entry.update(index=cell.index, assignment=cell.assignment, argv=cell.argv(sweep, cells_root))
            tag = f"[sweep] {cell.index + 1}/{n} {cell.slug}"
            if max_cells is not None and ran >= max_cells:  # no resume check for a cell left for later; a finished
                # one is checked for changed model files (else the report pools it)
                done = find_finished_run(cells_root, cell.slug, entry.get("run_dir"))
                ok = done is not None and finished_models_changed(cell.argv(sweep, cells_root), done) is None
                plan = CellPlan("skip", done) if ok else None
            else:
                plan = plan_cell(sweep, cell, cells_root, entry.get("run_dir"), fresh)
            if plan is not None and plan.action == "skip":
                entry.update(run_dir=str(plan.run_dir), status="finished")
                save()
                print(f"{tag}: skipped, finished in {plan.run_dir}", flush=True)
                continue
            if plan is None:  # --max-cells reached ("finished": its run used model files that changed since)
                if entry.get("status") in (None, "running", "finished"):
                    entry["status"] = "pending"
                save()
                continue
            check_config_files()  # again, just before the cell reads them (planning it may have taken a while)
            resume = plan.run_dir if plan.action == "resume" else None
            if resume is None:  # the run dirs this one replaces stay listed (and on disk)
                for old in (entry.get("run_dir"), plan.run_dir):
                    if old and str(old) not in entry.get("previous_run_dirs", []):
                        entry.setdefault("previous_run_dirs", []).append(str(old))
            argv = cell.argv(sweep, cells_root) + (["--resume", str(resume)] if resume else [])
            before = {d.name for d in _new_run_dirs(cells_root, cell.slug, set())}
            summary_before = _file_signature(resume / "summary.json") if resume else None
            entry.update(status="running", run_dir=str(resume) if resume else None, resumed=resume is not None,
                         started=time.strftime("%Y-%m-%d %H:%M:%S"), error=None)
            save()
            if resume:
                print(f"{tag}: resuming {resume} (was {plan.why}; its finished users are kept) ...", flush=True)
            else:
                print(f"{tag}: " + (f"{plan.why} ..." if plan.why else "running ..."), flush=True)
            t0 = time.time()
            run_dir: Optional[Path] = None
            try:
                log = sweep_dir / "logs" / f"{cell.slug}.log"
                if quiet:
                    log.parent.mkdir(parents=True, exist_ok=True)
                    with log.open("a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh), \
                            _logging_to(fh):
                        made_dir = runner(argv)
                else:
                    made_dir = runner(argv)
                run_dir = Path(made_dir) if made_dir is not None else None  # None: a child process ran it (found below)
                status = (run_status(run_dir) if run_dir is not None else None) or "finished"
            except KeyboardInterrupt:
                status, interrupted = "interrupted", True
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
                status = "interrupted" if code == 130 else f"failed (exit {exc.code})"
                interrupted = code == 130
            except Exception as exc:  # noqa: BLE001 - record and go on with the next cell
                status = f"failed: {type(exc).__name__}: {exc}"
            ran += 1
            if run_dir is None:
                if resume is not None:
                    run_dir = resume
                    if _file_signature(resume / "summary.json") != summary_before:  # not the last attempt's summary
                        status = run_status(run_dir) or status
                else:
                    made = _new_run_dirs(cells_root, cell.slug, before)
                    run_dir = made[-1] if made else None
                    if run_dir is not None:
                        status = run_status(run_dir) or status  # e.g. 'diverged: ...' / 'interrupted' (summary.json)
            entry.update(status=status, run_dir=str(run_dir) if run_dir else None, seconds=round(time.time() - t0, 1),
                         finished=time.strftime("%Y-%m-%d %H:%M:%S"))
            save()
            extra = _summary_text(run_dir) if run_dir and status == "finished" else ""
            print(f"{tag}: {status} in {time.time() - t0:.1f} s" + (f" -> {run_dir}" if run_dir else "")
                  + (f" ({extra})" if extra else ""), flush=True)
            if interrupted:
                stopped_in = run_dir
                break
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM) outside a cell's run: while planning one, between two
        interrupted = True
        if entry.get("status") == "running":
            entry["status"] = "interrupted"

    finished = [e["run_dir"] for e in entries.values() if e.get("run_dir") and e.get("status") == "finished"
                and _inside(cells_root, e["run_dir"]) and run_status(e["run_dir"]) == "finished"]
    n_fin = sum(1 for c in sweep.cells if entries.get(c.slug, {}).get("status") == "finished")
    print(f"[sweep] {n_fin}/{n} cells finished", flush=True)
    if interrupted:
        where = ""
        if stopped_in is not None and (stopped_in / "config.yaml").is_file() and not fresh:
            where = f" and the interrupted cell resumes in {stopped_in}"
        print(f"[sweep] interrupted: run the same command again to continue; finished cells are skipped{where}",
              flush=True)
    if report and finished and not interrupted:
        from inversion.report import build_report

        order = {c.slug: c.index for c in sweep.cells}
        finished = sorted(finished, key=lambda d: order.get(re.sub(RUN_DIR_RE, "", Path(d).name), 1 << 30))
        # cell names are grid slugs: a seed or first_user axis pools (repeated measurements); other configs stay
        # apart through the report's setting key
        out = build_report(finished, sweep_dir / "report", pool_run_names=True)
        index.setdefault("reports", []).append({"dir": str(out), "cells": len(finished),
                                                "time": time.strftime("%Y-%m-%d %H:%M:%S")})
        index["report"] = str(out)
        print(f"[sweep] report: {out}/summary.md", flush=True)
    index["interrupted"] = interrupted
    save()
    return index


def dry_run(sweep: Sweep, new: bool, fresh: bool = False) -> None:
    """Print the cells, their command lines and what a real run would do (skip, resume a run dir, run); writes
    nothing."""
    sweep_dir = open_sweep_dir(sweep, new, create=False)
    index = load_index(sweep_dir) if sweep_dir.exists() else {"cells": {}}
    cells_root = sweep_dir / "cells"
    print(f"[sweep] {sweep.name}: {len(sweep.cells)} cells, sweep directory {sweep_dir} (hash {sweep.hash()[:12]})")
    for cell in sweep.cells:
        plan = plan_cell(sweep, cell, cells_root, index["cells"].get(cell.slug, {}).get("run_dir"), fresh)
        argv = cell.argv(sweep, cells_root)
        if plan.action == "skip":
            what = f"skip (finished: {plan.run_dir})"
        elif plan.action == "resume":
            what = f"resume {plan.run_dir} (was {plan.why})"
            argv = argv + ["--resume", str(plan.run_dir)]
        else:
            what = "run" + (f" ({plan.why})" if plan.why else "")
        print(f"[sweep] {cell.index + 1}/{len(sweep.cells)} {cell.slug}: {what}")
        print("    python attack.py " + " ".join(_quote(a) for a in argv))


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python sweep.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="sweep YAML (configs/sweep/*.yaml)")
    ap.add_argument("--dry-run", action="store_true", help="validate and list the cells; run nothing, write nothing")
    ap.add_argument("--max-cells", type=int, default=None, help="run at most N cells this time (skipped ones not counted)")
    ap.add_argument("--new", action="store_true", help="use a fresh suffixed sweep directory instead of continuing this one")
    ap.add_argument("--fresh", "--no-resume", action="store_true",
                    help="start every unfinished cell in a new run directory instead of resuming its interrupted, "
                         "failed or hard-stopped run directory with attack.py --resume (old run dirs are kept)")
    ap.add_argument("--root", default=None, help="sweep directory (overrides the YAML's root)")
    ap.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    ap.add_argument("--quiet", action="store_true", help="send each cell's output to <sweep>/logs/<slug>.log")
    args, unknown = ap.parse_known_args(argv)
    if unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)}. sweep.py takes no attack overrides: copy the sweep "
                 "YAML (or its base config) and edit it, so the sweep directory records what every cell ran")
    if args.max_cells is not None and args.max_cells < 0:
        ap.error("--max-cells must be >= 0")
    try:
        sweep = load_sweep(args.config, args.root)
        validate(sweep)
        if args.dry_run:
            dry_run(sweep, args.new, args.fresh)
            return 0
        index = run_sweep(sweep, new=args.new, max_cells=args.max_cells, report=not args.no_report, quiet=args.quiet,
                          fresh=args.fresh)
    except SweepError as exc:
        print(f"sweep.py: error: {exc}", file=sys.stderr)
        return 2
    if index.get("interrupted"):
        return 130
    statuses = [index["cells"].get(c.slug, {}).get("status") for c in sweep.cells]
    return 0 if all(s == "finished" for s in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
