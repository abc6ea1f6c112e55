"""Writing RGB uint8 frames to a video with the input's audio copied back in, atomically.

The encoder is the best the bundled ffmpeg has for the container (H.264 where present).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from contextlib import suppress
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import IO

import numpy as np

from facerestore_cli.io.files import MediaError, publish, temp_path_for, unlink_quietly
from facerestore_cli.io.video import (
    _CONTAINERS,
    _ffmpeg_error_line,
    _run_ffmpeg,
    ffmpeg_exe,
    fps_fraction,
    probe_video,
)


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
    return args + ["-pix_fmt", "yuv420p", "-vf", "scale=out_color_matrix=bt709:out_range=tv"] + colour


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
            self._tmp_video = temp_path_for(self.out_path)
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
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log)
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
        return np.pad(frame, ((0, self._padded[1] - h), (0, self._padded[0] - w), (0, 0)), mode="edge")

    def write(self, frame: np.ndarray) -> None:
        """Append one RGB uint8 frame of exactly ``size``."""
        if self._done or self._proc is None or self._proc.stdin is None:
            raise RuntimeError("VideoWriter is closed")
        w, h = self.size
        if frame.dtype != np.uint8 or frame.shape != (h, w, 3):
            raise ValueError(f"expected uint8 frame of shape {(h, w, 3)}, got {frame.dtype} {frame.shape}")
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
                publish(self._tmp_video, self.out_path)
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
        unlink_quietly(self._tmp_video)
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
            raise MediaError(self.out_path, f"video encoder failed: {_ffmpeg_error_line(self._ffmpeg_log())}")

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
        tmp = temp_path_for(self.out_path)
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
                raise MediaError(self.out_path, f"cannot mux video: {_ffmpeg_error_line(proc.stderr)}")
            publish(tmp, self.out_path)
            tmp = None  # type: ignore[assignment]
        finally:
            unlink_quietly(tmp)
