"""The one place that turns a `--model` value into a restorer.

A `--model` is the bundled default (None), a restorer folder (`save_pretrained`), or a Stable
Diffusion 2.1-base diffusers folder, optionally with upstream OSEDiff LoRA weights; a LoRA from
`refl`/`lrpo` may be merged on top. `restore`, `eval`, `export`, `frm-pairs` and the training
commands all load through here, so a value means the same to every command.
"""

from __future__ import annotations

from pathlib import Path

import torch

from facerestore_cli.errors import MissingFileError
from facerestore_cli.models.restorer import CONFIG_FILE, OneStepRestorer
from facerestore_cli.models.upstream import load_osediff_checkpoint, load_sd21_folder
from facerestore_cli.paths import DEFAULT_RESTORER

DEFAULT_MODEL = DEFAULT_RESTORER


def load_model_folder(
    directory: str | Path, torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> OneStepRestorer:
    """A restorer folder, or a Stable Diffusion 2.1-base folder (vae/ + unet/, no restorer config)
    made into the one-step restorer of its parts."""
    root = Path(directory)
    if root.is_dir() and not (root / CONFIG_FILE).is_file():
        if (root / "unet").is_dir() and (root / "vae").is_dir():
            return load_sd21_folder(root, torch_dtype=torch_dtype, device=device)
        raise MissingFileError(f"{root} is not a restorer folder (no {CONFIG_FILE}, no vae/ + unet/)")
    return OneStepRestorer.from_pretrained(root, torch_dtype=torch_dtype, device=device)


def load_restorer(
    model: str | Path | None, lora: Path | None, device: torch.device, dtype: torch.dtype, osediff: Path | None = None
) -> OneStepRestorer:
    """Load the restorer (bundled default when None) and merge an optional LoRA.

    `model` is a restorer folder (`save_pretrained`), or a Stable Diffusion 2.1-base diffusers
    folder, optionally with upstream OSEDiff LoRA weights (`osediff`, their .pkl).
    """
    restorer = load_model_folder(Path(model) if model else DEFAULT_MODEL, torch_dtype=torch.float32)
    if osediff:
        load_osediff_checkpoint(restorer, osediff)
        restorer.merge_lora()
    if lora:
        restorer.load_lora(lora)
        restorer.merge_lora()
    return restorer.to(device=device, dtype=dtype).eval()


def load_model_for_training(spec: str) -> OneStepRestorer:
    """A config name starts from random weights; a folder continues from saved weights."""
    if Path(spec).is_dir():
        return load_model_folder(spec, torch_dtype=torch.float32)
    return OneStepRestorer.from_config(spec)
