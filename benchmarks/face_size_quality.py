"""Is a small face restored as well on a small crop as on the full-size one? (`restore --face-size auto`)

    python benchmarks/face_size_quality.py --pairs data/val_pairs --pairs data/val_pairs_mild --limit 100

A face that is at most `--small` px in the output image is pasted back at that size or less,
so what a user sees of it is the restoration shrunk to the small size. This script restores
every pair of each set both ways: on the full-size crop (the LQ resized to the model's size,
bicubic when it grows, as the aligner warps a small face) and then shrunk to the small size,
and on the small crop (the LQ resized to it); both are scored at the small size against the
ground truth resized the same way, with the metrics `facerestore eval` uses. Sets made at the
small size (`facerestore degrade --size 256`: a face degraded at its own size in the photo)
are the case `--face-size` meets; 512-px sets shrunk are faces degraded before shrinking. It
also times both ways (the restorer and the colour fix, one batch of --batch-size at a time).
Prints Markdown rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path

import numpy as np
import torch

from facerestore_cli.data.testsets import find_pairs
from facerestore_cli.evaluate import resize_for_scoring
from facerestore_cli.io.images import read_image
from facerestore_cli.metrics.registry import create_metric
from facerestore_cli.models.inference import restore_crops
from facerestore_cli.models.loading import DEFAULT_MODEL, load_restorer
from facerestore_cli.restore.face_restorer import fast_torch_model

#: decimals per metric in the printed rows (others: 2)
DECIMALS = {"ssim": 3, "identity": 4, "identity_dist": 4}


def shrink(rgb: np.ndarray, size: int) -> np.ndarray:
    """To size x size: area averaging when shrinking, bicubic when growing (as the aligner warps)."""
    return resize_for_scoring(rgb, (size, size))


def timed(fn, *args) -> tuple[list[np.ndarray], float]:
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def scores(outputs: list[np.ndarray], refs: list[np.ndarray], metrics: dict) -> dict[str, float]:
    return {name: float(np.mean(m.score_batch(outputs, refs))) for name, m in metrics.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=Path, action="append", required=True, help="pair folder (lq/, hq/); repeat")
    ap.add_argument("--model", type=Path, default=None, help=f"restorer folder [default: {DEFAULT_MODEL.name}]")
    ap.add_argument("--small", type=int, default=256, help="the small crop size [default: 256]")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--color-fix", default="wavelet", help="colour fix of both ways [default: wavelet]")
    ap.add_argument("--small-color-fix", default=None, help="colour fix of the small crop [default: --color-fix]")
    ap.add_argument("--metrics", default="psnr,ssim,identity_dist,niqe")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = fast_torch_model(load_restorer(args.model, None, torch.device("cpu"), torch.float32))
    metrics = {name: create_metric(name) for name in args.metrics.split(",")}
    label = (args.model or DEFAULT_MODEL).name
    print(f"| date | model | set | way | {' | '.join(metrics)} | s/face |")
    print("| --- " * (5 + len(metrics)) + "|")
    for pairs in args.pairs:
        items = find_pairs(pairs)[: args.limit]
        lq = [shrink(read_image(it.lq).rgb, model.config.face_size) for it in items]
        refs = [shrink(read_image(it.hq).rgb, args.small) for it in items]
        small_lq = [shrink(im, args.small) for im in lq]
        full, t_full = timed(restore_crops, model, lq, args.batch_size, args.color_fix)
        small_fix = args.small_color_fix or args.color_fix
        small, t_small = timed(restore_crops, model, small_lq, args.batch_size, small_fix)
        ways = {
            "input, shrunk": (small_lq, None),
            f"full crop ({lq[0].shape[0]} px), then shrunk": ([shrink(o, args.small) for o in full], t_full),
            f"small crop ({args.small} px, {small_fix})": (small, t_small),
        }
        for way, (outputs, seconds) in ways.items():
            s = scores(outputs, refs, metrics)
            per_face = "" if seconds is None else f"{seconds / len(items):.3f}"
            cells = " | ".join(f"{v:.{DECIMALS.get(k, 2)}f}" for k, v in s.items())
            print(
                f"| {datetime.date.today().isoformat()} | {label}, {args.color_fix} | {pairs.name} ({len(items)}) | {way} | {cells} | {per_face} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
