"""The file loop: the user's inputs in, restored files out, with a summary and per-file errors.

`run_restore` walks the inputs, reads and writes media, keeps going past bad files and counts
what happened; the `FaceRestorer` (face_restorer.py) does the faces of each group of photos or
chunk of video frames. Videos are decoded and encoded in background threads (threads.py) while
their frames are restored. Under `torchrun` each process runs its `Shard` of the inputs
(shards.py) and `restore_shard` gathers the summaries, so rank 0 can report the whole run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from facerestore_cli.faces.tracking import FaceTracker
from facerestore_cli.io.files import MediaError, copy_file
from facerestore_cli.io.images import LoadedImage, read_image, resize_image, write_image
from facerestore_cli.io.inputs import (
    InputItem,
    check_outdir,
    discover_inputs,
    output_path_for,
)
from facerestore_cli.io.video import probe_video, read_video_frames
from facerestore_cli.io.video_writer import VideoWriter
from facerestore_cli.restore.face_restorer import FaceRestorer
from facerestore_cli.restore.frames import (
    FrameResult,
)
from facerestore_cli.restore.options import RestoreOptions
from facerestore_cli.restore.report import Reporter, SilentReporter, Summary
from facerestore_cli.restore.shards import Shard, gather_summary, leave_shards
from facerestore_cli.restore.threads import Prefetch, WriteBehind

#: Photos restored together hold at most this many pixels (detection holds them as float on
#: the device: about 0.6 GB), so a big --batch-size on a folder of 24-MP photos still fits.
PHOTO_GROUP_PIXELS = 50_000_000


# ------------------------------------------------------------------ torchrun sharding


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


def restore_photos(
    face_restorer: FaceRestorer, photos: Sequence[tuple[InputItem, Path]], opts: RestoreOptions, summary: Summary, reporter: Reporter
) -> None:
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
            results: list[FrameResult | None] = _restore_images(face_restorer, [img for _, _, img in group], opts)
        except Exception:
            results = [None] * len(group)
        for (item, out, img), result in zip(group, results):
            try:
                alone = result if result is not None else _restore_images(face_restorer, [img], opts)[0]
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


def _restore_images(face_restorer: FaceRestorer, images: Sequence[LoadedImage], opts: RestoreOptions) -> list[FrameResult]:
    rgbs = [img.rgb for img in images]
    if opts.aligned:
        return face_restorer.restore_aligned(rgbs)
    return face_restorer.restore_frames(rgbs, opts.upscale, opts.only_center_face, keep_faces=opts.save_faces)


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


def restore_video(
    face_restorer: FaceRestorer, item: InputItem, out: Path, opts: RestoreOptions, summary: Summary, reporter: Reporter
) -> None:
    """One video, frame chunk by frame chunk (faces of a chunk share model batches), audio kept.

    Faces are searched for in the whole frame every `opts.detect_every` frames and followed
    in between (faces/tracking.py). The next chunk is decoded and the previous one encoded in
    background threads while this one is restored; their errors surface here, and the writer
    leaves no output behind then.
    """
    info = probe_video(item.path)
    tracker = FaceTracker(face_restorer.detector, opts.detect_every)
    reporter.file_started(item, info.frame_count)
    faces_before, frames = summary.faces_found, 0
    size = (round(info.width * opts.upscale), round(info.height * opts.upscale))
    with (
        VideoWriter(out, info.fps, size, audio_from=item.path if info.has_audio else None) as writer,
        Prefetch(_chunks(read_video_frames(item.path), opts.video_chunk), name="decode") as chunks,
        WriteBehind(lambda images: _write_frames(writer, images), name="encode") as encoder,
    ):
        for chunk in chunks:
            results = face_restorer.restore_frames(chunk, opts.upscale, opts.only_center_face, detector=tracker)
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
    specs: Sequence[str], face_restorer: FaceRestorer, opts: RestoreOptions, reporter: Reporter | None = None, shard: Shard | None = None
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
                photos = _flush(face_restorer, photos, opts, summary, reporter)  # inputs are done in order
                restore_video(face_restorer, item, out, opts, summary, reporter)
            else:
                photos.append((item, out))
                if len(photos) == face_restorer.batch_size:
                    photos = _flush(face_restorer, photos, opts, summary, reporter)
                continue  # restore_photos reports it done
        except Exception as err:  # one broken file must not stop a batch of thousands
            _fail(summary, reporter, _message(item, err))
        reporter.file_done(item)
    _flush(face_restorer, photos, opts, summary, reporter)
    summary.seconds = time.perf_counter() - t0
    return summary


def _flush(
    face_restorer: FaceRestorer, photos: list[tuple[InputItem, Path]], opts: RestoreOptions, summary: Summary, reporter: Reporter
) -> list[tuple[InputItem, Path]]:
    """Restore the photos waiting, if any; returns the (now empty) list of photos waiting."""
    if photos:
        restore_photos(face_restorer, photos, opts, summary, reporter)
    return []


def _message(item: InputItem, err: Exception) -> str:
    """The one-line error for a file: media errors name the file and reason already."""
    return str(err) if isinstance(err, MediaError) else f"{item.path}: {type(err).__name__}: {err}"


def restore_shard(specs: Sequence[str], face_restorer: FaceRestorer, opts: RestoreOptions, reporter: Reporter, shard: Shard) -> Summary:
    """`run_restore` of this process's shard, then the whole run's summary (gathered from every
    rank under torchrun, so all exit with the same code) and the process group left."""
    summary = gather_summary(run_restore(specs, face_restorer, opts, reporter, shard), shard)
    leave_shards()
    return summary
