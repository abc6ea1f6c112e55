"""Model-only throughput of `restore`'s backends on the same model: torch vs onnxruntime (vs TensorRT).

    OMP_NUM_THREADS=2 python benchmarks/bench_backends.py --threads 2
    python benchmarks/bench_backends.py --device cuda --backends torch,onnx,tensorrt --batches 1,16

The restorer alone (encoder, UNet step(s), decoder; no colour fix, no detection) on random faces
at --size px, for each backend and batch size, after one warm-up call: the median over --repeats
calls as faces per second, plus the largest difference from torch's output (a sanity check that
the engine computes the same thing). ONNX/TensorRT engines come from the same cache `restore`
uses (made on first use, not timed). Prints Markdown rows in the columns of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from bench_restore import _batches, machine, row

from facerestore_cli.devices import resolve_device
from facerestore_cli.export.backends import OnnxBackend, TensorRTBackend
from facerestore_cli.export.engines import cached_onnx, cached_tensorrt
from facerestore_cli.export.meta import read_meta
from facerestore_cli.export.source import ModelSource
from facerestore_cli.models.loading import DEFAULT_MODEL, load_restorer


def load(backend: str, source: ModelSource, device: torch.device, size: int, max_batch: int):
    """The model as `restore --backend` runs it, at `size` px."""
    if backend == "torch":
        return load_restorer(source.model, None, device, torch.float32)
    if backend == "onnx":
        path = cached_onnx(source, size, fp16=False, device=device)
        return OnnxBackend(path, read_meta(path), device)
    path = cached_tensorrt(source, size, max_batch, device)
    return TensorRTBackend(path, read_meta(path), device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def seconds_per_face(model, x: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds per face over `repeats` calls (after one warm-up), and the output."""
    x = x.to(model.device, model.dtype)
    out = model(x)
    times = []
    for _ in range(repeats):
        _sync(x.device)
        t = time.perf_counter()
        out = model(x)
        _sync(x.device)
        times.append((time.perf_counter() - t) / x.shape[0])
    return statistics.median(times), out.float().cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"restorer folder [default: {DEFAULT_MODEL.name}]")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and onnxruntime CPU threads")
    ap.add_argument("--backends", default="torch,onnx", help="comma-separated: torch, onnx, tensorrt [default: torch,onnx]")
    ap.add_argument("--batches", type=_batches, default=[1, 4], help="batch sizes [default: 1,4]")
    ap.add_argument("--size", type=int, default=512, help="face size in pixels [default: 512]")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per setting (median)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # OnnxBackend reads this count too
    device = resolve_device(args.device)
    source = ModelSource(args.model)
    where = machine()
    print(f"machine: {where}")
    print("| date | machine | settings | what | result |\n| --- | --- | --- | --- | --- |")
    reference: dict[int, torch.Tensor] = {}
    for name in args.backends.split(","):
        model = load(name.strip(), source, device, args.size, max(args.batches))
        settings = (
            f"{args.model.name}, {name} fp32 ({getattr(model, 'provider', device.type)}), {args.threads} threads, median of {args.repeats}"
        )
        for b in args.batches:
            x = torch.rand(b, 3, args.size, args.size, generator=torch.Generator().manual_seed(b)) * 2 - 1
            per_face, out = seconds_per_face(model, x, args.repeats)
            ref = reference.setdefault(b, out)
            diff = (out - ref).abs().max().item()
            result = f"{1 / per_face:.2f} faces/s ({per_face * 1000:.0f} ms/face), max |diff| vs first backend {diff:.1e}"
            print(row(settings, f"model only, {args.size} px, batch {b}", result, where), flush=True)


if __name__ == "__main__":
    main()
