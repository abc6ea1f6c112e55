"""--device and --precision as torch objects, with one clear error for what this machine cannot do.

Kept apart from `pipeline` so commands that never restore (train-frm, score) do not import the
face and media stack just to pick a device. torch itself is imported only when a function
needs it: `check_device` answers whether this machine can run a --device/--precision before
anything loads, and asks torch only when the answer depends on it (a CUDA device, or fp16 with
auto), so `--device auto` or `cpu` costs nothing until a model is loaded. Even then a machine
without the NVIDIA driver is told without importing torch (`cuda_available`).
"""

from __future__ import annotations

import ctypes
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from facerestore_cli.errors import InputError

if TYPE_CHECKING:
    import torch

NO_CUDA = "--device cuda was asked for, but no CUDA GPU is visible to torch"
FP16_ON_CPU = "--precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU"


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU: torch's own answer, except where there can be none
    (`no_cuda_driver`), which is told without importing torch."""
    if no_cuda_driver():
        return False
    import torch

    return torch.cuda.is_available()


def no_cuda_driver() -> bool:
    """True where torch can see no CUDA GPU, found without importing it: on Linux, a torch built
    for NVIDIA GPUs reaches them only through the driver's libcuda.so.1, and there is none to
    load, on the library path or beside torch's own libraries. False where unsure: another
    system, a ROCm build of torch (its torch.cuda is HIP), or a driver there to load."""
    spec = find_spec("torch")
    if not sys.platform.startswith("linux") or spec is None or not spec.submodule_search_locations:
        return False
    torch_dir = Path(next(iter(spec.submodule_search_locations)))
    beside = [torch_dir / "lib", *(torch_dir.parent / "nvidia").glob("*/lib")]
    if any(any(d.glob(pattern)) for d in beside for pattern in ("libcuda.so*", "libtorch_hip*", "libamdhip64*")):
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return True
    return False


def check_device(device: str, precision: str = "fp32") -> None:
    """The errors `resolve_device` and `resolve_dtype` would give, before anything is loaded;
    torch is imported only to answer for a CUDA device, or fp16 with auto."""
    if device.startswith("cuda"):
        if not cuda_available():
            raise InputError(NO_CUDA)
    elif precision == "fp16" and (device == "cpu" or (device == "auto" and not cuda_available())):
        raise InputError(FP16_ON_CPU)


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without it is a clear error."""
    import torch

    check_device(device)
    if device == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    return torch.device(device)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    import torch

    if precision == "fp16" and device.type == "cpu":
        raise InputError(FP16_ON_CPU)
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
