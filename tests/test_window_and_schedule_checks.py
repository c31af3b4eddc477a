"""The layer window and the t schedule refuse settings that would silently switch a mechanism off."""

from __future__ import annotations

import pytest
import torch

from inversion.objectives import sliding_window_weights, window_centre
from lightning_modules.user_level_inversion import UserLevelInversion


def test_window_never_leaves_every_layer_out():
    """A window narrower than one layer with floor 0 could fall between two layers at a fractional centre (e.g.
    61 * 7/9 = 47.44 on a 62-tensor ResNet-18): every weight 0, so the matching loss and its gradient were silently
    0 (logged as a perfect match). Such widths are refused; any accepted window keeps a layer with weight > 0."""
    L = 62
    c = window_centre(L, 1 / 9, 0.5)
    assert c == pytest.approx(47.444, abs=1e-3)
    with pytest.raises(ValueError, match="window widths"):
        sliding_window_weights(L, c, 0.3, 0.3)
    with pytest.raises(ValueError, match="window widths"):
        UserLevelInversion(window_width_deep=0.3, window_width_shallow=0.3)
    # widths adding up to one layer, or a floor: never all zero, at any centre
    for wd, ws, floor in ((0.5, 0.5, 0.0), (0.2, 0.8, 0.0), (0.3, 0.3, 0.05)):
        UserLevelInversion(window_width_deep=wd, window_width_shallow=ws, window_floor=floor)
        for s in range(200):
            w = sliding_window_weights(L, window_centre(L, s / 199, 0.5), wd, ws, floor)
            assert float(w.sum()) > 0


def test_anneal_fraction_outside_its_range_is_refused_before_work():
    """anneal_fraction 0 (or below) was read as 1e-12 (t at t_min from the second step: no annealing, silently) and
    above 1 never reached t_min; the window's slide fraction was already checked."""
    from inversion.objectives import timestep_at

    assert timestep_at(0.5, 900, 100, "linear", 0.5) == 100 and timestep_at(0.25, 900, 100, "linear", 0.5) == 500
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="anneal_fraction must be in"):
            UserLevelInversion(anneal_fraction=bad)


def test_settings_of_a_switched_off_mechanism_are_not_checked():
    """--attack.init_args.use_window false (or anneal_t false) with window widths (or an anneal fraction) the checks
    refuse: those settings are unused, and the ablation ran nothing but an error."""
    UserLevelInversion(use_window=False, window_width_deep=0.3, window_width_shallow=0.3)
    UserLevelInversion(anneal_t=False, anneal_fraction=0.0)
    with pytest.raises(ValueError, match="anneal_fraction"):
        UserLevelInversion(anneal_t=True, anneal_fraction=0.0)
