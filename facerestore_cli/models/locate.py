"""What a `--model` value names, found without loading anything (and without torch), so a command
can refuse a wrong one before it imports the model stack; `loading.py` loads what it finds."""

from __future__ import annotations

from pathlib import Path

from facerestore_cli.errors import MissingFileError
from facerestore_cli.models.configs import CONFIG_FILE
from facerestore_cli.models.model_file import ModelFile, resolve_model_value
from facerestore_cli.models.published import not_installed_hint
from facerestore_cli.paths import DEFAULT_RESTORER


def locate_model(model: str | Path | None) -> ModelFile | Path:
    """The model file a `--model` value names (every file present), else the restorer folder or
    Stable Diffusion 2.1-base (diffusers folder or ldm file) it is; None is the bundled restorer.
    A one-line MissingFileError when there is nothing of the kind there."""
    spec = resolve_model_value(model) if model else None
    if spec is not None:
        return spec
    path = Path(model) if model else DEFAULT_RESTORER
    if not path.exists():
        hint = not_installed_hint(str(model)) if model else None
        raise MissingFileError(hint or f"model folder not found: {path}")
    is_sd21(path)  # a folder that is neither kind fails here
    return path


def is_sd21(root: Path) -> bool:
    """Whether an existing `--model` path is Stable Diffusion 2.1-base (the ldm single file, or a
    diffusers folder with vae/ + unet/ and no restorer config) rather than a restorer folder; a
    folder that is neither is a MissingFileError."""
    has_config = (root / CONFIG_FILE).is_file()
    if root.is_file() or (root.is_dir() and not has_config and (root / "unet").is_dir() and (root / "vae").is_dir()):
        return True
    if root.is_dir() and not has_config:
        raise MissingFileError(f"{root} is not a restorer folder (no {CONFIG_FILE}, no vae/ + unet/)")
    return False
