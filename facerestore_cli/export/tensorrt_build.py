"""ONNX -> TensorRT: an fp16 engine for one GPU, batch 1..max_batch at one face size.

The engine is built from the fp16 ONNX export as a *strongly typed* network: the precision of
every layer is the graph's own (torch's fp16 restorer, float32 in and out), not TensorRT's
choice. That is the only fp16 route TensorRT 11 keeps (it removed BuilderFlag.FP16) and works
the same on TensorRT 10.

Written against the TensorRT 10/11 Python API. UNTESTED: the project's CI and development
machines have no NVIDIA GPU; only the "tensorrt is missing" path runs in the tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from facerestore_cli.export.meta import BackendUnavailable, EngineError
from facerestore_cli.export.onnx_export import INPUT

INSTALL_HINT = "TensorRT is not installed: `pip install tensorrt` on a machine with an NVIDIA GPU and CUDA (or use --backend onnx)"


def require_tensorrt():
    """The `tensorrt` module, or one clear line saying what to install."""
    try:
        import tensorrt
    except ImportError:  # also raised when sys.modules["tensorrt"] is None (tests)
        raise BackendUnavailable(INSTALL_HINT) from None
    return tensorrt


def gpu_name(device: torch.device) -> str:
    """The CUDA GPU an engine is built for or run on (engines are specific to one GPU model)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise EngineError("TensorRT needs a CUDA GPU: run with --device cuda on a machine that has one")
    return torch.cuda.get_device_name(device)


def _network_flags(trt) -> int:
    """Strongly typed (a flag in TensorRT 10, always on in 11); explicit batch is implied since 10."""
    if int(trt.__version__.split(".")[0]) < 10:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is too old: pip install 'tensorrt>=10'")
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_tensorrt(onnx_path: Path, out: Path, face_size: int, max_batch: int) -> Path:
    """Parse the (fp16) ONNX graph and serialise an engine for this GPU to `out` (atomically).

    Inputs and outputs stay float32, as in the graph. The optimisation profile spans batch
    1..max_batch, tuned for max_batch.
    """
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a file, so external weights (<file>.data) resolve
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT, _shape(1, face_size), _shape(max_batch, face_size), _shape(max_batch, face_size))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(out.name + ".partial")
    staged.write_bytes(memoryview(serialized))
    os.replace(staged, out)
    return out


def _shape(batch: int, face_size: int) -> tuple[int, int, int, int]:
    return (batch, 3, face_size, face_size)
