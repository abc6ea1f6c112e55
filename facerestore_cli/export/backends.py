"""Exported engines as drop-in replacements of the torch restorer's `model(x)`.

`restore_crops` needs only `model(x)`, `.device` and `.dtype` (and `FaceRestorer` the
`.config.face_size`), so each backend offers exactly that: float32 Bx3xSxS in [-1, 1] in, the
same out, as a torch tensor on `.device`. The colour fix and everything after it stay torch code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from facerestore_cli.errors import InputError
from facerestore_cli.export.engines import cached_onnx, cached_tensorrt
from facerestore_cli.export.meta import (
    BackendUnavailable,
    EngineError,
    EngineMeta,
    check_meta,
    read_meta,
)
from facerestore_cli.export.onnx_export import INPUT, OUTPUT
from facerestore_cli.export.source import ModelSource
from facerestore_cli.export.tensorrt_build import gpu_name, require_tensorrt
from facerestore_cli.models.configs import RestorerConfig

BACKENDS = ("torch", "onnx", "tensorrt")


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable(
            "--backend onnx needs onnxruntime: pip install onnx onnxruntime (the `onnx` extra; onnxruntime-gpu for CUDA)"
        ) from None
    return onnxruntime


class OnnxBackend:
    """An ONNX export run by onnxruntime: CUDA when asked for and available, else the CPU."""

    dtype, takes_any_size = torch.float32, False

    def __init__(self, path: Path, meta: EngineMeta, device: torch.device) -> None:
        ort = require_onnxruntime()
        self.path, self.config = path, RestorerConfig.from_dict(meta.config)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the CPU budget torch would get
        try:
            self.session = ort.InferenceSession(str(path), options, providers=_providers(ort, device))
        except Exception as err:  # onnxruntime raises its own (pybind) error types
            raise EngineError(f"{path}: onnxruntime cannot load it: {str(err).splitlines()[0]}") from None
        self.provider = self.session.get_providers()[0]
        on_gpu = self.provider == "CUDAExecutionProvider"
        self.device = torch.device("cuda", _cuda_index(device)) if on_gpu else torch.device("cpu")

    def __call__(self, x: Tensor) -> Tensor:
        if self.device.type == "cuda":
            return self._run_on_gpu(x)
        feed = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: feed})[0])

    def _run_on_gpu(self, x: Tensor) -> Tensor:
        """Input and output stay in torch's CUDA memory (IO binding): no host round trip. UNTESTED (no GPU here)."""
        x = x.detach().to(self.device, torch.float32).contiguous()
        out = torch.empty_like(x)
        binding = self.session.io_binding()
        index = _cuda_index(self.device)
        binding.bind_input(INPUT, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(OUTPUT, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # onnxruntime runs on its own stream
        self.session.run_with_iobinding(binding)
        return out

    def describe(self) -> str:
        return f"onnxruntime {self.provider}, engine {self.path}"


def _providers(ort, device: torch.device) -> list:
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": _cuda_index(device)}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _cuda_index(device: torch.device) -> int:
    """`cuda` without an index means torch's current GPU."""
    return device.index if device.index is not None else torch.cuda.current_device()


class TensorRTBackend:
    """A serialised TensorRT engine run on torch's CUDA stream. UNTESTED: written for TensorRT 10,
    never run (no NVIDIA GPU on the machines this was developed and tested on)."""

    dtype, takes_any_size = torch.float32, False

    def __init__(self, path: Path, meta: EngineMeta, device: torch.device) -> None:
        trt = require_tensorrt()
        self.path, self.config, self.max_batch = path, RestorerConfig.from_dict(meta.config), int(meta.max_batch or 1)
        self.device = torch.device("cuda", _cuda_index(device))
        torch.cuda.set_device(self.device)
        torch.empty(1, device=self.device)  # TensorRT uses the CUDA context torch created
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise EngineError(f"{path}: TensorRT cannot load it (built by another TensorRT version or for another GPU?)")
        self._context = self._engine.create_execution_context()

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[0] > self.max_batch:
            raise ValueError(f"{self.path} takes at most {self.max_batch} faces per call, got {x.shape[0]}")
        x = x.detach().to(self.device, torch.float32).contiguous()
        out = torch.empty_like(x)
        self._context.set_input_shape(INPUT, tuple(x.shape))
        self._context.set_tensor_address(INPUT, x.data_ptr())
        self._context.set_tensor_address(OUTPUT, out.data_ptr())
        # torch's current stream: ordered after the ops that made x and before the colour fix
        if not self._context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.path}")
        return out

    def describe(self) -> str:
        return f"TensorRT on {torch.cuda.get_device_name(self.device)}, engine {self.path}"


def load_backend(
    kind: str, source: ModelSource, device: torch.device, precision: str = "fp32", engine: Path | None = None, batch_size: int = 4
) -> OnnxBackend | TensorRTBackend:
    """The engine for `restore --backend onnx|tensorrt`: the given --engine, checked against the
    model asked for, or the cached one (made on first use)."""
    if kind == "onnx":
        require_onnxruntime()
        if precision == "bf16":
            raise EngineError("--backend onnx runs fp32 or fp16, not bf16")
        path = engine or cached_onnx(source, None, fp16=precision == "fp16", device=device)
        return OnnxBackend(path, _checked(path, kind, source), device)
    if kind == "tensorrt":
        trt = require_tensorrt()
        gpu = gpu_name(device)
        path = engine or cached_tensorrt(source, None, batch_size, device)
        meta = _checked(path, kind, source)
        _check_tensorrt_meta(path, meta, gpu, trt.__version__, batch_size)
        return TensorRTBackend(path, meta, device)
    raise InputError(f"unknown backend {kind!r}; known: {', '.join(BACKENDS)}")


def _checked(path: Path, kind: str, source: ModelSource) -> EngineMeta:
    meta = read_meta(path)
    check_meta(path, meta, kind, source.fingerprint())
    return meta


def _check_tensorrt_meta(path: Path, meta: EngineMeta, gpu: str, version: str, batch_size: int) -> None:
    """A TensorRT engine only runs on the GPU model and TensorRT version it was built with."""
    if meta.gpu != gpu or meta.versions.get("tensorrt") != version:
        raise EngineError(
            f"{path} was built for {meta.gpu} with TensorRT {meta.versions.get('tensorrt')}, this is {gpu} with TensorRT {version}: export it again here"
        )
    if (meta.max_batch or 1) < batch_size:
        raise EngineError(
            f"{path} takes at most {meta.max_batch} faces per call: use --batch-size {meta.max_batch} or export with --max-batch {batch_size}"
        )
