"""End-to-end and model-only throughput of `facerestore restore`.

    python benchmarks/bench_restore.py --device cpu --threads 2
    python benchmarks/bench_restore.py --device cuda --precision fp16 --model-only --batches 1,16
    python benchmarks/bench_restore.py --device cuda --precision fp16 --frame-path numpy   # vs the default tensor path
    python benchmarks/bench_restore.py --device cpu --threads 2 --face-size 512   # every face on the full crop

End to end: the whole images of ../shared/data/real_lq (read, detect, align, restore, paste,
write) through the same `run_restore` the CLI uses, after one warm-up image. Model only: the
restorer alone (no colour fix) on random faces at the --face-size crop (auto: the model's own,
512 for the bundled one), at each of --batches, after one warm-up call: the median over
--repeats calls, as faces per second. Prints one Markdown row per setting, in the columns of
benchmarks/RESULTS.md (date | machine | settings | what | result).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from facerestore_cli.io.inputs import IMAGE_EXTS
from facerestore_cli.models.loading import DEFAULT_MODEL
from facerestore_cli.restore.face_restorer import build_face_restorer
from facerestore_cli.restore.loop import run_restore
from facerestore_cli.restore.options import FaceSettings, ModelChoice, RestoreOptions, parse_batch_size, parse_face_size

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_lq"
WHOLE_DIRS = ["CodeFormer/inputs/whole_imgs", "GFPGAN/inputs/whole_imgs", "DiffBIR/inputs/demo/bfr/whole_img"]


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


def whole_images() -> list[str]:
    files = []
    for d in WHOLE_DIRS:
        files += sorted(str(p) for p in (SHARED / d).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    return files


def end_to_end(face_restorer, files: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        run_restore(files[:1], face_restorer, RestoreOptions(Path(out) / "warm"))
        summary = run_restore(files, face_restorer, RestoreOptions(Path(out) / "run"))
    return {"images": summary.images, "faces": summary.faces_restored, "seconds": summary.seconds}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def model_only(face_restorer, batch: int, repeats: int, size: int = 512) -> tuple[float, float | None]:
    """Median seconds per face of the restorer alone at size px, and peak GPU memory (GiB; None on CPU)."""
    x = torch.rand(batch, 3, size, size, device=face_restorer.device, dtype=face_restorer.dtype) * 2 - 1
    if face_restorer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    face_restorer.model(x)  # warm-up: kernels chosen, memory allocated
    times = []
    for _ in range(repeats):
        _sync(face_restorer.device)
        t = time.perf_counter()
        face_restorer.model(x)
        _sync(face_restorer.device)
        times.append((time.perf_counter() - t) / batch)
    peak = torch.cuda.max_memory_allocated() / 2**30 if face_restorer.device.type == "cuda" else None
    return statistics.median(times), peak


def _batches(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of batch sizes, e.g. 1,16")
    return sizes


def row(settings: str, what: str, result: str, where: str) -> str:
    """One row in the columns of benchmarks/RESULTS.md."""
    return f"| {datetime.date.today().isoformat()} | {where} | {settings} | {what} | {result} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help=f"restorer folder [default: {DEFAULT_MODEL.name}]")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batches", "--batch-sizes", type=_batches, default=[1, 16], help="model-only batch sizes [default: 1,16]")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per model-only setting (median)")
    ap.add_argument("--model-only", action="store_true", help="skip the end-to-end run")
    ap.add_argument(
        "--batch-size",
        type=parse_batch_size,
        default="auto",
        help="end to end: restore --batch-size, faces per model call and photos restored together [default: auto]",
    )
    ap.add_argument(
        "--frame-path", choices=["auto", "tensor", "numpy"], default="auto", help="end to end: restore --frame-path [default: auto]"
    )
    ap.add_argument(
        "--face-size",
        default="auto",
        type=parse_face_size,
        help="restore --face-size (auto or pixels); model only: that crop, auto the model's own [default: auto]",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    face_restorer = build_face_restorer(
        ModelChoice(model=args.model, precision=args.precision),
        faces=FaceSettings(batch_size=args.batch_size, frame_path=args.frame_path, face_size=args.face_size),
        device=args.device,
    )
    where = machine()
    name = (args.model or DEFAULT_MODEL).name
    settings = f"{name}, {args.precision}, {face_restorer.device.type}, {args.threads} threads, frame path {face_restorer.frame_path}, face size {args.face_size} ({'/'.join(map(str, face_restorer.sizes))} px)"
    print(f"machine: {where}")
    print("| date | machine | settings | what | result |\n| --- | --- | --- | --- | --- |")
    if not args.model_only:
        e2e = end_to_end(face_restorer, whole_images())
        what = f"end to end, real_lq whole images, batch {face_restorer.batch_size}, colour fix {face_restorer.color_fix}: {e2e['images']} images / {e2e['faces']} faces"
        print(
            row(settings, what, f"{e2e['images'] / e2e['seconds']:.2f} images/s, {e2e['faces'] / e2e['seconds']:.2f} faces/s", where),
            flush=True,
        )
    for b in args.batches:
        per_face, peak = model_only(face_restorer, b, args.repeats, face_restorer.face_size)
        mem = "" if peak is None else f", peak {peak:.1f} GiB"
        result = f"{1 / per_face:.2f} faces/s ({per_face * 1000:.1f} ms/face{mem})"
        print(
            row(f"{settings}, median of {args.repeats}", f"model only, {face_restorer.face_size} px, batch {b}", result, where), flush=True
        )


if __name__ == "__main__":
    main()
