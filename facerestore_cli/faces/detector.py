"""Face detection front end: one `Face` type and one `build_detector` for every backend.

Backends return faces in image pixels with five landmarks in the project's order (left eye,
right eye, nose, left mouth corner, right mouth corner; "left" = smaller x in an upright face),
sorted by box area, largest first, so "the main face" is always `faces[0]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .. import WEIGHTS_DIR

DETECTORS = ("mtcnn", "retinaface")
MTCNN_FILES = ("pnet.pt", "rnet.pt", "onet.pt")


class DetectorUnavailable(Exception):
    """The requested detector cannot run here (unknown name, weights missing); message is one line."""


@dataclass
class Face:
    """One detected face: box x1,y1,x2,y2 (float32, pixels), score in [0,1], landmarks (5,2) x,y."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.box)
        return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


class Detector(Protocol):
    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        """Faces per RGB uint8 HxWx3 image, largest first."""
        ...

    def follow(self, image: np.ndarray, faces: list[Face]) -> list[Face | None]:
        """`faces` (of a video's frame before) found again in `image`, in order; None for a face
        that is not there any more. Used between whole-frame searches (faces/tracking.py)."""
        ...


def make_faces(boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray, min_face_size: float = 0) -> list[Face]:
    """Backend arrays -> Face list, dropping faces below min_face_size, sorted by area descending."""
    faces = [
        Face(np.asarray(b, np.float32).reshape(4), float(s), np.asarray(lm, np.float32).reshape(5, 2))
        for b, s, lm in zip(boxes, scores, landmarks)
    ]
    faces = [f for f in faces if min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= min_face_size]
    return sorted(faces, key=lambda f: f.area, reverse=True)


class MTCNNDetector:
    """`Detector` over the project's own MTCNN implementation."""

    def __init__(self, weights_dir: Path, device: str = "cpu", threshold: float = 0.7, min_face_size: int = 20):
        from .mtcnn import MTCNN

        self.model = MTCNN(weights_dir, device=device, thresholds=(0.6, 0.7, threshold), min_face_size=min_face_size)
        self.min_face_size = min_face_size

    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        # The pyramid only starts at min_face_size; smaller faces can still come out of it.
        return [make_faces(d.boxes, d.scores, d.landmarks, self.min_face_size) for d in self.model.detect(images)]

    def follow(self, image: np.ndarray, faces: list[Face]) -> list[Face | None]:
        """O-Net alone, twice, on each face's last box (`MTCNN.refine`): a few milliseconds a
        frame, and steadier landmarks from frame to frame than a new search gives."""
        found = self.model.refine(image, np.array([f.box for f in faces], np.float32).reshape(-1, 4))
        # A second look from where the first one moved the box: a face that moved a quarter of
        # its size is then found in full, not part way, and the landmarks settle.
        found = self.model.refine(image, found.boxes)
        threshold = self.model.thresholds[2]
        return [
            next(iter(make_faces([b], [s], [lm], self.min_face_size)), None) if s > threshold else None
            for b, s, lm in zip(found.boxes, found.scores, found.landmarks)
        ]


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x1,y1,x2,y2 boxes."""
    ix = max(0.0, float(min(a[2], b[2]) - max(a[0], b[0])))
    iy = max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def match_faces(found: list[Face], faces: list[Face], min_iou: float = 0.3) -> list[Face | None]:
    """For each of `faces`, the face of `found` overlapping it most (at least `min_iou`), or None:
    `follow` for a detector that can only search whole images."""
    out: list[Face | None] = []
    for face in faces:
        best = max(found, key=lambda f: box_iou(f.box, face.box), default=None)
        out.append(best if best is not None and box_iou(best.box, face.box) >= min_iou else None)
    return out


def build_detector(
    name: str = "mtcnn",
    device: str = "cpu",
    threshold: float = 0.7,
    min_face_size: int = 20,
    weights_dir: Path | None = None,
) -> Detector:
    """Build a detector by name; raise DetectorUnavailable rather than downloading anything.

    threshold: minimum score of a kept face (MTCNN's O-Net stage, RetinaFace's confidence).
    min_face_size: faces whose box is narrower or shorter than this (pixels) are not reported.
    weights_dir: folder with the backend's weight files (default: the repository's weights/<name>/);
    for RetinaFace it may also be the .pth file itself.
    """
    key = name.lower().strip()
    if key not in DETECTORS:
        raise DetectorUnavailable(f"unknown detector {name!r}; choose one of: {', '.join(DETECTORS)}")
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DetectorUnavailable(f"device {device!r} requested but CUDA is not available")
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR / key
    if key == "mtcnn":
        missing = [f for f in MTCNN_FILES if not (folder / f).is_file()]
        if missing:
            raise DetectorUnavailable(f"MTCNN weights not found in {folder}: missing {', '.join(missing)}")
        return MTCNNDetector(folder, device=device, threshold=threshold, min_face_size=min_face_size)
    from .retinaface import RetinaFaceDetector

    return RetinaFaceDetector(folder, device=device, threshold=threshold, min_face_size=min_face_size)
