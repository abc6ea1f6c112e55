"""Tuning a DiffBIR-kind model's ControlNet, as both papers tune their published models.

DiffusionReward and LRPO train the IRControlNet of DiffBIR v1 face and keep SwinIR, the SD 2.1
UNet, the VAE and the text tower frozen (../shared/upstream/TRAINING.md). `TunableControlNet`
prepares a loaded `DiffBIRRestorer` for that: the whole ControlNet trainable (the papers) or LoRA
adapters on it (`lora_rank`, to fit one GPU), its conditioning-hint network kept at zero (the
upstream layout has none), a frozen copy of the starting ControlNet for ReFL's regulariser, the
frozen parts optionally in half precision and the UNet and ControlNet optionally under gradient
checkpointing. `refl_prediction` is ReFL's trajectory on it: DDIM with a random eta per step
and no gradient until a random late step m, whose x0 prediction carries the gradient.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from facerestore_cli.errors import InputError
from facerestore_cli.models.controlnet import HINT_PREFIX, save_controlnet
from facerestore_cli.models.diffbir import DiffBIRRestorer, SamplerSettings, make_scheduler

#: ControlNet modules that take LoRA adapters: attention projections, feed-forward, resnet convs.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
#: Bytes per parameter of AdamW's state (two fp32 moments) plus the fp32 gradient.
_ADAM_BYTES = 12


class TunableControlNet:
    """A DiffBIR model whose ControlNet (or LoRA on it) is the only trainable part."""

    def __init__(
        self,
        model: DiffBIRRestorer,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        frozen_dtype: torch.dtype | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        self.model = model.requires_grad_(False)
        self.fixed = copy.deepcopy(model.controlnet).eval()
        if frozen_dtype is not None:
            for part in (model.unet, model.vae, self.fixed, *([model.stage1] if isinstance(model.stage1, nn.Module) else [])):
                nn.Module.to(part, dtype=frozen_dtype)
        net = model.controlnet.float().train()
        if lora_rank > 0:
            from peft import LoraConfig

            net.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank, target_modules=LORA_TARGETS))
        else:
            for name, p in net.named_parameters():
                p.requires_grad_(not name.startswith(HINT_PREFIX))  # the upstream layout has no hint network
        if gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            net.enable_gradient_checkpointing()
        self.lora_rank = lora_rank

    @property
    def controlnet(self) -> nn.Module:
        return self.model.controlnet

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.controlnet.parameters() if p.requires_grad]

    def regulariser(self, residuals: tuple[list[Tensor], Tensor], fixed: tuple[list[Tensor], Tensor]) -> Tensor:
        """Sum over the 13 control residuals of mean((c_l - c_l^fixed)^2): zero at the start."""
        (down, mid), (fixed_down, fixed_mid) = residuals, fixed
        pairs = [*zip(down, fixed_down), (mid, fixed_mid)]
        return sum(((a.float() - b.float()) ** 2).mean() for a, b in pairs)

    def save(self, path: str | Path) -> Path:
        """The tuned ControlNet in the upstream flat layout (LoRA merged into a copy), so `restore
        --model` loads it in a model file's `controlnet` slot as it loads the published ones."""
        net = self.controlnet
        if self.lora_rank > 0:
            from peft.tuners.tuners_utils import BaseTunerLayer

            net = copy.deepcopy(net)
            for module in net.modules():
                if isinstance(module, BaseTunerLayer):
                    module.merge()
            net = _without_adapters(net)
        return save_controlnet(net, path)


def _without_adapters(net: nn.Module) -> nn.Module:
    """A merged peft-wrapped ControlNet with its LoRA layers replaced by their base layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, child, module.get_base_layer())
    return net


@dataclass
class ReflPrediction:
    """ReFL's step m: the x0 prediction (with grad), its residuals and the frozen copy's."""

    x0: Tensor
    residuals: tuple[list[Tensor], Tensor]
    fixed_residuals: tuple[list[Tensor], Tensor]
    step: int
    timestep: int


def refl_prediction(
    tuning: TunableControlNet, c_img: Tensor, steps: int, last_steps: int = 2, rng: random.Random | None = None, seed: int = 0
) -> ReflPrediction:
    """DiffusionReward's trajectory: `steps`-step DDIM from x_T ~ N(0, I) with eta ~ U(0, 1) drawn
    per step, run without gradient until step m (drawn among the last `last_steps`); at m the
    ControlNet runs with gradient and x0 is predicted from its epsilon, the one place the reward's
    gradient reaches the ControlNet."""
    if not 1 <= last_steps <= steps:
        raise InputError(f"refl_last_steps must be between 1 and the sampling steps ({steps}), not {last_steps}")
    rng = rng or random.Random(seed)
    model, gen = tuning.model, torch.Generator("cpu").manual_seed(seed)
    sched = make_scheduler(SamplerSettings("ddim", steps, 0.0, seed), model.scheduler_config)
    m = steps - 1 - rng.randrange(last_steps)
    z = model.initial_noise(c_img, gen)
    context = model.prompt_embeds.to(model.dtype).expand(c_img.shape[0], -1, -1)
    with torch.no_grad():
        for t in sched.timesteps[:m]:
            eps = model.predict_noise(z, c_img, t, context)
            z = sched.step(eps.float(), t, z, eta=rng.random(), generator=gen, return_dict=False)[0]
    t = sched.timesteps[m]
    residuals = model.control_residuals(z, c_img, t, context)
    with torch.no_grad():
        fixed = model.control_residuals(z, c_img, t, context, controlnet=tuning.fixed)
    eps = model.predict_noise(z, c_img, t, context, residuals=residuals).float()
    alpha_bar = sched.alphas_cumprod[int(t)].to(z.device)
    x0 = (z - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    return ReflPrediction(x0, residuals, fixed, m, int(t))


def estimated_peak_bytes(tuning: TunableControlNet, batch: int, face_size: int) -> int:
    """A rough peak of tuning memory, printed at the start of a run so a too-large setting is
    seen before an hour of loading: all weights, the optimiser state and gradients of what trains,
    and activations scaled from the latent size (about 0.75 GiB per 512 px face and step with
    gradient, measured on the CPU at full size; checkpointing cuts it roughly 3x)."""
    weights = sum(p.numel() * p.element_size() for m in (tuning.model, tuning.fixed) for p in m.parameters())
    trained = sum(p.numel() for p in tuning.parameters()) * _ADAM_BYTES
    activations = int(0.75 * 2**30 * batch * (face_size / 512) ** 2)
    return weights + trained + activations
