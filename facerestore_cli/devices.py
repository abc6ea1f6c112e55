"""--device and --precision as torch objects, with one clear error for what this machine cannot do.

Kept apart from `pipeline` so commands that never restore (train-frm, score) do not import the
face and media stack just to pick a device.
"""

from __future__ import annotations

import torch

from facerestore_cli.errors import InputError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without it is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA GPU is visible to torch")
    return torch.device(device)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp16" and device.type == "cpu":
        raise InputError("--precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    return DTYPES[precision]
