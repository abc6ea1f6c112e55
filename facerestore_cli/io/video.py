"""Reading and writing videos as RGB ``uint8`` frames, with their audio kept.

Video goes through the ffmpeg binary bundled with ``imageio-ffmpeg`` (no system ffmpeg
needed). Decoded frames are upright (ffmpeg applies rotation metadata) and resampled to a
constant frame rate, so ``frame_count / fps`` matches the audio we copy back in.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from facerestore_cli.io.files import MediaError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Input discovery
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Output paths
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


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
    duration = int(dur.group(1)) * 3600 + int(dur.group(2)) * 60 + float(dur.group(3)) if dur else 0.0
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
                proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errlog)
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
        cut = "partial file" in stderr  # a file cut off after its header: ffmpeg says so, yet exits 0
        if count == 0:
            detail = ": file is truncated" if cut else f": {_ffmpeg_error_line(stderr)}" if rc != 0 else ""
            raise MediaError(self.path, f"video has no frames{detail}")
        if rc != 0:
            raise MediaError(self.path, f"decoding stopped after {count} frames: {_ffmpeg_error_line(stderr)}")
        if cut:
            raise MediaError(self.path, f"file is truncated: decoding stopped after {count} of about {self.info.frame_count} frames")


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
