"""Finding inputs and reading/writing images and videos (audio kept).

Everything here works on numpy ``uint8`` RGB ``HxWx3`` arrays, the convention at library
boundaries (see docs/DESIGN.md). Outputs are always written atomically (temp file in the
destination folder, then ``os.replace``) so an interrupted run never leaves a half-written
file, and an input file is never overwritten.

Video goes through the ffmpeg binary bundled with ``imageio-ffmpeg`` (no system ffmpeg
needed). Decoded frames are upright (ffmpeg applies rotation metadata) and resampled to a
constant frame rate, so ``frame_count / fps`` matches the audio we copy back in.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import re
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
VIDEO_EXTS: frozenset[str] = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm"})

_GLOB_CHARS = "*?["


class MediaError(Exception):
    """A problem with one input or output file, reported to the user as ``PATH: reason``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        # Both in args so the error survives pickling (multiprocessing workers).
        super().__init__(str(path), reason)
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())  # always one line

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# --------------------------------------------------------------------------------------
# Input discovery
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputItem:
    """One file to restore; ``rel`` is where it goes under the output folder."""

    path: Path
    rel: Path
    kind: Literal["image", "video"]


def media_kind(path: str | os.PathLike[str]) -> Literal["image", "video"] | None:
    """``"image"``/``"video"`` from the extension (case-insensitive), else None."""
    ext = Path(path).suffix.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    return None


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _has_glob(spec: str) -> bool:
    return any(c in spec for c in _GLOB_CHARS)


def _is_excluded(path: Path, exclude: Sequence[Path]) -> bool:
    if not exclude:
        return False
    resolved = path.resolve()
    return any(resolved == ex or ex in resolved.parents for ex in exclude)


def _walk_folder(folder: Path, base: Path, exclude: Sequence[Path]) -> tuple[list[InputItem], int]:
    """All supported files under ``folder`` (sorted, hidden skipped) and how many were skipped."""
    items: list[InputItem] = []
    skipped = 0
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        dirs[:] = sorted(
            d for d in dirs if not _is_hidden(d) and not _is_excluded(root_path / d, exclude)
        )
        for name in sorted(files):
            if _is_hidden(name):
                continue
            path = root_path / name
            kind = media_kind(path)
            if kind is None:
                skipped += 1
                continue
            if not _is_excluded(path, exclude):
                items.append(InputItem(path, path.relative_to(base), kind))
    items.sort(key=lambda item: item.rel.parts)  # path order, not os.walk's files-then-dirs
    return items, skipped


def _explicit_file(path: Path) -> InputItem:
    if not path.is_file():
        raise MediaError(path, "not a regular file")
    kind = media_kind(path)
    if kind is None:
        ext = path.suffix
        raise MediaError(
            path,
            f"unsupported file type '{ext}'" if ext else "unsupported file type (no extension)",
        )
    return InputItem(path, Path(path.name), kind)


def _expand_folder(folder: Path, exclude: Sequence[Path]) -> list[InputItem]:
    items, skipped = _walk_folder(folder, folder, exclude)
    if skipped:
        log.info("%s: skipped %d file(s) that are not images or videos", folder, skipped)
    if not items:
        raise MediaError(folder, "folder contains no images or videos")
    return items


def _glob_base(spec: str) -> Path:
    """The folder part of a pattern before its first wildcard; ``rel`` is taken from here."""
    parts = Path(spec).parts
    fixed: list[str] = []
    for part in parts:
        if _has_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _expand_glob(spec: str, exclude: Sequence[Path]) -> list[InputItem]:
    matches = sorted(glob.glob(spec, recursive=True))
    if not matches:
        raise MediaError(spec, "no files match this pattern")
    base = _glob_base(spec)
    items: list[InputItem] = []
    for match in matches:
        path = Path(match)
        if path.is_dir():
            items.extend(_walk_folder(path, base, exclude)[0])
            continue
        kind = media_kind(path)
        if kind is not None and path.is_file() and not _is_excluded(path, exclude):
            items.append(InputItem(path, path.relative_to(base), kind))
    if not items:
        raise MediaError(spec, "pattern matches no images or videos")
    return items


def _expand_spec(spec: str, exclude: Sequence[Path]) -> list[InputItem]:
    path = Path(spec).expanduser()
    if path.is_dir():
        return _expand_folder(path, exclude)
    if path.exists():
        return [_explicit_file(path)]
    if _has_glob(spec):
        return _expand_glob(str(path), exclude)
    raise MediaError(path, "no such file or folder")


def _unique_rel(rel: Path, taken: set[str]) -> Path:
    """``rel`` or ``stem_2.ext``, ``stem_3.ext``... so two inputs never share an output."""
    candidate, n = rel, 1
    while str(candidate).lower() in taken:  # lower(): case-insensitive filesystems
        n += 1
        candidate = rel.with_name(f"{rel.stem}_{n}{rel.suffix}")
    return candidate


def discover_inputs(
    specs: Sequence[str], *, exclude: Sequence[str | os.PathLike[str]] = ()
) -> tuple[list[InputItem], list[MediaError]]:
    """Expand files, folders (recursive) and globs into a de-duplicated list of inputs.

    Bad specs become errors rather than exceptions so one typo doesn't stop a batch.
    ``exclude`` lists folders to leave out (e.g. the output folder when it sits inside an
    input folder, so a second run doesn't restore its own outputs). When two inputs would
    land on the same output path, later ones get ``_2``, ``_3``... appended to their name.
    """
    excluded = [Path(p).expanduser().resolve() for p in exclude]
    items: list[InputItem] = []
    errors: list[MediaError] = []
    seen: set[Path] = set()
    taken: set[str] = set()
    for spec in specs:
        try:
            found = _expand_spec(spec, excluded)
        except MediaError as err:
            errors.append(err)
            continue
        for item in found:
            key = item.path.resolve()
            if key in seen:
                continue
            seen.add(key)
            rel = _unique_rel(item.rel, taken)
            taken.add(str(rel).lower())
            items.append(item if rel == item.rel else InputItem(item.path, rel, item.kind))
    return items, errors


# --------------------------------------------------------------------------------------
# Output paths
# --------------------------------------------------------------------------------------


def output_path_for(
    item: InputItem, outdir: Path, suffix: str | None = None, *, ext: str | None = None
) -> Path:
    """``outdir/rel`` (with ``suffix`` before the extension, ``ext`` replacing it).

    Raises MediaError when that is the input file itself: inputs are never overwritten.
    """
    out = Path(outdir) / item.rel
    if suffix or ext:
        new_ext = out.suffix if ext is None else "." + ext.lstrip(".")
        out = out.with_name(f"{out.stem}{suffix or ''}{new_ext}")
    same = out.resolve() == item.path.resolve()
    if not same and out.exists():
        with suppress(OSError):
            same = os.path.samefile(out, item.path)  # hard links, case-insensitive FS
    if same:
        raise MediaError(
            item.path, "output would overwrite the input; choose another output folder or a suffix"
        )
    return out


def check_outdir(outdir: Path) -> Path:
    """Create ``outdir`` and prove it is writable now, before hours of work are done."""
    outdir = Path(outdir).expanduser()
    if outdir.exists() and not outdir.is_dir():
        raise MediaError(outdir, "output folder path exists and is a file")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MediaError(outdir, f"cannot create output folder: {err.strerror or err}") from err
    try:
        with tempfile.TemporaryFile(dir=outdir):
            pass
    except OSError as err:
        raise MediaError(outdir, f"output folder is not writable: {err.strerror or err}") from err
    return outdir


@lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_path_for(path: Path) -> Path:
    """A fresh hidden temp file next to ``path`` (same filesystem, so os.replace is atomic)."""
    fd, name = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    return Path(name)


def _publish(tmp: Path, path: Path) -> None:
    """Give the temp file normal permissions (mkstemp makes 0600) and move it into place."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def _unlink_quietly(path: Path | None) -> None:
    if path is not None:
        with suppress(FileNotFoundError):
            path.unlink()


def copy_file(src: Path, dst: Path) -> Path:
    """Copy bytes unchanged (an image without faces is passed through, not re-encoded), atomically."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path_for(dst)
    try:
        shutil.copyfile(src, tmp)
        _publish(tmp, dst)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return dst


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


@dataclass
class LoadedImage:
    """Decoded, upright image plus what we need to write the result back faithfully.

    ``rgb`` is always 8-bit 3-channel (what the model wants); 16-bit files are reduced to
    8 bits on read and ``bit_depth`` only records what the file had.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    is_grey: bool = False
    bit_depth: int = 8
    exif: bytes | None = None
    icc: bytes | None = None

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
    return np.clip(np.rint(arr.astype(np.float32) / 257.0), 0, 255).astype(np.uint8)


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


def _upright(img: Image.Image) -> tuple[Image.Image, bytes | None]:
    """Apply EXIF orientation; returns the image and its EXIF without the orientation tag.

    Broken EXIF is common in phone/editor output: keep the pixels, drop the metadata.
    """
    try:
        upright = ImageOps.exif_transpose(img) or img
    except Exception as err:  # Pillow raises many types on malformed EXIF
        log.debug("ignoring unreadable EXIF: %s", err)
        return img, None
    exif = upright.info.get("exif")
    return upright, exif if isinstance(exif, bytes) and exif else None


def _channels_equal(rgb: np.ndarray) -> bool:
    return bool(
        np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    )


def read_image(path: str | os.PathLike[str]) -> LoadedImage:
    """Decode an image upright (EXIF orientation applied) as RGB uint8 plus alpha/metadata.

    Raises MediaError for empty, truncated, corrupt or unreadable files.
    """
    path = Path(path)
    img, depth = _open_decoded(path)
    src_mode = img.mode
    try:
        upright, exif = _upright(img)
        rgb, alpha = _split_pixels(upright)
    except (OSError, SyntaxError, ValueError) as err:
        raise MediaError(path, _decode_reason(err)) from err
    finally:
        img.close()
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
    )


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
    if like.icc and fmt in _ICC_FORMATS:
        space = _icc_colour_space(like.icc)
        wanted = "GRAY" if img.mode in {"L", "LA"} else "RGB "
        if space == wanted:
            opts["icc_profile"] = like.icc
    return opts


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
    """
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise MediaError(path, f"unsupported image type '{path.suffix}'")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3 RGB, got {rgb.dtype} {rgb.shape}")
    img = _compose(np.ascontiguousarray(rgb), like, fmt)
    opts = _save_options(img, like, fmt, quality)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_path_for(path)
        img.save(tmp, **opts)
        _publish(tmp, path)
        tmp = None
    except OSError as err:
        raise MediaError(path, f"cannot write image: {err.strerror or err}") from err
    finally:
        _unlink_quietly(tmp)
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


# --------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@dataclass(frozen=True)
class VideoInfo:
    """What we need to decode a video and write it back with the same timing.

    ``width``/``height`` are of the upright frames we decode (rotation applied);
    ``frame_count`` is ``round(duration * fps)``, an estimate.
    """

    fps: float
    frame_count: int
    width: int
    height: int
    has_audio: bool
    duration: float
    codec: str = ""
    audio_codecs: tuple[str, ...] = field(default_factory=tuple)
    rotation: int = 0


_DURATION_RE = re.compile(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)")
_STREAM_RE = re.compile(r"^\s*Stream #\d+:\d+\S*: (Video|Audio): (\S+)")
_SIZE_RE = re.compile(r"[ ,](\d{1,6})x(\d{1,6})[ ,\]]")
_FPS_RE = re.compile(r"(\d+(?:\.\d+)?)(k?) (fps|tbr)")
_ROTATION_RE = re.compile(r"rotation of (-?\d+(?:\.\d+)?) degrees", re.IGNORECASE)


def _run_ffmpeg(args: list[str], timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
    )


# ffmpeg's wording → what a user can act on; checked in order.
_FFMPEG_HINTS = (
    ("moov atom not found", "file is damaged or truncated (moov atom not found)"),
    ("Invalid data found", "not a recognised video format or the file is damaged"),
    ("Could not find codec parameters", "unknown codec or damaged file"),
    ("Permission denied", "permission denied"),
)


def _ffmpeg_error_line(stderr: str) -> str:
    """The most telling part of ffmpeg's complaint, for one-line error messages."""
    for needle, hint in _FFMPEG_HINTS:
        if needle in stderr:
            return hint
    lines = [re.sub(r"^\[[^\]]*\]\s*", "", ln.strip()) for ln in stderr.splitlines()]
    useful = [ln for ln in lines if ln and "output file" not in ln and "Error opening" not in ln]
    for ln in reversed(useful):
        if "rror" in ln:
            return ln
    return useful[-1] if useful else "unknown ffmpeg error"


def _parse_fps(line: str) -> float:
    """Prefer 'fps' (average rate) over 'tbr'; '1k tbr' style values are nonsense for us."""
    found = {kind: (float(num), k) for num, k, kind in _FPS_RE.findall(line)}
    for kind in ("fps", "tbr"):
        if kind in found and not found[kind][1] and found[kind][0] > 0:
            return found[kind][0]
    return 0.0


def _parse_probe(path: Path, stderr: str) -> VideoInfo:
    video_lines: list[tuple[int, str]] = []
    audio_codecs: list[str] = []
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        m = _STREAM_RE.match(line)
        if not m:
            continue
        if m.group(1) == "Audio":
            audio_codecs.append(m.group(2).rstrip(","))
        elif "(attached pic)" not in line:
            video_lines.append((i, line))
    if not video_lines:
        if "Invalid data" in stderr or "Error opening input" in stderr or "moov atom" in stderr:
            raise MediaError(path, f"cannot read video: {_ffmpeg_error_line(stderr)}")
        raise MediaError(path, "video has no frames (no video stream)")
    idx, vline = video_lines[0]
    size = _SIZE_RE.search(vline)
    if size is None:
        raise MediaError(path, f"cannot read video: {_ffmpeg_error_line(stderr)}")
    width, height = int(size.group(1)), int(size.group(2))
    rotation = _stream_rotation(lines, idx)
    if rotation % 180 == 90:
        width, height = height, width
    dur = _DURATION_RE.search(stderr)
    duration = (
        int(dur.group(1)) * 3600 + int(dur.group(2)) * 60 + float(dur.group(3)) if dur else 0.0
    )
    fps = _parse_fps(vline)
    return VideoInfo(
        fps=fps,
        frame_count=round(duration * fps),
        width=width,
        height=height,
        has_audio=bool(audio_codecs),
        duration=duration,
        codec=_STREAM_RE.match(vline).group(2).rstrip(","),  # type: ignore[union-attr]
        audio_codecs=tuple(audio_codecs),
        rotation=rotation,
    )


def _stream_rotation(lines: list[str], stream_idx: int) -> int:
    """Display-matrix rotation in degrees (0/90/180/270) from the stream's side data."""
    for line in lines[stream_idx + 1 :]:
        if _STREAM_RE.match(line):
            break
        m = _ROTATION_RE.search(line)
        if m:
            return round(float(m.group(1))) % 360
    return 0


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Read fps/size/duration/audio from ffmpeg's header dump (no decode, fast)."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "no such file")
    if path.stat().st_size == 0:
        raise MediaError(path, "file is empty (0 bytes)")
    try:
        proc = _run_ffmpeg(["-i", str(path)], timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise MediaError(path, f"cannot run ffmpeg: {err}") from err
    return _parse_probe(path, proc.stderr)


def fps_fraction(fps: float) -> Fraction:
    """Exact rate for ffmpeg: 29.97 → 30000/1001 (ffmpeg prints NTSC rates rounded)."""
    for base in (24, 30, 48, 60, 120, 240):
        ntsc = Fraction(base * 1000, 1001)
        if abs(fps - float(ntsc)) < 0.006:
            return ntsc
    return Fraction(fps).limit_denominator(1001)


class VideoReader:
    """Iterate upright RGB uint8 frames of a video at a constant frame rate.

    Frames are exactly ``info.width x info.height`` (ffmpeg is told to produce that size, so
    a misparsed header can distort but never misalign frames). Use as a context manager
    (or call ``close``) to stop ffmpeg early.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.info = probe_video(self.path)
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the decoder (safe to call twice)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            if proc.stdout is not None:
                proc.stdout.close()
            proc.wait()

    def _command(self) -> list[str]:
        w, h = self.info.width, self.info.height
        cmd = [
            ffmpeg_exe(),
            "-hide_banner",
            "-nostdin",
            "-loglevel",
            "error",
            "-i",
            str(self.path),
            "-map",
            "0:V:0",
            "-vf",
            f"scale={w}:{h}",
        ]
        if self.info.fps > 0:
            # Constant rate: phone videos are often VFR, and we write CFR next to the audio.
            rate = fps_fraction(self.info.fps)
            cmd += ["-fps_mode", "cfr", "-r", f"{rate.numerator}/{rate.denominator}"]
        return cmd + ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]

    def __iter__(self) -> Iterator[np.ndarray]:
        self.close()
        w, h = self.info.width, self.info.height
        frame_bytes = w * h * 3
        count = 0
        with tempfile.TemporaryFile() as errlog:
            try:
                proc = subprocess.Popen(
                    self._command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errlog
                )
            except OSError as err:
                raise MediaError(self.path, f"cannot run ffmpeg: {err}") from err
            self._proc = proc
            try:
                assert proc.stdout is not None
                while len(buf := proc.stdout.read(frame_bytes)) == frame_bytes:
                    count += 1
                    yield np.frombuffer(buf, np.uint8).reshape(h, w, 3)
                rc = proc.wait()
            finally:
                self.close()  # also runs when the consumer stops early
            errlog.seek(0)
            stderr = errlog.read().decode("utf-8", "replace")
        if count == 0:
            detail = f": {_ffmpeg_error_line(stderr)}" if rc != 0 else ""
            raise MediaError(self.path, f"video has no frames{detail}")
        if rc != 0:
            raise MediaError(
                self.path, f"decoding stopped after {count} frames: {_ffmpeg_error_line(stderr)}"
            )


def read_video_frames(path: str | os.PathLike[str]) -> Iterator[np.ndarray]:
    """RGB uint8 frames of ``path``; MediaError if unreadable or it has no frames."""
    with VideoReader(path) as reader:
        yield from reader


# Containers we write: ffmpeg muxer name, video encoder preference, audio codecs that can be
# stream-copied into it, and the encoder used when the source audio can't be copied.
_CONTAINERS: dict[str, tuple[str, tuple[str, ...], frozenset[str], tuple[str, str]]] = {
    ".mp4": (
        "mp4",
        ("libx264", "libopenh264", "mpeg4"),
        frozenset({"aac", "mp3", "ac3", "eac3", "alac", "opus", "flac"}),
        ("aac", "192k"),
    ),
    ".mov": (
        "mov",
        ("libx264", "libopenh264", "mpeg4"),
        frozenset(
            {
                "aac",
                "mp3",
                "ac3",
                "eac3",
                "alac",
                "pcm_s16le",
                "pcm_s16be",
                "pcm_s24le",
                "pcm_s32le",
                "pcm_f32le",
            }
        ),
        ("aac", "192k"),
    ),
    ".mkv": ("matroska", ("libx264", "libopenh264", "mpeg4"), frozenset(), ("aac", "192k")),
    ".avi": (
        "avi",
        ("libx264", "libopenh264", "mpeg4"),
        frozenset({"mp3", "ac3", "pcm_s16le", "pcm_u8", "aac"}),
        ("libmp3lame", "192k"),
    ),
    ".webm": ("webm", ("libvpx-vp9", "libvpx"), frozenset({"opus", "vorbis"}), ("libopus", "128k")),
}


@lru_cache(maxsize=1)
def _available_encoders() -> frozenset[str]:
    proc = _run_ffmpeg(["-encoders"], timeout=30)
    names = set()
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and len(parts[0]) == 6 and parts[0][0] in "VAS":
            names.add(parts[1])
    return frozenset(names)


def _pick_encoder(ext: str) -> str:
    for name in _CONTAINERS[ext][1]:
        if name in _available_encoders():
            return name
    raise MediaError(Path(ext), "the bundled ffmpeg has no suitable video encoder")


def _mux_flags(ext: str) -> list[str]:
    """mp4/mov: put the index first so players can start before the whole file loads."""
    return ["-movflags", "+faststart"] if ext in {".mp4", ".mov"} else []


def _container_codec_args(ext: str) -> list[str]:
    """AVI stores no presentation timestamps: B-frames would delay the video vs the audio."""
    return ["-bf", "0"] if ext == ".avi" else []


def _video_codec_args(encoder: str, crf: int) -> list[str]:
    colour = ["-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709"]
    if encoder == "libx264":
        args = ["-c:v", "libx264", "-preset", "medium", "-crf", str(crf)]
    elif encoder == "libvpx-vp9":
        # VP9 crf scale is 0-63; +13 keeps roughly the same visual quality as x264's.
        args = [
            "-c:v",
            "libvpx-vp9",
            "-crf",
            str(min(63, crf + 13)),
            "-b:v",
            "0",
            "-row-mt",
            "1",
            "-deadline",
            "good",
            "-cpu-used",
            "4",
        ]
    elif encoder == "libvpx":
        args = ["-c:v", "libvpx", "-crf", str(min(63, crf + 6)), "-b:v", "10M"]
    else:
        args = ["-c:v", encoder, "-q:v", "2"]
    return (
        args + ["-pix_fmt", "yuv420p", "-vf", "scale=out_color_matrix=bt709:out_range=tv"] + colour
    )


class VideoWriter:
    """Encode RGB frames to a video and mux the source's audio back in, atomically.

    H.264 (libx264, yuv420p) for mp4/mov/mkv/avi and VP9 for webm. Odd widths/heights are
    padded up to even by repeating the last row/column (yuv420p needs even sizes). Audio
    streams of ``audio_from`` are stream-copied when the container accepts the codec, else
    re-encoded (AAC; Opus for webm; MP3 for avi). Nothing appears at ``out_path`` unless
    ``close`` succeeds; on an exception inside ``with`` the temp files are removed.
    """

    def __init__(
        self,
        out_path: str | os.PathLike[str],
        fps: float,
        size: tuple[int, int],
        audio_from: str | os.PathLike[str] | None = None,
        crf: int = 18,
    ) -> None:
        self.out_path = Path(out_path)
        ext = self.out_path.suffix.lower()
        if ext not in _CONTAINERS:
            raise MediaError(self.out_path, f"unsupported video type '{self.out_path.suffix}'")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = fps
        self.size = (int(size[0]), int(size[1]))
        self.audio_from = Path(audio_from) if audio_from is not None else None
        self.crf = crf
        self.frames_written = 0
        self._ext = ext
        self._padded = (self.size[0] + self.size[0] % 2, self.size[1] + self.size[1] % 2)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._tmp_video: Path | None = None
        self._done = False
        self._start()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _start(self) -> None:
        codec_args = _video_codec_args(_pick_encoder(self._ext), self.crf)
        try:
            self.out_path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp_video = _temp_path_for(self.out_path)
            rate = fps_fraction(self.fps)
            w, h = self._padded
            cmd = [
                ffmpeg_exe(),
                "-hide_banner",
                "-nostdin",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "rawvideo",
                "-pix_fmt",
                "rgb24",
                "-s",
                f"{w}x{h}",
                "-framerate",
                f"{rate.numerator}/{rate.denominator}",
                "-i",
                "-",
                *codec_args,
                *_container_codec_args(self._ext),
                "-an",
                *_mux_flags(self._ext),
                "-f",
                _CONTAINERS[self._ext][0],
                str(self._tmp_video),
            ]
            self._log = tempfile.TemporaryFile()
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log
            )
        except OSError as err:
            self.abort()
            raise MediaError(self.out_path, f"cannot write video: {err.strerror or err}") from err

    def _ffmpeg_log(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def _pad(self, frame: np.ndarray) -> np.ndarray:
        w, h = self.size
        if (w, h) == self._padded:
            return frame
        return np.pad(
            frame, ((0, self._padded[1] - h), (0, self._padded[0] - w), (0, 0)), mode="edge"
        )

    def write(self, frame: np.ndarray) -> None:
        """Append one RGB uint8 frame of exactly ``size``."""
        if self._done or self._proc is None or self._proc.stdin is None:
            raise RuntimeError("VideoWriter is closed")
        w, h = self.size
        if frame.dtype != np.uint8 or frame.shape != (h, w, 3):
            raise ValueError(
                f"expected uint8 frame of shape {(h, w, 3)}, got {frame.dtype} {frame.shape}"
            )
        try:
            self._proc.stdin.write(np.ascontiguousarray(self._pad(frame)).tobytes())
        except (BrokenPipeError, OSError) as err:
            self._proc.wait()
            msg = _ffmpeg_error_line(self._ffmpeg_log())
            self.abort()
            raise MediaError(self.out_path, f"video encoder failed: {msg}") from err
        self.frames_written += 1

    def close(self) -> Path:
        """Finish encoding, add audio, move the result into place; returns ``out_path``."""
        if self._done:
            return self.out_path
        try:
            self._finish_encoder()
            if self.frames_written == 0:
                raise MediaError(self.out_path, "no frames were written")
            assert self._tmp_video is not None
            source = probe_video(self.audio_from) if self.audio_from is not None else None
            if source is not None and source.has_audio:
                self._mux_audio(source.audio_codecs)
            else:
                _publish(self._tmp_video, self.out_path)
                self._tmp_video = None
        except BaseException:
            self.abort()
            raise
        self._done = True
        self._cleanup()
        return self.out_path

    def abort(self) -> None:
        """Stop ffmpeg and remove temp files; the output path is left untouched."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            if self._proc.stdin is not None:
                with suppress(OSError):
                    self._proc.stdin.close()
            self._proc.wait()
        self._done = True
        self._cleanup()

    def _cleanup(self) -> None:
        _unlink_quietly(self._tmp_video)
        self._tmp_video = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _finish_encoder(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        with suppress(OSError):  # already broken pipe: ffmpeg's exit code tells the story
            self._proc.stdin.close()
        rc = self._proc.wait()
        if rc != 0:
            raise MediaError(
                self.out_path, f"video encoder failed: {_ffmpeg_error_line(self._ffmpeg_log())}"
            )

    def _audio_args(self, codecs: Sequence[str]) -> list[str]:
        """Per-stream: copy when the container takes the codec, else re-encode."""
        copyable, (encoder, bitrate) = _CONTAINERS[self._ext][2], _CONTAINERS[self._ext][3]
        args: list[str] = []
        for i, codec in enumerate(codecs):
            if self._ext == ".mkv" or codec in copyable:
                args += [f"-c:a:{i}", "copy"]
            else:
                args += [f"-c:a:{i}", encoder, f"-b:a:{i}", bitrate]
        return args

    def _mux_audio(self, codecs: Sequence[str]) -> None:
        """Second pass: our video + every audio stream of the source; video is not re-encoded."""
        assert self._tmp_video is not None and self.audio_from is not None
        base = [
            "-i",
            str(self._tmp_video),
            "-i",
            str(self.audio_from),
            "-map",
            "0:v:0",
            "-map",
            "1:a?",
            "-map_metadata",
            "1",
            "-c:v",
            "copy",
        ]
        try:
            self._remux(base + self._audio_args(codecs))
        except MediaError:
            # A copy the muxer accepted in theory but not in practice: re-encode everything.
            encoder, bitrate = _CONTAINERS[self._ext][3]
            self._remux(base + ["-c:a", encoder, "-b:a", bitrate])

    def _remux(self, args: list[str]) -> None:
        tmp = _temp_path_for(self.out_path)
        try:
            proc = _run_ffmpeg(
                [
                    "-loglevel",
                    "error",
                    "-y",
                    *args,
                    *_mux_flags(self._ext),
                    "-f",
                    _CONTAINERS[self._ext][0],
                    str(tmp),
                ]
            )
            if proc.returncode != 0:
                raise MediaError(
                    self.out_path, f"cannot mux video: {_ffmpeg_error_line(proc.stderr)}"
                )
            _publish(tmp, self.out_path)
            tmp = None  # type: ignore[assignment]
        finally:
            _unlink_quietly(tmp)
