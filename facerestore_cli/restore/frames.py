"""From aligned faces to finished frames, two ways: with numpy on the CPU or with tensors on the model's device.

`FaceRestorer.restore_frames` detects and aligns the faces of a chunk of frames (one
image -> crop affine per face) and hands the chunk to one of the frame paths here:

- numpy: OpenCV warps the crops and pastes the restorations back (`faces.align`); crops go to
  the model's device a batch at a time and come back.
- tensor: the chunk goes to the model's device once as uint8; crops are warped, restored and
  pasted back there (`faces.tensor_align`, with the --upscale resize), and only the finished
  frames come back. On a GPU this saves the CPU warps and the host round trips of every face,
  which take most of the time once the model itself is fast.

Both give the same frames within a grey level or two (tests/test_frames.py); `auto` picks the
tensor path on CUDA and the numpy one elsewhere, where OpenCV is the faster of the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor

from facerestore_cli.errors import InputError
from facerestore_cli.faces.align import paste_faces, scale_affine, warp_faces
from facerestore_cli.faces.tensor_align import (
    paste_faces_tensor,
    resize_tensor,
    warp_faces_tensor,
)
from facerestore_cli.io.images import resize_image, scaled_size
from facerestore_cli.models.inference import by_size
from facerestore_cli.restore.options import FRAME_PATHS

T = TypeVar("T")


def resolve_frame_path(choice: str, device: torch.device) -> str:
    """`tensor` or `numpy` for a `--frame-path` choice; `auto` is tensor on CUDA, numpy elsewhere."""
    if choice not in FRAME_PATHS:
        raise InputError(f"frame path must be one of {', '.join(FRAME_PATHS)}, not {choice!r}")
    if choice == "auto":
        return "tensor" if torch.device(device).type == "cuda" else "numpy"
    return choice


@dataclass
class FrameResult:
    """One restored frame: how many faces were found and restored, and (when asked for, for
    --save-faces and 16-bit photos) the aligned inputs and their restorations, pasted back with
    `affines` (image -> crop, at the input's scale; `faces.align.paste_faces_high` pastes them
    onto a photo's 16-bit samples)."""

    image: np.ndarray
    crops: list[np.ndarray]
    restored: list[np.ndarray]
    found: int
    count: int  # faces restored (crops/restored may be left empty: see keep_faces)
    affines: list[np.ndarray] = field(default_factory=list)


@dataclass
class AlignedFaces:
    """The faces of one frame to restore (their image -> crop affines, and each crop's size:
    `--face-size auto` restores small faces on smaller crops) and how many were found (more
    than restored with --only-center-face)."""

    affines: list[np.ndarray]
    found: int
    sizes: list[int]


def restore_frames_numpy(
    frames: Sequence[np.ndarray],
    aligned: Sequence[AlignedFaces],
    upscale: float,
    restore: Callable[[list[np.ndarray]], list[np.ndarray]],
) -> list[FrameResult]:
    """Warp with OpenCV, restore every crop of the chunk in `restore`'s batches, paste back."""
    crops = [[warp_faces(frame, [m], n)[0] for m, n in zip(a.affines, a.sizes)] for frame, a in zip(frames, aligned)]
    restored = iter(by_size([c for frame_crops in crops for c in frame_crops], restore))
    results = []
    for frame, a, frame_crops in zip(frames, aligned, crops):
        faces = [next(restored) for _ in frame_crops]
        background = frame if upscale == 1 else resize_image(frame, scale=upscale)
        image = paste_faces(background, faces, [scale_affine(m, upscale) for m in a.affines]) if faces else background
        results.append(FrameResult(image, frame_crops, faces, a.found, len(faces), a.affines))
    return results


@torch.inference_mode()
def restore_frames_tensor(
    frames: Sequence[np.ndarray],
    aligned: Sequence[AlignedFaces],
    upscale: float,
    restore: Callable[[Tensor], Tensor],
    device: torch.device,
    keep_faces: bool = False,
) -> list[FrameResult]:
    """The same on `device`: `restore` takes and returns uint8 Nx3xSxS tensors there.

    A frame with nothing to do (no face, no upscale) is returned as it came, without a trip
    to the device. Only the finished frames come back, unless `keep_faces` (--save-faces) asks
    for the crops and restorations too (one copy each, about 1.5 MB per face at 512 px).
    """
    if upscale == 1 and not any(a.affines for a in aligned):
        return [FrameResult(frame, [], [], a.found, 0) for frame, a in zip(frames, aligned)]
    images = _upload(frames, device)
    crops = [_warp(image, m, n) for image, a in zip(images, aligned) for m, n in zip(a.affines, a.sizes)]
    counts = [len(a.affines) for a in aligned]
    restored = by_size(crops, lambda same: list(restore(torch.stack(same))))
    finished = [_finish(image, faces, a.affines, upscale) for image, faces, a in zip(images, _split(restored, counts), aligned)]
    done = iter(_download([f for f in finished if f is not None]))
    if keep_faces:
        crops_out, restored_out = _split(_download(crops), counts), _split(_download(restored), counts)
    else:
        crops_out = restored_out = [[] for _ in counts]
    return [
        FrameResult(frame if f is None else next(done), c, r, a.found, n, a.affines)
        for frame, f, c, r, a, n in zip(frames, finished, crops_out, restored_out, aligned, counts)
    ]


def _warp(image: Tensor, affine: np.ndarray, size: int) -> Tensor:
    """The uint8 3xSxS crop of a uint8 3xHxW image: whole grey levels, as the numpy path's crops."""
    return warp_faces_tensor(image, [affine], size)[0].round().clamp(0, 255).to(torch.uint8)


def _finish(image: Tensor, faces: list[Tensor], affines: list[np.ndarray], upscale: float) -> Tensor | None:
    """The finished uint8 3xHxW frame: background (upscaled) with the faces pasted; None if unchanged."""
    if upscale == 1 and not len(faces):
        return None
    background = image.float()
    if upscale != 1:
        size = scaled_size(image.shape[-2], image.shape[-1], upscale)
        background = resize_tensor(background, *size).round().clamp(0, 255)
    if len(faces):
        background = paste_faces_tensor(background, faces, [scale_affine(m, upscale) for m in affines])
    return background.to(torch.uint8)


def _upload(frames: Sequence[np.ndarray], device: torch.device) -> list[Tensor]:
    """uint8 3xHxW tensors on `device`; frames of one size (a video chunk) go in one copy."""
    if len({f.shape for f in frames}) == 1:
        return list(torch.from_numpy(np.stack(frames)).to(device).permute(0, 3, 1, 2))
    return [torch.from_numpy(np.stack([f])).to(device).permute(0, 3, 1, 2)[0] for f in frames]


def _hwc(batch: Tensor) -> list[np.ndarray]:
    """uint8 HxWx3 arrays of a uint8 Nx3xHxW tensor, in one copy (transposed on the device first)."""
    return list(batch.permute(0, 2, 3, 1).contiguous().cpu().numpy())


def _download(images: list[Tensor]) -> list[np.ndarray]:
    """uint8 HxWx3 arrays of uint8 3xHxW tensors: one copy per size (a video chunk's frames,
    or faces restored on crops of one size)."""
    return by_size(images, lambda same: _hwc(torch.stack(same)))


def _split(items: list[T], counts: list[int]) -> list[list[T]]:
    """`items` cut into consecutive lists of `counts` items."""
    out, start = [], 0
    for n in counts:
        out.append(items[start : start + n])
        start += n
    return out
