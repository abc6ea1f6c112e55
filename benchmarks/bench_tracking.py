"""Face detection in video: a whole-frame search on every frame against following the faces.

    python benchmarks/bench_tracking.py --threads 2 --frames 48

On the generated 1080p clips of bench_video.py (1 and 5 astronauts drifting sideways, H.264),
decoded as `restore` decodes them, this times the detector alone per frame for each
--detect-every (1 = a whole-frame MTCNN search on every frame, as before tracking), and
measures how much the landmarks wobble from frame to frame beyond the faces' true movement
(mean absolute landmark error, in eye distances): how much the aligned crop moves under a face
that did not move. --noise gives the clip grain that changes from frame to frame. Prints
Markdown rows for RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_restore import machine, row
from bench_video import make_clip, tile_positions, tile_side

from facerestore_cli.faces import build_detector
from facerestore_cli.faces.face import Face
from facerestore_cli.faces.tracking import FaceTracker
from facerestore_cli.io.video import read_video_frames


def in_tiles(faces: list[Face], tiles: list[tuple[int, int]], side: int) -> list[Face | None]:
    """For each tile, the face whose box centre lies in it (None if the detector missed it)."""

    def inside(f: Face, x: int, y: int) -> bool:
        cx, cy = (f.box[:2] + f.box[2:]) / 2
        return x <= cx < x + side and y <= cy < y + side

    return [next((f for f in faces if inside(f, x, y)), None) for x, y in tiles]


def wobble(frames: list[list[Face]], faces: int) -> tuple[float, int, int]:
    """Mean landmark movement between consecutive frames beyond the tiles' own, in eye distances;
    and how many faces were missed, and how many found outside the tiles (false faces)."""
    side, errors, missed, extra = tile_side(faces), [], 0, 0
    found = [in_tiles(f, tile_positions(faces, i), side) for i, f in enumerate(frames)]
    for now, kept in zip(frames, found):
        missed += kept.count(None)
        extra += len(now) - (len(kept) - kept.count(None))
    for i in range(1, len(frames)):
        for a, b, ta, tb in zip(found[i - 1], found[i], tile_positions(faces, i - 1), tile_positions(faces, i)):
            if a is not None and b is not None:
                eye = float(np.linalg.norm(a.landmarks[1] - a.landmarks[0]))
                errors.append(np.abs(b.landmarks - a.landmarks - np.subtract(tb, ta)).mean() / eye)
    return float(np.mean(errors)), missed, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch [default: torch's]")
    ap.add_argument("--faces", default="1,5", help="face counts, comma-separated [default: 1,5]")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--detect-every", default="1,8,24", help="values of restore --detect-every to compare [default: 1,8,24]")
    ap.add_argument("--min-face-size", type=int, default=20)
    ap.add_argument("--noise", type=float, default=0.0, help="grain added to every frame, standard deviation in grey levels [default: 0]")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    detector = build_detector("mtcnn", device=args.device, min_face_size=args.min_face_size)
    where = machine()
    settings = f"MTCNN, {args.device}, {torch.get_num_threads()} threads, min face {args.min_face_size} px, noise {args.noise:g}"
    print(f"machine: {where}")
    print("| date | machine | settings | what | result |\n| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(s) for s in args.faces.split(",")]:
            clip = make_clip(Path(tmp) / f"clip_{n}.mp4", n, args.frames, noise=args.noise)
            frames = list(read_video_frames(clip))
            FaceTracker(detector, 1).detect(frames[:2])  # warm-up
            for every in [int(s) for s in args.detect_every.split(",")]:
                tracker = FaceTracker(detector, every)
                t = time.perf_counter()
                faces = tracker.detect(frames)
                ms = (time.perf_counter() - t) / len(frames) * 1000
                what = f"face detection, generated 1080p clip, {n} face(s), {len(frames)} frames, --detect-every {every}"
                moved, missed, extra = wobble(faces, n)
                result = (
                    f"{ms:.0f} ms/frame ({tracker.whole_frame_searches} whole-frame searches), wobble {moved:.4f} "
                    f"eye distances, {missed} faces missed, {extra} false faces"
                )
                print(row(settings, what, result, where), flush=True)


if __name__ == "__main__":
    main()
