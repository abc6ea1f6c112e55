"""Hostile inputs for `facerestore restore` (issue #21), all made on the fly: one run over a folder
of broken, mislabelled, huge-claiming, odd and good files. Each bad file gets one error line
naming it and why, each good one its output, the run goes on and exits 1, nothing already in the
output folder is overwritten, and memory stays bounded (a decompression bomb is refused from its
header, never decoded)."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

from facerestore_cli.io.files import MediaError
from facerestore_cli.io.high_depth import encode_png, write_tiff
from facerestore_cli.io.images import read_image
from facerestore_cli.io.video import ffmpeg_exe, probe_video, read_video_frames

#: Runs the CLI and reports its own peak resident memory (kB) on stderr, whatever the exit.
RUN_CLI = """
import resource, sys
from facerestore_cli.cli import main
try:
    main(sys.argv[1:], prog_name="facerestore")
finally:
    print(f"PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""
PEAK_RSS_LIMIT_KB = 3 * 2**20  # 3 GB; the 40000x40000 bomb alone would take 4.8 GB decoded

#: Each bad input and a word its error line must give.
BAD = {
    "truncated.png": "truncated",
    "zero.jpg": "empty",
    "text.png": "not a recognised image format",
    "bomb.png": "too large",
    "bomb16.tif": "too large",
    "cut16.tif": "truncated",
    "audio_only.mp4": "no video stream",
    "truncated.mp4": "truncated",
    "cut_faststart.mp4": "truncated",
}
#: Good inputs without faces: passed through byte for byte.
PASSED_THROUGH = ["good.png", "png_named.jpg", "one_pixel.png", "cmyk.jpg", "deep16.png", "deep16.tif", "grey_alpha.png"]
PASSED_THROUGH += ["grey_alpha16.png"]


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def clip(path: Path, size: str, *extra: str) -> Path:
    """A 1-second, 10-frame H.264 test pattern."""
    encode = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast"]
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size={size}:rate=10:duration=1", *encode, *extra, str(path))
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png() -> bytes:
    """A 74-byte PNG whose header claims 40000x40000 RGB (4.8 GB decoded)."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + png_chunk(b"IEND", b"")


def bomb_tiff(path: Path) -> Path:
    """A tiny 16-bit grey + alpha TIFF (which Pillow cannot open, so tifffile reads it) whose
    header is then made to claim 40000x40000."""
    write_tiff(path, np.zeros((4, 4, 2), np.uint16))
    with tifffile.TiffFile(path) as tif:
        tags, order = tif.pages[0].tags, tif.byteorder
        fields = [(tags[code].valueoffset, "H" if tags[code].dtype == 3 else "I") for code in (256, 257)]
    data = bytearray(path.read_bytes())
    for offset, kind in fields:
        struct.pack_into(order + kind, data, offset, 40000)
    path.write_bytes(bytes(data))
    return path


def smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)


def make_inputs(folder: Path) -> None:
    folder.mkdir(parents=True)
    rgb = smooth(24, 32)
    Image.fromarray(rgb).save(folder / "good.png")
    whole = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    Image.fromarray(rgb).save(folder / "png_named.jpg", format="PNG")
    (folder / "bomb.png").write_bytes(bomb_png())
    bomb_tiff(folder / "bomb16.tif")
    Image.fromarray(rgb[:1, :1]).save(folder / "one_pixel.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    deep = rgb.astype(np.uint16) * 257 + 100
    (folder / "deep16.png").write_bytes(encode_png(deep))
    write_tiff(folder / "deep16.tif", deep)
    tiff = (folder / "deep16.tif").read_bytes()
    (folder / "cut16.tif").write_bytes(tiff[: len(tiff) * 2 // 3])
    Image.fromarray(rgb[..., 0]).convert("LA").save(folder / "grey_alpha.png")
    (folder / "grey_alpha16.png").write_bytes(encode_png(np.dstack([deep[..., :1], deep[..., 1:2]])))
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(folder / "audio_only.mp4"))
    work = folder.parent / "work"
    work.mkdir()
    first, second = clip(work / "a.mp4", "64x48"), clip(work / "b.mp4", "48x32")
    movie = first.read_bytes()  # its index (moov) is at the end: cut, it is not a movie
    (folder / "truncated.mp4").write_bytes(movie[: len(movie) // 2])
    indexed = clip(work / "c.mp4", "64x48", "-movflags", "+faststart").read_bytes()  # index first: the frames are cut
    (folder / "cut_faststart.mp4").write_bytes(indexed[: len(indexed) // 2])
    (work / "list.txt").write_text(f"file '{first}'\nfile '{second}'\n")
    ffmpeg("-f", "concat", "-safe", "0", "-i", str(work / "list.txt"), "-c", "copy", str(folder / "size_change.mp4"))


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """`facerestore restore ARGS --device cpu` in a fresh process; its result and peak RSS (kB)."""
    cmd = [sys.executable, "-c", RUN_CLI, "restore", *args, "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB ")]
    assert peak, proc.stderr
    return proc, int(peak[-1].split()[1])


def message_lines(output: str) -> list[str]:
    """The output's lines, less the progress bar's (which names the file it is on)."""
    return [line for line in output.splitlines() if "━" not in line]


def test_restore_survives_a_folder_of_hostile_inputs(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    make_inputs(src)
    out.mkdir()
    (out / "truncated.png").write_bytes(b"an output of an earlier run")  # the input now fails: keep it
    (out / "notes.txt").write_text("the user's own file")
    proc, peak_kb = run_cli(str(src), "-o", str(out))
    output = proc.stdout + proc.stderr
    lines = message_lines(output)
    assert proc.returncode == 1, output
    before_summary = lines[: next(i for i, line in enumerate(lines) if "facerestore summary" in line)]
    assert all(line.startswith("error: ") for line in before_summary if line.strip()), f"stray lines:\n{output}"
    for name, why in BAD.items():
        named = [line for line in lines if name in line]
        assert len(named) == 1, f"{name}: expected one line, got {named}\n{output}"
        assert "error" in named[0] and why in named[0], f"{name}: {named[0]}"
        assert not (out / name).exists() or name == "truncated.png"
    for name in PASSED_THROUGH:
        assert not [line for line in lines if name in line and "error" in line], output
        assert (out / name).read_bytes() == (src / name).read_bytes(), f"{name} must be passed through unchanged"
    frames = list(read_video_frames(out / "size_change.mp4"))
    info = probe_video(out / "size_change.mp4")
    assert (info.width, info.height) == (64, 48) and len(frames) == 20, "both clips, at the first one's size"
    assert (out / "truncated.png").read_bytes() == b"an output of an earlier run"
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert not [p for p in out.rglob(".*")], "no temp files left behind"
    assert peak_kb < PEAK_RSS_LIMIT_KB, f"peak RSS {peak_kb / 2**20:.2f} GB"


def test_bombs_are_refused_from_their_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither Pillow nor tifffile decodes a single pixel of an image that claims 40000x40000."""

    def decoded(*args: object, **kwargs: object) -> None:
        raise AssertionError("a bomb was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", decoded)
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    for path in (tmp_path / "bomb.png", bomb_tiff(tmp_path / "bomb.tif")):
        with pytest.raises(MediaError, match="too large to process safely") as info:
            read_image(path)
        assert info.value.path == path


@pytest.mark.slow
def test_an_8000x6000_photo(tmp_path: Path) -> None:
    """A 48-MP photo (flat, no face) is searched and written through; about 30 s on 2 CPU cores,
    most of it MTCNN on the whole photo, which also holds most of the memory."""
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (8000, 6000), (90, 120, 150)).save(src / "huge.jpg", quality=90)
    proc, peak_kb = run_cli(str(src), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out" / "huge.jpg").read_bytes() == (src / "huge.jpg").read_bytes()
    assert peak_kb < 5 * 2**20, f"peak RSS {peak_kb / 2**20:.2f} GB"
