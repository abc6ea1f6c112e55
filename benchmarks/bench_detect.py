"""MTCNN on one photo at a time, as `restore` detects a single photo.

    python benchmarks/bench_detect.py --threads 2 --repeats 5

Times `detect([photo])` on the test photos tests/test_faces.py counts faces in (from
../shared/data/faces/train/photos), after one warm-up call each, and prints a Markdown row per
photo (median of --repeats calls) in the columns of benchmarks/RESULTS.md. This is the timing
tests/test_faces.py used to print; tests assert what a user notices, never timings.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from bench_restore import machine, row

from facerestore_cli.faces import build_detector

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces" / "train" / "photos"
NAMES = ["face-api.js/bbt4.jpg", "facenet-pytorch/multiface.jpg", "deepface_tests/couple.jpg", "GPEN_ffhq-10/00000.jpg"]


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"unreadable photo {path}")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per photo (median)")
    ap.add_argument("--photos", type=Path, default=PHOTOS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    detector = build_detector("mtcnn")
    for name in NAMES:
        image = read_rgb(args.photos / name)
        faces = detector.detect([image])[0]  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            detector.detect([image])
            times.append(time.perf_counter() - start)
        h, w = image.shape[:2]
        result = f"{1000 * statistics.median(times):.0f} ms ({len(faces)} faces)"
        print(row(f"mtcnn, {args.threads} threads", f"detect one {w}x{h} photo ({name})", result, machine()))


if __name__ == "__main__":
    main()
