#!/usr/bin/env python
"""Objective audit: which class does the user-level attack's data term prefer, before any optimisation?

The attack can only recover what its objective rewards. This script scores a pool of *real* labelled images under
the attack's data term for each user, exactly as ``attack.py`` would build it (same config and overrides: users,
victim, threat model and defenses, label inference, layer window, output matching), and reports the class of the
best-scoring real image. If that class is not the user's dominant class, no optimiser and no prior can make the
representative image show the user's class: the objective itself points elsewhere.

For each user u (the server side is ``UserLevelInversion.bind`` on the client's update, as in attack.py) and each
candidate image x (C, H, W) in [0, 1]: per-layer cosine distances d_l(x) between u's target gradient and the dummy
gradient grad_w CE(f_w(x), y_hat_u) (``UserLevelInversion.layer_distances``), combined per *mode*:

- ``uniform``: the mean over all layers (the attack with the window off);
- ``window@p``: the attack's sliding-window weights at progress p = s / S (``--audit.progress``; 0 = the start of the
  run, deepest layers, where the attack settles the image's semantics; 1 = the end), only when the window is on;

plus mu KL(pbar_u || softmax(f_w(x))) for each output-matching weight mu of ``--audit.output_weights`` (default: the
attack's ``output_weight``). Lower is better.
Pool: ``--audit.per_class`` images of every class from the Fashion-MNIST ``--audit.pool_split`` (default ``train``:
disjoint from the test-split users), drawn with ``--audit.pool_seed``. The user's own batch images are scored too.

Per user, mode and mu (``audit.csv``): the objective's class (that of the best pool image), its score, the best score in
the user's dominant class, the dominant class's rank among the 10 classes (by best score), the best score of the
user's own images, and the victim's mean probability of the dominant class on the user's batch (ground truth: an
evaluation-side column). ``summary.md`` / ``summary.json``: per mode and mu, the objective accuracy (objective class ==
dominant class) over users. This is an upper-bound-style diagnostic for the evaluator accuracy of the attack, not a
measurement of it. Cost: one batch-1 forward and backward of the victim per candidate (~0.03-0.08 s on a CPU core).

Usage:
    python scripts/objective_audit.py --config configs/attack/fashion_mnist.yaml --users.init_args.num_users 20 \\
        [--users.init_args.batch_size 100] [--victim.random_init true] [--audit.output_weights '[0, 1]'] \\
        [--audit.per_class 20] [--audit.progress '[0.0, 1.0]']

    python scripts/objective_audit.py collect runs/audit/audit_* --out reports/DIR   # one table over runs

Output: a new directory ``OUTPUT_ROOT/audit_<output.name>-<time>-<hex>/`` with config.yaml, audit.csv, summary.md,
summary.json (each written to a temporary file and renamed).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import attack as attack_main  # noqa: E402
from attack import ConfigError, atomic_write_text, client_update, load_victim, new_run_dir, write_results  # noqa: E402
from inversion.scenario import victim_num_outputs  # noqa: E402
from inversion.objectives import weighted_layer_mean  # noqa: E402


@dataclass
class AuditSpec:
    """The candidate pool and the scoring modes. per_class: real images per class (>= 1). pool_split: 'train' or
    'test' Fashion-MNIST split. pool_seed: seed of the draw. progress: window positions s / S in [0, 1] to score at
    (only used when the attack's window is on). output_weights: output-matching weights mu >= 0 to score with (one
    pass serves all; default: the attack's own ``output_weight``)."""

    per_class: int = 20
    pool_split: str = "train"
    pool_seed: int = 0
    progress: list[float] = field(default_factory=lambda: [0.0, 1.0])
    output_weights: Optional[list[float]] = None


def build_parser():
    """attack.py's parser plus the ``audit`` group, with this script's own name and description (attack.py's would
    describe the attack run)."""
    p = attack_main.build_parser()
    p.prog = "objective_audit.py"
    p.description = (
        __doc__.split("\n\n")[0].replace("\n", " ")
        + " Scores real Fashion-MNIST images under the data term of each user (no optimisation, no prior sampling) "
        "and writes audit.csv and summary.md/json to a new run directory. Takes attack.py's config and overrides "
        "(--config configs/attack/*.yaml, --users.*, --victim.*, --threat.*, --attack.*) plus the --audit.* options "
        "below. 'objective_audit.py collect RUN_DIR... --out DIR' tabulates finished audits."
    )
    p.add_class_arguments(AuditSpec, "audit")
    return p


def candidate_pool(source, spec: AuditSpec, exclude=()) -> tuple[torch.Tensor, torch.Tensor]:
    """``spec.per_class`` real images per class for the users' image shape: float32 (N, C, H, W) in [0, 1] and int64
    (N,) labels, class by class, none of the split's indices in ``exclude`` (the users' own images when the pool is
    their split: a user's private image among the candidates would score best for the wrong reason). Raises
    ConfigError for a source without class labels in a known pool."""
    from datamodules.fashion_mnist import load_split, to_tensor_images
    from datamodules.users import FashionMNISTUsers

    if not isinstance(source, FashionMNISTUsers):
        raise ConfigError(f"the objective audit needs labelled Fashion-MNIST users (users.class_path: "
                          f"datamodules.users.FashionMNISTUsers), got {type(source).__name__}")
    raw, labels = load_split(spec.pool_split, source.root)
    labels = torch.from_numpy(labels.astype("int64"))
    g = torch.Generator().manual_seed(spec.pool_seed)
    idx = []
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[torch.tensor(sorted(set(int(j) for j in exclude)), dtype=torch.long)] = False
    for c in range(source.num_classes):
        members = ((labels == c) & keep).nonzero().flatten()
        idx.append(members[torch.randperm(len(members), generator=g)[: spec.per_class]])
    idx = torch.cat(idx)
    x = to_tensor_images(raw[idx.numpy()], source.image_size, source.channels)
    return x, labels[idx]


def check(cfg, spec: AuditSpec, attack_cls) -> None:
    """Bad audit settings: one clear ConfigError before any work."""
    from lightning_modules.user_level_inversion import UserLevelInversion

    if not issubclass(attack_cls, UserLevelInversion):
        raise ConfigError(f"the objective audit scores the user-level attack's data term; attack.class_path is "
                          f"{cfg.attack.class_path}")
    if spec.per_class < 1:
        raise ConfigError(f"audit.per_class must be >= 1, got {spec.per_class}")
    if spec.pool_split not in ("train", "test"):
        raise ConfigError(f"audit.pool_split must be 'train' or 'test', got {spec.pool_split!r}")
    bad = [p for p in spec.progress if not 0.0 <= p <= 1.0]
    if bad:
        raise ConfigError(f"audit.progress values must lie in [0, 1], got {bad}")
    if spec.output_weights is not None and (not spec.output_weights or min(spec.output_weights) < 0):
        raise ConfigError(f"audit.output_weights must be a non-empty list of values >= 0, got {spec.output_weights}")


def scores_per_mode(
    attack, images: torch.Tensor, progress: list[float], output_weights: list[float]
) -> dict[tuple[str, float], torch.Tensor]:
    """Data-term scores float32 (N,) of ``images`` (N, C, H, W) in [0, 1] for the bound one-user ``attack``, per
    (mode, mu): mode 'uniform' or 'window@p' (window modes only when the attack's window is on), mu each of
    ``output_weights`` (mu > 0 needs the attack bound with output_weight > 0). Lower is better."""
    modes: dict[str, Optional[torch.Tensor]] = {"uniform": None}
    if attack.hparams.use_window:
        for p in progress:
            modes[f"window@{p:g}"] = attack.layer_weights(p)[0]
    out = {(m, mu): [] for m in modes for mu in output_weights}
    for x in images:
        d, logits = attack.layer_distances(x.unsqueeze(0))
        kl = float(attack.output_loss(x.unsqueeze(0), logits)[0]) if max(output_weights) > 0 else 0.0
        for m, w in modes.items():
            s = float(weighted_layer_mean(d, w)) * attack.matching_scale(w)  # as the attack: 'mean' or 'sum'
            for mu in output_weights:
                out[(m, mu)].append(s + mu * kl)
    return {k: torch.tensor(v) for k, v in out.items()}


def audit(cfg) -> Path:
    """Run the audit for a parsed config; returns the new run directory."""
    from lightning import seed_everything

    seed_everything(cfg.seed, verbose=False)
    parser = build_parser()
    init = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
    spec: AuditSpec = init.audit
    source = init.users
    source.check()
    attack_cls = attack_main.resolve_attack_class(cfg.attack.class_path)
    check(cfg, spec, attack_cls)
    victim, victim_cfg = load_victim(init.victim)
    attack_main.validate(cfg, source, victim_cfg)
    kwargs = dict(cfg.attack.init_args or {})
    kwargs.update(use_prior=False, final_denoise=False, users_per_step=1)  # the data term needs no prior
    mus = [float(kwargs.get("output_weight", 0) or 0)] if spec.output_weights is None else [float(m) for m in spec.output_weights]
    kwargs["output_weight"] = max(mus)  # bind recovers pbar when any mu > 0; the scores apply each mu themselves
    try:  # validates the attack's hyper-parameters, named as attack.py names them
        probe = attack_cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"attack.init_args ({attack_cls.__name__}): {exc}") from None
    try:  # the label strategy against the threat model, as attack.py checks it: bind would fail only per user,
        # after the run directory is made
        probe.check_threat(getattr(source, "batch_size", None), bool(cfg.threat.reveal_batch_size),
                           bool(cfg.threat.known_labels))
    except ValueError as exc:
        raise ConfigError(f"attack vs threat: {exc}") from None
    users = source.users()
    # Fashion-MNIST users come from the test split: a test pool leaves their images out
    own = [j for u in users for j in u.meta.get("indices", [])] if spec.pool_split == "test" else []
    pool_x, pool_y = candidate_pool(source, spec, exclude=own)
    run_dir = new_run_dir(init.output.root, f"audit_{init.output.name}")
    atomic_write_text(run_dir / "config.yaml", attack_main.dump_config(parser, cfg))
    print(f"[audit] {run_dir}: {len(users)} users, B = {source.batch_size}, pool {len(pool_x)} images "
          f"({spec.per_class} per class, {spec.pool_split} split)", flush=True)
    K = source.num_classes
    victim_classes = victim_num_outputs(victim, source.image_shape)  # the server's label space, once
    rows = []
    t0 = time.time()
    for i, user in enumerate(users):
        view = client_update(victim, user, init.threat, victim_classes, user_index=i)
        att = attack_cls(**kwargs).bind(view, None)
        dominant = user.dominant_class
        with torch.no_grad():
            p_dom = float(torch.softmax(victim(user.images), dim=1)[:, dominant].mean())
        pool_s = scores_per_mode(att, pool_x, spec.progress, mus)
        own_s = scores_per_mode(att, user.images, spec.progress, mus)
        for (mode, mu), s in pool_s.items():
            best_per_class = torch.stack([s[pool_y == c].min() for c in range(K)])
            obj_class = int(best_per_class.argmin())
            rank = int((best_per_class < best_per_class[dominant]).sum()) + 1
            rows.append({
                "user": user.user_id, "B": user.batch_size, "mode": mode, "output_weight": mu, "dominant_class": dominant,
                "inferred_label": int(att.labels.dominant), "objective_class": obj_class,
                "objective_correct": int(obj_class == dominant), "dominant_rank": rank,
                "best_score": round(float(best_per_class.min()), 5),
                "best_score_dominant": round(float(best_per_class[dominant]), 5),
                "own_best_score": round(float(own_s[(mode, mu)].min()), 5),
                "victim_p_dominant": round(p_dom, 4),
            })
        first = rows[-len(pool_s)]  # this user's first (mode, mu): uniform with mus[0]
        print(f"[audit] user {i}: class {dominant}, objective class (uniform) {first['objective_class']} "
              f"({time.time() - t0:.0f} s)", flush=True)
    write_results(run_dir, rows, "audit.csv")
    summary = summarize(rows)
    summary.update(users=len(users), B=source.batch_size, per_class=spec.per_class, pool_split=spec.pool_split,
                   random_init=bool(init.victim.random_init), output_weights=mus,
                   seconds=round(time.time() - t0, 1))
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(run_dir / "summary.md", summary_markdown(summary))
    print(summary_markdown(summary), flush=True)
    return run_dir


def summarize(rows: list[dict]) -> dict:
    """Per (mode, output weight): users, objective accuracy (mean of objective_correct), mean dominant rank, mean
    victim p(dominant); keyed ``"<mode> mu=<w>"``."""
    modes: dict[str, dict] = {}
    for m, mu in dict.fromkeys((r["mode"], r["output_weight"]) for r in rows):
        rs = [r for r in rows if r["mode"] == m and r["output_weight"] == mu]
        n = len(rs)
        modes[f"{m} mu={mu:g}"] = {
            "users": n,
            "objective_correct": sum(r["objective_correct"] for r in rs),
            "objective_accuracy": round(sum(r["objective_correct"] for r in rs) / n, 4),
            "mean_dominant_rank": round(sum(r["dominant_rank"] for r in rs) / n, 3),
            "mean_victim_p_dominant": round(sum(r["victim_p_dominant"] for r in rs) / n, 4),
        }
    return {"modes": modes}


def summary_markdown(summary: dict) -> str:
    lines = [
        "# Objective audit",
        "",
        f"{summary.get('users', '?')} users, B = {summary.get('B', '?')}, victim "
        f"{'random' if summary.get('random_init') else 'trained'}, "
        f"pool {summary.get('per_class', '?')} {summary.get('pool_split', '?')} images per class.",
        "Objective accuracy: the best-scoring real pool image belongs to the user's dominant class.",
        "",
        "| mode, output weight | users | objective accuracy | mean rank of the dominant class | victim p(dominant) |",
        "|---|---|---|---|---|",
    ]
    for m, s in summary["modes"].items():
        lines.append(f"| {m} | {s['users']} | {s['objective_correct']}/{s['users']} ({s['objective_accuracy']:.2f}) | "
                     f"{s['mean_dominant_rank']:.2f} | {s['mean_victim_p_dominant']:.3f} |")
    return "\n".join(lines) + "\n"


def collect(run_dirs: list[str], out: str) -> Path:
    """One table over several audit run directories (their summary.json): a row per run (B, victim, run directory
    name), a column per (mode, mu) with correct/users. Writes ``out/objective_audit.md`` and
    ``out/objective_audit.csv`` (atomically, never over existing files); returns the Markdown path. Raises
    FileNotFoundError for a directory without summary.json, ValueError for one whose summary.json is not an audit's
    (an attack.py run's), FileExistsError when ``out`` already holds the table."""
    out_dir = Path(out)
    taken = [p for p in (out_dir / "objective_audit.csv", out_dir / "objective_audit.md") if p.exists()]
    if taken:
        raise FileExistsError(f"{taken[0]} exists: results are never overwritten; give another --out")
    summaries = []
    for d in run_dirs:
        f = Path(d) / "summary.json"
        if not f.is_file():
            raise FileNotFoundError(f"{d} has no summary.json: is it an objective-audit run directory?")
        summary = json.loads(f.read_text())
        lacking = [k for k in ("modes", "random_init", "B", "users") if k not in summary]
        if lacking:  # e.g. an attack.py run directory picked up by a glob: was a KeyError traceback
            raise ValueError(f"{d}/summary.json lacks {', '.join(lacking)}: {d} is not an objective-audit run "
                             "directory (an attack.py run?); give the folders `objective_audit.py run` wrote")
        summaries.append({**summary, "run": Path(d).name})
    summaries.sort(key=lambda s: (bool(s["random_init"]), s["B"], s["run"]))
    cols = list(dict.fromkeys(k for s in summaries for k in s["modes"]))
    header = ["B", "victim", "run", "users"] + cols  # run: reruns and other settings of one (B, victim) stay apart
    table = []
    for s in summaries:
        row = [str(s["B"]), "random" if s["random_init"] else "trained", s["run"], str(s["users"])]
        for c in cols:
            m = s["modes"].get(c)
            row.append(f"{m['objective_correct']}/{m['users']}" if m else "")
        table.append(row)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in table]
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *table])
    atomic_write_text(out_dir / "objective_audit.csv", buf.getvalue())
    atomic_write_text(out_dir / "objective_audit.md", "\n".join(md) + "\n")
    return out_dir / "objective_audit.md"


def main(argv: Optional[list[str]] = None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["collect"]:
        import argparse

        ap = argparse.ArgumentParser(prog="objective_audit.py collect", description=collect.__doc__.split("\n")[0])
        ap.add_argument("run_dirs", nargs="+")
        ap.add_argument("--out", required=True)
        a = ap.parse_args(argv[1:])
        path = collect(a.run_dirs, a.out)
        print(path.read_text(), end="")
        return path
    parser = build_parser()
    return audit(parser.parse_args(argv))


if __name__ == "__main__":
    from inversion.cli import run_main

    run_main(main, "objective_audit.py")
