"""LRPO's composite reward: one number per restoration from several judges.

The paper's reward (its reward server, facts in TRAINING.md):

    reward = 0.3 FRM score
           + 0.3 (1 - LPIPS-VGG(restored, ground truth))
           + 0.1 CLIP-IQA(restored)
           + 0.3 exp(-15 L1(DTCWT low-pass of restored, of ground truth))   (J = 3)

`RewardSources` names each component's judge; the paper's are the defaults (rewards.judges).
Anything else is a *fallback* (the restorer's encoder distance for fidelity, a registry metric
for quality, the colour fix's blur bands for structure), and a paper judge whose package or
weights are missing is *missing*. Either one stops the reward from being built
(`InputError`, one line) unless `allow_missing` is set: then fallbacks are used under their own
names and missing components are dropped, the remaining weights renormalised to sum to 1, and
`report()` says all of it. A component with weight 0 is the user's choice, not missing: it is
dropped and nothing is renormalised. Rewards need no gradients: everything runs under no_grad.
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
from facerestore_cli.rewards.judges import DTCWT_LEVELS, DtcwtLowpass, JudgeUnavailable, LpipsVgg, load_clipiqa

#: the structure term's sharpness: exp(-15 L1) of images in [0, 1] (the paper's constant).
STRUCTURE_SCALE = 15.0
#: each component's paper judge.
PAPER_JUDGES = {"fidelity": "lpips-vgg", "quality": "clipiqa", "structure": "dtcwt"}


@dataclass
class RewardWeights:
    """LRPO's component weights (paper defaults; they sum to 1)."""

    frm: float = 0.3
    fidelity: float = 0.3
    quality: float = 0.1
    structure: float = 0.3


@dataclass
class RewardSources:
    """Which judge scores each component and where its weights are. Defaults: the paper's judges.

    fidelity: "lpips-vgg" | fallback "encoder" or a full-reference registry metric (e.g. "lpips")
    quality: "clipiqa" (open_clip with `clipiqa_weights`, else pyiqa's clipiqa if installed with
             its weights) | fallback: a no-reference registry metric (e.g. "pyiqa:musiq")
    structure: "dtcwt" | fallback "blur-bands" (models.color.low_frequency, `wavelet_levels`)
    """

    fidelity: str = "lpips-vgg"
    quality: str = "clipiqa"
    structure: str = "dtcwt"
    lpips_vgg_weights: str = ""
    lpips_linear_weights: str = ""
    clipiqa_weights: str = ""
    clipiqa_arch: str = "RN50-quickgelu"
    dtcwt_levels: int = DTCWT_LEVELS
    wavelet_levels: int = 4
    allow_missing: bool = False


class CompositeReward:
    """Scores restorations against their ground truths; `__call__` gives each component and 'total'.

    Called without `sources` (the `lrpo_reward` metric's historic form) it keeps the old judges:
    encoder fidelity, `quality_metric`, blur-band structure, missing components allowed.
    """

    def __init__(
        self,
        weights: RewardWeights,
        frm: FaceRewardModel | None,
        encoder: torch.nn.Module | None = None,
        quality_metric: str = "pyiqa:musiq",
        fidelity_metric: str = "encoder",
        wavelet_levels: int = 4,
        sources: RewardSources | None = None,
        frm_missing: str = "no FRM given",
    ) -> None:
        if sources is None:
            sources = RewardSources(fidelity_metric, quality_metric, "blur-bands", wavelet_levels=wavelet_levels, allow_missing=True)
        self.weights, self.sources, self.frm, self.encoder = weights, sources, frm, encoder
        #: component -> its judge object; why each other component was dropped.
        self.judges: dict[str, object] = {}
        self.dropped: dict[str, str] = {k: "weight 0" for k, w in asdict(weights).items() if w == 0}
        self.missing: dict[str, str] = {}
        self.fallbacks: dict[str, str] = {}
        if "frm" not in self.dropped and frm is None:
            self.missing["frm"] = frm_missing
        for component in PAPER_JUDGES:
            if component not in self.dropped:
                self._build(component, getattr(sources, component))
        if (self.missing or self.fallbacks) and not sources.allow_missing:
            problems = [f"{k} missing ({why})" for k, why in self.missing.items()]
            problems += [
                f"{k} would use the fallback {name!r} instead of the paper's {PAPER_JUDGES[k]!r}" for k, name in self.fallbacks.items()
            ]
            raise InputError(
                "the paper's reward cannot be built: " + "; ".join(problems) + " (set allow_missing_rewards = true to train without it)"
            )
        self.dropped.update(self.missing)
        self.effective = self._effective_weights()

    def _build(self, component: str, name: str) -> None:
        try:
            if name != PAPER_JUDGES[component]:
                self.fallbacks[component] = name
            self.judges[component] = self._judge(component, name)
        except (JudgeUnavailable, MetricUnavailable) as err:
            self.fallbacks.pop(component, None)
            self.missing[component] = f"{name}: {err}"

    def _judge(self, component: str, name: str) -> object:
        s = self.sources
        if component == "fidelity":
            if name == "lpips-vgg":
                return LpipsVgg(s.lpips_vgg_weights, s.lpips_linear_weights or None)
            if name == "encoder":
                if self.encoder is None:
                    raise JudgeUnavailable("no encoder for the perceptual distance")
                return EncoderPerceptualLoss(self.encoder)
            return self._metric(component, name, full_reference=True)
        if component == "quality":
            if name == "clipiqa":
                if s.clipiqa_weights:
                    return load_clipiqa(s.clipiqa_weights, s.clipiqa_arch)
                try:
                    return self._metric(component, "pyiqa:clipiqa", full_reference=False)
                except MetricUnavailable as err:
                    raise JudgeUnavailable(f"no clipiqa_weights given, and {err}") from None
            return self._metric(component, name, full_reference=False)
        if name == "dtcwt":
            return DtcwtLowpass(s.dtcwt_levels)
        if name == "blur-bands":
            return lambda a, b: (low_frequency(a, s.wavelet_levels) - low_frequency(b, s.wavelet_levels)).abs().flatten(1).mean(1)
        raise InputError(f"unknown structure judge {name!r}: 'dtcwt' (the paper's) or 'blur-bands'")

    @staticmethod
    def _metric(component: str, name: str, full_reference: bool):
        """A registry metric of the right kind (MetricUnavailable when it cannot run here)."""
        info = metric_info(name)
        if info.full_reference != full_reference:
            need = "full-reference (compared with the ground truth)" if full_reference else "no-reference"
            raise InputError(f"{name} cannot be the {component} reward: it needs a {need} metric")
        return create_metric(name)

    def _effective_weights(self) -> dict[str, float]:
        """The weights that count: as configured, or renormalised to sum to 1 when components are missing."""
        active = {k: w for k, w in asdict(self.weights).items() if k not in self.dropped}
        total = sum(active.values())
        if self.missing and total > 0:
            return {k: w / total for k, w in active.items()}
        return active

    @property
    def active(self) -> dict[str, float]:
        """The components that count, with the weights they count with."""
        return self.effective

    def _judge_name(self, k: str) -> str:
        s = self.sources
        names = {
            "frm": "Face Reward Model",
            "fidelity": f"1 - {s.fidelity} distance",
            "quality": "CLIP-IQA" if s.quality == "clipiqa" else s.quality,
            "structure": f"exp(-{STRUCTURE_SCALE:g} L1 of "
            + (f"DTCWT low-pass, J={s.dtcwt_levels})" if s.structure == "dtcwt" else f"blur bands, {s.wavelet_levels} levels)"),
        }
        return names[k] + (f" [fallback for the paper's {PAPER_JUDGES[k]}]" if k in self.fallbacks else "")

    def report(self) -> list[str]:
        """One line per component: its weight and judge, or why it was dropped; then any renormalisation."""
        lines = [
            f"{k}: dropped ({self.dropped[k]})" if k in self.dropped else f"{k}: {self.effective[k]:.4g} x {self._judge_name(k)}"
            for k in asdict(self.weights)
        ]
        if self.missing and self.effective:
            lines.append(f"weights renormalised to sum to 1 without {', '.join(self.missing)} (allow_missing_rewards = true)")
        return lines

    @staticmethod
    def _signed(metric, values: list[float]) -> Tensor:
        """Higher is better for every component; a metric that cannot score these images is an error, not a zero."""
        v = torch.tensor(values, dtype=torch.float32)
        if not torch.isfinite(v).all():
            raise InputError(
                f"{metric.name} cannot score these restorations (it gave nan; NIQE needs faces of at least 96 px): raise face_size or choose another metric"
            )
        return -v if metric.lower_better else v

    def networks(self) -> list[torch.nn.Module]:
        """The judges that are networks (the FRM among them): what `to` moves, and what the
        memory estimate counts."""
        return [judge for judge in [self.frm, *self.judges.values()] if isinstance(judge, torch.nn.Module)]

    def to(self, device: torch.device | str) -> "CompositeReward":
        """Every network judge (and the FRM) on `device`, where the restorations are (found on a GPU:
        the judges were built on the CPU and met CUDA images)."""
        for judge in self.networks():
            judge.to(device)
        return self

    @torch.no_grad()
    def __call__(self, restored01: Tensor, hq01: Tensor, captions: list[str] | None = None) -> dict[str, Tensor]:
        """Images Bx3xHxW in [0, 1] (and each face's caption for a caption-reading FRM); returns
        (B,) tensors on the CPU for each active component and 'total'. The judges run in their own
        precision (fp32), also when the policy samples under bf16 autocast (found on a GPU: the
        encoder judge's fp32 conv met bf16 activations)."""
        with torch.autocast(restored01.device.type, enabled=False):
            return self._score(restored01, hq01, captions)

    def _score(self, restored01: Tensor, hq01: Tensor, captions: list[str] | None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        active, restored01, hq01 = self.effective, restored01.float(), hq01.float()
        if "frm" in active:
            out["frm"] = self.frm(restored01.to(self.frm.device), captions if self.frm.uses_captions else None).float().cpu()
        if "fidelity" in active:
            judge = self.judges["fidelity"]
            if isinstance(judge, EncoderPerceptualLoss):
                out["fidelity"] = 1 - judge.distance(restored01 * 2 - 1, hq01 * 2 - 1).float().cpu()
            elif isinstance(judge, LpipsVgg):
                out["fidelity"] = 1 - judge(restored01, hq01).float().cpu()
            else:
                out["fidelity"] = self._signed(judge, judge.score_batch(to_images(restored01), to_images(hq01)))
        if "quality" in active:
            judge = self.judges["quality"]
            if isinstance(judge, torch.nn.Module):
                out["quality"] = judge(restored01).float().cpu()
            else:
                out["quality"] = self._signed(judge, judge.score_batch(to_images(restored01)))
        if "structure" in active:
            out["structure"] = torch.exp(-STRUCTURE_SCALE * self.judges["structure"](restored01, hq01)).float().cpu()
        out["total"] = sum(active[k] * out[k] for k in active) if active else torch.zeros(restored01.shape[0])
        return out
