"""scripts/queue_lib.sh: the CPU queues that carry a report's cells across sessions (reports/*/queue_half.sh and
persist.sh). What they decide (resume a cell's newest run, start a missing one, leave a diverged one), what they keep
in git (small result files and images, and the checkpoint of a user in progress) and how a signal stops them are checked here, with
attack.py replaced by an echo or by a stand-in script."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or os.name != "posix", reason="needs bash on POSIX")
LIB = ROOT / "scripts" / "queue_lib.sh"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def run_bash(script: str, cwd: Path) -> str:
    """Run ``script`` after sourcing queue_lib.sh, with the attack.py child echoed instead of run."""
    stub = ('python() { if [[ "$1" == -c && "$3" == python && "$4" == attack.py ]]; then shift 3; echo "ATTACK $*"; '
            f'else {sys.executable} "$@"; fi; }}\n')
    done = subprocess.run(["bash", "-c", f"source {LIB}\n{stub}{script}"], cwd=cwd, env=ENV, capture_output=True,
                          text=True, check=True)
    return done.stdout


def make_run(root: Path, name: str, status: str | None, users: int = 2) -> Path:
    run = root / name
    for u in range(users):
        user = run / "users" / f"user_{u:04d}"
        user.mkdir(parents=True)
        for f in ("raw.png", "raw.pt", "denoised.png", "grid.png", "batch.png"):
            (user / f).write_bytes(f.encode())
        (user / "last.ckpt").write_bytes(b"x" * 1000)
    for f in ("config.yaml", "attack_seed.txt", "defense_seeds.txt", "models.json"):
        (run / f).write_text(f)
    (run / "results.csv").write_text("user\n" + "".join(f"{u}\n" for u in range(users)))
    if status is not None:
        (run / "summary.json").write_text(json.dumps({"status": status}))
    return run


def test_run_cell_resumes_the_newest_run_leaves_a_diverged_one_and_starts_a_missing_one(tmp_path):
    out = tmp_path / "runs"
    finished = make_run(out, "A-20261201-000000-aaaaaa", "finished")  # resumed too: attack.py checks its config
    make_run(out, "B-20261201-000000-bbbbbb", "finished")
    newest_b = make_run(out, "B-20261202-000000-cccccc", "interrupted")
    make_run(out, "B-20261203-000000-dddddd.old", None)  # a persist leftover is never the newest
    make_run(out, "D-20261201-000000-eeeeee", "diverged: NaN at step 7")
    stdout = run_bash(
        f"QUEUE_OUT={out}; QUEUE_COMMON=(--config c.yaml)\n"
        "queue_run_cell A --x 1\nqueue_run_cell B --x 2\nqueue_run_cell C --x 3\nqueue_run_cell D --x 4\n",
        tmp_path,
    )
    attacks = [ln for ln in stdout.splitlines() if ln.startswith("ATTACK")]
    assert attacks == [
        f"ATTACK attack.py --config c.yaml --x 1 --output.name A --resume {finished}",
        f"ATTACK attack.py --config c.yaml --x 2 --output.name B --resume {newest_b}",
        "ATTACK attack.py --config c.yaml --x 3 --output.name C",
    ]
    assert "[queue] D: diverged: NaN at step 7" in stdout and "not retried" in stdout


def test_persist_keeps_results_images_and_the_mid_user_checkpoint_and_restore_copies_back_only_what_is_missing(tmp_path):
    out, kept = tmp_path / "runs", tmp_path / "kept"
    run = make_run(out, "A-20261201-000000-aaaaaa", None, users=3)
    (run / "checkpoints" / "user_0003").mkdir(parents=True)  # the user in progress: resumed at its last checkpoint
    (run / "checkpoints" / "user_0003" / "last.ckpt").write_bytes(b"ckpt")
    (run / "checkpoints" / "user_0003" / "step=500.ckpt").write_bytes(b"other")  # only last.ckpt is read by --resume
    (run / "logs").mkdir()
    (run / "logs" / "metrics.csv").write_text("step\n")
    (kept / run.name / "users").mkdir(parents=True)  # an older kept copy is replaced whole
    (kept / run.name / "stale.txt").write_text("old")
    stdout = run_bash(f"queue_persist {out} {kept}\n", tmp_path)
    assert f"kept {kept}/{run.name} (3 users)" in stdout
    files = sorted(str(p.relative_to(kept / run.name)) for p in (kept / run.name).rglob("*") if p.is_file())
    assert files == sorted(["attack_seed.txt", "config.yaml", "defense_seeds.txt", "models.json", "results.csv"] + [
        f"users/user_{u:04d}/{f}" for u in range(3) for f in ("denoised.png", "grid.png", "raw.png", "raw.pt")]
        + ["checkpoints/user_0003/last.ckpt"])
    assert not list(kept.glob(".tmp-*")) and not list(kept.glob("*.old"))

    shutil.rmtree(out)
    (out / "B-keep-mine").mkdir(parents=True)
    (kept / "B-keep-mine").mkdir()
    (kept / "B-keep-mine" / "results.csv").write_text("kept\n")
    (kept / "C-20261201-000000-ffffff.old").mkdir()  # a persist cut short between its two renames
    run_bash(f"queue_restore {out} {kept}\n", tmp_path)
    assert (out / run.name / "users" / "user_0002" / "raw.pt").read_bytes() == b"raw.pt"
    assert (out / run.name / "checkpoints" / "user_0003" / "last.ckpt").read_bytes() == b"ckpt"
    assert not (out / "B-keep-mine" / "results.csv").exists()  # an existing run directory is never overwritten
    assert not (out / "C-20261201-000000-ffffff.old").exists()


@pytest.mark.parametrize("sig, int_ignored", [(signal.SIGTERM, True), (signal.SIGINT, False), (signal.SIGHUP, False)])
def test_a_signal_to_the_queue_stops_the_running_attack_as_ctrl_c_and_starts_no_next_cell(tmp_path, sig, int_ignored):
    """`kill QUEUE_PID` left attack.py running (orphaned), and a restarted queue then met its lock and went on to the
    next cell. A queue started as a script's background job (`nohup bash queue.sh &`) has SIGINT ignored, and so
    had its attack.py, which then never raised KeyboardInterrupt."""
    (tmp_path / "attack.py").write_text(
        "import signal, sys, time\nfrom pathlib import Path\n"
        "def stop(*_):\n    raise KeyboardInterrupt\n"
        "signal.signal(signal.SIGTERM, stop)  # as attack.py (Lightning) stops on SIGTERM: status 'interrupted'\n"
        "name = sys.argv[sys.argv.index('--output.name') + 1]\n"
        "Path(name + '.started').write_text('')\n"
        "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    Path(name + '.interrupted').write_text('')\n"
        "    sys.exit(1)\n")
    (tmp_path / "queue.sh").write_text(f"source {LIB}\nQUEUE_OUT=runs; QUEUE_COMMON=()\n"
                                       "queue_run_cell first\nqueue_run_cell second\n")

    def start():
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_IGN if int_ignored else signal.SIG_DFL)
        # a queue that does not ignore SIGHUP (bash cannot trap a signal ignored at its start): a test run under
        # `nohup` passed its ignored SIGHUP on, and the SIGHUP case waited out its timeout
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    queue = subprocess.Popen(["bash", "queue.sh"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, preexec_fn=start)
    try:
        for _ in range(600):
            if (tmp_path / "first.started").exists():
                break
            time.sleep(0.05)
        assert (tmp_path / "first.started").exists()
        os.kill(queue.pid, sig)  # the queue's bash only, as `kill PID` does
        out, _ = queue.communicate(timeout=30)
    finally:
        if queue.poll() is None:
            os.killpg(queue.pid, signal.SIGKILL)
    assert (tmp_path / "first.interrupted").exists(), out
    assert "[queue] stopped" in out and queue.returncode == 130
    assert not (tmp_path / "second.started").exists()


def test_a_signal_between_cells_starts_no_next_cell_and_persist_is_not_trapped(tmp_path):
    """A signal that came while no attack.py ran (restore, the status check, between cells) was only noted, and the
    next multi-hour cell started; persist.sh inherited the trap and ignored `kill PID`."""
    stdout = subprocess.run(["bash", "-c", f"source {LIB}\nQUEUE_OUT=runs; QUEUE_COMMON=()\n"
                             "queue_stop\nqueue_run_cell first\necho not-reached\n"],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert stdout.returncode == 130 and "[queue] stopped" in stdout.stdout and "not-reached" not in stdout.stdout
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
    persist = subprocess.Popen(["bash", "-c", f"source {LIB}\nkill -TERM $$\necho not-reached\n"], cwd=tmp_path,
                               env=ENV, stdout=subprocess.PIPE, text=True)
    out, _ = persist.communicate(timeout=30)
    assert persist.returncode == -signal.SIGTERM and "not-reached" not in out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist")
def test_attack_py_stops_on_sigterm_as_on_ctrl_c(tmp_path):
    """What the queue relies on (and a cluster's time limit sends): SIGTERM to attack.py ends the run 'interrupted'
    with the resume command, its checkpoint kept, rather than 'failed' or killed."""
    from tests.test_attack_e2e import tiny_config

    cfg = tiny_config(tmp_path, **{"attack.init_args.steps": 100000, "logger.backend": "none",
                                   "users.init_args.num_users": 1})
    proc = subprocess.Popen([sys.executable, str(ROOT / "attack.py"), "--config", str(cfg), "--checkpoint_every", "20"],
                            cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(1200):
            if list((tmp_path / "runs").glob("*/checkpoints/*/last.ckpt")):
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted", out
    assert f"--resume {run_dir}" in out and list(run_dir.glob("checkpoints/*/last.ckpt"))


def test_report_init_keeps_the_callers_threads_where_a_queue_gets_one(tmp_path):
    """queue_init gives a queue's attack.py one thread (one half cell per core); queue_init_report (make_report.sh,
    final_stage_grid.sh) keeps the caller's OMP_NUM_THREADS, default 1; both restore the kept runs into OUT."""
    kept = tmp_path / "kept"
    make_run(kept, "B10_trained_u0-20260101-000000-aaaaaa", "finished")
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    script = ("source {lib}; OMP_NUM_THREADS=3 {init} {out} {kept} >/dev/null; echo \"$OMP_NUM_THREADS\"; "
              "ls {out}")
    got = {}
    for init in ("queue_init", "queue_init_report"):
        out = tmp_path / init
        done = subprocess.run(["bash", "-c", script.format(lib=LIB, init=init, out=out, kept=kept)], env=env,
                              capture_output=True, text=True, check=True)
        got[init] = done.stdout.split()
    assert got == {"queue_init": ["1", "B10_trained_u0-20260101-000000-aaaaaa"],
                   "queue_init_report": ["3", "B10_trained_u0-20260101-000000-aaaaaa"]}
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run(["bash", "-c", f"source {LIB}; queue_init_report {tmp_path / 'o2'} {kept}; "
                           "echo \"$OMP_NUM_THREADS\""], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split()[-1] == "1"
