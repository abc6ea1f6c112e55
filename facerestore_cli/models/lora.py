"""LoRA adapters of the restorer: which modules take them (OSEDiff's choice, by pattern), the file
format `refl`/`lrpo` write (safetensors with metadata naming the base), and its mismatch error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from facerestore_cli.errors import FacerestoreError

LORA_FORMAT = "facerestore-lora/1"


LORA_META_KEY = "facerestore_lora"


# Substrings OSEDiff greps for when choosing LoRA targets (train_osediff / osediff.py).
_UNET_LORA_PATTERNS = (
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "conv",
    "conv1",
    "conv2",
    "conv_in",
    "conv_shortcut",
    "conv_out",
    "proj_out",
    "proj_in",
    "ff.net.2",
    "ff.net.0.proj",
)


_VAE_LORA_PATTERNS = (
    "conv1",
    "conv2",
    "conv_in",
    "conv_shortcut",
    "conv",
    "conv_out",
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
)


class LoraMismatchError(FacerestoreError, ValueError):
    """A LoRA file does not fit the model it is loaded into."""


def _lora_candidate_modules(model: nn.Module) -> Iterable[str]:
    """Names of the plain Linear/Conv2d layers of `model`, seen through any peft wrapping."""
    for name, module in model.named_modules():
        if ".lora_" in name or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if name.endswith(".base_layer"):
            name = name[: -len(".base_layer")]
        if "norm" in name:  # OSEDiff skips every *norm* parameter
            continue
        yield name


def unet_lora_target_groups(unet: nn.Module) -> dict[str, list[str]]:
    """OSEDiff's UNet LoRA targets, split like its three adapters: encoder / decoder / others.

    A layer is a target when its name contains one of OSEDiff's patterns (every conv, attention
    projection, proj_in/out and feed-forward layer); down blocks + conv_in form "encoder",
    up blocks + conv_out "decoder", the rest (mid block) "others".
    """
    groups: dict[str, list[str]] = {"encoder": [], "decoder": [], "others": []}
    for name in _lora_candidate_modules(unet):
        if not any(p in name for p in _UNET_LORA_PATTERNS):
            continue
        if "down_blocks" in name or "conv_in" in name:
            groups["encoder"].append(name)
        elif "up_blocks" in name or "conv_out" in name:
            groups["decoder"].append(name)
        else:
            groups["others"].append(name)
    return groups


def vae_encoder_lora_targets(vae: nn.Module) -> list[str]:
    """OSEDiff's VAE LoRA targets: every conv/attention layer of the encoder plus quant_conv."""
    targets = []
    for name in _lora_candidate_modules(vae):
        in_encoder = name.startswith("encoder.") and any(p in name for p in _VAE_LORA_PATTERNS)
        if in_encoder or name == "quant_conv":
            targets.append(name)
    return targets


def read_lora_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON header of a `save_lora` file (clear error for anything else)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(LORA_META_KEY)
    except Exception as exc:  # safetensors raises its own error types for non-safetensors input
        raise LoraMismatchError(f"{path} is not a safetensors file: {exc}") from None
    if raw is None:
        raise LoraMismatchError(f"{path} is not a facerestore LoRA file (no '{LORA_META_KEY}' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != LORA_FORMAT:
        raise LoraMismatchError(f"{path}: unsupported LoRA format {meta.get('format')!r}")
    return meta
