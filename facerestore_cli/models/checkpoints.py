"""Reading published checkpoint files safely, and telling what a file is.

Checkpoints from the internet are untrusted pickles: they are read with `weights_only=True`
(memory-mapped where the file is in torch's zip format), never with full unpickling. A file that
holds a global `weights_only` refuses is reported with that global's name instead; the upstream
layouts we load (../shared/upstream/SPEC.md) hold only tensors and plain containers.

Each loader names the slot a file was given for (`--model`'s `swinir`, `controlnet`, ...), so a
file in the wrong slot, a truncated file or a missing key is one line naming the slot, the file
and what the file looks like instead (`describe_layout`).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from facerestore_cli.errors import FacerestoreError

#: Wrappers the upstream loaders unwrap before loading (Lightning's and DiffBIR's `state_dict`).
WRAPPER_KEYS = ("state_dict",)
#: Prefixes the upstream loaders strip (DataParallel's `module.`).
STRIPPED_PREFIXES = ("module.",)

#: What a file looks like, by the key prefixes that only that layout has (first match wins).
LAYOUTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a Stable Diffusion ldm checkpoint", ("model.diffusion_model.", "first_stage_model.")),
    ("an OSEDiff checkpoint", ("state_dict_unet", "unet_lora_encoder_modules")),
    ("a SwinIR state dict", ("conv_first.", "patch_embed.")),
    ("a DiffBIR ControlNet state dict", ("zero_convs.", "middle_block_out.")),
    ("an OpenCLIP / Face Reward Model state dict", ("visual.", "token_embedding.")),
    ("an ldm UNet state dict", ("input_blocks.", "output_blocks.")),
    ("a diffusers UNet state dict", ("down_blocks.", "up_blocks.")),
)


class CheckpointError(FacerestoreError):
    """A checkpoint file that cannot be used for its slot; the message is one line."""

    def __init__(self, slot: str, path: str | Path, reason: str) -> None:
        super().__init__(f"{slot}: {path}: {reason}")


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True, memory-mapped for zip-format files (legacy files load whole)."""
    mmap = zipfile.is_zipfile(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _refused_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - only for the message; the load has failed already
        return []


def load_file(path: str | Path, slot: str) -> Any:
    """The object in a checkpoint file (a dict of tensors, or the container around one), read safely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(slot, path, "no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(slot, path, "file is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(slot, path, f"not a readable safetensors file ({type(err).__name__}: {err})") from None
    try:
        return _torch_load(path)
    except pickle.UnpicklingError as err:
        names = _refused_globals(path)
        what = (
            f"it holds objects other than tensors ({', '.join(names)})"
            if names
            else f"refused by the safe loader ({str(err).splitlines()[0]})"
        )
        raise CheckpointError(slot, path, f"{what}; it is not loaded, since that would run code from the file") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0]
        raise CheckpointError(slot, path, f"cannot read the file, truncated or not a torch checkpoint ({first})") from None


def unwrap_state_dict(obj: Any) -> dict[str, Tensor]:
    """The flat tensor dict inside a loaded file, as the upstream loaders take it: a `state_dict`
    wrapper unwrapped, a `module.` prefix stripped."""
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        return {}
    state = {str(k): v for k, v in obj.items()}
    for prefix in STRIPPED_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def describe_layout(keys: Iterable[str]) -> str:
    """What a file with these (unwrapped) keys looks like, for the error of a file in the wrong slot."""
    keys = list(keys)
    for name, prefixes in LAYOUTS:
        if any(k.startswith(p) for k in keys for p in prefixes):
            return f"{name} ({len(keys)} entries)"
    if not keys:
        return "no tensors at all"
    return f"{len(keys)} entries starting {', '.join(keys[:3])}"


def load_state_dict(path: str | Path, slot: str, layout: str) -> dict[str, Tensor]:
    """The tensors of a checkpoint meant to be `layout` (one of LAYOUTS' names, e.g. "a SwinIR
    state dict"); CheckpointError when the file is of another kind."""
    state = unwrap_state_dict(load_file(path, slot))
    found = describe_layout(state)
    if not found.startswith(layout):
        raise CheckpointError(slot, path, f"expected {layout}, but this looks like {found}")
    return state


def check_keys(state: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], slot: str, path: str | Path) -> None:
    """Every expected key present with its shape; one line naming the first few that are not."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(
            slot, path, f"{len(missing)} tensors missing, e.g. {', '.join(missing[:3])} (a different model or a damaged file)"
        )
    wrong = [f"{k} is {tuple(state[k].shape)}, expected {tuple(s)}" for k, s in expected.items() if tuple(state[k].shape) != tuple(s)]
    if wrong:
        raise CheckpointError(slot, path, f"{len(wrong)} tensors have other shapes, e.g. {wrong[0]} (a model of another size)")
