"""uint8 RGB images <-> float tensors in [0, 1]: the one conversion the data, metric and reward
code share (the restorer's own [-1, 1] input is `models.inference.to_tensor`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def to_tensor01(images: Sequence[np.ndarray], device: torch.device | str = "cpu") -> Tensor:
    """uint8 RGB HxWx3 images of one size -> float32 Bx3xHxW in [0, 1] on `device`."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2)
    return x.to(device=device, dtype=torch.float32) / 255.0


def to_images(x01: Tensor) -> list[np.ndarray]:
    """Bx3xHxW in [0, 1] (any float dtype, any device) -> uint8 RGB HxWx3 arrays, rounded."""
    return list((x01.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
