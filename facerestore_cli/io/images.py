"""Reading and writing images: RGB uint8 arrays with their alpha, grey flag, EXIF and ICC kept,
and the 16-bit samples of 16-bit PNG and TIFF files (high_depth.py)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from facerestore_cli.io.files import MediaError, publish, temp_path_for, unlink_quietly
from facerestore_cli.io.high_depth import (
    HIGH_FORMATS,
    eight_bit,
    encode_png,
    is_tiff,
    orient,
    read_high_depth,
    read_tiff,
    tiff_is_cut,
    to_8bit,
    write_tiff,
)

log = logging.getLogger(__name__)


@dataclass
class LoadedImage:
    """Decoded, upright image plus what we need to write the result back faithfully.

    ``rgb`` is always 8-bit 3-channel (what the model wants). For a 16-bit PNG or TIFF, ``high``
    keeps the file's own samples: uint16 HxWxC, C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4
    (RGBA), of which ``rgb`` and ``alpha`` are the 8-bit view; restored faces are pasted onto it
    and it is written back at 16 bits. ``notes`` say how the colour model or bit depth changes
    when the image is written again (e.g. "CMYK written as RGB"); `output_notes` adds what the
    output's format cannot hold.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    is_grey: bool = False
    bit_depth: int = 8
    exif: bytes | None = None
    icc: bytes | None = None
    high: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.rgb.shape[1], self.rgb.shape[0]


_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


_STRICT_LOCK = threading.Lock()


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Make truncated files fail even if another library enabled LOAD_TRUNCATED_IMAGES.

    The flag is a Pillow global, so it is only flipped (under a lock) when someone set it;
    in the usual case decoding stays lock-free and parallel.
    """
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _STRICT_LOCK:
        old = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old


def _decode_reason(err: BaseException) -> str:
    text = str(err)
    if "truncated" in text.lower():
        return "cannot decode image: truncated file"
    if text.startswith("decoder error"):  # libtiff's failures (a cut-off TIFF among them), as Pillow words them
        return f"cannot decode image: damaged or truncated file ({text})"
    return f"cannot decode image: {text or type(err).__name__}"


def _file_bit_depth(img: Image.Image) -> int:
    """16 when the file stores 16-bit samples (Pillow silently reduces RGB48 to RGB)."""
    if img.mode.startswith("I;16") or img.mode in {"I", "F"}:
        return 16
    for tile in getattr(img, "tile", None) or []:  # ImageFile only
        args = tile[3] if len(tile) > 3 else None
        rawmode = args if isinstance(args, str) else (args[0] if args else "")
        if isinstance(rawmode, str) and "16" in rawmode:
            return 16
    return 8


def _open_decoded(path: Path) -> tuple[Image.Image, int]:
    """Open and fully decode ``path`` (lazy decoding would hide truncation)."""
    try:
        if path.stat().st_size == 0:
            raise MediaError(path, "file is empty (0 bytes)")
    except FileNotFoundError as err:
        raise MediaError(path, "no such file") from err
    if is_tiff(path) and tiff_is_cut(path):
        raise MediaError(path, "cannot decode image: truncated file")
    img: Image.Image | None = None
    try:
        with _strict_decoding():
            img = Image.open(path)
            depth = _file_bit_depth(img)
            img.load()
    except BaseException as err:
        if img is not None:
            img.close()
        mapped = _decode_error(path, err)
        if mapped is err:
            raise
        raise mapped from err
    return img, depth


def _decode_error(path: Path, err: BaseException) -> BaseException:
    """MediaError for decoding problems; anything else (e.g. KeyboardInterrupt) as is."""
    if isinstance(err, UnidentifiedImageError):
        return MediaError(path, "cannot decode image: not a recognised image format")
    if isinstance(err, Image.DecompressionBombError):
        return MediaError(path, f"image is too large to process safely ({err})")
    if isinstance(err, PermissionError):
        return MediaError(path, "cannot read file: permission denied")
    if isinstance(err, (OSError, SyntaxError, ValueError)):
        return MediaError(path, _decode_reason(err))
    return err


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """16-bit (or float 0..1) grey samples to 8 bits."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        scale = 255.0 if float(arr.max(initial=0)) <= 1.0 else 1.0 / 257.0
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    return to_8bit(arr)


def _split_pixels(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB uint8 HxWx3 and optional alpha HxW from any Pillow mode."""
    mode = img.mode
    if mode == "P" or (mode in {"RGB", "L"} and "transparency" in img.info):
        img = img.convert("RGBA" if mode != "L" else "LA")
        mode = img.mode
    if mode in {"I", "F"} or mode.startswith("I;16"):
        grey = _to_uint8(np.asarray(img))
        return np.repeat(grey[..., None], 3, axis=2), None
    alpha = None
    if mode in _ALPHA_MODES:
        alpha = np.asarray(img.getchannel("A"), dtype=np.uint8).copy()
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb), alpha


def _upright(img: Image.Image) -> tuple[Image.Image, bytes | None, int]:
    """Apply EXIF orientation; returns the image, its EXIF without the orientation tag and the
    orientation applied (1: none).

    Broken EXIF is common in phone/editor output: keep the pixels, drop the metadata.
    """
    try:
        orientation = img.getexif().get(0x0112, 1)
        upright = ImageOps.exif_transpose(img) or img
    except Exception as err:  # Pillow raises many types on malformed EXIF
        log.debug("ignoring unreadable EXIF: %s", err)
        return img, None, 1
    exif = upright.info.get("exif")
    return upright, exif if isinstance(exif, bytes) and exif else None, orientation if isinstance(orientation, int) else 1


def _channels_equal(rgb: np.ndarray) -> bool:
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def read_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Decode an image upright (EXIF orientation applied) as RGB uint8 plus alpha/metadata.

    A 16-bit PNG or TIFF also keeps its 16-bit samples (``high``). Raises MediaError for empty,
    truncated, corrupt or unreadable files.
    """
    path = Path(path)
    try:
        img, depth = _open_decoded(path)
    except MediaError as err:
        if err.reason.endswith("not a recognised image format") and is_tiff(path):
            return _read_tiff_alone(path, err)  # e.g. 16-bit grey + alpha, which Pillow cannot read
        raise
    src_mode, fmt = img.mode, img.format
    try:
        upright, exif, orientation = _upright(img)
        rgb, alpha = _split_pixels(upright)
    except (OSError, SyntaxError, ValueError) as err:
        raise MediaError(path, _decode_reason(err)) from err
    finally:
        img.close()
    high = _high_samples(path, fmt, orientation, rgb.shape) if depth == 16 else None
    if high is not None:
        rgb, alpha = eight_bit(high)
    icc = upright.info.get("icc_profile") or None
    if src_mode == "CMYK":
        icc = None  # a CMYK profile is wrong for our RGB pixels
    return LoadedImage(
        rgb=rgb,
        alpha=alpha,
        is_grey=src_mode in _GREY_MODES or _channels_equal(rgb),
        bit_depth=depth,
        exif=exif,
        icc=icc if isinstance(icc, bytes) else None,
        high=high,
        notes=_read_notes(src_mode, depth, high),
    )


def _high_samples(path: Path, fmt: str | None, orientation: int, shape: tuple[int, ...]) -> np.ndarray | None:
    """A 16-bit file's own samples, upright, or None where they cannot be had (then it is
    written at 8 bits, and says so)."""
    if fmt not in HIGH_FORMATS:
        return None
    try:
        high, own_orientation = read_high_depth(path, fmt)
    except (MediaError, OSError, ValueError, cv2.error) as err:
        log.debug("%s: 16-bit samples unreadable, using 8 bits: %s", path, err)
        return None
    if high is None:
        return None
    high = orient(high, own_orientation or orientation)
    return high if high.shape[:2] == shape[:2] else None


def _read_tiff_alone(path: Path, unreadable: MediaError) -> LoadedImage:
    """A TIFF Pillow cannot open, read by tifffile if it is 16-bit grey or RGB (with alpha)."""
    high, icc, orientation = read_tiff(path)
    if high is None:
        raise unreadable
    high = orient(high, orientation)
    rgb, alpha = eight_bit(high)
    return LoadedImage(rgb=rgb, alpha=alpha, is_grey=high.shape[2] <= 2 or _channels_equal(rgb), bit_depth=16, icc=icc, high=high)


#: Colour models written as RGB (or grey), and how that is said.
_MODE_NOTES = {
    "CMYK": "CMYK written as RGB",
    "P": "palette colours written as RGB",
    "PA": "palette colours written as RGB",
    "1": "1-bit black and white written as 8-bit grey",
    "LAB": "Lab written as RGB",
    "YCbCr": "YCbCr written as RGB",
    "HSV": "HSV written as RGB",
    "I": "32-bit grey written as 8-bit",
    "F": "32-bit float grey written as 8-bit",
}


def _read_notes(mode: str, depth: int, high: np.ndarray | None) -> list[str]:
    """What changes about a file's colour model or depth whenever it is written again."""
    wide = mode in {"I", "F"}  # 32-bit samples; or, on older Pillow, 16-bit grey PNG kept in `high`
    notes = [_MODE_NOTES[mode]] if mode in _MODE_NOTES and not (wide and high is not None) else []
    if depth == 16 and high is None and not wide:
        notes.append("16-bit written as 8-bit")
    return notes


def output_notes(img: LoadedImage, path: str | os.PathLike[str]) -> list[str]:
    """How `img`, written to `path` (its format from the extension), changes colour model or
    depth: the image's own `notes` and what that format cannot hold (16 bits, alpha)."""
    fmt = _FORMATS.get(Path(path).suffix.lower(), "")
    notes = list(img.notes)
    if img.high is not None and fmt not in HIGH_FORMATS:
        notes.append(f"16-bit written as 8-bit ({fmt} has no 16-bit)")
    if img.alpha is not None and fmt not in _ALPHA_FORMATS:
        notes.append(f"alpha channel dropped ({fmt} has none)")
    return notes


_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
}


_ALPHA_FORMATS = {"PNG", "WEBP", "TIFF"}


_GREY_FORMATS = {"JPEG", "PNG", "BMP", "TIFF"}  # WebP has no grey mode


_EXIF_FORMATS = {"JPEG", "PNG", "WEBP", "TIFF"}


_ICC_FORMATS = {"JPEG", "PNG", "WEBP", "TIFF"}


def _icc_colour_space(icc: bytes) -> str:
    """The data colour space from the ICC header ('RGB ', 'GRAY', ...)."""
    return icc[16:20].decode("ascii", "replace") if len(icc) >= 20 else ""


def _resize_alpha(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (alpha.shape[1], alpha.shape[0]) == size:
        return alpha
    interp = cv2.INTER_CUBIC if size[0] > alpha.shape[1] else cv2.INTER_AREA
    return cv2.resize(alpha, size, interpolation=interp)


def _compose(rgb: np.ndarray, like: LoadedImage | None, fmt: str) -> Image.Image:
    """Pillow image in the mode that matches the source (grey/alpha) and target format."""
    img = Image.fromarray(rgb, "RGB")
    grey = like is not None and like.is_grey and fmt in _GREY_FORMATS
    if grey:
        img = img.convert("L")
    if like is not None and like.alpha is not None and fmt in _ALPHA_FORMATS:
        alpha = Image.fromarray(_resize_alpha(like.alpha, img.size), "L")
        img = img.convert("LA" if grey else "RGBA")
        img.putalpha(alpha)
    return img


def _save_options(img: Image.Image, like: LoadedImage | None, fmt: str, quality: int) -> dict:
    opts: dict = {"format": fmt}
    if fmt == "JPEG":
        opts.update(quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "WEBP":
        opts.update(quality=quality, method=4)
    elif fmt == "TIFF":
        opts.update(compression="tiff_adobe_deflate")
    if like is None:
        return opts
    if like.exif and fmt in _EXIF_FORMATS:
        opts["exif"] = _exif_without_orientation(like.exif)
    icc = _icc_for(like, fmt, img.mode in {"L", "LA"})
    if icc:
        opts["icc_profile"] = icc
    return opts


def _icc_for(like: LoadedImage | None, fmt: str, grey: bool) -> bytes | None:
    """`like`'s ICC profile if `fmt` holds one and it is for this colour model (grey or RGB)."""
    if like is None or not like.icc or fmt not in _ICC_FORMATS:
        return None
    return like.icc if _icc_colour_space(like.icc) == ("GRAY" if grey else "RGB ") else None


def _exif_without_orientation(exif: bytes) -> bytes:
    """Our pixels are already upright, so a kept orientation tag would rotate them again."""
    parsed = Image.Exif()
    try:
        parsed.load(exif)
    except Exception:  # unparsable EXIF: better to drop it than fail the write
        return b""
    if 0x0112 not in parsed:
        return exif
    del parsed[0x0112]
    return parsed.tobytes()


def write_image(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    like: LoadedImage | None = None,
    quality: int = 95,
) -> Path:
    """Write ``rgb`` atomically, matching ``like`` (grey, alpha, EXIF, ICC) where possible.

    Grey sources are written single-channel; alpha is re-attached (resized if the image was
    upscaled) for PNG/WebP/TIFF and dropped for JPEG/BMP. Format comes from the extension.
    ``rgb`` may also be 16-bit samples as in ``LoadedImage.high`` (uint16 HxWxC, C = 1-4, alpha
    included): PNG and TIFF are written at 16 bits, other formats get the 8-bit view.
    """
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise MediaError(path, f"unsupported image type '{path.suffix}'")
    if rgb.dtype == np.uint16 and rgb.ndim == 3 and 1 <= rgb.shape[2] <= 4:
        if fmt in HIGH_FORMATS:
            return _write_high(path, rgb, like, fmt)
        rgb = eight_bit(rgb)[0]
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3 RGB or uint16 HxWxC (C = 1-4), got {rgb.dtype} {rgb.shape}")
    img = _compose(np.ascontiguousarray(rgb), like, fmt)
    opts = _save_options(img, like, fmt, quality)
    return _atomic_write(path, lambda tmp: img.save(tmp, **opts))


def _write_high(path: Path, pixels: np.ndarray, like: LoadedImage | None, fmt: str) -> Path:
    """16-bit samples written at 16 bits, with ``like``'s ICC profile (and EXIF, in a PNG)."""
    icc = _icc_for(like, fmt, grey=pixels.shape[2] <= 2)
    if fmt == "PNG":
        exif = _exif_without_orientation(like.exif) if like is not None and like.exif else None
        data = encode_png(np.ascontiguousarray(pixels), icc, exif)
        return _atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return _atomic_write(path, lambda tmp: write_tiff(tmp, pixels, icc))


def _atomic_write(path: Path, save: Callable[[Path], object]) -> Path:
    """``save`` into a temp file beside ``path``, then moved into place; nothing left on failure."""
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path_for(path)
        save(tmp)
        publish(tmp, path)
        tmp = None
    except OSError as err:
        raise MediaError(path, f"cannot write image: {err.strerror or err}") from err
    finally:
        unlink_quietly(tmp)
    return path


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(h, w) of an image scaled by ``scale`` (rounded, at least 1), as ``resize_image`` makes it."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(rgb: np.ndarray, scale: float | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Resize by ``scale`` or to ``size`` (h, w): Lanczos up, area down (for --upscale, --aligned)."""
    h, w = rgb.shape[:2]
    if size is None:
        if scale is None:
            raise ValueError("resize_image needs a scale or a size")
        size = scaled_size(h, w, scale)
    if tuple(size) == (h, w):
        return rgb.copy()
    interp = cv2.INTER_LANCZOS4 if size[0] * size[1] > h * w else cv2.INTER_AREA
    return cv2.resize(rgb, (size[1], size[0]), interpolation=interp)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """A plain PNG of an RGB array, folders made (for derived data: test sets, pairs, grids).
    Unlike `write_image` it keeps no metadata of any input and is not atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1])):
        raise OSError(f"could not write {path}")
