"""sweep.py and the signals that stop it: a child attack.py (a multi-process cell) runs in its own process group, a
SIGINT/SIGTERM/SIGHUP to sweep.py is forwarded to it as SIGINT, and sweep.py returns (and releases its lock) only once
no process of that group is left; a SIGTERM stops a cell run in sweep.py's own process as Ctrl-C does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import sweep
from tests.test_sweep import needs_data, write_sweep, write_tiny_base

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """tests/test_sweep.py's tiny attack config (2 users, B 3, 8x8 images, no logger)."""
    return write_tiny_base(tmp_path_factory.mktemp("tiny"))


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process from /proc, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _descendants(pid: int) -> dict[int, int]:
    """pid -> start time of every living descendant of ``pid``."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _proc_stat(int(d.name))) is not None and st[0] != "Z":
            children.setdefault(st[1], []).append(int(d.name))
    out, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            st = _proc_stat(child)
            if st is not None:
                out[child] = st[2]
                todo.append(child)
    return out


def _alive(procs: dict[int, int]) -> list[int]:
    """The processes of ``procs`` (pid -> start time) still running (not a zombie, not a reused pid)."""
    return [pid for pid, start in procs.items()
            if (st := _proc_stat(pid)) is not None and st[0] not in ("Z", "X") and st[2] == start]


def _kill_leftovers(procs: dict[int, int]) -> None:
    for pid in _alive(procs):
        os.kill(pid, signal.SIGKILL)


def _start_sweep(cfg: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "--config", str(cfg), "--no-report"], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for(predicate, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"sweep.py ended early ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < end, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------ _run_child
CHILD = r"""
import os, signal, subprocess, sys, time
ready, mode = sys.argv[1], sys.argv[2]
# a 'rank' in the child's process group that ignores SIGINT (it ends only when killed)
rank = subprocess.Popen([sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGINT, "
                         "signal.SIG_IGN); open(sys.argv[1], 'w').close(); time.sleep(600)", ready + ".rank"])
while not os.path.exists(ready + ".rank"):
    time.sleep(0.01)
def stop(signum, frame):
    open(ready + ".got", "w").write(str(signum))
    sys.exit(130)
signal.signal(signal.SIGINT, stop if mode == "stops" else signal.SIG_IGN)
open(ready, "w").write(str(rank.pid))
time.sleep(600)
"""


@pytest.mark.parametrize("sig, mode", [(signal.SIGTERM, "stops"), (signal.SIGINT, "stops"),
                                       (signal.SIGTERM, "hangs")])
def test_a_signal_to_the_sweep_is_forwarded_to_the_childs_process_group(tmp_path, monkeypatch, request, sig, mode):
    """The child gets SIGINT (it stops, 130), its 'rank' that outlives it is killed after LEFTOVER_RANK_TIMEOUT; a
    child that ignores the SIGINT is killed after CHILD_STOP_TIMEOUT. _run_child returns only when every process of
    the group is gone, and restores this process's signal handlers."""
    monkeypatch.setattr(sweep, "CHILD_STOP_TIMEOUT", 2.0)
    monkeypatch.setattr(sweep, "LEFTOVER_RANK_TIMEOUT", 1.0)
    ready = tmp_path / "ready"
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # pytest run as a shell's background job (`cmd &`): the
        # sweep keeps an ignored SIGINT ignored (by design), so this test's own SIGINT would never arrive
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def send():
        end = time.monotonic() + 60
        while not ready.is_file() or not ready.read_text():
            if time.monotonic() > end:
                return
            time.sleep(0.05)
        os.kill(os.getpid(), sig)  # to this process (the sweep) only

    sender = threading.Thread(target=send)
    sender.start()
    try:
        code, stopped = sweep._run_child([sys.executable, "-c", CHILD, str(ready), mode])
    finally:
        sender.join()
    rank = int(ready.read_text())
    assert stopped
    if mode == "stops":
        assert code == 130 and (tmp_path / "ready.got").read_text() == str(int(signal.SIGINT))
    else:
        assert code == -signal.SIGKILL and not (tmp_path / "ready.got").exists()
    assert _proc_stat(rank) is None or _proc_stat(rank)[0] in ("Z", "X")  # the rank is gone too
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_a_child_that_ends_by_itself_is_not_stopped(tmp_path):
    code, stopped = sweep._run_child([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert (code, stopped) == (3, False)


# ------------------------------------------------------------------------------------------------ end to end
@needs_data
@pytest.mark.slow
def test_sigterm_to_the_sweep_alone_stops_its_child_attack_py_and_every_rank(tmp_path, tiny_base):
    """A two-process cell runs as a child attack.py (and its second rank). A SIGTERM to sweep.py alone killed
    sweep.py and left both running, unsupervised, writing into the run directory after the lock was released.
    Now they get SIGINT, stop (summary.json interrupted), and sweep.py exits 130 with index.json interrupted, after
    them."""
    cfg = write_sweep(tmp_path / "s.yaml", tiny_base, {"seed": [0]},
                      fixed={"trainer.devices": 2, "attack.init_args.steps": 100000})
    log = tmp_path / "sweep.log"
    proc = _start_sweep(cfg, log)
    procs: dict[int, int] = {}
    try:
        _wait_for(lambda: "[attack] run directory:" in log.read_text() and len(_descendants(proc.pid)) >= 2, 240,
                  proc, log)
        time.sleep(2)
        procs = _descendants(proc.pid)  # attack.py and its second rank
        assert len(procs) >= 2
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=240)
        left = _alive(procs)
        assert not left, f"left running after sweep.py ended: {left}"
        assert code == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_leftovers(procs)
    index = json.loads((tmp_path / "sweep_dir" / "index.json").read_text())
    (entry,) = index["cells"].values()
    assert index["interrupted"] and entry["status"] == "interrupted", index
    assert json.loads((Path(entry["run_dir"]) / "summary.json").read_text())["status"] == "interrupted"
    with sweep.sweep_lock(tmp_path / "sweep_dir"):  # released
        pass


IN_PROCESS = r"""
import os, signal, sys, time
import sweep
from tests.test_sweep import _fake_runner

def runner(argv):  # a cell in sweep.py's own process (attack.main), outside a Lightning fit (whose own SIGTERM
    os.kill(os.getpid(), signal.SIGTERM)  # handler stops it): loading models, evaluating a user
    time.sleep(60)
    return _fake_runner(argv)

index = sweep.run_sweep(sweep.load_sweep(sys.argv[1]), runner=runner, report=False)
sys.exit(130 if index["interrupted"] else 0)
"""


def test_sigterm_stops_a_cell_run_in_the_sweeps_process_as_ctrl_c_does(tmp_path, tiny_base):
    """A cell run inside sweep.py (attack.main): a SIGTERM outside Lightning's fit killed sweep.py outright, its
    index.json entry left 'running'. Now it stops the cell as Ctrl-C does: index.json interrupted, exit status 130."""
    cfg = write_sweep(tmp_path / "s.yaml", tiny_base, {"seed": [0, 1]})
    out = subprocess.run([sys.executable, "-c", IN_PROCESS, str(cfg)], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 130, out.stdout[-2000:] + out.stderr[-2000:]
    index = json.loads((tmp_path / "sweep_dir" / "index.json").read_text())
    assert index["interrupted"] and {k: e["status"] for k, e in index["cells"].items()} == {"seed=0": "interrupted"}
    assert "[sweep] interrupted: run the same command again" in out.stdout
