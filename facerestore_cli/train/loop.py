"""Pieces every training loop of the restorer shares (`train`, `refl`, `lrpo`): data, precision, saving.

A run with LoRA adapters checkpoints only the adapters (the frozen base is the config's
model), and every run exports its final model merged, in fp16, as `restore --model` loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from .. import WEIGHTS_DIR
from ..configfile import RunConfig
from ..models.restorer import OneStepRestorer
from ..rewards.autopairs import degrade_at
from ..rewards.frm import resize_for_model
from .data import AlignedFaces
from .degrade import DegradationConfig, sample_params

#: The adapters' file inside a checkpoint's model folder and a LoRA run's folder.
LORA_FILE = "lora.safetensors"


def infinite(loader: DataLoader) -> Iterator:
    """Batches forever: loops count steps, not epochs."""
    while True:
        yield from loader


@dataclass
class LoraTuningConfig(RunConfig):
    """What the reward fine-tuning runs (`refl`, `lrpo`) share: a frozen restorer, the FRM, LoRA
    adapters, whole aligned faces degraded on the fly, and the run's bookkeeping."""

    data: list[str] = field(default_factory=list)
    #: the restorer folder to tune (its weights stay frozen; LoRA adapters learn).
    model: str = field(default_factory=lambda: str(WEIGHTS_DIR / "restorer-tiny"))
    #: the FRM folder (or an upstream HPSv2 / FaceRewardModel.pth checkpoint).
    frm: str = field(default_factory=lambda: str(WEIGHTS_DIR / "frm-tiny"))
    lora_rank: int = 4
    #: LoRA alpha (scale = alpha / rank); None keeps the model config's.
    lora_alpha: float | None = None
    steps: int = 500
    batch_size: int = 4
    #: whole aligned faces are resized to this (a multiple of the model's size multiple, 32 for tiny).
    face_size: int = 256
    lr: float = 1e-4
    warmup_steps: int = 10
    grad_clip: float = 1.0
    #: wavelet levels of the low-frequency (structure) comparisons (4 at 256 px = the colour fix's 5 at 512 px).
    wavelet_levels: int = 4
    min_sharpness: float = 0.0
    seed: int = 0
    num_workers: int = 1
    log_every: int = 10
    checkpoint_every: int = 100
    degradation: DegradationConfig = field(default_factory=DegradationConfig)

    def validate(self) -> None:
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1 (only LoRA adapters are tuned), not {self.lora_rank}")
        if self.face_size < 32 or self.batch_size < 1 or self.steps < 1:
            raise ValueError("face_size must be >= 32, batch_size and steps >= 1")


def accelerator(device: str):
    """accelerate places the model and shards the data across processes (`accelerate launch`).

    Mixed precision is a plain bf16 autocast (`loop.autocast`), not accelerate's: its process-wide
    state cannot change precision between runs in one process (tests, notebooks).
    """
    from accelerate import Accelerator

    return Accelerator(cpu=torch.device(device).type == "cpu")


def whole_face_loader(folders: list[str], batch_size: int, min_sharpness: float, num_workers: int) -> DataLoader:
    """Shuffled batches of whole aligned faces, as the reward fine-tuning loops (refl, lrpo) use them."""
    data = AlignedFaces([Path(d) for d in folders], patch_size=None, min_sharpness=min_sharpness)
    return DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=len(data) >= batch_size, num_workers=num_workers, persistent_workers=num_workers > 0)


def degraded_pair(hq: torch.Tensor, face_size: int, degradation: DegradationConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(HQ, LQ) at face_size in [0, 1]: the restorer's training degradation (DegradationConfig),
    its 512-px parameters scaled to face_size."""
    hq = resize_for_model(hq, face_size)
    return hq, degrade_at(hq, sample_params(degradation, hq.shape[0], gen), degradation.blur_kernel_size, gen)


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
