"""Faces through a video: whole-frame searches every few frames, faces followed in between."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from facerestore_cli.cli import main
from facerestore_cli.faces import build_detector
from facerestore_cli.faces.face import Face, match_faces
from facerestore_cli.faces.tracking import FaceTracker
from facerestore_cli.io.images import read_image, resize_image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TILE = 200  # px; the astronaut's face box is about 70 px at this size


@pytest.fixture(scope="module")
def detector():
    return build_detector("mtcnn")


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    return resize_image(read_image(EXAMPLES / "astronaut_lq.jpg").rgb, size=(TILE, TILE))


def frame_with(tile: np.ndarray, places: list[tuple[int, int]], noise: int = 0, seed: int = 0) -> np.ndarray:
    """A 480x320 grey frame with the tile at each (x, y), plus a little sensor noise."""
    frame = np.full((320, 480, 3), 110, np.uint8)
    for x, y in places:
        frame[y : y + TILE, x : x + TILE] = tile
    if noise:
        grain = np.random.default_rng(seed).normal(0, noise, frame.shape).round()
        frame = np.clip(frame + grain, 0, 255).astype(np.uint8)
    return frame


def eye_distance(face: Face) -> float:
    return float(np.linalg.norm(face.landmarks[1] - face.landmarks[0]))


def wobble(seq: list[Face], shifts: list[tuple[int, int]]) -> float:
    """Mean landmark movement from frame to frame beyond the face's true movement, in eye distances."""
    moves = [b.landmarks - a.landmarks - np.subtract(s1, s0) for a, b, s0, s1 in zip(seq, seq[1:], shifts, shifts[1:])]
    return float(np.mean(np.abs(moves)) / eye_distance(seq[0]))


def test_moving_face_followed_between_searches_and_steadier(detector, tile):
    shifts = [(40 + 9 * i, 20 + 5 * i) for i in range(16)]
    frames = [frame_with(tile, [s], noise=6, seed=i) for i, s in enumerate(shifts)]
    tracker = FaceTracker(detector, detect_every=8)
    tracked = tracker.detect(frames[:5]) + tracker.detect(frames[5:])  # chunks keep the state
    searched = [detector.detect([f])[0] for f in frames]
    assert tracker.whole_frame_searches == 2
    assert [len(f) for f in tracked] == [1] * 16 == [len(f) for f in searched]
    for (t,), (s,) in zip(tracked, searched):
        assert np.abs(t.landmarks - s.landmarks).max() < 0.25 * eye_distance(s), "followed face is not where the face is"
    # The point for a user: aligned crops (so the restored faces) wobble less from frame to frame.
    assert wobble([f[0] for f in tracked], shifts) < 0.7 * wobble([f[0] for f in searched], shifts)  # measured 0.018 vs 0.043


def test_new_face_found_at_the_next_search(detector, tile):
    frames = [frame_with(tile, [(20, 60)] + ([(260, 60)] if i >= 3 else [])) for i in range(8)]
    counts = [len(f) for f in FaceTracker(detector, detect_every=4).detect(frames)]
    assert counts == [1, 1, 1, 1, 2, 2, 2, 2]


def test_cut_and_face_leaving_searched_at_once(detector, tile):
    places = [[(20, 20)]] * 3 + [[(260, 100)]] * 3 + [[]] * 2
    tracker = FaceTracker(detector, detect_every=100)
    faces = tracker.detect([frame_with(tile, p) for p in places])
    assert [len(f) for f in faces] == [1, 1, 1, 1, 1, 1, 0, 0]
    assert faces[3][0].box[0] > 260, "after the cut the face must be found where it now is"
    assert tracker.whole_frame_searches == 3  # the first frame, the cut, the face leaving


def test_a_follow_the_search_does_not_confirm_is_dropped():
    face = Face(np.array([10, 10, 60, 60], np.float32), 0.9, np.full((5, 2), 35, np.float32))

    class SlidesOff:  # follows whatever it was given; the search sees the face only at first
        searches = 0

        def detect(self, images):
            self.searches += 1
            return [[face] if self.searches == 1 else [] for _ in images]

        def follow(self, image, faces):
            return list(faces)

    counts = [len(f) for f in FaceTracker(SlidesOff(), detect_every=3).detect([np.zeros((80, 80, 3), np.uint8)] * 7)]
    assert counts == [1, 1, 1, 0, 0, 0, 0]


def test_detect_every_1_is_the_plain_detector(detector, tile):
    frames = [frame_with(tile, [(30 + 4 * i, 40)], noise=4, seed=i) for i in range(3)]
    tracked = FaceTracker(detector, detect_every=1).detect(frames)
    searched = detector.detect(frames)
    assert [len(f) for f in tracked] == [len(f) for f in searched]
    for t, s in zip(tracked, searched):  # the same search; a tolerance for another CPU's batching
        for a, b in zip(t, s):
            np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)
    with pytest.raises(ValueError, match="at least 1"):
        FaceTracker(detector, detect_every=0)


def test_follow_loses_a_face_that_is_gone(detector, tile):
    face = detector.detect([frame_with(tile, [(100, 60)])])[0]
    assert detector.follow(frame_with(tile, []), face) == [None]
    moved = detector.follow(frame_with(tile, [(109, 64)]), face)[0]  # a quarter of its box
    assert moved is not None and 6 < moved.box[0] - face[0].box[0] < 12


def test_match_faces_for_whole_image_detectors():
    def face(x: float) -> Face:
        return Face(np.array([x, 0, x + 50, 50], np.float32), 0.9, np.zeros((5, 2), np.float32))

    found = [face(200), face(8)]
    assert match_faces(found, [face(0), face(100)]) == [found[1], None]


def test_cli_detect_every(tmp_path):
    out = tmp_path / "out"
    args = ["restore", str(EXAMPLES / "astronaut_pan.mp4"), "-o", str(out), "--device", "cpu", "--face-size", "128"]
    bad = CliRunner().invoke(main, [*args, "--detect-every", "0"])
    assert bad.exit_code == 2 and "--detect-every" in bad.output
    result = CliRunner().invoke(main, [*args, "--detect-every", "6"])
    assert result.exit_code == 0, result.output
    assert re.search(r"faces restored\W+24\b", result.output), "the face of every one of the 24 frames"
    assert (out / "astronaut_pan.mp4").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_follow_on_cuda_matches_cpu(detector, tile):
    faces = detector.detect([frame_with(tile, [(100, 60)])])[0]
    moved = frame_with(tile, [(106, 63)])
    on_cpu = detector.follow(moved, faces)[0]
    on_gpu = build_detector("mtcnn", device="cuda").follow(moved, faces)[0]
    assert on_cpu is not None and on_gpu is not None
    np.testing.assert_allclose(on_gpu.landmarks, on_cpu.landmarks, atol=1.0)
