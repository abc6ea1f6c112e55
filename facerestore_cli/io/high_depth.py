"""16-bit PNG and TIFF files kept at 16 bits: their full-depth pixels read, and written back.

`read_image` (images.py) decodes every image with Pillow, which reduces 16-bit colour to 8 bits;
for a 16-bit PNG or TIFF it also keeps the file's own samples, read here, as `LoadedImage.high`:
a uint16 HxWxC array, upright, C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA). Faces are
found and restored on the 8-bit view; the restorations are pasted onto `high` with the same
affines and mask as onto the 8-bit frame (restore/frames.py), so every pixel the mask does not
touch keeps all 16 bits. The result is written here: PNG by OpenCV with the ICC profile and EXIF
added (grey + alpha, which neither OpenCV nor Pillow writes at 16 bits, by a small encoder of our
own), TIFF by tifffile.
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from facerestore_cli.io.files import MediaError

#: The formats a 16-bit image is written back to at 16 bits.
HIGH_FORMATS = frozenset({"PNG", "TIFF"})

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_ROWS_PER_BLOCK = 64  # rows filtered together (bounds the encoder's scratch memory)
_PNG_IDAT_BYTES = 1 << 20


def is_tiff(path: Path) -> bool:
    """Whether the file starts like a TIFF (whatever its name says)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:  # unreadable: the decoder says why
        return False


@contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """tifffile logs what it finds odd in a damaged file; our MediaError says it in one line."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def tiff_is_cut(path: Path) -> bool:
    """Whether a TIFF's first image runs past the end of the file (a cut-off file), seen from its
    header, before a decoder sees it (libtiff, under Pillow, prints its complaint to the terminal)."""
    import tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            page, size = tif.pages[0], tif.filehandle.size
            return any(offset + count > size for offset, count in zip(page.dataoffsets, page.databytecounts))
    except Exception:  # a file tifffile cannot parse is left to Pillow to judge
        return False


def max_pixels() -> int | None:
    """The size above which an image is refused unread: Pillow's decompression-bomb limit."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """`pixels` turned upright for an EXIF orientation (1-8), as Pillow's `exif_transpose` turns them."""
    turned = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, 3),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }.get(orientation)
    return pixels if turned is None else np.ascontiguousarray(turned(pixels))


#: RGB to grey (luma), with the weights Pillow uses for its "L" mode.
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)


def to_8bit(samples: np.ndarray) -> np.ndarray:
    """16-bit samples to the nearest 8-bit ones (257 * v -> v, 65535 -> 255; wider ones clipped)."""
    return np.clip((samples.astype(np.int64) + 128) // 257, 0, 255).astype(np.uint8)


def eight_bit(high: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The 8-bit view of a uint16 HxWxC image: RGB uint8 HxWx3 (grey repeated) and alpha HxW or None."""
    colours = 1 if high.shape[2] <= 2 else 3
    low = to_8bit(high)
    rgb = np.repeat(low[..., :1], 3, axis=2) if colours == 1 else np.ascontiguousarray(low[..., :3])
    return rgb, (np.ascontiguousarray(low[..., colours]) if high.shape[2] in (2, 4) else None)


# ------------------------------------------------------------------ reading


def read_high_depth(path: Path, fmt: str | None) -> tuple[np.ndarray | None, int | None]:
    """The 16-bit samples of a PNG or TIFF as uint16 HxWxC (as stored, not yet upright), or None
    when the file holds no 16-bit grey/RGB samples we can keep (then its 8-bit view is used); and
    for a TIFF its own orientation tag, since Pillow turns a TIFF upright as it loads it and drops
    the tag (a PNG's EXIF orientation is still Pillow's to read: None)."""
    if fmt == "TIFF":
        pixels, _icc, orientation = read_tiff(path)
        return pixels, orientation
    if fmt != "PNG":
        return None, None
    return _read_png16(path), None


def _read_png16(path: Path) -> np.ndarray | None:
    data = np.fromfile(path, np.uint8)
    grey = data[25:26].tobytes() in (b"\x00", b"\x04")  # IHDR's colour type: grey, grey + alpha
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.dtype != np.uint16:
        return None
    if decoded.ndim == 2:
        return decoded[..., None]
    if decoded.shape[2] == 3:
        pixels = decoded[..., ::-1]
    elif decoded.shape[2] == 4:
        pixels = decoded[..., [2, 1, 0, 3]]
    else:
        return None
    if grey:  # OpenCV hands grey + alpha out as BGRA
        pixels = pixels[..., [0, 3]] if pixels.shape[2] == 4 else pixels[..., :1]
    return np.ascontiguousarray(pixels)


def read_tiff(path: Path) -> tuple[np.ndarray | None, bytes | None, int]:
    """A TIFF's first image as uint16 HxWxC (None unless it is 16-bit grey or RGB, with at most
    one extra channel, its alpha), its ICC profile and EXIF orientation. The size is checked
    against the decompression-bomb limit before anything is decoded."""
    import tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tags = page.tags
            icc = tags.valueof(34675)
            orientation = int(tags.valueof(274, 1) or 1)
            limit = max_pixels()
            if limit is not None and page.imagewidth * page.imagelength > limit:
                raise MediaError(path, f"image is too large to process safely ({page.imagewidth}x{page.imagelength} pixels)")
            keep = (
                page.dtype == np.uint16
                and page.photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB)
                and page.samplesperpixel - len(page.extrasamples) in (1, 3)
                and len(page.extrasamples) <= 1
                and page.imagedepth == 1
            )
            pixels = page.asarray() if keep else None
            planar = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
    except MediaError:
        raise
    except Exception as err:  # tifffile raises many kinds on damaged files
        text = str(err) or type(err).__name__
        raise MediaError(path, "cannot decode image: truncated file" if "truncated" in text else f"cannot decode image: {text}") from err
    if pixels is not None:
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        elif planar:
            pixels = np.moveaxis(pixels, 0, -1)
        pixels = np.ascontiguousarray(pixels)
    return pixels, bytes(icc) if isinstance(icc, (bytes, bytearray)) and icc else None, orientation


# ------------------------------------------------------------------ writing


def encode_png(pixels: np.ndarray, icc: bytes | None = None, exif: bytes | None = None) -> bytes:
    """A 16-bit PNG of uint16 HxWxC (C = 1-4), with the ICC profile and EXIF given.

    OpenCV (libpng) encodes grey, RGB and RGBA, and our chunks go in after its IHDR; grey +
    alpha, which OpenCV cannot write, is encoded here: each row gets the filter that minimises
    the sum of its absolute (signed) bytes, libpng's heuristic, computed with numpy.
    """
    h, w, c = pixels.shape
    extra = b""
    if icc:
        extra += _png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc))
    if exif:
        extra += _png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif)
    if c != 2:
        ok, encoded = cv2.imencode(".png", pixels[..., [2, 1, 0, 3][:c]] if c > 1 else pixels[..., 0])
        if not ok:
            raise ValueError(f"OpenCV could not encode a {pixels.shape} PNG")
        data = encoded.tobytes()
        return data[:33] + extra + data[33:]  # the signature and IHDR are the first 33 bytes
    packer = zlib.compressobj(6)
    raw = pixels.astype(">u2").view(np.uint8).reshape(h, w * c * 2)
    idat = b"".join(packer.compress(rows) for rows in _filtered_rows(raw, 2 * c)) + packer.flush()
    head = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 4, 0, 0, 0))
    body = b"".join(_png_chunk(b"IDAT", idat[i : i + _PNG_IDAT_BYTES]) for i in range(0, len(idat), _PNG_IDAT_BYTES))
    return _PNG_SIGNATURE + head + extra + body + _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _filtered_rows(raw: np.ndarray, bpp: int) -> Iterator[bytes]:
    """The PNG scanlines of `raw` (rows of bytes, `bpp` bytes a pixel): each its filter type
    byte and its bytes filtered (none, sub, up, average, Paeth; uint8 arithmetic wraps as PNG's)."""
    prev = np.zeros(raw.shape[1], np.uint8)
    for y0 in range(0, raw.shape[0], _PNG_ROWS_PER_BLOCK):
        x = raw[y0 : y0 + _PNG_ROWS_PER_BLOCK]
        up = np.concatenate([prev[None], x[:-1]])
        left, upleft = np.zeros_like(x), np.zeros_like(x)
        left[:, bpp:], upleft[:, bpp:] = x[:, :-bpp], up[:, :-bpp]
        a, b, c = left.astype(np.int16), up.astype(np.int16), upleft.astype(np.int16)
        pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        average = (left >> 1) + (up >> 1) + (left & up & 1)
        filtered = [x, x - left, x - up, x - average, x - paeth]
        best = np.stack([np.minimum(f, 0 - f).sum(axis=1, dtype=np.int64) for f in filtered]).argmin(axis=0)
        lines = np.empty((x.shape[0], x.shape[1] + 1), np.uint8)
        lines[:, 0] = best
        for kind, f in enumerate(filtered):
            lines[best == kind, 1:] = f[best == kind]
        yield lines.tobytes()
        prev = x[-1]


def write_tiff(path: Path, pixels: np.ndarray, icc: bytes | None = None) -> None:
    """A 16-bit TIFF of uint16 HxWxC (C = 1-4; the 2nd or 4th channel is alpha), deflate-compressed,
    with the ICC profile given."""
    import tifffile

    c = pixels.shape[2]
    tifffile.imwrite(
        path,
        pixels[..., 0] if c == 1 else pixels,
        photometric="minisblack" if c <= 2 else "rgb",
        planarconfig=None if c == 1 else "contig",
        extrasamples=("unassalpha",) if c in (2, 4) else None,
        compression="zlib",
        predictor=True,
        iccprofile=icc,
        software=False,
        metadata=None,
    )


def widen(rgb: np.ndarray, like: np.ndarray) -> np.ndarray:
    """8-bit RGB at 16 bits (x 257) in the channel layout of `like` (uint16 HxWxC, C = 1-4): its
    luma for grey, and `like`'s alpha, resized, for the alpha (e.g. a restored --aligned crop)."""
    wide = rgb.astype(np.float32) * np.float32(257)
    if like.shape[2] <= 2:
        wide = wide @ GREY_WEIGHTS
    colour = np.clip(np.rint(wide), 0, 65535).astype(np.uint16).reshape(*rgb.shape[:2], -1)
    if like.shape[2] in (1, 3):
        return colour
    alpha = cv2.resize(like[..., -1], (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_AREA)
    return np.concatenate([colour, alpha[..., None]], axis=2)
