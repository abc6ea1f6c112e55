"""A detected face, the detector protocol every detector follows, and matching faces across frames."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from facerestore_cli.errors import FacerestoreError


class DetectorUnavailable(FacerestoreError):
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
