"""LRPO's composite reward as a full-reference metric (`lrpo_reward`, higher is better).

The same judge `facerestore lrpo` trains against (rewards.composite, the paper's weights), so
`eval` can report the reward beside metrics the reward does not contain. Fidelity is measured on
the bundled restorer's frozen encoder features, the FRM is the bundled one, and the quality
component is dropped (pyiqa's MUSIQ weights are not available offline; NIQE stays a separate,
held-out metric).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import WEIGHTS_DIR
from .base import Metric

RESTORER_WEIGHTS = WEIGHTS_DIR / "restorer-tiny"
FRM_WEIGHTS = WEIGHTS_DIR / "frm-tiny"


class LrpoReward(Metric):
    """The composite reward of a restoration against its ground truth."""

    name = "lrpo_reward"
    full_reference = True
    lower_better = False
    description = "LRPO's composite reward: 0.3 FRM + 0.3 fidelity + 0.3 exp(-15 L1 of low-frequency bands) (quality dropped)"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        for folder in (RESTORER_WEIGHTS, FRM_WEIGHTS):
            if not folder.is_dir():
                return f"weights missing: {folder}"
        return None

    def __init__(self) -> None:
        # imported here: rewards.composite itself uses this registry for its quality component
        from ..models.restorer import OneStepRestorer
        from ..rewards.composite import CompositeReward, RewardWeights
        from ..rewards.frm import FaceRewardModel

        encoder = OneStepRestorer.from_pretrained(RESTORER_WEIGHTS).float().vae.encoder
        self.reward = CompositeReward(RewardWeights(quality=0.0), FaceRewardModel.from_pretrained(FRM_WEIGHTS), encoder)

    def score(self, image: np.ndarray, reference: np.ndarray | None = None) -> float:
        return self.score_batch([image], [reference])[0]

    def score_batch(self, images: Sequence[np.ndarray], references: Sequence[np.ndarray] | None = None) -> list[float]:
        from ..rewards.frm import uint8_to_tensor

        if references is None or len(references) != len(images):
            raise ValueError(f"{self.name} is full-reference: give one reference per image")
        out: list[float] = []
        for i in range(0, len(images), 8):
            restored, truth = uint8_to_tensor(images[i : i + 8]), uint8_to_tensor(references[i : i + 8])
            out += self.reward(restored, truth)["total"].tolist()
        return out
