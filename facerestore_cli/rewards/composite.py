"""LRPO's composite reward: one number per restoration from several judges.

    reward = w_frm       FRM score                                   (the Face Reward Model)
           + w_fidelity  perceptual fidelity to the ground truth     (1 - perceptual distance)
           + w_quality   no-reference quality                        (a registry metric, sign-flipped if lower is better)
           + w_structure exp(-15 L1(low-frequency wavelet bands of restored, ground truth))

The paper's weights are 0.3 / 0.3 / 0.1 / 0.3. A component that cannot run here (its metric's
package or weights are missing) is dropped and said so in `report()`; it is never replaced by a
made-up score. Fidelity uses LPIPS when its weights are present (`fidelity_metric = "lpips"`);
the default `"encoder"` is the perceptual distance the restorer trains with
(train.losses.EncoderPerceptualLoss on the frozen face-trained encoder), since no LPIPS backbone
can be had offline. Rewards need no gradients: everything here runs under no_grad.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from facerestore_cli.errors import InputError
from facerestore_cli.io.tensors import to_images
from facerestore_cli.metrics import MetricUnavailable, create_metric, metric_info
from facerestore_cli.models.color import low_frequency
from facerestore_cli.models.perceptual import EncoderPerceptualLoss
from facerestore_cli.rewards.frm import FaceRewardModel

#: the structure term's sharpness: exp(-15 L1) of images in [0, 1] (the paper's constant).
STRUCTURE_SCALE = 15.0


@dataclass
class RewardWeights:
    """LRPO's component weights (paper defaults)."""

    frm: float = 0.3
    fidelity: float = 0.3
    quality: float = 0.1
    structure: float = 0.3


class CompositeReward:
    """Scores restorations against their ground truths; `__call__` gives each component and 'total'."""

    def __init__(
        self,
        weights: RewardWeights,
        frm: FaceRewardModel | None,
        encoder: torch.nn.Module | None = None,
        quality_metric: str = "pyiqa:musiq",
        fidelity_metric: str = "encoder",
        wavelet_levels: int = 4,
    ) -> None:
        self.weights, self.wavelet_levels = weights, wavelet_levels
        #: component -> why it was dropped (missing weights, or weight 0).
        self.dropped: dict[str, str] = {k: "weight 0" for k, w in asdict(weights).items() if w == 0}
        self.frm = frm
        if frm is None and "frm" not in self.dropped:
            self.dropped["frm"] = "no FRM given"
        self.perceptual = self.fidelity_metric = self.quality_metric = None
        self.fidelity_name, self.quality_name = fidelity_metric, quality_metric
        if "fidelity" not in self.dropped:
            if fidelity_metric == "encoder":
                if encoder is None:
                    self.dropped["fidelity"] = "no encoder for the perceptual distance"
                else:
                    self.perceptual = EncoderPerceptualLoss(encoder)
            else:
                self.fidelity_metric = self._metric("fidelity", fidelity_metric, full_reference=True)
        if "quality" not in self.dropped:
            self.quality_metric = self._metric("quality", quality_metric, full_reference=False)

    def _metric(self, component: str, name: str, full_reference: bool):
        """A registry metric of the right kind, or None with the reason recorded in `dropped`."""
        try:
            info = metric_info(name)
            if info.full_reference != full_reference:
                need = "full-reference (compared with the ground truth)" if full_reference else "no-reference"
                raise InputError(f"{name} cannot be the {component} reward: it needs a {need} metric")
            return create_metric(name)
        except MetricUnavailable as err:
            self.dropped[component] = str(err)
            return None

    @property
    def active(self) -> dict[str, float]:
        """The components that count, with their weights."""
        return {k: w for k, w in asdict(self.weights).items() if k not in self.dropped}

    def report(self) -> list[str]:
        """One line per component: its weight and judge, or why it was dropped."""
        judges = {
            "frm": "Face Reward Model",
            "fidelity": f"1 - {self.fidelity_name} distance",
            "quality": self.quality_name,
            "structure": f"exp(-{STRUCTURE_SCALE:g} L1 of low-frequency bands)",
        }
        return [
            f"{k}: dropped ({self.dropped[k]})" if k in self.dropped else f"{k}: {w:g} x {judges[k]}"
            for k, w in asdict(self.weights).items()
        ]

    @staticmethod
    def _signed(metric, values: list[float]) -> Tensor:
        """Higher is better for every component; a metric that cannot score these images is an error, not a zero."""
        v = torch.tensor(values, dtype=torch.float32)
        if not torch.isfinite(v).all():
            raise InputError(
                f"{metric.name} cannot score these restorations (it gave nan; NIQE needs faces of at least 96 px): raise face_size or choose another metric"
            )
        return -v if metric.lower_better else v

    @torch.no_grad()
    def __call__(self, restored01: Tensor, hq01: Tensor) -> dict[str, Tensor]:
        """Images Bx3xHxW in [0, 1]; returns (B,) tensors on the CPU for each active component and 'total'."""
        out: dict[str, Tensor] = {}
        active = self.active
        if "frm" in active:
            out["frm"] = self.frm(restored01.to(self.frm.device)).float().cpu()
        if "fidelity" in active:
            if self.perceptual is not None:
                out["fidelity"] = 1 - self.perceptual.distance(restored01 * 2 - 1, hq01 * 2 - 1).float().cpu()
            else:
                out["fidelity"] = self._signed(
                    self.fidelity_metric, self.fidelity_metric.score_batch(to_images(restored01), to_images(hq01))
                )
        if "quality" in active:
            out["quality"] = self._signed(self.quality_metric, self.quality_metric.score_batch(to_images(restored01)))
        if "structure" in active:
            l1 = (
                (low_frequency(restored01.float(), self.wavelet_levels) - low_frequency(hq01.float(), self.wavelet_levels))
                .abs()
                .flatten(1)
                .mean(1)
            )
            out["structure"] = torch.exp(-STRUCTURE_SCALE * l1).cpu()
        out["total"] = sum(active[k] * out[k] for k in active) if active else torch.zeros(restored01.shape[0])
        return out
