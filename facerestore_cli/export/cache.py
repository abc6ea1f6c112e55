"""Where `restore --backend onnx|tensorrt` keeps the engines it makes on demand.

$FACERESTORE_CACHE, else $XDG_CACHE_HOME/facerestore, else ~/.cache/facerestore; engines go in
its engines/ folder, named by what they depend on so a changed model never hits a stale one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("FACERESTORE_CACHE"):
        return Path(os.environ["FACERESTORE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "facerestore"


def engine_cache_path(fingerprint: str, face_size: int, steps: int, precision: str, suffix: str, *extra: str) -> Path:
    """e.g. engines/3f2a...-512px-1step-fp32.onnx; `extra` adds GPU / TensorRT version / batch parts."""
    parts = [fingerprint, f"{face_size}px", f"{steps}step", precision, *(_slug(e) for e in extra)]
    return cache_root() / "engines" / ("-".join(parts) + suffix)


def _slug(text: str) -> str:
    """A file-name-safe form of a GPU name or version ("NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3")."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")
