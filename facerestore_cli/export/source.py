"""Which model an engine is made from, and its fingerprint.

A source is a restorer folder (or an SD 2.1 folder with an OSEDiff .pkl), or a published
one-step model: an `osediff` model file (`*.toml`) or the store name of one. Multi-step
ControlNet models (diffbir-v1) are not exported: their sampler loop is not one fixed graph.

The fingerprint hashes file *contents*, not the architecture: two tiny models with different
weights must not share a cached engine. Hashing is cheap next to loading (sha256 runs at
~1-2 GB/s), and it lets `restore` reuse an engine without building the torch model at all.
A model file's recorded sha256 (`[files.SLOT]`) stands in for hashing its 5 GB SD checkpoint
when the file still has the recorded size; it is the same digest, so the fingerprint does not
depend on whether the record is there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from facerestore_cli.errors import InputError, MissingFileError
from facerestore_cli.models.configs import get_config
from facerestore_cli.models.lora import read_lora_metadata
from facerestore_cli.models.model_file import FileRecord, ModelFile, resolve_model_value
from facerestore_cli.models.published import not_installed_hint
from facerestore_cli.models.restorer import CONFIG_FILE, OneStepRestorer

#: Sub-folders that hold weights/configs the restorer loads (an SD folder's text encoder only
#: shapes the prompt, which a restorer folder stores as prompt_embeds.safetensors at the root).
_PARTS = ("vae", "unet", "scheduler")
_SKIP_SUFFIXES = (".md", ".txt")
#: The model file kinds an engine can be made from: one UNet call per face, one fixed graph.
EXPORTABLE_KINDS = ("osediff",)


@dataclass
class ModelSource:
    """A restorer as `restore` is told to load it."""

    model: Path
    lora: Path | None = None
    osediff: Path | None = None
    _fingerprint: str | None = field(default=None, repr=False)
    #: The model file `model` names (None for a folder).
    _spec: ModelFile | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._spec = _exportable_model_file(self.model, self.osediff)

    @property
    def model_file(self) -> ModelFile | None:
        """The published model file this source is, or None for a restorer / SD folder."""
        return self._spec

    def fingerprint(self) -> str:
        """16 hex digits over the model's files and the LoRA/OSEDiff files (computed once)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            if self._spec is not None:
                _hash_model_file(h, self._spec)
            else:
                if not self.model.is_dir():
                    raise MissingFileError(not_installed_hint(str(self.model)) or f"model folder not found: {self.model}")
                _hash_folder(h, self.model)
            for tag, extra in (("lora", self.lora), ("osediff", self.osediff)):
                if extra is not None:
                    h.update(tag.encode() + b"\0" + _digest(extra))
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def face_size(self) -> int:
        """The model's own face size, read from its config (SD folders and osediff model files
        restore at sd21's 512)."""
        if self._spec is not None:
            return get_config("sd21").face_size
        cfg = self._folder_config()
        return int(cfg.get("face_size", get_config("sd21").face_size))

    def sampling_steps(self) -> int:
        """UNet calls per face as `load_restorer` will set them: a LoRA's own steps win over the model's."""
        if self.lora is not None:
            steps = read_lora_metadata(self.lora).get("sampling_steps")
            if steps is not None:
                return int(steps)
        if self._spec is not None:
            return 1  # OSEDiff is one step by construction
        return int(self._folder_config().get("sampling_steps", 1))

    def load(self, device: torch.device, dtype: torch.dtype) -> OneStepRestorer:
        """The torch restorer, LoRA/OSEDiff merged (the same loader `restore --backend torch` uses)."""
        from facerestore_cli.models.loading import load_restorer

        restorer = load_restorer(self.model, self.lora, device, dtype, self.osediff)
        if not isinstance(restorer, OneStepRestorer):  # __post_init__ refuses these; a guard for new kinds
            raise InputError(f"{self.model} is a multi-step model: only one-step models are exported")
        return restorer

    def describe(self) -> dict[str, str | None]:
        """Paths for the sidecar (informational: the fingerprint is what is checked)."""
        spec = self._spec
        model = spec.path if spec is not None and spec.path is not None else self.model
        out = {k: None if p is None else str(p) for k, p in (("model", model), ("lora", self.lora), ("osediff", self.osediff))}
        if spec is not None:
            out["model_kind"] = spec.kind
            out |= {f"{slot}_file": str(p) for slot, p in spec.slot_paths().items()}
        return out

    def _folder_config(self) -> dict:
        path = self.model / CONFIG_FILE
        return json.loads(path.read_text()) if path.is_file() else {}


def _exportable_model_file(model: Path, osediff: Path | None) -> ModelFile | None:
    """The model file `model` names when it is one an engine can be made from; None for a
    folder; a one-line InputError for a model file that cannot be exported."""
    spec = resolve_model_value(model)
    if spec is None:
        return None
    where = spec.path or model
    if spec.kind == "frm":
        raise InputError(f"{where} is a Face Reward Model, not a restorer: there is nothing to export or run as an engine")
    if spec.kind not in EXPORTABLE_KINDS:
        raise InputError(
            f"{where} is a published model of kind {spec.kind}, a multi-step ControlNet model: those are not exported"
            f" (only one-step {', '.join(EXPORTABLE_KINDS)} model files are); run it with --backend torch"
        )
    if osediff is not None:
        raise InputError(f"--osediff goes with a diffusers SD 2.1 folder; {where} names its files itself")
    return spec


def _hash_model_file(h: Any, spec: ModelFile) -> None:
    """The kind and each slot's contents; the file's own path and [meta] do not count."""
    h.update(b"model-file\0" + spec.kind.encode() + b"\0")
    for slot, path in spec.slot_paths().items():
        h.update(slot.encode() + b"\0")
        if path.is_dir():  # a diffusers SD 2.1 folder: no record, hashed as a folder is
            _hash_folder(h, path)
        else:
            h.update(_recorded_digest(path, spec.files.get(slot)) or _digest(path))
        h.update(b"\0")


def _recorded_digest(path: Path, record: FileRecord | None) -> bytes | None:
    """The sha256 recorded at import, when the file still has the recorded size: the same cheap
    check `facerestore models import` uses to keep a record, and it catches a replaced file."""
    if record is None or record.sha256 is None:
        return None
    if record.size is not None and path.stat().st_size != record.size:
        return None
    return bytes.fromhex(record.sha256)


def _hash_folder(h: Any, root: Path) -> None:
    for f in _model_files(root):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + _digest(f))


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
