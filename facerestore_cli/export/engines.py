"""Making engines (`facerestore export`) and finding or making them for `restore` (the cache).

An engine is made in two stages: torch -> ONNX (any machine), then ONNX -> TensorRT (on the
GPU it will run on). Both write the sidecar last, after removing any old one, so a sidecar
always describes the engine next to it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from facerestore_cli import __version__
from facerestore_cli.export.cache import engine_cache_path
from facerestore_cli.export.meta import (
    EngineError,
    EngineMeta,
    check_meta,
    read_meta,
    sidecar_path,
    write_meta,
)
from facerestore_cli.export.onnx_export import DEFAULT_OPSET, export_onnx, require_onnx
from facerestore_cli.export.source import ModelSource
from facerestore_cli.export.tensorrt_build import (
    build_tensorrt,
    gpu_name,
    require_tensorrt,
)
from facerestore_cli.models.restorer import OneStepRestorer, architecture_fingerprint

#: TensorRT engines made on demand by `restore` cover at least this many faces per call.
MIN_CACHED_MAX_BATCH = 4


def make_onnx(
    source: ModelSource,
    out: Path,
    face_size: int | None = None,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    device: torch.device = torch.device("cpu"),
) -> EngineMeta:
    """Export the source model (LoRA merged) to `out` and write its sidecar."""
    onnx = require_onnx()
    restorer = source.load(device, torch.float16 if fp16 else torch.float32)
    face = face_size or restorer.config.face_size
    sidecar_path(out).unlink(missing_ok=True)
    export_onnx(restorer, out, face, opset)
    meta = _onnx_meta(restorer, source, face, fp16, opset, {"onnx": onnx.__version__})
    write_meta(out, meta)
    return meta


def _onnx_meta(restorer: OneStepRestorer, source: ModelSource, face: int, fp16: bool, opset: int, versions: dict[str, str]) -> EngineMeta:
    config = restorer.config.to_dict() | {"face_size": face, "working_sizes": []}  # shapes are fixed at export
    return EngineMeta(
        kind="onnx",
        model_fingerprint=source.fingerprint(),
        architecture=architecture_fingerprint(restorer),
        config_name=restorer.config.name,
        face_size=face,
        sampling_steps=restorer.config.sampling_steps,
        fp16=fp16,
        config=config,
        source=source.describe(),
        opset=opset,
        versions={"facerestore": __version__, "torch": torch.__version__, **versions},
    )


def make_tensorrt(source: ModelSource, out: Path, face_size: int | None, max_batch: int, device: torch.device) -> EngineMeta:
    """Build an fp16 TensorRT engine for this GPU from the (cached) fp16 ONNX export."""
    trt = require_tensorrt()  # before any work: the one clear line when it is missing
    gpu = gpu_name(device)
    onnx_path = cached_onnx(source, face_size, fp16=True, device=device)
    onnx_meta = read_meta(onnx_path)
    sidecar_path(out).unlink(missing_ok=True)
    build_tensorrt(onnx_path, out, onnx_meta.face_size, max_batch)
    meta = dataclasses.replace(
        onnx_meta,
        kind="tensorrt",
        fp16=True,
        max_batch=max_batch,
        gpu=gpu,
        versions={**onnx_meta.versions, "tensorrt": trt.__version__},
    )
    write_meta(out, meta)
    return meta


def cached_onnx(source: ModelSource, face_size: int | None, fp16: bool, device: torch.device) -> Path:
    """The cached ONNX export of `source`, made on first use."""
    face = face_size or source.face_size()
    path = engine_cache_path(source.fingerprint(), face, source.sampling_steps(), _precision(fp16), ".onnx")
    if not _reusable(path, "onnx", source):
        make_onnx(source, path, face, fp16, device=device)
    return path


def cached_tensorrt(source: ModelSource, face_size: int | None, batch_size: int, device: torch.device) -> Path:
    """The cached TensorRT engine of `source` for this GPU and TensorRT version, built on first use."""
    trt = require_tensorrt()
    face = face_size or source.face_size()
    max_batch = max(batch_size, MIN_CACHED_MAX_BATCH)
    parts = (gpu_name(device), f"trt{trt.__version__}", f"b{max_batch}")
    path = engine_cache_path(source.fingerprint(), face, source.sampling_steps(), "fp16", ".engine", *parts)
    if not _reusable(path, "tensorrt", source):
        make_tensorrt(source, path, face, max_batch, device)
    return path


def _reusable(path: Path, kind: str, source: ModelSource) -> bool:
    try:
        check_meta(path, read_meta(path), kind, source.fingerprint())
    except EngineError:
        return False
    return True


def _precision(fp16: bool) -> str:
    return "fp16" if fp16 else "fp32"
