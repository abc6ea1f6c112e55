"""What `restore` is asked to do, parsed and checked before any model is loaded.

Settings travel as keyword-only dataclasses, one per concern: which model runs and how
(`ModelChoice`), how faces are found (`DetectionSettings`), how found faces are restored
(`FaceSettings`) and what is written (`RestoreOptions`). `check_before_loading` is what can be
told of a run before the model stack is imported: options, then paths, then the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facerestore_cli.devices import check_device
from facerestore_cli.errors import InputError
from facerestore_cli.faces.tracking import DEFAULT_DETECT_EVERY
from facerestore_cli.models.color_spec import AUTO_COLOR_FIX
from facerestore_cli.models.locate import locate_model

#: `--frame-path`: where whole frames are warped, restored and pasted back (frames.py).
FRAME_PATHS = ("auto", "tensor", "numpy")


def _auto_or_int(value: str | int, minimum: int, what: str) -> str | int:
    """ "auto", or a whole number of at least `minimum`; else a ValueError asking for `what`."""
    if value == "auto":
        return value
    if not str(value).isdigit() or int(value) < minimum:
        raise InputError(f"{value!r}: give auto or {what}")
    return int(value)


def parse_face_size(value: str | int) -> str | int:
    """`--face-size` as given: "auto" or a whole number of pixels (>= 16); ValueError otherwise.
    Whether the number suits the model is checked once it is loaded (`face_sizes_for`)."""
    return _auto_or_int(value, 16, "a crop size in pixels of at least 16, e.g. 512")


def parse_batch_size(value: str | int) -> str | int:
    """`--batch-size` as given: "auto" or a whole number of faces (>= 1); ValueError otherwise."""
    return _auto_or_int(value, 1, "a whole number of faces, at least 1")


@dataclass(frozen=True, kw_only=True)
class ModelChoice:
    """Which restorer runs and how: `--model` (None: the bundled one), `--lora`, `--osediff`,
    `--backend`, `--engine` (an exported ONNX/TensorRT file), `--precision`, `--compile`, and a
    multi-step model's sampling (`--steps`, `--sampler`, `--eta`, `--seed`)."""

    model: str | Path | None = None
    lora: Path | None = None
    osediff: Path | None = None
    backend: str = "torch"
    engine_file: Path | None = None
    precision: str = "fp32"
    compile: bool = False
    #: --steps, --sampler, --eta, --seed given for a multi-step model (the rest: its paper's).
    sampling: Mapping[str, Any] = field(default_factory=dict)

    def check_options(self) -> None:
        """The options that do not go together whatever the model is: an InputError saying why."""
        if self.backend == "torch":
            if self.engine_file is not None:
                raise InputError("--engine needs --backend onnx or tensorrt")
            return
        if self.sampling:
            raise InputError(f"--{next(iter(self.sampling))} is for multi-step models, which run with --backend torch")
        if self.compile:
            raise InputError(f"--compile is for --backend torch; --backend {self.backend} is compiled already")


def check_before_loading(choice: ModelChoice, device: str) -> None:
    """What can be told of a run before any model loads, in this order: the options
    (`ModelChoice.check_options`), the paths (the files `--model` names, `locate_model`), then
    the device (`check_device`, the only step that may import torch: for a CUDA device, or fp16
    with auto). The first problem is a FacerestoreError; the rest (a model file's contents, the
    detector) shows when the model is loaded, for the first file that needs it."""
    choice.check_options()
    locate_model(choice.model)
    check_device(device, choice.precision)


@dataclass(frozen=True, kw_only=True)
class DetectionSettings:
    """How faces are found: `--detector`, `--det-threshold`, `--min-face-size`."""

    detector: str = "mtcnn"
    threshold: float = 0.7
    min_face_size: int = 20


@dataclass(frozen=True, kw_only=True)
class FaceSettings:
    """How found faces are restored: `--batch-size`, `--color-fix`, `--frame-path`, `--face-size`."""

    batch_size: int | str = "auto"
    color_fix: str = AUTO_COLOR_FIX
    frame_path: str = "auto"
    face_size: str | int = "auto"


@dataclass
class RestoreOptions:
    """What is written for each input, and how inputs are walked."""

    outdir: Path
    upscale: float = 1.0
    only_center_face: bool = False
    aligned: bool = False
    save_faces: bool = False
    compare: bool = False
    skip_existing: bool = False
    video_chunk: int = 8
    detect_every: int = DEFAULT_DETECT_EVERY
