"""End-to-end restore, as a user runs it: real degraded photos, videos with audio, bad inputs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from fakes import make_face_video

from facerestore_cli.cli import main
from facerestore_cli.faces import estimate_affine
from facerestore_cli.io.images import read_image
from facerestore_cli.io.video import probe_video, read_video_frames
from facerestore_cli.models.loading import DEFAULT_MODEL
from facerestore_cli.restore.face_restorer import build_face_restorer
from facerestore_cli.restore.loop import run_restore
from facerestore_cli.restore.options import FaceSettings, RestoreOptions

REAL = "real_lq"
WHOLE = ["CodeFormer/inputs/whole_imgs/00.jpg", "GFPGAN/inputs/whole_imgs/10045.jpg"]
RGBA = "CodeFormer/inputs/whole_imgs/02.png"
GREY = "CodeFormer/inputs/gray_faces/Einstein01.jpg"
ALIGNED = "CodeFormer/inputs/cropped_faces/0143.jpg"


@pytest.fixture(scope="module")
def engine(two_threads):
    return build_face_restorer(faces=FaceSettings(batch_size=4), device="cpu")


@pytest.fixture(scope="module")
def real(shared_data: Path) -> Path:
    root = shared_data / REAL
    if not (root / WHOLE[0]).is_file():
        pytest.skip(f"{root} lacks the real degraded inputs")
    return root


def footprint(shape: tuple[int, ...], landmarks: list[np.ndarray], face_size: int = 512, grow: int = 3) -> np.ndarray:
    """Pixels a pasted face may touch: each aligned square mapped back into the image, grown a little."""
    mask = np.zeros(shape[:2], np.uint8)
    for lm in landmarks:
        inv = cv2.invertAffineTransform(estimate_affine(lm, face_size))
        corners = np.array([[0, 0], [face_size, 0], [face_size, face_size], [0, face_size]], np.float32)
        pts = corners @ inv[:, :2].T + inv[:, 2]
        cv2.fillConvexPoly(mask, np.round(pts).astype(np.int32), 1)
    return cv2.dilate(mask, np.ones((2 * grow + 1,) * 2, np.uint8)) > 0


def test_whole_images_faces_restored_background_untouched(engine, real: Path, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name in WHOLE:  # lossless copies, so "unchanged" can be checked bit for bit
        cv2.imwrite(str(src / (Path(name).stem + ".png")), cv2.imread(str(real / name)))
    summary = run_restore([str(src)], engine, RestoreOptions(tmp_path / "out"))
    assert summary.ok and summary.images == 2 and summary.faces_restored >= 2
    for path in sorted(src.iterdir()):
        before = read_image(path).rgb
        after = read_image(tmp_path / "out" / path.name).rgb
        assert after.shape == before.shape
        faces = engine.detector.detect([before])[0]
        assert faces, f"no face found in {path.name}"
        inside = footprint(before.shape, [f.landmarks for f in faces])
        assert np.array_equal(after[~inside], before[~inside]), "pixels away from faces changed"
        x1, y1, x2, y2 = faces[0].box.astype(int)
        diff = np.abs(after[y1:y2, x1:x2].astype(int) - before[y1:y2, x1:x2])
        assert diff.mean() > 1.0 and (diff.max(axis=2) > 0).mean() > 0.5, f"face in {path.name} was not restored"


def test_photos_restored_together_match_one_by_one(engine, real: Path, tmp_path: Path) -> None:
    """Photos share detector calls and model batches (--batch-size of them at a time); each
    comes out as it does restored alone."""
    src = tmp_path / "in"
    src.mkdir()
    for name in [*WHOLE, GREY, ALIGNED]:
        cv2.imwrite(str(src / (Path(name).stem + ".png")), cv2.imread(str(real / name)))
    together = run_restore([str(src)], engine, RestoreOptions(tmp_path / "together"))
    assert together.ok and together.images == 4
    faces = 0
    for path in sorted(src.iterdir()):
        alone = run_restore([str(path)], engine, RestoreOptions(tmp_path / "alone"))
        faces += alone.faces_restored
        a = read_image(tmp_path / "together" / path.name).rgb.astype(int)
        b = read_image(tmp_path / "alone" / path.name).rgb.astype(int)
        assert np.abs(a - b).max() <= 2, path.name
    assert faces == together.faces_restored


def test_a_photo_that_fails_to_restore_fails_alone(engine, real: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name in WHOLE:
        shutil.copy(real / name, src / Path(name).name)
    cv2.imwrite(str(src / "cursed.png"), cv2.imread(str(real / WHOLE[0]))[:101])
    restore_frames = engine.restore_frames

    def fails_on_101_rows(frames, *args, **kwargs):
        if any(f.shape[0] == 101 for f in frames):
            raise RuntimeError("out of memory")
        return restore_frames(frames, *args, **kwargs)

    monkeypatch.setattr(engine, "restore_frames", fails_on_101_rows)
    summary = run_restore([str(src)], engine, RestoreOptions(tmp_path / "out"))
    assert summary.failures == [f"{src / 'cursed.png'}: RuntimeError: out of memory"]
    assert summary.images == 2 and sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(Path(n).name for n in WHOLE)


def test_big_photos_are_not_restored_together(engine, real: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Photos together stay within PHOTO_GROUP_PIXELS (device memory for detection)."""
    import facerestore_cli.restore.loop as restore_loop

    calls = []
    restore_frames = engine.restore_frames
    monkeypatch.setattr(engine, "restore_frames", lambda frames, *a, **k: calls.append(len(frames)) or restore_frames(frames, *a, **k))
    sizes = [read_image(real / name).rgb.shape for name in WHOLE]
    monkeypatch.setattr(restore_loop, "PHOTO_GROUP_PIXELS", sizes[0][0] * sizes[0][1] + sizes[1][0] * sizes[1][1] - 1)
    summary = run_restore([str(real / name) for name in WHOLE], engine, RestoreOptions(tmp_path / "out"))
    assert summary.ok and summary.images == 2 and calls == [1, 1]


def test_alpha_grey_and_aligned_inputs(engine, real: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run_restore([str(real / RGBA), str(real / GREY)], engine, RestoreOptions(out))
    assert summary.ok
    rgba = read_image(out / "02.png")
    assert rgba.alpha is not None and np.array_equal(rgba.alpha, read_image(real / RGBA).alpha)
    grey = cv2.imread(str(out / "Einstein01.jpg"), cv2.IMREAD_UNCHANGED)
    assert grey.ndim == 2, "a grey photo must stay grey"
    aligned = run_restore([str(real / ALIGNED)], engine, RestoreOptions(tmp_path / "al", aligned=True))
    restored = read_image(tmp_path / "al" / "0143.jpg").rgb
    assert aligned.faces_restored == 1 and restored.shape == (512, 512, 3)


def test_no_face_written_through_and_upscaled(engine, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    plain = cv2.GaussianBlur(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), (0, 0), 3)
    cv2.imwrite(str(tmp_path / "wall.png"), plain)
    summary = run_restore([str(tmp_path / "wall.png")], engine, RestoreOptions(tmp_path / "out"))
    assert summary.ok and summary.files_without_faces == 1 and summary.faces_found == 0
    assert (tmp_path / "out" / "wall.png").read_bytes() == (tmp_path / "wall.png").read_bytes(), "must be passed through unchanged"
    run_restore([str(tmp_path / "wall.png")], engine, RestoreOptions(tmp_path / "up", upscale=2))
    assert cv2.imread(str(tmp_path / "up" / "wall.png")).shape == (240, 320, 3)


def test_video_keeps_frames_fps_and_audio(engine, real: Path, tmp_path: Path) -> None:
    face = read_image(real / WHOLE[0]).rgb
    face = np.ascontiguousarray(face[: face.shape[0] // 2 * 2, : face.shape[1] // 2 * 2])
    clip = tmp_path / "clip.mp4"
    make_face_video(clip, face)
    summary = run_restore([str(clip)], engine, RestoreOptions(tmp_path / "out"))
    assert summary.ok and summary.videos == 1 and summary.frames == 6
    assert summary.faces_restored >= 6
    before, after = probe_video(clip), probe_video(tmp_path / "out" / "clip.mp4")
    assert after.has_audio and after.fps == before.fps
    assert len(list(read_video_frames(tmp_path / "out" / "clip.mp4"))) == 6
    assert abs(after.duration - before.duration) < 0.15


def test_cli_bad_inputs_rest_goes_on(real: Path, tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(real / WHOLE[0], folder / "sub" / "good.jpg")
    data = (real / WHOLE[1]).read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "noframes.mp4").write_bytes(b"\x00" * 64)
    args = [
        str(folder),
        str(tmp_path / "notes.txt"),
        str(tmp_path / "nothing"),
        str(tmp_path / "noframes.mp4"),
        str(tmp_path / "missing.jpg"),
    ]
    result = CliRunner().invoke(main, ["restore", *args, "-o", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert (tmp_path / "out" / "sub" / "good.jpg").is_file(), "the good file must still be restored"
    for name in ["truncated.jpg", "empty.png", "notes.txt", "nothing", "noframes.mp4", "missing.jpg"]:
        lines = [line for line in result.output.splitlines() if name in line and "error" in line]
        assert lines, f"no error line names {name}:\n{result.output}"
    assert "faces restored" in result.output and "failures" in result.output


def test_cli_output_is_a_file_and_inputs_never_overwritten(real: Path, tmp_path: Path) -> None:
    shutil.copy(real / WHOLE[0], tmp_path / "photo.jpg")
    original = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "taken").write_text("a file, not a folder")
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "photo.jpg"), "-o", str(tmp_path / "taken"), "--device", "cpu"])
    assert result.exit_code == 1 and "taken" in result.output
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "photo.jpg"), "-o", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 1
    assert (tmp_path / "photo.jpg").read_bytes() == original


def test_cli_refuses_a_bad_color_fix_before_reading_anything(real: Path, tmp_path: Path) -> None:
    shutil.copy(real / WHOLE[0], tmp_path / "photo.jpg")
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "photo.jpg"), "-o", str(tmp_path / "out"), "--color-fix", "wavelet:0"])
    assert result.exit_code == 2 and "wavelet:N" in result.output and "--color-fix" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_turns_only_user_errors_into_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FacerestoreError is the user's to fix: one line and exit code 2. Anything else is a bug
    and must surface as one, not pass for bad input. (The model loads for the first photo.)"""
    from facerestore_cli.errors import MissingFileError
    from facerestore_cli.restore import face_restorer as face_restorer_module

    cv2.imwrite(str(tmp_path / "photo.png"), np.zeros((32, 32, 3), np.uint8))

    def load(error: Exception):
        def fails(*args, **kwargs):
            raise error

        monkeypatch.setattr(face_restorer_module, "load_restorer", fails)
        return CliRunner().invoke(main, ["restore", str(tmp_path), "-o", str(tmp_path / "out"), "--device", "cpu"])

    user = load(MissingFileError("model folder not found: nowhere"))
    assert user.exit_code == 2 and "error: model folder not found: nowhere" in user.output
    for bug in (RuntimeError("a bug in loading"), ValueError("a bug in loading")):
        result = load(bug)
        assert result.exit_code == 1 and result.exception is bug and "error:" not in result.output


def test_cli_extras_and_skip_existing(real: Path, tmp_path: Path) -> None:
    shutil.copy(real / WHOLE[0], tmp_path / "photo.jpg")
    out = tmp_path / "out"
    args = ["restore", str(tmp_path / "photo.jpg"), "-o", str(out), "--device", "cpu", "--save-faces", "--compare", "--only-center-face"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    before = read_image(tmp_path / "photo.jpg").rgb
    assert read_image(out / "compare" / "photo.jpg").rgb.shape == (before.shape[0], 2 * before.shape[1], 3)
    assert len(list((out / "faces").glob("photo_*.png"))) == 1
    stamp = (out / "photo.jpg").stat().st_mtime_ns
    result = CliRunner().invoke(main, ["restore", str(tmp_path / "photo.jpg"), "-o", str(out), "--device", "cpu", "--skip-existing"])
    assert result.exit_code == 0 and (out / "photo.jpg").stat().st_mtime_ns == stamp


def test_bundled_model_is_shipped() -> None:
    assert (DEFAULT_MODEL / "restorer_config.json").is_file()
    for f in DEFAULT_MODEL.rglob("*"):
        assert f.stat().st_size < 16 * 2**20, f"{f} is over 16 MiB"


def test_weights_folder_can_be_moved(tmp_path: Path) -> None:
    """FACERESTORE_WEIGHTS points the tool at weights installed elsewhere; a wrong one is a clear error."""
    import os
    import sys

    env = {**os.environ, "FACERESTORE_WEIGHTS": str(tmp_path / "nowhere")}
    cmd = [sys.executable, "-m", "facerestore_cli.cli", "restore", str(tmp_path), "-o", str(tmp_path / "out"), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and str(tmp_path / "nowhere") in proc.stderr
