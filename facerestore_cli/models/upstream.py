"""Loading upstream weights: Stable Diffusion 2.1-base (diffusers folder or ldm single file) and
OSEDiff LoRA checkpoints, assembled into the one-step restorer.

A SD 2.1(-base) diffusers folder has `vae/`, `unet/`, `scheduler/`, `text_encoder/`, `tokenizer/`.
The ldm single file `v2-1_512-ema-pruned.ckpt` (SPEC §0) is read by `models.sd21`, which also
encodes the empty prompt with the file's own OpenCLIP text tower; either form gives the same
restorer for the same weights (`load_sd21_restorer`). The restorer has no text encoder: the
prompt is encoded once and kept as `prompt_embeds` (OSEDiff conditions on DAPE tags + a user
prompt; an empty prompt is the neutral choice).

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
from facerestore_cli.models.checkpoints import CheckpointError, describe_layout, load_file, unwrap_state_dict
from facerestore_cli.models.configs import RestorerConfig, get_config
from facerestore_cli.models.restorer import (
    OneStepRestorer,
    _plain_config,
    load_diffusers_parts,
)
from facerestore_cli.models.sd21 import SD21Parts, build_scheduler, load_sd21_folder_parts, load_sd21_ldm

__all__ = [
    "OSEDIFF_SLOT",
    "OSEDIFF_UNET_ADAPTERS",
    "OSEDIFF_VAE_ADAPTER",
    "OSEDiffCheckpointError",
    "apply_osediff_checkpoint",
    "encode_prompt",
    "load_osediff",
    "load_osediff_checkpoint",
    "load_prompt_embeds_file",
    "load_sd21_folder",
    "load_sd21_restorer",
    "read_osediff_pkl",
    "restorer_from_parts",
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
#: The model-file slot of an OSEDiff .pkl, and the `checkpoints.LAYOUTS` name a file of that slot must have.
OSEDIFF_SLOT = "osediff"
OSEDIFF_LAYOUT = "an OSEDiff checkpoint"


class OSEDiffCheckpointError(CheckpointError, InputError):
    """An OSEDiff .pkl that cannot be used: one line naming the slot and the file, as every
    checkpoint error is; still a ValueError, as this loader's errors were before."""


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


def restorer_from_parts(parts: SD21Parts, config: str | RestorerConfig = "sd21") -> OneStepRestorer:
    """The one-step restorer of `models.sd21` parts: the named `config` supplies the restorer
    settings (timestep 999, ranks), the parts their architecture, as `load_sd21_folder` does."""
    scheduler = build_scheduler("ddpm", parts.scheduler_config)
    cfg = get_config(config).with_overrides(
        vae=_plain_config(parts.vae.config),
        unet=_plain_config(parts.unet.config),
        scheduler=_plain_config(scheduler.config),
        prompt_tokens=int(parts.prompt_embeds.shape[1]),
    )
    return OneStepRestorer(cfg, parts.vae, parts.unet, scheduler, parts.prompt_embeds)


def load_sd21_restorer(
    sd: str | Path,
    config: str | RestorerConfig = "sd21",
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    configs: dict[str, dict[str, Any]] | None = None,
) -> OneStepRestorer:
    """Restorer from SD 2.1-base as the ldm single file or as a diffusers folder, whichever `sd` is.

    A folder with `tokenizer/` + `text_encoder/` loads as `load_sd21_folder` always has; one
    without them (the SD 2 tokenizer files are hard to find) takes `prompt_embeds.safetensors` or
    runs `text_encoder/` on OpenCLIP's ids of "" (`sd21.load_sd21_folder_parts`). The ldm file's
    architecture comes from `configs` (default: the shipped SD 2.1-base ones; a folder has its
    own) and its "" context is cached in `cache_dir`. `dtype` None keeps the weights' dtype.
    """
    path = Path(sd)
    if path.is_dir():
        if (path / "tokenizer").is_dir() and (path / "text_encoder").is_dir():
            return load_sd21_folder(path, config=config, torch_dtype=dtype, device=device)
        parts = load_sd21_folder_parts(path, dtype=dtype)
    elif path.is_file():
        parts = load_sd21_ldm(path, configs=configs, cache_dir=cache_dir, dtype=dtype)
    else:
        raise MissingFileError(f"sd: {path}: no Stable Diffusion 2.1 file or folder there")
    dtype = dtype or next(parts.unet.parameters()).dtype
    return restorer_from_parts(parts, config).to(device=device, dtype=dtype).eval()


def load_osediff(
    sd: str | Path,
    pkl: str | Path,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    configs: dict[str, dict[str, Any]] | None = None,
) -> OneStepRestorer:
    """OSEDiff for inference: SD 2.1-base (`load_sd21_restorer`: ldm file or folder) with the
    `.pkl`'s LoRA and conv_in applied and merged, in `dtype` (default float32).

    The pkl is read first, so a wrong file fails before gigabytes of SD are paged in; the merge
    runs in float32, as OSEDiff's fp32 weights were trained, whatever `dtype` the result takes.
    """
    ckpt = read_osediff_pkl(pkl)
    restorer = load_sd21_restorer(sd, cache_dir=cache_dir, dtype=torch.float32, configs=configs)
    apply_osediff_checkpoint(restorer, ckpt, pkl)
    restorer.merge_lora()
    return restorer.to(device=device, dtype=dtype or torch.float32).eval()


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
    return apply_osediff_checkpoint(restorer, read_osediff_pkl(pkl_path), pkl_path)


def apply_osediff_checkpoint(restorer: OneStepRestorer, ckpt: dict[str, Any], source: str | Path = "<memory>") -> OneStepRestorer:
    """`load_osediff_checkpoint` of an already read checkpoint dict (`read_osediff_pkl`); the
    tensors may be on the meta device, which checks a layout without any weights."""
    rank_unet = _first_key(ckpt, ("rank_unet", "lora_rank_unet", "lora_rank"), source)
    for list_key, adapter in OSEDIFF_UNET_ADAPTERS.items():
        _add_osediff_adapter(restorer, "unet", adapter, int(rank_unet), ckpt[list_key], source)
    if "unet.conv_in" not in restorer.full_trained_modules:
        restorer.full_trained_modules.append("unet.conv_in")
    _copy_osediff_weights(restorer.unet, ckpt["state_dict_unet"], ("lora", "conv_in"), source, "UNet")

    list_key, adapter = OSEDIFF_VAE_ADAPTER
    if list_key in ckpt and "state_dict_vae" in ckpt:
        rank_vae = _first_key(ckpt, ("rank_vae", "lora_rank_vae", "lora_rank"), source)
        _add_osediff_adapter(restorer, "vae", adapter, int(rank_vae), ckpt[list_key], source)
        _copy_osediff_weights(restorer.vae, ckpt["state_dict_vae"], ("lora",), source, "VAE")
    return restorer


def _add_osediff_adapter(restorer: OneStepRestorer, part: str, adapter: str, rank: int, modules: list[str], source: str | Path) -> None:
    try:
        restorer._add_adapter(part, adapter, rank, OSEDIFF_LORA_ALPHA, _targets(modules))
    except ValueError as exc:  # peft: target modules not found -> wrong base model
        first = str(exc).splitlines()[0][:200]
        raise OSEDiffCheckpointError(OSEDIFF_SLOT, source, f"cannot apply {part} adapter {adapter!r} to this model: {first}") from None


def read_osediff_pkl(path: str | Path) -> dict[str, Any]:
    """The dict of an OSEDiff `.pkl`, read safely (`checkpoints.load_file`, weights_only).

    Any other file (an SD checkpoint, a ControlNet, ...) given for the `osediff` slot, a truncated
    one or one without OSEDiff's keys is refused with one line naming the slot, the file and what
    the file looks like instead.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{OSEDIFF_SLOT}: {path}: OSEDiff checkpoint not found")
    obj = load_file(path, OSEDIFF_SLOT)
    found = describe_layout(unwrap_state_dict(obj)) if isinstance(obj, dict) else f"a {type(obj).__name__}, not a dict"
    if not isinstance(obj, dict) or not found.startswith(OSEDIFF_LAYOUT):
        raise OSEDiffCheckpointError(OSEDIFF_SLOT, path, f"expected {OSEDIFF_LAYOUT}, but this looks like {found}")
    missing = [k for k in ("state_dict_unet", *OSEDIFF_UNET_ADAPTERS) if k not in obj]
    if missing:
        raise OSEDiffCheckpointError(OSEDIFF_SLOT, path, f"an OSEDiff checkpoint with missing keys {', '.join(missing)} (a damaged file?)")
    lists = [k for k in (*OSEDIFF_UNET_ADAPTERS, OSEDIFF_VAE_ADAPTER[0]) if k in obj]
    bad = [k for k in lists if not isinstance(obj[k], list)] + [
        k for k in ("state_dict_unet", "state_dict_vae") if k in obj and not isinstance(obj[k], dict)
    ]
    if bad:
        raise OSEDiffCheckpointError(OSEDIFF_SLOT, path, f"entries of the wrong type: {', '.join(bad)}")
    return obj


def _first_key(ckpt: dict[str, Any], keys: tuple[str, ...], source: str | Path) -> Any:
    for k in keys:
        if k in ckpt:
            return ckpt[k]
    raise OSEDiffCheckpointError(OSEDIFF_SLOT, source, f"no LoRA rank in the checkpoint (looked for {', '.join(keys)})")


def _targets(names: list[str]) -> list[str]:
    """OSEDiff's module lists contain duplicates (one entry per matching grep pattern); dedupe, keep order."""
    return list(dict.fromkeys(names))


_ADAPTER_SEGMENT = re.compile(r"\.(lora_[AB])\.[^.]+\.")


def _candidate_keys(name: str) -> list[str]:
    """Checkpoint spellings of one of our parameter names: exact, unwrapped base weight, adapter-less LoRA."""
    return [name, name.replace(".base_layer.", "."), _ADAPTER_SEGMENT.sub(r".\1.", name)]


def _copy_osediff_weights(module: torch.nn.Module, state: dict[str, Tensor], grep: tuple[str, ...], source: str | Path, part: str) -> None:
    """Copy every param whose name contains a `grep` word from `state`, as OSEDiff's load_ckpt does.

    Every such param must be in the checkpoint and every checkpoint tensor must land on one: a
    tensor with no place means the adapters were added to another architecture."""
    used: set[str] = set()
    missing = []
    with torch.no_grad():
        for name, param in module.named_parameters():
            if not any(g in name for g in grep):
                continue
            key = next((k for k in _candidate_keys(name) if k in state), None)
            if key is None:
                missing.append(name)
                continue
            if state[key].shape != param.shape:
                raise OSEDiffCheckpointError(
                    OSEDIFF_SLOT,
                    source,
                    f"{part} {key} has shape {tuple(state[key].shape)}, the model {tuple(param.shape)} (another base model?)",
                )
            param.copy_(state[key].to(param.dtype))
            used.add(key)
    if missing:
        raise OSEDiffCheckpointError(
            OSEDIFF_SLOT, source, f"{len(missing)} {part} weights missing from the checkpoint (e.g. {missing[0]}); wrong base model?"
        )
    unused = [k for k in state if k not in used]
    if unused:
        raise OSEDiffCheckpointError(
            OSEDIFF_SLOT, source, f"{len(unused)} {part} tensors have no place in this model (e.g. {unused[0]}); wrong base model?"
        )
    if not used:
        raise OSEDiffCheckpointError(OSEDIFF_SLOT, source, f"no {part} weights copied")
