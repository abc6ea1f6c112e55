"""The bundled FRM as a no-reference metric of the registry (`frm`, higher is better)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import WEIGHTS_DIR
from ..rewards.frm import CONFIG_NAME, WEIGHTS_NAME, FaceRewardModel
from .base import Metric

FRM_WEIGHTS = WEIGHTS_DIR / "frm-tiny"


class FRMScore(Metric):
    """How real and faithful an aligned face looks to the bundled Face Reward Model."""

    name = "frm"
    full_reference = False
    lower_better = False
    description = "Face Reward Model score of the bundled weights/frm-tiny (cosine, -1..1; only differences matter)"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not (FRM_WEIGHTS / WEIGHTS_NAME).is_file() or not (FRM_WEIGHTS / CONFIG_NAME).is_file():
            return f"FRM weights missing: {FRM_WEIGHTS} (train them with `facerestore train-frm`)"
        return None

    def __init__(self) -> None:
        self.model = FaceRewardModel.from_pretrained(FRM_WEIGHTS)

    def score(self, image: np.ndarray, reference: np.ndarray | None = None) -> float:
        return self.model.score_images([image])[0]

    def score_batch(self, images: Sequence[np.ndarray], references: Sequence[np.ndarray] | None = None) -> list[float]:
        return self.model.score_images(list(images))
