"""FFHQ 5-point alignment of faces to square crops, and seamless paste-back of restored crops.

An affine here is a 2x3 float32 matrix mapping image pixels to crop pixels (OpenCV convention,
pixel centres at integer coordinates). Paste-back warps each crop and a feathered mask back with
the inverse affine, only inside the face's bounding region, so every pixel the mask does not
touch stays bit-identical.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import cv2
import numpy as np

from facerestore_cli.io.high_depth import GREY_WEIGHTS
from facerestore_cli.io.images import resize_image, scaled_size

#: facexlib's FFHQ template for 512 px crops: left eye, right eye, nose, left/right mouth corner.
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [201.26117, 371.41043], [313.08905, 371.15118]],
    dtype=np.float32,
)
#: facexlib's grey fill (its BGR (135, 133, 132)) for the "constant" border mode, in RGB.
BORDER_GREY = (132, 133, 135)
#: Below this scale a warp low-pass filters first: interpolation alone would alias.
MIN_WARP_SCALE = 0.8
#: Bicubic: an image -> crop -> image round trip loses about half as much as with bilinear.
INTERP = cv2.INTER_CUBIC


def face_template(face_size: int = 512) -> np.ndarray:
    """The 5-point template scaled to a face_size crop (as facexlib scales it)."""
    return FFHQ_TEMPLATE_512 * np.float32(face_size / 512.0)


def estimate_affine(landmarks: np.ndarray, face_size: int = 512) -> np.ndarray:
    """Similarity transform (rotation, uniform scale, shift) taking the landmarks onto the template.

    LMEDS as in facexlib, so one badly placed landmark does not skew the crop; least squares if
    LMEDS finds no model (degenerate points).
    """
    src = np.asarray(landmarks, np.float32).reshape(5, 2)
    dst = face_template(face_size)
    affine, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    if affine is None or not np.isfinite(affine).all():
        affine = _similarity_lstsq(src, dst)
    return affine.astype(np.float32)


def face_extent(affine: np.ndarray, size: int) -> float:
    """How many image pixels a size x size crop of `affine` spans: the face's size in the image."""
    return size / _affine_scale(affine)


def working_size(extent: float, sizes: Sequence[int]) -> int:
    """The smallest crop size of `sizes` that is at least `extent` pixels, so the crop does not
    shrink the face and nothing of it is lost; the largest size for faces bigger than all."""
    fits = [s for s in sorted(sizes) if s >= extent]
    return fits[0] if fits else max(sizes)


def _similarity_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama without reflection) for when LMEDS gives up."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var = (s**2).sum()
    if var < 1e-12:
        raise ValueError("cannot align a face whose landmarks all coincide")
    a = (s * d).sum() / var  # scale*cos
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / var  # scale*sin
    rot = np.array([[a, -b], [b, a]], np.float64)
    return np.hstack([rot, (mu_d - rot @ mu_s)[:, None]])


def scale_affine(affine: np.ndarray, s: float) -> np.ndarray:
    """The affine for the same face in the image upscaled by s (e.g. a 2x upscaled background).

    Pixel centres follow cv2.resize / torch interpolate: x_up = s * x + (s - 1) / 2.
    """
    c = 0.5 * (s - 1.0)
    pre = np.array([[1 / s, 0, -c / s], [0, 1 / s, -c / s], [0, 0, 1]], np.float64)
    return (np.asarray(affine, np.float64) @ pre).astype(np.float32)


def _rescale_output(affine: np.ndarray, k: float) -> np.ndarray:
    """Affine to a crop k times the size, with the template-scaling convention of face_template."""
    out = np.asarray(affine, np.float64) * k
    return out.astype(np.float32)


def _affine_scale(affine: np.ndarray) -> float:
    return float(np.sqrt(abs(np.linalg.det(np.asarray(affine, np.float64)[:, :2]))))


def _compose(affine: np.ndarray, pre: np.ndarray) -> np.ndarray:
    """affine(pre(x)) for 2x3 matrices."""
    p = np.vstack([np.asarray(pre, np.float64), [0, 0, 1]])
    return (np.asarray(affine, np.float64) @ p).astype(np.float32)


def _resize_map(src_size: tuple[int, int], dst_size: tuple[int, int]) -> np.ndarray:
    """2x3 map from resized pixel coords back to original pixel coords (cv2.resize convention)."""
    (sw, sh), (dw, dh) = src_size, dst_size
    fx, fy = sw / dw, sh / dh
    return np.array([[fx, 0, 0.5 * fx - 0.5], [0, fy, 0.5 * fy - 0.5]], np.float64)


def _bounds(inverse: np.ndarray, size: int, shape: tuple[int, int], pad: int) -> tuple[int, int, int, int] | None:
    """Image-space box (x0, y0, x1, y1), clipped, covering a size x size crop mapped by `inverse`."""
    corners = np.array([[-1, -1, 1], [size, -1, 1], [-1, size, 1], [size, size, 1]], np.float64)
    pts = corners @ np.asarray(inverse, np.float64).T
    x0, y0 = np.floor(pts.min(0)).astype(int) - pad
    x1, y1 = np.ceil(pts.max(0)).astype(int) + pad + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, shape[1]), min(y1, shape[0])
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def warp_faces(image: np.ndarray, affines: list[np.ndarray], face_size: int = 512, border: str = "reflect") -> list[np.ndarray]:
    """Aligned face_size x face_size crops, one per affine.

    border: how the crop is filled where it leaves the image. "reflect" (default) mirrors the
    image so the restorer sees plausible texture instead of a hard grey edge next to the face;
    "constant" is facexlib's flat grey. Either way that part is never pasted back.
    """
    if border not in ("reflect", "constant"):
        raise ValueError(f"border must be 'reflect' or 'constant', not {border!r}")
    mode = cv2.BORDER_REFLECT_101 if border == "reflect" else cv2.BORDER_CONSTANT
    return [_warp_one(image, a, face_size, mode) for a in affines]


def _warp_one(image: np.ndarray, affine: np.ndarray, size: int, mode: int) -> np.ndarray:
    affine = np.asarray(affine, np.float32)
    src = image
    scale = _affine_scale(affine)
    if scale < MIN_WARP_SCALE:
        # The face is bigger in the image than in the crop: shrink the region around it first.
        box = _bounds(cv2.invertAffineTransform(affine), size, image.shape[:2], pad=int(np.ceil(2 / scale)))
        if box is not None:
            # Where the region is clipped, its edge is the image's edge, so reflecting it is right.
            x0, y0, x1, y1 = box
            roi = image[y0:y1, x0:x1]
            dw, dh = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
            src = cv2.resize(roi, (dw, dh), interpolation=cv2.INTER_AREA)
            to_roi = _resize_map((x1 - x0, y1 - y0), (dw, dh))
            to_roi[:, 2] += (x0, y0)
            affine = _compose(affine, to_roi)
    return cv2.warpAffine(src, affine, (size, size), flags=INTERP, borderMode=mode, borderValue=BORDER_GREY)


@lru_cache(maxsize=8)
def feather_mask(size: int, feather: float = 0.05) -> np.ndarray:
    """Crop-space blend weight: 1 inside, falling smoothly to 0; the outer 2 pixels are exactly 0.

    Like facexlib's paste mask (eroded by and blurred over ~size/20), but built once in crop
    space, so its width follows the face size whatever the face's size in the image.
    """
    band = max(1, int(round(size * feather)))
    inset = 2 + band
    mask = np.zeros((size, size), np.float32)
    mask[inset : size - inset, inset : size - inset] = 1.0
    mask = cv2.GaussianBlur(mask, (2 * band + 1, 2 * band + 1), 0)
    mask.setflags(write=False)
    return mask


def paste_faces(
    image: np.ndarray,
    faces: list[np.ndarray],
    affines: list[np.ndarray],
    face_size: int | None = None,
    feather: float = 0.05,
) -> np.ndarray:
    """Blend restored crops back into `image` with feathered masks; returns a new image.

    image: uint8 RGB, or uint16 (HxWx3, or HxW grey, whose faces must then be HxW too): faces
    are in 0..255 (uint8 or float) and are blended in float at the image's own depth.
    affines: as from estimate_affine, for `image`'s resolution (use scale_affine for an upscaled
    background) and for crops of face_size (default: each crop's own size; a crop of another
    size is rescaled). feather: width of the blend band as a fraction of the crop size.
    Pixels no mask touches are returned bit-identical, at every depth.
    """
    if len(faces) != len(affines):
        raise ValueError(f"{len(faces)} faces but {len(affines)} affines")
    out = image.copy()
    for face, affine in zip(faces, affines):
        n = face.shape[0]
        if face.shape[:2] != (n, n):
            raise ValueError(f"restored faces must be square, got {face.shape}")
        if face_size is not None and face_size != n:
            affine = _rescale_output(affine, n / face_size)
        _paste_one(out, face, np.asarray(affine, np.float32), feather_mask(n, float(feather)))
    return out


def paste_faces_high(
    high: np.ndarray, faces: Sequence[np.ndarray], affines: Sequence[np.ndarray], upscale: float = 1.0, grey: bool = False
) -> np.ndarray:
    """Restored crops pasted onto a photo's 16-bit samples (uint16 HxWxC, C = 1-4, alpha last:
    `LoadedImage.high`) as `paste_faces` pastes them onto its 8-bit frame: the same affines (for
    the input's scale; the samples are upscaled by `upscale` first) and mask, blended in float,
    so what no mask touches keeps all 16 bits. A grey photo gets grey faces (their luma, with
    the weights Pillow turns RGB into grey with)."""
    colours = 1 if high.shape[2] <= 2 else 3
    if upscale != 1:
        size = scaled_size(high.shape[0], high.shape[1], upscale)
        high = resize_image(high, size=size).reshape(*size, high.shape[2])
    crops = [np.asarray(f, np.float32) for f in faces]
    if grey or colours == 1:
        crops = [f @ GREY_WEIGHTS for f in crops]
        crops = crops if colours == 1 else [np.repeat(f[..., None], 3, axis=2) for f in crops]
    if not crops:
        return high
    out = high.copy()
    colour = out[..., 0] if colours == 1 else out[..., :3]
    colour[...] = paste_faces(np.ascontiguousarray(colour), crops, [scale_affine(m, upscale) for m in affines])
    return out


def _paste_one(out: np.ndarray, face: np.ndarray, affine: np.ndarray, mask: np.ndarray) -> None:
    """Blend one crop (0..255) into `out` (uint8 or uint16) in place, touching only the crop's bounding region."""
    n = face.shape[0]
    inverse = cv2.invertAffineTransform(affine).astype(np.float64)
    box = _bounds(inverse, n, out.shape[:2], pad=2)
    if box is None:
        return
    x0, y0, x1, y1 = box
    src_face = face.astype(np.float32)
    shrink = _affine_scale(affine)  # crop pixels per image pixel
    if shrink > 1.0 / MIN_WARP_SCALE:
        # The face is smaller in the image than the crop: low-pass the crop so its detail does
        # not alias; (d - 1) / 2 keeps a round trip nearly lossless yet suppresses aliasing.
        src_face = cv2.GaussianBlur(src_face, (0, 0), (shrink - 1) / 2)
    inverse = inverse.copy()
    inverse[:, 2] -= (x0, y0)
    dsize = (x1 - x0, y1 - y0)
    warped = cv2.warpAffine(src_face, inverse, dsize, flags=INTERP, borderMode=cv2.BORDER_REPLICATE)
    # Bilinear for the mask: it is smooth already and must stay within [0, 1] and exactly 0 outside.
    weight = cv2.warpAffine(mask, inverse, dsize, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    roi = out[y0:y1, x0:x1]
    top = float(np.iinfo(out.dtype).max)
    if top != 255:
        warped *= np.float32(top / 255)  # e.g. 257: 8-bit levels onto 16-bit ones
    bg = roi.astype(np.float32)
    w = weight[..., None] if roi.ndim == 3 else weight
    blended = np.clip(np.rint(bg + w * (warped - bg)), 0, top).astype(out.dtype)
    roi[...] = np.where(w > 0, blended, roi)
