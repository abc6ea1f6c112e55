"""Frames in, restored frames out: detect, align, restore in batches, paste back.

`build_face_restorer` loads what `restore` needs once (the model, through `models.loading` or an
exported engine's backend, and the detector); `FaceRestorer` then restores the faces of any
number of frames in shared model batches, on the numpy or the tensor frame path (frames.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from facerestore_cli.devices import resolve_device, resolve_dtype
from facerestore_cli.errors import InputError
from facerestore_cli.faces.align import estimate_affine, face_extent, working_size
from facerestore_cli.faces.detector import build_detector
from facerestore_cli.faces.face import Detector, Face
from facerestore_cli.io.images import resize_image
from facerestore_cli.models.color import DEFAULT_COLOR_FIX, color_fix_for, parse_color_fix
from facerestore_cli.models.diffbir import DiffBIRRestorer
from facerestore_cli.models.inference import (
    CompiledRestorer,
    RestoreModel,
    restore_crops,
    restore_crops_tensor,
)
from facerestore_cli.models.loading import DEFAULT_MODEL, load_restorer
from facerestore_cli.models.precision import LOW_PRECISION, PrecisionGuard
from facerestore_cli.models.restorer import OneStepRestorer
from facerestore_cli.restore.frames import (
    AlignedFaces,
    FrameResult,
    resolve_frame_path,
    restore_frames_numpy,
    restore_frames_tensor,
)
from facerestore_cli.restore.options import DetectionSettings, FaceSettings, ModelChoice
from facerestore_cli.restore.shards import Shard

#: `--batch-size auto` on a GPU: the old fixed default; batch sizes have not been measured on a GPU.
AUTO_GPU_BATCH = 4


def fast_torch_model(
    restorer: OneStepRestorer | DiffBIRRestorer, compile_model: bool = False, warn: Callable[[str], None] | None = None
) -> RestoreModel:
    """The merged restorer under torch.compile if asked, and under the fp32 fallback guard when
    it runs in fp16/bf16. Weights go channels_last on the CPU (oneDNN's convolutions run the
    model 11-15 % faster that way, benchmarks/RESULTS.md) and, with --compile, on CUDA (tensor
    cores prefer it)."""
    runner: RestoreModel = restorer
    nhwc = restorer.device.type == "cpu" or compile_model
    if nhwc:
        restorer.to(memory_format=torch.channels_last)
    if compile_model:
        runner = CompiledRestorer(restorer, channels_last=nhwc, warn=warn)
    if restorer.dtype in LOW_PRECISION:
        runner = PrecisionGuard(restorer, runner, warn)
    return runner


def face_sizes_for(model: RestoreModel, choice: str | int = "auto") -> list[int]:
    """The crop sizes `--face-size` lets faces be restored at, smallest first.

    auto: every size the model was trained for (`RestorerConfig.face_sizes`; an exported engine
    has only its own); a number: that size for every face, which a torch model can take at any
    multiple of its downsampling (quality is only measured at the sizes it was trained for).
    """
    cfg = model.config
    if choice == "auto":
        return cfg.face_sizes
    size = int(choice)
    if size < cfg.size_multiple or size % cfg.size_multiple:
        raise InputError(f"--face-size {size}: must be a multiple of {cfg.size_multiple} for this model")
    if not model.takes_any_size and size != cfg.face_size:
        raise InputError(f"--face-size {size}: an exported engine takes only the size it was made for, {cfg.face_size} px")
    return [size]


def resolve_batch_size(choice: int | str, device: torch.device, face_size: int = 512) -> int:
    """`--batch-size`: a number as given; auto on a CPU is as many faces as four of 256 px (one
    at 512 px, where a batch of 4 measured 10 % slower per face than single faces on 2 cores;
    four at 256, where it was 19 % faster), and AUTO_GPU_BATCH on a GPU."""
    if choice != "auto":
        return int(choice)
    if torch.device(device).type == "cuda":
        return AUTO_GPU_BATCH
    return max(1, round(4 * (256 / face_size) ** 2))


def center_face(faces: list[Face], shape: tuple[int, ...]) -> list[Face]:
    """The face whose box centre is nearest the image centre (GFPGAN's --only_center_face)."""
    if len(faces) <= 1:
        return faces
    c = np.array([shape[1] / 2, shape[0] / 2])
    return [min(faces, key=lambda f: float(np.linalg.norm((f.box[:2] + f.box[2:]) / 2 - c)))]


class FaceRestorer:
    """Detect -> align -> restore (batched across frames) -> paste back, on RGB uint8 frames.

    `frame_path` (`--frame-path`): "tensor" warps, restores and pastes each chunk of frames on
    the model's device, "numpy" with OpenCV on the CPU, "auto" is tensor on CUDA (frames.py).
    `face_size` (`--face-size`): "auto" restores each face on the smallest crop the model was
    trained for that is at least the face's size in the output image (`face_sizes_for`).
    """

    def __init__(
        self,
        model: RestoreModel,
        detector: Detector,
        batch_size: int | str = 4,
        color_fix: str = DEFAULT_COLOR_FIX,
        frame_path: str = "auto",
        face_size: str | int = "auto",
    ):
        color_fix = color_fix_for(model, color_fix)
        parse_color_fix(color_fix)  # a bad spec fails here, before any file is read
        self.model, self.detector, self.color_fix = model, detector, color_fix
        self.sizes = face_sizes_for(model, face_size)
        self.face_size = max(self.sizes)  # the model's own size, or the one --face-size forces
        self.batch_size = resolve_batch_size(batch_size, model.device, self.face_size)
        self.frame_path = resolve_frame_path(frame_path, model.device)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def restore_crops(self, crops: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Restore aligned face crops (of one size), batch_size at a time."""
        return restore_crops(self.model, crops, self.batch_size, self.color_fix)

    def restore_crops_tensor(self, crops: torch.Tensor) -> torch.Tensor:
        """The same for a uint8 Nx3xSxS tensor; uint8 out on the model's device."""
        return restore_crops_tensor(self.model, crops, self.batch_size, self.color_fix)

    def restore_aligned(self, images: Sequence[np.ndarray]) -> list[FrameResult]:
        """Inputs that are already aligned faces: each resized to the model's size, restored together."""
        side = (self.face_size, self.face_size)
        crops = [im if im.shape[:2] == side else resize_image(im, size=side) for im in images]
        return [FrameResult(r, [c], [r], 1, 1) for c, r in zip(crops, self.restore_crops(crops))]

    def restore_frames(
        self,
        frames: Sequence[np.ndarray],
        upscale: float = 1.0,
        only_center_face: bool = False,
        keep_faces: bool = False,
        detector: Detector | None = None,
    ) -> list[FrameResult]:
        """Whole frames: every detected face restored in one batch across all frames, then pasted.
        `keep_faces` (--save-faces) also returns each face's crop and restoration. `detector`
        replaces the face restorer's own for these frames (a video's `FaceTracker`)."""
        detections = (detector or self.detector).detect(list(frames))
        aligned = [self._align(frame, faces, only_center_face, upscale) for frame, faces in zip(frames, detections)]
        if self.frame_path == "tensor":
            return restore_frames_tensor(frames, aligned, upscale, self.restore_crops_tensor, self.device, keep_faces)
        return restore_frames_numpy(frames, aligned, upscale, self.restore_crops)

    def _align(self, frame: np.ndarray, faces: list[Face], only_center_face: bool, upscale: float = 1.0) -> AlignedFaces:
        """Each kept face's affine at its working size: the face's size in the output image
        (after --upscale) picks the crop size (`face_sizes_for`)."""
        kept = center_face(faces, frame.shape) if only_center_face else faces
        affines, sizes = [], []
        for f in kept:
            affine = estimate_affine(f.landmarks, self.face_size)
            size = working_size(upscale * face_extent(affine, self.face_size), self.sizes)
            affines.append(affine if size == self.face_size else estimate_affine(f.landmarks, size))
            sizes.append(size)
        return AlignedFaces(affines, len(faces), sizes)


def build_face_restorer(
    choice: ModelChoice = ModelChoice(),
    detection: DetectionSettings = DetectionSettings(),
    faces: FaceSettings = FaceSettings(),
    *,
    device: str = "auto",
    warn: Callable[[str], None] | None = None,
    shard: Shard | None = None,
) -> FaceRestorer:
    """Everything `restore` needs loaded once: the restorer and the detector on one device
    (this process's GPU under torchrun). `warn` gets one-line warnings (fp16 fallback, compile)."""
    dev = (shard or Shard()).device(resolve_device(device))
    # TensorRT engines are built for a batch size at load; they run on a GPU, where auto does not
    # depend on the face size.
    model = load_restore_model(choice, dev, resolve_batch_size(faces.batch_size, dev), warn)
    det = build_detector(detection.detector, device=dev, threshold=detection.threshold, min_face_size=detection.min_face_size)
    return FaceRestorer(model, det, faces.batch_size, faces.color_fix, faces.frame_path, faces.face_size)


def load_restore_model(
    choice: ModelChoice, device: torch.device, batch_size: int = 4, warn: Callable[[str], None] | None = None
) -> RestoreModel:
    """The torch restorer, or an exported engine of the same model (`--backend onnx|tensorrt`).

    Engines are checked against the model asked for (content fingerprint), so `--model`/`--lora`
    mean the same with every backend; without --engine one is made once and cached.
    """
    dtype = resolve_dtype(choice.precision, device)
    choice.check_options()
    if choice.backend == "torch":
        restorer = load_restorer(choice.model, choice.lora, device, dtype, choice.osediff, choice.sampling)
        return fast_torch_model(restorer, choice.compile, warn)
    from facerestore_cli.export.backends import load_backend
    from facerestore_cli.export.source import ModelSource

    source = ModelSource(Path(choice.model) if choice.model else DEFAULT_MODEL, choice.lora, choice.osediff)
    return load_backend(choice.backend, source, device, choice.precision, choice.engine_file, batch_size)
