"""Common interface of every gradient inversion attack in this project (user-level and sample-level baselines).

An attack is a LightningModule built from hyper-parameters only (so that a YAML ``attack:`` group can choose it by
``class_path``), then bound to what the server sees with :meth:`GradientInversionAttack.bind`, then driven by a
Lightning ``Trainer`` for ``steps`` optimisation steps. The Trainer's ``max_steps`` is set from ``attack.steps``.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from lightning import LightningModule
from torch.utils.data import DataLoader, Dataset

from inversion.label_inference import LabelInference, check_label_threat
from inversion.scenario import ServerView

# Lightning's warnings that attack fits raise by design, silenced around them by :func:`intended_warnings_silenced`:
# - the victim and the prior are frozen in eval mode (the threat model: the client computes its update in eval mode;
#   ResNet-18 in train mode also fails at B = 1);
# - with --checkpoint_every (manual optimisation), "no pre-optimization state was saved": a checkpoint at step k
#   holds the state after k steps and records global_step k, which is what a resume continues from;
# - on a mid-user resume, "your dataloader is not resumable": the step loader's values are unused, the attacks count
#   steps by global_step / batch_idx, which Lightning restores (a resumed user's results equal an uninterrupted
#   run's: tests/test_batched_attack.py).
INTENDED_LIGHTNING_WARNINGS = (
    r".*module\(s\) in eval mode",
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
    r"You're resuming from a checkpoint that ended before the epoch ended",
)


@contextmanager
def intended_warnings_silenced():
    """Context manager: inside it, Lightning's warnings that an attack fit raises by design
    (:data:`INTENDED_LIGHTNING_WARNINGS`: modules in eval mode, manual-optimisation checkpoints, a mid-epoch resume
    of the step loader) are ignored; every other warning shows as before, and the filters are restored on exit
    (``warnings.catch_warnings``)."""
    with warnings.catch_warnings():
        for pattern in INTENDED_LIGHTNING_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


class AttackDivergedError(RuntimeError):
    """The attack produced NaN/inf (loss or image) at a given step; ``step`` says where, ``hint`` what to change
    (default: the user-level attack's knobs; the baselines, which have no prior, pass their own)."""

    def __init__(self, step: int, what: str, hint: str = "Lower attack.lr, raise the prior weight, or check the "
                 "target gradient (a defense with a huge noise scale?).") -> None:
        super().__init__(f"attack diverged at step {step}: {what} is NaN or inf. {hint}")
        self.step = step


@dataclass
class AttackResult:
    """What an attack returns for one user.

    Attributes:
        representative: float32 (1, C, H, W) in [0, 1], the image the method reports for the user (user-level: the
            representative image; sample-level baselines: their reconstruction that best matches the gradient).
        reconstructions: float32 (K, C, H, W) in [0, 1], every image the method produced (K = 1 for user-level).
        denoised: float32 (1, C, H, W) in [0, 1] after the prior's final denoising, or None.
        labels: the label inference the attack used.
        steps: optimisation steps run; history: per-step scalars (losses, t, window centre, ...).
        extras: method-specific outputs; the user-level attack with final_candidates N > 1 puts all N denoised
            candidates there as ``candidates``, float32 (N, C, H, W) in [0, 1].
    """

    representative: torch.Tensor
    reconstructions: torch.Tensor
    denoised: Optional[torch.Tensor]
    labels: LabelInference
    steps: int
    history: dict[str, list[float]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


class _Steps(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class GradientInversionAttack(LightningModule):
    """Base class: subclasses implement ``bind``, ``training_step`` (manual optimisation) and ``result``.

    Attacks that can attack several users in one run (one Trainer fit, one optimisation over all their images) set
    ``supports_many_users = True``, accept a sequence of views in ``bind`` and return one result per user from
    :meth:`results` (attack.py's ``attack.init_args.users_per_step``); the others attack one user per fit.

    Args:
        steps: optimisation steps S (the Trainer runs exactly this many).
        label_strategy: 'bias_corrected', 'sign', 'idlg' or 'known' (see :mod:`inversion.label_inference`).
        seed: seed of the attack's own randomness (initialisation, noise draws).
        log_images_every: log the current reconstruction through the logger every so many steps (0: never).
        log_prefix: prefix of logged keys (e.g. 'user_0003/').
    """

    requires_prior: bool = False
    #: True for a common base that is not an attack of its own, declared in its class statement
    #: (``class SampleLevelAttack(GradientInversionAttack, abstract_base=True)``): attack.py's list of shipped
    #: attacks leaves it out. Set on every subclass by :meth:`__init_subclass__` (False unless declared), so a
    #: subclass of such a base is an attack again.
    abstract_base: bool = True

    def __init_subclass__(cls, abstract_base: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.abstract_base = bool(abstract_base)
    #: bind() accepts a sequence of users' views (see UserLevelInversion); results() then returns one result each
    supports_many_users: bool = False
    #: submodules that are inputs of the attack, not its state: left out of Lightning checkpoints (resume re-binds)
    frozen_prefixes: tuple[str, ...] = ("victim.", "prior.")
    #: Trainer precisions the attack runs under (None: any Lightning accepts); see :meth:`check_precision`
    supported_precisions: Optional[tuple[str, ...]] = None

    @classmethod
    def check_precision(cls, precision: Any) -> None:
        """Raise ValueError when the Trainer ``precision`` (e.g. '32-true', 'bf16-mixed', 16) is not one of
        :attr:`supported_precisions`; None is Lightning's default '32-true'. Called by attack.py before any user is
        attacked and again at fit setup."""
        precision = "32-true" if precision is None else precision
        if cls.supported_precisions is not None and str(precision) not in cls.supported_precisions:
            raise ValueError(f"{cls.__name__} does not run under trainer.precision {precision!r}: use one of "
                             f"{list(cls.supported_precisions)}")

    def setup(self, stage: str) -> None:
        """Lightning's setup hook (before the precision plugin converts the module): checks the precision."""
        self.check_precision(self.trainer.precision)

    def __init__(
        self,
        steps: int = 1000,
        label_strategy: str = "bias_corrected",
        seed: int = 0,
        log_images_every: int = 0,
        log_prefix: str = "",
    ) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"attack.steps must be >= 1, got {steps}")
        if log_images_every < 0:  # step % -k == 0 holds at every step: an image per step, not none
            raise ValueError(f"attack.log_images_every must be >= 0 (0: never), got {log_images_every}")
        allowed = self.label_strategies()
        if label_strategy not in allowed:
            raise ValueError(f"{type(self).__name__}: unknown label_strategy {label_strategy!r}; choose one of "
                             f"{list(allowed)}")
        self.automatic_optimization = False
        self.steps = steps
        self.label_strategy = label_strategy
        self.seed = seed
        self.log_images_every = log_images_every
        self.log_prefix = log_prefix
        self.history: dict[str, list[float]] = {}
        # wall time: attack.py sets wall_clock_start (time.time()) before the fit; a resumed fit restores the
        # seconds spent before the interruption, so a user's reported time covers the whole attack
        self.wall_clock_start: Optional[float] = None
        self.seconds_before_resume = 0.0
        self.strict_loading = False  # checkpoints hold the attack's own state only (see on_save_checkpoint)

    #: label strategies of this attack beyond label inference's (DLG: 'optimize', its own soft labels)
    extra_label_strategies: tuple[str, ...] = ()

    @classmethod
    def label_strategies(cls) -> tuple[str, ...]:
        """The ``label_strategy`` values this attack accepts: :data:`inversion.label_inference.LABEL_STRATEGIES`,
        'known' (the threat model gives the labels) and :attr:`extra_label_strategies`."""
        from inversion.label_inference import LABEL_STRATEGIES

        return (*cls.extra_label_strategies, *LABEL_STRATEGIES, "known")

    def check_threat(self, batch_size: Optional[int], reveal_batch_size: bool, known_labels: bool) -> None:
        """Raise, before any client update or run directory, the threat-model mismatch :meth:`bind` would raise.

        attack.py calls it on its probe instance in ``prepare``. :meth:`bind` keeps its own checks; this one only
        moves them earlier. Here: the label strategy against the threat model (as
        :func:`inversion.label_inference.infer_labels` checks it at bind); subclasses add their own.

        Args:
            batch_size: the users' batch size B when the data source knows it, None when it is unknown or varies
                (then the checks that depend on B are skipped).
            reveal_batch_size: the threat model reveals B (False: the server view has ``batch_size=None``).
            known_labels: the threat model gives the server the labels.

        Raises:
            ValueError: label_strategy 'known' without ``known_labels``; 'idlg' with a revealed B > 1.
        """
        if self.label_strategy in self.extra_label_strategies:  # the attack's own strategy (DLG's 'optimize')
            return
        check_label_threat(self.label_strategy, batch_size if reveal_batch_size else None, known_labels)

    def bind(self, view: ServerView, prior: Optional[Any] = None) -> "GradientInversionAttack":
        """Attach what the server sees (and, for attacks with ``requires_prior``, the diffusion prior); returns self.

        Subclasses validate the view, infer the labels and initialise their optimisation variables here, before the
        Trainer runs. Attacks with ``supports_many_users`` also accept a sequence of views.

        Raises:
            NotImplementedError: always, here; every concrete attack overrides it.
        """
        raise NotImplementedError

    def result(self) -> AttackResult:
        """The bound user's :class:`AttackResult` after the Trainer has run (images float32 in [0, 1]).

        Raises:
            NotImplementedError: always, here; every concrete attack overrides it.
        """
        raise NotImplementedError

    def results(self) -> list[AttackResult]:
        """One :class:`AttackResult` per bound user, in bind order (a single user here: ``[self.result()]``)."""
        return [self.result()]

    def on_save_checkpoint(self, checkpoint) -> None:
        """Keep the attack's state (images, labels, optimiser), its history and its wall time in seconds so far
        (``attack_seconds``: the time before a resume plus the time since :attr:`wall_clock_start`); drop the
        frozen victim and prior."""
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(self.frozen_prefixes)
        }
        checkpoint["attack_history"] = self.history
        since = time.time() - self.wall_clock_start if self.wall_clock_start is not None else 0.0
        checkpoint["attack_seconds"] = self.seconds_before_resume + since

    def on_load_checkpoint(self, checkpoint) -> None:
        self.history = checkpoint.get("attack_history", {})
        self.seconds_before_resume = float(checkpoint.get("attack_seconds", 0.0))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Steps(self.steps), batch_size=None, shuffle=False)

    def record(self, values: dict[str, float], prog_bar: tuple[str, ...] = ()) -> None:
        """Append scalars to ``history`` and log them (prefixed) through the Lightning logger."""
        for k, v in values.items():
            self.history.setdefault(k, []).append(float(v))
            self.log(self.log_prefix + k, float(v), prog_bar=k in prog_bar, on_step=True, on_epoch=False)
