"""End-to-end and model-only throughput of `facerestore restore`.

    python benchmarks/bench_restore.py --device cpu --threads 2
    python benchmarks/bench_restore.py --device cuda --precision fp16 --model-only --batches 1,16
    python benchmarks/bench_restore.py --device cuda --precision fp16 --frame-path numpy   # vs the default tensor path
    python benchmarks/bench_restore.py --device cpu --threads 2 --face-size 512   # every face on the full crop
    python benchmarks/bench_restore.py --device cuda --precision fp16 --model-only --compile --batches 1,8,32,128
    python benchmarks/bench_restore.py --device cuda --precision fp16 --config sd21 --batches 1,8 --compile   # SD 2.1 size, random weights

End to end: the whole images of ../shared/data/real_lq (read, detect, align, restore, paste,
write) through the same `run_restore` the CLI uses, after one warm-up image. Model only: the
restorer alone (no colour fix) on random faces at the --face-size crop (auto: the model's own,
512 for the bundled one), at each of --batches, after one warm-up call: the median over
--repeats calls, as faces per second. Prints one Markdown row per setting, in the columns of
benchmarks/RESULTS.md (date | machine | settings | what | result).

--config NAME times a named restorer config (facerestore_cli/models/configs.py; `sd21` is the
Stable Diffusion 2.1-size one-step model) with random weights, model only. --compile runs the
restorer as `restore --compile` does (torch.compile of the UNet and VAE halves, channels_last);
each batch size's first call (its compile) is timed apart and shown as "first call", and a
compile that failed and fell back to eager says so in the row. --compile-backend picks another
torch.compile backend (aot_eager, eager: quick checks on a CPU, where inductor takes minutes).
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

from facerestore_cli.devices import resolve_device, resolve_dtype
from facerestore_cli.io.inputs import IMAGE_EXTS
from facerestore_cli.models.inference import CompiledRestorer
from facerestore_cli.models.loading import DEFAULT_MODEL, load_restorer
from facerestore_cli.models.precision import LOW_PRECISION, PrecisionGuard
from facerestore_cli.models.restorer import OneStepRestorer
from facerestore_cli.restore.face_restorer import build_face_restorer, fast_torch_model
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
def model_only(model, batch: int, repeats: int, size: int = 512) -> tuple[float, float | None, float]:
    """Median seconds per face of the restorer alone (a `RestoreModel`: the torch restorer or a
    wrapper of it) at size px, peak GPU memory (GiB; None on CPU), and the seconds of the first
    call (kernels chosen, memory allocated; with --compile, this shape's compile)."""
    x = torch.rand(batch, 3, size, size, device=model.device, dtype=model.dtype) * 2 - 1
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(model.device)
    t = time.perf_counter()
    model(x)  # warm-up
    _sync(model.device)
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        _sync(model.device)
        t = time.perf_counter()
        model(x)
        _sync(model.device)
        times.append((time.perf_counter() - t) / batch)
    peak = torch.cuda.max_memory_allocated() / 2**30 if model.device.type == "cuda" else None
    return statistics.median(times), peak, first


def torch_model(restorer, compile_backend: str | None, warn):
    """The restorer as `restore` runs it (`fast_torch_model`), compiled with `compile_backend`
    (None: eager); returns (model, the CompiledRestorer or None)."""
    if compile_backend in (None, "inductor"):
        model = fast_torch_model(restorer, compile_backend is not None, warn)
    else:  # fast_torch_model with another torch.compile backend
        restorer.to(memory_format=torch.channels_last)
        model = CompiledRestorer(restorer, backend=compile_backend, channels_last=True, warn=warn)
        if restorer.dtype in LOW_PRECISION:
            model = PrecisionGuard(restorer, model, warn)
    compiled = model if isinstance(model, CompiledRestorer) else getattr(model, "model", None)
    return model, compiled if isinstance(compiled, CompiledRestorer) else None


def build_model(args, warn):
    """(model, CompiledRestorer or None, name) for the model-only timings."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    if args.config:
        restorer = OneStepRestorer.from_config(args.config)  # random weights
        restorer = restorer.to(device=device, dtype=dtype).eval().requires_grad_(False)
        name = f"{args.config} config (random weights)"
    else:
        restorer = load_restorer(args.model, None, device, dtype)
        name = (args.model or DEFAULT_MODEL).name
    model, compiled = torch_model(restorer, args.compile_backend if args.compile else None, warn)
    return model, compiled, name


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
        "--config", default=None, help="a named restorer config with random weights instead of --model (e.g. sd21); implies --model-only"
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile the restorer, as restore --compile does")
    ap.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend with --compile; another than inductor implies --model-only [default: inductor, as restore]",
    )
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
    if args.config and args.model:
        ap.error("--config (random weights) and --model exclude each other")
    if args.config or args.compile_backend != "inductor":
        args.model_only = True  # random weights, or a backend restore does not use: the model alone
    torch.set_num_threads(args.threads)
    where = machine()
    print(f"machine: {where}")
    if args.model_only:
        model_only_rows(args, where)
        return
    face_restorer = build_face_restorer(
        ModelChoice(model=args.model, precision=args.precision, compile=args.compile),
        faces=FaceSettings(batch_size=args.batch_size, frame_path=args.frame_path, face_size=args.face_size),
        device=args.device,
    )
    name = (args.model or DEFAULT_MODEL).name
    settings = f"{name}, {args.precision}, {face_restorer.device.type}, {args.threads} threads, frame path {face_restorer.frame_path}, face size {args.face_size} ({'/'.join(map(str, face_restorer.sizes))} px)"
    if args.compile:
        settings += ", compiled"
    print("| date | machine | settings | what | result |\n| --- | --- | --- | --- | --- |")
    e2e = end_to_end(face_restorer, whole_images())
    what = f"end to end, real_lq whole images, batch {face_restorer.batch_size}, colour fix {face_restorer.color_fix}: {e2e['images']} images / {e2e['faces']} faces"
    print(
        row(settings, what, f"{e2e['images'] / e2e['seconds']:.2f} images/s, {e2e['faces'] / e2e['seconds']:.2f} faces/s", where),
        flush=True,
    )
    for b in args.batches:
        per_face, peak, _ = model_only(face_restorer.model, b, args.repeats, face_restorer.face_size)
        mem = "" if peak is None else f", peak {peak:.1f} GiB"
        result = f"{1 / per_face:.2f} faces/s ({per_face * 1000:.1f} ms/face{mem})"
        print(
            row(f"{settings}, median of {args.repeats}", f"model only, {face_restorer.face_size} px, batch {b}", result, where), flush=True
        )


def model_only_rows(args, where: str) -> None:
    """--model-only: the restorer alone (no detector, no colour fix), one row per batch size."""
    warnings_seen: list[str] = []

    def warn(message: str) -> None:
        warnings_seen.append(message)
        print(f"warning: {message}", flush=True)

    model, compiled, name = build_model(args, warn)
    size = model.config.face_size if args.face_size == "auto" else int(args.face_size)
    settings = f"{name}, {args.precision}, {model.device.type}, {args.threads} threads, face size {size} px"
    if args.compile:
        settings += f", torch.compile ({args.compile_backend})"
    print("| date | machine | settings | what | result |\n| --- | --- | --- | --- | --- |")
    for b in args.batches:
        try:
            per_face, peak, first = model_only(model, b, args.repeats, size)
        except torch.OutOfMemoryError:
            print(row(settings, f"model only, {size} px, batch {b}", "out of GPU memory", where), flush=True)
            torch.cuda.empty_cache()
            continue
        mem = "" if peak is None else f", peak {peak:.1f} GiB"
        state = ""
        if args.compile:
            state = "; compiled" if compiled is not None and compiled.compiled else "; COMPILE FELL BACK TO EAGER"
        fallback = "; PRECISION FALLBACK: " + " / ".join(warnings_seen) if any("fp32" in w for w in warnings_seen) else ""
        result = f"{1 / per_face:.2f} faces/s ({per_face * 1000:.2f} ms/face{mem}; first call {first:.1f} s{state}{fallback})"
        print(row(f"{settings}, median of {args.repeats}", f"model only, {size} px, batch {b}", result, where), flush=True)


if __name__ == "__main__":
    main()
