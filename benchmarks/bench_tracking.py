"""Face detection in video: a whole-frame search on every frame against following the faces.

    python benchmarks/bench_tracking.py --threads 2 --frames 48

On the generated 1080p clips of bench_video.py (1 and 5 astronauts drifting sideways, H.264),
decoded as `restore` decodes them, this times the detector alone per frame for each
--detect-every (1 = a whole-frame MTCNN search on every frame, as before tracking), and
measures how much the landmarks wobble from frame to frame beyond the faces' true movement
(mean absolute landmark error, in eye distances): the wobble is what makes restored faces
shimmer in a video, as the aligned crop moves under them. Prints Markdown rows for RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_restore import machine, row
from bench_video import make_clip, tile_positions
from facerestore_cli.faces import Face, build_detector
from facerestore_cli.faces.tracking import FaceTracker
from facerestore_cli.media import read_video_frames


def wobble(frames: list[list[Face]], positions: list[list[tuple[int, int]]]) -> float:
    """Mean landmark movement between consecutive frames beyond the tiles' own, in eye distances.
    Faces are paired with their tile by position (left to right)."""
    errors = []
    for (a, b), (pa, pb) in zip(zip(frames, frames[1:]), zip(positions, positions[1:])):
        if len(a) != len(pa) or len(b) != len(pb):
            raise SystemExit("a face was missed: the wobble needs every face in every frame")
        a, b = sorted(a, key=lambda f: f.box[0]), sorted(b, key=lambda f: f.box[0])
        for fa, fb, ta, tb in zip(a, b, pa, pb):
            move = np.subtract(tb, ta)
            eye = float(np.linalg.norm(fa.landmarks[1] - fa.landmarks[0]))
            errors.append(np.abs(fb.landmarks - fa.landmarks - move).mean() / eye)
    return float(np.mean(errors))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch [default: torch's]")
    ap.add_argument("--faces", default="1,5", help="face counts, comma-separated [default: 1,5]")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--detect-every", default="1,8,24", help="values of restore --detect-every to compare [default: 1,8,24]")
    ap.add_argument("--min-face-size", type=int, default=20)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    detector = build_detector("mtcnn", device=args.device, min_face_size=args.min_face_size)
    where = machine()
    settings = f"MTCNN, {args.device}, {torch.get_num_threads()} threads, min face {args.min_face_size} px"
    print(f"machine: {where}")
    print("| date | machine | settings | what | result |\n| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(s) for s in args.faces.split(",")]:
            clip = make_clip(Path(tmp) / f"clip_{n}.mp4", n, args.frames)
            frames = list(read_video_frames(clip))
            positions = [tile_positions(n, i) for i in range(len(frames))]
            FaceTracker(detector, 1).detect(frames[:2])  # warm-up
            for every in [int(s) for s in args.detect_every.split(",")]:
                tracker = FaceTracker(detector, every)
                t = time.perf_counter()
                faces = tracker.detect(frames)
                ms = (time.perf_counter() - t) / len(frames) * 1000
                what = f"face detection, generated 1080p clip, {n} face(s), {len(frames)} frames, --detect-every {every}"
                result = (f"{ms:.0f} ms/frame ({tracker.whole_frame_searches} whole-frame searches), "
                          f"wobble {wobble(faces, positions):.4f} eye distances")  # fmt: skip
                print(row(settings, what, result, where), flush=True)


if __name__ == "__main__":
    main()
