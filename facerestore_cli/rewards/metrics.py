"""The reward models as metrics of the registry, added when `facerestore_cli.rewards` is imported.

- `frm` (no-reference, higher is better): the bundled Face Reward Model's score.
- `lrpo_reward` (full-reference, higher is better): LRPO's composite reward, the same judge
  `facerestore lrpo` trains against (rewards.composite, the paper's weights), so `eval` can
  report the reward beside metrics the reward does not contain. Fidelity is measured on the
  bundled restorer's frozen encoder features, the FRM is the bundled one, and the quality
  component is dropped (pyiqa's MUSIQ weights are not available offline; NIQE stays a separate,
  held-out metric).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from facerestore_cli.metrics.base import Metric
from facerestore_cli.metrics.registry import register_metric
from facerestore_cli.paths import DEFAULT_FRM, DEFAULT_RESTORER
from facerestore_cli.rewards.frm import CONFIG_NAME, WEIGHTS_NAME, FaceRewardModel

FRM_WEIGHTS = DEFAULT_FRM
RESTORER_WEIGHTS = DEFAULT_RESTORER


@register_metric
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


@register_metric
class LrpoReward(Metric):
    """The composite reward of a restoration against its ground truth."""

    name = "lrpo_reward"
    full_reference = True
    lower_better = False
    description = (
        "LRPO's composite reward with offline judges: 0.3 FRM + 0.3 (1 - encoder distance) + 0.3 exp(-15 L1 of low-frequency"
        " blur bands) (quality dropped; `lrpo` itself uses LPIPS-VGG, CLIP-IQA and the DTCWT when their weights are given)"
    )

    @classmethod
    def unavailable_reason(cls) -> str | None:
        for folder in (RESTORER_WEIGHTS, FRM_WEIGHTS):
            if not folder.is_dir():
                return f"weights missing: {folder}"
        return None

    def __init__(self) -> None:
        # imported here: rewards.composite itself uses this registry for its quality component
        from facerestore_cli.models.restorer import OneStepRestorer
        from facerestore_cli.rewards.composite import CompositeReward, RewardWeights
        from facerestore_cli.rewards.frm import FaceRewardModel

        encoder = OneStepRestorer.from_pretrained(RESTORER_WEIGHTS).float().vae.encoder
        self.reward = CompositeReward(RewardWeights(quality=0.0), FaceRewardModel.from_pretrained(FRM_WEIGHTS), encoder)

    def score(self, image: np.ndarray, reference: np.ndarray | None = None) -> float:
        return self.score_batch([image], [reference])[0]

    def score_batch(self, images: Sequence[np.ndarray], references: Sequence[np.ndarray] | None = None) -> list[float]:
        from facerestore_cli.rewards.frm import uint8_to_tensor

        if references is None or len(references) != len(images):
            raise ValueError(f"{self.name} is full-reference: give one reference per image")
        out: list[float] = []
        for i in range(0, len(images), 8):
            restored, truth = uint8_to_tensor(images[i : i + 8]), uint8_to_tensor(references[i : i + 8])
            out += self.reward(restored, truth)["total"].tolist()
        return out
