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
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from facerestore_cli.errors import InputError
from facerestore_cli.models.controlnet import HINT_PREFIX, save_controlnet
from facerestore_cli.models.diffbir import DiffBIRRestorer, SamplerSettings, make_scheduler
from facerestore_cli.models.model_file import ModelFile

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


#: activation memory per 512 px sample with gradient, measured on an H200 (bf16 frozen parts,
#: gradient checkpointing, the whole ControlNet, benchmarks/gpu_tuning_memory.sh): LRPO's policy
#: step (UNet + ControlNet at one timestep) about 0.6 GiB, kept at 0.75 (20.7 GiB estimated for
#: 19.85 measured at 18 samples, with room for the other rounds' stored trajectories); ReFL's step m
#: also decodes x0 through the VAE with gradient for its image losses, 7.8 GiB (38.3 GiB at batch 4).
ACTIVATION_GIB_PER_SAMPLE = {"lrpo": 0.75, "refl": 7.8}


def estimated_peak_bytes(
    tuning: TunableControlNet,
    batch: int,
    face_size: int,
    method: str = "lrpo",
    judges: Sequence[nn.Module] = (),
    judge_trained: int = 0,
) -> int:
    """A rough peak of tuning memory, printed at the start of a run so a too-large setting is
    seen before an hour of loading: all weights (the reward judges' too: the paper's ViT-H FRM
    alone is 3.7 GiB in fp32), the optimiser state and gradients of what trains (the ControlNet,
    and `judge_trained` weights of ReFL's dynamic FRM), and activations scaled from the latent
    size (`ACTIVATION_GIB_PER_SAMPLE`, measured)."""
    own = {id(p): p for m in (tuning.model, tuning.fixed) for p in m.parameters()}
    others = {id(p): p for m in judges for p in m.parameters() if id(p) not in own}
    weights = sum(p.numel() * p.element_size() for p in [*own.values(), *others.values()])
    trained = (sum(p.numel() for p in tuning.parameters()) + judge_trained) * _ADAM_BYTES
    activations = int(ACTIVATION_GIB_PER_SAMPLE[method] * 2**30 * batch * (face_size / 512) ** 2)
    return weights + trained + activations


def describe_memory(
    tuning: TunableControlNet,
    lora_rank: int,
    samples: int,
    face_size: int,
    method: str = "lrpo",
    judges: Sequence[nn.Module] = (),
    judge_trained: int = 0,
) -> str:
    """The estimated peak line a run prints at its start (`samples`: faces a forward with gradient
    runs). It counts device memory: on the CPU the process also holds the memory-mapped
    checkpoint's pages while loading (measured 8-11 GiB RSS at full size against 5.4-6.5 GiB here)."""
    peak = estimated_peak_bytes(tuning, samples, face_size, method, judges, judge_trained)
    trainable = sum(p.numel() for p in tuning.parameters())
    what = f"LoRA rank {lora_rank}" if lora_rank else "the whole ControlNet"
    return f"{peak / 2**30:.1f} GiB ({what}: {trainable / 1e6:.1f}M trainable weights, {samples} samples a step, face {face_size} px)"


def export_tuned(tuning: TunableControlNet, base: ModelFile, base_value: str, run_dir: Path, method: str, preset: str | None) -> Path:
    """RUN/controlnet.pth (merged, the upstream flat layout) and RUN/model.toml: a diffbir-v1 model
    file with the base's SD and SwinIR, this ControlNet and `preset`, `[meta] base` naming the base,
    so `restore --model RUN/model.toml` restores with the tuned ControlNet."""
    net = tuning.save(run_dir / CONTROLNET_FILE)
    how = f", LoRA rank {tuning.lora_rank} merged)" if tuning.lora_rank else ")"
    meta = {"base": str(base_value), "tuned_by": f"facerestore {method} (ControlNet{how}"}
    spec = ModelFile("diffbir-v1", sd=base.sd, swinir=base.swinir, controlnet=net.absolute(), preset=preset, meta=meta)
    return spec.write(run_dir / MODEL_FILE)


#: The tuned ControlNet's file in a finished run, and the model file naming it.
CONTROLNET_FILE = "controlnet.pth"


MODEL_FILE = "model.toml"


#: The trainable weights (LoRA adapters or the whole ControlNet) inside a checkpoint's model folder.
STATE_FILE = "controlnet_trainable.safetensors"


OPTIMIZERS = ("adamw", "adamw8bit")


def uses_bf16(cfg: Any, device: torch.device) -> bool:
    """Frozen parts in bf16 and bf16 autocast: `precision = "bf16"` on CUDA. The CPU runs fp32."""
    return cfg.precision == "bf16" and device.type == "cuda"


def build_tuning(model: DiffBIRRestorer, cfg: Any, device: torch.device) -> TunableControlNet:
    """The DiffBIR model on `device` with its ControlNet (or LoRA on it) the only trainable part."""
    if cfg.face_size % model.config.size_multiple:
        raise InputError(f"face_size {cfg.face_size} must be a multiple of {model.config.size_multiple} for a DiffBIR model")
    frozen = torch.bfloat16 if uses_bf16(cfg, device) else None
    tuning = TunableControlNet(
        model.to(device), cfg.lora_rank, cfg.lora_alpha, frozen_dtype=frozen, gradient_checkpointing=cfg.gradient_checkpointing
    )
    if isinstance(model.stage1, torch.nn.Module):
        model.stage1.eval()
    model.vae.eval(), model.unet.eval()
    return tuning


def optimizer(params: list[torch.nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    """AdamW over the trainable ControlNet parameters; `optimizer = "adamw8bit"`: bitsandbytes'."""
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise InputError('optimizer = "adamw8bit" needs bitsandbytes (pip install bitsandbytes); or set optimizer = "adamw"') from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def save_state(tuning: TunableControlNet, folder: Path) -> None:
    """The checkpoint's model part: the trainable weights alone (LoRA adapters or the ControlNet)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().float().contiguous().cpu() for n, p in tuning.controlnet.named_parameters() if p.requires_grad}
    save_file(state, str(folder / STATE_FILE))


def load_state(tuning: TunableControlNet, folder: Path) -> None:
    """Put a checkpoint's trainable weights back (every one must be there)."""
    state = load_file(str(folder / STATE_FILE))
    params = dict(tuning.controlnet.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(state) != wanted:
        raise InputError(
            f"{folder / STATE_FILE} does not fit this run's ControlNet (lora_rank changed?): "
            f"{len(wanted - set(state))} missing, {len(set(state) - wanted)} unexpected weights"
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
