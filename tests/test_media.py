"""Tests for facerestore_cli.io: input discovery, image and video I/O.

All media is generated in tmp_path (numpy/PIL/bundled ffmpeg); nothing from ../shared.
"""

from __future__ import annotations

import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from facerestore_cli.io import video as media
from facerestore_cli.io.files import MediaError
from facerestore_cli.io.images import LoadedImage, read_image, resize_image, write_image
from facerestore_cli.io.inputs import InputItem, check_outdir, discover_inputs, output_path_for
from facerestore_cli.io.video import probe_video, read_video_frames
from facerestore_cli.io.video_writer import VideoWriter

FFMPEG = media.ffmpeg_exe()


# ------------------------------------------------------------------ helpers


def _noise(h: int = 40, w: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, rgb: np.ndarray | None = None, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise() if rgb is None else rgb).save(path, **kw)
    return path


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _ffmpeg(*args: str) -> None:
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def _make_video(
    path: Path,
    *,
    audio: str | None = "aac",
    size: str = "64x48",
    rate: int = 10,
    seconds: float = 2,
) -> Path:
    """testsrc video (+ a 440 Hz sine track encoded with ``audio``, if given)."""
    args = ["-f", "lavfi", "-i", f"testsrc=size={size}:rate={rate}:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}:sample_rate=44100"]
        args += ["-c:a", audio]
    args += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast", str(path)]
    _ffmpeg(*args)
    return path


def _audio_seconds(path: Path) -> float:
    """Decoded length of the first audio stream (8 kHz mono s16 → bytes / 16000)."""
    raw = subprocess.run(
        [
            FFMPEG,
            "-v",
            "error",
            "-i",
            str(path),
            "-map",
            "0:a:0",
            "-f",
            "s16le",
            "-ac",
            "1",
            "-ar",
            "8000",
            "-",
        ],
        capture_output=True,
        check=True,
    ).stdout
    return len(raw) / 16000


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.is_file()]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 s, 10 fps, 64x48 H.264 + AAC sine."""
    return _make_video(tmp_path_factory.mktemp("clip") / "clip.mp4")


# ------------------------------------------------------------------ discovery


def test_folder_recursion_keeps_structure_and_skips_hidden(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _save(root / "b.jpg")
    _save(root / "a" / "deep" / "c.PNG")
    _touch(root / "a" / "clip.mp4")
    _touch(root / "notes.txt")
    _save(root / ".hidden.jpg")
    _save(root / ".cache" / "x.jpg")

    items, errors = discover_inputs([str(root)])

    assert errors == []
    assert [(i.rel.as_posix(), i.kind) for i in items] == [
        ("a/clip.mp4", "video"),
        ("a/deep/c.PNG", "image"),
        ("b.jpg", "image"),
    ]
    assert all(i.path.is_file() for i in items)


def test_single_file_rel_is_its_name(tmp_path: Path) -> None:
    f = _save(tmp_path / "x" / "y" / "face.webp")
    items, errors = discover_inputs([str(f)])
    assert errors == [] and items == [InputItem(f, Path("face.webp"), "image")]


def test_globs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _save(tmp_path / "s" / "one.jpg")
    _save(tmp_path / "s" / "two.png")
    _save(tmp_path / "s" / "sub" / "three.jpg")
    _touch(tmp_path / "s" / "readme.txt")

    items, errors = discover_inputs(["s/*.jpg"])
    assert errors == [] and [i.rel.as_posix() for i in items] == ["one.jpg"]

    items, errors = discover_inputs(["s/**/*.jpg"])
    assert errors == [] and [i.rel.as_posix() for i in items] == ["one.jpg", "sub/three.jpg"]

    items, errors = discover_inputs([str(tmp_path / "s" / "t?o.png")])
    assert errors == [] and [i.rel.as_posix() for i in items] == ["two.png"]

    items, errors = discover_inputs(["s/*.gif", "s/*.txt"])
    assert items == []
    assert [e.reason for e in errors] == [
        "no files match this pattern",
        "pattern matches no images or videos",
    ]


def test_spec_errors(tmp_path: Path) -> None:
    bad = _touch(tmp_path / "doc.xyz")
    (tmp_path / "empty").mkdir()
    _touch(tmp_path / "only_text" / "a.txt")
    good = _save(tmp_path / "ok.jpg")

    items, errors = discover_inputs(
        [
            str(bad),
            str(tmp_path / "missing.jpg"),
            str(tmp_path / "empty"),
            str(tmp_path / "only_text"),
            str(good),
        ]
    )

    assert [i.path for i in items] == [good]
    assert [e.reason for e in errors] == [
        "unsupported file type '.xyz'",
        "no such file or folder",
        "folder contains no images or videos",
        "folder contains no images or videos",
    ]
    assert str(errors[0]) == f"{bad}: unsupported file type '.xyz'"


def test_deduplicates_and_disambiguates_names(tmp_path: Path) -> None:
    a = _save(tmp_path / "a" / "face.jpg")
    b = _save(tmp_path / "b" / "face.jpg")
    items, errors = discover_inputs([str(a), str(tmp_path / "a"), str(a), str(b)])
    assert errors == []
    assert [(i.path, i.rel) for i in items] == [(a, Path("face.jpg")), (b, Path("face_2.jpg"))]


def test_exclude_output_folder_inside_input(tmp_path: Path) -> None:
    _save(tmp_path / "in" / "a.jpg")
    _save(tmp_path / "in" / "restored" / "a.jpg")
    items, _ = discover_inputs([str(tmp_path / "in")], exclude=[tmp_path / "in" / "restored"])
    assert [i.rel for i in items] == [Path("a.jpg")]


# ------------------------------------------------------------------ output paths


def test_output_path_for(tmp_path: Path) -> None:
    item = InputItem(tmp_path / "in" / "a" / "x.jpg", Path("a/x.jpg"), "image")
    assert output_path_for(item, tmp_path / "out") == tmp_path / "out" / "a" / "x.jpg"
    assert output_path_for(item, tmp_path / "out", "_restored") == tmp_path / "out" / "a" / "x_restored.jpg"
    assert output_path_for(item, tmp_path / "out", ext="png") == tmp_path / "out" / "a" / "x.png"


def test_output_path_equal_to_input_is_refused(tmp_path: Path) -> None:
    src = _save(tmp_path / "in" / "x.jpg")
    (item,), _ = discover_inputs([str(tmp_path / "in")])
    with pytest.raises(MediaError, match="overwrite the input") as info:
        output_path_for(item, tmp_path / "in" / "." / "")
    assert info.value.path == src
    assert output_path_for(item, tmp_path / "in", "_restored").name == "x_restored.jpg"


def test_check_outdir(tmp_path: Path) -> None:
    made = check_outdir(tmp_path / "new" / "nested")
    assert made.is_dir()
    f = _touch(tmp_path / "file")
    with pytest.raises(MediaError, match="exists and is a file"):
        check_outdir(f)
    with pytest.raises(MediaError, match="cannot create output folder"):
        check_outdir(f / "sub")


def test_media_error_is_one_line_and_pickles() -> None:
    err = MediaError("/a/b.jpg", "cannot decode image:\nbroken")
    assert str(err) == "/a/b.jpg: cannot decode image: broken"
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason) == (err.path, err.reason)


# ------------------------------------------------------------------ images


def test_exif_rotated_jpeg_comes_out_upright(tmp_path: Path) -> None:
    # Stored landscape: left half red, right half blue; orientation 6 = display rotated 90° CW.
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :30] = (255, 0, 0)
    stored[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "TestCam"
    src = _save(tmp_path / "rot.jpg", stored, exif=exif.tobytes())

    img = read_image(src)

    assert img.rgb.shape == (60, 40, 3)  # portrait now
    assert img.rgb[:25, :, 0].mean() > 200 and img.rgb[35:, :, 2].mean() > 200  # red top, blue bottom
    out = write_image(tmp_path / "out" / "rot.jpg", img.rgb, like=img)
    with Image.open(out) as back:
        assert back.size == (40, 60)
        tags = back.getexif()
        assert 0x0112 not in tags and tags[0x010F] == "TestCam"


def test_rgba_png_keeps_alpha_also_after_upscale(tmp_path: Path) -> None:
    alpha = np.tile(np.arange(60, dtype=np.uint8) * 4, (40, 1))
    src = tmp_path / "a.png"
    Image.fromarray(np.dstack([_noise(), alpha]), "RGBA").save(src)

    img = read_image(src)
    assert img.alpha is not None and np.array_equal(img.alpha, alpha) and not img.is_grey

    out = write_image(tmp_path / "o" / "a.png", img.rgb, like=img)
    with Image.open(out) as back:
        assert back.mode == "RGBA" and np.array_equal(np.asarray(back)[..., 3], alpha)

    big = resize_image(img.rgb, 2.0)
    assert big.shape == (80, 120, 3)
    with Image.open(write_image(tmp_path / "o" / "big.webp", big, like=img)) as back:
        assert back.mode == "RGBA" and back.size == (120, 80)
    with Image.open(write_image(tmp_path / "o" / "a.jpg", img.rgb, like=img)) as back:
        assert back.mode == "RGB"  # JPEG has no alpha: dropped


def test_palette_with_transparency_keeps_alpha(tmp_path: Path) -> None:
    src = tmp_path / "p.png"
    Image.fromarray(_noise()).convert("P").save(src, transparency=0)
    assert read_image(src).alpha is not None


@pytest.mark.parametrize("ext", ["jpg", "png", "tif", "bmp"])
def test_grey_stays_single_channel(tmp_path: Path, ext: str) -> None:
    src = tmp_path / f"g.{ext}"
    Image.fromarray(_noise()[..., 0]).save(src)
    img = read_image(src)
    assert img.is_grey and img.rgb.shape == (40, 60, 3)
    tinted = img.rgb.copy()
    tinted[..., 0] //= 2  # a model may add a slight tint; output must still be grey
    with Image.open(write_image(tmp_path / "o" / f"g.{ext}", tinted, like=img)) as back:
        assert back.mode == "L"


def test_rgb_with_equal_channels_is_grey(tmp_path: Path) -> None:
    grey = np.repeat(_noise()[..., :1], 3, axis=2)
    assert read_image(_save(tmp_path / "g.png", grey)).is_grey
    assert not read_image(_save(tmp_path / "c.png")).is_grey


def test_16bit_png_is_read_as_8bit(tmp_path: Path) -> None:
    src = tmp_path / "g16.png"
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(src)
    img = read_image(src)
    assert img.bit_depth == 16 and img.is_grey and img.rgb.dtype == np.uint8 and img.rgb.max() == 255


@pytest.mark.parametrize("ext", ["jpg", "png"])
@pytest.mark.parametrize("tolerant", [False, True])
def test_truncated_image_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ext: str, tolerant: bool) -> None:
    # Another library may have enabled LOAD_TRUNCATED_IMAGES globally; we must still refuse.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", tolerant)
    full = _save(tmp_path / f"full.{ext}", _noise(200, 300)).read_bytes()
    src = _touch(tmp_path / f"cut.{ext}", full[: len(full) // 2])
    with pytest.raises(MediaError) as info:
        read_image(src)
    assert info.value.path == src
    assert str(info.value) == f"{src}: cannot decode image: truncated file"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is tolerant  # restored


def test_empty_and_garbage_images(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="empty"):
        read_image(_touch(tmp_path / "zero.jpg", b""))
    with pytest.raises(MediaError, match="not a recognised image format"):
        read_image(_touch(tmp_path / "junk.png", b"definitely not a png" * 10))


def test_write_image_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o" / "x.png"
    write_image(out, _noise())
    before = out.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(MediaError, match="No space left"):
        write_image(out, _noise(seed=1))
    assert out.read_bytes() == before and _leftovers(tmp_path) == []


def test_write_image_without_like_and_bad_input(tmp_path: Path) -> None:
    out = write_image(tmp_path / "deep" / "er" / "x.jpg", _noise())
    with Image.open(out) as back:
        assert back.mode == "RGB" and back.size == (60, 40)
    with pytest.raises(MediaError, match="unsupported image type"):
        write_image(tmp_path / "x.gif", _noise())
    with pytest.raises(ValueError):
        write_image(tmp_path / "x.png", _noise().astype(np.float32))
    assert isinstance(read_image(out), LoadedImage)


# ------------------------------------------------------------------ video


def test_probe_and_read(clip: Path) -> None:
    info = probe_video(clip)
    assert (info.fps, info.frame_count, info.width, info.height) == (10.0, 20, 64, 48)
    assert info.has_audio and abs(info.duration - 2.0) < 0.05
    frames = list(read_video_frames(clip))
    assert len(frames) == 20
    assert frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8


def test_reader_can_stop_early(clip: Path) -> None:
    with media.VideoReader(clip) as reader:
        for i, _ in enumerate(reader):
            if i == 2:
                break
    assert reader._proc is None  # ffmpeg stopped, nothing left running


@pytest.mark.parametrize(
    ("src_audio", "src_ext", "out_ext", "out_audio"),
    [
        ("aac", ".mp4", ".mp4", "aac"),  # stream copy
        ("pcm_s16le", ".mkv", ".mp4", "aac"),  # mp4 can't hold PCM: re-encoded
        ("aac", ".mp4", ".webm", "opus"),  # webm: VP9 + Opus
    ],
)
def test_video_round_trip_keeps_frames_fps_and_audio(
    tmp_path: Path, clip: Path, src_audio: str, src_ext: str, out_ext: str, out_audio: str
) -> None:
    src = clip if src_ext == ".mp4" and src_audio == "aac" else _make_video(tmp_path / f"src{src_ext}", audio=src_audio)
    info = probe_video(src)
    out = tmp_path / "out" / f"restored{out_ext}"

    with VideoWriter(out, info.fps, (info.width, info.height), audio_from=src) as writer:
        for frame in read_video_frames(src):
            writer.write(frame)

    got = probe_video(out)
    assert writer.frames_written == 20
    assert len(list(read_video_frames(out))) == 20
    assert got.fps == info.fps and (got.width, got.height) == (64, 48)
    assert got.audio_codecs == (out_audio,)
    assert abs(_audio_seconds(out) - _audio_seconds(src)) <= 0.1
    assert _leftovers(tmp_path) == []


def test_video_without_audio(tmp_path: Path) -> None:
    src = _make_video(tmp_path / "mute.mp4", audio=None, seconds=1)
    info = probe_video(src)
    assert not info.has_audio
    out = tmp_path / "o" / "mute.mkv"
    with VideoWriter(out, info.fps, (info.width, info.height), audio_from=src) as writer:
        for frame in read_video_frames(src):
            writer.write(frame)
    got = probe_video(out)
    assert not got.has_audio and got.frame_count == 10


def test_odd_size_is_padded_to_even(tmp_path: Path) -> None:
    out = tmp_path / "odd.mp4"
    with VideoWriter(out, 25, (63, 47)) as writer:
        for i in range(5):
            writer.write(np.full((47, 63, 3), 40 * i, np.uint8))
    info = probe_video(out)
    assert (info.width, info.height) == (64, 48)
    assert len(list(read_video_frames(out))) == 5


def test_rotated_video_is_read_upright(tmp_path: Path) -> None:
    plain = _make_video(tmp_path / "plain.mp4", audio=None, seconds=0.5)
    rotated = tmp_path / "rot.mp4"
    _ffmpeg("-display_rotation", "90", "-i", str(plain), "-c", "copy", str(rotated))
    info = probe_video(rotated)
    assert (info.width, info.height, info.rotation) == (48, 64, 90)
    assert next(iter(read_video_frames(rotated))).shape == (64, 48, 3)


def test_bad_videos_are_errors(tmp_path: Path, clip: Path) -> None:
    garbage = _touch(tmp_path / "garbage.mp4", b"\x00\x01junk" * 500)
    with pytest.raises(MediaError, match="cannot read video") as info:
        list(read_video_frames(garbage))
    assert info.value.path == garbage

    empty = tmp_path / "zero_frames.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=10", "-frames:v", "0", str(empty))
    with pytest.raises(MediaError, match="no frames"):
        list(read_video_frames(empty))

    audio_only = tmp_path / "audio_only.mp4"
    _ffmpeg("-i", str(clip), "-vn", "-c", "copy", str(audio_only))
    with pytest.raises(MediaError, match="no video stream"):
        probe_video(audio_only)

    with pytest.raises(MediaError, match="empty"):
        probe_video(_touch(tmp_path / "zero.mov", b""))


def test_video_writer_is_atomic(tmp_path: Path) -> None:
    out = tmp_path / "o" / "x.mp4"
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(out, 10, (64, 48)) as writer:
            writer.write(np.zeros((48, 64, 3), np.uint8))
            raise KeyboardInterrupt
    assert not out.exists() and _leftovers(tmp_path) == []

    with pytest.raises(MediaError, match="no frames were written"):
        with VideoWriter(out, 10, (64, 48)):
            pass
    assert not out.exists() and _leftovers(tmp_path) == []

    with pytest.raises(ValueError):
        with VideoWriter(out, 10, (64, 48)) as writer:
            writer.write(np.zeros((10, 10, 3), np.uint8))
    assert not out.exists() and _leftovers(tmp_path) == []
