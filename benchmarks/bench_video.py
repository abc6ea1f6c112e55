"""Whole-pipeline frames per second of `facerestore restore` on a generated 1080p clip.

    python benchmarks/bench_video.py --device cpu --threads 2 --frames 24
    python benchmarks/bench_video.py --device cuda --precision fp16 --frames 240 --faces 1,5

The clip is made here, once per face count: copies of the bundled public-domain astronaut
(`examples/astronaut_lq.jpg`) side by side on a 1920x1080 grey-gradient background, as large as
fits (one: a 1000-px tile, the face box about 170 px; five: 360-px tiles, face boxes about
60 x 70 px), drifting 2 px per frame, H.264 at 24 fps. It then goes
through the same `run_restore` as the CLI (decode in a background thread, detect (a whole-frame
search every --detect-every frames, faces followed in between), align,
restore in batches across frames, paste back, encode), after a warm-up run on a shorter clip.
Prints one Markdown row per face count, in the columns of benchmarks/RESULTS.md, with the
flicker of the restored faces (inside their boxes) once the tiles stand still (five faces:
after 10 frames); use --noise to give the clip grain that changes from frame to frame.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_restore import machine, row

from facerestore_cli.faces.tracking import DEFAULT_DETECT_EVERY
from facerestore_cli.io.images import read_image, resize_image
from facerestore_cli.io.video import read_video_frames
from facerestore_cli.io.video_writer import VideoWriter
from facerestore_cli.models.loading import DEFAULT_MODEL
from facerestore_cli.restore.face_restorer import build_face_restorer
from facerestore_cli.restore.loop import run_restore
from facerestore_cli.restore.options import DetectionSettings, FaceSettings, ModelChoice, RestoreOptions, parse_face_size

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "astronaut_lq.jpg"
WIDTH, HEIGHT, MAX_TILE = 1920, 1080, 1000


def tile_side(faces: int) -> int:
    """Side of each astronaut tile: as large as `faces` of them fit in a row."""
    if not 1 <= faces <= 8:
        raise SystemExit("--faces: 1 to 8 faces fit in a 1080p row")
    return min(MAX_TILE, WIDTH // faces * 15 // 16)


def tile_positions(faces: int, frame: int) -> list[tuple[int, int]]:
    """Top-left corner of each tile in a frame: a row, drifting right 2 px per frame while there is room."""
    side = tile_side(faces)
    gap = (WIDTH - faces * side) // (faces + 1)
    top = (HEIGHT - side) // 2
    return [(gap + k * (side + gap) + min(2 * frame, gap - 1), top) for k in range(faces)]


def make_clip(path: Path, faces: int, frames: int, fps: int = 24, noise: float = 0.0) -> Path:
    """A 1080p clip with `faces` astronaut tiles at `tile_positions`, and sensor-like grain of
    standard deviation `noise` grey levels, new in every frame."""
    side, rng = tile_side(faces), np.random.default_rng(0)
    tile = resize_image(read_image(EXAMPLE).rgb, size=(side, side))
    ramp = np.linspace(60, 190, WIDTH, dtype=np.float32)
    background = np.repeat(np.repeat(ramp[None, :, None], HEIGHT, 0), 3, 2).astype(np.uint8)
    with VideoWriter(path, fps, (WIDTH, HEIGHT)) as writer:
        for i in range(frames):
            frame = background.copy()
            for x, y in tile_positions(faces, i):
                frame[y : y + side, x : x + side] = tile
            if noise:
                frame = np.clip(frame + rng.normal(0, noise, frame.shape).astype(np.float32), 0, 255).round().astype(np.uint8)
            writer.write(frame)
    return path


def run(face_restorer, clip: Path, out: Path, chunk: int, detect_every: int) -> tuple[int, int, float]:
    """(frames, faces restored, seconds) of one restore of the clip."""
    t = time.perf_counter()
    summary = run_restore([str(clip)], face_restorer, RestoreOptions(out, video_chunk=chunk, detect_every=detect_every))
    seconds = time.perf_counter() - t
    if not summary.ok:
        raise SystemExit("restore failed: " + "; ".join(summary.failures))
    return summary.frames, summary.faces_restored, seconds


def still_frames(faces: int, frames: int) -> list[int]:
    """Frames whose tiles stand where they stood in the frame before (five faces: after 10)."""
    return [i for i in range(1, frames) if tile_positions(faces, i) == tile_positions(faces, i - 1)]


def flicker(clip: Path, boxes: list[np.ndarray], still: list[int]) -> float:
    """Mean |frame - frame before| in grey levels inside the face boxes, over the `still` frames:
    the faces have not moved, so any change there is the grain's, the codec's or the pipeline's."""
    diffs, before = [], None
    for i, frame in enumerate(read_video_frames(clip)):
        if i in still:
            for x1, y1, x2, y2 in (np.round(b).astype(int) for b in boxes):
                diffs.append(np.abs(frame[y1:y2, x1:x2].astype(np.int16) - before[y1:y2, x1:x2]).mean())
        before = frame
    return float(np.mean(diffs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help=f"restorer folder [default: {DEFAULT_MODEL.name}]")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch [default: torch's]")
    ap.add_argument("--faces", default="1,5", help="face counts, comma-separated [default: 1,5]")
    ap.add_argument("--frames", type=int, default=48, help="frames per clip [default: 48]")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--video-chunk", type=int, default=8, help="frames detected and restored together")
    ap.add_argument("--face-size", default="auto", type=parse_face_size, help="restore --face-size (auto or pixels)")
    ap.add_argument("--frame-path", choices=["auto", "tensor", "numpy"], default="auto")
    ap.add_argument("--min-face-size", type=int, default=20, help="restore --min-face-size: MTCNN's image pyramid starts at 12 / this")
    ap.add_argument("--noise", type=float, default=0.0, help="grain added to every frame, standard deviation in grey levels [default: 0]")
    ap.add_argument(
        "--detect-every", type=int, default=DEFAULT_DETECT_EVERY, help="restore --detect-every: frames per whole-frame face search"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    face_restorer = build_face_restorer(
        ModelChoice(model=args.model, precision=args.precision),
        DetectionSettings(min_face_size=args.min_face_size),
        FaceSettings(batch_size=args.batch_size, frame_path=args.frame_path, face_size=args.face_size),
        device=args.device,
    )
    where = machine()
    settings = (
        f"{(args.model or DEFAULT_MODEL).name}, {args.precision}, {face_restorer.device.type}, {torch.get_num_threads()} threads, "
        f"batch {args.batch_size}, chunk {args.video_chunk}, frame path {face_restorer.frame_path}, face size {args.face_size}, "
        f"min face {args.min_face_size} px, detect every {args.detect_every}, noise {args.noise:g}"
    )
    print(f"machine: {where}")
    print("| date | machine | settings | what | result |\n| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run(face_restorer, make_clip(root / "warm.mp4", 1, min(args.frames, 8)), root / "warm_out", args.video_chunk, args.detect_every)
        for n in [int(s) for s in args.faces.split(",")]:
            clip = make_clip(root / f"clip_{n}.mp4", n, args.frames, noise=args.noise)
            frames, faces, seconds = run(face_restorer, clip, root / f"out_{n}", args.video_chunk, args.detect_every)
            what = f"end to end, generated 1080p clip, {n} face(s) per frame, {frames} frames ({faces} faces restored)"
            result = f"{frames / seconds:.2f} frames/s, {faces / seconds:.2f} faces/s"
            still = still_frames(n, frames)
            if still:
                *_, last = read_video_frames(clip)
                boxes = [f.box for f in face_restorer.detector.detect([last])[0]]
                out = flicker(root / f"out_{n}" / clip.name, boxes, still)
                result += f"; face flicker on still frames {out:.2f} grey levels (input {flicker(clip, boxes, still):.2f})"
            print(row(settings, what, result, where), flush=True)


if __name__ == "__main__":
    main()
