"""Running the restorer on uint8 face crops: conversion, one step, colour fix.

`restore` and `eval` both go through `restore_crops`, so what is measured is what users get.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .color import DEFAULT_COLOR_FIX, color_fix


def to_tensor(crops: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 HxWx3 crops (same size) -> Bx3xHxW in [-1, 1]."""
    x = torch.from_numpy(np.stack(crops)).to(device).permute(0, 3, 1, 2)
    return (x.to(dtype) / 127.5 - 1).contiguous()


def to_uint8(x: torch.Tensor) -> list[np.ndarray]:
    """Bx3xHxW in [-1, 1] -> uint8 HxWx3 arrays."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(x.permute(0, 2, 3, 1).cpu().numpy())


@torch.inference_mode()
def restore_batch(model: torch.nn.Module, x: torch.Tensor, method: str = DEFAULT_COLOR_FIX) -> torch.Tensor:
    """One step, then the colour fix against the model's own input."""
    return color_fix(model(x), x, method)


def restore_crops(model, crops: Sequence[np.ndarray], batch_size: int = 4, method: str = DEFAULT_COLOR_FIX) -> list[np.ndarray]:
    """Restore aligned uint8 crops, batch_size at a time, on the model's device and dtype."""
    out: list[np.ndarray] = []
    for i in range(0, len(crops), batch_size):
        x = to_tensor(crops[i : i + batch_size], model.device, model.dtype)
        out += to_uint8(restore_batch(model, x, method))
    return out
