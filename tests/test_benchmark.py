"""scripts/benchmark.py --tiny runs and reports every section (no timing assertions: the numbers are machine-bound)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_tiny_report(tmp_path, capsys):
    bench = load_benchmark()
    out = tmp_path / "bench.json"
    report = bench.main(["--tiny", "--json", str(out)])
    text = capsys.readouterr().out
    for line in ("BENCHMARK", "[1] seconds per step", "user-level t(B=10)/t(B=2)", "[2] users per hour",
                 "UserLevelInversion through a Lightning Trainer", "one-at-a-time", "batched U=4",
                 "one-at-a-time through the Trainer / the bare step", "best speedup", "[3] achieved FLOP/s",
                 "[4] peak memory"):
        assert line in text, line
    saved = json.loads(out.read_text())
    assert saved.keys() == report.keys()
    for key in ("machine", "config", "user_level_step", "user_level_ratio", "inverting_gradients_step",
                "users_per_hour", "flops", "peak_memory_mib", "wall_s"):
        assert key in saved, key
    assert set(saved["user_level_step"]) == set(saved["inverting_gradients_step"]) == {"2", "5", "10"}
    for v in saved["user_level_step"].values():
        assert v["s_per_step"] > 0 and v["target_s"] > 0 and v["peak_mib"] is None  # CPU: no per-section peak
    assert saved["user_level_ratio"]["ratio"] > 0 and isinstance(saved["user_level_ratio"]["met"], bool)

    # [2]: the product path (UserLevelInversion + Trainer) at U = 1, 2, 4; U = 1 is the one-at-a-time baseline
    u = saved["users_per_hour"]
    attack_steps = saved["config"]["attack_steps"]
    assert u["B"] == 2
    s = u["attack_settings"]  # configs/attack/fashion_mnist.yaml's attack, final denoising off, steps = attack_steps
    assert s["use_prior"] and s["use_clipping"] and s["kappa"] == 10.0 and s["use_window"] and s["anneal_t"]
    assert not s["final_denoise"] and s["steps"] == attack_steps
    assert set(u["batched"]) == {"1", "2", "4"}
    one = u["one_at_a_time"]
    assert one["U"] == 1 and one["s_per_step"] > 0
    assert one["s_per_step"] == u["batched"]["1"]["s_per_step"]  # the same fit, reported once per view
    assert one["user_steps_per_s"] == pytest.approx(1 / one["s_per_step"])
    assert one["users_per_hour"] == pytest.approx(3600 / (one["s_per_step"] * attack_steps))
    assert one["trainer_over_hand_step"] == pytest.approx(one["s_per_step"] / saved["user_level_step"]["2"]["s_per_step"])
    for U, v in u["batched"].items():
        U = int(U)
        assert v["s_per_step"] > 0 and v["s_per_step_mean"] > 0 and v["fit_s"] > 0 and v["peak_mib"] is None
        assert v["user_steps_per_s"] == pytest.approx(U / v["s_per_step"])
        assert v["users_per_hour"] == pytest.approx(3600 * U / (v["s_per_step"] * attack_steps))
        assert v["speedup_vs_one_at_a_time"] == pytest.approx(v["users_per_hour"] / one["users_per_hour"])
        assert v["flops_per_step"] > 0  # FlopCounterMode around one training_step (create_graph at U = 1, vmap at U > 1)
    assert u["best_U"] in (1, 2, 4)
    assert u["best_speedup"] == max(v["speedup_vs_one_at_a_time"] for v in u["batched"].values())
    assert u["met"] == (u["best_speedup"] >= u["target_speedup"])

    f = saved["flops"]
    assert f["peak_flops"] > 0
    assert saved["peak_memory_mib"]["overall"] > 0 and "| -" not in text and "  -  " in text  # per-B peaks shown as '-'
    with pytest.raises(SystemExit):  # results are never overwritten
        bench.main(["--tiny", "--json", str(out)])
    for bad in (["--batch-sizes", "10,"], ["--device", "foo"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert f["one_at_a_time"]["flops_per_step"] == u["batched"]["1"]["flops_per_step"] > 0
    assert f["batched_U4"]["flops_per_step"] == u["batched"]["4"]["flops_per_step"] > f["one_at_a_time"]["flops_per_step"]
    assert f["batched_U4"]["flops_per_s"] == pytest.approx(f["batched_U4"]["flops_per_step"] / u["batched"]["4"]["s_per_step"])


def test_benchmark_baseline_without_u1(tmp_path):
    """U = 1 is measured for the speedup even when --users leaves it out (and not reported as a batched row)."""
    bench = load_benchmark()
    report = bench.main(["--tiny", "--users", "2", "--batch-sizes", "2", "--steps", "1"])
    u = report["users_per_hour"]
    assert set(u["batched"]) == {"2"}
    assert u["one_at_a_time"]["s_per_step"] > 0
    v = u["batched"]["2"]
    assert v["speedup_vs_one_at_a_time"] == pytest.approx(v["user_steps_per_s"] * u["one_at_a_time"]["s_per_step"])
    assert set(report["flops"]) >= {"one_at_a_time", "batched_U2"}


def test_check_checkpoints_refuses_bad_input_before_any_work(tmp_path, capsys):
    """--n-test 0 divided by zero after loading everything, a negative one silently used 9,995 images; --json and
    --grid overwrote existing files; a missing folder gave a traceback."""
    spec = importlib.util.spec_from_file_location("check_checkpoints", ROOT / "scripts" / "check_checkpoints.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "old.json").write_text("{}")
    cases = [(["--n-test", "0"], "--n-test must be in 1..10000"), (["--n-test", "-5"], "--n-test must be in 1..10000"),
             (["--json", str(tmp_path / "old.json")], "exists: results are never overwritten"),
             (["--checkpoints", str(tmp_path / "none")], "victim_resnet18 not found")]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as exc:
            mod.main(argv)
        assert exc.value.code == 2 and msg in capsys.readouterr().err, argv
    assert (tmp_path / "old.json").read_text() == "{}"


def _live_tensor_bytes(*_args) -> int:
    """A fake CUDA allocator counter: bytes of the storages of every live plain tensor and parameter (the callers,
    reset_peak, collect cycles first)."""
    import gc

    import torch

    kinds = (torch.Tensor, torch.nn.Parameter)
    storages = {}
    for obj in gc.get_objects():
        if type(obj) in kinds:
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def test_benchmark_peak_memory_is_each_measurements_own(monkeypatch):
    """Review D #3: every 'peak MiB' was max_memory_allocated since a reset, i.e. it included all memory still held
    from earlier measurements (the user-level steps of earlier B, every B's target gradient), so it grew with a B's
    position in the list. With a fake allocator counter (live tensor bytes) the figure of each B and of the U = 1 fit
    must not depend on the order of --batch-sizes."""
    import torch

    bench = load_benchmark()
    monkeypatch.setattr(bench, "tracks_memory", lambda device: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", _live_tensor_bytes)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", _live_tensor_bytes)  # the peak: what is live at its end
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a: None)
    runs = [bench.main(["--tiny", "--batch-sizes", order, "--users", "1", "--steps", "1"]) for order in ("2,5", "5,2")]
    for r in runs:
        for section in ("user_level_step", "inverting_gradients_step"):
            assert all(v["peak_mib"] > 0 for v in r[section].values()), r[section]
    a, b = runs
    for B in ("2", "5"):
        assert a["user_level_step"][B]["peak_mib"] == pytest.approx(b["user_level_step"][B]["peak_mib"], abs=1e-3), B
        assert a["inverting_gradients_step"][B]["peak_mib"] == pytest.approx(
            b["inverting_gradients_step"][B]["peak_mib"], abs=1e-3), B
    assert a["users_per_hour"]["one_at_a_time"]["peak_mib"] == pytest.approx(
        b["users_per_hour"]["one_at_a_time"]["peak_mib"], abs=1e-3)
    pm = a["peak_memory_mib"]
    assert pm["models"] > 0 and pm["target_gradient_per_user"] > 0 and pm["overall"] > pm["models"]


def test_benchmark_target_time_excludes_start_up_cost(monkeypatch):
    """Review D #4: the first B's "target grad s" timed the process's first victim forward/backward, start-up cost
    included (whichever B ran first was slowest). A fake clock jumps 1000 s inside the first make_server_view call,
    standing in for the one-off start-up cost: no B's target time may contain it, so an untimed warm-up call must come
    first. (No timing assertion: the jump is 1000 s, a real tiny target takes well under one.)"""
    import time

    bench = load_benchmark()
    offset = [0.0]
    real_view = bench.make_server_view

    def view_with_start_up_cost(*args, **kwargs):
        if offset[0] == 0.0:
            offset[0] = 1000.0  # the clock jumps during the first call only
        return real_view(*args, **kwargs)

    fake_time = type("FakeTime", (), {"perf_counter": staticmethod(lambda: time.perf_counter() + offset[0])})
    monkeypatch.setattr(bench, "time", fake_time)
    monkeypatch.setattr(bench, "make_server_view", view_with_start_up_cost)
    report = bench.main(["--tiny", "--batch-sizes", "5,2", "--users", "1", "--steps", "1"])
    assert offset[0] == 1000.0
    for B, v in report["user_level_step"].items():
        assert 0 < v["target_s"] < 1000.0, (B, v["target_s"])


def test_peak_flops_uses_the_precision_of_the_measured_steps(monkeypatch):
    """Review D #5: on CUDA the peak was an 8192^2 bf16 matmul while the attack runs in float32 with TF32 off
    (32-true), so "% of peak" came out ~15x too small on an H200. The CUDA peak is now measured by a float32 matmul with
    TF32 off (flag restored after), and the label says so. Run on the CPU with a fake CUDA device: the matrices are
    made small on the CPU and the device sync is skipped; the dtype and TF32 flag seen by the matmul are recorded."""
    import torch

    bench = load_benchmark()
    seen = {}
    real_randn = torch.randn

    def small_randn(*size, device=None, dtype=None, **kw):
        seen["dtype"], seen["device"] = dtype, torch.device(device)
        return real_randn(4, 4, dtype=dtype)

    real_time_steps = bench.time_steps

    def recording_time_steps(fn, steps, device, warmup=1):
        seen["tf32"] = torch.backends.cuda.matmul.allow_tf32
        return real_time_steps(fn, steps, torch.device("cpu"), warmup)

    monkeypatch.setattr(torch, "randn", small_randn)
    monkeypatch.setattr(bench, "time_steps", recording_time_steps)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        peak, how = bench.peak_flops(torch.device("cuda"), False)
        assert torch.backends.cuda.matmul.allow_tf32 is True  # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert seen["device"].type == "cuda" and seen["dtype"] == torch.float32 and seen["tf32"] is False, seen
    assert peak > 0 and "8192x8192 float32, TF32 off matmul" in how and "32-true" in how, how
    assert bench.peak_precision_label(torch.device("cuda"), "32-true") == "float32, TF32 off"
    assert bench.peak_precision_label(torch.device("cpu"), "32-true") == "float32"


def test_check_checkpoints_reads_the_test_split_from_data_root(tmp_path):
    """--data-root: the test split from a given folder (a device machine has no /usr/share/datasets and no internet);
    here a fake split of random images, on which the shipped victim scores near chance (it scores ~93% on the real
    one)."""
    from tests.helpers import write_fake_fmnist

    spec = importlib.util.spec_from_file_location("check_checkpoints", ROOT / "scripts" / "check_checkpoints.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "fm").mkdir()
    data = write_fake_fmnist(tmp_path / "fm")
    mod.main(["--data-root", str(data), "--n-test", "50", "--n-samples", "2", "--ddim-steps", "2",
              "--json", str(tmp_path / "r.json")])
    text = (tmp_path / "r.json").read_text()
    report = json.loads(text)
    accs = [v["test_accuracy"] for v in report.values() if isinstance(v, dict) and "test_accuracy" in v]
    assert len(accs) == 2 and max(accs) < 0.5, text[:500]
