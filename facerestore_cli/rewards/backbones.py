"""Image and text towers the Face Reward Model can stand on.

Every backbone turns a batch of normalised images into embeddings and a list of captions into
embeddings of the same width; the FRM scores an image by the cosine of the two (the HPSv2 form).

- `CompactBackbone`: a small CNN trained here from scratch (no pretrained CLIP exists offline).
  It pools the mean and standard deviation of every stage, so the head sees the texture energy
  at each scale directly: blur, noise and compression change exactly those statistics. Its text
  side is either one learned "query" vector (no captions) or that query plus a hashed
  bag-of-words embedding of the caption.
- `OpenClipBackbone`: an open_clip `CLIP` model (the layout of HPSv2 and of DiffusionReward's
  `FaceRewardModel.pth`, i.e. `create_model('ViT-H-14')`), built from a config dict and loaded
  from a local checkpoint; needs `pip install -e ".[clip]"`.
"""

from __future__ import annotations

import importlib.util
import math
import re
import zlib
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from facerestore_cli.errors import FacerestoreError

CLIP_EXTRA = 'pip install -e ".[clip]"'


class BackboneError(FacerestoreError, ValueError):
    """A backbone cannot be built or a checkpoint does not fit it; the message is one line."""


# ------------------------------------------------------------------ compact CNN
def _conv(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class _Stage(nn.Module):
    """Downsample by 2, then one residual 3x3 conv."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.down = _conv(c_in, c_out, 2)
        self.conv = _conv(c_out, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(x)
        return x + self.conv(x)


def _mean_std(x: Tensor) -> Tensor:
    flat = x.flatten(2)
    return torch.cat([flat.mean(-1), flat.std(-1)], dim=1)


class CompactImageEncoder(nn.Module):
    """Space-to-depth stem, then stride-2 stages; mean+std of every stage feed the head.

    The stem folds 2x2 pixel blocks into channels (PixelUnshuffle) instead of a strided conv, so
    the finest detail, where blur, noise and JPEG show first, reaches the first conv intact at a
    quarter of the cost of a full-resolution stem.
    """

    def __init__(self, channels: Sequence[int], embed_dim: int) -> None:
        super().__init__()
        if len(channels) < 2:
            raise BackboneError("compact backbone: `channels` needs at least two entries")
        self.stem = nn.Sequential(nn.PixelUnshuffle(2), *_conv(12, channels[0], 1))
        self.stages = nn.ModuleList(_Stage(a, b) for a, b in zip(channels[:-1], channels[1:]))
        self.head = nn.Sequential(nn.Linear(2 * sum(channels), embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        pooled = [_mean_std(x)]
        for stage in self.stages:
            x = stage(x)
            pooled.append(_mean_std(x))
        return self.head(torch.cat(pooled, dim=1))


_WORD = re.compile(r"[a-z0-9]+")


def hash_tokens(caption: str, buckets: int) -> list[int]:
    """Lower-case words and word bigrams hashed into `buckets` ids (crc32: stable across runs)."""
    words = _WORD.findall(caption.lower())
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    return [zlib.crc32(g.encode()) % buckets for g in grams]


class HashTextEncoder(nn.Module):
    """Caption -> mean of hashed word embeddings, projected: conditioning without a tokenizer file."""

    def __init__(self, buckets: int, embed_dim: int) -> None:
        super().__init__()
        self.buckets = buckets
        self.bag = nn.EmbeddingBag(buckets, embed_dim, mode="mean")
        self.proj = nn.Linear(embed_dim, embed_dim)
        nn.init.normal_(self.bag.weight, std=0.02)

    def forward(self, captions: Sequence[str], device: torch.device) -> Tensor:
        ids, offsets = [], []
        for c in captions:
            offsets.append(len(ids))
            ids += hash_tokens(c, self.buckets)
        if not ids:
            return torch.zeros(len(captions), self.proj.out_features, device=device)
        bag = self.bag(torch.tensor(ids, device=device), torch.tensor(offsets, device=device))
        return self.proj(bag)


class CompactBackbone(nn.Module):
    """The default FRM backbone: `CompactImageEncoder` + a learned query (+ hashed captions)."""

    def __init__(self, channels: Sequence[int], embed_dim: int, text: str, hash_buckets: int, init_logit_scale: float) -> None:
        super().__init__()
        if text not in ("none", "hash"):
            raise BackboneError(f"compact backbone: text must be 'none' or 'hash', not {text!r}")
        self.visual = CompactImageEncoder(channels, embed_dim)
        self.query = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim))
        self.text = HashTextEncoder(hash_buckets, embed_dim) if text == "hash" else None
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def encode_image(self, x: Tensor) -> Tensor:
        return self.visual(x)

    def encode_text(self, captions: Sequence[str] | None, n: int, device: torch.device) -> Tensor:
        query = self.query.to(device).expand(n, -1)
        if self.text is None or captions is None:
            return query
        return query + self.text(captions, device)

    def image_groups(self) -> list[nn.Module]:
        """The image tower's groups, input to output: the stem, each stage, the head."""
        return [self.visual.stem, *self.visual.stages, self.visual.head]

    def lock(self, unlocked_image_groups: int | None, unlocked_text_layers: int | None) -> None:
        """Freeze all but the last `unlocked_image_groups` image groups (`image_groups`), the
        compact analogue of the paper's last-N ViT groups; the text side (the query and the hashed
        captions) is one layer, trainable when `unlocked_text_layers` >= 1. `logit_scale` stays
        trainable, as open_clip's tower locks leave it. None leaves a tower as it is."""
        if unlocked_image_groups is not None:
            groups = self.image_groups()
            for i, group in enumerate(groups):
                group.requires_grad_(i >= len(groups) - unlocked_image_groups)
        if unlocked_text_layers is not None:
            self.query.requires_grad_(unlocked_text_layers >= 1)
            if self.text is not None:
                self.text.requires_grad_(unlocked_text_layers >= 1)


# ------------------------------------------------------------------ open_clip (HPSv2 layout)
def open_clip_unavailable_reason() -> str | None:
    """None when open_clip can be imported, else what to install (checked without importing it)."""
    if importlib.util.find_spec("open_clip") is None:
        return f"the open_clip backbone needs the open_clip_torch package ({CLIP_EXTRA})"
    return None


def resolve_clip_config(spec: str | dict[str, Any]) -> dict[str, Any]:
    """An open_clip architecture as a plain dict: a model name (e.g. 'ViT-H-14') or the dict itself."""
    if isinstance(spec, dict):
        missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(spec)
        if missing:
            raise BackboneError(f"open_clip config lacks {', '.join(sorted(missing))}")
        return dict(spec)
    reason = open_clip_unavailable_reason()
    if reason:
        raise BackboneError(reason)
    import open_clip

    cfg = open_clip.get_model_config(spec)
    if cfg is None:
        raise BackboneError(f"unknown open_clip model {spec!r} (e.g. ViT-H-14, the HPSv2 / FaceRewardModel architecture)")
    return dict(cfg)


class OpenClipBackbone(nn.Module):
    """An open_clip CLIP model with its tokenizer; state-dict keys are open_clip's own (no prefix)."""

    def __init__(self, clip_config: dict[str, Any]) -> None:
        super().__init__()
        reason = open_clip_unavailable_reason()
        if reason:
            raise BackboneError(reason)
        from open_clip.model import CLIP
        from open_clip.tokenizer import SimpleTokenizer

        cfg = dict(clip_config)
        if cfg.get("text_cfg", {}).get("hf_tokenizer_name") or cfg.get("custom_text"):
            raise BackboneError("only open_clip models with the built-in CLIP tokenizer and text tower are supported")
        self.clip = CLIP(
            embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False)
        )
        self.context_length = int(cfg["text_cfg"].get("context_length", 77))
        self.tokenizer = SimpleTokenizer(context_length=self.context_length)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def encode_image(self, x: Tensor) -> Tensor:
        return self.clip.encode_image(x)

    def encode_text(self, captions: Sequence[str] | None, n: int, device: torch.device) -> Tensor:
        tokens = self.tokenizer(list(captions) if captions is not None else [""] * n).to(device)
        return self.clip.encode_text(tokens)

    def lock(self, unlocked_image_groups: int | None, unlocked_text_layers: int | None) -> None:
        """Freeze all but the last groups/layers of each tower (the paper keeps 20 and 11 trainable).

        open_clip >= 3 freezes a frozen text layer's LayerNorms with it (HPSv2's older fork could
        leave them trainable); the image tower is locked as in LiT.
        """
        if unlocked_image_groups is not None:
            self.clip.lock_image_tower(unlocked_groups=unlocked_image_groups, freeze_bn_stats=False)
        if unlocked_text_layers is not None:
            self.clip.lock_text_tower(unlocked_layers=unlocked_text_layers)


def read_upstream_state_dict(path: Path) -> dict[str, Tensor]:
    """The open_clip state dict inside an HPSv2 / DiffusionReward checkpoint.

    `HPS_v2_compressed.pt` and `FaceRewardModel.pth` are dicts with a `state_dict` entry holding
    open_clip key names (`visual.*`, `transformer.*`, `token_embedding.weight`, `logit_scale`...);
    a bare state dict and DDP's `module.` prefix are accepted too.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: checkpoint not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad files
        raise BackboneError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BackboneError(f"{path}: holds no state dict of tensors")
    return {(k[len("module.") :] if k.startswith("module.") else k): v.float() for k, v in state.items()}


def load_clip_state(backbone: OpenClipBackbone, state: dict[str, Tensor], source: str) -> None:
    """Load open_clip weights strictly; a mismatch names a few missing/unexpected keys and shapes."""
    own = backbone.clip.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and k != "attn_mask"]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} of another shape (e.g. {'; '.join(wrong[:2])})")
    if problems:
        raise BackboneError(f"{source}: does not fit the open_clip config: " + ", ".join(problems))
    backbone.clip.load_state_dict({k: state[k] for k in own}, strict=True)
