"""Face detection front end: one `Face` type and one `build_detector` for every backend.

Backends return faces in image pixels with five landmarks in the project's order (left eye,
right eye, nose, left mouth corner, right mouth corner; "left" = smaller x in an upright face),
sorted by box area, largest first, so "the main face" is always `faces[0]`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from facerestore_cli.faces.face import Detector, DetectorUnavailable, Face, make_faces
from facerestore_cli.paths import detector_weights

DETECTORS = ("mtcnn", "retinaface")
MTCNN_FILES = ("pnet.pt", "rnet.pt", "onet.pt")


class MTCNNDetector:
    """`Detector` over the project's own MTCNN implementation."""

    def __init__(self, weights_dir: Path, device: str = "cpu", threshold: float = 0.7, min_face_size: int = 20):
        from facerestore_cli.faces.mtcnn import MTCNN

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
    folder = Path(weights_dir) if weights_dir is not None else detector_weights(key)
    if key == "mtcnn":
        missing = [f for f in MTCNN_FILES if not (folder / f).is_file()]
        if missing:
            raise DetectorUnavailable(f"MTCNN weights not found in {folder}: missing {', '.join(missing)}")
        return MTCNNDetector(folder, device=device, threshold=threshold, min_face_size=min_face_size)
    from facerestore_cli.faces.retinaface import RetinaFaceDetector

    return RetinaFaceDetector(folder, device=device, threshold=threshold, min_face_size=min_face_size)


def detect_padded(detector: Detector, rgb: np.ndarray, pad: float = 0.25) -> list:
    """Detect on a grey-bordered copy: MTCNN misses faces that fill or touch the whole frame,
    which tight face crops (CelebA, web crops) often do. Landmarks come back in `rgb` pixels."""
    py, px = int(rgb.shape[0] * pad), int(rgb.shape[1] * pad)
    padded = cv2.copyMakeBorder(rgb, py, py, px, px, cv2.BORDER_CONSTANT, value=(127, 127, 127))
    faces = detector.detect([padded])[0]
    offset = np.array([px, py], dtype=np.float32)
    for f in faces:
        f.landmarks = f.landmarks - offset
        f.box = f.box - np.tile(offset, 2)
    return faces
