"""Stable Diffusion 2.1-base parts for DiffBIR: UNet, VAE and the empty-prompt context.

DiffBIR, DiffusionReward and LRPO all load the ldm single file `v2-1_512-ema-pruned.ckpt`
(upstream/SPEC.md §2.3). Its three prefixes go through diffusers' own converters
(`diffusers.loaders.single_file_utils`), which map the full-size layout with nothing missing or
extra (shared/FACTS.md), into models built from the configs shipped in `sd21_config/`, so no
hub id is ever resolved. Models are built on the meta device and loaded with `assign=True`: the
(memory-mapped) checkpoint tensors become the parameters, with no second copy in memory.

The prompt is always "" at cfg 1.0 (SPEC §2.6, §3.4, §4.3), so the text tower runs once per
checkpoint: its [1, 77, 1024] output is cached in memory (keyed by the file's path, size and
mtime) and, when the caller gives a cache folder, in a safetensors file there, so a later run
never pages the 1.4 GB text tower in from the checkpoint at all.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from facerestore_cli.errors import FacerestoreError, InputError, MissingFileError
from facerestore_cli.models.checkpoints import CheckpointError, check_keys, load_state_dict

__all__ = [
    "CONFIG_DIR",
    "LDM_CLIP_PREFIX",
    "LDM_UNET_PREFIX",
    "LDM_VAE_PREFIX",
    "SD21Parts",
    "build_scheduler",
    "cast_module",
    "empty_prompt_ids",
    "encode_empty_prompt",
    "load_sd21",
    "load_sd21_folder_parts",
    "load_sd21_ldm",
    "sd21_configs",
]

CONFIG_DIR = Path(__file__).with_name("sd21_config")
CONFIG_PARTS = ("unet", "vae", "text_encoder", "scheduler")
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.model."
PROMPT_FILE = "prompt_embeds.safetensors"
SD_LAYOUT = "a Stable Diffusion ldm checkpoint"

#: (resolved path, size, mtime_ns) -> the empty-prompt context, for the life of the process.
_PROMPT_CACHE: dict[tuple[str, int, int], Tensor] = {}


@lru_cache(maxsize=1)
def _shipped_configs() -> dict[str, dict[str, Any]]:
    out = {}
    for part in CONFIG_PARTS:
        data = json.loads((CONFIG_DIR / f"{part}.json").read_text(encoding="utf-8"))
        out[part] = {k: v for k, v in data.items() if not k.startswith("_")}
    return out


def sd21_configs() -> dict[str, dict[str, Any]]:
    """A fresh copy of the shipped SD 2.1-base configs: {"unet", "vae", "text_encoder", "scheduler"}."""
    return copy.deepcopy(_shipped_configs())


def _kwargs_for(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    """The config entries `cls.__init__` takes (the scheduler JSON serves two scheduler classes)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in params}


def build_scheduler(kind: str, config: Mapping[str, Any] | None = None, **overrides: Any) -> Any:
    """A fresh diffusers scheduler ("ddim" or "ddpm") on the SD 2.1 schedule (or `config`)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    if kind not in classes:
        raise InputError(f"scheduler must be one of {', '.join(classes)}, not {kind!r}")
    base = dict(sd21_configs()["scheduler"] if config is None else config)
    base.update(overrides)
    return classes[kind](**_kwargs_for(classes[kind], base))


@dataclass
class SD21Parts:
    """What DiffBIR takes from Stable Diffusion: the VAE, the UNet and the "" context [1, 77, D]."""

    vae: nn.Module
    unet: nn.Module
    prompt_embeds: Tensor
    scheduler_config: dict[str, Any]


# ------------------------------------------------------------------------------ helpers
def _on_meta(cls: type, kwargs: Mapping[str, Any]) -> nn.Module:
    with torch.device("meta"):
        return cls(**kwargs)


def _load_assigned(model: nn.Module, state: dict[str, Tensor], slot: str, path: str | Path, what: str) -> None:
    """Strict load of converted tensors into a meta-built model; problems are one CheckpointError
    line naming the slot and the part (`sd (UNet): FILE: 3 tensors missing, e.g. ...`)."""
    label = f"{slot} ({what})"
    state = {k: v for k, v in state.items() if v is not None}  # the converters .get() absent keys as None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(state, expected, label, path)
    extra = [k for k in state if k not in expected]
    if extra:
        raise CheckpointError(
            label, path, f"{len(extra)} unexpected tensors, e.g. {', '.join(extra[:3])} (a model of another configuration)"
        )
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(label, path, f"cannot load: {str(err).splitlines()[0]}") from None
    _materialize_position_ids(model)


def _materialize_position_ids(model: nn.Module) -> None:
    """Non-persistent buffers are not in a state dict, so `assign` leaves them on meta; the only
    one these models have is CLIP's `position_ids` (0..T-1)."""
    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise FacerestoreError(f"internal: buffer {name} was not loaded")
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)


def cast_module(module: nn.Module, device: torch.device | str | None, dtype: torch.dtype | None) -> nn.Module:
    """`module.to(device, dtype)` as plain torch does it: diffusers' `ModelMixin.to` warns about
    float32-kept modules on every dtype cast, and these models keep none."""
    return nn.Module.to(module, device=device, dtype=dtype)


def _part(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------ UNet and VAE
def convert_unet(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """`model.diffusion_model.*` ldm tensors -> diffusers UNet2DConditionModel names."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(_part(state, LDM_UNET_PREFIX), dict(config))


def convert_vae(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """`first_stage_model.*` ldm tensors -> diffusers AutoencoderKL names (1x1 attention convs become Linear)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(_part(state, LDM_VAE_PREFIX), dict(config))


def convert_clip(state: Mapping[str, Tensor], layers: int) -> dict[str, Tensor]:
    """`cond_stage_model.model.*` OpenCLIP text tensors -> a `layers`-deep transformers CLIPTextModel.

    Blocks from `layers` on are dropped here (SD 2 uses the penultimate layer; diffusers' own
    ignore list names only block 23, so this also serves shrunk towers), as are the projection
    and logit scale, which the context never uses. diffusers names carry a `text_model.` prefix
    that transformers 5's CLIPTextModel state dict lacks: it is stripped.
    """
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    block = f"{LDM_CLIP_PREFIX}transformer.resblocks."
    kept = {}
    for k, v in _part(state, LDM_CLIP_PREFIX).items():
        if k.startswith(block) and int(k[len(block) :].split(".")[0]) >= layers:
            continue
        if k[len(LDM_CLIP_PREFIX) :] in ("text_projection", "logit_scale"):
            continue
        kept[k] = v
    emb = kept.get(f"{LDM_CLIP_PREFIX}token_embedding.weight")
    # the converter reads the q/k/v split width from the model config when there is no projection
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=int(emb.shape[1]) if emb is not None else 1024))
    out = convert_open_clip_checkpoint(model, kept, prefix=LDM_CLIP_PREFIX)
    return {k.removeprefix("text_model."): v for k, v in out.items()}


def _build_unet_vae(state: Mapping[str, Tensor], configs: Mapping[str, Any], path: Path, slot: str) -> tuple[nn.Module, nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = _on_meta(UNet2DConditionModel, configs["unet"])
    _load_assigned(unet, convert_unet(state, configs["unet"]), slot, path, "UNet")
    vae = _on_meta(AutoencoderKL, configs["vae"])
    _load_assigned(vae, convert_vae(state, configs["vae"]), slot, path, "VAE")
    return unet, vae


# ------------------------------------------------------------------------------ the empty prompt
def empty_prompt_ids(length: int = 77) -> Tensor:
    """OpenCLIP's tokens of "": start, end, then id 0 padding (SPEC §0), as [1, length] int64.

    open_clip ships its BPE vocabulary, so this works offline; the SD 2 diffusers tokenizer
    files do not ship anywhere reachable (FACTS.md)."""
    try:
        import open_clip
    except ImportError:
        raise FacerestoreError(
            "encoding the empty prompt needs open_clip: install the `clip` extra (pip install 'facerestore[clip]')"
        ) from None
    return open_clip.tokenize([""], context_length=length).long()


@torch.no_grad()
def _run_text_model(model: nn.Module, length: int) -> Tensor:
    model = model.float().eval()
    return model(input_ids=empty_prompt_ids(length)).last_hidden_state.float().cpu().contiguous()


def encode_empty_prompt(
    state: Mapping[str, Tensor], text_config: Mapping[str, Any], path: str | Path = "<memory>", slot: str = "sd"
) -> Tensor:
    """The [1, 77, D] context of "" from the OpenCLIP text tower inside an ldm state dict."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(**text_config)
    model = _on_meta(CLIPTextModel, {"config": cfg})
    _load_assigned(model, convert_clip(state, int(cfg.num_hidden_layers)), slot, path, "text encoder")
    return _run_text_model(model, int(cfg.max_position_embeddings))


def _cache_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _cache_file(cache_dir: Path, key: tuple[str, int, int]) -> Path:
    digest = hashlib.sha1(repr(key).encode()).hexdigest()[:16]
    return cache_dir / f"sd21_empty_prompt_{digest}.safetensors"


def cached_empty_prompt(
    path: Path, state: Mapping[str, Tensor], text_config: Mapping[str, Any], cache_dir: Path | None, slot: str
) -> Tensor:
    """`encode_empty_prompt` of the checkpoint at `path`, from the memory or folder cache when there."""
    from safetensors.torch import load_file, save_file

    key = _cache_key(path)
    if key in _PROMPT_CACHE:
        return _PROMPT_CACHE[key].clone()
    file = _cache_file(cache_dir, key) if cache_dir is not None else None
    embeds = None
    if file is not None and file.is_file():
        try:
            embeds = load_file(str(file))["prompt_embeds"].float()
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed, not fatal
            embeds = None
    if embeds is None:
        embeds = encode_empty_prompt(state, text_config, path, slot)
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(f".tmp{os.getpid()}")
            save_file({"prompt_embeds": embeds}, str(tmp), metadata={"checkpoint": key[0], "prompt": ""})
            os.replace(tmp, file)
    _PROMPT_CACHE[key] = embeds
    return embeds.clone()


# ------------------------------------------------------------------------------ loaders
def load_sd21_ldm(
    path: str | Path,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    cache_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    slot: str = "sd",
) -> SD21Parts:
    """VAE, UNet and "" context from the ldm single file (`{"state_dict": {...}}`, SPEC §2.3).

    `configs` replaces the shipped ones (tests pass shrunk ones); `dtype` None keeps the file's.
    A file of another kind, a truncated one or one of another size is one CheckpointError line.
    """
    path = Path(path)
    cfgs = {**sd21_configs(), **copy.deepcopy(dict(configs or {}))}
    state = load_state_dict(path, slot, SD_LAYOUT)
    if not any(k.startswith(LDM_CLIP_PREFIX) for k in state):
        raise CheckpointError(slot, path, f"no OpenCLIP text tower ({LDM_CLIP_PREFIX}*): not an SD 2.x checkpoint")
    unet, vae = _build_unet_vae(state, cfgs, path, slot)
    embeds = cached_empty_prompt(path, state, cfgs["text_encoder"], Path(cache_dir) if cache_dir else None, slot)
    del state
    return _finish(vae, unet, embeds, cfgs["scheduler"], device, dtype)


def _finish(
    vae: nn.Module, unet: nn.Module, embeds: Tensor, sched: Mapping[str, Any], device: torch.device | str, dtype: torch.dtype | None
) -> SD21Parts:
    cross = int(unet.config.cross_attention_dim)
    if embeds.shape[-1] != cross:
        raise InputError(f"prompt embeddings have width {embeds.shape[-1]}, the UNet's cross-attention takes {cross}")
    dtype = dtype or next(unet.parameters()).dtype
    vae = cast_module(vae, device, dtype).eval().requires_grad_(False)
    unet = cast_module(unet, device, dtype).eval().requires_grad_(False)
    return SD21Parts(vae=vae, unet=unet, prompt_embeds=embeds.float(), scheduler_config=dict(sched))


def load_sd21_folder_parts(
    root: str | Path,
    prompt_embeds: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> SD21Parts:
    """The same parts from a local diffusers SD 2.1-base folder: `vae/`, `unet/`, and the "" context
    from `prompt_embeds` (a safetensors file with `prompt_embeds`), `<root>/prompt_embeds.safetensors`
    or `text_encoder/` (run on OpenCLIP's ids of "", which are what SD 2's tokenizer gives)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = Path(root)
    missing = [p for p in ("vae/config.json", "unet/config.json") if not (root / p).is_file()]
    if missing:
        raise MissingFileError(f"{root} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}")
    vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True)
    file = Path(prompt_embeds) if prompt_embeds else root / PROMPT_FILE
    if file.is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(file))
        embeds = tensors.get("prompt_embeds", next(iter(tensors.values())) if len(tensors) == 1 else None)
        if embeds is None:
            raise InputError(f"{file}: expected a 'prompt_embeds' tensor, found {sorted(tensors)}")
        embeds = embeds if embeds.dim() == 3 else embeds[None]
    elif prompt_embeds:
        raise MissingFileError(f"prompt embeddings file not found: {file}")
    elif (root / "text_encoder" / "config.json").is_file():
        from transformers import CLIPTextModel

        text = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True)
        embeds = _run_text_model(text, int(text.config.max_position_embeddings))
        del text
    else:
        raise MissingFileError(f"{root}: no text_encoder/ and no {PROMPT_FILE}: the empty prompt cannot be encoded")
    sched_file = root / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text(encoding="utf-8")) if sched_file.is_file() else sd21_configs()["scheduler"]
    sched = {k: v for k, v in sched.items() if not k.startswith("_")}
    return _finish(vae, unet, embeds, sched, device, dtype)


def load_sd21(
    path: str | Path,
    cache_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> SD21Parts:
    """SD 2.1-base parts from the ldm file or a diffusers folder, whichever `path` is."""
    path = Path(path)
    if path.is_dir():
        return load_sd21_folder_parts(path, device=device, dtype=dtype)
    return load_sd21_ldm(path, configs=configs, cache_dir=cache_dir, device=device, dtype=dtype)
