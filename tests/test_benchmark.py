"""scripts/benchmark.py --tiny runs and reports every section (no timing assertions: the numbers are machine-bound)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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
                 "one-at-a-time", "batched U=4", "best speedup", "[3] achieved FLOP/s", "[4] peak memory"):
        assert line in text, line
    saved = json.loads(out.read_text())
    assert saved.keys() == report.keys()
    for key in ("machine", "config", "user_level_step", "user_level_ratio", "inverting_gradients_step",
                "users_per_hour", "flops", "peak_memory_mib", "wall_s"):
        assert key in saved, key
    assert set(saved["user_level_step"]) == set(saved["inverting_gradients_step"]) == {"2", "5", "10"}
    assert set(saved["users_per_hour"]["batched"]) == {"1", "2", "4"}
    for v in saved["user_level_step"].values():
        assert v["s_per_step"] > 0 and v["target_s"] > 0 and v["peak_mib"] > 0
    assert saved["user_level_ratio"]["ratio"] > 0 and isinstance(saved["user_level_ratio"]["met"], bool)
    u = saved["users_per_hour"]
    assert u["one_at_a_time"]["users_per_hour"] > 0 and u["best_speedup"] > 0
    assert saved["flops"]["peak_flops"] > 0
    assert saved["flops"]["one_at_a_time"]["flops_per_step"] > 0  # FlopCounterMode works with create_graph
    assert saved["flops"]["batched_U4"]["flops_per_step"] > 0  # ... and under vmap
