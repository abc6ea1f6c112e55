"""Small synthetic inputs shared by the tests (no data files needed)."""

from __future__ import annotations

import cv2
import numpy as np

#: A Face Reward Model small enough to train in a second.
TINY_FRM = {"image_size": 32, "channels": [8, 16], "embed_dim": 16}


def face_like(size: int, seed: int) -> np.ndarray:
    """A smooth random uint8 RGB image: multi-scale noise with the soft structure of a photo."""
    rng = np.random.default_rng(seed)
    img = sum(cv2.resize(rng.uniform(0, 255, (size // s, size // s, 3)), (size, size), interpolation=cv2.INTER_CUBIC) for s in (2, 4, 8))
    return np.clip(img / 3, 0, 255).astype(np.uint8)
