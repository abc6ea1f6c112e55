"""The one place that turns a `--model` value into a restorer.

A `--model` is the bundled default (None), a restorer folder (`save_pretrained`), a Stable
Diffusion 2.1-base diffusers folder (optionally with upstream OSEDiff LoRA weights), or a
published model: a model file (`*.toml`, models/model_file.py) or the name of one in the store
(`facerestore models pull/import`). A LoRA from `refl`/`lrpo` may be merged on top of a one-step
model. `restore`, `eval`, `export`, `frm-pairs` and the training commands all load through here,
so a value means the same to every command.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from facerestore_cli.errors import InputError
from facerestore_cli.models.configs import CONFIG_FILE
from facerestore_cli.models.diffbir import DEFAULT_PRESET, DiffBIRRestorer
from facerestore_cli.models.locate import is_sd21, locate_model
from facerestore_cli.models.model_file import ModelFile, resolve_model_value, store_dir
from facerestore_cli.models.restorer import OneStepRestorer
from facerestore_cli.models.upstream import load_osediff, load_osediff_checkpoint, load_sd21_restorer
from facerestore_cli.paths import DEFAULT_RESTORER

DEFAULT_MODEL = DEFAULT_RESTORER


def load_model_folder(
    directory: str | Path, torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> OneStepRestorer:
    """A restorer folder, or Stable Diffusion 2.1-base (a diffusers folder with vae/ + unet/ and
    no restorer config, or the ldm single file) made into the one-step restorer of its parts."""
    root = Path(directory)
    if is_sd21(root):
        return load_sd21_restorer(root, cache_dir=prompt_cache_dir(), device=device, dtype=torch_dtype)
    return OneStepRestorer.from_pretrained(root, torch_dtype=torch_dtype, device=device)


def load_restorer(
    model: str | Path | None,
    lora: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    osediff: Path | None = None,
    sampling: Mapping[str, Any] | None = None,
) -> OneStepRestorer | DiffBIRRestorer:
    """Load the restorer (bundled default when None) and merge an optional LoRA.

    `model` is a restorer folder (`save_pretrained`), a Stable Diffusion 2.1-base diffusers
    folder, optionally with upstream OSEDiff LoRA weights (`osediff`, their .pkl), or a published
    model (model file or store name). `sampling` (steps, sampler, eta, seed) overrides a
    multi-step model's preset; a one-step model refuses it.
    """
    found = locate_model(model)
    if isinstance(found, ModelFile):
        return _load_published(found, lora, osediff, device, dtype, dict(sampling or {}))
    if sampling:
        raise InputError(f"--{next(iter(sampling))} is for multi-step models (a diffbir-v1 model file); {found} restores in one step")
    restorer = load_model_folder(found, torch_dtype=torch.float32)
    if osediff:
        load_osediff_checkpoint(restorer, osediff)
        restorer.merge_lora()
    return _with_lora(restorer, lora).to(device=device, dtype=dtype).eval()


def _load_published(
    spec: ModelFile, lora: Path | None, osediff: Path | None, device: torch.device, dtype: torch.dtype, sampling: dict[str, Any]
) -> OneStepRestorer | DiffBIRRestorer:
    """The restorer a model file names, on `device` in `dtype`, with its paper's settings."""
    where = spec.path or spec.kind
    if osediff is not None:
        raise InputError(f"--osediff goes with a diffusers SD 2.1 folder; {where} names its files itself")
    if spec.kind == "frm":
        raise InputError(f"{where} is a Face Reward Model, not a restorer: use it with score, refl or lrpo")
    if spec.kind == "diffbir-v1":
        if lora is not None:
            raise InputError(f"--lora is for one-step models; {where} is a multi-step ControlNet model")
        return _diffbir(spec, device, dtype, sampling).eval()
    restorer = load_osediff(spec.sd, spec.osediff, cache_dir=prompt_cache_dir(), device="cpu", dtype=torch.float32)
    return _with_lora(restorer, lora).to(device=device, dtype=dtype).eval()


def _with_lora(restorer: OneStepRestorer, lora: Path | None) -> OneStepRestorer:
    """A refl/lrpo LoRA merged into a one-step restorer (in fp32, before any cast)."""
    if lora:
        restorer.load_lora(lora)
        restorer.merge_lora()
    return restorer


def prompt_cache_dir() -> Path:
    """Where the empty prompt's text embedding of an SD checkpoint is kept between runs: encoding
    it reads the 1.4 GB text tower out of the checkpoint, which need happen once."""
    return store_dir() / "prompts"


def load_tunable_diffbir(value: str | Path, sampling: Mapping[str, Any] | None = None) -> tuple[DiffBIRRestorer, ModelFile] | None:
    """The DiffBIR-kind model `value` names, in fp32 on the CPU, with its model file (for the
    tuned result's `base`); None when `value` is not one (a one-step restorer, say)."""
    spec = resolve_model_value(value)
    if spec is None or spec.kind != "diffbir-v1":
        return None
    return _diffbir(spec, sampling=sampling), spec


def _diffbir(
    spec: ModelFile, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, sampling: Mapping[str, Any] | None = None
) -> DiffBIRRestorer:
    """A diffbir-v1 model file's restorer with its paper's sampler (`preset`), `sampling` on top."""
    preset = spec.preset or DEFAULT_PRESET
    return DiffBIRRestorer.from_files(
        spec.sd,
        spec.controlnet,
        spec.swinir,
        preset=preset,
        device=device,
        dtype=dtype,
        cache_dir=prompt_cache_dir(),
        **dict(sampling or {}),
    )


def load_tunable_restorer(value: str | Path) -> OneStepRestorer:
    """A one-step base of `refl` and `lrpo`, in fp32 on the CPU, given as any `--model` value (a
    restorer folder, SD 2.1 with its OSEDiff model file, ...); DiffBIR-kind bases are
    `load_tunable_diffbir`'s, and anything else is refused in one line."""
    spec = resolve_model_value(value)
    if spec is None:
        root = Path(value)
        if root.is_file() or (root.is_dir() and not (root / CONFIG_FILE).is_file()):
            raise InputError(
                f"{value} is Stable Diffusion 2.1, not a restorer: tune an osediff model (SD 2.1 + its pkl) or a restorer folder"
            )
        return load_model_folder(value, torch_dtype=torch.float32)
    if spec.kind == "osediff":
        return load_osediff(spec.sd, spec.osediff, cache_dir=prompt_cache_dir(), device="cpu", dtype=torch.float32)
    what = "a Face Reward Model" if spec.kind == "frm" else f"a {spec.kind} model"
    raise InputError(f"{value} is {what}, not a one-step restorer (a restorer folder or an osediff model)")


def load_model_for_training(spec: str) -> OneStepRestorer:
    """A config name starts from random weights; a folder continues from saved weights."""
    if Path(spec).is_dir():
        return load_model_folder(spec, torch_dtype=torch.float32)
    return OneStepRestorer.from_config(spec)
