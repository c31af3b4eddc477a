#!/usr/bin/env python
"""Refinish a finished attack.py run: rerun only the final stage (final denoising, final candidate selection) on its
saved representative images, evaluate, and write a NEW run directory. No optimisation step is repeated.

The optimisation does not depend on the final-stage settings, so refinishing a run with other settings gives the
results the attack would have given with them, at the cost of the final stage alone (seconds per user instead of
minutes or hours). Use it to compare final stages on one set of optimised images: one denoising vs selection among
N, t_final, the selection's output term, DDPM vs DDIM.

    python scripts/refinish.py RUN_DIR [--attack.init_args.final_candidates 8] [--attack.init_args.t_final 400]
        [--attack.init_args.selection_output_weight 1.0] [--attack.init_args.denoise_method ddim]
        [--attack.init_args.denoise_steps 10] [--attack.init_args.final_denoise false]
        [--evaluation.lpips false] [--output.name NAME] [--output.root ROOT] [--logger.backend csv]
    python scripts/refinish.py RUN_DIR --config configs/extension/final_selection.yaml   # an overlay works too

What it reads from RUN_DIR: ``config.yaml`` (the run's resolved config, overridden by the arguments after RUN_DIR,
exactly as attack.py takes them), ``results.csv`` (the finished users: an interrupted run is refinished for its
finished users), and each user's ``users/user_XXXX/raw.pt`` (float32, written by attack.py; exact) or, for runs
written before raw.pt existed, ``raw.png`` (uint8: the image is quantised to 1/255, a difference far below the
final stage's noise, but not bit-exact; the ``refinish_source`` column says which).

The server's side is rebuilt as attack.py builds it: the client's update of each user (same config, same seeds,
defenses included), ``UserLevelInversion.bind``, then :meth:`UserLevelInversion.final_stage` on the saved image with
the user's seed, so ``final_candidates`` N > 1 draws the same candidates (candidate 0 = the single denoising) and
picks by the same score. Ground truth enters only the evaluation (attack.py's ``evaluate``).

Output: ``<output.root>/<output.name>-<time>-<hex>/`` (default name: the run's name + ``_refinished``) with
config.yaml (the merged config), results.csv (attack.py's columns; ``steps``, ``seconds``, ``seconds_per_step``
are the original run's optimisation; plus ``final_candidate``, ``refinish_seconds``, ``refinish_source``,
``refinished_from``), summary.json, attack_seed.txt (the attack's effective seed, as attack.py writes it, so the new
directory can be refinished again under ``--seed``), defense_seeds.txt, models.json (the fingerprints of the model
files this refinish used, as attack.py records them, so the new directory can be checked and refinished again; not
written when RUN_DIR has none: the models its images came from are unknown) and
per-user images including raw.pt; every file written to a temporary file and renamed.

Raises (as one ConfigError before any output): RUN_DIR is not a finished attack.py run of the user-level attack; an
argument changes anything but the final stage, evaluation, output, logger or trainer settings (the saved images
would not be the ones that config optimises); a final-stage setting the attack or the prior rejects (e.g. t_final
>= T); the run used a stochastic defense without a seed (its noise cannot be redrawn); the victim or prior files
changed since the run (retrained or replaced in place: RUN_DIR's ``models.json`` records other fingerprints than the
files hash to now, compared as ``attack.py --resume`` compares them, but without the evaluator, which the
``evaluation`` group may change here; a run directory without ``models.json``, made before it existed, is not
checked and a warning says so); the run's users do not match its config any more (the data changed; checked on the
labels of every user and on the first user's rebuilt label inference; a later user whose rebuilt label inference
differs stops the refinish at that user, as 'failed: ...' in its summary.json, with the users before it kept).
A run that did not finish (interrupted, diverged, hard-killed: its summary.json does not say 'finished') is refinished
for the users it finished, and the new summary.json says 'incomplete: ...' (exit status 1), so the report and sweeps
do not count it as a whole run.

Exactness: the candidates' noise comes from torch generators on the final stage's device (CUDA when available and
trainer.accelerator allows it, else the CPU). A run made on the other device type gets statistically equivalent,
not identical, candidates; refinish warns (results.csv's ``device`` column says where each ran).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import attack as attack_main  # noqa: E402
from attack import ConfigError  # noqa: E402
from inversion.fsutils import run_status  # noqa: E402

#: attack.init_args keys a refinish may change: the final stage only.
FINAL_STAGE_KEYS = ("final_denoise", "final_candidates", "t_final", "selection_output_weight", "denoise_method",
                    "denoise_steps")
#: top-level config groups and keys a refinish may change freely (they do not touch the optimised images).
FREE_GROUPS = ("evaluation", "output", "logger", "trainer", "resume", "checkpoint_every", "image_log_every",
               "config", "__path__")


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def check_changes(old: dict, new: dict) -> list[str]:
    """The final-stage keys that change; raises ConfigError naming any other changed key."""
    allowed = {f"attack.init_args.{k}" for k in FINAL_STAGE_KEYS}
    changed = changed_keys(old, new)
    bad = [k for k in changed if k not in allowed and k.split(".")[0] not in FREE_GROUPS]
    if bad:
        raise ConfigError(
            f"refinish reruns only the final stage on the run's optimised images; these settings would change the "
            f"optimisation or the users: {bad}. Allowed: attack.init_args.{{{', '.join(FINAL_STAGE_KEYS)}}}, and the "
            f"{', '.join(FREE_GROUPS[:4])} groups. Run attack.py for a new optimisation."
        )
    return [k for k in changed if k in allowed]


def load_raw(udir: Path, image_shape: tuple[int, int, int]) -> tuple[torch.Tensor, str]:
    """A user's saved representative image, float32 (1, C, H, W) in [0, 1], and its source ('raw.pt' or
    'raw.png (uint8)'). Raises ConfigError when neither file is there or the shape is not (1, *image_shape)."""
    if (udir / "raw.pt").is_file():
        try:
            x, source = torch.load(udir / "raw.pt", map_location="cpu", weights_only=True).float(), "raw.pt"
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear error
            raise ConfigError(f"{udir / 'raw.pt'} cannot be read ({type(exc).__name__}: {exc}); delete it to use "
                              "raw.png (uint8) instead") from None
    elif (udir / "raw.png").is_file():
        import numpy as np
        from PIL import Image

        img = Image.open(udir / "raw.png").convert("L" if image_shape[0] == 1 else "RGB")
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        x = (arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1))[None].contiguous()
        source = "raw.png (uint8)"
    else:
        raise ConfigError(f"{udir}: no raw.pt or raw.png (the user's representative image); was this user finished?")
    if tuple(x.shape) != (1, *image_shape):
        raise ConfigError(f"{udir}: the saved image has shape {tuple(x.shape)}, the config's users {(1, *image_shape)}")
    return x.clamp(0, 1), source


#: model roles of models.json a refinish does not compare with the run's: the evaluation group may change freely
UNCHECKED_MODELS = ("evaluator",)


def check_models(run_dir: Path, now: dict[str, str]) -> bool:
    """Refuse to refinish ``run_dir`` when a model it was attacked with, that this refinish uses too, has changed on
    disk since: its ``models.json`` against ``now`` (:func:`attack.model_fingerprints` of this refinish's config),
    as ``attack.py --resume`` compares them (:func:`attack.check_model_fingerprints`), but only for the roles both
    record (a prior the refinish does not use, or the run did not use, is no mismatch) and without
    :data:`UNCHECKED_MODELS` (another evaluator is a refinish setting). A run directory made before ``models.json``
    existed is not checked: a warning on stderr says so.

    Returns:
        True when the run's models.json was compared; False when it has none (then the refinished directory gets
        none either: the models its raw images came from are unknown, so they cannot be vouched for later).

    Raises:
        ConfigError: naming the changed model(s) and what to do.
    """
    f = run_dir / attack_main.MODELS_FILE
    if not f.is_file():
        print(f"[refinish] warning: {run_dir} has no {attack_main.MODELS_FILE} (made before attack.py recorded its "
              f"model files): cannot check that the victim and prior are still the files the run used; a victim or "
              f"prior retrained since would be used silently; the refinished directory gets no "
              f"{attack_main.MODELS_FILE} either", file=sys.stderr, flush=True)
        return False
    try:
        then = json.loads(f.read_text())
        if not isinstance(then, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise ConfigError(f"refinish {run_dir}: its {attack_main.MODELS_FILE} is unreadable ({exc}), so the model "
                          "files the run used are unknown; run attack.py for a new run") from None
    changed = sorted(k for k in set(then) & set(now) if k not in UNCHECKED_MODELS and then[k] != now[k])
    if changed:
        raise ConfigError(f"refinish {run_dir}: the {', '.join(changed)} model files changed since this run was made "
                          f"(retrained or replaced in place; its {attack_main.MODELS_FILE} records their SHA-256), so "
                          "its saved images would be finished (and the server's view rebuilt) with other models than "
                          "the attack used; put the original files back, or run attack.py for a new run")
    return True


def refinish(run_dir: Path, overrides: list[str]) -> Path:
    """Refinish ``run_dir`` with the config overrides ``overrides`` (attack.py argument syntax); returns the new
    run directory. See the module docstring. Before any output the model files are checked against the run's
    ``models.json`` (:func:`check_models`: a changed victim or prior is refused; no ``models.json``: a warning), and
    the new directory gets a ``models.json`` of the files this refinish used (only when the run had one)."""
    from lightning_modules.user_level_inversion import UserLevelInversion

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "results.csv").is_file():
        raise ConfigError(f"{run_dir}: not a run directory of attack.py with finished users (needs config.yaml and "
                          "results.csv)")
    parser = attack_main.build_parser()
    old_cfg = attack_main.parse_run_config(parser, run_dir, "refinish")
    if not issubclass(attack_main.resolve_attack_class(old_cfg.attack.class_path), UserLevelInversion):
        # before the overrides are parsed: a baseline does not take final-stage options ('final_candidates' is not
        # accepted), which named the option rather than the run
        raise ConfigError(f"refinish reruns the user-level attack's final stage; {run_dir} ran "
                          f"{old_cfg.attack.class_path}")
    cfg = parser.parse_args(["--config", str(run_dir / "config.yaml"), *overrides])
    as_dict = lambda c: json.loads(attack_main.dump_config(parser, c, "json"))  # noqa: E731
    old, new = as_dict(old_cfg), as_dict(cfg)
    changed = check_changes(old, new)
    if not issubclass(attack_main.resolve_attack_class(cfg.attack.class_path), UserLevelInversion):
        raise ConfigError(f"refinish reruns the user-level attack's final stage; {run_dir} ran {cfg.attack.class_path}")
    if new["output"]["name"] == old["output"]["name"]:
        cfg.output.name = f"{cfg.output.name}_refinished"
        new["output"]["name"] = cfg.output.name
    attack_main.check_recorded_attack_seed(run_dir, cfg, "refinish", "its final stage cannot be redrawn with the "
                                           "seed the run used")
    attack_main.check_recorded_defense_seeds(run_dir, cfg, "refinish", "the server's view cannot be rebuilt with the "
                                             "noise the run's attack saw")
    rows_in = list(csv.DictReader((run_dir / "results.csv").open()))
    if not rows_in:
        raise ConfigError(f"{run_dir}: results.csv has no finished user")
    source_status = run_status(run_dir) or "unknown (no readable summary.json)"

    init, source, victim, attack_cls, attack_kwargs, prior, evaluator = attack_main.prepare(parser, cfg)
    fingerprints = attack_main.model_fingerprints(init, prior is not None)  # as attack.run records them
    checked = check_models(run_dir, fingerprints)
    if not attack_main.user_defenses(init.threat, 0).reproducible:
        raise ConfigError(f"{run_dir} used a stochastic defense without a seed: its noise came from the global RNG and "
                          "cannot be redrawn, so the server's view cannot be rebuilt; refinish works on runs whose "
                          "defenses have a seed")
    users = source.users()
    gallery = attack_main.face_gallery(init, source, users)  # as attack.py's identity columns
    by_id = {str(u.user_id): (i, u) for i, u in enumerate(users)}
    plan = []
    for r in rows_in:
        if r["user"] not in by_id:
            raise ConfigError(f"{run_dir}: user {r['user']} of results.csv is not among the config's users")
        i, user = by_id[r["user"]]
        hist = attack_main.histogram_text(user)
        if r.get("true_histogram") not in (None, "", hist) or int(r["B"]) != user.batch_size:
            raise ConfigError(f"{run_dir}: user {r['user']} of results.csv (B {r['B']}, labels {r.get('true_histogram')}) "
                              f"differs from the config's user (B {user.batch_size}, labels {hist}): the data changed")
        udir = run_dir / r["user_dir"] if r.get("user_dir") else run_dir / "users" / attack_main.user_uid(user)
        plan.append((i, user, r, *load_raw(udir, source.image_shape)))  # user_dir: where the run wrote it

    attack_main.full_float32(str(cfg.trainer.precision))  # TF32 as attack.py set it for the run's precision
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator in ("gpu", "cuda", "auto")
                          else "cpu")
    ran_on = {r.get("device") for r in rows_in} - {None, ""}
    if ran_on and ran_on != {device.type}:  # torch's CPU and CUDA generators give other numbers for one seed
        print(f"[refinish] warning: {run_dir} ran on {sorted(ran_on)}, this refinish runs on {device.type}: the "
              "candidates' noise differs (same seeds, other generator), so results match in distribution, not "
              "exactly", file=sys.stderr)

    from inversion.scenario import victim_num_outputs

    victim_classes = victim_num_outputs(victim, source.image_shape)  # the server's label space, as attack.py's

    def server_side(i, user, r, record=None):
        """The server's view of user i rebuilt as attack.py built it, checked against the run's label inference
        (``record`` gets the update's norm, as attack.py's results rows)."""
        view = attack_main.client_update(victim, user, init.threat, victim_classes, user_index=i, record=record)
        attack = attack_cls(**attack_kwargs).bind(view, prior).to(device)
        counts = attack_main.counts_text(attack.labels)
        if r.get("inferred_counts") not in (None, "", counts):
            raise ConfigError(f"{run_dir}: user {r['user']}'s rebuilt client update gives label counts {counts}, the "
                              f"run's were {r['inferred_counts']}: the target gradient differs (data or defenses changed)")
        attack.on_fit_start()  # the target gradient to the device, as before a fit
        return attack

    try:  # the first user's server side before any output: a bad final-stage setting fails here (e.g. t_final >= T)
        server_side(*plan[0][:3])
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"refinish settings rejected: {exc}") from None
    out_dir = attack_main.new_run_dir(init.output.root, init.output.name)
    attack_main.atomic_write_text(out_dir / "config.yaml", attack_main.dump_config(parser, cfg))
    # the effective attack seed, as attack.py records it: a refinished --seed run can be refinished again
    attack_main.atomic_write_text(out_dir / attack_main.ATTACK_SEED_FILE, f"{attack_kwargs['seed']}\n")
    attack_main.atomic_write_text(out_dir / attack_main.DEFENSE_SEEDS_FILE, attack_main.DEFENSE_SEEDS_SCHEME + "\n")
    if checked:  # an unchecked run's images came from unknown models: its refinish vouches for none either
        attack_main.atomic_write_text(out_dir / attack_main.MODELS_FILE, json.dumps(fingerprints, indent=1) + "\n")
    logger = attack_main.make_logger(cfg, out_dir, new)
    print(f"[refinish] {run_dir} -> {out_dir} ({len(plan)} users; changed: {changed or 'nothing'})", flush=True)
    rows, grids, status = [], {}, "running"
    try:
        for i, user, r, raw, raw_source in plan:
            t0 = time.time()
            record: dict = {}
            attack = server_side(i, user, r, record)
            denoised = attack.final_stage(raw.to(device))
            seconds = time.time() - t0
            result = attack_main.AttackResult(representative=raw, reconstructions=raw, denoised=denoised,
                                              labels=attack.labels, steps=int(r["steps"]), history=attack.history,
                                              extras=attack.candidate_extras(0))
            row = attack_main.user_row(attack, user, result, init, evaluator, victim, gallery, device.type)
            row.update(record)
            row.update(steps=r["steps"], seconds=r["seconds"], seconds_per_step=r["seconds_per_step"])
            if r.get("users_per_step"):
                row["users_per_step"] = r["users_per_step"]
            row.update(final_candidate=int(attack.history["final_candidate"][0]) if "final_candidate" in attack.history else 0,
                       refinish_seconds=round(seconds, 2), refinish_source=raw_source,
                       refinished_from=run_dir.resolve().name)
            images = attack_main.user_images(user, result)
            attack_main.write_user(out_dir, attack_main.user_uid(user), images)
            attack_main.write_results(out_dir, rows + [row])  # written first: the summary never counts a lost row
            rows.append(row)
            grids[str(row["user"])] = images["grid"]
            print(f"[refinish] {attack_main.user_uid(user)}: dominant {user.dominant_class}, evaluator "
                  f"{row.get('evaluator_class')} (was {r.get('evaluator_class')}), candidate {row['final_candidate']}, "
                  f"{seconds:.1f} s", flush=True)
        status = "finished"
        if source_status != "finished":  # all of the run's finished users, but the run itself was not finished
            status = (f"incomplete: refinished the {len(rows)} finished users of a run whose status is "
                      f"{source_status!r}; continue that run (attack.py --resume) and refinish it again for the rest")
    except KeyboardInterrupt:
        status = "interrupted"
        print(f"[refinish] interrupted; the finished users are kept in {out_dir}", file=sys.stderr)
    except Exception as exc:
        status = f"failed: {type(exc).__name__}: {exc}"
        raise
    finally:
        summary = {"status": status, "run_dir": str(out_dir.resolve()), "refinished_from": str(run_dir.resolve()), "changed": changed,
                   "attack_seed": attack_kwargs.get("seed"), **attack_main.summarize(rows)}
        attack_main.atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        try:  # the finished users' grid, table and metrics, also after a Ctrl-C
            attack_main.log_final(logger, out_dir, rows, grids, status)
        finally:
            if logger is not None and cfg.logger.backend == "wandb":
                import wandb

                wandb.finish(exit_code=0 if status == "finished" else 1)
    if status.startswith("incomplete"):
        print(f"[refinish] {status}", file=sys.stderr)
        raise SystemExit(1)
    if status != "finished":
        raise SystemExit(130)
    print(json.dumps(summary, indent=2), flush=True)
    return out_dir


def main(argv: Optional[list[str]] = None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        raise SystemExit(0)
    if not argv or argv[0].startswith("-"):
        raise ConfigError("usage: python scripts/refinish.py RUN_DIR [attack.py overrides of the final stage ...]")
    return refinish(Path(os.path.expanduser(argv[0])), argv[1:])  # a quoted "~/runs/x" too


if __name__ == "__main__":
    from inversion.cli import run_main

    run_main(main, "refinish.py")
