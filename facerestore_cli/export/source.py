"""Which model an engine is made from: folder + optional LoRA / OSEDiff checkpoint, and its fingerprint.

The fingerprint hashes file *contents*, not the architecture: two tiny models with different
weights must not share a cached engine. Hashing is cheap next to loading (sha256 runs at
~1-2 GB/s), and it lets `restore` reuse an engine without building the torch model at all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from facerestore_cli.errors import InputError, MissingFileError
from facerestore_cli.models.configs import get_config
from facerestore_cli.models.lora import read_lora_metadata
from facerestore_cli.models.model_file import resolve_model_value
from facerestore_cli.models.restorer import CONFIG_FILE, OneStepRestorer

#: Sub-folders that hold weights/configs the restorer loads (an SD folder's text encoder only
#: shapes the prompt, which a restorer folder stores as prompt_embeds.safetensors at the root).
_PARTS = ("vae", "unet", "scheduler")
_SKIP_SUFFIXES = (".md", ".txt")


@dataclass
class ModelSource:
    """A restorer as `restore` is told to load it."""

    model: Path
    lora: Path | None = None
    osediff: Path | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if resolve_model_value(self.model) is not None:
            raise InputError(
                f"{self.model} is a published model: exported engines are made from restorer folders (and SD 2.1 folders with"
                " --osediff) for now; run it with --backend torch"
            )

    def fingerprint(self) -> str:
        """16 hex digits over the model folder's files and the LoRA/OSEDiff files (computed once)."""
        if self._fingerprint is None:
            if not self.model.is_dir():
                raise MissingFileError(f"model folder not found: {self.model}")
            h = hashlib.sha256()
            for f in _model_files(self.model):
                h.update(f.relative_to(self.model).as_posix().encode() + b"\0" + _digest(f))
            for tag, extra in (("lora", self.lora), ("osediff", self.osediff)):
                if extra is not None:
                    h.update(tag.encode() + b"\0" + _digest(extra))
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def face_size(self) -> int:
        """The model's own face size, read from its config (an SD folder restores at sd21's 512)."""
        cfg = self._folder_config()
        return int(cfg.get("face_size", get_config("sd21").face_size))

    def sampling_steps(self) -> int:
        """UNet calls per face as `load_restorer` will set them: a LoRA's own steps win over the folder's."""
        if self.lora is not None:
            steps = read_lora_metadata(self.lora).get("sampling_steps")
            if steps is not None:
                return int(steps)
        return int(self._folder_config().get("sampling_steps", 1))

    def load(self, device: torch.device, dtype: torch.dtype) -> OneStepRestorer:
        """The torch restorer, LoRA/OSEDiff merged (the same loader `restore --backend torch` uses)."""
        from facerestore_cli.models.loading import load_restorer

        return load_restorer(self.model, self.lora, device, dtype, self.osediff)

    def describe(self) -> dict[str, str | None]:
        """Paths for the sidecar (informational: the fingerprint is what is checked)."""
        return {k: None if p is None else str(p) for k, p in (("model", self.model), ("lora", self.lora), ("osediff", self.osediff))}

    def _folder_config(self) -> dict:
        path = self.model / CONFIG_FILE
        return json.loads(path.read_text()) if path.is_file() else {}


def _model_files(root: Path) -> list[Path]:
    """Root-level files (configs, prompt) and everything under vae/, unet/, scheduler/, sorted."""
    files = [p for p in root.iterdir() if p.is_file()]
    for part in _PARTS:
        if (root / part).is_dir():
            files += [p for p in (root / part).rglob("*") if p.is_file()]
    return sorted(p for p in files if not p.name.startswith(".") and p.suffix.lower() not in _SKIP_SUFFIXES)


def _digest(path: Path) -> bytes:
    if not path.is_file():
        raise MissingFileError(f"file not found: {path}")
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()
