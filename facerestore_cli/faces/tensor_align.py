"""The alignment warp and feathered paste-back of `faces.align` (and the --upscale resize), in torch.

`restore`'s tensor frame path (`restore/frames.py`, `--frame-path tensor`, the default on CUDA) uses
them so a chunk of frames stays on the GPU from upload to the finished frames.
Same conventions and the same results within a grey level or two: affines are the 2x3 image ->
crop matrices of `estimate_affine` (pixel centres at integer coordinates, which is
`grid_sample(align_corners=True)`), bicubic (a = -0.75, as cv2's INTER_CUBIC) for images,
bilinear for the mask, an area pre-shrink for faces larger than their crop and a Gaussian
low-pass for faces smaller than it. Images are float 3xHxW in 0..255 on any device.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from facerestore_cli.faces.align import (
    BORDER_GREY,
    MIN_WARP_SCALE,
    _affine_scale,
    _bounds,
    _compose,
    _resize_map,
    feather_mask,
)


def _grid(matrix: np.ndarray, width: int, height: int, src_w: int, src_h: int, device: torch.device) -> Tensor:
    """1xHxWx2 sampling grid: output pixel (x, y) reads source pixel matrix @ (x, y, 1), normalised."""
    m = torch.as_tensor(np.asarray(matrix, np.float64), device=device)
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float64), torch.arange(width, device=device, dtype=torch.float64), indexing="ij"
    )
    sx = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    sy = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    # align_corners=True: -1 and 1 are the centres of the first and last pixels.
    gx = 2 * sx / max(src_w - 1, 1) - 1
    gy = 2 * sy / max(src_h - 1, 1) - 1
    return torch.stack([gx, gy], -1)[None].float()


def _sample(src: Tensor, grid: Tensor, mode: str, padding: str) -> Tensor:
    return F.grid_sample(src[None], grid.to(src.dtype), mode=mode, padding_mode=padding, align_corners=True)[0]


def warp_faces_tensor(image: Tensor, affines: Sequence[np.ndarray], face_size: int = 512, border: str = "reflect") -> Tensor:
    """Nx3xSxS aligned crops (float, 0..255) of a 3xHxW image, like `align.warp_faces`."""
    if border not in ("reflect", "constant"):
        raise ValueError(f"border must be 'reflect' or 'constant', not {border!r}")
    img = image.float()
    crops = [_warp_one(img, np.asarray(a, np.float32), face_size, border) for a in affines]
    return torch.stack(crops) if crops else img.new_zeros((0, 3, face_size, face_size))


def _warp_one(img: Tensor, affine: np.ndarray, size: int, border: str) -> Tensor:
    src = img
    scale = _affine_scale(affine)
    if scale < MIN_WARP_SCALE:  # area pre-shrink of the face's region, as align._warp_one does
        box = _bounds(cv2.invertAffineTransform(affine), size, tuple(img.shape[1:]), pad=int(np.ceil(2 / scale)))
        if box is not None:
            x0, y0, x1, y1 = box
            dw, dh = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
            src = _area_resize(img[:, y0:y1, x0:x1], dh, dw)
            to_roi = _resize_map((x1 - x0, y1 - y0), (dw, dh))
            to_roi[:, 2] += (x0, y0)
            affine = _compose(affine, to_roi)
    grid = _grid(cv2.invertAffineTransform(affine), size, size, src.shape[2], src.shape[1], img.device)
    if border == "reflect":  # torch's reflection with align_corners=True is cv2's BORDER_REFLECT_101
        return _sample(src, grid, "bicubic", "reflection")
    grey = torch.tensor(BORDER_GREY, dtype=src.dtype, device=src.device)[:, None, None]
    return _sample(src - grey, grid, "bicubic", "zeros") + grey  # weights sum to 1: a grey border


def _area_weights(src: int, dst: int, device: torch.device) -> Tensor:
    """dst x src matrix of cv2's INTER_AREA shrink: each output averages its exact footprint.

    (torch's "area" mode is adaptive pooling, whose whole-pixel bins differ by several grey
    levels when the ratio is not an integer.)
    """
    f = src / dst
    lo = torch.arange(dst, dtype=torch.float64, device=device)[:, None] * f
    j = torch.arange(src, dtype=torch.float64, device=device)[None, :]
    overlap = (torch.minimum(lo + f, j + 1) - torch.maximum(lo, j)).clamp(min=0)
    return overlap / f


def _area_resize(x: Tensor, height: int, width: int) -> Tensor:
    """3xHxW -> 3 x height x width by area averaging (shrinking only, as the warp uses it)."""
    ry = _area_weights(x.shape[1], height, x.device).to(x.dtype)
    rx = _area_weights(x.shape[2], width, x.device).to(x.dtype)
    return torch.einsum("yh,chw,xw->cyx", ry, x, rx)


def _lanczos_taps(src: int, dst: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """dst x 8 source indices (edge replicated) and weights of cv2's INTER_LANCZOS4 along one axis.

    cv2 takes the 8 pixels around each output position, weighted by sinc(d) * sinc(d / 4) and
    normalised; computing the same weights here keeps the two frame paths' upscaled
    backgrounds within a grey level of each other.
    """
    pos = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    start = np.floor(pos)
    taps = np.arange(-3, 5)
    dist = (pos - start)[:, None] - taps[None, :]
    weights = np.sinc(dist) * np.sinc(dist / 4)
    weights /= weights.sum(1, keepdims=True)
    index = np.clip(start[:, None] + taps[None, :], 0, src - 1).astype(np.int64)
    return torch.from_numpy(index).to(device), torch.from_numpy(weights).to(device)


def _lanczos_axis(x: Tensor, size: int, dim: int) -> Tensor:
    """Resample dimension `dim` of x to `size` with Lanczos-4 (8 gathers, not a dense matrix)."""
    index, weights = _lanczos_taps(x.shape[dim], size, x.device)
    shape = [1] * x.ndim
    shape[dim] = size
    out = x.new_zeros(())
    for k in range(index.shape[1]):
        out = out + x.index_select(dim, index[:, k]) * weights[:, k].to(x.dtype).view(shape)
    return out


def resize_tensor(image: Tensor, height: int, width: int) -> Tensor:
    """A float ...xHxW image resized like `media.resize_image`: Lanczos-4 when the area grows
    (what --upscale does to the background), area averaging when it shrinks."""
    h, w = image.shape[-2:]
    if (height, width) == (h, w):
        return image.clone()
    if height * width > h * w:
        return _lanczos_axis(_lanczos_axis(image, width, -1), height, -2)
    if image.ndim != 3:
        raise ValueError(f"shrinking takes one 3xHxW image, got {tuple(image.shape)}")
    return _area_resize(image, height, width)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """cv2.GaussianBlur(x, (0, 0), sigma) for float images: same kernel size, reflect-101 border."""
    radius = (int(round(sigma * 8 + 1)) | 1) // 2
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[0]
    x = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0]


def paste_faces_tensor(image: Tensor, faces: Tensor | Sequence[Tensor], affines: Sequence[np.ndarray], feather: float = 0.05) -> Tensor:
    """Blend restored 3xSxS crops (0..255) into a 3xHxW image, like `align.paste_faces`.

    Returns a new float image of whole grey levels; pixels no mask touches are unchanged.
    """
    if len(faces) != len(affines):
        raise ValueError(f"{len(faces)} faces but {len(affines)} affines")
    out = image.float().clone()
    for face, affine in zip(faces, affines):
        if face.shape[-1] != face.shape[-2]:
            raise ValueError(f"restored faces must be square, got {tuple(face.shape)}")
        _paste_one(out, face.float(), np.asarray(affine, np.float32), feather)
    return out


def _paste_one(out: Tensor, face: Tensor, affine: np.ndarray, feather: float) -> None:
    """Blend one crop into `out` in place, inside the crop's bounding region only."""
    n = face.shape[-1]
    box = _bounds(cv2.invertAffineTransform(affine), n, tuple(out.shape[1:]), pad=2)
    if box is None:
        return
    x0, y0, x1, y1 = box
    shrink = _affine_scale(affine)
    if shrink > 1.0 / MIN_WARP_SCALE:  # the face is smaller in the image than the crop
        face = _gaussian_blur(face, (shrink - 1) / 2)
    to_crop = np.asarray(affine, np.float64).copy()
    to_crop[:, 2] += to_crop[:, :2] @ np.array([x0, y0], np.float64)  # region pixel -> crop pixel
    grid = _grid(to_crop, x1 - x0, y1 - y0, n, n, out.device)
    warped = _sample(face, grid, "bicubic", "border")
    mask = torch.from_numpy(np.array(feather_mask(n, float(feather)))).to(out.device)[None]
    weight = _sample(mask, grid, "bilinear", "zeros")
    roi = out[:, y0:y1, x0:x1]
    blended = torch.round(roi + weight * (warped - roi)).clamp(0, 255)
    out[:, y0:y1, x0:x1] = torch.where(weight > 0, blended, roi)
