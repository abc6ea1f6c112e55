"""Compare a restore's outputs with a reference run's (e.g. CUDA fp16 against the CPU's fp32).

    python benchmarks/compare_outputs.py REF_DIR OUT_DIR --label "cuda fp16" --max-mean 2.5 --max-p99 14

Every file under REF_DIR (images, videos frame by frame, .npy arrays) must be under OUT_DIR at the
same relative path, with the same size (and frame count). Per file it reports, in grey levels
(0-255) over all pixels and channels: the mean, 99th percentile and maximum absolute difference,
and the number of black tiles: 16x16 tiles whose mean is below 8 in the output but above 32 in
the reference (what a NaN face turns into once written: PrecisionGuard's "black face"). Face
crops that `restore --save-faces` writes (files under a `faces` folder: aligned input | restored,
side by side) are also checked on their own: a restored half that is all but black (99th
percentile at most 8) while the aligned half is not is a black face. .npy files are checked for
NaN/inf, and differ in their own units.

A file fails on: missing, another size or frame count, NaN/inf, any black tile or black face,
a mean difference above --max-mean or a 99th percentile above --max-p99. Prints a Markdown table
and a last line `compare LABEL: PASS|FAIL, N files, worst mean X, worst p99 Y, max Z, ...`.
Exit code: 0 all pass, 1 some file failed, 2 nothing to compare.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v"}
ARRAY_EXTS = {".npy"}
TILE = 16
BLACK_TILE_OUT, BLACK_TILE_REF = 8.0, 32.0
BLACK_FACE_P99, LIT_FACE_P99 = 8, 32


@dataclass
class FileResult:
    """Differences of one output file from its reference."""

    name: str
    frames: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))  # |diff| counts (images, videos)
    max_diff: float = 0.0
    sum_diff: float = 0.0
    count: int = 0
    black_tiles: int = 0
    black_faces: int = 0
    non_finite: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return self.sum_diff / self.count if self.count else 0.0

    @property
    def p99(self) -> float:
        if not self.hist.any():
            return self.max_diff  # arrays: no histogram, the max stands in
        cum = np.cumsum(self.hist)
        return float(np.searchsorted(cum, 0.99 * cum[-1]))

    def add_uint8(self, out: np.ndarray, ref: np.ndarray) -> None:
        diff = np.abs(out.astype(np.int16) - ref.astype(np.int16)).astype(np.uint8)
        self.hist += np.bincount(diff.ravel(), minlength=256)
        self.sum_diff += float(diff.sum(dtype=np.int64))
        self.count += diff.size
        self.max_diff = max(self.max_diff, float(diff.max(initial=0)))
        self.frames += 1


def black_tiles(out: np.ndarray, ref: np.ndarray, tile: int = TILE) -> int:
    """Tiles (tile x tile, whole ones) that are black in `out` but lit in `ref`."""
    h, w = (out.shape[0] // tile) * tile, (out.shape[1] // tile) * tile
    if not h or not w:
        return 0

    def means(img: np.ndarray) -> np.ndarray:
        grey = img[:h, :w].astype(np.float32)
        grey = grey.mean(axis=2) if grey.ndim == 3 else grey
        return grey.reshape(h // tile, tile, w // tile, tile).mean(axis=(1, 3))

    return int(((means(out) < BLACK_TILE_OUT) & (means(ref) > BLACK_TILE_REF)).sum())


def is_black_face(crop_pair: np.ndarray) -> bool:
    """A `--save-faces` file (aligned | restored side by side) whose restored half is black."""
    half = crop_pair.shape[1] // 2
    aligned, restored = crop_pair[:, :half], crop_pair[:, half:]
    return np.percentile(restored, 99) <= BLACK_FACE_P99 and np.percentile(aligned, 99) > LIT_FACE_P99


def read_image(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("cannot read image")
    return img


def video_frames(path: Path):
    from facerestore_cli.io.video import read_video_frames  # ffmpeg, only when there is a video

    return read_video_frames(path)


def compare_file(ref: Path, out: Path, name: str) -> FileResult:
    res = FileResult(name)
    if not out.exists():
        res.problems.append("missing")
        return res
    ext = ref.suffix.lower()
    try:
        if ext in IMAGE_EXTS:
            a, b = read_image(out), read_image(ref)
            if a.shape != b.shape:
                res.problems.append(f"size {a.shape[1]}x{a.shape[0]} != reference {b.shape[1]}x{b.shape[0]}")
                return res
            res.add_uint8(a, b)
            res.black_tiles += black_tiles(a, b)
            if "faces" in Path(name).parts[:-1] and is_black_face(a):
                res.black_faces += 1
        elif ext in VIDEO_EXTS:
            ref_frames = iter(video_frames(ref))
            for a in video_frames(out):
                b = next(ref_frames, None)
                if b is None:
                    res.problems.append("more frames than the reference")
                    break
                if a.shape != b.shape:
                    res.problems.append(f"frame size {a.shape[1]}x{a.shape[0]} != reference {b.shape[1]}x{b.shape[0]}")
                    break
                res.add_uint8(a, b)
                res.black_tiles += black_tiles(a, b)
            extra = sum(1 for _ in ref_frames)
            if extra:
                res.problems.append(f"{extra} frames fewer than the reference")
        elif ext in ARRAY_EXTS:
            a, b = np.load(out).astype(np.float64), np.load(ref).astype(np.float64)
            res.non_finite = int((~np.isfinite(a)).sum())
            if a.shape != b.shape:
                res.problems.append(f"shape {a.shape} != reference {b.shape}")
                return res
            diff = np.abs(np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0) - b)
            res.sum_diff, res.count = float(diff.sum()), diff.size
            res.max_diff = float(diff.max(initial=0.0))
            res.frames = 1
    except Exception as err:  # an unreadable output is a failed output
        res.problems.append(f"unreadable: {type(err).__name__}: {err}")
    return res


def check(res: FileResult, max_mean: float, max_p99: float) -> list[str]:
    """Why the file fails (empty: it passes)."""
    why = list(res.problems)
    if res.non_finite:
        why.append(f"{res.non_finite} NaN/inf values")
    if res.black_faces:
        why.append("black face")
    if res.black_tiles:
        why.append(f"{res.black_tiles} black tiles")
    if res.count and res.mean > max_mean:
        why.append(f"mean {res.mean:.2f} > {max_mean:g}")
    if res.count and res.p99 > max_p99:
        why.append(f"p99 {res.p99:.0f} > {max_p99:g}")
    return why


def files_under(root: Path) -> list[str]:
    exts = IMAGE_EXTS | VIDEO_EXTS | ARRAY_EXTS
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)


def compare_dirs(ref_dir: Path, out_dir: Path, max_mean: float, max_p99: float, label: str = "", stream=None) -> int:
    """Compare every reference file with the output's; print the table and summary line; exit code."""
    label = label or str(out_dir)
    stream = stream or sys.stdout
    names = files_under(ref_dir) if ref_dir.is_dir() else []
    if not names:
        print(f"compare {label}: NOTHING TO COMPARE (no images, videos or .npy files under {ref_dir})", file=stream)
        return 2
    print("| file | frames | mean | p99 | max | black tiles | status |\n| --- | --- | --- | --- | --- | --- | --- |", file=stream)
    failed, results = 0, []
    for name in names:
        res = compare_file(ref_dir / name, out_dir / name, name)
        why = check(res, max_mean, max_p99)
        failed += bool(why)
        results.append(res)
        status = "FAIL: " + "; ".join(why) if why else "ok"
        print(
            f"| {name} | {res.frames} | {res.mean:.2f} | {res.p99:.0f} | {res.max_diff:.0f} | {res.black_tiles} | {status} |", file=stream
        )
    extra = sorted(set(files_under(out_dir)) - set(names)) if out_dir.is_dir() else []
    if extra:
        print(f"note: {len(extra)} output files have no reference: {', '.join(extra[:5])}", file=stream)
    measured = [r for r in results if r.count]
    worst_mean = max((r.mean for r in measured), default=0.0)
    worst_p99 = max((r.p99 for r in measured), default=0.0)
    worst_max = max((r.max_diff for r in measured), default=0.0)
    faces = [r for r in measured if "faces" in Path(r.name).parts[:-1]]
    face_mean = f", face crops mean {np.mean([r.mean for r in faces]):.2f}" if faces else ""
    verdict = "PASS" if not failed else f"FAIL ({failed} of {len(names)} files)"
    print(
        f"compare {label}: {verdict}, {len(names)} files, worst mean {worst_mean:.2f}, worst p99 {worst_p99:.0f}, max {worst_max:.0f} grey levels{face_mean}"
        f" (limits: mean {max_mean:g}, p99 {max_p99:g}; black tiles {sum(r.black_tiles for r in results)}, black faces {sum(r.black_faces for r in results)})",
        file=stream,
        flush=True,
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref", type=Path, help="reference outputs (e.g. the CPU fp32 run)")
    ap.add_argument("out", type=Path, help="outputs to check, same layout")
    ap.add_argument("--max-mean", type=float, default=2.0, help="largest mean |difference| per file, grey levels [default: 2]")
    ap.add_argument("--max-p99", type=float, default=12.0, help="largest 99th percentile |difference| per file [default: 12]")
    ap.add_argument("--label", default="", help="name in the summary line [default: OUT]")
    args = ap.parse_args(argv)
    return compare_dirs(args.ref, args.out, args.max_mean, args.max_p99, args.label)


if __name__ == "__main__":
    sys.exit(main())
