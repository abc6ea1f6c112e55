"""ReFL on a DiffBIR-kind model: what differs from the one-step restorer's ReFL (train/refl.py).

DiffusionReward tunes DiffBIR v1 face's IRControlNet and keeps SwinIR, the SD 2.1 UNet, the VAE
and the text tower frozen (../shared/upstream/TRAINING.md). One step of it here:

    LQ --SwinIR--> cond --VAE enc (mode)--> c_img            (no grad: frozen stage 1 and encoder)
    x_T --DDIM, eta ~ U(0,1), no grad--> z_m --ControlNet + UNet (grad)--> x0_m
    x0_m --frozen decoder (grad passes)--> restored --DiffBIR's wavelet colour fix vs cond--> loss

The loss is ReFL's (reward, DTCWT, LPIPS: train/refl.py's objective) with the regulariser over
the 13 control residuals against a frozen copy of the starting ControlNet (`control_residuals`,
train/refl_losses.py). The trainable part is the whole ControlNet (`lora_rank = 0`, the paper) or
LoRA on it (`lora_rank` > 0, to fit one GPU); on CUDA with `precision = "bf16"` the frozen parts
are held in bf16 and the step runs under bf16 autocast, `gradient_checkpointing` covers the UNet
and the ControlNet, and `optimizer = "adamw8bit"` takes bitsandbytes' 8-bit AdamW.

`trained_step` is used by `ControlNetReflMethod` (train/refl.py, which picks it when `--model` is
a DiffBIR-kind model). What refl and lrpo share for ControlNets (the tuning's build, optimiser,
checkpoint state and the finished run's RUN/controlnet.pth + RUN/model.toml) is train/controlnet.py.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from facerestore_cli.models.color import color_fix_unclamped
from facerestore_cli.models.diffbir import COLOR_FIX
from facerestore_cli.train.controlnet import TunableControlNet, refl_prediction
from facerestore_cli.train.refl_losses import ReflStep


def trained_step(
    tuning: TunableControlNet, lq: Tensor, steps: int, last_steps: int, gen: torch.Generator | None = None
) -> tuple[ReflStep, Tensor]:
    """ReFL's step on a DiffBIR model: LQ in [-1, 1] -> (the trained step with its residuals and
    the frozen copy's, the decoded restoration colour-fixed as at inference, unclamped)."""
    model = tuning.model
    seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
    with torch.no_grad():
        cond = model.stage1_image(lq)
        c_img = model.encode_condition(cond)
    pred = refl_prediction(tuning, c_img, steps, min(last_steps, steps), random.Random(seed), seed)
    decoded = model.vae.decode((pred.x0 / model.scaling_factor).to(model.dtype)).sample
    restored = color_fix_unclamped(decoded, cond, COLOR_FIX)
    step = ReflStep(lq, None, pred.timestep, pred.step, pred.x0, pred.residuals, pred.fixed_residuals)
    return step, restored
