"""Tiny stand-ins of the upstream files, written in their exact on-disk layouts (SPEC §0, §1, §2.3).

Each writer takes tiny diffusers/transformers models and stores their tensors under the upstream
names: the SD 2.1 ldm single file (`{"state_dict": {model.diffusion_model.*, first_stage_model.*,
cond_stage_model.model.*}}`), the same weights as a diffusers folder, and an OSEDiff `.pkl`
(module lists, ranks, peft-named `state_dict_unet` / `state_dict_vae`). Tests load these through
the real loaders, so a loader that reads the real files reads these.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from facerestore_cli.models import controlnet as cn
from facerestore_cli.models import sd21

#: SD 2.1-base shaped (four levels, two layers a block, linear projections), a few thousand times smaller.
TINY_SD = {
    "unet": {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": [16, 32, 32, 32],
        "layers_per_block": 2,
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "attention_head_dim": [2, 2, 4, 4],
        "use_linear_projection": True,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 16, 16],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "scaling_factor": 0.18215,
    },
    "text_encoder": {
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
    },
}


# ------------------------------------------------------------------------------ SD 2.1: ldm names
def ldm_vae_key(key: str, levels: int) -> str:
    """diffusers AutoencoderKL name -> ldm `first_stage_model.` name (inverse of diffusers' converter)."""
    key = key.replace("conv_norm_out", "norm_out")
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        part, way, i, kind, j, rest = m.groups()
        idx = int(i) if way == "down" else levels - 1 - int(i)
        if kind == "resnets":
            return f"{part}.{way}.{idx}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{way}.{idx}.{way}sample.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", key)
    if m:
        names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        return f"{m[1]}.mid.attn_1.{names[m[2]]}.{m[3]}"
    return key


def ldm_vae_state(vae: nn.Module) -> dict[str, Tensor]:
    """The VAE under `first_stage_model.`, its mid attention as the 1x1 convs ldm has."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        name = ldm_vae_key(k, levels)
        out[f"{sd21.LDM_VAE_PREFIX}{name}"] = v[:, :, None, None] if ".attn_1." in name and v.dim() == 2 else v
    return out


def ldm_unet_state(unet: nn.Module) -> dict[str, Tensor]:
    """The UNet under `model.diffusion_model.` (ldm `UNetModel` names)."""
    lpb = int(unet.config.layers_per_block)
    return {f"{sd21.LDM_UNET_PREFIX}{cn.diffusers_to_ldm_key(k, lpb)}": v for k, v in unet.state_dict().items()}


def openclip_state(text: nn.Module) -> dict[str, Tensor]:
    """transformers CLIPTextModel -> OpenCLIP text-tower names under `cond_stage_model.model.`."""
    p, sd, out = sd21.LDM_CLIP_PREFIX, text.state_dict(), {}
    out[f"{p}token_embedding.weight"] = sd["embeddings.token_embedding.weight"]
    out[f"{p}positional_embedding"] = sd["embeddings.position_embedding.weight"]
    for leaf in ("weight", "bias"):
        out[f"{p}ln_final.{leaf}"] = sd[f"final_layer_norm.{leaf}"]
    for i in range(text.config.num_hidden_layers):
        a, b = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{b}attn.in_proj_{leaf}"] = torch.cat([sd[f"{a}self_attn.{n}_proj.{leaf}"] for n in "qkv"])
            for new, old in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                out[f"{b}{new}.{leaf}"] = sd[f"{a}{old}.{leaf}"]
    width = text.config.hidden_size
    out[f"{p}text_projection"] = torch.randn(width, width)
    out[f"{p}logit_scale"] = torch.tensor(4.6052)
    return out


def tiny_sd_models(seed: int = 0, configs: dict | None = None) -> dict[str, nn.Module]:
    """Random UNet, VAE and OpenCLIP-like text tower; the tower has one block more than the
    config, as SD 2 runs all but the last."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfgs = configs or TINY_SD
    torch.manual_seed(seed)
    text_cfg = dict(cfgs["text_encoder"], num_hidden_layers=cfgs["text_encoder"]["num_hidden_layers"] + 1)
    return {
        "unet": UNet2DConditionModel(**cfgs["unet"]).eval(),
        "vae": AutoencoderKL(**cfgs["vae"]).eval(),
        "text": CLIPTextModel(CLIPTextConfig(**text_cfg)).eval(),
    }


def write_ldm_file(path: Path, models: dict[str, nn.Module]) -> Path:
    """`v2-1_512-ema-pruned.ckpt` in miniature: a Lightning-style `{"state_dict": {...}}` pickle."""
    state = {**ldm_unet_state(models["unet"]), **ldm_vae_state(models["vae"]), **openclip_state(models["text"])}
    state["betas"] = torch.linspace(0.1, 0.2, 1000)  # ldm keeps its schedule buffers beside the models
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "global_step": 0}, path)
    return path


# ------------------------------------------------------------------------------ SD 2.1: diffusers folder
def write_sd2_tokenizer(folder: Path, max_len: int = 77) -> None:
    """CLIP tokenizer files that tokenize "" as SD 2's does: start 49406, end 49407, pad "!" = 0.

    Only the special tokens are in the vocabulary: enough for the empty prompt, which is all the
    restorer encodes."""
    folder.mkdir(parents=True)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!"}
    (folder / "vocab.json").write_text(json.dumps({"!": 0, "<|startoftext|>": 49406, "<|endoftext|>": 49407}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_len, **special}))


def write_sd_folder(root: Path, models: dict[str, nn.Module], configs: dict | None = None) -> Path:
    """The same weights as `write_ldm_file`, as a diffusers SD 2.1-base folder: the text encoder
    is the tower without its last block (what diffusers' converter makes of the ldm file)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfgs = configs or TINY_SD
    models["vae"].save_pretrained(root / "vae")
    models["unet"].save_pretrained(root / "unet")
    (root / "scheduler").mkdir(parents=True)
    sched = {"_class_name": "PNDMScheduler", **sd21.sd21_configs()["scheduler"], "skip_prk_steps": True}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    text = CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"]))
    kept = {k: v for k, v in models["text"].state_dict().items() if k in text.state_dict()}
    text.load_state_dict(kept, strict=True)
    text.save_pretrained(root / "text_encoder")
    write_sd2_tokenizer(root / "tokenizer", int(cfgs["text_encoder"]["max_position_embeddings"]))
    return root


# ------------------------------------------------------------------------------ OSEDiff .pkl
#: The substrings OSEDiff's initialize_unet / initialize_vae grep for, in their order (SPEC §1.3).
OSEDIFF_UNET_PATTERNS = (
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
OSEDIFF_VAE_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")
OSEDIFF_ADAPTERS = {
    "unet_lora_encoder_modules": "default_encoder",
    "unet_lora_decoder_modules": "default_decoder",
    "unet_lora_others_modules": "default_others",
}


def _unet_bucket(name: str) -> str:
    if "down_blocks" in name or "conv_in" in name:
        return "unet_lora_encoder_modules"
    if "up_blocks" in name or "conv_out" in name:
        return "unet_lora_decoder_modules"
    return "unet_lora_others_modules"


def osediff_module_lists(unet: nn.Module, vae: nn.Module) -> dict[str, list[str]]:
    """The four module lists as OSEDiff builds them: UNet names take the first matching pattern,
    VAE names one entry per matching pattern (no `break` upstream, hence duplicates)."""
    lists: dict[str, list[str]] = {key: [] for key in (*OSEDIFF_ADAPTERS, "vae_lora_encoder_modules")}
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        if any(p in name for p in OSEDIFF_UNET_PATTERNS):
            lists[_unet_bucket(name)].append(name.removesuffix(".weight"))
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        module = name.removesuffix(".weight")
        for pattern in OSEDIFF_VAE_PATTERNS:
            if pattern in name and "encoder" in name:
                lists["vae_lora_encoder_modules"].append(module)
            elif "quant_conv" in name and "post_quant_conv" not in name:
                lists["vae_lora_encoder_modules"].append(module)
    return lists


def write_osediff_pkl(path: Path, unet: nn.Module, vae: nn.Module, rank: int = 4, seed: int = 5) -> tuple[nn.Module, nn.Module]:
    """A trained-looking OSEDiff checkpoint for copies of `unet` / `vae`: peft adapters added the
    way OSEDiff adds them (gaussian init, default alpha), every LoRA weight and conv_in made
    non-trivial, saved with OSEDiff's `save_model` selection. Returns the adapted copies
    (adapters active), the reference an OSEDiff forward runs on."""
    from peft import LoraConfig

    unet, vae = copy.deepcopy(unet), copy.deepcopy(vae)
    lists = osediff_module_lists(unet, vae)
    for key, adapter in OSEDIFF_ADAPTERS.items():
        unet.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=lists[key]), adapter_name=adapter)
    unet.set_adapter(list(OSEDIFF_ADAPTERS.values()))
    vae.add_adapter(
        LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=lists["vae_lora_encoder_modules"]), adapter_name="default_encoder"
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (unet, vae):
            for name, p in module.named_parameters():
                if "lora_" in name:  # B starts at zero: give every adapter an effect
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        w = unet.conv_in.base_layer.weight
        w.add_(torch.randn(w.shape, generator=gen) * 0.05)
    ckpt: dict = dict(lists)
    ckpt["rank_unet"] = ckpt["rank_vae"] = rank
    ckpt["state_dict_unet"] = {k: v.clone() for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k}
    ckpt["state_dict_vae"] = {k: v.clone() for k, v in vae.state_dict().items() if "lora" in k}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return unet.eval(), vae.eval()
