"""Identity preservation: do a restored face and its ground truth look like the same person?

Face embeddings come from dlib's face recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`,
128-d, trained so that faces of one person lie within 0.6 of each other). Inputs are aligned
crops in the FFHQ 5-point layout (what `prepare-data`, `degrade` and `restore --aligned` use), so
the face rectangle is known from the template and given to dlib directly instead of running its
detector, which would miss exactly the degraded faces one wants to score.

Within the rectangle dlib's 5-point shape predictor places the landmarks it aligns its 150 px
face chip with. For a pair the landmarks are found once, on the *reference*, and used for both
images: the two crops share their geometry, and a landmark detector thrown off by blur would
otherwise move the chip and count as lost identity.

Two scores: `identity`, the cosine similarity of the embeddings (higher is better; dlib's
embeddings are not centred, so unrelated people still score about 0.8 and the useful range is
roughly 0.8..1), and `identity_dist`, dlib's usual Euclidean distance (lower is better; below 0.6
means "same person" by dlib's threshold).

Needs the optional `eval` extra: `dlib-bin` and `face-recognition-models` (its `.dat` files are
found inside the installed package without importing it, since its import needs pkg_resources).
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import numpy as np

from facerestore_cli.metrics.base import EVAL_EXTRA, Metric, MetricUnavailable

RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_FILE = "shape_predictor_5_face_landmarks.dat"
#: dlib's frontal-face rectangle (left, top, right, bottom) on a 512 px FFHQ-aligned crop: the
#: median box dlib's HOG detector returned on about 170 sharp aligned CelebA/LFW crops of this project.
FFHQ_RECT_512 = (95, 164, 405, 474)
#: dlib's threshold: embeddings closer than this are taken as one person.
DLIB_SAME_PERSON = 0.6


def find_dlib_models() -> tuple[Path | None, str | None]:
    """Folder holding the two .dat files, or None and a one-line reason."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None, f"face-recognition-models is not installed ({EVAL_EXTRA})"
    for root in spec.submodule_search_locations:
        folder = Path(root) / "models"
        if (folder / RECOGNITION_FILE).is_file() and (folder / SHAPE_FILE).is_file():
            return folder, None
    return None, f"face-recognition-models has no {RECOGNITION_FILE} / {SHAPE_FILE} (reinstall it: {EVAL_EXTRA})"


def identity_unavailable_reason() -> str | None:
    if importlib.util.find_spec("dlib") is None:
        return f"dlib is not installed ({EVAL_EXTRA}, which installs the dlib-bin wheel)"
    return find_dlib_models()[1]


def face_rect(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The template face rectangle scaled to an aligned crop of size (height, width)."""
    h, w = size
    sx, sy = w / 512.0, h / 512.0
    left, top, right, bottom = FFHQ_RECT_512
    return round(left * sx), round(top * sy), round(right * sx), round(bottom * sy)


class FaceEmbedder:
    """dlib face embeddings of aligned crops, with a small cache so both scores share one pass."""

    def __init__(self, cache_size: int = 64) -> None:
        reason = identity_unavailable_reason()
        if reason:
            raise MetricUnavailable(reason)
        import dlib

        folder, _ = find_dlib_models()
        self._dlib = dlib
        self.shape_predictor = dlib.shape_predictor(str(folder / SHAPE_FILE))
        self.recognizer = dlib.face_recognition_model_v1(str(folder / RECOGNITION_FILE))
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.cache_size = cache_size

    def landmarks(self, image: np.ndarray):
        rect = self._dlib.rectangle(*face_rect(image.shape[:2]))
        return self.shape_predictor(np.ascontiguousarray(image), rect)

    def embed(self, image: np.ndarray, shape=None) -> np.ndarray:
        """128-d embedding of an aligned RGB uint8 crop (landmarks from `shape` or found on it)."""
        image = np.ascontiguousarray(image)
        shape = shape if shape is not None else self.landmarks(image)
        key = _key(image, shape)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        vec = np.asarray(self.recognizer.compute_face_descriptor(image, shape), dtype=np.float64)
        self._cache[key] = vec
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return vec

    def pair(self, image: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of image and reference, both with the reference's landmarks."""
        shape = self.landmarks(np.ascontiguousarray(reference))
        return self.embed(image, shape), self.embed(reference, shape)


def _key(image: np.ndarray, shape) -> bytes:
    pts = np.array([[p.x, p.y] for p in shape.parts()], np.int32)
    h = hashlib.blake2b(image.tobytes(), digest_size=16)
    h.update(np.asarray(image.shape, np.int32).tobytes())
    h.update(pts.tobytes())
    return h.digest()


@lru_cache(maxsize=1)
def shared_embedder() -> FaceEmbedder:
    """One embedder per process (loading the two models takes about a second)."""
    return FaceEmbedder()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


class IdentitySimilarity(Metric):
    name = "identity"
    full_reference = True
    lower_better = False
    description = "cosine similarity of dlib face embeddings (aligned crops); unrelated faces ~0.8"

    def __init__(self) -> None:
        self.embedder = shared_embedder()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return identity_unavailable_reason()

    def score(self, image: np.ndarray, reference: np.ndarray | None = None) -> float:
        a, b = self.embedder.pair(image, reference)
        return cosine(a, b)


class IdentityDistance(IdentitySimilarity):
    name = "identity_dist"
    lower_better = True
    description = f"Euclidean distance of dlib face embeddings; < {DLIB_SAME_PERSON} is dlib's 'same person'"

    def score(self, image: np.ndarray, reference: np.ndarray | None = None) -> float:
        a, b = self.embedder.pair(image, reference)
        return float(np.linalg.norm(a - b))
