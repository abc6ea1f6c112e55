"""The JSON sidecar written next to every engine (`<engine>.json`), and the checks on it.

An engine is a frozen copy of one model: `restore` must refuse one made from another model,
LoRA, face size or (TensorRT) GPU rather than silently restore with the wrong weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from facerestore_cli.errors import FacerestoreError

ENGINE_FORMAT = "facerestore-engine/1"
KINDS = ("onnx", "tensorrt")


class EngineError(FacerestoreError, ValueError):
    """An engine file is missing, unreadable, or was made for something else (one-line message)."""


class BackendUnavailable(EngineError):
    """The package a backend needs (onnx, onnxruntime, tensorrt) is not installed."""


@dataclass
class EngineMeta:
    """What an engine was made from and for."""

    kind: str
    model_fingerprint: str
    architecture: str
    config_name: str
    face_size: int
    sampling_steps: int
    fp16: bool
    #: the restorer config (face_size set to the exported size), so restore needs no torch model
    config: dict[str, Any]
    versions: dict[str, str]
    source: dict[str, str | None] = field(default_factory=dict)
    opset: int | None = None
    max_batch: int | None = None
    gpu: str | None = None
    format: str = ENGINE_FORMAT


def sidecar_path(engine: Path) -> Path:
    """`model.onnx` -> `model.onnx.json` (the full name, so .onnx and .engine never collide)."""
    return engine.with_name(engine.name + ".json")


def write_meta(engine: Path, meta: EngineMeta) -> Path:
    path = sidecar_path(engine)
    path.write_text(json.dumps(asdict(meta), indent=1) + "\n")
    return path


def read_meta(engine: Path) -> EngineMeta:
    """The sidecar of `engine`; EngineError naming the file when it or the sidecar is missing or foreign."""
    if not engine.is_file():
        raise EngineError(f"engine file not found: {engine}")
    path = sidecar_path(engine)
    if not path.is_file():
        raise EngineError(f"{engine}: no {path.name} next to it; make engines with `facerestore export`")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EngineError(f"{path}: unreadable engine sidecar ({err})") from None
    if not isinstance(data, dict) or data.get("format") != ENGINE_FORMAT:
        raise EngineError(f"{path}: not a {ENGINE_FORMAT} sidecar")
    known = {f.name for f in fields(EngineMeta)}
    try:
        return EngineMeta(**{k: v for k, v in data.items() if k in known})
    except TypeError as err:
        raise EngineError(f"{path}: incomplete engine sidecar ({err})") from None


def check_meta(engine: Path, meta: EngineMeta, kind: str, fingerprint: str) -> None:
    """Refuse an engine of another kind or made from another model/LoRA (content fingerprint)."""
    if meta.kind != kind:
        raise EngineError(f"{engine} is a {meta.kind} engine, not {kind}: pick --backend {meta.kind}")
    if meta.model_fingerprint != fingerprint:
        made_from = meta.source.get("model") or "?"
        raise EngineError(  # no [brackets]: the CLI prints errors through rich markup
            f"{engine} was exported from another model (or LoRA): {made_from} (fingerprint {meta.model_fingerprint}), "
            f"not the one asked for (fingerprint {fingerprint}); give the --model/--lora it was made from, "
            "or export it again with `facerestore export`"
        )
