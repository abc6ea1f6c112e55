"""Faces through a video: searched for in the whole frame now and then, followed in between.

Whole-frame detection is the slowest step of restoring a video on a CPU (MTCNN takes about
0.5 s per 1080p frame, more than the model restoring a face at --face-size 256). A face moves
little from one frame to the next, so between whole-frame searches each known face is only
followed: the detector's `follow` looks for it where it was (MTCNN: its last stage alone on
the last box, a few milliseconds). Followed landmarks are also steadier from frame to frame
than new searches, so the aligned crops wobble less.

A whole-frame search runs every `detect_every` frames, so a face that comes into the picture
(or one a search missed) is found at most that many frames late; and one runs at once on any
frame where a followed face is lost (a cut, an occlusion, a face leaving the picture, two faces
merging into one). Followed faces the search finds too keep their followed landmarks, so their
crops do not jump at each search; followed faces it does not find are dropped.
"""

from __future__ import annotations

import numpy as np

from facerestore_cli.faces.face import Detector, Face, box_iou

#: Frames per whole-frame search: a third of a second at 24 fps.
DEFAULT_DETECT_EVERY = 8
#: Two faces whose boxes overlap more than this (intersection over union) are one face.
SAME_FACE_IOU = 0.5


class FaceTracker:
    """A `Detector` for the frames of one video, given in order (it keeps the faces of the
    last frame). `detect_every` 1 searches every whole frame, as the plain detector does."""

    def __init__(self, detector: Detector, detect_every: int = DEFAULT_DETECT_EVERY):
        if detect_every < 1:
            raise ValueError(f"detect_every must be at least 1 frame, got {detect_every}")
        self.detector, self.detect_every = detector, detect_every
        self.whole_frame_searches = 0
        self._faces: list[Face] = []
        self._steps: list[np.ndarray] = []  # each face's last move (dx, dy), assumed again next frame
        self._age = detect_every  # frames since the last whole-frame search, counting it: search first

    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        return [self._next(frame) for frame in images]

    def follow(self, image: np.ndarray, faces: list[Face]) -> list[Face | None]:
        return self.detector.follow(image, faces)

    def _next(self, frame: np.ndarray) -> list[Face]:
        if self.detect_every == 1:
            self.whole_frame_searches += 1
            return self.detector.detect([frame])[0]
        ahead = [_moved(f, step) for f, step in zip(self._faces, self._steps)]
        followed = _drop_merged(self.detector.follow(frame, ahead)) if ahead else []
        faces = [f for f in followed if f is not None]
        steps = [_centre(f) - _centre(old) for f, old in zip(followed, self._faces) if f is not None]
        if len(faces) < len(self._faces) or self._age >= self.detect_every:
            found = self.detector.detect([frame])[0]
            self.whole_frame_searches += 1
            # A followed face stays only if the search finds it too (a follow that slid off onto
            # something else lasts one interval at most); found faces not followed are new.
            kept = [i for i, f in enumerate(faces) if any(_same(f, g) for g in found)]
            faces, steps = [faces[i] for i in kept], [steps[i] for i in kept]
            new = [g for g in found if not any(_same(f, g) for f in faces)]
            faces, steps = faces + new, steps + [np.zeros(2, np.float32)] * len(new)
            self._age = 0
        self._faces, self._steps = faces, steps
        self._age += 1
        return sorted(faces, key=lambda f: f.area, reverse=True)


def _same(a: Face, b: Face) -> bool:
    return box_iou(a.box, b.box) > SAME_FACE_IOU


def _centre(face: Face) -> np.ndarray:
    return (face.box[:2] + face.box[2:]) / 2


def _moved(face: Face, step: np.ndarray) -> Face:
    """The face shifted by `step` pixels: where it will be if it keeps moving as it did."""
    return Face(face.box + np.tile(step, 2), face.score, face.landmarks + step)


def _drop_merged(faces: list[Face | None]) -> list[Face | None]:
    """None for the weaker of two followed faces that landed on one face."""
    out = list(faces)
    for i in range(len(out)):
        for j in range(i + 1, len(out)):
            a, b = out[i], out[j]
            if a is not None and b is not None and _same(a, b):
                out[j if a.score >= b.score else i] = None
    return out
