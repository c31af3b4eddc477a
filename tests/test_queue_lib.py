"""scripts/queue_lib.sh: the CPU queues that carry a report's cells across sessions (reports/*/queue_half.sh and
persist.sh). What they decide (skip a finished cell, resume an unfinished one, start a missing one) and what they keep
in git (small result files and images, never checkpoints) is checked here with attack.py replaced by an echo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_bash(script: str, cwd: Path) -> str:
    """Run ``script`` after sourcing queue_lib.sh, with ``python attack.py ...`` echoed instead of run."""
    prelude = (
        f"source {ROOT / 'scripts' / 'queue_lib.sh'}\n"
        f'python() {{ if [[ "$1" == attack.py ]]; then echo "ATTACK $*"; else {sys.executable} "$@"; fi; }}\n'
        f"export PYTHONPATH={ROOT}\n"
    )
    done = subprocess.run(["bash", "-c", prelude + script], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout


def make_run(root: Path, name: str, status: str | None, users: int = 2) -> Path:
    run = root / name
    for u in range(users):
        user = run / "users" / f"user_{u:04d}"
        user.mkdir(parents=True)
        (user / "raw.png").write_bytes(b"png")
        (user / "raw.pt").write_bytes(b"pt")
        (user / "last.ckpt").write_bytes(b"x" * 1000)
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "results.csv").write_text("user\n" + "".join(f"{u}\n" for u in range(users)))
    (run / "grid.png").write_bytes(b"grid")
    if status is not None:
        (run / "summary.json").write_text(json.dumps({"status": status}))
    return run


def test_run_cell_skips_a_finished_cell_resumes_the_newest_unfinished_one_and_starts_a_missing_one(tmp_path):
    out = tmp_path / "runs"
    make_run(out, "A-20261201-000000-aaaaaa", "finished")
    make_run(out, "B-20261201-000000-bbbbbb", "finished")
    newest_b = make_run(out, "B-20261202-000000-cccccc", "interrupted")
    stdout = run_bash(
        f"QUEUE_OUT={out}; QUEUE_COMMON=(--config c.yaml)\n"
        "queue_run_cell A --x 1\nqueue_run_cell B --x 2\nqueue_run_cell C --x 3\n",
        tmp_path,
    )
    lines = [ln for ln in stdout.splitlines() if ln.startswith(("ATTACK", "[queue] A: finished"))]
    assert lines[0].startswith("[queue] A: finished")
    assert lines[1] == f"ATTACK attack.py --config c.yaml --x 2 --output.name B --resume {newest_b}"
    assert lines[2] == "ATTACK attack.py --config c.yaml --x 3 --output.name C"
    assert len(lines) == 3


def test_persist_keeps_results_and_images_but_no_checkpoints_and_restore_copies_back_only_what_is_missing(tmp_path):
    out, kept = tmp_path / "runs", tmp_path / "kept"
    run = make_run(out, "A-20261201-000000-aaaaaa", None, users=3)
    (kept / run.name / "users").mkdir(parents=True)  # an older kept copy is replaced whole
    (kept / run.name / "stale.txt").write_text("old")
    stdout = run_bash(f"queue_persist {out} {kept}\n", tmp_path)
    assert f"kept {kept}/{run.name} (3 users)" in stdout
    files = sorted(str(p.relative_to(kept / run.name)) for p in (kept / run.name).rglob("*") if p.is_file())
    assert files == ["config.yaml", "results.csv"] + [
        f"users/user_{u:04d}/{f}" for u in range(3) for f in ("raw.png", "raw.pt")
    ]
    assert not list(kept.glob(".tmp-*")) and not list(kept.glob("*.old"))

    shutil.rmtree(out)
    (out / "B-keep-mine").mkdir(parents=True)
    (kept / "B-keep-mine").mkdir()
    (kept / "B-keep-mine" / "results.csv").write_text("kept\n")
    run_bash(f"queue_restore {out} {kept}\n", tmp_path)
    assert (out / run.name / "users" / "user_0002" / "raw.pt").read_bytes() == b"pt"
    assert not (out / "B-keep-mine" / "results.csv").exists()  # an existing run directory is never overwritten
