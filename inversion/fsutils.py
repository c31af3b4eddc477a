"""File-system helpers shared by every atomic write in the project.

``tempfile.mkstemp`` creates files with mode 0600 and ``tempfile.mkdtemp`` folders with mode 0700, and an atomic
rename keeps those modes, so results, configs and exported models written through a temporary path would be private
to their owner (unreadable by CI under another user, a container, or colleagues on a shared cluster). These helpers
give them the modes an ordinary ``open``/``mkdir`` would: 0666 / 0777 masked by the process umask.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional


def current_umask() -> int:
    """The process umask (e.g. 0o022): the ``Umask:`` line of /proc/self/status on Linux; elsewhere read by setting
    and restoring it (``os.umask`` has no pure getter; another thread creating a file in that instant would get 022)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_file(path: str | Path) -> None:
    """chmod a temporary file to 0666 & ~umask (what ``open(path, 'w')`` would create), before renaming it into place."""
    os.chmod(path, 0o666 & ~current_umask())


def publish_dir(path: str | Path) -> None:
    """chmod a temporary folder to 0777 & ~umask (what ``mkdir`` would create), before renaming it into place."""
    os.chmod(path, 0o777 & ~current_umask())


def _fsync_path(path: str | Path, flags: int) -> None:
    """Open ``path`` read-only with ``flags`` added and fsync it; best effort (an open or fsync error is skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY | flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """fsync the folder ``path`` so that a rename into it survives a crash (POSIX); best effort: platforms or file
    systems that cannot open or fsync a folder (Windows, some network mounts) are skipped silently."""
    _fsync_path(path, getattr(os, "O_DIRECTORY", 0))


def fsync_tree(path: str | Path) -> None:
    """fsync every file under the folder ``path`` (recursively), then each folder bottom-up, so that a folder about
    to be renamed into place holds its whole contents on disk even after a power loss. Best effort as
    :func:`fsync_dir` (a file that cannot be opened or fsynced is skipped); symbolic links are not followed."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync_path(os.path.join(root, name), getattr(os, "O_NOFOLLOW", 0))
        fsync_dir(root)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename: readers see the
    old file or the whole new one, never a part. The temporary file is flushed and fsynced before the rename (a
    crash or power loss right after it cannot leave an empty or truncated file under the final name), gets an
    ordinary file mode (:func:`publish_file`), and the folder is fsynced after the rename (best effort,
    :func:`fsync_dir`). The folder is created when missing; the temporary file is removed on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        publish_file(tmp)  # mkstemp's 0600 would survive the rename
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)


def check_run_name(name: str, key: str = "output.name") -> None:
    """Refuse a run name that is not one plain folder name (the run directory is ``root/<name>-<time>-<id>``).

    Raises:
        ValueError: ``name`` holds a path separator ('/' or the platform's) or is '.' / '..' (it would make the run
            directory in a sub-folder that may not exist, or outside the root), or a NUL character.
    """
    name = str(name or "")
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if any(sep in name for sep in seps) or name in (".", "..") or "\0" in name:
        raise ValueError(f"{key} must be one plain folder name (no '/', not '.' or '..'), got {name!r}: the run "
                         f"directory is <output.root>/<output.name>-<time>-<id>; put sub-folders into output.root")


def new_run_dir(root: str | os.PathLike, name: str = "") -> Path:
    """Create and return a fresh run directory ``root/name-YYYYmmdd-HHMMSS-<6 hex>`` (``root/YYYYmmdd-HHMMSS-<6 hex>``
    without a name; local time; exclusive mkdir, so two runs never share one). ``root`` is created when missing;
    ``~`` in it is expanded (as Lightning's loggers expand theirs: a literal ``./~`` folder split a run in two).

    Raises:
        ValueError: ``name`` is not one plain folder name (:func:`check_run_name`).
        RuntimeError: no free name after 100 tries.
    """
    check_run_name(name)
    base = Path(os.path.expanduser(str(root)))
    base.mkdir(parents=True, exist_ok=True)
    prefix = f"{name}-" if name else ""
    for _ in range(100):
        d = base / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run directory under {base}")


REPO_ROOT = Path(__file__).resolve().parents[1]


def find_input_path(value: str | os.PathLike) -> Path:
    """Where an input path from a config (a checkpoint folder, a prior folder, an evaluator) is looked up: as given
    (``~`` expanded; absolute, or relative to the current directory), then, for a relative path, under the
    repository root, so ``checkpoints/fashion_mnist/victim_resnet18`` works from any directory.

    Args:
        value: the path as written in the config or on the command line.

    Returns:
        The first candidate that exists; else ``Path(value)`` with ``~`` expanded (``Path`` drops a leading ``./``,
        so a caller that tells a missing local folder from a hub id by its spelling, as :func:`inversion.prior.load_ddpm`
        does, should pass on its own string when the result does not exist: see ``attack.load_prior``).

    The one rule used by attack.py (victim, prior, evaluator) and the report (which compares settings by the real
    paths they name); it never raises.
    """
    p = Path(os.path.expanduser(str(value)))
    try:
        if p.exists() or p.is_absolute():
            return p
        if (REPO_ROOT / p).exists():
            return REPO_ROOT / p
    except (OSError, ValueError):  # a name too long for the file system, an embedded NUL, ...: not a local path
        pass
    return p


def producing_train_config(folder: str | os.PathLike) -> "str | None":
    """The ``configs/train/*.yaml`` whose ExportModel writes ``folder`` (a path relative to the repository root, or
    absolute inside it), as a repo-relative path for an error message ('python train.py --config ...'); None when
    no shipped training config exports there (e.g. a folder of the user's own)."""
    import re

    p = Path(os.path.expanduser(str(folder)))
    try:
        rel = p.resolve().relative_to(REPO_ROOT) if p.is_absolute() else p
    except ValueError:
        return None
    pattern = re.compile(r"dirpath:\s*['\"]?" + re.escape(rel.as_posix().rstrip("/")) + r"/?['\"]?\s*(?:[,}#]|$)", re.M)
    for cfg in sorted((REPO_ROOT / "configs" / "train").glob("*.yaml")):
        if pattern.search(cfg.read_text()):
            return cfg.relative_to(REPO_ROOT).as_posix()
    return None


def output_path_problem(flag: str, path: str) -> "str | None":
    """Why ``path`` (the value of option ``flag``) cannot take a new result file, or None when it can: it must not
    exist (results are never overwritten), and its folder must be writable, or creatable in its nearest existing
    ancestor (probed by making and removing a temporary file or folder there, so what the file system refuses, e.g.
    /proc, is found before any work, not after it; nothing is left behind). Used by the scripts' option checks
    (scripts/benchmark.py, scripts/check_checkpoints.py)."""
    target = Path(path)
    if target.exists() or target.is_symlink():
        return f"{flag} {path} exists: results are never overwritten; give a new path"
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        if folder.is_symlink():  # a broken link: mkdir would fail on it at the end of the run
            return f"{flag} {path} cannot be written: {folder} is a broken symbolic link; give another path"
        folder = folder.parent
    if not folder.is_dir():
        return f"{flag} {path} cannot be written: {folder} is not a folder; give a path in a writable folder"
    try:
        if folder == target.parent:
            fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=folder)
            os.close(fd)
            os.remove(probe)
        else:  # the missing folders will be created there
            os.rmdir(tempfile.mkdtemp(prefix=".probe.", dir=folder))
    except OSError as exc:
        return (f"{flag} {path} cannot be written: creating a file in {folder} failed ({exc.strerror or exc}); give a "
                "path in a writable folder")
    return None


@contextlib.contextmanager
def exclusive_lock(path: str | Path, busy: Callable[[str], Exception]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (created if missing; it names the holder: pid, host, since)
    while the block runs; the kernel releases it when the process ends, however it ends. When the block ends
    normally or by an exception the file is emptied (it stays, empty: a later holder writes its own line); a process
    killed hard leaves its line, naming a pid that no longer runs.

    Args:
        path: the lock file, e.g. ``<sweep dir>/sweep.lock`` or ``<run dir>/attack.lock``.
        busy: builds the exception to raise when another process holds the lock, from the holder's description.

    Raises:
        whatever ``busy`` returns, when the lock is held elsewhere (before the block runs). On a filesystem
        without locks, or off POSIX, the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fh = open(path, "a+")
    locked = False
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            fh.seek(0)
            raise busy(fh.read().strip() or "another process") from None
        except OSError:
            locked = False
        if locked:
            import socket

            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            fh.flush()
        yield
    finally:
        if locked:  # the file stays (unlinking a flock file races a waiting opener): it no longer names a holder
            with contextlib.suppress(OSError):
                fh.seek(0)
                fh.truncate()
                fh.flush()
        fh.close()


def run_status(run_dir: "str | Path | None") -> Optional[str]:
    """``status`` of attack.py's ``run_dir/summary.json`` ('finished', 'interrupted', 'diverged: ...',
    'failed: ...'); None when ``run_dir`` is None or empty, or there is no summary.json (a run still going, or
    stopped too hard to write it), or it cannot be read or is not a JSON object with a status. The one reader of a
    run's status for attack.py, sweep.py, scripts/refinish.py and inversion.report."""
    import json

    if not run_dir:
        return None
    try:
        status = json.loads((Path(run_dir) / "summary.json").read_text()).get("status")
    except Exception:  # noqa: BLE001 - no readable summary: unknown
        return None
    return None if status is None else str(status)
