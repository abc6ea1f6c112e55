"""Pieces every training loop of the restorer shares (`train`, `refl`): data, precision, saving.

A run with LoRA adapters checkpoints only the adapters (the frozen base is the config's
model), and every run exports its final model merged, in fp16, as `restore --model` loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from ..models.restorer import OneStepRestorer

#: The adapters' file inside a checkpoint's model folder and a LoRA run's folder.
LORA_FILE = "lora.safetensors"


def infinite(loader: DataLoader) -> Iterator:
    """Batches forever: loops count steps, not epochs."""
    while True:
        yield from loader


def autocast(device: torch.device, precision: str):
    """bf16 autocast (weights and optimizer state stay fp32); no GradScaler needed, unlike fp16."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def save_model(model: OneStepRestorer, folder: Path) -> None:
    """The model's checkpoint form: its LoRA adapters alone when it has any, else the full folder."""
    if model.lora_adapters:
        folder.mkdir(parents=True, exist_ok=True)
        model.save_lora(folder / LORA_FILE)
    else:
        model.save_pretrained(folder)


def export_final(model: OneStepRestorer, folder: Path) -> None:
    """The shipped form: LoRA merged into the base, fp16 weights."""
    if model.lora_adapters:
        model.merge_lora()
    model.eval().save_pretrained(folder, dtype=torch.float16)
