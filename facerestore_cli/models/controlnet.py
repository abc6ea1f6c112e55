"""DiffBIR's IRControlNet as a diffusers `ControlNetModel`, read from and written to the upstream layout.

`v1_face.pth`, `diffbir_refl.pt` and `lrpo_*.pth` are the same flat 324-tensor state dict
(upstream/SPEC.md §2.2, §4.4). IRControlNet feeds the condition latent through `conv_in`
(8 channels: x_t then c_img) and has no pixel hint network, so it maps onto
`ControlNetModel(in_channels=8, conditioning_channels=3)` whose hint network is all zeros
(SPEC §2.5, verified there to 7.5e-6): its `conv_out` is zero, so a zero hint image adds exactly 0.
The forward map is diffusers' own `convert_controlnet_checkpoint`; the inverse written here is the
rename table of SPEC §2.5, so a fine-tuned ControlNet is saved in the flat layout `restore` (and
the upstream code) loads.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from facerestore_cli.errors import InputError
from facerestore_cli.models.checkpoints import CheckpointError, check_keys, describe_layout, load_file, unwrap_state_dict
from facerestore_cli.models.sd21 import cast_module, sd21_configs

__all__ = [
    "CONTROLNET_LAYOUT",
    "controlnet_config",
    "diffusers_to_irc",
    "diffusers_to_ldm_key",
    "hint_block_zeros",
    "irc_expected_shapes",
    "irc_to_diffusers",
    "load_controlnet",
    "read_irc_state",
    "save_controlnet",
]

CONTROLNET_LAYOUT = "a DiffBIR ControlNet state dict"
LDM_CONTROLNET_PREFIX = "control_model."
#: BFR_RL's loader keeps only `controlnet.*` keys (stripped) when any exists (SPEC §4.2).
LRPO_PREFIX = "controlnet."
HINT_PREFIX = "controlnet_cond_embedding."

#: diffusers ResnetBlock2D name -> ldm ResBlock name.
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "controlnet_mid_block": "middle_block_out.0",
}
_PATTERNS = {
    name: re.compile(rx)
    for name, rx in (
        ("down_res", r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)"),
        ("down_attn", r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
        ("down_sample", r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)"),
        ("mid_res", r"mid_block\.resnets\.(\d+)\.(\w+)\.(.+)"),
        ("mid_attn", r"mid_block\.attentions\.0\.(.+)"),
        ("up_res", r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)"),
        ("up_attn", r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
        ("up_sample", r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)"),
        ("zero_conv", r"controlnet_down_blocks\.(\d+)\.(.+)"),
    )
}


def diffusers_to_ldm_key(key: str, layers_per_block: int = 2, up_attention_blocks: tuple[int, ...] = (1, 2, 3)) -> str | None:
    """The ldm (`UNetModel` / IRControlNet) name of a diffusers UNet or ControlNet tensor; None for
    the hint network, which IRControlNet does not have. `up_attention_blocks`: the UNet up blocks
    with cross-attention, whose upsampler sits at `.2.conv` instead of `.1.conv`."""
    if key.startswith(HINT_PREFIX):
        return None
    head, _, leaf = key.rpartition(".")
    if head in _FIXED:
        return f"{_FIXED[head]}.{leaf}"
    step = layers_per_block + 1
    for name, rx in _PATTERNS.items():
        m = rx.fullmatch(key)
        if m is None:
            continue
        g = m.groups()
        if name == "down_res":
            return f"input_blocks.{1 + int(g[0]) * step + int(g[1])}.0.{_RESNET[g[2]]}.{g[3]}"
        if name == "down_attn":
            return f"input_blocks.{1 + int(g[0]) * step + int(g[1])}.1.{g[2]}"
        if name == "down_sample":
            return f"input_blocks.{(int(g[0]) + 1) * step}.0.op.{g[1]}"
        if name == "mid_res":
            return f"middle_block.{2 * int(g[0])}.{_RESNET[g[1]]}.{g[2]}"
        if name == "mid_attn":
            return f"middle_block.1.{g[0]}"
        if name == "up_res":
            return f"output_blocks.{int(g[0]) * step + int(g[1])}.0.{_RESNET[g[2]]}.{g[3]}"
        if name == "up_attn":
            return f"output_blocks.{int(g[0]) * step + int(g[1])}.1.{g[2]}"
        if name == "up_sample":
            return f"output_blocks.{int(g[0]) * step + layers_per_block}.{2 if int(g[0]) in up_attention_blocks else 1}.conv.{g[1]}"
        return f"zero_convs.{g[0]}.0.{g[1]}"
    raise InputError(f"no ldm name for diffusers tensor {key!r}")


def controlnet_config(unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """ControlNetModel kwargs of the IRControlNet beside a UNet: its encoder, with `conv_in` over
    x_t and c_img (2x the latent channels) and a 3-channel (always zero) hint (SPEC §2.5)."""
    from diffusers import ControlNetModel

    params = inspect.signature(ControlNetModel.__init__).parameters
    cfg = {k: v for k, v in unet_config.items() if k in params and not k.startswith("_")}
    cfg["in_channels"] = 2 * int(unet_config.get("in_channels", 4))
    cfg["conditioning_channels"] = 3
    return cfg


def _meta_controlnet(config: Mapping[str, Any]) -> nn.Module:
    from diffusers import ControlNetModel

    with torch.device("meta"):
        return ControlNetModel(**config)


def hint_block_zeros(config: Mapping[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The all-zero `control_model.input_hint_block.{0,2,...,14}` tensors IRControlNet lacks (16 at
    full size: 16<-3, 16<-16, 32<-16, 32<-32, 96<-32, 96<-96, 256<-96, 320<-256, each with a bias)."""
    chans = list(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256)))
    pairs = [(chans[0], int(config.get("conditioning_channels", 3)))]
    for c_in, c_out in zip(chans[:-1], chans[1:]):
        pairs += [(c_in, c_in), (c_out, c_in)]
    pairs.append((int(config["block_out_channels"][0]), chans[-1]))
    out = {}
    for i, (c_out, c_in) in enumerate(pairs):
        out[f"{LDM_CONTROLNET_PREFIX}input_hint_block.{2 * i}.weight"] = torch.zeros(c_out, c_in, 3, 3, dtype=dtype)
        out[f"{LDM_CONTROLNET_PREFIX}input_hint_block.{2 * i}.bias"] = torch.zeros(c_out, dtype=dtype)
    return out


def irc_expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every IRControlNet key with its shape for this ControlNet config (324 at full size)."""
    lpb = int(config.get("layers_per_block", 2))
    out = {}
    for k, v in _meta_controlnet(config).state_dict().items():
        name = diffusers_to_ldm_key(k, lpb)
        if name is not None:
            out[name] = tuple(v.shape)
    return out


def irc_to_diffusers(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """Flat IRControlNet tensors -> ControlNetModel names: prefixed `control_model.`, the zero hint
    tensors added, then diffusers' `convert_controlnet_checkpoint` (340 keys at full size)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    first = next(iter(state.values()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    ckpt = {f"{LDM_CONTROLNET_PREFIX}{k}": v for k, v in state.items()}
    ckpt.update(hint_block_zeros(config, dtype))
    out = convert_controlnet_checkpoint(ckpt, dict(config))
    return {k: v for k, v in out.items() if v is not None}


def diffusers_to_irc(state: Mapping[str, Tensor], layers_per_block: int = 2) -> dict[str, Tensor]:
    """ControlNetModel tensors -> the flat upstream layout. The hint network has no place there,
    so it must still be all zero (keep `controlnet_cond_embedding` frozen when fine-tuning)."""
    out = {}
    for k, v in state.items():
        name = diffusers_to_ldm_key(k, layers_per_block)
        if name is None:
            if bool(torch.any(v != 0)):
                raise InputError(
                    f"{k} is not zero: IRControlNet has no hint network, so a ControlNet whose hint network was trained cannot be saved in the upstream layout (freeze controlnet_cond_embedding)"
                )
            continue
        out[name] = v
    return out


def read_irc_state(path: str | Path, slot: str = "controlnet") -> dict[str, Tensor]:
    """The flat IRControlNet tensors of a file as the upstream loaders take it: `state_dict`
    unwrapped, `module.` stripped, and (LRPO) only the `controlnet.*` keys, stripped, when any
    exists. A file of another kind is one CheckpointError line saying what it looks like."""
    state = unwrap_state_dict(load_file(path, slot))
    if any(k.startswith(LRPO_PREFIX) for k in state):
        state = {k[len(LRPO_PREFIX) :]: v for k, v in state.items() if k.startswith(LRPO_PREFIX)}
    found = describe_layout(state)
    if not found.startswith(CONTROLNET_LAYOUT):
        raise CheckpointError(slot, path, f"expected {CONTROLNET_LAYOUT}, but this looks like {found}")
    return state


def load_controlnet(
    path: str | Path,
    unet_config: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    slot: str = "controlnet",
) -> nn.Module:
    """A ControlNetModel from an IRControlNet file (`v1_face.pth`, `diffbir_refl.pt`, `lrpo_*.pth`
    or one `save_controlnet` wrote), built on meta and loaded strictly with `assign=True`.
    `unet_config` defaults to the shipped SD 2.1-base one; `dtype` None keeps the file's."""
    if unet_config is None:
        unet_config = sd21_configs()["unet"]
    config = controlnet_config(unet_config)
    state = read_irc_state(path, slot)
    expected = irc_expected_shapes(config)
    check_keys(state, expected, slot, path)
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(
            slot, path, f"{len(extra)} unexpected tensors, e.g. {', '.join(extra[:3])} (a ControlNet of another configuration)"
        )
    model = _meta_controlnet(config)
    try:
        model.load_state_dict(irc_to_diffusers(state, config), strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(slot, path, f"cannot load: {str(err).splitlines()[0]}") from None
    dtype = dtype or model.conv_in.weight.dtype
    return cast_module(model, device, dtype).eval().requires_grad_(False)


def save_controlnet(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a ControlNetModel in the flat upstream layout (a torch pickle of 324 tensors, or a
    safetensors file when `path` ends in .safetensors), so `load_controlnet` and upstream read it."""
    path = Path(path)
    lpb = int(model.config.layers_per_block)
    flat = diffusers_to_irc(model.state_dict(), lpb)
    flat = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous() for k, v in flat.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(flat, str(tmp))
    else:
        torch.save(flat, tmp)
    tmp.replace(path)
    return path
