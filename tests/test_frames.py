"""The tensor frame path (frames.py) against the numpy one, and videos decoded and encoded in threads.

The tensor path is meant for CUDA; here it runs on CPU tensors, which is the same code.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import FixedFaces, NegativeModel, assert_images_close, face_like, landmarks_at, make_face_video, tiny_restorer

from facerestore_cli.cli import main
from facerestore_cli.errors import InputError
from facerestore_cli.faces.align import _bounds, estimate_affine, scale_affine
from facerestore_cli.faces.tensor_align import resize_tensor
from facerestore_cli.io.files import MediaError
from facerestore_cli.io.images import resize_image
from facerestore_cli.io.video import probe_video, read_video_frames
from facerestore_cli.io.video_writer import VideoWriter
from facerestore_cli.models.inference import restore_crops
from facerestore_cli.restore import face_restorer as face_restorer_module
from facerestore_cli.restore import loop as restore_loop
from facerestore_cli.restore.face_restorer import FaceRestorer, face_sizes_for, resolve_batch_size
from facerestore_cli.restore.frames import resolve_frame_path
from facerestore_cli.restore.loop import run_restore
from facerestore_cli.restore.options import RestoreOptions, parse_batch_size
from facerestore_cli.restore.threads import Prefetch, WriteBehind

FACE = 64
pytestmark = pytest.mark.usefixtures("one_thread")


def two_faces() -> FixedFaces:
    """A face as big as the crop, tilted, and a smaller one tilted the other way."""
    return FixedFaces([landmarks_at((60, 70), 30, 0.2), landmarks_at((125, 120), 18, -0.3)])


def frames() -> list[np.ndarray]:
    frame = face_like(192, 3)[:, :176].copy()
    return [frame, np.roll(frame, 5, axis=1)]


def face_regions(shape: tuple[int, ...], detector: FixedFaces, upscale: float = 1.0) -> np.ndarray:
    """Pixels a pasted face may touch (each face's bounding region)."""
    near = np.zeros(shape[:2], bool)
    for lm in detector.landmarks:
        a = scale_affine(estimate_affine(lm, FACE), upscale)
        x0, y0, x1, y1 = _bounds(cv2.invertAffineTransform(a), FACE, shape[:2], pad=2)
        near[y0:y1, x0:x1] = True
    return near


# ------------------------------------------------------------------ tensor vs numpy frame path
@pytest.mark.parametrize("upscale", [1, 2])
def test_tensor_frame_path_gives_the_numpy_frames(upscale: float) -> None:
    """With a model that moves no more than its input (a negative), the two paths' frames differ
    only by the warp's and paste's grey level or two."""
    detector, model = two_faces(), NegativeModel(FACE)
    numpy_path = FaceRestorer(model, detector, batch_size=3, color_fix="none", frame_path="numpy")
    tensor_path = FaceRestorer(model, detector, batch_size=3, color_fix="none", frame_path="tensor")
    want = numpy_path.restore_frames(frames(), upscale, keep_faces=True)
    got = tensor_path.restore_frames(frames(), upscale, keep_faces=True)
    for frame, a, b in zip(frames(), want, got):
        assert b.image.dtype == np.uint8 and b.image.shape == a.image.shape == (192 * upscale, 176 * upscale, 3)
        diff = np.abs(a.image.astype(int) - b.image)
        assert diff.max() <= 2 and diff.mean() < 0.25, f"max {diff.max()}, mean {diff.mean():.3f}"
        assert b.found == b.count == 2 and len(b.crops) == len(b.restored) == 2
        for crop_a, crop_b in zip(a.crops, b.crops):
            assert np.abs(crop_a.astype(int) - crop_b).max() <= 1
        near = face_regions(b.image.shape, detector, upscale)
        background = frame if upscale == 1 else resize_image(frame, scale=upscale)
        assert np.abs(b.image[near].astype(int) - background[near]).mean() > 20, "the faces were not pasted"
        if upscale == 1:
            assert np.array_equal(b.image[~near], frame[~near]), "pixels away from the faces changed"


@pytest.mark.parametrize("upscale, want_sizes", [(1, [64, 32]), (2, [64, 64])])
def test_auto_face_size_restores_small_faces_on_small_crops(upscale: float, want_sizes: list[int]) -> None:
    """--face-size auto: a face no bigger than a smaller size the model was trained for (here
    about 24 px, against 32) is restored on a crop of that size, and pasted back as well by both
    frame paths; --upscale makes it bigger in the output, so it gets the full size again. A forced
    size applies to every face."""
    detector = FixedFaces([landmarks_at((60, 70), 30, 0.2), landmarks_at((130, 140), 6, -0.3)])
    model = NegativeModel(FACE, working_sizes=(32,))
    got = {
        p: FaceRestorer(model, detector, color_fix="none", frame_path=p).restore_frames(frames(), upscale, keep_faces=True)
        for p in ("numpy", "tensor")
    }
    for frame, a, b in zip(frames(), got["numpy"], got["tensor"]):
        assert [c.shape[0] for c in a.crops] == [c.shape[0] for c in b.crops] == [f.shape[0] for f in b.restored] == want_sizes
        assert np.abs(a.image.astype(int) - b.image).max() <= 2
        if upscale == 1:  # the small face's own pixels were replaced by its (negated) restoration
            assert np.abs(b.image[134:146, 124:136].astype(int) - frame[134:146, 124:136]).mean() > 20
    forced = FaceRestorer(model, detector, color_fix="none", face_size=64).restore_frames(frames(), upscale, keep_faces=True)
    assert [c.shape[0] for c in forced[0].crops] == [64, 64]


def test_face_size_choices() -> None:
    """auto offers every size the model knows; a forced size must suit the model's downsampling,
    and an exported engine takes only its own size."""
    assert face_sizes_for(NegativeModel(FACE, working_sizes=(32,))) == [32, 64]
    assert face_sizes_for(NegativeModel(FACE), 64) == [64]
    assert face_sizes_for(tiny_restorer(FACE), 32) == [32]
    with pytest.raises(ValueError, match="multiple of 32"):
        face_sizes_for(tiny_restorer(FACE), 48)
    assert face_sizes_for(NegativeModel(FACE), 32) == [32]
    with pytest.raises(ValueError, match="engine"):
        face_sizes_for(NegativeModel(FACE, takes_any_size=False), 32)


def test_batch_size_choices() -> None:
    """auto on a CPU: 1 face per call at 512 px, 4 at 256 (what measured fastest on 2 cores)."""
    cpu = torch.device("cpu")
    assert [resolve_batch_size("auto", cpu, s) for s in (512, 256, 128)] == [1, 4, 16]
    assert resolve_batch_size(6, cpu, 512) == 6
    assert FaceRestorer(NegativeModel(FACE), FixedFaces([]), batch_size="auto").batch_size == 64
    assert parse_batch_size("3") == 3 and parse_batch_size("auto") == "auto"
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(ValueError, match="whole number"):
            parse_batch_size(bad)


def test_tensor_frame_path_restores_its_crops_with_the_model() -> None:
    """A real (tiny, random) restorer and the colour fix: the faces of the chunk are exactly what
    `restore_crops` makes of those crops."""
    model = tiny_restorer(FACE)
    engine = FaceRestorer(model, two_faces(), batch_size=3, frame_path="tensor")
    results = engine.restore_frames(frames(), keep_faces=True)
    crops, restored = [c for r in results for c in r.crops], [f for r in results for f in r.restored]
    want = restore_crops(model, crops, batch_size=3)  # the same batches: the chunk's 4 faces as 3 + 1
    assert len(want) == len(restored) == 4
    assert_images_close(restored, want, what="tensor frame path")


def test_tensor_frame_path_keeps_faces_on_the_device_unless_asked() -> None:
    """Without --save-faces only the finished frames come back to the host: the same frames,
    the faces counted, no crops."""
    engine = FaceRestorer(NegativeModel(FACE), two_faces(), batch_size=3, color_fix="none", frame_path="tensor")
    lean, full = engine.restore_frames(frames()), engine.restore_frames(frames(), keep_faces=True)
    for a, b in zip(lean, full):
        assert a.count == b.count == 2 and a.crops == a.restored == [] and len(b.crops) == 2
        assert np.array_equal(a.image, b.image)


def test_tensor_frame_path_without_faces() -> None:
    engine = FaceRestorer(NegativeModel(FACE), FixedFaces([]), frame_path="tensor")
    frame = frames()[0]
    same = engine.restore_frames([frame])[0]
    assert same.image is frame and same.found == same.count == 0 and same.crops == []
    upscaled = engine.restore_frames([frame], 1.5)[0].image
    assert np.abs(upscaled.astype(int) - resize_image(frame, scale=1.5)).max() <= 1


def test_frame_path_choice() -> None:
    assert resolve_frame_path("auto", torch.device("cpu")) == "numpy"
    assert resolve_frame_path("auto", torch.device("cuda", 1)) == "tensor"
    assert resolve_frame_path("tensor", torch.device("cpu")) == "tensor"
    with pytest.raises(ValueError, match="frame path"):
        resolve_frame_path("gpu", torch.device("cpu"))


@pytest.mark.parametrize("scale", [2, 1.5, 0.5])
def test_tensor_resize_matches_resize_image(scale: float) -> None:
    image = face_like(96, 5)[:, :90].copy()
    want = resize_image(image, scale=scale)
    got = resize_tensor(torch.from_numpy(image).permute(2, 0, 1).float(), *want.shape[:2])
    assert np.abs(got.round().clamp(0, 255).permute(1, 2, 0).numpy() - want).max() <= 1


def test_cli_passes_the_frame_path_and_face_size(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = {}

    def build(choice, detection, faces, **kwargs):
        seen.update(frame_path=faces.frame_path, face_size=faces.face_size)
        raise InputError("stop here")

    monkeypatch.setattr(face_restorer_module, "build_face_restorer", build)
    cv2.imwrite(str(tmp_path / "photo.png"), np.zeros((32, 32, 3), np.uint8))  # the model loads for a first file
    run = lambda *opts: CliRunner().invoke(main, ["restore", str(tmp_path), "-o", str(tmp_path / "out"), *opts])  # noqa: E731
    result = run("--frame-path", "tensor")
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen["frame_path"] == "tensor" and seen["face_size"] == "auto"
    run("--face-size", "256")
    assert seen["face_size"] == 256
    for bad in (["--frame-path", "gpu"], ["--face-size", "big"], ["--face-size", "8"]):
        result = run(*bad)
        assert result.exit_code == 2 and bad[1] in result.output, result.output


# ------------------------------------------------------------------ threads
def test_prefetch_keeps_order_and_bounds_its_queue() -> None:
    depth, produced = 2, []

    def source():
        for i in range(20):
            produced.append(i)
            yield i

    got = []
    with Prefetch(source(), depth=depth) as items:
        deadline = time.monotonic() + 10
        while len(produced) < depth + 1 and time.monotonic() < deadline:  # let it run ahead
            time.sleep(0.01)
        for item in items:
            assert len(produced) - len(got) <= depth + 1, "read further ahead than its queue allows"
            got.append(item)
    assert got == list(range(20))
    assert max(produced) == 19


def test_prefetch_raises_the_source_error_after_its_items_and_closes_early() -> None:
    threads, closed = [], threading.Event()

    def failing():
        threads.append(threading.current_thread())
        yield 1
        yield 2
        raise MediaError("clip.mp4", "decoding stopped after 2 frames")

    got = []
    with pytest.raises(MediaError, match="decoding stopped") as err:
        for item in Prefetch(failing()):
            got.append(item)
    assert got == [1, 2] and str(err.value) == "clip.mp4: decoding stopped after 2 frames"
    assert threads[0] is not threading.main_thread()

    def endless():
        try:
            while True:
                yield 0
        finally:
            closed.set()

    with Prefetch(endless()) as items:
        assert next(items) == 0
    assert closed.is_set(), "leaving early must close the source (a decoder would keep running)"


def test_write_behind_writes_in_order_and_raises_the_sink_error() -> None:
    written = []
    with WriteBehind(written.append, depth=2) as sink:
        for i in range(10):
            sink.put(i)
    assert written == list(range(10))

    def broken(item: int) -> None:
        if item == 3:
            raise MediaError("out.mp4", "video encoder failed: disk full")
        written.append(item)

    written.clear()
    with pytest.raises(MediaError, match="disk full"):
        with WriteBehind(broken) as sink:
            for i in range(10):
                sink.put(i)
    assert written == [0, 1, 2]


# ------------------------------------------------------------------ videos through the threads
@pytest.fixture()
def video_engine() -> FaceRestorer:
    faces = FixedFaces([landmarks_at((40, 45), 20, 0.1), landmarks_at((90, 55), 16, -0.2)])
    return FaceRestorer(tiny_restorer(FACE), faces, batch_size=4, frame_path="tensor")


def clip(path: Path, seed: int = 0) -> Path:
    make_face_video(path, face_like(128, seed)[:96].copy(), frames=6)
    return path


def test_video_with_tensor_path_and_threads_keeps_frames_and_audio(video_engine: FaceRestorer, tmp_path: Path) -> None:
    src = clip(tmp_path / "clip.mp4")
    summary = run_restore([str(src)], video_engine, RestoreOptions(tmp_path / "out", video_chunk=4))
    assert summary.ok and summary.videos == 1 and summary.frames == 6 and summary.faces_restored == 12
    out = tmp_path / "out" / "clip.mp4"
    before, after = probe_video(src), probe_video(out)
    assert after.has_audio and after.fps == before.fps and (after.width, after.height) == (128, 96)
    assert len(list(read_video_frames(out))) == 6


def test_reader_thread_error_fails_that_video_and_the_next_is_restored(
    video_engine: FaceRestorer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    bad, good = clip(src / "a_bad.mp4"), clip(src / "b_good.mp4", 1)
    readers = []
    real_reader = restore_loop.read_video_frames

    def reader(path):
        readers.append(threading.current_thread())
        if Path(path) == bad:
            yield from list(real_reader(path))[:5]
            raise MediaError(path, "decoding stopped after 5 frames: corrupt packet")
        yield from real_reader(path)

    monkeypatch.setattr(restore_loop, "read_video_frames", reader)
    summary = run_restore([str(src)], video_engine, RestoreOptions(tmp_path / "out", video_chunk=2))
    assert summary.failures == [f"{bad}: decoding stopped after 5 frames: corrupt packet"]
    assert summary.videos == 1 and summary.frames == 6
    assert all(t is not threading.main_thread() for t in readers) and len(readers) == 2
    assert [p.name for p in (tmp_path / "out").iterdir()] == [good.name], "no partial or temp file of the failed video"


def test_writer_thread_error_leaves_no_output(video_engine: FaceRestorer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = clip(tmp_path / "clip.mp4")
    write = VideoWriter.write

    def failing_write(self: VideoWriter, frame: np.ndarray) -> None:
        if self.frames_written == 3:
            raise MediaError(self.out_path, "video encoder failed: No space left on device")
        write(self, frame)

    monkeypatch.setattr(VideoWriter, "write", failing_write)
    summary = run_restore([str(src)], video_engine, RestoreOptions(tmp_path / "out", video_chunk=2))
    assert len(summary.failures) == 1 and "No space left on device" in summary.failures[0]
    assert list((tmp_path / "out").iterdir()) == []
