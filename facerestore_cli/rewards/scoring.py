"""Scoring face image files with the FRM, for `facerestore score` (pick the best restoration).

Aligned crops are scored as they are; with `detect`, faces in whole photos are found with the
project's detector and aligned to the FFHQ template first, and the file's score is the mean of
its faces' scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from facerestore_cli.io.files import MediaError
from facerestore_cli.io.images import read_image
from facerestore_cli.io.inputs import media_kind
from facerestore_cli.rewards.frm import FaceRewardModel

ALIGNED_SIZE = 512


@dataclass
class FileScore:
    """One file's score (the mean over its faces) and each face's score."""

    path: Path
    score: float
    faces: list[float] = field(default_factory=list)


def aligned_faces(rgb: np.ndarray, detector) -> list[np.ndarray]:
    """Every detected face of a photo, aligned at 512 px (largest first)."""
    from facerestore_cli.faces.align import estimate_affine, warp_faces
    from facerestore_cli.faces.detector import detect_padded

    faces = sorted(detect_padded(detector, rgb), key=lambda f: -f.area)
    if not faces:
        return []
    return warp_faces(rgb, [estimate_affine(f.landmarks, ALIGNED_SIZE) for f in faces], ALIGNED_SIZE)


def _faces_of(path: Path, detector) -> list[np.ndarray]:
    if media_kind(path) != "image":
        raise MediaError(path, "not an image file (score takes aligned face crops or, with --detect, photos)")
    rgb = read_image(path).rgb
    if detector is None:
        return [rgb]
    faces = aligned_faces(rgb, detector)
    if not faces:
        raise MediaError(path, "no face found")
    return faces


def score_paths(
    model: FaceRewardModel,
    paths: Sequence[Path],
    caption: str | None = None,
    detector=None,
    batch_size: int = 16,
    on_file: Callable[[Path], None] | None = None,
) -> tuple[list[FileScore], list[MediaError]]:
    """Scores of files (in order) and one MediaError per file that could not be scored."""
    scores: list[FileScore] = []
    errors: list[MediaError] = []
    for path in paths:
        try:
            faces = _faces_of(Path(path), detector)
        except MediaError as err:
            errors.append(err)
        else:
            face_scores = model.score_images(faces, [caption] * len(faces) if caption else None, batch_size)
            scores.append(FileScore(Path(path), float(np.mean(face_scores)), face_scores))
        if on_file:
            on_file(Path(path))
    return scores, errors
