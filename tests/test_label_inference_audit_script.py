"""scripts/label_inference_audit.py on a fake data set and tiny victims (no Fashion-MNIST, no checkpoints)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_audit():
    path = ROOT / "scripts" / "label_inference_audit.py"
    spec = importlib.util.spec_from_file_location("label_inference_audit_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_both_victims_are_scored_on_the_same_batches(monkeypatch, capsys):
    """Review D #6: one numpy generator was shared by the victim loop, so the random-init victim was scored on the
    draws that followed the trained victim's: the trained-vs-random rows were not paired. Every batch the client's
    gradient is computed on (images and labels) is recorded per victim; the two sequences must be identical."""
    audit = load_audit()
    per_class = 12
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(10 * per_class, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
    monkeypatch.setattr(audit, "load_split", lambda split: (images, labels))
    monkeypatch.setattr(audit, "CELLS", ((10, 0.5), (6, 100.0)))

    def tiny_victim(spec):
        torch.manual_seed(int(spec.random_init))  # two different victims
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 10))
        model.random_init = spec.random_init
        return model, None

    batches: dict[bool, list] = {}
    real_gradient = audit.fedsgd_gradient

    def recording_gradient(victim, x, y):
        batches.setdefault(victim.random_init, []).append((x.clone(), y.clone()))
        return real_gradient(victim, x, y)

    monkeypatch.setattr(audit, "load_victim", tiny_victim)
    monkeypatch.setattr(audit, "fedsgd_gradient", recording_gradient)
    audit.main(["--trials", "3", "--seed", "0"])
    out = capsys.readouterr().out
    assert "| trained | 10 | 0.5 | bias_corrected |" in out and "| random | 6 | 100 | breaching_greedy |" in out
    assert set(batches) == {False, True}  # the trained victim, then the random one
    trained, random = batches[False], batches[True]
    assert len(trained) == len(random) == 2 * 3  # cells x trials
    for (x1, y1), (x2, y2) in zip(trained, random):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)
    assert len({tuple(y.tolist()) for _, y in trained}) > 1  # the trials do differ among themselves
