"""Threat-model checks before any client update (``check_threat``) and the baselines' Trainer precisions.

attack.py's prepare calls ``probe.check_threat(source.batch_size or None, threat.reveal_batch_size,
threat.known_labels)`` before it creates the run directory; each mismatch must raise the ValueError bind (or label
inference at bind) raises for the same setting, with the same message.
"""

from __future__ import annotations

import logging

import pytest
import torch
from lightning import Trainer

from inversion.scenario import make_server_view
from lightning_modules.baselines import DLG, InvertingGradients, iDLG
from lightning_modules.user_level_inversion import UserLevelInversion
from tests.helpers import QUIET_FIT_WARNINGS, tiny_mlp

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
pytestmark = QUIET_FIT_WARNINGS


def view(B: int, reveal_batch_size: bool = True, known_labels: bool = False):
    x = torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(B))
    y = torch.arange(B) % 4
    return make_server_view(tiny_mlp(), x, y, num_classes=4, reveal_batch_size=reveal_batch_size,
                            reveal_labels=known_labels)


def bind_message(attack, B: int, reveal_batch_size: bool, known_labels: bool) -> str:
    with pytest.raises(ValueError) as bind_error:
        attack.bind(view(B, reveal_batch_size, known_labels))
    return str(bind_error.value)


def assert_same_refusal(attack, B: int, reveal_batch_size: bool, known_labels: bool, match: str) -> None:
    """check_threat refuses the setting with bind's message, which matches ``match``."""
    with pytest.raises(ValueError, match=match) as early:
        attack.check_threat(B, reveal_batch_size, known_labels)
    assert str(early.value) == bind_message(attack, B, reveal_batch_size, known_labels)


def test_idlg_check_threat_refuses_more_than_one_image():
    assert_same_refusal(iDLG(steps=1), 3, True, False,
                        r"iDLG is defined for a single image \(B = 1\), got batch_size=3; use DLG or "
                        r"InvertingGradients for B > 1")
    with pytest.raises(ValueError, match=r"single image \(B = 1\), got batch_size=3"):  # hidden B: still refused
        iDLG(steps=1).check_threat(3, False, False)
    iDLG(steps=1).check_threat(1, True, False)
    iDLG(steps=1).check_threat(None, True, False)  # B unknown to the source: bind decides
    iDLG(steps=1, label_strategy="known").check_threat(1, True, True)


@pytest.mark.parametrize("cls", [DLG, iDLG, InvertingGradients])
def test_sample_level_check_threat_needs_the_batch_size_revealed(cls):
    B = 1 if cls is iDLG else 3
    assert_same_refusal(cls(steps=1), B, False, False,
                        rf"{cls.__name__} is a sample-level attack and needs the batch size B \(it reconstructs B "
                        r"images\), but the server view has batch_size=None; use a threat model that reveals B, or "
                        r"the user-level attack")
    with pytest.raises(ValueError, match="needs the batch size B"):
        cls(steps=1).check_threat(None, False, False)  # the source's B unknown: hidden all the same
    cls(steps=1).check_threat(B, True, False)


@pytest.mark.parametrize("cls", [DLG, iDLG, InvertingGradients])
def test_check_threat_known_labels_strategy_needs_the_labels(cls):
    B = 1 if cls is iDLG else 3
    attack = cls(steps=1, label_strategy="known")
    assert_same_refusal(attack, B, True, False,
                        r"^label_strategy 'known' needs the labels in the server view \(threat model known_labels\)$")
    attack.check_threat(B, True, True)
    attack.check_threat(None, True, True)


def test_user_level_check_threat_known_labels_and_idlg():
    """The base class's checks (label inference's), for the user-level attack, which needs no B."""
    with pytest.raises(ValueError, match=r"^label_strategy 'known' needs the labels in the server view"):
        UserLevelInversion(label_strategy="known").check_threat(3, True, False)
    with pytest.raises(ValueError, match=r"^label strategy 'idlg' is exact only for B = 1, got B = 3; use "
                                         r"bias_corrected$"):
        UserLevelInversion(label_strategy="idlg").check_threat(3, True, False)
    UserLevelInversion(label_strategy="known").check_threat(3, False, True)
    UserLevelInversion(label_strategy="idlg").check_threat(3, False, False)  # hidden B: the view has None, as bind
    UserLevelInversion(label_strategy="idlg").check_threat(None, True, False)
    UserLevelInversion(label_strategy="idlg").check_threat(1, True, False)
    UserLevelInversion().check_threat(None, False, False)


def test_inverting_gradients_check_threat_idlg_labels_need_one_image():
    assert_same_refusal(InvertingGradients(steps=1, label_strategy="idlg"), 3, True, False,
                        r"^label strategy 'idlg' is exact only for B = 1, got B = 3; use bias_corrected$")
    InvertingGradients(steps=1, label_strategy="idlg").check_threat(1, True, False)
    InvertingGradients(steps=1, label_strategy="idlg").check_threat(None, True, False)


def test_dlg_optimised_labels_need_nothing_from_the_threat_model():
    DLG(steps=1).check_threat(3, True, False)
    DLG(steps=1, label_strategy="bias_corrected").check_threat(5, True, False)


# ---------------------------------------------------------------------------------------------------------------
# Trainer precision
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DLG, iDLG, InvertingGradients])
def test_sample_level_attacks_refuse_half_precision_weights(cls):
    """bf16-true crashed once the steps were done ("expected scalar type Float but found BFloat16" when result()
    scores the reconstructions with the converted victim): refused up front now, by the class (attack.py's
    pre-check) and at fit setup."""
    for precision in ("bf16-true", "16-true", "16-mixed", "16"):
        with pytest.raises(ValueError, match=rf"{cls.__name__} does not run under trainer.precision '{precision}'"):
            cls.check_precision(precision)
    for precision in ("32-true", "32", 32, None, "64-true", "bf16-mixed", "bf16"):
        cls.check_precision(precision)


def test_bf16_true_fit_is_refused_at_setup_before_any_step():
    attack = InvertingGradients(steps=2, restarts=1).bind(view(2))
    trainer = Trainer(max_steps=2, precision="bf16-true", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(ValueError, match="InvertingGradients does not run under trainer.precision 'bf16-true'"):
        trainer.fit(attack)
    assert attack.history == {}
