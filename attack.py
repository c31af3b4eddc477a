"""Run a gradient inversion attack on many FL users and evaluate it: the project's main job.

    python attack.py --config configs/attack/fashion_mnist.yaml
    python attack.py --config configs/attack/fashion_mnist.yaml --users.init_args.batch_size 50 --attack.init_args.steps 200

Config groups: ``users`` (who the clients are), ``victim`` (the global model), ``prior`` (the DDPM), ``threat``
(protocol, what the server learns, client-side defenses), ``attack`` (the method, by class_path), ``evaluation``,
``trainer`` (Lightning Trainer options), ``logger`` and ``output``. Each run writes a NEW directory
``<output.root>/<output.name>-<timestamp>-<id>/`` (never overwriting) with ``config.yaml``, ``results.csv``,
``summary.json`` and per-user images; every file is written to a temporary name and renamed into place.

Many users per step: ``--attack.init_args.users_per_step U`` (user-level attack only; default 1) groups each
process's users into consecutive chunks of U and runs one Trainer fit per chunk, optimising the chunk's U
representative images together (``UserLevelInversion.bind`` with U views); each user's result equals its
one-at-a-time result up to float rounding and is evaluated and written exactly as before (plus a
``users_per_step`` column, the chunk's size; ``seconds`` is the chunk's time divided by its users).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import numbers
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace  # noqa: E402

from datamodules.users import User, UserSource  # noqa: E402
from datamodules.celeba import CelebAUsers  # noqa: E402,F401  (short class names in configs)
from datamodules.folder import FolderUsers  # noqa: E402,F401
from datamodules.users import FashionMNISTUsers  # noqa: E402,F401
from lightning.pytorch.utilities import rank_zero_warn  # noqa: E402  (one warning, not one per DDP process)
from lightning_modules.base_attack import (  # noqa: E402
    AttackDivergedError, AttackResult, GradientInversionAttack, intended_warnings_silenced,
)
from lightning_modules.baselines import DLG, InvertingGradients, iDLG  # noqa: E402,F401
from lightning_modules.user_level_inversion import UserLevelInversion  # noqa: E402,F401
from inversion.cli import flat_entries, mark_raised_during_work  # noqa: E402
from inversion.defenses import STRENGTH_KEYS  # noqa: E402
from inversion.numbers import float32_step_size  # noqa: E402
from inversion.fedavg import ClientDivergedError  # noqa: E402
from inversion.scenario import TargetGradientError  # noqa: E402
from inversion.fsutils import atomic_write_bytes, check_run_name, exclusive_lock, find_input_path, new_run_dir, run_status  # noqa: E402,F401  (new_run_dir, atomic_write_bytes: scripts use them from attack)


# ------------------------------------------------------------------------------------------------ config groups
@dataclass
class VictimSpec:
    """The victim (global model). ``checkpoint``: folder with model.safetensors + config.json. ``random_init``: use
    the architecture of that checkpoint at a random initialisation (seed ``init_seed``) instead of its weights."""

    checkpoint: str = "checkpoints/fashion_mnist/victim_resnet18"
    random_init: bool = False
    init_seed: int = 0


@dataclass
class PriorSpec:
    """The DDPM prior: a diffusers DDPM folder (e.g. from train.py) or a hub id such as google/ddpm-cifar10-32."""

    path: Optional[str] = "checkpoints/fashion_mnist/ddpm_32"


@dataclass
class ThreatSpec:
    """What the client sends and what the server learns.

    protocol: 'fedsgd' (one gradient) or 'fedavg' (E local epochs: the server sees the weight difference and the
    attack uses the pseudo-gradient delta / (lr * local steps)). reveal_batch_size: the server learns B.
    known_labels: the server is given the labels. defenses: client-side defenses, e.g.
    ``[{name: gaussian_dp, clip_norm: 1.0, sigma: 0.01, seed: 0}]`` (see inversion/defenses.py; the seed gives each
    client its own reproducible stream, :func:`defense_seed`), applied to what the client
    sends: the FedSGD gradient, or the FedAvg weight difference (a clip norm bounds ||delta||; see client_update).
    FedAvg local training: ``fedavg_epochs`` E, ``fedavg_lr`` eta, ``fedavg_batch_size`` b (0: the whole batch, one
    step per epoch), ``fedavg_shuffle`` (a fresh order of the user's images each epoch, seeded by the user, as a
    client's data loader would; false: data order). See inversion/fedavg.py.
    """

    protocol: str = "fedsgd"
    fedavg_epochs: int = 1
    fedavg_lr: float = 0.01
    fedavg_batch_size: int = 0
    fedavg_shuffle: bool = False
    reveal_batch_size: bool = True
    known_labels: bool = False
    defenses: list[dict] = field(default_factory=list)


@dataclass
class EvaluationSpec:
    """Evaluation (ground truth reaches only this stage). evaluator: an independent classifier folder (or null).
    lpips: compute LPIPS (needs the offline AlexNet weights: scripts/setup_offline_assets.sh).
    faces: face analysis for face users (detection, identity match against this user's vs other users' photos,
    gender vs the CelebA ``Male`` attribute; inversion/faces.py); unmeasurable cases are reported, never zero.
    face_gallery_users: whom the identity columns (``id_other_*``, ``id_nearest_is_own``) compare with: 0 (default)
    the run's other users; K > 0 a fixed impostor gallery, users 0..K-1 of the same source (same seed and B), the
    user itself left out, so runs split with ``first_user`` give the same columns as one run and can be pooled.
    Ignored without ``faces``."""

    evaluator: Optional[str] = "checkpoints/fashion_mnist/evaluator_convnet"
    lpips: bool = False
    faces: bool = False
    face_gallery_users: int = 0


@dataclass
class LoggerSpec:
    """Experiment tracking. backend: 'wandb', 'csv' (Lightning's CSVLogger under RUN_DIR/logs, with the config as
    its hparams.yaml) or 'none'. mode (W&B): 'online', 'offline' or 'disabled'; null (the default) takes the
    ``WANDB_MODE`` environment variable, else 'offline' (:func:`wandb_mode`). group (W&B): default the run
    directory's name, shared by every W&B run of one run directory (a run and its resumes)."""

    backend: str = "wandb"
    project: str = "gradinv-diffusion"
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: Optional[str] = None


@dataclass
class OutputSpec:
    """Run directories are created as ``root/name-YYYYmmdd-HHMMSS-<hex>``; never reused."""

    root: str = "runs"
    name: str = "attack"


TRAINER_SKIP = {
    "logger", "callbacks", "max_steps", "max_epochs", "min_steps", "min_epochs", "max_time", "enable_checkpointing",
    "default_root_dir", "limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
    "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps", "fast_dev_run", "overfit_batches",
    "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "reload_dataloaders_every_n_epochs",
    "use_distributed_sampler", "enable_autolog_hparams", "model_registry", "plugins", "profiler", "barebones",
    "inference_mode", "detect_anomaly", "sync_batchnorm",
}


class AttackArgumentParser(ArgumentParser):
    """jsonargparse's parser with readable errors for the subclass groups ``attack`` and ``users``: an unknown class
    name says so and lists the shipped ones (jsonargparse printed a Union-type dump, "Expected a dot import path
    string: DLGx"); a rejected init argument is given alone ("users (FashionMNISTUsers): Parser key "batch_size":
    Expected a <class 'int'>. Got value: x") instead of beside the NoneType alternative. Other errors pass
    through unchanged."""

    GROUPS = {"attack": (GradientInversionAttack, "attack method"), "users": (UserSource, "user source")}

    def error(self, message: str, ex: Optional[Exception] = None):  # type: ignore[override]
        import inspect

        from lightning import Trainer

        from inversion.cli import suggest_for_unrecognized

        # jsonargparse adds the trainer group's options lazily: name them from Trainer's signature
        known = [*self._option_string_actions, *(f"--trainer.{k}" for k in inspect.signature(Trainer.__init__).parameters
                                                 if k not in ("self", *TRAINER_SKIP))]
        return super().error(suggest_for_unrecognized(self.clarify(message), known), ex)

    @classmethod
    def known(cls, key: str) -> list[type]:
        """The shipped classes of group ``key`` ('attack' or 'users'): the imported subclasses of its base, less
        the common bases declared with ``abstract_base=True`` (``SampleLevelAttack``; see GradientInversionAttack)."""
        base = cls.GROUPS[key][0]
        out, todo = [], list(base.__subclasses__())
        while todo:
            c = todo.pop(0)
            todo.extend(c.__subclasses__())
            if c not in out and not getattr(c, "abstract_base", False):
                out.append(c)
        return out

    @classmethod
    def _unknown(cls, key: str, name: str) -> bool:
        """True when ``name`` names no class of group ``key``: not a shipped class name, and as a dot path its module
        does not exist, lacks the attribute, or holds something that is not a subclass of the group's base. False
        when the module exists but fails to import (a missing dependency of the user's own class): jsonargparse's
        own message names that error, and it must not be hidden behind "not a known class"."""
        if any(name in (c.__name__, f"{c.__module__}.{c.__name__}") for c in cls.known(key)):
            return False
        module, _, attr = name.rpartition(".")
        if not module:
            return True
        import importlib

        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:  # the module itself (or a parent package) is missing: unknown
            return exc.name is None or module == exc.name or module.startswith(exc.name + ".")
        except Exception:  # noqa: BLE001 - it exists but does not import: show the real error
            return False
        obj = getattr(mod, attr, None)
        return not (isinstance(obj, type) and issubclass(obj, cls.GROUPS[key][0]))

    @classmethod
    def clarify(cls, message: str) -> str:
        """The readable form of a parse (or instantiation) error ``message`` of the ``attack`` or ``users`` group;
        ``message`` unchanged when it is about another key or has an unexpected form."""
        import re

        m = re.match(r'Parser key "(attack|users)":', message)
        key = m.group(1) if m else next((k for k, (base, _) in cls.GROUPS.items()
                                         if f"Subtypes: [<class '{base.__module__}.{base.__name__}'>" in message), None)
        if key is None or "Errors:" not in message:
            return message
        base, what = cls.GROUPS[key]
        given = re.search(r"Given value: (.*?)\s*$", message)
        raw = given.group(1) if given else ""
        nested = re.match(r"NestedArg\(key='(.*?)', val='(.*)'\)$", raw)
        in_dict = re.search(r"""['"]class_path['"]: ['"]([^'"]*)['"]""", raw)  # from a config file
        if nested:
            name = nested.group(2) if nested.group(1) == "class_path" else None
        elif raw.startswith(("Namespace(", "{")):
            name = in_dict.group(1) if in_dict and "Namespace(" not in raw else None
        else:
            name = raw.strip("'\"")
        if name and cls._unknown(key, name):
            known = ", ".join(c.__name__ for c in cls.known(key))
            return (f"{key}: {name!r} is not a known {what}; use one of {known} (as --{key} NAME, or "
                    f"{key}.class_path: NAME in a config), or the dot import path of your own {base.__name__} "
                    "subclass")
        block = message.split("Errors:", 1)[1].split("Given value type:", 1)[0]
        items = [" ".join(item.split()) for item in re.split(r"\n\s*- ", "\n" + block.strip()) if item.strip()]
        items = [i for i in items if "NoneType" not in i]
        items = [re.sub(r"^Problem with given class_path '(?:.*\.)?(\w+)': ", rf"{key} (\1): ", i) for i in items]
        items = [cls._suggest(key, i) for i in items]
        return "; ".join(i if i.startswith(f"{key} (") else f"{key}: {i}" for i in items) if items else message

    @classmethod
    def _suggest(cls, key: str, item: str) -> str:
        """``item`` with "did you mean ...?" appended when it says a shipped class does not accept an option whose
        name is close to one of the class's init arguments (``--attack.init_args.step`` -> 'steps')."""
        import re

        from inversion.cli import did_you_mean

        m = re.match(rf"{key} \((\w+)\): Option '(\w+)' is not accepted", item)
        owner = next((c for c in cls.known(key) if m and c.__name__ == m.group(1)), None)
        return item if owner is None else item + did_you_mean(owner, m.group(2), skip=("self", "log_prefix"))


def build_parser() -> ArgumentParser:
    """The jsonargparse parser of attack.py: ``--config`` plus the groups of the module docstring.

    ``users`` and ``attack`` are subclass groups (``class_path`` + ``init_args``; ``attack`` is not instantiated and
    its ``log_prefix`` is set per user by :func:`run`), ``trainer`` holds Lightning ``Trainer`` options except
    :data:`TRAINER_SKIP` (the attack sets those itself); then ``--seed``, ``--image_log_every``, ``--resume`` and
    ``--checkpoint_every``. Built with ``exit_on_error=True``: a bad command line exits through argparse, with
    :class:`AttackArgumentParser`'s readable messages for the ``attack`` and ``users`` groups.
    """
    from lightning import Trainer

    p = AttackArgumentParser(description=__doc__.split("\n\n")[0], default_env=False, exit_on_error=True,
                             allow_abbrev=False)  # a misspelt option is an error, not a longer option it prefixes
    p.add_argument("--config", action=ActionConfigFile, help="One YAML per experiment (configs/attack/*.yaml).")
    p.add_subclass_arguments(UserSource, "users", required=True, help="Who the FL users are.")
    p.add_class_arguments(VictimSpec, "victim")
    p.add_class_arguments(PriorSpec, "prior")
    p.add_class_arguments(ThreatSpec, "threat")
    p.add_subclass_arguments(GradientInversionAttack, "attack", required=True, instantiate=False, skip={"log_prefix"})
    p.add_class_arguments(EvaluationSpec, "evaluation")
    p.add_class_arguments(Trainer, "trainer", instantiate=False, skip=TRAINER_SKIP)
    p.add_class_arguments(LoggerSpec, "logger")
    p.add_class_arguments(OutputSpec, "output")
    p.add_argument("--seed", type=int, default=0,
                   help="The run's seed: seeds Lightning's global RNG (seed_everything) and, when not 0, is mixed into "
                        "the attack's seed (new initial images and noise draws, same users and seeded defenses' "
                        "noise; see effective_attack_seed).")
    p.add_argument("--image_log_every", type=int, default=0,
                   help="Log reconstructions every k steps (0: attack.init_args.log_images_every, default off).")
    p.add_argument("--resume", type=Optional[str], default=None,
                   help="Continue an interrupted run directory of the same config: finished users are skipped, an "
                        "interrupted attack (a chunk of users_per_step users) continues from its last checkpoint.")
    p.add_argument("--checkpoint_every", type=int, default=0,
                   help="Save the attack's Lightning checkpoint every k steps (0: off) under RUN_DIR/checkpoints.")
    return p


def dump_config(parser: ArgumentParser, cfg: Namespace, format: str = "parser_mode") -> str:
    """``parser.dump(cfg)`` keeping the None entries (a resolved config says every value): jsonargparse's
    ``skip_none=False``, renamed ``skip_unset=False`` in 4.49 (the old name warns there)."""
    import jsonargparse

    major, minor = (int(v) for v in jsonargparse.__version__.split(".")[:2])
    key = "skip_unset" if (major, minor) >= (4, 49) else "skip_none"
    return parser.dump(cfg, format=format, **{key: False})


# ------------------------------------------------------------------------------------------------ atomic I/O
def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: :func:`inversion.fsutils.atomic_write_bytes` (a temporary file
    in the same folder, fsynced, then renamed into place; the folder fsynced after, best effort)."""
    atomic_write_bytes(path, text.encode())


def save_png(path: Path, images: torch.Tensor, nrow: Optional[int] = None) -> None:
    """Save float images in [0, 1] ((N, C, H, W) or (C, H, W)) as one uint8 PNG grid, atomically."""
    from PIL import Image

    from inversion.logging_utils import to_uint8_hwc

    buf = io.BytesIO()
    Image.fromarray(to_uint8_hwc(images, nrow=nrow)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------ set-up
class ConfigError(ValueError):
    """A config that cannot run; raised before any long work."""


def load_victim(spec: VictimSpec):
    """Load the victim classifier named by ``spec.checkpoint``, looked up by :func:`inversion.fsutils.find_input_path`
    (as given, then under the repository root).

    With ``spec.random_init`` the checkpoint's weights are discarded: the same architecture (and input
    normalisation) is rebuilt after ``torch.manual_seed(spec.init_seed)``, so the weights depend only on ``init_seed``.
    Loading runs inside ``torch.random.fork_rng``: the global (CPU) RNG is left as it was.

    Returns:
        (model, config): the classifier in eval mode on the CPU, taking float (N, C, H, W) pixels in [0, 1] and
        returning logits (N, num_classes); the checkpoint's ``config.json`` as a dict.

    Raises:
        FileNotFoundError, ValueError: see :func:`lightning_modules.classifier.load_classifier`.
    """
    from lightning_modules.classifier import build_classifier, load_classifier

    path = find_input_path(spec.checkpoint)
    with torch.random.fork_rng(devices=[]):  # building the model draws initial weights: keep the global RNG as it was
        model, cfg = load_classifier(path)
        if spec.random_init:
            torch.manual_seed(spec.init_seed)
            model = build_classifier(cfg["arch"], cfg["in_channels"], cfg["num_classes"], cfg.get("image_size", 32), cfg.get("mean"), cfg.get("std")).eval()
    return model, cfg


def load_prior(spec: PriorSpec, image_shape):
    """The :class:`inversion.prior.DiffusionPrior` of ``spec.path`` for images of ``image_shape`` (C, H, W).

    The path is looked up by :func:`inversion.fsutils.find_input_path` (as given, then under the repository root);
    when neither exists, ``spec.path`` is passed on as written (a hub id, or a missing path such as ``./x`` that the
    loader then names as not found).

    Raises:
        FileNotFoundError, ValueError, PriorMismatchError: see :meth:`DiffusionPrior.from_pretrained`.
    """
    from inversion.prior import DiffusionPrior

    found = find_input_path(spec.path) if spec.path else None
    return DiffusionPrior.from_pretrained(str(found) if found is not None and found.exists() else spec.path, image_shape)


def resolve_attack_class(class_path: str):
    """The attack class named by the dotted ``class_path`` of the ``attack`` group (e.g.
    ``lightning_modules.baselines.DLG``), imported with jsonargparse's own resolver (a private helper,
    ``jsonargparse._util.import_object``); its import errors propagate."""
    from jsonargparse._util import import_object  # jsonargparse's own resolver

    return import_object(class_path)


def device_pool(trainer: dict) -> tuple[bool, int]:
    """(on CUDA?, how many devices there are to ask for): a run is on CUDA for accelerator gpu/cuda, or auto with
    CUDA present; it then has ``torch.cuda.device_count()`` devices, else ``os.cpu_count()`` CPU cores (one process
    each)."""
    import torch

    accelerator = str(trainer.get("accelerator") or "auto")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return on_gpu, (torch.cuda.device_count() if on_gpu else (os.cpu_count() or 1))


def requested_devices(trainer: dict) -> int:
    """Devices per node a trainer config asks for, as Lightning counts them: a list of indices -> its length, an
    int n -> n (-1: every device), 'auto'/None -> every CUDA device when the run is on CUDA (accelerator gpu/cuda,
    or auto with CUDA present), else 1. Every device is CUDA devices on CUDA, CPU cores (``os.cpu_count()``) else."""
    devices = trainer.get("devices", "auto")
    on_gpu, every = device_pool(trainer)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, int) or (isinstance(devices, str) and devices.lstrip("-").isdigit()):
        return every if int(devices) == -1 else int(devices)
    return every if on_gpu else 1


def distributed(trainer: dict) -> bool:
    """Whether attack.py shards the users over one process per device (:func:`start_distributed`): strategy
    ddp*, or strategy auto with more than one device in all (Lightning's own reading of ``devices: 2``: one
    process each). Every per-user Trainer then runs on its process's single device."""
    strategy = str(trainer.get("strategy") or "auto").lower()  # Lightning lower-cases a strategy name
    total = requested_devices(trainer) * int(trainer.get("num_nodes") or 1)
    return strategy.startswith("ddp") or (strategy == "auto" and total > 1)


def check_devices(trainer: dict) -> None:
    """Refuse, before any work, a trainer that asks for devices this machine does not have, or several devices
    under a strategy attack.py cannot shard users with.

    ``trainer.accelerator`` gpu/cuda without CUDA, or ``trainer.devices`` (an int per node, or a list of device
    indices) above the local count: CUDA devices for gpu/cuda (and for auto when CUDA is present), CPU cores
    (``os.cpu_count()``) for cpu, one process per device. Multi-node runs count per node, as Lightning does.
    Several devices need strategy ddp or auto (:func:`distributed`): attack.py runs one small Trainer per user,
    each on one device (a per-user Trainer that launched its own processes re-ran attack.py in each).

    Raises:
        ConfigError: naming the key, what was asked and what the machine has.
    """
    import torch

    accelerator = str(trainer.get("accelerator") or "auto")
    devices = trainer.get("devices", "auto")
    has_cuda = torch.cuda.is_available()
    if accelerator in ("gpu", "cuda") and not has_cuda:
        raise ConfigError(
            f"trainer.accelerator is {accelerator!r} but this machine has no CUDA device; use --trainer.accelerator "
            "cpu (or auto)"
        )
    on_gpu, available = device_pool(trainer)
    kind = "CUDA devices" if on_gpu else "CPU cores"
    if isinstance(devices, (list, tuple)):
        asked = max(int(d) for d in devices) + 1 if devices else 0
        if asked > available:
            raise ConfigError(f"trainer.devices {list(devices)} names device {asked - 1}, but this machine has {available} {kind}")
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.lstrip("-").isdigit()):
        n = int(devices)
        if n == 0 or n < -1:
            raise ConfigError(f"trainer.devices must be >= 1 (or -1 / auto for all), got {n}")
        if n > available:
            raise ConfigError(
                f"trainer.devices is {n} but this machine has {available} {kind}; lower --trainer.devices (one "
                "process per device; several nodes: --trainer.num_nodes)"
            )
    strategy = str(trainer.get("strategy") or "auto")
    if isinstance(trainer.get("strategy"), str):  # Lightning's own check comes only once a user's Trainer is built
        from lightning.pytorch.strategies import StrategyRegistry

        known = sorted(StrategyRegistry.available_strategies())
        if strategy.lower() != "auto" and strategy.lower() not in known:
            import difflib

            close = difflib.get_close_matches(strategy.lower(), ["auto", *known], n=1)
            raise ConfigError(f"trainer.strategy {strategy!r} is not a Lightning strategy"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + "; attack.py uses auto (one device) or ddp (one process per device, users sharded)")
    total = requested_devices(trainer) * int(trainer.get("num_nodes") or 1)
    if total > 1 and not distributed(trainer):
        raise ConfigError(
            f"trainer.strategy {strategy!r} with {total} devices: attack.py runs one Trainer per user on one device "
            "and shards the users over one process per device; use --trainer.strategy ddp (or auto), or "
            "--trainer.devices 1"
        )


def validate(cfg: Namespace, source: UserSource, victim_cfg: dict) -> None:
    """Cross-check the groups (shapes, classes, protocol) before any attack starts; raises :class:`ConfigError`."""
    C, H, W = source.image_shape
    if victim_cfg["in_channels"] != C or victim_cfg.get("image_size", H) != H:
        raise ConfigError(
            f"users give {C}x{H}x{W} images but the victim {cfg.victim.checkpoint} expects "
            f"{victim_cfg['in_channels']}x{victim_cfg.get('image_size')}; set users.init_args.image_size/channels to match"
        )
    if victim_cfg["num_classes"] < source.num_classes:
        raise ConfigError(f"the users have {source.num_classes} classes but the victim only {victim_cfg['num_classes']} outputs")
    if cfg.threat.protocol not in ("fedsgd", "fedavg"):
        raise ConfigError(f"threat.protocol must be 'fedsgd' or 'fedavg', got {cfg.threat.protocol!r}")
    if cfg.threat.protocol == "fedavg":
        from inversion.fedavg import local_steps_for

        B = getattr(source, "batch_size", 1)
        local_steps_for(B, cfg.threat.fedavg_epochs, cfg.threat.fedavg_batch_size or B)  # raises on zero steps
        try:
            float32_step_size("threat.fedavg_lr", cfg.threat.fedavg_lr)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        b = cfg.threat.fedavg_batch_size
        if b and b < B and B % b:
            rank_zero_warn(
                f"threat.fedavg_batch_size {b} does not divide B = {B}: the last local mini-batch has {B % b} images and "
                "its mean gradient gets the weight of a full one, so the pseudo-gradient over-weights those images and "
                "does not tend to the FedSGD gradient as fedavg_lr -> 0 (inversion/fedavg.py). The attack still runs; "
                "a local batch size that divides B avoids it.", stacklevel=2)
    else:
        defaults = ThreatSpec()
        unused = {k: getattr(cfg.threat, k) for k in ("fedavg_epochs", "fedavg_lr", "fedavg_batch_size", "fedavg_shuffle")
                  if getattr(cfg.threat, k) != getattr(defaults, k)}
        if unused:
            rank_zero_warn(f"threat.protocol is fedsgd: {unused} apply to FedAvg only and are ignored (set "
                          "threat.protocol fedavg to use them)", stacklevel=2)
    output_terms = _output_terms_on(cfg)  # read from the bias gradient: warned about below where that is off
    if cfg.threat.defenses:
        from inversion.defenses import build_defenses

        built = build_defenses([dict(d) for d in cfg.threat.defenses])  # raises on unknown or out-of-range settings
        if not built.reproducible:
            rank_zero_warn(
                "threat.defenses: a random defense (gaussian_dp noise or stochastic quantize) has no seed, so it draws "
                "from the global random generator: a user's noise then depends on the users run before it and on the "
                "run's order, and changes on --resume, in split runs (first_user) and on refinish (which refuses "
                "such runs). Give it a seed (e.g. seed: 0; each client gets its own stream from it).", stacklevel=2)
        if output_terms:
            rank_zero_warn(
                f"attack.init_args.{' and '.join(output_terms)} > 0 under client defenses: the output-matching target "
                "(the batch's mean softmax, recovered from the last layer's bias gradient) assumes an unscaled, "
                "unmasked gradient; clipping, noise, pruning and compression bias it (toward the inferred label "
                "proportions). The attack still runs; set them to 0 for the paper's method under defenses.",
                stacklevel=2)
    b = cfg.threat.fedavg_batch_size
    if (cfg.threat.protocol == "fedavg" and not cfg.threat.reveal_batch_size and b
            and b < getattr(source, "batch_size", 1) and output_terms):
        rank_zero_warn(
            f"attack.init_args.{' and '.join(output_terms)} > 0 under FedAvg with B hidden and local "
            f"mini-batches of {b}: the server divides the weight difference by lr x epochs, not by the ceil(B / {b}) "
            "local steps it cannot count, so the pseudo-gradient is that many times too large and the output-matching "
            "target read from its bias (p = g + n / B) is off. The attack still runs; reveal B "
            "(threat.reveal_batch_size true) or set the output terms to 0.", stacklevel=2)
    if cfg.logger.backend not in ("wandb", "csv", "none"):
        raise ConfigError(f"logger.backend must be wandb, csv or none, got {cfg.logger.backend!r}")
    if cfg.logger.backend == "wandb":
        if wandb_mode(cfg.logger) in ("online", "shared"):  # raises on a mode W&B does not know, before the run dir
            check_wandb_login()


def _output_terms_on(cfg: Namespace) -> list[str]:
    """The attack's output-matching terms the config turns on (``output_weight``, ``selection_output_weight`` with
    more than one final candidate): both read the batch's mean softmax from the last layer's bias gradient."""
    a = dict(cfg.attack.init_args or {})
    return [k for k, on in (
        ("output_weight", float(a.get("output_weight") or 0) > 0),
        ("selection_output_weight", int(a.get("final_candidates") or 1) > 1
         and float(a.get("selection_output_weight", 1.0) or 0) > 0)) if on]


def _canonical_defense_params(d: dict) -> list[tuple[str, str]]:
    """One defense config's settings as (key, text) in the defense class's signature order, numbers written one way
    (floats as ``repr(float)``: 1 and 1.0 are both '1.0'; ``levels`` as an integer), GaussianDP's ``noise_multiplier``
    written as its alias ``sigma``, and settings equal to the class's default left out (an omitted ``stochastic: false`` and a written one give the same label). ``name`` and ``seed``
    are not part of the label. An unknown defense name keeps its settings as written (it is refused elsewhere)."""
    import inspect

    from inversion.defenses import DEFENSES

    def number(key, v):
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            return None
        try:
            f = float(v)
        except ValueError:
            return None
        return str(int(f)) if key == "levels" and f.is_integer() else repr(f)

    def text(key, v):
        n = number(key, v)
        return n if n is not None else str(v)

    params = {k: v for k, v in d.items() if k not in ("name", "seed")}
    if d.get("name") == "gaussian_dp" and "noise_multiplier" in params:  # GaussianDP's alias: one label, 'sigma'
        nm = params.pop("noise_multiplier")
        if params.get("sigma") is None:  # both given: equal, or GaussianDP refuses them; 'sigma: null' is unset
            params["sigma"] = nm
    cls = DEFENSES.get(d.get("name"))
    if cls is None or cls.__init__ is object.__init__:
        return [(k, text(k, v)) for k, v in params.items()]
    sig = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    order = {p.name: i for i, p in enumerate(sig)}
    defaults = {p.name: p.default for p in sig if p.default is not inspect.Parameter.empty and p.default is not None}
    out = []
    for k in sorted(params, key=lambda k: order.get(k, len(order))):
        v = params[k]
        if k in defaults and text(k, v) == text(k, defaults[k]):
            continue
        out.append((k, text(k, v)))
    return out


def defense_label(defenses: list[dict]) -> tuple[str, float]:
    """A readable label of the configured defenses ('none' when off) and the strength of the first one that has
    one (its sigma, keep fraction, levels or clip norm, :data:`inversion.defenses.STRENGTH_KEYS` in that order; NaN
    when none has: sign compression alone) for privacy curves.

    The label is canonical (:func:`_canonical_defense_params`): the same defense written two ways in YAML
    (``clip_norm: 1`` / ``1.0``, keys in another order, a default spelled out) gets one label, so the report draws
    one line for it, e.g. ``gaussian_dp(clip_norm=1.0,sigma=0.01)``."""
    if not defenses:
        return "none", float("nan")
    parts, strength = [], float("nan")
    for d in defenses:
        params = ",".join(f"{k}={v}" for k, v in _canonical_defense_params(d))
        parts.append(f"{d.get('name')}({params})")
        if strength != strength:
            strength = next((float(d[k]) for k in STRENGTH_KEYS if d.get(k) is not None), float("nan"))
    return "+".join(parts), strength


#: first word of every defense seed's SeedSequence entropy ("DEFE" in ASCII): keeps the client's noise streams apart
#: from the attack's own generators, which are seeded with small integers (the attack seed)
DEFENSE_STREAM = 0x44454645


def defense_seed(seed: int, user_index: int, position: int) -> int:
    """The seed, in [0, 2**64), of the ``position``-th seeded defense (counting only those with a ``seed``) of
    client ``user_index``: one 64-bit draw of ``numpy.random.SeedSequence([DEFENSE_STREAM, seed mod 2**64,
    user_index mod 2**64, position])``. So clients get independent noise, two seeded defenses of one client (e.g. DP
    noise then stochastic quantisation with the same ``seed``) draw independent streams, and no client's noise is
    the stream of the attack's own generator: the earlier ``seed + user_index`` gave user 0 of a ``seed: 0`` sweep
    the noise ``torch.Generator().manual_seed(0)`` draws, the same numbers the attack (seed 0) drew as its starting
    image. Changed on 2026-12-01: runs before that (the DP points of reports/fmnist_dp_noise_cpu and
    reports/fmnist_b10_20users_ablations_cpu) drew ``seed + user_index`` for the first seeded defense."""
    import numpy as np

    entropy = [DEFENSE_STREAM, int(seed) % 2**64, int(user_index) % 2**64, int(position)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def user_defenses(threat: ThreatSpec, user_index: int):
    """Build the client's defenses; a configured ``seed`` becomes :func:`defense_seed` (independent noise per
    client and per defense, reproducible per user)."""
    from inversion.defenses import build_defenses

    specs, k = [], 0
    for d in threat.defenses:  # k counts the seeded defenses only: an unseeded one before keeps the first's stream
        if d.get("seed") is not None:
            specs.append(dict(d, seed=defense_seed(d["seed"], user_index, k)))
            k += 1
        else:
            specs.append(dict(d))
    return build_defenses(specs)


def stable_user_index(user: User, position: int) -> int:
    """The index that seeds a user's client-side randomness (defense noise; the FedAvg client's generator, unused
    while it does not shuffle): its integer user id
    (Fashion-MNIST and CelebA users: the global user index), else ``meta['index']`` (folder users), else its
    ``position`` in this run. A user gets the same noise whether it runs alone, in a half of the users
    (``first_user``) or in one big run, and two users never share a draw."""
    uid = user.user_id
    if isinstance(uid, numbers.Integral) and not isinstance(uid, bool):
        return int(uid)
    index = user.meta.get("index") if isinstance(user.meta, dict) else None
    if isinstance(index, numbers.Integral) and not isinstance(index, bool):
        return int(index)
    return int(position)


def _update_norm(update) -> float:
    """Global L2 norm of a client update (name -> tensor), rounded to 4 significant digits for results.csv."""
    from inversion.defenses import global_l2_norm

    return float(f"{float(global_l2_norm(update)):.4g}")


def client_update(victim, user: User, threat: ThreatSpec, num_classes: int, user_index: int = 0,
                  record: Optional[dict] = None):
    """The client's side and what the server receives; returns the ServerView. ``num_classes``: the victim's number
    of outputs (:func:`inversion.scenario.victim_num_outputs`; the server's label space, at least the users').

    FedSGD: the gradient, then the client's defenses on it. FedAvg: the local training's weight difference, then
    the client's defenses on that difference (what the client sends: DP-FedAvg, McMahan et al. 2018, clips and
    noises the model delta, so a clip norm is a norm of the delta), then the server's pseudo-gradient
    delta / (lr * local steps) (:func:`inversion.fedavg.fedavg_pseudo_gradient`). With ``reveal_batch_size``
    false the FedAvg metadata gives the configured local batch size (None: full batch) and no local step count
    (either would reveal B), and with a configured local batch size b the pseudo-gradient is delta / (lr * epochs)
    (ceil(B / b) times the per-step mean: the server cannot divide by steps it does not know; the cosine matching
    losses ignore the scale). ``meta['pseudo_gradient_steps']`` says which divisor was used. Seeded randomness is offset by :func:`stable_user_index` (``user_index``: the user's
    position in the run, used only for users without an integer id or index).

    ``record`` (evaluation side, never in the view): when given, ``record['update_norm']`` is set to the L2 norm
    (float) of what the client's defenses receive, the FedSGD gradient or the FedAvg weight difference, so a
    results row can say how a clip norm and a noise scale compare with this user's update.
    """
    user_index = stable_user_index(user, user_index)
    from inversion.scenario import fedsgd_gradient, make_server_view

    meta: dict = {"protocol": threat.protocol}
    if threat.protocol == "fedavg":
        from inversion.fedavg import fedavg_client_update, fedavg_pseudo_gradient

        upd = fedavg_client_update(
            victim, user.images, user.labels, epochs=threat.fedavg_epochs, local_lr=threat.fedavg_lr,
            local_batch_size=threat.fedavg_batch_size or None, shuffle=threat.fedavg_shuffle, seed=user_index,
        )
        if record is not None:
            record["update_norm"] = _update_norm(upd.delta)
        delta = user_defenses(threat, user_index)(upd.delta) if threat.defenses else upd.delta
        # the server's divisor: lr x the local steps, which it knows unless B is hidden and the client split its
        # batch into mini-batches of b (ceil(B / b) steps per epoch); then lr x epochs, as the server can compute
        steps_known = threat.reveal_batch_size or not threat.fedavg_batch_size
        server_steps = upd.local_steps if steps_known else threat.fedavg_epochs
        grad = fedavg_pseudo_gradient(delta, upd.local_lr, server_steps)
        meta.update(upd.meta)
        meta["pseudo_gradient_steps"] = server_steps
        if not threat.reveal_batch_size:
            meta["local_batch_size"] = threat.fedavg_batch_size or None
            meta.pop("local_steps", None)
    else:
        grad = fedsgd_gradient(victim, user.images, user.labels)
        if record is not None:
            record["update_norm"] = _update_norm(grad)
        if threat.defenses:
            grad = user_defenses(threat, user_index)(grad)
    view = make_server_view(
        victim, user.images, user.labels, num_classes,
        reveal_batch_size=threat.reveal_batch_size, reveal_labels=threat.known_labels, gradient=grad,
    )
    view.meta.update(meta)
    return view


# ------------------------------------------------------------------------------------------------ evaluation
def face_gallery(init: Namespace, source: UserSource, users: list[User]) -> tuple[list[User], str]:
    """The users whose photos the identity columns compare each user with, and its label for results.csv
    (``id_gallery``): the run's users ('run') or, with ``evaluation.face_gallery_users`` K > 0, users 0..K-1 of
    ``source`` ('users 0-<K-1>'; see :meth:`UserSource.gallery`). :func:`face_columns` leaves the user itself out."""
    k = int(getattr(init.evaluation, "face_gallery_users", 0) or 0)
    if not (init.evaluation.faces and k):
        return users, "run"
    return source.gallery(k).users(), f"users 0-{k - 1}"


def face_columns(final: torch.Tensor, user: User, gallery: list[User], gallery_name: str = "run") -> dict[str, Any]:
    """Face analysis columns for one user (see inversion.faces.face_report); ``Male`` from the user's ground truth.

    ``gallery``: the users whose photos are the impostors (:func:`face_gallery`); the user itself (same
    ``user_id``) is left out. ``gallery_name`` becomes the ``id_gallery`` column."""
    from inversion.faces import face_report

    male = user.meta.get("image_attributes", {}).get("Male") if isinstance(user.meta.get("image_attributes"), dict) else None
    others = [u.images for u in gallery if str(u.user_id) != str(user.user_id)]
    rep = face_report(final[0], user.images, others, male_attr=male)
    rep["id_gallery"] = gallery_name
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in rep.items()}


def topk_overlap(probs: torch.Tensor, histogram: torch.Tensor, max_k: int = 3) -> float:
    """Share of the user's k most frequent classes found among the evaluator's top-k classes for the image.

    k = min(number of classes present in the batch, ``max_k``); 1.0 for a single-class user whose class is the
    evaluator's top-1. Classes tied with the k-th largest count are all among the user's top k (counts 2, 2, 2, 2, 2
    at k = 3: any 3 of the 5 are right; ``torch.topk`` kept 3 of them arbitrarily). ``probs`` (C,) evaluator
    probabilities, ``histogram`` (C,) label counts of the user's batch. Returns a float in [0, 1].
    """
    k = max(1, min(int((histogram > 0).sum()), max_k))
    h = histogram.float()
    kth = torch.topk(h, k).values[-1]
    true_top = set(((h >= kth) & (h > 0)).nonzero().flatten().tolist())  # ties at the k-th count all count as true
    pred_top = set(torch.topk(probs.float(), k).indices.tolist())
    return min(len(true_top & pred_top), k) / k


def _metric_value(key: str, value: Any) -> Any:
    """An image metric as results.csv holds it: an index as an int (``nearest_index``), anything else a float with 6
    significant digits (rounding to 5 decimals stored an MSE below 5e-6 as 0.0 beside a finite PSNR)."""
    if key.endswith("_index"):
        return int(value)
    v = float(value)
    return float(f"{v:.6g}") if math.isfinite(v) else v


def dominant_classes(user: User) -> torch.Tensor:
    """The classes that hold the most images of ``user``'s batch: int64 (k,), k > 1 when several tie (a Dirichlet
    mix: at alpha 1 and B = 10 about a third of the users; a 5/5 attribute split). ``user.dominant_class`` is one
    of them (the data sources break ties by the designed class or the lowest id); a reading of any of them is
    correct, since none is more the user's class than the others."""
    hist = user.label_histogram
    tops = (hist == hist.max()).nonzero().flatten()
    return tops if int(user.dominant_class) in tops.tolist() else torch.tensor([int(user.dominant_class)])


def evaluate(result: AttackResult, user: User, evaluator, lpips: bool, victim=None) -> dict[str, Any]:
    """Compare the reconstruction with the user's ground truth (this is the only place the private batch is used).

    With final candidate selection (``result.extras["candidates"]``, N images), also how many of the N candidates
    the evaluator reads as the user's class (``evaluator_candidates_correct``) and whether any
    (``evaluator_any_candidate_correct``): the accuracy a perfect choice would reach, beside the server's own.

    With ``victim``, also the victim's own reading of the final image (``victim_class``, ``victim_correct``,
    ``victim_prob_of_dominant``): an image the victim reads as the user's class but the independent evaluator does
    not is an adversarial fit to the victim rather than a picture of the class.

    Label-free users (``user.meta['label_free']``: folder users with ``label_mode='zeros'``, whose labels are
    placeholders) get the evaluator's and the victim's class and probability but no ``*_correct``,
    ``*_prob_of_dominant`` or top-k overlap: there is no class to be right about (they were scored against 0).

    A batch whose top count is shared by several classes (:func:`dominant_classes`) counts a reading of any of
    them as correct (``*_correct``, the candidates' and the baselines' shares); ``*_prob_of_dominant`` is the
    probability of ``dominant_class``, the one results.csv names."""
    from inversion.metrics import image_metrics

    final = result.denoised if result.denoised is not None else result.representative
    row: dict[str, Any] = {}
    scored = not (isinstance(user.meta, dict) and user.meta.get("label_free"))
    tops = dominant_classes(user).tolist() if scored else []

    def correct(cls) -> int:
        return int(int(cls) in tops)
    if victim is not None:
        with torch.no_grad():
            vp = F.softmax(victim(final.float().to(next(victim.parameters()).device)), dim=1)[0].cpu()
        row.update(victim_class=int(vp.argmax()))
        if scored:
            row.update(victim_correct=correct(vp.argmax()),
                       victim_prob_of_dominant=round(float(vp[user.dominant_class]), 4))
    if evaluator is not None:
        with torch.no_grad():
            # as the victim above: the images may sit elsewhere (an evaluator without parameters: as they are)
            ev_device = next(iter(getattr(evaluator, "parameters", lambda: iter(()))()), final).device
            probs = F.softmax(evaluator(final.float().to(ev_device)), dim=1)[0].cpu()
            probs_raw = F.softmax(evaluator(result.representative.float().to(ev_device)), dim=1)[0].cpu()
        row.update(evaluator_class=int(probs.argmax()), evaluator_prob=round(float(probs.max()), 4),
                   evaluator_class_raw=int(probs_raw.argmax()))
        if scored:
            row.update(
                evaluator_correct=correct(probs.argmax()),
                evaluator_prob_of_dominant=round(float(probs[user.dominant_class]), 4),
                evaluator_correct_raw=correct(probs_raw.argmax()),
                evaluator_topk_overlap=round(topk_overlap(probs, user.label_histogram), 4),
            )
        cands = result.extras.get("candidates")
        if cands is not None and scored:  # final candidate selection: were the proposals or the server's choice the limit?
            with torch.no_grad():
                cand_cls = F.softmax(evaluator(cands.float()), dim=1).argmax(1)
            row["evaluator_candidates_correct"] = sum(correct(c) for c in cand_cls)
            row["evaluator_any_candidate_correct"] = int(row["evaluator_candidates_correct"] > 0)
    metrics = image_metrics(final, user.images, lpips=lpips)
    row.update({k: _metric_value(k, v) for k, v in metrics.items()})
    raw_metrics = image_metrics(result.representative, user.images, lpips=False)
    row.update({f"raw_{k}": _metric_value(k, v) for k, v in raw_metrics.items() if k.startswith("psnr")})
    recs = result.reconstructions
    if recs.shape[0] > 1:  # sample-level baselines: also the mean over all their reconstructions
        per = [image_metrics(r, user.images, lpips=lpips) for r in recs]
        for k in per[0]:
            if k.endswith("_nearest"):
                vals = [p[k] for p in per if math.isfinite(p[k])]
                row[f"all_{k}_mean"] = _metric_value(k, sum(vals) / len(vals)) if vals else float("nan")
        if evaluator is not None and scored:
            with torch.no_grad():
                cls = F.softmax(evaluator(recs.float()), dim=1).argmax(1)
            row["all_evaluator_dominant_share"] = round(sum(correct(c) for c in cls) / len(cls), 4)
    return row


# ------------------------------------------------------------------------------------------------ main job
def write_results(run_dir: Path, rows: list[dict], name: str = "results.csv") -> None:
    """``rows`` as CSV ``run_dir/name`` (columns: every key, in first-seen order), written atomically."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(run_dir / name, buf.getvalue())


def summarize(rows: list[dict]) -> dict[str, Any]:
    """Run-level means of results.csv rows (as written to summary.json and logged as ``final/*``).

    Returns:
        ``{"users": len(rows)}`` plus ``<key>_mean`` for each of evaluator_correct_raw, evaluator_prob (the
        evaluator's confidence in the class it read, right or wrong), evaluator_prob_of_dominant (its probability of
        the user's dominant class), psnr_nearest/psnr_mean (dB), mse_nearest/mse_mean (pixels in [0, 1]),
        ssim_nearest/ssim_mean, lpips_nearest/lpips_mean, seconds and seconds_per_step, over the rows where the value is present, non-empty and finite (a key with no such value
        is left out); the mean of evaluator_correct is named ``evaluator_accuracy`` (fraction in [0, 1]). Values may
        be numbers or numeric strings (rows read back from results.csv on resume).
    """
    out: dict[str, Any] = {"users": len(rows)}
    for k in ("evaluator_correct", "evaluator_correct_raw", "evaluator_prob", "evaluator_prob_of_dominant",
              "psnr_nearest", "psnr_mean", "mse_nearest", "mse_mean", "ssim_nearest", "ssim_mean", "lpips_nearest",
              "lpips_mean", "seconds", "seconds_per_step"):
        vals = [float(r[k]) for r in rows if r.get(k) not in (None, "")]
        vals = [v for v in vals if math.isfinite(v)]
        if vals:
            out[f"{k}_mean"] = sum(vals) / len(vals)
    if "evaluator_correct_mean" in out:
        out["evaluator_accuracy"] = out.pop("evaluator_correct_mean")
    return out


WANDB_ID_FILE = "wandb_run_id.txt"  # in the run directory: '<id> <mode>' per W&B run started for it, oldest first
WANDB_MODES = ("online", "offline", "disabled", "shared")  # wandb.init's modes ('shared': W&B's multi-writer mode)
WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}  # W&B's older mode names, read as today's


def wandb_mode(spec) -> str:
    """The W&B mode of a run: ``logger.mode`` when the config sets it (an explicit value wins); else the
    ``WANDB_MODE`` environment variable (W&B's older names: 'dryrun' reads as offline, 'run' as online); else
    'offline'. So tests and CI (``WANDB_MODE=offline``) and a run that says nothing stay offline, and
    ``--logger.mode online`` goes online whatever the environment says: the mode is passed to ``wandb.init``
    explicitly, where an argument beats the environment.

    Raises:
        ConfigError: the mode (from the config, or from WANDB_MODE when the config has none) is not one of
            online, offline, disabled, shared.
    """
    mode = getattr(spec, "mode", None)
    if mode is None:
        env = os.environ.get("WANDB_MODE", "").strip()
        if not env:
            return "offline"
        mode = WANDB_MODE_ALIASES.get(env, env)
        if mode not in WANDB_MODES:
            raise ConfigError(f"logger.mode is not set, so the WANDB_MODE environment variable decides, and it is "
                              f"{env!r}: use online, offline, disabled or shared (or set --logger.mode)")
        return mode
    if mode not in WANDB_MODES:
        raise ConfigError(f"logger.mode must be online, offline, disabled or shared (or null: WANDB_MODE, else offline), "
                          f"got {mode!r}")
    return mode


def check_wandb_login() -> None:
    """Raise before any work when W&B has no API key for an online run (``wandb.login(verify=False)``: reads
    WANDB_API_KEY or ~/.netrc, asks on a terminal, makes no network call). Without it the run failed with a
    UsageError traceback at ``wandb.init``, after the models loaded and the run directory was made.

    Not checked (``wandb.login`` returns False without looking for a key): a process in which W&B was already set
    up offline (a notebook after an offline run), or offline chosen at W&B's prompt; ``wandb.init`` then says so.

    Raises:
        ConfigError: no key (and no terminal to ask on) or a malformed key; says how to log in or to run offline.
    """
    import wandb

    fix = ("run `wandb login` or set WANDB_API_KEY, or run with --logger.mode offline and `wandb sync` the run's "
           "wandb/ folder later")
    env_mode = os.environ.pop("WANDB_MODE", None)  # WANDB_MODE=offline makes login a no-op; the run's mode is online
    try:
        wandb.login(verify=False)
    except wandb.errors.Error as exc:  # no key (UsageError), a malformed one (AuthenticationError), ...
        raise ConfigError(f"logger.mode online needs a W&B API key ({str(exc).strip()}): {fix}") from None
    finally:
        if env_mode is not None:
            os.environ["WANDB_MODE"] = env_mode


def wandb_attempts(run_dir: Path) -> list[tuple[str, Optional[str]]]:
    """The W&B runs started for ``run_dir`` so far, oldest first: ``(id, mode)`` per line of its
    ``wandb_run_id.txt`` (mode None for a file written before modes were recorded: one id alone)."""
    f = run_dir / WANDB_ID_FILE
    if not f.is_file():
        return []
    return [(p[0], p[1] if len(p) > 1 else None) for p in (line.split() for line in f.read_text().splitlines()) if p]


def recorded_logger_mode(run_dir: Path) -> str:
    """The W&B mode a run directory's first attempt ran in, for ``wandb_run_id.txt`` files written before modes
    were recorded: its ``config.yaml``'s ``logger.mode`` (those configs always held one; 'offline' when absent)."""
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "offline"
    mode = (cfg.get("logger") or {}).get("mode") if isinstance(cfg, dict) else None
    return WANDB_MODE_ALIASES.get(str(mode), str(mode)) if mode else "offline"


def make_logger(cfg: Namespace, run_dir: Path, config_dict: dict):
    """The Lightning logger of ``cfg.logger``: None for backend 'none'; for 'csv' a ``CSVLogger`` under
    ``run_dir/logs`` with ``config_dict`` saved as its ``hparams.yaml``; otherwise a ``WandbLogger`` saving under
    ``run_dir`` with ``config_dict`` logged as its config.

    W&B: mode :func:`wandb_mode`, passed to ``wandb.init`` explicitly (and never through Lightning's ``offline``
    flag, which set ``WANDB_MODE=dryrun`` for the whole process, so a later run in it, e.g. the next cell of
    sweep.py, stayed offline); run name = the run folder's name; group = ``logger.group``, default the run folder's
    name. Each W&B run started for ``run_dir`` adds a line '<id> <mode>' to ``run_dir/wandb_run_id.txt``. A
    ``--resume`` continues the previous W&B run (same id, ``resume='allow'``) only when both it and this one are
    online; otherwise (offline, where W&B cannot resume: a second offline-run folder with the same id restarts
    ``_step`` at 0, and syncing both clobbers the history) it starts a new W&B run with a fresh id in the same group.
    The config then also holds ``run_attempt``: ``{run_dir, attempt (1, 2, ...), previous_wandb_ids}``, so the
    attempts of one run directory can be told apart and found. The backend name and mode are checked earlier,
    by :func:`validate`."""
    spec = cfg.logger
    if spec.backend == "none":
        return None
    if spec.backend == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(save_dir=str(run_dir), name="logs")
        logger.log_hyperparams(config_dict)  # logs/version_N/hparams.yaml, written now
        return logger
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(spec)
    attempts = wandb_attempts(run_dir)
    last_id, last_mode = attempts[-1] if attempts else (None, None)
    if last_id and last_mode is None:  # an id file from before modes were recorded: the run's config says
        last_mode = recorded_logger_mode(run_dir)
    continue_id = last_id if mode == "online" and last_mode == "online" else None
    previous = list(dict.fromkeys(i for i, _ in attempts))
    logger = WandbLogger(
        project=spec.project, name=run_dir.name, save_dir=str(run_dir), offline=False, mode=mode,
        group=spec.group or run_dir.name, tags=list(spec.tags) or None,
        **({"id": continue_id, "resume": "allow"} if continue_id else {"resume": None}),
    )
    new_id = getattr(logger.experiment, "id", None)  # a str; a method on Lightning's non-rank-0 dummy experiment
    if isinstance(new_id, str) and mode != "disabled":
        id_file = run_dir / WANDB_ID_FILE
        old = id_file.read_text() if id_file.is_file() else ""
        atomic_write_text(id_file, old + ("\n" if old and not old.endswith("\n") else "") + f"{new_id} {mode}\n")
    logger.log_hyperparams({**config_dict, "run_attempt": {"run_dir": run_dir.name, "attempt": len(attempts) + 1,
                                                           "previous_wandb_ids": previous}})
    return logger


def typed_table(rows: list[dict], keys: list[str]) -> list[list]:
    """``rows`` as table data (one list per row, values in ``keys`` order) with one type per column. Rows read back
    from results.csv on ``--resume`` hold strings ('' for None) where this process's rows hold numbers, and a W&B
    Table refuses a column that mixes them. Per column: strings become numbers (int where the column's other values
    are all ints) or bools ('True'/'False') like the column's non-string values, '' becomes None; a column whose
    strings do not all convert, or whose other values are neither all numbers nor all bools, becomes all strings;
    a column of strings only is left as it is."""
    data = [[r.get(k) for k in keys] for r in rows]
    for j in range(len(keys)):
        col = [row[j] for row in data]
        others = [v for v in col if v is not None and not isinstance(v, str)]
        if not others or not any(isinstance(v, str) for v in col):
            continue
        convert = None
        if all(isinstance(v, bool) for v in others):
            names = {"True": True, "False": False, "true": True, "false": False, "": None}
            convert = names.__getitem__
        elif all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in others):
            ints = all(isinstance(v, numbers.Integral) for v in others)

            def convert(s: str):
                if s.strip() == "":
                    return None
                try:
                    return int(s)
                except ValueError:
                    if ints:
                        raise
                    return float(s)
        try:
            new = [convert(v) if isinstance(v, str) else v for v in col] if convert else None
        except (KeyError, ValueError):
            new = None
        if new is None:
            new = [None if v is None else str(v) for v in col]
        for row, v in zip(data, new):
            row[j] = v
    return data


def user_grid_rows(run_dir: Optional[Path], rows: list[dict], grids: dict) -> list:
    """One uint8 (H, W_u, 3) image per row of ``rows`` for ``final/grid``: the user's grid tensor from ``grids``
    (``str(user)`` -> float (n_u, C, H, W) in [0, 1], as :func:`user_images` builds it: up to 10 batch images, the
    raw image, the denoised image when there is one) tiled in one row as ``users/<uid>/grid.png`` is, else that PNG
    read back (users finished before a ``--resume``, or by another process); users with neither are left out."""
    import numpy as np
    from PIL import Image

    from inversion.logging_utils import to_uint8_hwc

    out = []
    for r in rows:
        g = grids.get(str(r.get("user")))
        if g is not None:
            out.append(to_uint8_hwc(g, nrow=len(g)))
            continue
        png = run_dir / str(r.get("user_dir") or "") / "grid.png" if run_dir is not None and r.get("user_dir") else None
        if png is not None and png.is_file():
            with Image.open(png) as im:
                out.append(np.asarray(im.convert("RGB")))
    return out


def log_final(logger, run_dir: Optional[Path], rows: list[dict], grids: dict, status: str = "finished") -> None:
    """Log the end of a run through ``logger`` (nothing when it is None; only the status when there are no rows):
    also for a run that was interrupted or diverged, over the users that finished.

    Logs ``final/grid``: one row per user in ``rows`` order (:func:`user_grid_rows`; a user's row is its batch (up
    to 10) | raw | denoised, padded 2 px in white as in its ``grid.png``), right-padded in white to the widest row;
    ``final/results``: the rows as a table when the logger has ``log_table`` (W&B), columns: every key in
    first-seen order, one type per column (:func:`typed_table`); ``final/<key>``: the metrics of
    :func:`summarize`; and, first of all, the run's ``status`` in the W&B run summary.
    """
    if logger is None:
        return
    if hasattr(logger, "log_table"):  # W&B: the status first, also for a run stopped before any user finished
        summary = getattr(getattr(logger, "experiment", None), "summary", None)
        if summary is not None:
            summary["status"] = status
    if not rows:
        return
    import numpy as np

    from inversion.logging_utils import log_uint8_image

    images = user_grid_rows(run_dir, rows, grids)
    if images:
        pad = 2  # to_uint8_hwc's padding: consecutive rows share one padding strip, as in one make_grid
        width = max(im.shape[1] for im in images)
        padded = [np.pad(im, ((0, 0), (0, width - im.shape[1]), (0, 0)), constant_values=255) for im in images]
        grid = np.concatenate([padded[0]] + [im[pad:] for im in padded[1:]], axis=0)
        log_uint8_image(logger, "final/grid", grid, caption="one row per user: batch (up to 10) | raw | denoised")
    if hasattr(logger, "log_table"):
        keys = list(dict.fromkeys(k for r in rows for k in r))
        logger.log_table(key="final/results", columns=keys, data=typed_table(rows, keys))
    # at the attack's last step (the CSV logger otherwise numbers the row by its buffer length: step 0 after a flush)
    last_step = max((int(float(r.get("steps") or 0)) for r in rows), default=0)
    logger.log_metrics({f"final/{k}": v for k, v in summarize(rows).items()}, step=last_step)
    if callable(getattr(logger, "save", None)):  # every Lightning logger has it (a duck-typed one may not)
        logger.save()  # CSVLogger writes only every flush_logs_every_n_steps: the final/* row was never written


def user_uid(user: User) -> str:
    """A user's folder and log name: ``user_0003`` for an integer ``user_id`` (zero-padded to 4 digits), else
    ``user_<user_id>`` verbatim for a folder or identity name (``"012"`` -> ``user_012``, ``"12"`` -> ``user_12``: two
    folders whose names differ only in leading zeros keep distinct names). results.csv's ``user_dir`` column records
    it (``users/<uid>``)."""
    uid = user.user_id
    if isinstance(uid, numbers.Integral) and not isinstance(uid, bool):
        return f"user_{int(uid):04d}"
    return f"user_{uid}"


def default_log_every(steps: int) -> int:
    """The Trainer's ``log_every_n_steps`` when ``trainer.log_every_n_steps`` is not set: about 200 points per loss
    curve (every step up to 399 steps; every 20th at 4,000). Lightning's own default, 50, left a 20-step run with no
    curve at all and the 200-step default with 4 points."""
    return max(1, int(steps) // 200)


def effective_attack_seed(attack_seed: int, run_seed: int) -> int:
    """The seed the attack runs with: ``attack.init_args.seed`` when the run's ``--seed`` is 0 (the default, as
    every shipped report ran), else a ``numpy.random.SeedSequence([attack_seed, run_seed])`` draw (in [0, 2**63)).
    So ``--seed`` (a sweep's seed axis) gives the attack new initial images and noise draws while the users (their
    own ``users.init_args.seed``) and seeded defenses stay the same; two runs differing only in ``--seed`` are two
    independent attacks on the same clients."""
    if int(run_seed) == 0:
        return int(attack_seed)
    import numpy as np

    state = np.random.SeedSequence([int(attack_seed) % 2**63, int(run_seed) % 2**63]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def users_per_step_of(attack_cls, attack_kwargs: dict, num_users: Optional[int] = None) -> int:
    """``attack.init_args.users_per_step`` (default 1), checked before any long work; against ``num_users`` too
    when it is known (an int: the source's setting, or the users built).

    Raises:
        ConfigError: not an integer >= 1, > 1 for an attack that attacks one user per fit, or more than the users.
    """
    per_step = attack_kwargs.get("users_per_step", 1)
    if isinstance(per_step, bool) or not isinstance(per_step, int) or per_step < 1:
        raise ConfigError(f"attack.init_args.users_per_step must be an integer >= 1, got {per_step!r}")
    if per_step > 1 and not getattr(attack_cls, "supports_many_users", False):
        raise ConfigError(f"{attack_cls.__name__} attacks one user per run: users_per_step must be 1, got {per_step}")
    if isinstance(num_users, int) and per_step > num_users:
        raise ConfigError(f"attack.init_args.users_per_step ({per_step}) is larger than the number of users "
                          f"({num_users}): set it to at most {num_users}")
    return per_step


def user_chunks(indexed_users: list, per_step: int, done: set[str]) -> list[list]:
    """Group one rank's users ``[(index, User), ...]`` into consecutive chunks of ``per_step``, then drop the finished
    users (``done``: user ids as strings) and empty chunks.

    Chunks are cut from the whole shard before finished users are dropped, so a resumed run forms the same chunks
    (and finds an interrupted chunk's checkpoint) as the run it continues.
    """
    chunks = [indexed_users[k : k + per_step] for k in range(0, len(indexed_users), per_step)]
    chunks = [[(i, u) for i, u in c if str(u.user_id) not in done] for c in chunks]
    return [c for c in chunks if c]


def chunk_name(uids: list[str]) -> str:
    """Name of a chunk's checkpoint folder and log prefix: the user's uid alone (one user, as before), else
    ``<first uid>_to_<last uid>`` (chunks are disjoint, so the first uid already identifies one)."""
    return uids[0] if len(uids) == 1 else f"{uids[0]}_to_{uids[-1]}"


PARTIAL_DIR = "partial"  # rows of ranks > 0, written as each user finishes (merged into results.csv by rank 0)


# trainer settings that say where and how visibly a run executes, not what it computes: a resume may change them
# (e.g. a run started with accelerator 'cpu' continued under 'auto' on the same machine, or on more processes);
# results.csv records each user's device. precision and the rest must match.
RESUMABLE_TRAINER_KEYS = ("accelerator", "devices", "strategy", "num_nodes", "enable_progress_bar",
                          "enable_model_summary", "log_every_n_steps")


def comparable_config(parser: ArgumentParser, cfg: Namespace) -> dict:
    """The config as a flat dict (dotted keys) without the keys that may differ between a run and its resume:
    ``resume``, ``output``, ``checkpoint_every``, ``logger``, the image logging intervals (``image_log_every``,
    ``attack.init_args.log_images_every``: what is logged, not what is computed) and
    :data:`RESUMABLE_TRAINER_KEYS`."""
    d = json.loads(dump_config(parser, cfg, "json"))
    for k in ("resume", "output", "checkpoint_every", "logger", "image_log_every"):
        d.pop(k, None)
    ((d.get("attack") or {}).get("init_args") or {}).pop("log_images_every", None)
    for k in RESUMABLE_TRAINER_KEYS:
        (d.get("trainer") or {}).pop(k, None)
    return flat_entries(d)


ATTACK_SEED_FILE = "attack_seed.txt"  # in the run directory: the attack's effective seed (effective_attack_seed)


def check_recorded_attack_seed(run_dir: Path, cfg: Namespace, what: str, fix: str) -> None:
    """Under ``--seed`` S != 0, refuse to continue ``run_dir`` unless its ``attack_seed.txt`` holds the effective
    seed ``cfg`` gives (run directories made before --seed was mixed into the attack's seed lack the file: their
    users were attacked with the unmixed seed). With S = 0 the seed is the configured one, as it always was.

    Raises:
        ConfigError: ``"<what> <run_dir>: this run's attack seed is ..., not ...; <fix>"``.
    """
    if int(cfg.seed or 0) == 0:
        return
    want = effective_attack_seed((cfg.attack.init_args or {}).get("seed") or 0, cfg.seed)
    seed_file = run_dir / ATTACK_SEED_FILE
    had = seed_file.read_text().strip() if seed_file.is_file() else None
    if had != str(want):
        why = had or ("not recorded (made before --seed was mixed into the attack seed: its users were attacked with "
                      "the unmixed seed)")
        raise ConfigError(f"{what} {run_dir}: this run's attack seed is {why}, not {want} as --seed {cfg.seed} gives "
                          f"now; {fix}")


DEFENSE_SEEDS_FILE = "defense_seeds.txt"  # in the run directory: how its clients' defense seeds were derived
DEFENSE_SEEDS_SCHEME = "seedsequence-v1"  # defense_seed since 2026-12-01 (before: seed + user index, no file)


def seeded_random_defenses(threat) -> bool:
    """True when a configured defense draws random numbers from a configured ``seed`` (Gaussian noise with sigma *
    C > 0, stochastic quantisation): its draws then depend on how :func:`defense_seed` turns that seed into a
    client's stream."""
    from inversion.defenses import build_defenses

    specs = [dict(d) for d in (getattr(threat, "defenses", None) or [])]
    return any(d.get("seed") is not None and not build_defenses([dict(d, seed=None)]).reproducible for d in specs)


def check_recorded_defense_seeds(run_dir: Path, cfg: Namespace, what: str, fix: str) -> None:
    """Refuse to continue ``run_dir`` when ``cfg`` has a seeded random defense (:func:`seeded_random_defenses`) and
    the run's ``defense_seeds.txt`` does not name :data:`DEFENSE_SEEDS_SCHEME`: its clients' noise was drawn another
    way (run directories made before 2026-12-01 lack the file: seed + user index), so the users still to come, or a
    rebuilt server view, would get other noise than the finished ones had.

    Raises:
        ConfigError: ``"<what> <run_dir>: its clients' defense noise was drawn with ...; <fix>"``.
    """
    if not seeded_random_defenses(cfg.threat):
        return
    f = run_dir / DEFENSE_SEEDS_FILE
    had = f.read_text().strip() if f.is_file() else None
    if had != DEFENSE_SEEDS_SCHEME:
        why = had or "seed + user index (a run made before 2026-12-01, when attack.defense_seed changed)"
        raise ConfigError(f"{what} {run_dir}: its clients' defense noise was drawn with {why}, not "
                          f"{DEFENSE_SEEDS_SCHEME} as now, so its remaining users would get other noise; {fix}")


MODELS_FILE = "models.json"  # in the run directory: fingerprints of the model files the run used (model_fingerprints)
_MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")


def _files_digest(path: Path, only: Optional[tuple[str, ...]] = None) -> str:
    """SHA-256 over a model file, or over a folder's weight and config files (``_MODEL_SUFFIXES``; ``only``: these
    file names alone), each with its path relative to the folder; model cards and images do not count."""
    import hashlib

    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and f.suffix in _MODEL_SUFFIXES and (only is None or f.name in only))
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def model_fingerprints(init: Namespace, uses_prior: bool) -> dict[str, str]:
    """``{role: sha256}`` of the model files a run reads: the victim's folder (only its ``config.json`` for a
    random-initialised victim: its weights are not used), the prior's (when the attack uses it; a hub id is
    recorded as ``hub:<id>``) and the evaluator's. Written to ``models.json`` at a run's start and compared by
    ``--resume``: retraining a checkpoint in place between two parts of a run would otherwise mix users attacked
    with two different models in one results.csv."""
    out: dict[str, str] = {}
    roles = [("victim", init.victim.checkpoint, ("config.json",) if init.victim.random_init else None),
             ("prior", init.prior.path if uses_prior else None, None),
             ("evaluator", init.evaluation.evaluator, None)]
    for role, value, only in roles:
        if not value:
            continue
        found = find_input_path(value)
        out[role] = _files_digest(found, only) if found.exists() else f"hub:{value}"
    return out


def check_model_fingerprints(run_dir: Path, now: dict[str, str]) -> None:
    """Refuse to resume ``run_dir`` when a model its users were attacked with has changed on disk since (see
    :func:`model_fingerprints`); run directories made before ``models.json`` existed are not checked.

    Raises:
        ConfigError: naming the changed model(s) and the fix.
    """
    f = run_dir / MODELS_FILE
    if not f.is_file():
        return
    then = json.loads(f.read_text())
    changed = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
    if changed:
        raise ConfigError(f"--resume {run_dir}: the {', '.join(changed)} model files changed since this run started "
                          f"(retrained or replaced in place; {MODELS_FILE} records their SHA-256), so its users would "
                          "be attacked or evaluated with two different models; run without --resume for a new run "
                          "directory, or put the original files back")


def resume_command(run_dir: Path) -> str:
    """The shell command that continues ``run_dir`` (printed on Ctrl-C and on a diverged or failed run): attack.py
    by its path from the current directory (``attack.py`` in the repository root, its absolute path elsewhere),
    every argument quoted for the shell."""
    script = "attack.py" if Path.cwd().resolve() == ROOT else str(ROOT / "attack.py")
    q = shlex.quote
    return f"python {q(script)} --config {q(str(run_dir / 'config.yaml'))} --resume {q(str(run_dir))}"


def open_resume_dir(parser: ArgumentParser, cfg: Namespace) -> tuple[Path, list[dict]]:
    """Check that ``cfg.resume`` is a run directory of the same config; return it and its finished rows.

    Raises:
        ConfigError: not a run directory, or one made from another config (the differing keys are named), or a
            run with ``--seed`` other than 0 whose directory does not record the same effective attack seed
            (``attack_seed.txt``; run directories made before --seed was mixed into the attack's seed lack it,
            and their users were attacked with the unmixed seed), or a run with a seeded random defense whose
            directory does not record the current client seed scheme (:func:`check_recorded_defense_seeds`).
    """
    run_dir = Path(os.path.expanduser(str(cfg.resume)))
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory of attack.py (no config.yaml)")
    old = comparable_config(parser, parse_run_config(parser, run_dir, "--resume"))
    new = comparable_config(parser, cfg)
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ConfigError(f"--resume {run_dir}: resume directory from another config (differs in {diff}); "
                          "run without --resume for a new run directory")
    check_recorded_attack_seed(run_dir, cfg, "--resume", "run without --resume for a new run directory")
    check_recorded_defense_seeds(run_dir, cfg, "--resume", "run without --resume for a new run directory")
    rows: list[dict] = []
    if (run_dir / "results.csv").is_file():
        with (run_dir / "results.csv").open() as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
        if reader.fieldnames and "user" not in reader.fieldnames:
            raise ConfigError(f"--resume {run_dir}: its results.csv has no header row naming a 'user' column (first "
                              f"line: {','.join(reader.fieldnames[:4])},...); it was edited or cut: restore it "
                              "(attack.py writes it whole, header first) or move it aside to attack every user again")
    return run_dir, with_partial_rows(run_dir, rows)  # users of ranks > 0 not merged (a hard stop)


def parse_run_config(parser: ArgumentParser, run_dir: Path, what: str) -> Namespace:
    """``run_dir/config.yaml`` parsed by ``parser`` (attack.py's), argparse's own error output swallowed.

    Raises:
        ConfigError: it does not parse (written by another version of attack.py, or edited): one line naming the
            file and the parser's reason, instead of a usage message that read as a fault of the command line.
    """
    path = run_dir / "config.yaml"
    exit_on_error, parser.exit_on_error = parser.exit_on_error, False
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return parser.parse_path(str(path))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - jsonargparse raises ArgumentError (or exits)
        reason = " ".join(str(exc).split())[:400] or type(exc).__name__
        raise ConfigError(f"{what} {run_dir}: its config.yaml does not parse with this version of attack.py "
                          f"({reason}); it was written by another version or edited: fix {path}, or start a new "
                          "run") from None
    finally:
        parser.exit_on_error = exit_on_error


def with_partial_rows(run_dir: Path, rows: list[dict]) -> list[dict]:
    """``rows`` plus the rows of ``run_dir/partial/rank*.csv`` (written by ranks > 0 as each user finished) of users
    ``rows`` lacks, each user once (the first row found); ``rows`` is extended in place and returned."""
    seen = {str(r["user"]) for r in rows}
    for part in sorted((run_dir / PARTIAL_DIR).glob("rank*.csv")):
        for r in csv.DictReader(part.open()):
            if str(r["user"]) not in seen:
                rows.append(r)
                seen.add(str(r["user"]))
    return rows


#: the process group's timeout: the only collective is the final gather of every rank's users (gather_ranks), where a
#: rank that finished its shard waits for the slowest one; torch's default 30 min was shorter than one user's attack
#: in some cells (DLG at B = 100 takes ~1 h per user on a CPU core), so the gather failed although no rank had.
DDP_GATHER_TIMEOUT = timedelta(hours=24)


def start_distributed(cfg: Namespace, trainer_kwargs: dict):
    """With ``trainer.strategy: ddp`` (or auto with several devices: :func:`distributed`), launch one process per
    device through Lightning Fabric (subprocess launcher, torchrun or SLURM, as Lightning detects) and return the
    Fabric object; the per-user Trainers then run on the process's own device. Returns None for a single process."""
    if not distributed(trainer_kwargs):
        return None
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    fabric = Fabric(
        accelerator=trainer_kwargs.get("accelerator", "auto"), devices=trainer_kwargs.get("devices", "auto"),
        num_nodes=trainer_kwargs.get("num_nodes", 1), strategy=DDPStrategy(timeout=DDP_GATHER_TIMEOUT),
    )
    fabric.launch()
    trainer_kwargs.update(strategy="auto", num_nodes=1)
    # the process's own GPU: Lightning puts rank k on the k-th device of the list (devices [1, 3]: rank 1 on cuda:3),
    # so its index, not the rank number (which ran rank 1 on cuda:1, another process's or nobody's GPU)
    trainer_kwargs["devices"] = [fabric.device.index] if fabric.device.type == "cuda" else 1
    return fabric


def check_run_args(cfg: Namespace) -> None:
    """The top-level run settings' ranges, checked by :func:`prepare` (so also by sweep.py's pre-check of every cell
    and by refinish): ``--seed`` in Lightning's ``seed_everything`` range, ``--checkpoint_every`` >= 0, and
    ``--image_log_every`` >= 0, ``output.name`` one plain folder name and ``output.root`` a folder or a path that can
    become one (not checked with ``--resume``, which makes no new directory).

    Raises:
        ConfigError: naming the key, its value and the allowed values.
    """
    seed = cfg.get("seed")
    if seed is not None and not 0 <= int(seed) <= 2**32 - 1:  # seed_everything's own error named numpy, not --seed
        raise ConfigError(f"--seed must be an integer in [0, 2**32 - 1] (Lightning's seed_everything), got {seed}")
    if int(cfg.get("checkpoint_every") or 0) < 0:
        raise ConfigError(f"--checkpoint_every must be >= 0 (0: no mid-user checkpoints), got {cfg.checkpoint_every}")
    if int(cfg.get("image_log_every") or 0) < 0:  # step % -k == 0 at every step: an image logged every step
        raise ConfigError(f"--image_log_every must be >= 0 (0: the attack's own log_images_every), got "
                          f"{cfg.image_log_every}")
    output = cfg.get("output")
    if output is not None and not cfg.get("resume"):  # a resume makes no directory (names of older runs are kept)
        try:
            check_run_name(output.get("name") or "")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        root = Path(str(output.get("root") or ".")).expanduser()
        try:
            blocking = next((p for p in (root, *root.parents) if p.exists() or p.is_symlink()), None)
        except OSError:  # an unreadable ancestor: making the run directory says what is wrong
            blocking = None
        if blocking is not None and not blocking.is_dir():  # was "[Errno 17] File exists" when making the run dir
            raise ConfigError(f"output.root {output.get('root')}: {blocking} is "
                              + ("a broken symbolic link" if blocking.is_symlink() and not blocking.exists() else
                                 "a file, not a folder") + "; give a folder (it is created if missing)")


def prepare(parser: ArgumentParser, cfg: Namespace):
    """Everything a run needs that can fail fast, loaded and checked before any long work: the instantiated config
    groups, the user source (checked), the victim, the attack class and its init kwargs (validated, users_per_step
    included, by a probe instance), the prior (only when the attack uses it), the evaluator; the face models and the
    LPIPS weights are checked for presence when evaluation asks for them. Used by :func:`run` and
    ``scripts/refinish.py``.

    Returns:
        (init, source, victim, attack_cls, attack_kwargs, prior or None, evaluator or None).
    Raises:
        ConfigError (or the loaders' own errors): whatever is wrong, with how to fix it.
    """
    check_run_args(cfg)
    try:
        init = parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)
    except ValueError as exc:  # a user source's own argument checks, wrapped by jsonargparse in a Union-type dump
        raise ConfigError(AttackArgumentParser.clarify(str(exc))) from exc
    source: UserSource = init.users
    for key in ("seed", "holdout_seed"):  # numpy's default_rng said only "expected non-negative integer"
        value = getattr(source, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"users.init_args.{key} must be an integer >= 0 (numpy's default_rng seeds), got {value}")
    source.check()
    victim, victim_cfg = load_victim(init.victim)
    validate(cfg, source, victim_cfg)
    from inversion.scenario import check_victim_parameters_used

    try:  # every client update and attack differentiates all trainable parameters: check once, before any user
        check_victim_parameters_used(victim, source.image_shape)
    except ValueError as exc:
        raise ConfigError(f"victim: {exc}") from None
    attack_cls = resolve_attack_class(cfg.attack.class_path)
    attack_kwargs = dict(cfg.attack.init_args or {})
    attack_kwargs["seed"] = effective_attack_seed(attack_kwargs.get("seed") or 0, cfg.seed or 0)
    users_per_step_of(attack_cls, attack_kwargs, getattr(source, "num_users", None))  # folder users: None = all
    try:
        attack_cls.check_precision(cfg.trainer.precision)
    except ValueError as exc:
        raise ConfigError(f"trainer.precision: {exc}") from None
    try:  # validates the attack's hyper-parameters; the message names the config group they come from
        probe = attack_cls(**attack_kwargs)
    except ValueError as exc:
        raise ConfigError(f"attack.init_args ({attack_cls.__name__}): {exc}") from None
    try:  # the attack against the threat model (B revealed? labels known?): bind would say so only per user
        probe.check_threat(getattr(source, "batch_size", None), bool(cfg.threat.reveal_batch_size),
                           bool(cfg.threat.known_labels))
    except ValueError as exc:
        raise ConfigError(f"attack vs threat: {exc}") from None
    prior = None
    if getattr(probe, "requires_prior", False):
        if not init.prior.path:
            raise ConfigError("this attack uses the diffusion prior: set prior.path to a diffusers DDPM folder or hub id")
        prior = load_prior(init.prior, source.image_shape)
        if hasattr(probe, "check_prior"):
            try:  # timesteps against the prior's T: before any run directory
                probe.check_prior(prior)
            except ValueError as exc:
                raise ConfigError(f"attack.init_args: {exc}") from None
    evaluator = None
    if init.evaluation.evaluator:
        from lightning_modules.classifier import load_classifier

        ev_path = Path(init.evaluation.evaluator)
        evaluator, ev_cfg = load_classifier(find_input_path(ev_path))
        C, H = source.image_shape[0], source.image_shape[-1]
        if ev_cfg["in_channels"] != C:
            raise ConfigError(f"evaluator {ev_path} takes {ev_cfg['in_channels']} channels, the users have {C}")
        if ev_cfg.get("image_size", H) != H:  # its pooling head accepts any size: it would run, and mean nothing
            raise ConfigError(f"evaluator {ev_path} was trained on {ev_cfg['image_size']} px images, the users' are "
                              f"{H} px: train an evaluator at {H} px (configs/train/evaluator_*.yaml, "
                              "--data.init_args.image_size) or set evaluation.evaluator: null")
        if ev_cfg["num_classes"] < source.num_classes:  # it failed after the first user's attack (IndexError)
            raise ConfigError(f"evaluator {ev_path} has {ev_cfg['num_classes']} outputs but the users have "
                              f"{source.num_classes} classes: use an evaluator trained on the users' classes or set "
                              "evaluation.evaluator: null")
    gallery = int(init.evaluation.face_gallery_users or 0)
    if gallery < 0:
        raise ConfigError(f"evaluation.face_gallery_users is {gallery}: set it to 0 (compare with the run's other "
                          "users) or K > 0 (users 0..K-1 as the impostor gallery; used with evaluation.faces: true)")
    if gallery and init.evaluation.faces:
        try:  # too few identities, missing photos: before any attack
            source.gallery(gallery).check()
        except (ValueError, NotImplementedError) as exc:
            raise ConfigError(f"evaluation.face_gallery_users = {gallery}: {exc}") from None
    if init.evaluation.faces:
        from inversion.faces import _dlib_models, _gender_model

        _dlib_models(), _gender_model()  # raises FaceModelsMissing with the pip command before any attack
    if init.evaluation.lpips:
        from inversion.metrics import get_lpips_model

        get_lpips_model()  # raises with the install command when the AlexNet weights are missing
    return init, source, victim, attack_cls, attack_kwargs, prior, evaluator


def histogram_text(user: User) -> str:
    """The user's label counts as results.csv writes them (``true_histogram``): 'n_0 n_1 ... n_{K-1}'."""
    return " ".join(str(int(v)) for v in user.label_histogram.tolist())


def counts_text(inferred) -> str:
    """A label inference's estimated counts as results.csv writes them (``inferred_counts``)."""
    return " ".join(f"{float(v):g}" for v in inferred.counts.tolist())


def scenario_columns(method: str, user: User, inferred, init: Namespace) -> dict[str, Any]:
    """The leading results.csv columns of one user: who it is (and its folder under the run directory), its
    ground-truth label histogram (evaluation side),
    the server's label inference, and the threat model (protocol; under FedAvg its local epochs, lr, mini-batch size
    (B when 0 or above B: one full-batch step per epoch), shuffling and local SGD steps; defenses; victim
    initialisation)."""
    defense_name, defense_strength = defense_label([dict(d) for d in init.threat.defenses])
    threat = init.threat
    fedavg = {}
    if threat.protocol == "fedavg":  # the local training the weight difference came from
        from inversion.fedavg import local_steps_for

        b = min(threat.fedavg_batch_size or user.batch_size, user.batch_size)
        fedavg = {"fedavg_epochs": threat.fedavg_epochs, "fedavg_lr": threat.fedavg_lr, "fedavg_batch_size": b,
                  "fedavg_shuffle": bool(threat.fedavg_shuffle),
                  "fedavg_local_steps": local_steps_for(user.batch_size, threat.fedavg_epochs, b)}
    return {
        "user": user.user_id, "user_dir": f"users/{user_uid(user)}", "method": method, "B": user.batch_size,
        "dominant_class": user.dominant_class,
        "true_histogram": histogram_text(user),
        "inferred_dominant": inferred.dominant,
        "inferred_counts": counts_text(inferred),
        "label_strategy": inferred.strategy,
        "inferred_informative": bool(inferred.informative),  # False: no class proven present, the labels are a guess
        "protocol": init.threat.protocol,
        **fedavg,
        "defense": defense_name,
        "defense_strength": defense_strength,
        "victim_init": "random" if init.victim.random_init else "trained",
    }


def user_row(attack, user: User, result: AttackResult, init: Namespace, evaluator, victim,
             gallery: tuple[list[User], str], device: str) -> dict[str, Any]:
    """One user's results.csv row before its timing columns: :func:`scenario_columns`, the attack's final stage, the
    device it ran on, :func:`evaluate` and (when configured) :func:`face_columns` against ``gallery`` (the pair
    :func:`face_gallery` returns). Used by :func:`run` and ``scripts/refinish.py``."""
    row = scenario_columns(type(attack).__name__, user, result.labels, init)
    row["final_stage"] = getattr(attack, "final_stage_name", "none")
    row["device"] = device
    if "diverged_restarts" in result.extras:  # Inverting Gradients: restarts dropped as non-finite (0 normally)
        row["diverged_restarts"] = len(result.extras["diverged_restarts"])
    row.update(evaluate(result, user, evaluator, init.evaluation.lpips, victim))
    if init.evaluation.faces:
        final = result.denoised if result.denoised is not None else result.representative
        row.update(face_columns(final, user, *gallery))
    return row


def user_images(user: User, result: AttackResult) -> dict[str, torch.Tensor]:
    """The images :func:`write_user` saves for one user: batch, raw, reconstructions (baselines), denoised,
    candidates (final candidate selection) and the grid (up to 10 batch images | raw | denoised)."""
    images = {"batch": user.images, "raw": result.representative}
    if result.reconstructions.shape[0] > 1:
        images["reconstructions"] = result.reconstructions
    if result.denoised is not None:
        images["denoised"] = result.denoised
    if result.extras.get("candidates") is not None:
        images["candidates"] = result.extras["candidates"]
    images["grid"] = torch.cat([user.images[: min(user.batch_size, 10)], result.representative,
                                *([result.denoised] if result.denoised is not None else [])])
    return images


def models_line(victim: torch.nn.Module, prior) -> str:
    """One line for the run's start: what the attack optimises (the dummy images only) and what stays fixed (the
    victim's and the prior's weights, with their parameter counts). It replaces Lightning's model summary, which
    lists the victim's weights as "trainable" because they require grad (``trainer.enable_model_summary: true``
    brings that summary back, printed at each user's fit)."""
    def millions(module) -> str:
        return f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f} M"

    unet = getattr(prior, "unet", None)
    return ("[attack] optimised: the dummy image(s) only; fixed: the victim's weights ("
            + millions(victim) + ", the target and dummy gradients are taken with respect to them)"
            + (f" and the prior's UNet ({millions(unet)})" if unet is not None else ""))


def run(cfg: Namespace) -> Path:
    """Run the configured attack on every user; returns the run directory. See the module docstring.

    While it runs, the first process holds ``RUN_DIR/attack.lock`` (:func:`lock_run_dir`): a second attack.py
    resuming the same run directory meanwhile stops with a ConfigError before any work (both attacked the same users
    and wrote the same results.csv)."""
    with contextlib.ExitStack() as locks:
        return _run(cfg, locks)


RUN_LOCK_FILE = "attack.lock"
#: environment variables by which launchers tell a process its (global, local or node) rank
LAUNCHER_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_LOCALID",
                           "JSM_NAMESPACE_RANK", "JSM_NAMESPACE_LOCAL_RANK", "OMPI_COMM_WORLD_RANK",
                           "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK")


def lock_run_dir(locks: contextlib.ExitStack, run_dir: Path) -> bool:
    """Take ``run_dir/attack.lock`` (flock, :func:`inversion.fsutils.exclusive_lock`) until ``locks`` closes, in the
    first process only: a multi-process run's other processes share it (any launcher rank variable set and not 0:
    :data:`LAUNCHER_RANK_VARIABLES`, torchrun's, Lightning's, SLURM's, LSF's, MPI's).

    Returns:
        False when ``run_dir`` cannot be written (read-only: permissions or filesystem) and its summary.json says
        "finished": no lock is needed to read it; the caller must then refuse any work that would write there.
        True otherwise.

    Raises:
        ConfigError: another process holds it (a run or a --resume of this directory still going), naming it; or
        ``run_dir`` is read-only and the run is not finished (a resume writes results there)."""
    if any(os.environ.get(k, "0").strip() not in ("", "0") for k in LAUNCHER_RANK_VARIABLES):
        return True

    def busy(who: str) -> ConfigError:
        return ConfigError(f"{run_dir} is in use by another attack.py ({who}): wait for it to end (or stop it), then "
                           "resume; two processes on one run directory attack the same users and write the same files")

    try:
        locks.enter_context(exclusive_lock(run_dir / RUN_LOCK_FILE, busy))
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        if run_status(run_dir) == "finished":
            return False
        raise ConfigError(f"--resume {run_dir}: the directory is not writable ({exc.strerror}), and a resume writes "
                          "its results there: make it writable, or copy it somewhere writable and resume the copy") \
            from None
    return True


def set_aside_unreadable_checkpoint(path: Path, name: str) -> Optional[Path]:
    """Check that a chunk's ``last.ckpt`` loads before a resume continues from it; one that does not (truncated by
    a kill or a full disk while Lightning wrote it, which it does in place) is renamed to
    ``last.unreadable-<time>.ckpt`` beside it, with one line saying so, and the chunk ``name`` starts again, as
    without a checkpoint. Without this, every --resume failed on it with a traceback and status 'failed: OSError'.

    Only the errors a cut-short file gives count (EOFError, UnpicklingError, torch's zip-reader RuntimeError, EINVAL
    from a short zip): anything else (an import error of a pickled class, an I/O error, out of memory) propagates,
    and the file stays where it is.

    Returns:
        The new path of a set-aside checkpoint; None when ``path`` loads (or is gone)."""
    import pickle
    import re

    try:
        torch.load(path, map_location="cpu", weights_only=False)
        return None
    except FileNotFoundError:
        return None
    except (EOFError, pickle.UnpicklingError, RuntimeError, OSError) as exc:
        text = " ".join(str(exc).split())
        truncated = (isinstance(exc, (EOFError, pickle.UnpicklingError))
                     or (isinstance(exc, RuntimeError) and re.search(r"PytorchStreamReader|zip archive|central "
                                                                     r"directory", text) is not None)
                     or (isinstance(exc, OSError) and exc.errno == errno.EINVAL))
        if not truncated:  # e.g. a passing I/O error, or a module the pickle names is gone: the file may be fine
            raise
        reason = f"{type(exc).__name__}: {text[:200]}"
    bad = path.with_name(f"last.unreadable-{time.strftime('%Y%m%d-%H%M%S')}.ckpt")
    os.replace(path, bad)
    print(f"[attack] {name}: its checkpoint {path} cannot be read ({reason}); set aside as {bad.name}, {name} "
          "starts again from step 0", file=sys.stderr, flush=True)
    return bad


def _run(cfg: Namespace, locks: contextlib.ExitStack) -> Path:
    """:func:`run`'s body; ``locks`` holds the run directory's lock."""
    from lightning import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    check_run_args(cfg)  # before seed_everything (prepare checks again, for its other callers)
    seed_everything(cfg.seed, workers=True, verbose=False)
    # 1. everything that can fail fast, before any long work
    check_devices(dict(cfg.trainer))
    parser = build_parser()
    resume_rows: list[dict] = []
    writable = True
    if cfg.resume:
        run_dir, resume_rows = open_resume_dir(parser, cfg)
        # before anything is loaded: a resume of a directory in use stops here
        writable = lock_run_dir(locks, run_dir)
    init, source, victim, attack_cls, attack_kwargs, prior, evaluator = prepare(parser, cfg)
    steps = attack_kwargs.get("steps")
    if cfg.checkpoint_every and isinstance(steps, int) and cfg.checkpoint_every > steps:
        rank_zero_warn(f"--checkpoint_every {cfg.checkpoint_every} is above the attack's {steps} steps: no checkpoint "
                       "is saved mid-user (an interrupted user starts again); use a value below the steps",
                       stacklevel=2)
    fingerprints = model_fingerprints(init, prior is not None)
    if cfg.resume:
        check_model_fingerprints(run_dir, fingerprints)
    from inversion.scenario import victim_num_outputs

    victim_classes = victim_num_outputs(victim, source.image_shape)  # the server's label space
    users = source.users()
    per_step = users_per_step_of(attack_cls, attack_kwargs, len(users))
    gallery = face_gallery(init, source, users)  # the identity columns' impostors (faces only)
    names = getattr(source, "class_names", None)

    def named(label) -> str:  # "5 Sandal" where the source names its classes (an in-range integer label)
        ok = names and isinstance(label, numbers.Integral) and not isinstance(label, bool) and 0 <= label < len(names)
        return f"{label} {names[int(label)]}" if ok else str(label)

    trainer_kwargs = {k: v for k, v in dict(cfg.trainer).items() if v is not None}
    trainer_kwargs.setdefault("enable_progress_bar", True)
    # Lightning's summary counts the victim's weights as trainable (they require grad: the dummy gradient is taken
    # with respect to them) and printed it for every user: models_line says what is optimised, once per run
    trainer_kwargs.setdefault("enable_model_summary", False)
    full_float32(str(trainer_kwargs.get("precision", "32-true")))
    fabric = start_distributed(cfg, trainer_kwargs)
    rank, world = (fabric.global_rank, fabric.world_size) if fabric else (0, 1)
    # 2. the run directory (rank 0 makes it; the others get its path)
    if not cfg.resume:
        run_dir = new_run_dir(init.output.root, init.output.name) if rank == 0 else None
        if fabric:
            run_dir = Path(fabric.broadcast(str(run_dir) if run_dir else None, src=0))
        if rank == 0:
            lock_run_dir(locks, run_dir)  # a new directory: taken before its config.yaml makes it resumable
            atomic_write_text(run_dir / "config.yaml", dump_config(parser, cfg))
            atomic_write_text(run_dir / ATTACK_SEED_FILE, f"{attack_kwargs['seed']}\n")
            atomic_write_text(run_dir / DEFENSE_SEEDS_FILE, DEFENSE_SEEDS_SCHEME + "\n")
            atomic_write_text(run_dir / MODELS_FILE, json.dumps(fingerprints, indent=1) + "\n")
    config_dict = json.loads(dump_config(parser, cfg, "json"))
    done = {str(r["user"]) for r in resume_rows}
    rows: list[dict] = list(resume_rows)
    grids: dict[str, torch.Tensor] = {}  # str(user) -> grid, this process's users (rank 0: every rank's, gathered)
    local: list[tuple[int, dict, torch.Tensor]] = []  # (user index, row, grid) of this rank's users (ranks > 0)
    status = "running"
    logger = None
    name = ""
    shard = [(i, u) for i, u in enumerate(users) if i % world == rank]
    chunks = user_chunks(shard, per_step, done)
    resume_hint = resume_command(run_dir)
    if cfg.resume and world == 1 and not chunks and len(done) == len(users):
        if run_status(run_dir) == "finished":
            print(f"[attack] {run_dir} is finished ({len(users)} users); nothing to resume", flush=True)
            return run_dir  # no logger: an offline W&B run of nothing was started and recorded otherwise
    if cfg.resume and not writable:  # finished (lock_run_dir), multi-process: the check above is one-process only
        left = len(users) - len(done)
        raise ConfigError(f"--resume {run_dir}: the directory is not writable and the run is finished"
                          + (f", yet this resume has {left} of {len(users)} users left to attack: copy it somewhere "
                             "writable and resume the copy" if left else f" ({len(users)} users): nothing to resume"))
    try:  # from here on summary.json says how the run ended, even for a Ctrl-C while W&B starts
        logger = make_logger(cfg, run_dir, config_dict) if rank == 0 else None
        if rank == 0:
            print(f"[attack] run directory: {run_dir}  ({len(users)} users, {len(done)} already done, "
                  f"B = {getattr(source, 'batch_size', '?')}, {world} process(es)"
                  + (f", {per_step} users per step" if per_step > 1 else "") + ")", flush=True)
            print(models_line(victim, prior), flush=True)
        for chunk in chunks:
            uids = [user_uid(u) for _, u in chunk]
            name = chunk_name(uids)
            records: list[dict] = [{} for _ in chunk]  # evaluation side: each update's norm before defenses
            views = []
            for (i, user), rec in zip(chunk, records):
                try:
                    views.append(client_update(victim, user, init.threat, victim_classes, user_index=i, record=rec))
                except (TargetGradientError, ClientDivergedError) as exc:  # name the user (a one-user chunk's
                    if len(chunk) == 1 and isinstance(exc, ClientDivergedError):  # "stopped" line names it already)
                        raise
                    raise type(exc)(f"{user_uid(user)}: {exc}") from None
            attack: GradientInversionAttack = attack_cls(**attack_kwargs, log_prefix=f"{name}/")
            attack.log_images_every = cfg.image_log_every or attack.log_images_every
            if len(chunk) == 1:
                attack.bind(views[0], prior)
            else:  # many users per step: one module, one fit, each user logged under its own prefix
                attack.bind(views, prior, log_prefixes=[f"{uid}/" for uid in uids])
            callbacks = []
            if trainer_kwargs["enable_progress_bar"]:
                callbacks.append(TQDMProgressBar(refresh_rate=max(1, attack.steps // 100)))
            ckpt_dir = run_dir / "checkpoints" / name
            if cfg.checkpoint_every:
                # no version counter: a run directory moved between resumes made Lightning save last-v1.ckpt
                # (its recorded dirpath differs), which the next --resume (reading last.ckpt) never found
                callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=cfg.checkpoint_every,
                                                 save_last=True, save_top_k=0, enable_version_counter=False))
            trainer = Trainer(
                max_steps=attack.steps, logger=logger if logger is not None else False,
                enable_checkpointing=bool(cfg.checkpoint_every), default_root_dir=str(run_dir / "lightning"),
                enable_autolog_hparams=False, num_sanity_val_steps=0, callbacks=callbacks,
                **{"log_every_n_steps": default_log_every(attack.steps), **trainer_kwargs},
            )
            last = ckpt_dir / "last.ckpt"
            resumed_from = last.is_file() and set_aside_unreadable_checkpoint(last, name) is None
            t0 = time.time()
            attack.wall_clock_start = t0
            try:
                with intended_warnings_silenced():  # Lightning's warnings an attack fit raises by design
                    trainer.fit(attack, ckpt_path=str(last) if resumed_from else None)
            except SystemExit:  # Lightning turns Ctrl-C into a graceful shutdown and exit(1)
                if trainer.interrupted:
                    raise KeyboardInterrupt from None
                raise
            except ValueError as exc:  # a checkpoint this run cannot continue (another device kind, other chunk)
                if resumed_from and "checkpoint" in str(exc):
                    raise ConfigError(f"{exc} [checkpoint {last}: to start {name} afresh, delete {ckpt_dir} and "
                                     "resume again]") from exc
                raise
            # a chunk's time is shared equally by its users; a resumed chunk adds the time before the interruption
            seconds = (time.time() - t0 + attack.seconds_before_resume) / len(chunk)
            if trainer.interrupted:
                raise KeyboardInterrupt
            for (i, user), uid, result, rec in zip(chunk, uids, attack.results(), records):
                inferred = result.labels
                # device: where it ran (after the fit the module is back on the CPU)
                row = user_row(attack, user, result, init, evaluator, victim, gallery, trainer.strategy.root_device.type)
                row.update(rec)
                row.update(steps=result.steps, seconds=round(seconds, 2), seconds_per_step=round(seconds / max(1, result.steps), 4))
                if per_step > 1:
                    row["users_per_step"] = len(chunk)
                images = user_images(user, result)
                write_user(run_dir, uid, images)  # every rank writes its own users (one shared run directory)
                if rank == 0:  # results.csv first: a user counts (summary.json, W&B) once its row is on disk
                    write_results(run_dir, sort_rows(rows + [row], users))
                    rows.append(row)
                    grids[str(row["user"])] = images["grid"]
                else:  # kept on disk too: a rank stopped hard (SIGKILL, a scheduler's time limit) loses no user
                    local.append((i, row, images["grid"]))
                    (run_dir / PARTIAL_DIR).mkdir(exist_ok=True)
                    write_results(run_dir, [r for _, r, _ in local], name=f"{PARTIAL_DIR}/rank{rank}-{os.getpid()}.csv")
                print(
                    f"[attack] {uid}: dominant {named(user.dominant_class)}, inferred {named(inferred.dominant)}, "
                    + (f"evaluator {named(row['evaluator_class'])} (p={row.get('evaluator_prob')}), "
                       if row.get("evaluator_class") is not None else "")
                    + "".join(f"{k} {row[k]}, " for k in ("gender_pred", "id_nearest_is_own") if row.get(k) is not None)
                    + f"PSNR nearest {row.get('psnr_nearest')} dB, "
                    f"{seconds:.1f} s" + (f" (share of a {len(chunk)}-user step)" if len(chunk) > 1 else ""),
                    flush=True,
                )
            if ckpt_dir.exists():
                shutil.rmtree(ckpt_dir, ignore_errors=True)
        status = "finished"
    except (AttackDivergedError, ClientDivergedError) as exc:
        status = f"diverged: {exc}"
        print(f"[attack] {name}: stopped: {str(exc).rstrip('.')}. Results of the finished users are kept in {run_dir}",
              file=sys.stderr)
    except KeyboardInterrupt:
        status = "interrupted"
        print(f"[attack] interrupted; results of the finished users are kept in {run_dir}; continue with:\n"
              f"  {resume_hint}", file=sys.stderr)
    except Exception as exc:  # summary.json says so instead of "running"; the finished users' rows stay
        status = f"failed: {type(exc).__name__}: {exc}"
        if not isinstance(exc, (ConfigError, TargetGradientError)):  # the two bad-input errors the loop raises
            mark_raised_during_work(exc)  # a ValueError from deep in a run keeps its traceback (run_main)
        raise
    finally:
        if fabric and world > 1:  # every rank gets here, whatever stopped it: no rank waits forever for another
            status, rows = gather_ranks(status, rows, local, grids, rank, world, run_dir, users)
        ckpt_root = run_dir / "checkpoints"
        if status == "finished" and rank == 0 and ckpt_root.is_dir():  # leftovers (a chunk cut short while writing)
            for d in ckpt_root.iterdir():
                shutil.rmtree(d, ignore_errors=True)
        summary = {"status": status, "run_dir": str(run_dir.resolve()), "processes": world,
                   "attack_seed": attack_kwargs.get("seed"), **summarize(rows)}
        if rank == 0:
            atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
            try:  # the finished users' grid, table and metrics, whatever stopped the run
                log_final(logger, run_dir, sort_rows(rows, users), grids, status)
            except Exception as exc:  # noqa: BLE001  (an unfinished run keeps its own error / exit status)
                if status == "finished":
                    raise
                print(f"[attack] could not log the finished users to the logger ({type(exc).__name__}: {exc})",
                      file=sys.stderr)
            finally:
                if logger is not None and cfg.logger.backend == "wandb":
                    import wandb

                    wandb.finish(exit_code=0 if status == "finished" else 1)
    if status != "finished":
        raise SystemExit(1 if status.startswith(("diverged", "incomplete")) else 130)
    if rank == 0:
        print(json.dumps(summary, indent=2), flush=True)
    return run_dir


def gather_ranks(status: str, rows: list[dict], local: list, grids: dict, rank: int, world: int, run_dir: Path,
                 users: list[User]) -> tuple[str, list[dict]]:
    """Collect every rank's finished users on rank 0 (called by every rank in ``run``'s ``finally``, so a rank that
    stopped early, diverged or was interrupted still meets the others). ``local``: this rank's (user index, row,
    grid) of finished users (ranks > 0; their images are already in ``run_dir``). Rank 0 merges the rows into
    ``results.csv`` (sorted by user), adds their grids to ``grids`` (``str(user)`` -> grid) and removes the merged ``partial/`` files; the
    run's status is rank 0's, or the first other rank's that did not finish ('rank r: ...'). When the gather itself
    fails (a broken or timed-out process group), rank 0 merges the rows the other ranks wrote to ``partial/``
    (kept for --resume) and a would-be "finished" run whose users are not all there becomes
    'incomplete: ...' (exit status 1).

    Returns:
        (status, rows): the run's status and, on rank 0, every rank's rows (other ranks: their own arguments).
    """
    import torch.distributed as dist

    gathered: list = [None] * world
    try:
        dist.all_gather_object(gathered, (status, local))
    except Exception as exc:  # noqa: BLE001  (a broken process group: the partial files keep the rows)
        print(f"[attack] rank {rank}: could not gather the other processes' users ({exc}); rows of ranks > 0 stay in "
              f"{run_dir / PARTIAL_DIR} and are read by --resume", file=sys.stderr)
        if rank != 0:
            return status, rows
        # rank 0 merges what the other ranks wrote to disk; a run missing users is not "finished" (sweep.py would
        # skip it and its report would lack them)
        rows = sort_rows(with_partial_rows(run_dir, rows), users)
        write_results(run_dir, rows)
        seen = {str(r["user"]) for r in rows}
        missing = [u.user_id for u in users if str(u.user_id) not in seen]
        if missing and status == "finished":
            status = (f"incomplete: the processes' results could not be gathered ({type(exc).__name__}) and "
                      f"{len(missing)} of {len(users)} users have no row (first: {missing[:5]}); --resume runs them")
        return status, rows
    if rank != 0:
        return status, rows
    for r, (st, part) in enumerate(gathered[1:], start=1):
        if status == "finished" and st != "finished":
            status = f"rank {r}: {st}"
        done = {str(row["user"]) for row in rows}
        for _, row, grid in part:
            if str(row["user"]) not in done:
                rows.append(row)
                grids[str(row["user"])] = grid
    rows = sort_rows(rows, users)
    write_results(run_dir, rows)
    shutil.rmtree(run_dir / PARTIAL_DIR, ignore_errors=True)
    return status, rows


def sort_rows(rows: list[dict], users: list[User]) -> list[dict]:
    """``rows`` sorted into the order of ``users`` (matched by ``str(row["user"]) == str(user.user_id)``); rows of
    users not in the list go last. The sort is stable; a new list is returned."""
    order = {str(u.user_id): k for k, u in enumerate(users)}
    return sorted(rows, key=lambda r: order.get(str(r["user"]), len(order)))


def full_float32(precision: str) -> None:
    """Set the TF32 flags for a run's ``trainer.precision``. At ``32-true`` CUDA convolutions and matmuls stay in full
    float32: cuDNN convolutions run in TF32 by default (``torch.backends.cudnn.allow_tf32``), about 10 mantissa
    bits, which lifts the gradient matching loss's floor and makes GPU rows differ from CPU rows (and the one-user
    path, cuDNN, from the batched one, matmuls). Other precisions get torch's defaults back (cuDNN TF32 on, matmul
    TF32 off), so runs in one process (sweep.py's cells, benchmark sections) do not inherit each other's setting.
    Called by attack.py, scripts/refinish.py and scripts/benchmark.py. No effect on the CPU."""
    full = precision in ("32-true", "32", "32-bit")
    torch.backends.cudnn.allow_tf32 = not full
    torch.backends.cuda.matmul.allow_tf32 = False


def write_user(run_dir: Path, uid: str, images: dict[str, torch.Tensor]) -> None:
    """Per-user PNGs: batch, raw, denoised, reconstructions (baselines), candidates (final candidate selection) and
    the grid (batch | raw | denoised); and
    ``raw.pt``, the representative image(s) at full precision (float32 (1 or B, C, H, W) in [0, 1], ``torch.load``),
    from which ``scripts/refinish.py`` reruns the final stage exactly."""
    udir = run_dir / "users" / uid
    for name, img in images.items():
        save_png(udir / f"{name}.png", img, nrow=len(img) if name in ("grid", "candidates") else None)
    if "raw" in images:
        buf = io.BytesIO()
        torch.save(images["raw"].detach().float().cpu().clone(), buf)  # a clone: a slice saves its whole storage
        atomic_write_bytes(udir / "raw.pt", buf.getvalue())


def main(argv: Optional[list[str]] = None) -> Path:
    """Command line entry point: parse ``argv`` (None: ``sys.argv[1:]``) with :func:`build_parser` and :func:`run`
    the attack; returns the run directory.

    Raises:
        SystemExit: a bad command line (argparse); from :func:`run`, status 1 when the attack diverged and 130 when
            it was interrupted.
        ConfigError (a ValueError) and the loaders' errors: see :func:`prepare`.
    """
    parser = build_parser()
    argv = resume_config_argv(parser, list(sys.argv[1:] if argv is None else argv))
    refuse_duplicate_keys(parser, argv)
    warn_overrides_replaced_by_later_configs(argv)
    cfg = parser.parse_args(argv)
    return run(cfg)


def resume_config_argv(parser: ArgumentParser, argv: list[str]) -> list[str]:
    """``--resume RUN_DIR`` without any ``--config``: the run's own ``RUN_DIR/config.yaml`` goes first (a note on
    stderr), so ``python attack.py --resume RUN_DIR`` continues the run instead of failing with "the following
    arguments are required: attack, users". Other command lines are returned as they are.

    Raises:
        SystemExit: (status 2, ``parser.error``) RUN_DIR has no config.yaml, or it is another tool's run directory
            (scripts/objective_audit.py's: an ``audit`` group; train.py's: ``model`` and ``data`` groups).
    """
    has_config = any(a == "--config" for a in argv) or bool(config_file_args(argv))
    run_dir = next((argv[j + 1] if a == "--resume" and j + 1 < len(argv) else a.split("=", 1)[1]
                    for j, a in enumerate(argv) if a == "--resume" or a.startswith("--resume=")), None)
    if has_config or not run_dir or any(a in ("-h", "--help") for a in argv):
        return argv
    config = Path(run_dir).expanduser() / "config.yaml"
    if not config.is_file():
        parser.error(f"--resume {run_dir}: {config} not found; give the run directory attack.py printed at its start "
                     "(it holds config.yaml)")
    from inversion.cli import config_groups

    groups = config_groups(config)  # an unreadable config (no groups) is the parser's to report
    other = ("scripts/objective_audit.py's (an 'audit' group; it is not resumed: run the audit again)"
             if "audit" in groups else
             "train.py's ('model' and 'data' groups; continue a training with train.py --ckpt_path last)"
             if {"model", "data"} <= groups else None)
    if other:
        parser.error(f"--resume {run_dir}: this is {other}, not a run directory of attack.py")
    print(f"[attack] --resume without --config: using {config}", file=sys.stderr)
    return ["--config", str(config), *argv]


def config_file_args(argv: list[str]) -> list[tuple[int, str]]:
    """``(position, path)`` of every ``--config PATH`` / ``--config=PATH`` on the command line ``argv``, in order."""
    out = []
    for j, a in enumerate(argv):
        if a.startswith("--config="):
            out.append((j, a.split("=", 1)[1]))
        elif a == "--config" and j + 1 < len(argv):
            out.append((j, argv[j + 1]))
    return out


def refuse_duplicate_keys(parser: ArgumentParser, argv: list[str]) -> None:
    """Refuse a ``--config`` file that gives a key twice in one mapping (YAML, and so jsonargparse, keeps the last
    one silently: ``steps: 3`` then ``steps: 5`` ran 5 steps), as sweep.py refuses it in a sweep file
    (:func:`inversion.cli.unique_key_loader`). Files that cannot be read or parsed are left to the parser.

    Raises:
        SystemExit: (status 2, ``parser.error``) naming the file, the key and both lines."""
    import yaml

    from inversion.cli import DuplicateKeyError, unique_key_loader

    for _, path in config_file_args(argv):
        try:
            yaml.load(Path(path).read_text(), Loader=unique_key_loader())
        except DuplicateKeyError as exc:
            parser.error(f"--config {path}: {exc}")
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue


def warn_overrides_replaced_by_later_configs(argv: list[str]) -> list[str]:
    """jsonargparse applies the command line in order, so ``--attack.init_args.steps 5 --config overlay.yaml`` keeps
    the overlay's steps when it sets them (4,000 steps where 5 were meant). Print one note on stderr per override
    that a later ``--config`` file sets again (the key, the file; overrides belong after every --config,
    ``--print_config`` shows the resolved config) and return the notes. Each file is read once; unreadable files
    are left to the parser."""
    import yaml

    configs: list[tuple[int, str, dict]] = []  # (position in argv, path, its flattened keys)
    for j, path in config_file_args(argv):
        try:
            configs.append((j, path, flat_entries(yaml.safe_load(Path(path).read_text()) or {})))
        except (OSError, yaml.YAMLError, AttributeError):
            continue
    notes = []
    for i, arg in enumerate(argv):
        if not arg.startswith("--") or arg.startswith("--config") or arg in ("--print_config", "--help", "-h"):
            continue
        key = arg[2:].split("=", 1)[0]
        for j, path, entries in configs:
            if j > i and any(k == key or k.startswith(key + ".") or key.startswith(k + ".") for k in entries):
                notes.append(f"--{key} comes before --config {path}, which sets it again: the file's value is used "
                             "(put overrides after every --config; --print_config shows the resolved config)")
                break
    for n in notes:
        print(f"[attack] note: {n}", file=sys.stderr, flush=True)
    return notes


if __name__ == "__main__":
    from inversion.cli import run_main

    run_main(main, "attack.py")
