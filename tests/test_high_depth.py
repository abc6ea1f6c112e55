"""16-bit PNG and TIFF photos come back at 16 bits, untouched outside the faces, and an output
whose colour model or depth must change says so (issue #21)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image, ImageCms

from facerestore_cli.cli import main
from facerestore_cli.faces.align import estimate_affine, feather_mask, paste_faces, paste_faces_high
from facerestore_cli.io.high_depth import eight_bit, encode_png, orient, write_tiff
from facerestore_cli.io.images import output_notes, read_image, write_image
from facerestore_cli.restore.face_restorer import build_face_restorer
from facerestore_cli.restore.loop import run_restore
from facerestore_cli.restore.options import FaceSettings, RestoreOptions

FACE = "faces/train/lfw250/Ariel_Sharon_0002.jpg"
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def deepen(low: np.ndarray) -> np.ndarray:
    """8-bit samples at 16 bits (x 257) plus a small ramp, so the low byte carries something and
    the 8-bit view (nearest level) is still the 8-bit image."""
    h, w = low.shape[:2]
    ramp = (np.arange(w)[None, :] * 3 + np.arange(h)[:, None] * 5) % 97
    return np.minimum(low.astype(np.int32) * 257 + (ramp[..., None] if low.ndim == 3 else ramp), 65535).astype(np.uint16)


def samples(path: Path) -> np.ndarray:
    """A 16-bit file's samples as stored, HxWxC, read without our reader."""
    data = path.read_bytes()
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        pixels = tifffile.imread(path)
    else:
        pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if pixels.ndim == 3:
            pixels = pixels[..., [2, 1, 0, 3][: pixels.shape[2]]]
        if data[25] == 4:  # grey + alpha, which OpenCV hands out as BGRA
            pixels = pixels[..., [0, 3]]
    return pixels if pixels.ndim == 3 else pixels[..., None]


def noise16(h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65536, (h, w, c), dtype=np.uint16)


# ------------------------------------------------------------------ reading and writing


@pytest.mark.parametrize("ext", ["png", "tif"])
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16bit_files_round_trip_every_layout(tmp_path: Path, ext: str, channels: int) -> None:
    """Grey, grey + alpha, RGB, RGBA: read at 16 bits (with an 8-bit view) and written back the same."""
    pixels = noise16(9, 13, channels)
    icc = SRGB if channels >= 3 else None
    src = tmp_path / f"in.{ext}"
    if ext == "png":
        src.write_bytes(encode_png(pixels, icc))
    else:
        write_tiff(src, pixels, icc)
    img = read_image(src)
    assert img.bit_depth == 16 and img.high is not None and np.array_equal(img.high, pixels)
    assert img.rgb.dtype == np.uint8 and img.rgb.shape == (9, 13, 3)
    assert np.array_equal(img.rgb, eight_bit(pixels)[0]) and (img.alpha is not None) == (channels in (2, 4))
    assert img.is_grey == (channels <= 2) and img.icc == icc and img.notes == []
    out = write_image(tmp_path / f"out.{ext}", img.high, like=img)
    assert out.read_bytes()[:4] == src.read_bytes()[:4], "same format"
    assert np.array_equal(samples(out), pixels) and read_image(out).icc == icc
    assert output_notes(img, out) == []


def test_16bit_png_keeps_exif_and_is_read_upright(tmp_path: Path) -> None:
    pixels = noise16(6, 10, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    exif[0x010F] = "ScanCo"
    src = tmp_path / "rotated.png"
    src.write_bytes(encode_png(pixels, exif=exif.tobytes()))
    img = read_image(src)
    assert img.high is not None and img.high.shape == (10, 6, 3)
    assert np.array_equal(img.high, np.rot90(pixels, 3)) and np.array_equal(img.rgb, eight_bit(img.high)[0])
    with Image.open(write_image(tmp_path / "out.png", img.high, like=img)) as back:
        assert back.getexif().get(0x010F) == "ScanCo" and 0x0112 not in back.getexif(), "EXIF kept, orientation applied"


@pytest.mark.parametrize("orientation", [2, 3, 6, 8])
def test_16bit_tiff_is_read_upright(tmp_path: Path, orientation: int) -> None:
    """Pillow turns a TIFF upright as it loads and drops the tag: the 16 bits must follow it."""
    pixels = noise16(6, 10, 3)
    src = tmp_path / "oriented.tif"
    tifffile.imwrite(src, pixels, photometric="rgb", extratags=[(274, "H", 1, orientation, True)])
    img = read_image(src)
    assert img.high is not None and img.bit_depth == 16, "kept at 16 bits"
    assert np.array_equal(img.high, orient(pixels, orientation)) and np.array_equal(img.rgb, eight_bit(img.high)[0])
    with Image.open(src) as pil:
        shown = np.asarray(pil.convert("RGB")).astype(np.int16)  # Pillow drops the low byte; we round
    assert shown.shape == img.rgb.shape and np.abs(shown - img.rgb).max() <= 1, "as Pillow shows it"


def test_colour_model_changes_are_noted(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "alpha.png")
    (tmp_path / "deep.png").write_bytes(encode_png(noise16(8, 8, 3)))
    assert output_notes(read_image(tmp_path / "cmyk.jpg"), tmp_path / "out.jpg") == ["CMYK written as RGB"]
    assert output_notes(read_image(tmp_path / "palette.png"), tmp_path / "out.png") == ["palette colours written as RGB"]
    assert output_notes(read_image(tmp_path / "alpha.png"), tmp_path / "out.jpg") == ["alpha channel dropped (JPEG has none)"]
    assert output_notes(read_image(tmp_path / "deep.png"), tmp_path / "out.jpg") == ["16-bit written as 8-bit (JPEG has no 16-bit)"]
    assert output_notes(read_image(tmp_path / "deep.png"), tmp_path / "out.tif") == []
    assert output_notes(read_image(tmp_path / "alpha.png"), tmp_path / "out.png") == []


# ------------------------------------------------------------------ pasting at 16 bits


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_paste_faces_high_is_the_8bit_paste_at_16_bits(channels: int) -> None:
    """The same affine and mask as the 8-bit paste: what the mask does not touch keeps all 16 bits,
    what it does matches the 8-bit paste within a level; alpha is never touched."""
    low = np.random.default_rng(1).integers(0, 256, (120, 100, 3), dtype=np.uint8)
    grey = channels <= 2
    if grey:
        low = np.repeat(low[..., :1], 3, axis=2)
    high = deepen(low if not grey else low[..., 0])
    high = high if high.ndim == 3 else high[..., None]
    if channels in (2, 4):
        high = np.concatenate([high, noise16(120, 100, 1, seed=2)], axis=2)
    face = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    face = np.repeat(face[..., :1], 3, axis=2) if grey else face
    affine = np.array([[1.1, 0.2, -20], [-0.2, 1.1, -10]], np.float32)
    out = paste_faces_high(high, [face], [affine], grey=grey)
    assert out.dtype == np.uint16 and out.shape == high.shape
    weight = cv2.warpAffine(feather_mask(64), cv2.invertAffineTransform(affine), (100, 120), flags=cv2.INTER_LINEAR)
    support = cv2.dilate((weight > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert 0.05 < support.mean() < 0.6
    assert np.array_equal(out[~support], high[~support]), "untouched pixels must keep all 16 bits"
    colours = 1 if channels <= 2 else 3
    assert np.array_equal(out[..., colours:], high[..., colours:]), "alpha untouched"
    want = paste_faces(low, [face], [affine])
    got = eight_bit(out)[0]
    assert np.abs(got.astype(int) - want).max() <= 1
    assert (np.abs(got.astype(int) - low) > 8).mean() > 0.05, "the face was pasted"


# ------------------------------------------------------------------ restore, end to end


@pytest.fixture(scope="module")
def restored(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real face as 16-bit RGB PNG (with an ICC profile), RGBA TIFF and grey + alpha PNG,
    beside its 8-bit RGB and grey versions, restored in one run."""
    path = shared_data / FACE
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    import torch

    torch.set_num_threads(2)
    rgb = read_image(path).rgb
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    alpha = ((np.arange(rgb.shape[1])[None, :] * 211 + np.arange(rgb.shape[0])[:, None] * 97) % 65536).astype(np.uint16)
    src = tmp_path_factory.mktemp("high_depth") / "in"
    src.mkdir()
    (src / "rgb16.png").write_bytes(encode_png(deepen(rgb), icc=SRGB))
    write_tiff(src / "rgba16.tif", np.dstack([deepen(rgb), alpha]))
    (src / "ga16.png").write_bytes(encode_png(np.dstack([deepen(grey), alpha])))
    Image.fromarray(rgb).save(src / "rgb8.png")
    Image.fromarray(grey).save(src / "grey8.png")
    engine = build_face_restorer(faces=FaceSettings(batch_size=4), device="cpu")
    summary = run_restore([str(src)], engine, RestoreOptions(src.parent / "out"))
    return src, src.parent / "out", summary, engine


def mask_support(engine, view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the paste's masks are above 0 (grown by 2 px) and where they are nearly 1, for the
    faces the loop finds in this 8-bit view."""
    faces = engine.detector.detect([view])[0]
    assert faces, "no face found"
    weight = np.zeros(view.shape[:2], np.float32)
    for f in faces:
        inverse = cv2.invertAffineTransform(estimate_affine(f.landmarks, engine.face_size))
        warped = cv2.warpAffine(feather_mask(engine.face_size), inverse, view.shape[1::-1], flags=cv2.INTER_LINEAR)
        weight = np.maximum(weight, warped)
    return cv2.dilate((weight > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0, weight > 0.99


@pytest.mark.parametrize(("name", "reference"), [("rgb16.png", "rgb8.png"), ("rgba16.tif", "rgb8.png"), ("ga16.png", "grey8.png")])
def test_16bit_photos_come_back_16bit(restored, name: str, reference: str) -> None:
    src, out, summary, engine = restored
    assert summary.ok and summary.images == 5 and summary.faces_restored >= 5 and summary.notes == []
    before, after = samples(src / name), samples(out / name)
    assert after.dtype == np.uint16 and after.shape == before.shape
    assert (out / name).read_bytes()[:4] == (src / name).read_bytes()[:4], "same format"
    support, core = mask_support(engine, read_image(src / name).rgb)
    assert support.mean() < 0.8
    assert np.array_equal(after[~support], before[~support]), "pixels outside the faces must keep all 16 bits"
    colours = 1 if before.shape[2] <= 2 else 3
    assert np.array_equal(after[..., colours:], before[..., colours:]), "alpha must be kept exactly"
    change = (np.abs(after[core][:, :colours].astype(np.int64) - before[core][:, :colours]) / 257).max(axis=1)
    assert change.mean() > 0.5 and (change >= 1).mean() > 0.2, f"the face was not restored ({change.mean():.2f} levels)"
    view, eight = eight_bit(after)[0], read_image(out / reference).rgb
    off = np.abs(view.astype(int) - eight).max(axis=2)
    assert (off <= 1).mean() > 0.995, f"the 8-bit view differs from the 8-bit restore on {(off > 1).mean():.2%} of pixels"
    if name == "rgb16.png":
        assert read_image(out / name).icc == SRGB


def test_cli_says_when_the_colour_model_changes(tmp_path: Path) -> None:
    """A CMYK JPEG comes back RGB, a 16-bit PNG named .jpg comes back an 8-bit JPEG: each says
    so in one warning line naming the file (here re-encoded by --upscale, no face needed)."""
    src = tmp_path / "in"
    src.mkdir()
    rgb = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8), (0, 0), 2)
    Image.fromarray(rgb).convert("CMYK").save(src / "photo.jpg")
    (src / "scan.jpg").write_bytes(encode_png(deepen(rgb)))
    Image.fromarray(rgb).save(src / "plain.png")
    result = CliRunner().invoke(main, ["restore", str(src), "-o", str(tmp_path / "out"), "--device", "cpu", "--upscale", "2"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "warning:" in line]
    assert len(lines) == 2, result.output
    assert any("photo.jpg: CMYK written as RGB" in line for line in lines)
    assert any("scan.jpg: 16-bit written as 8-bit (JPEG has no 16-bit)" in line for line in lines)
    with Image.open(tmp_path / "out" / "photo.jpg") as back:
        assert back.mode == "RGB" and back.size == (64, 48)
    with Image.open(tmp_path / "out" / "scan.jpg") as back:
        assert back.format == "JPEG"
