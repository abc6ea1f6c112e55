"""The Face Reward Model (FRM): a learned judge of how real and faithful an aligned face looks.

    score(face, caption) = cos(image_embedding(face), text_embedding(caption))      in [-1, 1]

the form of HPSv2, which DiffusionReward's FRM fine-tunes. A pair is compared Bradley-Terry style:
P(a preferred over b) = sigmoid(exp(logit_scale) * (score_a - score_b)). Faces are given as
float tensors in [0, 1] (Bx3xHxW, any size: they are resized to the model's input size inside
`forward`, differentiably, so a restorer can later be trained through the score) or as uint8
RGB arrays (`score_images`).

Saved the diffusers way: `config.json` (this file's `FrmConfig`) + `model.safetensors`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from facerestore_cli.io.tensors import to_tensor01
from facerestore_cli.models.model_file import resolve_model_value
from facerestore_cli.models.published import not_installed_hint
from facerestore_cli.rewards.backbones import (
    BackboneError,
    CompactBackbone,
    OpenClipBackbone,
    load_clip_state,
    read_upstream_state_dict,
    resolve_clip_config,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "facerestore-frm"
#: CLIP's image normalisation (HPSv2 and the paper's FRM use it; the compact model keeps it too).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKBONES = ("compact", "open_clip")


@dataclass
class FrmConfig:
    """Everything needed to rebuild an FRM; `config.json` holds exactly this."""

    backbone: str = "compact"
    image_size: int = 160
    channels: list[int] = field(default_factory=lambda: [24, 32, 48, 64, 96])
    embed_dim: int = 96
    #: compact backbone only: "none" (no captions) or "hash" (hashed bag-of-words captions).
    text: str = "none"
    hash_buckets: int = 2048
    #: open_clip backbone only: the CLIP architecture (embed_dim, vision_cfg, text_cfg[, quick_gelu]).
    clip: dict[str, Any] | None = None
    #: the caption used when none is given (an open_clip text tower always needs one).
    default_caption: str = ""
    init_logit_scale: float = math.log(10.0)
    mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    std: list[float] = field(default_factory=lambda: list(CLIP_STD))

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise BackboneError(f"backbone must be one of {', '.join(BACKBONES)}, not {self.backbone!r}")
        if self.backbone == "open_clip":
            if self.clip is None:
                raise BackboneError("the open_clip backbone needs `clip`: a model name such as 'ViT-H-14' or its config dict")
            self.clip = resolve_clip_config(self.clip)
            self.image_size = int(self.clip["vision_cfg"].get("image_size", 224))
        if self.image_size < 8 or (self.backbone == "compact" and self.image_size % 2):
            raise BackboneError(f"image_size must be an even number of at least 8, not {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "FrmConfig":
        """Unknown keys are an error, so a typo in a config file is not silently ignored."""
        raw = {k: v for k, v in raw.items() if k != "model_type"}
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise BackboneError(f"unknown FRM config keys: {', '.join(sorted(unknown))}")
        return cls(**raw)


def resize_for_model(images: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize to size x size: the one resize used in training and scoring."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def uint8_to_tensor(images: Sequence[np.ndarray], size: int | None = None) -> Tensor:
    """uint8 RGB HxWx3 arrays (any sizes) -> Bx3xSxS float in [0, 1], resized one by one."""
    out = []
    for im in images:
        if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"expected a uint8 RGB HxWx3 image, got {getattr(im, 'dtype', type(im).__name__)} {getattr(im, 'shape', '')}")
        t = to_tensor01([im])
        out.append(resize_for_model(t, size) if size else t)
    return torch.cat(out)


class FaceRewardModel(nn.Module):
    """Scores aligned faces (optionally given captions); higher means more real and faithful."""

    def __init__(self, config: FrmConfig) -> None:
        super().__init__()
        self.config = config
        if config.backbone == "compact":
            self.backbone: nn.Module = CompactBackbone(
                config.channels, config.embed_dim, config.text, config.hash_buckets, config.init_logit_scale
            )
        else:
            self.backbone = OpenClipBackbone(config.clip)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ scoring
    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def uses_captions(self) -> bool:
        return self.config.backbone == "open_clip" or self.config.text == "hash"

    def _captions(self, captions: Sequence[str | None] | None, n: int) -> list[str] | None:
        if not self.uses_captions:
            return None
        if captions is None:
            return [self.config.default_caption] * n
        if len(captions) != n:
            raise ValueError(f"{len(captions)} captions for {n} images")
        return [c if c else self.config.default_caption for c in captions]

    def forward(self, images: Tensor, captions: Sequence[str | None] | None = None) -> Tensor:
        """Scores (B,) of images Bx3xHxW in [0, 1]."""
        x = (resize_for_model(images.to(self.mean.dtype), self.config.image_size) - self.mean) / self.std
        img = F.normalize(self.backbone.encode_image(x), dim=-1)
        txt = F.normalize(self.backbone.encode_text(self._captions(captions, x.shape[0]), x.shape[0], x.device), dim=-1)
        return (img * txt).sum(-1)

    def preference_logits(self, score_a: Tensor, score_b: Tensor) -> Tensor:
        """Bradley-Terry logit of 'a preferred over b' (the temperature is learned, as in CLIP)."""
        return self.backbone.logit_scale.exp().clamp(max=100.0) * (score_a - score_b)

    @torch.no_grad()
    def score_images(self, images: Sequence[np.ndarray], captions: Sequence[str | None] | None = None, batch_size: int = 16) -> list[float]:
        """Scores of uint8 RGB faces, batch_size at a time, in eval mode."""
        was_training = self.training
        self.eval()
        scores: list[float] = []
        for i in range(0, len(images), batch_size):
            x = uint8_to_tensor(images[i : i + batch_size], self.config.image_size).to(self.device)
            caps = None if captions is None else captions[i : i + batch_size]
            scores += self(x, caps).float().cpu().tolist()
        self.train(was_training)
        return scores

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write config.json + model.safetensors (optionally cast, e.g. fp16 to halve the file)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {
            k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in self.state_dict().items()
        }
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt", "model_type": MODEL_TYPE})
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "FaceRewardModel":
        """Load a folder written by `save_pretrained`; a clear error if it is not one or does not fit."""
        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise BackboneError(f"{path}: not an FRM folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            raw = json.loads((path / CONFIG_NAME).read_text())
        except ValueError as err:
            raise BackboneError(f"{path / CONFIG_NAME}: not JSON ({err})") from None
        if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise BackboneError(f"{path}: model_type {raw.get('model_type')!r} is not an FRM")
        model = cls(FrmConfig.from_dict(raw))
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path / WEIGHTS_NAME)).items()}
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err).splitlines()[0])
            raise BackboneError(f"{path / WEIGHTS_NAME}: does not fit {CONFIG_NAME}: {first[:200]}") from None
        if result.missing_keys or result.unexpected_keys:
            raise BackboneError(
                f"{path / WEIGHTS_NAME}: does not fit {CONFIG_NAME}: missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
            )
        return model.to(device).eval()

    @classmethod
    def from_upstream(cls, checkpoint: str | Path, clip: str | dict[str, Any] = "ViT-H-14", default_caption: str = "") -> "FaceRewardModel":
        """An FRM from an HPSv2 (`HPS_v2_compressed.pt`) or DiffusionReward (`FaceRewardModel.pth`) file."""
        model = cls(FrmConfig(backbone="open_clip", clip=clip, default_caption=default_caption))
        load_clip_state(model.backbone, read_upstream_state_dict(Path(checkpoint)), str(checkpoint))
        return model.eval()


UPSTREAM_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def load_frm(spec: str | Path, device: str | torch.device = "cpu", clip: str | dict[str, Any] = "ViT-H-14") -> FaceRewardModel:
    """An FRM folder (`save_pretrained`), an upstream checkpoint file (open_clip layout, `clip`
    arch), or a `frm` model file / store name (`facerestore models import face-reward-model ...`)."""
    path = Path(spec)
    published = resolve_model_value(spec)
    if published is not None:
        if published.kind != "frm" or published.frm is None:
            raise BackboneError(f"{spec} is not a Face Reward Model (it is a {published.kind} model file)")
        path = published.frm
    if path.is_file() and path.suffix.lower() in UPSTREAM_SUFFIXES:
        return FaceRewardModel.from_upstream(path, clip).to(device)
    if path.is_dir():
        return FaceRewardModel.from_pretrained(path, device)
    hint = not_installed_hint(str(spec))
    raise BackboneError(hint or f"{path}: not an FRM folder or an upstream checkpoint ({', '.join(UPSTREAM_SUFFIXES)})")
