"""The restore loop: files in, restored files out, with a summary and per-file errors.

`FaceRestorer` works on frames (detect -> align -> restore in batches -> paste back, with numpy
or on the model's device: frames.py); `run_restore` walks the user's inputs, reads and writes
media, keeps going past bad files and counts what happened. Videos are decoded and encoded in
background threads (threads.py) while their frames are restored. The CLI only parses options
and shows progress.

Under `torchrun` (WORLD_SIZE > 1) each process restores its `Shard` of the inputs on its own GPU
and the summaries are gathered (`gather_summary`), so rank 0 can report the whole run.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import torch

from . import WEIGHTS_DIR
from .devices import DTYPES, resolve_device, resolve_dtype  # noqa: F401  (re-exported: callers import them from here)
from .faces.align import estimate_affine, face_extent, working_size
from .faces.detector import Detector, Face, build_detector
from .faces.tracking import DEFAULT_DETECT_EVERY, FaceTracker
from .frames import AlignedFaces, FrameResult, resolve_frame_path, restore_frames_numpy, restore_frames_tensor
from .media import (
    InputItem,
    LoadedImage,
    MediaError,
    VideoWriter,
    check_outdir,
    copy_file,
    discover_inputs,
    output_path_for,
    probe_video,
    read_image,
    read_video_frames,
    resize_image,
    write_image,
)
from .models.color import DEFAULT_COLOR_FIX, parse_color_fix
from .models.inference import CompiledRestorer, RestoreModel, restore_crops, restore_crops_tensor
from .models.precision import LOW_PRECISION, PrecisionGuard
from .models.restorer import OneStepRestorer
from .threads import Prefetch, WriteBehind

DEFAULT_MODEL = WEIGHTS_DIR / "restorer-tiny"
#: `--batch-size auto` on a GPU: the old fixed default; batch sizes have not been measured on a GPU.
AUTO_GPU_BATCH = 4
#: Photos restored together hold at most this many pixels (detection holds them as float on
#: the device: about 0.6 GB), so a big --batch-size on a folder of 24-MP photos still fits.
PHOTO_GROUP_PIXELS = 50_000_000


def load_restorer(
    model: str | Path | None, lora: Path | None, device: torch.device, dtype: torch.dtype, osediff: Path | None = None
) -> OneStepRestorer:
    """Load the restorer (bundled default when None) and merge an optional LoRA.

    `model` is a restorer folder (`save_pretrained`), or a Stable Diffusion 2.1-base diffusers
    folder, optionally with upstream OSEDiff LoRA weights (`osediff`, their .pkl).
    """
    from .models.upstream import load_osediff_checkpoint

    restorer = OneStepRestorer.from_pretrained(Path(model) if model else DEFAULT_MODEL, torch_dtype=torch.float32)
    if osediff:
        load_osediff_checkpoint(restorer, osediff)
        restorer.merge_lora()
    if lora:
        restorer.load_lora(lora)
        restorer.merge_lora()
    return restorer.to(device=device, dtype=dtype).eval()


def fast_torch_model(restorer: OneStepRestorer, compile_model: bool = False, warn: Callable[[str], None] | None = None) -> RestoreModel:
    """The merged restorer under torch.compile if asked, and under the fp32 fallback guard when
    it runs in fp16/bf16. Weights go channels_last on the CPU (oneDNN's convolutions run the
    model 11-15 % faster that way, benchmarks/RESULTS.md) and, with --compile, on CUDA (tensor
    cores prefer it)."""
    runner: RestoreModel = restorer
    nhwc = restorer.device.type == "cpu" or compile_model
    if nhwc:
        restorer.to(memory_format=torch.channels_last)
    if compile_model:
        runner = CompiledRestorer(restorer, channels_last=nhwc, warn=warn)
    if restorer.dtype in LOW_PRECISION:
        runner = PrecisionGuard(restorer, runner, warn)
    return runner


def _auto_or_int(value: str | int, minimum: int, what: str) -> str | int:
    """"auto", or a whole number of at least `minimum`; else a ValueError asking for `what`."""
    if value == "auto":
        return value
    if not str(value).isdigit() or int(value) < minimum:
        raise ValueError(f"{value!r}: give auto or {what}")
    return int(value)


def parse_face_size(value: str | int) -> str | int:
    """`--face-size` as given: "auto" or a whole number of pixels (>= 16); ValueError otherwise.
    Whether the number suits the model is checked once it is loaded (`face_sizes_for`)."""
    return _auto_or_int(value, 16, "a crop size in pixels of at least 16, e.g. 512")


def parse_batch_size(value: str | int) -> str | int:
    """`--batch-size` as given: "auto" or a whole number of faces (>= 1); ValueError otherwise."""
    return _auto_or_int(value, 1, "a whole number of faces, at least 1")


def face_sizes_for(model: RestoreModel, choice: str | int = "auto") -> list[int]:
    """The crop sizes `--face-size` lets faces be restored at, smallest first.

    auto: every size the model was trained for (`RestorerConfig.face_sizes`; an exported engine
    has only its own); a number: that size for every face, which a torch model can take at any
    multiple of its downsampling (quality is only measured at the sizes it was trained for).
    """
    cfg = model.config
    if choice == "auto":
        return cfg.face_sizes
    size = int(choice)
    if size < cfg.size_multiple or size % cfg.size_multiple:
        raise ValueError(f"--face-size {size}: must be a multiple of {cfg.size_multiple} for this model")
    if not model.takes_any_size and size != cfg.face_size:
        raise ValueError(f"--face-size {size}: an exported engine takes only the size it was made for, {cfg.face_size} px")
    return [size]


def resolve_batch_size(choice: int | str, device: torch.device, face_size: int = 512) -> int:
    """`--batch-size`: a number as given; auto on a CPU is as many faces as four of 256 px (one
    at 512 px, where a batch of 4 measured 10 % slower per face than single faces on 2 cores;
    four at 256, where it was 19 % faster), and AUTO_GPU_BATCH on a GPU."""
    if choice != "auto":
        return int(choice)
    if torch.device(device).type == "cuda":
        return AUTO_GPU_BATCH
    return max(1, round(4 * (256 / face_size) ** 2))


def center_face(faces: list[Face], shape: tuple[int, ...]) -> list[Face]:
    """The face whose box centre is nearest the image centre (GFPGAN's --only_center_face)."""
    if len(faces) <= 1:
        return faces
    c = np.array([shape[1] / 2, shape[0] / 2])
    return [min(faces, key=lambda f: float(np.linalg.norm((f.box[:2] + f.box[2:]) / 2 - c)))]


class FaceRestorer:
    """Detect -> align -> restore (batched across frames) -> paste back, on RGB uint8 frames.

    `frame_path` (`--frame-path`): "tensor" warps, restores and pastes each chunk of frames on
    the model's device, "numpy" with OpenCV on the CPU, "auto" is tensor on CUDA (frames.py).
    `face_size` (`--face-size`): "auto" restores each face on the smallest crop the model was
    trained for that is at least the face's size in the output image (`face_sizes_for`).
    """

    def __init__(self, model: RestoreModel, detector: Detector, batch_size: int | str = 4, color_fix: str = DEFAULT_COLOR_FIX,
                 frame_path: str = "auto", face_size: str | int = "auto"):  # fmt: skip
        parse_color_fix(color_fix)  # a bad spec fails here, before any file is read
        self.model, self.detector, self.color_fix = model, detector, color_fix
        self.sizes = face_sizes_for(model, face_size)
        self.face_size = max(self.sizes)  # the model's own size, or the one --face-size forces
        self.batch_size = resolve_batch_size(batch_size, model.device, self.face_size)
        self.frame_path = resolve_frame_path(frame_path, model.device)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def restore_crops(self, crops: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Restore aligned face crops (of one size), batch_size at a time."""
        return restore_crops(self.model, crops, self.batch_size, self.color_fix)

    def restore_crops_tensor(self, crops: torch.Tensor) -> torch.Tensor:
        """The same for a uint8 Nx3xSxS tensor; uint8 out on the model's device."""
        return restore_crops_tensor(self.model, crops, self.batch_size, self.color_fix)

    def restore_aligned(self, images: Sequence[np.ndarray]) -> list[FrameResult]:
        """Inputs that are already aligned faces: each resized to the model's size, restored together."""
        side = (self.face_size, self.face_size)
        crops = [im if im.shape[:2] == side else resize_image(im, size=side) for im in images]
        return [FrameResult(r, [c], [r], 1, 1) for c, r in zip(crops, self.restore_crops(crops))]

    def restore_frames(
        self, frames: Sequence[np.ndarray], upscale: float = 1.0, only_center_face: bool = False, keep_faces: bool = False,
        detector: Detector | None = None,
    ) -> list[FrameResult]:  # fmt: skip
        """Whole frames: every detected face restored in one batch across all frames, then pasted.
        `keep_faces` (--save-faces) also returns each face's crop and restoration. `detector`
        replaces the engine's own for these frames (a video's `FaceTracker`)."""
        detections = (detector or self.detector).detect(list(frames))
        aligned = [self._align(frame, faces, only_center_face, upscale) for frame, faces in zip(frames, detections)]
        if self.frame_path == "tensor":
            return restore_frames_tensor(frames, aligned, upscale, self.restore_crops_tensor, self.device, keep_faces)
        return restore_frames_numpy(frames, aligned, upscale, self.restore_crops)

    def _align(self, frame: np.ndarray, faces: list[Face], only_center_face: bool, upscale: float = 1.0) -> AlignedFaces:
        """Each kept face's affine at its working size: the face's size in the output image
        (after --upscale) picks the crop size (`face_sizes_for`)."""
        kept = center_face(faces, frame.shape) if only_center_face else faces
        affines, sizes = [], []
        for f in kept:
            affine = estimate_affine(f.landmarks, self.face_size)
            size = working_size(upscale * face_extent(affine, self.face_size), self.sizes)
            affines.append(affine if size == self.face_size else estimate_affine(f.landmarks, size))
            sizes.append(size)
        return AlignedFaces(affines, len(faces), sizes)


@dataclass
class RestoreOptions:
    outdir: Path
    upscale: float = 1.0
    only_center_face: bool = False
    aligned: bool = False
    save_faces: bool = False
    compare: bool = False
    skip_existing: bool = False
    video_chunk: int = 8
    detect_every: int = DEFAULT_DETECT_EVERY


@dataclass
class Summary:
    """What a run did; printed at the end and turned into the exit code."""

    files: int = 0
    images: int = 0
    videos: int = 0
    frames: int = 0
    faces_found: int = 0
    faces_restored: int = 0
    files_without_faces: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def faces_per_s(self) -> float:
        return self.faces_restored / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


class Reporter(Protocol):
    """How the loop tells its caller what is happening (the CLI draws progress bars from it)."""

    def start(self, total_files: int) -> None: ...
    def file_started(self, item: InputItem, frames: int | None) -> None: ...
    def frames_done(self, n: int) -> None: ...
    def file_done(self, item: InputItem) -> None: ...
    def error(self, message: str) -> None: ...


class SilentReporter:
    def start(self, total_files: int) -> None: ...
    def file_started(self, item: InputItem, frames: int | None) -> None: ...
    def frames_done(self, n: int) -> None: ...
    def file_done(self, item: InputItem) -> None: ...
    def error(self, message: str) -> None: ...


class ErrorsOnlyReporter(SilentReporter):
    """No progress, but errors still shown as they happen (torchrun ranks other than 0)."""

    def __init__(self, show: Callable[[str], None]):
        self.show = show

    def error(self, message: str) -> None:
        self.show(message)


# ------------------------------------------------------------------ torchrun sharding
@dataclass(frozen=True)
class Shard:
    """This process's share of a run: rank r of `world` restores inputs r, r + world, ..."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Shard:
        """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (a single process without them)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as err:
            raise ValueError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers ({err})") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} does not fit WORLD_SIZE={world}")
        return cls(rank, world, local)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def take(self, items: Sequence[InputItem]) -> list[InputItem]:
        """This rank's items of the list sorted by output path (the same list on every rank)."""
        if not self.distributed:
            return list(items)
        return sorted(items, key=lambda i: str(i.rel))[self.rank :: self.world]

    def device(self, device: torch.device) -> torch.device:
        """CUDA without an index means this process's own GPU, cuda:LOCAL_RANK."""
        if self.distributed and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        return device


def join_shards(shard: Shard) -> None:
    """Join torchrun's process group: gloo, since only a few counts ever travel (no GPU needed).

    The timeout is long because ranks finish their shards at different times (a long video).
    """
    import torch.distributed as dist

    if shard.distributed and not dist.is_initialized():
        try:
            dist.init_process_group("gloo", timeout=timedelta(days=7))
        except (RuntimeError, ValueError) as err:  # DistNetworkError and friends: one line, not a traceback
            first = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(f"torchrun rank {shard.rank}: cannot join the process group ({type(err).__name__}: {first})") from None


def leave_shards() -> None:
    """Tear the process group down cleanly (torch warns at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def merge_summaries(parts: Sequence[Summary]) -> Summary:
    """One summary of a sharded run: counts add up, time is the slowest rank's."""
    total = Summary()
    counts = [f.name for f in fields(Summary) if f.type == "int"]
    for part in parts:
        for name in counts:
            setattr(total, name, getattr(total, name) + getattr(part, name))
        total.failures += part.failures
        total.seconds = max(total.seconds, part.seconds)
    total.failures = list(dict.fromkeys(total.failures))  # e.g. an unwritable OUTPUT, seen by every rank
    return total


def gather_summary(summary: Summary, shard: Shard) -> Summary:
    """Every rank's summary merged, on every rank (so all exit with the same code)."""
    if not shard.distributed:
        return summary
    import torch.distributed as dist

    parts: list[dict | None] = [None] * shard.world
    dist.all_gather_object(parts, asdict(summary))
    return merge_summaries([Summary(**p) for p in parts if p is not None])


def side_by_side(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Before | after at the output's size, for --compare."""
    if before.shape[:2] != after.shape[:2]:
        before = resize_image(before, size=(after.shape[0], after.shape[1]))
    return np.concatenate([before, after], axis=1)


def _count_faces(summary: Summary, results: Iterable[FrameResult]) -> int:
    """Add the faces of these frames to the summary; returns how many were found."""
    found = 0
    for r in results:
        found += r.found
        summary.faces_restored += r.count
    summary.faces_found += found
    return found


def _save_extras(opts: RestoreOptions, item: InputItem, img: LoadedImage, result: FrameResult) -> None:
    """--save-faces (aligned | restored per face) and --compare (before | after)."""
    if opts.save_faces:
        for i, (crop, face) in enumerate(zip(result.crops, result.restored)):
            stem = item.rel.with_suffix("")
            write_image(opts.outdir / "faces" / f"{stem}_{i:02d}.png", np.concatenate([crop, face], axis=1))
    if opts.compare:
        write_image(output_path_for(item, opts.outdir / "compare"), side_by_side(img.rgb, result.image), like=img)


def restore_photos(engine: FaceRestorer, photos: Sequence[tuple[InputItem, Path]], opts: RestoreOptions, summary: Summary,
                   reporter: Reporter) -> None:  # fmt: skip
    """Photos restored together (as many as --batch-size): read each, detect in one call and
    restore the faces of all in shared model batches, so a folder of one-face portraits fills
    the model's batches as a video's frames do; then write each. A photo that cannot be read or
    written fails alone; if restoring them together fails, each is restored alone, so the error
    names its file and the others are still written."""
    loaded = []
    for item, out in photos:
        reporter.file_started(item, None)
        try:
            loaded.append((item, out, read_image(item.path)))
        except Exception as err:
            _fail(summary, reporter, _message(item, err))
            reporter.file_done(item)
    for group in _within_pixels(loaded, PHOTO_GROUP_PIXELS):
        try:
            results: list[FrameResult | None] = _restore_images(engine, [img for _, _, img in group], opts)
        except Exception:
            results = [None] * len(group)
        for (item, out, img), result in zip(group, results):
            try:
                alone = result if result is not None else _restore_images(engine, [img], opts)[0]
                _write_photo(item, out, img, alone, opts, summary)
            except Exception as err:
                _fail(summary, reporter, _message(item, err))
            reporter.file_done(item)


def _within_pixels(photos: list[tuple[InputItem, Path, LoadedImage]], budget: int) -> Iterable[list[tuple[InputItem, Path, LoadedImage]]]:
    """Consecutive groups of photos of at most `budget` pixels together (a bigger photo alone)."""
    group: list[tuple[InputItem, Path, LoadedImage]] = []
    pixels = 0
    for photo in photos:
        size = photo[2].rgb.shape[0] * photo[2].rgb.shape[1]
        if group and pixels + size > budget:
            yield group
            group, pixels = [], 0
        group.append(photo)
        pixels += size
    if group:
        yield group


def _restore_images(engine: FaceRestorer, images: Sequence[LoadedImage], opts: RestoreOptions) -> list[FrameResult]:
    rgbs = [img.rgb for img in images]
    if opts.aligned:
        return engine.restore_aligned(rgbs)
    return engine.restore_frames(rgbs, opts.upscale, opts.only_center_face, keep_faces=opts.save_faces)


def _write_photo(item: InputItem, out: Path, img: LoadedImage, result: FrameResult, opts: RestoreOptions, summary: Summary) -> None:
    """One restored photo written (with --save-faces / --compare extras) and counted."""
    no_face = _count_faces(summary, [result]) == 0
    summary.files_without_faces += no_face
    if no_face and opts.upscale == 1:
        copy_file(item.path, out)  # the file itself, not a re-encoded copy
    else:
        write_image(out, result.image, like=img)
    _save_extras(opts, item, img, result)
    summary.images += 1


def _chunks(frames: Iterable[np.ndarray], n: int) -> Iterable[list[np.ndarray]]:
    chunk: list[np.ndarray] = []
    for f in frames:
        chunk.append(f)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def restore_video(engine: FaceRestorer, item: InputItem, out: Path, opts: RestoreOptions, summary: Summary, reporter: Reporter) -> None:
    """One video, frame chunk by frame chunk (faces of a chunk share model batches), audio kept.

    Faces are searched for in the whole frame every `opts.detect_every` frames and followed
    in between (faces/tracking.py). The next chunk is decoded and the previous one encoded in
    background threads while this one is restored; their errors surface here, and the writer
    leaves no output behind then.
    """
    info = probe_video(item.path)
    tracker = FaceTracker(engine.detector, opts.detect_every)
    reporter.file_started(item, info.frame_count)
    faces_before, frames = summary.faces_found, 0
    size = (round(info.width * opts.upscale), round(info.height * opts.upscale))
    with (
        VideoWriter(out, info.fps, size, audio_from=item.path if info.has_audio else None) as writer,
        Prefetch(_chunks(read_video_frames(item.path), opts.video_chunk), name="decode") as chunks,
        WriteBehind(lambda images: _write_frames(writer, images), name="encode") as encoder,
    ):
        for chunk in chunks:
            results = engine.restore_frames(chunk, opts.upscale, opts.only_center_face, detector=tracker)
            _count_faces(summary, results)
            encoder.put([r.image for r in results])
            frames += len(chunk)
            reporter.frames_done(len(chunk))
    summary.frames += frames
    summary.videos += 1
    if summary.faces_found == faces_before:
        summary.files_without_faces += 1


def _write_frames(writer: VideoWriter, images: list[np.ndarray]) -> None:
    for image in images:
        writer.write(image)


def _fail(summary: Summary, reporter: Reporter, message: str) -> None:
    summary.failures.append(message)
    reporter.error(message)


def run_restore(
    specs: Sequence[str], engine: FaceRestorer, opts: RestoreOptions, reporter: Reporter | None = None, shard: Shard | None = None
) -> Summary:
    """Restore every input (this shard's, under torchrun); a bad file is reported and counted, and the rest goes on."""
    reporter, shard = reporter or SilentReporter(), shard or Shard()
    summary, t0 = Summary(), time.perf_counter()
    items, errors = discover_inputs(specs, exclude=[opts.outdir])
    items = shard.take(items)
    for err in errors if shard.rank == 0 else []:  # every rank sees them; one reports them
        _fail(summary, reporter, str(err))
    try:
        check_outdir(opts.outdir)
    except MediaError as err:
        _fail(summary, reporter, str(err))
        return summary
    reporter.start(len(items))
    photos: list[tuple[InputItem, Path]] = []  # restored together, --batch-size at a time
    for item in items:
        summary.files += 1
        try:
            out = output_path_for(item, opts.outdir)
            if opts.skip_existing and out.exists():
                summary.skipped += 1
            elif item.kind == "video":
                photos = _flush(engine, photos, opts, summary, reporter)  # inputs are done in order
                restore_video(engine, item, out, opts, summary, reporter)
            else:
                photos.append((item, out))
                if len(photos) == engine.batch_size:
                    photos = _flush(engine, photos, opts, summary, reporter)
                continue  # restore_photos reports it done
        except Exception as err:  # one broken file must not stop a batch of thousands
            _fail(summary, reporter, _message(item, err))
        reporter.file_done(item)
    _flush(engine, photos, opts, summary, reporter)
    summary.seconds = time.perf_counter() - t0
    return summary


def _flush(engine: FaceRestorer, photos: list[tuple[InputItem, Path]], opts: RestoreOptions, summary: Summary,
           reporter: Reporter) -> list[tuple[InputItem, Path]]:  # fmt: skip
    """Restore the photos waiting, if any; returns the (now empty) list of photos waiting."""
    if photos:
        restore_photos(engine, photos, opts, summary, reporter)
    return []


def _message(item: InputItem, err: Exception) -> str:
    """The one-line error for a file: media errors name the file and reason already."""
    return str(err) if isinstance(err, MediaError) else f"{item.path}: {type(err).__name__}: {err}"


def restore_shard(specs: Sequence[str], engine: FaceRestorer, opts: RestoreOptions, reporter: Reporter, shard: Shard) -> Summary:
    """`run_restore` of this process's shard, then the whole run's summary (gathered from every
    rank under torchrun, so all exit with the same code) and the process group left."""
    summary = gather_summary(run_restore(specs, engine, opts, reporter, shard), shard)
    leave_shards()
    return summary


def build_engine(
    model: str | Path | None = None,
    lora: Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int | str = "auto",
    detector: str = "mtcnn",
    det_threshold: float = 0.7,
    min_face_size: int = 20,
    osediff: Path | None = None,
    color_fix: str = DEFAULT_COLOR_FIX,
    backend: str = "torch",
    engine: Path | None = None,
    compile_model: bool = False,
    warn: Callable[[str], None] | None = None,
    shard: Shard | None = None,
    frame_path: str = "auto",
    face_size: str | int = "auto",
) -> FaceRestorer:
    """Everything `restore` needs loaded once: the restorer and the detector on one device
    (this process's GPU under torchrun). `warn` gets one-line warnings (fp16 fallback, compile);
    `frame_path` is where whole frames are warped and pasted (see `FaceRestorer`)."""
    dev = (shard or Shard()).device(resolve_device(device))
    dtype = resolve_dtype(precision, dev)
    # TensorRT engines are built for a batch size at load; they run on a GPU, where auto does not
    # depend on the face size.
    restorer = load_model(backend, model, lora, osediff, dev, dtype, precision, engine, resolve_batch_size(batch_size, dev),
                          compile_model, warn)  # fmt: skip
    det = build_detector(detector, device=dev, threshold=det_threshold, min_face_size=min_face_size)
    return FaceRestorer(restorer, det, batch_size, color_fix, frame_path, face_size)


def load_model(
    backend: str, model: str | Path | None, lora: Path | None, osediff: Path | None, device: torch.device,
    dtype: torch.dtype, precision: str, engine: Path | None = None, batch_size: int = 4,
    compile_model: bool = False, warn: Callable[[str], None] | None = None,
) -> RestoreModel:  # fmt: skip
    """The torch restorer, or an exported engine of the same model (`--backend onnx|tensorrt`).

    Engines are checked against the model asked for (content fingerprint), so `--model`/`--lora`
    mean the same with every backend; without --engine one is made once and cached.
    """
    if backend == "torch":
        if engine is not None:
            raise ValueError("--engine needs --backend onnx or tensorrt")
        return fast_torch_model(load_restorer(model, lora, device, dtype, osediff), compile_model, warn)
    if compile_model:
        raise ValueError(f"--compile is for --backend torch; --backend {backend} is compiled already")
    from .export.backends import load_backend
    from .export.source import ModelSource

    source = ModelSource(Path(model) if model else DEFAULT_MODEL, lora, osediff)
    return load_backend(backend, source, device, precision, engine, batch_size)
