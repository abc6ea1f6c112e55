"""Faces: detection with five landmarks, FFHQ alignment to square crops, seamless paste-back.

The names below load their module on first use, so importing a light module of the package
(`faces.tracking`, whose default `restore --detect-every` is) does not import OpenCV and the
detectors.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "FFHQ_TEMPLATE_512": "align",
    "estimate_affine": "align",
    "face_template": "align",
    "paste_faces": "align",
    "scale_affine": "align",
    "warp_faces": "align",
    "build_detector": "detector",
    "Detector": "face",
    "DetectorUnavailable": "face",
    "Face": "face",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
