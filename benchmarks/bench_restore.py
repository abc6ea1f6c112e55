"""End-to-end and model-only throughput of `facerestore restore`.

    python benchmarks/bench_restore.py --device cpu --threads 2

End to end: the whole images of ../shared/data/real_lq (read, detect, align, restore, paste,
write) through the same `run_restore` the CLI uses, after one warm-up image. Model only: the
restorer on random 512x512 faces at the given batch sizes. Prints a Markdown table row block to
paste into benchmarks/RESULTS.md, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from facerestore_cli.media import IMAGE_EXTS
from facerestore_cli.pipeline import RestoreOptions, build_engine, run_restore

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_lq"
WHOLE_DIRS = ["CodeFormer/inputs/whole_imgs", "GFPGAN/inputs/whole_imgs", "DiffBIR/inputs/demo/bfr/whole_img"]


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"


def whole_images() -> list[str]:
    files = []
    for d in WHOLE_DIRS:
        files += sorted(str(p) for p in (SHARED / d).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    return files


def end_to_end(engine, files: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        run_restore(files[:1], engine, RestoreOptions(Path(out) / "warm"))
        summary = run_restore(files, engine, RestoreOptions(Path(out) / "run"))
    return {"images": summary.images, "faces": summary.faces_restored, "seconds": summary.seconds}


@torch.inference_mode()
def model_only(engine, batch: int, repeats: int) -> float:
    """Median seconds per face for the restorer alone at 512 px."""
    x = torch.rand(batch, 3, 512, 512, device=engine.device, dtype=engine.dtype) * 2 - 1
    engine.model(x)
    times = []
    for _ in range(repeats):
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        engine.model(x)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / batch)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = build_engine(device=args.device, precision=args.precision, batch_size=4)
    print(f"machine: {machine()}; device {engine.device}, {args.precision}")
    e2e = end_to_end(engine, whole_images())
    print(f"| end to end, real_lq whole images | {e2e['images']} images, {e2e['faces']} faces | "
          f"{e2e['images'] / e2e['seconds']:.2f} images/s | {e2e['faces'] / e2e['seconds']:.2f} faces/s |")
    for b in (int(s) for s in args.batch_sizes.split(",")):
        per_face = model_only(engine, b, args.repeats)
        print(f"| model only, 512 px, batch {b} | | {per_face * 1000:.0f} ms/face | {1 / per_face:.2f} faces/s |")


if __name__ == "__main__":
    main()
