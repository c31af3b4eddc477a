"""Review checks of inversion.defenses (settings refused at construction) and inversion.faces (input conversion)."""

from __future__ import annotations

import importlib.util
from collections import OrderedDict

import numpy as np
import pytest
import torch

from inversion import faces
from inversion.defenses import GaussianDP, Quantize, build_defense


# ------------------------------------------------------------------------------------------------ defenses


@pytest.mark.parametrize("value", ["false", "no", None, 2, 0.5])
def test_quantize_refuses_a_non_boolean_stochastic(value):
    # bool("false") is True: the old code silently switched stochastic rounding on
    with pytest.raises(ValueError, match="stochastic must be true or false"):
        build_defense({"name": "quantize", "levels": 4, "stochastic": value})


def test_quantize_accepts_booleans_and_0_1():
    assert Quantize(4, stochastic=True, seed=0).stochastic is True
    assert Quantize(4, stochastic=False).stochastic is False
    assert Quantize(4, stochastic=1, seed=0).stochastic is True
    assert Quantize(4, stochastic=0).stochastic is False


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_seed_outside_torch_range_is_refused_at_construction(seed):
    # the old code built the defense and failed only when the first client's update came ("Overflow ...")
    for make in (lambda: GaussianDP(1.0, 0.1, seed=seed), lambda: Quantize(4, stochastic=True, seed=seed)):
        with pytest.raises(ValueError, match=r"seed must be in"):
            make()
    d = GaussianDP(1.0, 0.1, seed=2**64 - 1)  # the edges torch accepts still work
    d(OrderedDict(a=torch.ones(3)))


@pytest.mark.parametrize("nm, sigma, key", [("x", 0.1, "noise_multiplier"), (0.1, [0.1], "sigma"),
                                            (float("nan"), float("nan"), "noise_multiplier")])
def test_gaussian_dp_with_both_aliases_names_the_bad_key(nm, sigma, key):
    # the old code called float() on both first: TypeError for a list, float()'s own message for a string, and
    # "disagree" for NaN == NaN
    with pytest.raises(ValueError, match=rf"GaussianDP: {key} must be a finite number"):
        GaussianDP(clip_norm=1.0, noise_multiplier=nm, sigma=sigma)


# ------------------------------------------------------------------------------------------------ faces


@pytest.mark.parametrize("image", [torch.full((3, 20, 20), float("nan")),
                                   np.full((20, 20, 3), np.nan, dtype=np.float32),
                                   torch.where(torch.arange(400).reshape(1, 20, 20) == 7, float("nan"),
                                               torch.rand(1, 20, 20))])
def test_nan_pixels_are_refused_not_turned_black(image):
    # the old code cast NaN to 0: a black image that the face models then "measured" (with assume_face, a distance)
    with pytest.raises(ValueError, match="NaN"):
        faces.as_rgb_uint8(image)


def test_pil_images_are_accepted_in_image_sequences():
    from PIL import Image

    arr = (np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8)
    pil = Image.fromarray(arr)
    items = faces._iter_images([pil, pil])  # the old code: TypeError 'Image' object is not iterable
    assert len(items) == 2 and all(np.array_equal(faces.as_rgb_uint8(i), arr) for i in items)
    assert len(faces._iter_images(pil)) == 1
    assert len(faces._iter_images([torch.rand(2, 3, 24, 24), [pil]])) == 3


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("dlib", "face_recognition_models")),
                    reason="dlib face models missing: bash scripts/setup_offline_assets.sh")
def test_identity_distances_to_pil_photos():
    from PIL import Image

    try:
        paths = faces.reference_photos(["obama", "obama2"])
    except RuntimeError as exc:
        pytest.skip(f"reference photos could not be fetched: {exc}")
    ims = []
    for name in ("obama", "obama2"):
        im = Image.open(paths[name]).convert("RGB")
        im.thumbnail((320, 320), Image.BICUBIC)
        ims.append(im)
    d = faces.identity_distances(ims[0], [ims[1]])
    assert d.ok and d.value.shape == (1,) and d.value[0] < faces.SAME_PERSON_THRESHOLD
