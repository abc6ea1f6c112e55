"""Scoring face image files with the FRM, for `facerestore score` (pick the best restoration).

Aligned crops are scored as they are; with `detect`, faces in whole photos are found with the
project's detector and aligned to the FFHQ template first, and the file's score is the mean of
its faces' scores.

The FRM scores whatever it is given, and a whole photo or a loose crop gets a plausible number
that is not a face's. So a file scored as an aligned crop is checked (`crop_problem`): it must be
square, and, given a detector, the face found in it must sit where the FFHQ template puts it
(mean landmark distance under `ALIGNED_TOLERANCE` of the template's eye distance); otherwise
the file's score carries a one-line warning.
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
#: How far (mean landmark distance, in template eye distances) a crop's face may sit from the
#: FFHQ template and still count as aligned: detected landmarks of aligned crops of this project
#: are a few pixels off at 512 px, a face anywhere else in a square photo is many times further.
ALIGNED_TOLERANCE = 0.25


@dataclass
class FileScore:
    """One file's score (the mean over its faces) and each face's score."""

    path: Path
    score: float
    faces: list[float] = field(default_factory=list)
    warning: str | None = None  # why the file does not look like an aligned face crop


def aligned_faces(rgb: np.ndarray, detector) -> list[np.ndarray]:
    """Every detected face of a photo, aligned at 512 px (largest first)."""
    from facerestore_cli.faces.align import estimate_affine, warp_faces
    from facerestore_cli.faces.detector import detect_padded

    faces = sorted(detect_padded(detector, rgb), key=lambda f: -f.area)
    if not faces:
        return []
    return warp_faces(rgb, [estimate_affine(f.landmarks, ALIGNED_SIZE) for f in faces], ALIGNED_SIZE)


def crop_problem(rgb: np.ndarray, checker=None) -> str | None:
    """Why `rgb`, scored as an aligned face crop, does not look like one (None when it does):
    not square, or (with a `checker` detector) no face found at the FFHQ template position."""
    from facerestore_cli.faces.align import face_template
    from facerestore_cli.faces.detector import detect_padded

    h, w = rgb.shape[:2]
    if h != w:
        return f"{w}x{h} pixels, not a square aligned face crop"
    if checker is None:
        return None
    faces = detect_padded(checker, rgb)
    if not faces:
        return "no face found in it, so it is not an aligned face crop"
    template = face_template(h)
    eyes = float(np.linalg.norm(template[1] - template[0]))
    off = min(float(np.linalg.norm(f.landmarks - template, axis=1).mean()) / eyes for f in faces)
    if off > ALIGNED_TOLERANCE:
        return "its face is not where an aligned face crop has it"
    return None


def _faces_of(path: Path, detector, checker=None) -> tuple[list[np.ndarray], str | None]:
    """The faces to score in one file, and why it does not look like an aligned crop (if so)."""
    if media_kind(path) != "image":
        raise MediaError(path, "not an image file (score takes aligned face crops or, with --detect, photos)")
    rgb = read_image(path).rgb
    if detector is None:
        return [rgb], crop_problem(rgb, checker)
    faces = aligned_faces(rgb, detector)
    if not faces:
        raise MediaError(path, "no face found")
    return faces, None


def score_paths(
    model: FaceRewardModel,
    paths: Sequence[Path],
    caption: str | None = None,
    detector=None,
    batch_size: int = 16,
    on_file: Callable[[Path], None] | None = None,
    checker=None,
) -> tuple[list[FileScore], list[MediaError]]:
    """Scores of files (in order) and one MediaError per file that could not be scored. Without
    `detector` each file is an aligned crop, checked by `crop_problem` (with `checker`, a
    detector, also for where its face is); a file that fails the check is still scored, with
    the reason in its `warning`."""
    scores: list[FileScore] = []
    errors: list[MediaError] = []
    for path in paths:
        try:
            faces, warning = _faces_of(Path(path), detector, checker)
        except MediaError as err:
            errors.append(err)
        else:
            face_scores = model.score_images(faces, [caption] * len(faces) if caption else None, batch_size)
            scores.append(FileScore(Path(path), float(np.mean(face_scores)), face_scores, warning))
        if on_file:
            on_file(Path(path))
    return scores, errors
