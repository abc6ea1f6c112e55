"""Loading upstream weights: a diffusers Stable Diffusion 2.1 folder and OSEDiff LoRA checkpoints.

A SD 2.1(-base) diffusers folder has `vae/`, `unet/`, `scheduler/`, `text_encoder/`, `tokenizer/`.
The restorer has no text encoder: the prompt is encoded once here and kept as `prompt_embeds`
(OSEDiff conditions on DAPE tags + a user prompt; an empty prompt is the neutral choice).

An OSEDiff `.pkl` (written by `OSEDiff_gen.save_model` in cswry/OSEDiff `osediff.py`) is a
`torch.save`d dict::

    unet_lora_encoder_modules / unet_lora_decoder_modules / unet_lora_others_modules : list[str]
    rank_unet : int
    state_dict_unet : {name: tensor} for every unet param with "lora" or "conv_in" in its name
    vae_lora_encoder_modules : list[str]
    rank_vae : int
    state_dict_vae : {name: tensor} for every vae param with "lora" in its name

The tensor names are diffusers-module names as wrapped by peft with adapter names
"default_encoder" / "default_decoder" / "default_others" (UNet) and "default_encoder" (VAE),
e.g. `down_blocks.0.resnets.0.conv1.lora_A.default_encoder.weight`, `conv_in.base_layer.weight`.
LoRA alpha is peft's default (8), i.e. scale 2 at rank 4.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from facerestore_cli.errors import InputError, MissingFileError
from facerestore_cli.models.configs import RestorerConfig, get_config
from facerestore_cli.models.restorer import (
    OneStepRestorer,
    _plain_config,
    load_diffusers_parts,
)

__all__ = [
    "OSEDIFF_UNET_ADAPTERS",
    "OSEDIFF_VAE_ADAPTER",
    "encode_prompt",
    "load_osediff_checkpoint",
    "load_prompt_embeds_file",
    "load_sd21_folder",
]

#: checkpoint module-list key -> peft adapter name, as OSEDiff's load_ckpt pairs them.
OSEDIFF_UNET_ADAPTERS = {
    "unet_lora_encoder_modules": "default_encoder",
    "unet_lora_decoder_modules": "default_decoder",
    "unet_lora_others_modules": "default_others",
}
OSEDIFF_VAE_ADAPTER = ("vae_lora_encoder_modules", "default_encoder")
#: peft's default lora_alpha, which OSEDiff's LoraConfig(...) calls inherit.
OSEDIFF_LORA_ALPHA = 8.0

_SD_REQUIRED = ("vae/config.json", "unet/config.json", "scheduler/scheduler_config.json")


# ------------------------------------------------------------------------------ SD 2.1 folder
def load_sd21_folder(
    path: str | Path,
    config: str | RestorerConfig = "sd21",
    prompt: str = "",
    prompt_embeds_file: str | Path | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> OneStepRestorer:
    """Restorer from a local diffusers SD 2.1 folder (vae/unet/scheduler + text encoder for the prompt).

    The named `config` supplies the restorer settings (timestep, LoRA ranks, name); the folder's
    own vae/unet/scheduler configs replace its architecture dicts, so any SD-like folder loads.
    """
    root = Path(path)
    _check_sd_layout(root, need_text=prompt_embeds_file is None)
    vae, unet, scheduler = load_diffusers_parts(root, torch_dtype)
    if prompt_embeds_file is not None:
        embeds = load_prompt_embeds_file(prompt_embeds_file)
    else:
        embeds = encode_prompt(root, prompt)
    cross_dim = int(unet.config.cross_attention_dim)
    if embeds.shape[-1] != cross_dim:
        raise InputError(f"prompt embeddings have width {embeds.shape[-1]}, unet cross_attention_dim is {cross_dim}")
    cfg = get_config(config).with_overrides(
        vae=_plain_config(vae.config),
        unet=_plain_config(unet.config),
        scheduler=_plain_config(scheduler.config),
        prompt_tokens=int(embeds.shape[1]),
    )
    model = OneStepRestorer(cfg, vae, unet, scheduler, embeds)
    return model.to(device=device, dtype=torch_dtype or vae.dtype).eval()


def _check_sd_layout(root: Path, need_text: bool) -> None:
    if not root.is_dir():
        raise MissingFileError(f"Stable Diffusion folder not found: {root}")
    required = list(_SD_REQUIRED) + (["text_encoder/config.json", "tokenizer"] if need_text else [])
    missing = [r for r in required if not (root / r).exists()]
    if missing:
        raise MissingFileError(f"{root} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}")


@torch.no_grad()
def encode_prompt(root: str | Path, prompt: str = "") -> Tensor:
    """1xTxD CLIP text embeddings of `prompt`, padded to the tokenizer's max length (as OSEDiff does)."""
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as exc:  # transformers is only needed for this one-off encoding
        raise ImportError("encoding a prompt needs `transformers` (pip install transformers)") from exc
    root = Path(root)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True).eval()
    max_len = min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))
    ids = tokenizer(prompt, max_length=max_len, padding="max_length", truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0].float().cpu()


def load_prompt_embeds_file(path: str | Path) -> Tensor:
    """Precomputed prompt embeddings (TxD or 1xTxD).

    A safetensors file (key `prompt_embeds`, or its only tensor) or a `torch.save`d tensor.
    """
    src = Path(path)
    if not src.is_file():
        raise MissingFileError(f"prompt embeddings file not found: {src}")
    if src.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(src))
        if "prompt_embeds" in tensors:
            t = tensors["prompt_embeds"]
        elif len(tensors) == 1:
            t = next(iter(tensors.values()))
        else:
            raise InputError(f"{src}: expected a 'prompt_embeds' tensor, found {sorted(tensors)}")
    else:
        t = torch.load(src, map_location="cpu", weights_only=True)
        if not isinstance(t, Tensor):
            raise InputError(f"{src}: expected a tensor, got {type(t).__name__}")
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[0] != 1:
        raise InputError(f"{src}: prompt embeddings must be TxD or 1xTxD, got {tuple(t.shape)}")
    return t.float()


# ------------------------------------------------------------------------------ OSEDiff checkpoint
def load_osediff_checkpoint(restorer: OneStepRestorer, pkl_path: str | Path) -> OneStepRestorer:
    """Apply an OSEDiff `.pkl` to `restorer` (in place): its three UNet LoRA adapters, the VAE
    encoder adapter and the fully trained `unet.conv_in`. Returns the same restorer.

    Call `restorer.merge_lora()` afterwards for inference without the LoRA overhead.
    """
    ckpt = _read_osediff_pkl(Path(pkl_path))
    rank_unet = _first_key(ckpt, ("rank_unet", "lora_rank_unet", "lora_rank"), pkl_path)
    for list_key, adapter in OSEDIFF_UNET_ADAPTERS.items():
        _add_osediff_adapter(restorer, "unet", adapter, int(rank_unet), ckpt[list_key], pkl_path)
    if "unet.conv_in" not in restorer.full_trained_modules:
        restorer.full_trained_modules.append("unet.conv_in")
    _copy_osediff_weights(restorer.unet, ckpt["state_dict_unet"], ("lora", "conv_in"), f"{pkl_path} [unet]")

    list_key, adapter = OSEDIFF_VAE_ADAPTER
    if list_key in ckpt and "state_dict_vae" in ckpt:
        rank_vae = _first_key(ckpt, ("rank_vae", "lora_rank_vae", "lora_rank"), pkl_path)
        _add_osediff_adapter(restorer, "vae", adapter, int(rank_vae), ckpt[list_key], pkl_path)
        _copy_osediff_weights(restorer.vae, ckpt["state_dict_vae"], ("lora",), f"{pkl_path} [vae]")
    return restorer


def _add_osediff_adapter(restorer: OneStepRestorer, part: str, adapter: str, rank: int, modules: list[str], pkl_path: str | Path) -> None:
    try:
        restorer._add_adapter(part, adapter, rank, OSEDIFF_LORA_ALPHA, _targets(modules))
    except ValueError as exc:  # peft: target modules not found -> wrong base model
        first = str(exc).splitlines()[0][:200]
        raise InputError(f"{pkl_path}: cannot apply {part} adapter {adapter!r} to this model: {first}") from None


def _read_osediff_pkl(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingFileError(f"OSEDiff checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors come in many types
        raise InputError(f"{path} is not a readable OSEDiff checkpoint: {str(exc).splitlines()[0]}") from None
    if not isinstance(ckpt, dict):
        raise InputError(f"{path} is not an OSEDiff checkpoint (top level is {type(ckpt).__name__}, not dict)")
    missing = [k for k in ("state_dict_unet", *OSEDIFF_UNET_ADAPTERS) if k not in ckpt]
    if missing:
        raise InputError(f"{path} is not an OSEDiff checkpoint: missing keys {', '.join(missing)}")
    return ckpt


def _first_key(ckpt: dict[str, Any], keys: tuple[str, ...], path: str | Path) -> Any:
    for k in keys:
        if k in ckpt:
            return ckpt[k]
    raise InputError(f"{path}: no LoRA rank in checkpoint (looked for {', '.join(keys)})")


def _targets(names: list[str]) -> list[str]:
    """OSEDiff's module lists contain duplicates (one entry per matching grep pattern); dedupe, keep order."""
    return list(dict.fromkeys(names))


_ADAPTER_SEGMENT = re.compile(r"\.(lora_[AB])\.[^.]+\.")


def _candidate_keys(name: str) -> list[str]:
    """Checkpoint spellings of one of our parameter names: exact, unwrapped base weight, adapter-less LoRA."""
    return [name, name.replace(".base_layer.", "."), _ADAPTER_SEGMENT.sub(r".\1.", name)]


def _copy_osediff_weights(module: torch.nn.Module, state: dict[str, Tensor], grep: tuple[str, ...], where: str) -> None:
    """Copy every param whose name contains a `grep` word from `state`, as OSEDiff's load_ckpt does."""
    copied, missing = 0, []
    with torch.no_grad():
        for name, param in module.named_parameters():
            if not any(g in name for g in grep):
                continue
            key = next((k for k in _candidate_keys(name) if k in state), None)
            if key is None:
                missing.append(name)
                continue
            if state[key].shape != param.shape:
                raise InputError(f"{where}: {key} has shape {tuple(state[key].shape)}, model {tuple(param.shape)}")
            param.copy_(state[key].to(param.dtype))
            copied += 1
    if missing:
        raise InputError(f"{where}: {len(missing)} weights missing from checkpoint (e.g. {missing[0]}); wrong base model?")
    if copied == 0:
        raise InputError(f"{where}: no weights copied")
