"""Logging review fixes: the W&B mode reaches wandb.init, offline resumes start a fresh W&B run in one group, a
user counts once results.csv has it, the W&B status is set even without finished users, the CSV logger gets the
config, atomic writes fsync, the CSV image fallback renames into place, and the baselines log their last step."""

from __future__ import annotations

import csv
import json
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from jsonargparse import Namespace
from PIL import Image

import attack
from tests.helpers import QUIET_FIT_WARNINGS
from tests.test_attack_e2e import HAVE_FMNIST, tiny_config

pytestmark = QUIET_FIT_WARNINGS
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="needs `apt-get install dataset-fashion-mnist`")


# ------------------------------------------------------------------------------------------------ helpers
class FakeRun:
    """What a stubbed ``wandb.init`` returns: records its kwargs; enough of a W&B run for make_logger."""

    count = 0

    def __init__(self, **kwargs):
        FakeRun.count += 1
        self.kwargs = kwargs
        self.id = kwargs.get("id") or f"fake{FakeRun.count:04d}"
        self.config_updates: list[dict] = []
        self.summary: dict = {}

        run = self

        class Config(dict):
            def update(self, params, allow_val_change=False):
                run.config_updates.append(dict(params))
                super().update(params)

        self.config = Config()


@pytest.fixture
def stub_wandb_init(monkeypatch):
    """Replace wandb.init by a recorder: returns the list of kwargs of every call (a FakeRun each)."""
    import wandb

    calls: list[dict] = []

    def init(**kwargs):
        calls.append(kwargs)
        return FakeRun(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    return calls


def logger_cfg(**kw) -> Namespace:
    spec = {"backend": "wandb", "project": "p", "group": None, "tags": [], "mode": None, **kw}
    return Namespace(logger=Namespace(**spec))


def wandb_records(path: Path):
    """The protobuf records of an offline ``.wandb`` file (W&B's LevelDB-style log: 32 KiB blocks of chunks with a
    7-byte header crc32 | length | type; type 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        if pos + 7 + n > len(data):  # a chunk still being written
            return
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            buf = b""
            yield r


def offline_run_info(folder: Path, timeout: float = 60.0) -> dict:
    """id, group, summary 'status' and config 'run_attempt' of one offline-run folder, read from its .wandb file
    once that holds the run's 'exit' record (W&B's service writes the file after ``wandb.finish`` returns)."""
    import time

    (f,) = folder.glob("*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(f))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    info: dict = {"status": None, "run_attempt": None}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            info["id"], info["group"] = r.run.run_id, r.run.run_group
        elif kind == "summary":
            for item in r.summary.update:
                if (item.key or "/".join(item.nested_key)) == "status":
                    info["status"] = json.loads(item.value_json)
        elif kind == "config":
            for item in r.config.update:
                if (item.key or "/".join(item.nested_key)) == "run_attempt":
                    info["run_attempt"] = json.loads(item.value_json)
    return info


# ------------------------------------------------------------------------------------------------ 1. W&B mode
@pytest.mark.parametrize("config_mode, env, expected", [
    ("online", "offline", "online"),  # --logger.mode online goes online although tests/CI set WANDB_MODE=offline
    ("offline", "online", "offline"),  # an explicit config value wins over the environment
    ("disabled", None, "disabled"),
    (None, "online", "online"),  # nothing in the config: the environment decides
    (None, "offline", "offline"),
    (None, "dryrun", "offline"),  # W&B's old name of offline (what Lightning used to set)
    (None, None, "offline"),  # nothing anywhere: offline
])
def test_the_wandb_mode_reaches_wandb_init_explicitly(tmp_path, monkeypatch, stub_wandb_init, config_mode, env,
                                                       expected):
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    attack.make_logger(logger_cfg(mode=config_mode), tmp_path, {"seed": 0})
    (kwargs,) = stub_wandb_init
    assert kwargs["mode"] == expected
    # Lightning's offline flag set WANDB_MODE=dryrun for the whole process: the next run in it (a sweep cell) stayed
    # offline. The environment is left as it was.
    assert os.environ.get("WANDB_MODE") == env


def test_a_later_run_in_the_same_process_is_not_kept_offline_by_an_earlier_one(tmp_path, monkeypatch, stub_wandb_init):
    """sweep.py runs its cells in one process: an offline cell must not turn a later online cell offline."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    attack.make_logger(logger_cfg(mode="offline"), tmp_path / "a", {})
    attack.make_logger(logger_cfg(mode="online"), tmp_path / "b", {})
    monkeypatch.setenv("WANDB_MODE", "online")
    attack.make_logger(logger_cfg(mode="offline"), tmp_path / "c", {})
    attack.make_logger(logger_cfg(), tmp_path / "d", {})  # config says nothing: the user's WANDB_MODE=online
    assert [c["mode"] for c in stub_wandb_init] == ["offline", "online", "offline", "online"]


def test_an_unknown_wandb_mode_is_a_config_error(monkeypatch):
    with pytest.raises(attack.ConfigError, match="logger.mode must be online, offline, disabled or shared.*'onlin'"):
        attack.wandb_mode(SimpleNamespace(mode="onlin"))
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(attack.ConfigError, match="WANDB_MODE.*'bogus'"):
        attack.wandb_mode(SimpleNamespace(mode=None))
    assert attack.wandb_mode(SimpleNamespace(mode="offline")) == "offline"  # the config's value needs no env


@needs_fmnist
def test_an_unknown_wandb_mode_fails_before_any_run_dir(tmp_path):
    cfg = tiny_config(tmp_path, **{"logger.mode": "onlin"})
    with pytest.raises(attack.ConfigError, match="logger.mode"):
        attack.main(["--config", str(cfg)])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@needs_fmnist
def test_an_online_run_without_a_wandb_key_fails_before_any_run_dir(tmp_path, monkeypatch, request):
    """An online run with no API key failed at wandb.init with a UsageError traceback, after the models loaded and
    the run directory (summary.json 'failed') was made; a key (WANDB_API_KEY, not checked online) lets it pass."""
    import wandb

    wandb.teardown()  # an offline W&B set up by an earlier test in this process makes login skip the key lookup
    request.addfinalizer(wandb.teardown)  # and this test's login (a fake key) must not reach later tests' wandb.init
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    cfg = tiny_config(tmp_path, **{"logger.mode": "online"})
    parser = attack.build_parser()
    with pytest.raises(attack.ConfigError, match=r"logger.mode online needs a W&B API key.*wandb login.*offline"):
        attack.prepare(parser, parser.parse_args(["--config", str(cfg)]))
    assert not (tmp_path / "runs").exists()
    assert os.environ.get("WANDB_MODE") == "offline"  # the check's own unsetting is undone (tests/CI set it)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 3)  # malformed: W&B's AuthenticationError, not a traceback
    with pytest.raises(attack.ConfigError, match="needs a W&B API key.*40"):
        attack.check_wandb_login()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    attack.check_wandb_login()  # a key is there: no error (verify=False: no network)



# ------------------------------------------------------------------------------------------------ 2. offline resume
def test_resume_starts_a_fresh_wandb_run_offline_and_continues_the_same_one_online(tmp_path, stub_wandb_init):
    run_dir = tmp_path / "tiny-20260101-000000-abcdef"
    run_dir.mkdir()
    attack.make_logger(logger_cfg(mode="offline"), run_dir, {})
    attack.make_logger(logger_cfg(mode="offline"), run_dir, {})  # an offline --resume
    first, second = stub_wandb_init
    assert first.get("id") is None and second.get("id") is None  # W&B draws a fresh id each time
    assert second.get("resume") is None  # offline runs cannot resume
    assert first["group"] == second["group"] == run_dir.name
    ids = [i for i, _ in attack.wandb_attempts(run_dir)]
    assert len(ids) == 2 and ids[0] != ids[1]
    attack.make_logger(logger_cfg(mode="online"), run_dir, {})  # after offline attempts: a fresh id too
    attack.make_logger(logger_cfg(mode="online"), run_dir, {})  # online after online: the same W&B run
    third, fourth = stub_wandb_init[2:]
    assert third.get("id") is None
    assert fourth["id"] == attack.wandb_attempts(run_dir)[2][0] and fourth["resume"] == "allow"
    assert [m for _, m in attack.wandb_attempts(run_dir)] == ["offline", "offline", "online", "online"]
    # a group set by the config (sweep.py: the sweep's name) is kept
    attack.make_logger(logger_cfg(mode="offline", group="sweep"), run_dir, {})
    assert stub_wandb_init[-1]["group"] == "sweep"


@needs_fmnist
@pytest.mark.slow
def test_an_offline_resume_is_a_new_wandb_run_in_the_run_directory_group(tmp_path, monkeypatch):
    """Interrupted during its first user, then resumed, offline: two offline-run folders with different ids in one
    group (the run directory's name), the second recording the first's id; the first, with no finished user, still
    has its status. (Both had the same id before: W&B cannot resume offline, and syncing both clobbered one.)"""
    from tests.helpers import interrupt_user_at

    cfg = tiny_config(tmp_path, **{"image_log_every": 0})
    spy = interrupt_user_at(monkeypatch, "user_0000/", 1)
    with pytest.raises(SystemExit):
        attack.main(["--config", str(cfg)])
    (run_dir,) = (tmp_path / "runs").iterdir()
    spy.at = None
    assert attack.main(["--config", str(cfg), "--resume", str(run_dir)]) == run_dir
    folders = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(folders) == 2
    first, second = sorted(map(offline_run_info, folders), key=lambda i: i["status"] != "interrupted")
    assert first["id"] != second["id"]  # two W&B runs, which `wandb sync` uploads side by side
    assert first["group"] == second["group"] == run_dir.name
    assert first["status"] == "interrupted" and second["status"] == "finished"
    assert first["run_attempt"] == {"run_dir": run_dir.name, "attempt": 1, "previous_wandb_ids": []}
    assert second["run_attempt"] == {"run_dir": run_dir.name, "attempt": 2, "previous_wandb_ids": [first["id"]]}
    assert attack.wandb_attempts(run_dir) == [(first["id"], "offline"), (second["id"], "offline")]


# ------------------------------------------------------------------------------------------------ 3. results first
@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_a_user_whose_results_write_fails_is_counted_nowhere(tmp_path, monkeypatch, error):
    """The second user's results.csv write is interrupted (Ctrl-C at the rename) or fails: summary.json and the
    W&B table count the users results.csv has, not one more."""
    cfg = tiny_config(tmp_path, **{"image_log_every": 0})
    original, calls = attack.write_results, []

    def write_results(run_dir, rows, name="results.csv"):
        calls.append(len(rows))
        if name == "results.csv" and len(calls) == 2:
            raise error("stopped while writing results.csv")
        return original(run_dir, rows, name)

    monkeypatch.setattr(attack, "write_results", write_results)
    with pytest.raises(SystemExit if error is KeyboardInterrupt else OSError):
        attack.main(["--config", str(cfg)])
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["user"] for r in rows] == ["0"]
    assert summary["users"] == 1 and summary["status"] != "finished"
    (folder,) = run_dir.glob("wandb/offline-run-*")
    (table,) = (folder / "files" / "media" / "table" / "final").glob("results_*.table.json")
    assert len(json.loads(table.read_text())["data"]) == 1


# ------------------------------------------------------------------------------------------------ 4. status first
def test_log_final_sets_the_wandb_status_when_no_user_finished():
    class Logger:  # W&B-like: has log_table and a run summary
        def __init__(self):
            self.experiment = SimpleNamespace(summary={})
            self.logged = []

        def log_table(self, **kw):
            self.logged.append("table")

        def log_image(self, **kw):
            self.logged.append("image")

        def log_metrics(self, metrics, step=None):
            self.logged.append("metrics")

    log = Logger()
    attack.log_final(log, None, [], {}, "interrupted")
    assert log.experiment.summary == {"status": "interrupted"} and log.logged == []

    class Failing(Logger):  # a logger that fails on the table still has the status
        def log_table(self, **kw):
            raise RuntimeError("table refused")

    log = Failing()
    with pytest.raises(RuntimeError):
        attack.log_final(log, None, [{"user": 0}], {}, "failed: x")
    assert log.experiment.summary["status"] == "failed: x"


# ------------------------------------------------------------------------------------------------ 5. CSV config
def test_the_csv_logger_gets_the_config_as_hparams(tmp_path):
    config = {"attack": {"class_path": "UserLevelInversion", "init_args": {"steps": 4}}, "seed": 0}
    logger = attack.make_logger(logger_cfg(backend="csv"), tmp_path, config)
    hparams = Path(logger.log_dir) / "hparams.yaml"
    assert hparams.is_file() and hparams.parent.parent == tmp_path / "logs"
    assert yaml.safe_load(hparams.read_text()) == config


# ------------------------------------------------------------------------------------------------ 6. fsync
def test_atomic_writes_fsync_the_temporary_file_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", st.st_ino, "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "sub" / "results.csv"
    attack.atomic_write_text(target, "user\n0\n")
    assert target.read_text() == "user\n0\n" and sorted(p.name for p in target.parent.iterdir()) == ["results.csv"]
    kinds = [e[0] for e in events]
    assert "replace" in kinds and "fsync" in kinds[: kinds.index("replace")]
    k = kinds.index("replace")
    file_syncs = [e for e in events[:k] if e[0] == "fsync"]
    assert file_syncs[-1][1] == events[k][1]  # the temporary file's own descriptor, synced before its rename
    assert ("fsync", os.stat(target.parent).st_ino, "dir") in events[k + 1 :]  # the folder after (best effort)


def test_an_atomic_write_that_fails_to_sync_leaves_no_file(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="disk full"):
        attack.atomic_write_bytes(tmp_path / "x.bin", b"data")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ 7. CSV images
def test_the_csv_image_fallback_writes_a_temporary_file_and_renames_it(tmp_path, monkeypatch):
    from inversion.logging_utils import log_uint8_image

    logger = SimpleNamespace(log_dir=str(tmp_path / "logs"))  # no log_image, no experiment.add_image: CSV-like
    grid = np.zeros((6, 10, 3), np.uint8)
    grid[:, :5] = 255
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append((str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    log_uint8_image(logger, "user_0000/reconstruction", grid, step=5)
    out = tmp_path / "logs" / "images" / "user_0000_reconstruction_0000005.png"
    assert renames and renames[-1][1] == str(out) and Path(renames[-1][0]).parent == out.parent
    assert np.array_equal(np.asarray(Image.open(out)), grid)

    def interrupted(src, dst):  # a Ctrl-C at the rename: no PNG, whole or partial, under the real name
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        log_uint8_image(logger, "user_0000/reconstruction", grid, step=6)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


# ------------------------------------------------------------------------------------------------ 8. baselines
@pytest.mark.parametrize("cls_name", ["InvertingGradients", "DLG"])
def test_baselines_log_the_final_reconstruction_too(tmp_path, cls_name):
    from lightning import Trainer
    from lightning.pytorch.loggers import CSVLogger

    import lightning_modules.baselines as bl
    from inversion.scenario import make_server_view
    from tests.helpers import tiny_mlp

    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    view = make_server_view(tiny_mlp(), x, torch.tensor([1, 2]), num_classes=4)
    kwargs = {"restarts": 1} if cls_name == "InvertingGradients" else {"max_iter": 2}
    atk = getattr(bl, cls_name)(steps=5, seed=0, log_images_every=3, log_prefix="u/", **kwargs).bind(view)
    logger = CSVLogger(save_dir=str(tmp_path), name="logs")
    Trainer(max_steps=5, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", log_every_n_steps=1).fit(atk)
    names = sorted(p.name for p in (Path(logger.log_dir) / "images").glob("*.png"))
    # every 3rd step (0, 3) and the last (4), as the user-level attack logs
    assert names == [f"u_reconstruction_{s:07d}.png" for s in (0, 3, 4)]


def test_an_online_run_from_before_modes_were_recorded_is_continued_online(tmp_path, stub_wandb_init):
    """wandb_run_id.txt of runs made before the per-attempt modes held one id alone; an online --resume of such an
    online run started an unrelated W&B run (the missing mode never read as online). The run's config says."""
    run_dir = tmp_path / "tiny-20260101-000000-abcdef"
    run_dir.mkdir()
    (run_dir / attack.WANDB_ID_FILE).write_text("oldid123\n")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"logger": {"backend": "wandb", "mode": "online"}}))
    attack.make_logger(logger_cfg(mode="online"), run_dir, {})
    assert stub_wandb_init[-1]["id"] == "oldid123" and stub_wandb_init[-1]["resume"] == "allow"
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"logger": {"backend": "wandb", "mode": "offline"}}))
    (run_dir / attack.WANDB_ID_FILE).write_text("oldid456\n")
    attack.make_logger(logger_cfg(mode="online"), run_dir, {})  # that run was offline: W&B cannot continue it
    assert stub_wandb_init[-1].get("id") is None


def test_wandb_shared_mode_is_accepted(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "shared")
    assert attack.wandb_mode(SimpleNamespace(mode=None)) == "shared"
