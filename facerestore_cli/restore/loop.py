"""The file loop: the user's inputs in, restored files out, with a summary and per-file errors.

`run_restore` walks the inputs, reads and writes media, keeps going past bad files and counts
what happened; the `FaceRestorer` (face_restorer.py) does the faces of each group of photos or
chunk of video frames. Videos are decoded and encoded in background threads (threads.py) while
their frames are restored. Under `torchrun` each process runs its `Shard` of the inputs
(shards.py) and `restore_shard` gathers the summaries, so rank 0 can report the whole run.

Every input ends in one `FileRecord` (ok, skipped, failed, no_faces) handed to the reporter as
it finishes (`restore --report`). A run can be stopped: when `stop()` turns true (the CLI's first
Ctrl-C) the photos being restored are finished and written, a video in hand is dropped (its temp
files removed: it is redone on resume), and the summary says how many inputs are left; a
KeyboardInterrupt (a second Ctrl-C) drops the file in hand at once and comes out as `Interrupted`
carrying the summary. Outputs are only ever published whole (io/files.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from facerestore_cli.faces.align import paste_faces_high
from facerestore_cli.faces.tracking import FaceTracker
from facerestore_cli.io.files import MediaError, copy_file, remove_orphaned_temps
from facerestore_cli.io.high_depth import widen
from facerestore_cli.io.images import LoadedImage, output_notes, read_image, resize_image, write_image
from facerestore_cli.io.inputs import (
    InputItem,
    check_outdir,
    discover_inputs,
    output_path_for,
)
from facerestore_cli.io.video import probe_video, read_video_frames
from facerestore_cli.io.video_writer import VideoWriter
from facerestore_cli.restore.options import RestoreOptions
from facerestore_cli.restore.report import FileRecord, Interrupted, Reporter, SilentReporter, Summary
from facerestore_cli.restore.shards import Shard, gather_summary, leave_shards
from facerestore_cli.restore.threads import Prefetch, WriteBehind

if TYPE_CHECKING:  # only named in annotations: the loop itself imports no torch (a run with nothing to restore loads nothing)
    from facerestore_cli.restore.face_restorer import FaceRestorer
    from facerestore_cli.restore.frames import FrameResult

#: Photos restored together hold at most this many pixels (detection holds them as float on
#: the device: about 0.6 GB), so a big --batch-size on a folder of 24-MP photos still fits.
PHOTO_GROUP_PIXELS = 50_000_000


class RunStopped(Exception):
    """`stop()` turned true while a video was being restored: it is dropped, not failed."""


def _never() -> bool:
    return False


#: A photo read and waiting to be restored: its input, output path, image and seconds spent so far.
_Loaded = tuple[InputItem, Path, LoadedImage, float]


def side_by_side(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Before | after at the output's size, for --compare."""
    if before.shape[:2] != after.shape[:2]:
        before = resize_image(before, size=(after.shape[0], after.shape[1]))
    return np.concatenate([before, after], axis=1)


def _save_extras(opts: RestoreOptions, item: InputItem, img: LoadedImage, result: FrameResult) -> None:
    """--save-faces (aligned | restored per face) and --compare (before | after)."""
    if opts.save_faces:
        for i, (crop, face) in enumerate(zip(result.crops, result.restored)):
            stem = item.rel.with_suffix("")
            write_image(opts.outdir / "faces" / f"{stem}_{i:02d}.png", np.concatenate([crop, face], axis=1))
    if opts.compare:
        write_image(output_path_for(item, opts.outdir / "compare"), side_by_side(img.rgb, result.image), like=img)


def restore_photos(
    face_restorer: FaceRestorer,
    photos: Sequence[tuple[InputItem, Path]],
    opts: RestoreOptions,
    summary: Summary,
    reporter: Reporter,
    stop: Callable[[], bool] = _never,
) -> None:
    """Photos restored together (as many as --batch-size): read each, detect in one call and
    restore the faces of all in shared model batches, so a folder of one-face portraits fills
    the model's batches as a video's frames do; then write each. A photo that cannot be read or
    written fails alone; if restoring them together fails, each is restored alone, so the error
    names its file and the others are still written. Once `stop()` holds, no further group is
    started (the photos left are not finished). A photo's seconds are its reading and writing
    and an equal share of its group's restoring."""
    loaded: list[_Loaded] = []
    for item, out in photos:
        reporter.file_started(item, None)
        t0 = time.perf_counter()
        try:
            loaded.append((item, out, read_image(item.path), time.perf_counter() - t0))
        except Exception as err:
            _finished(summary, reporter, _failed(item, err, time.perf_counter() - t0))
            reporter.file_done(item)
    for group in _within_pixels(loaded, PHOTO_GROUP_PIXELS):
        if stop():
            return
        t0 = time.perf_counter()
        try:
            results: list[FrameResult | None] = _restore_images(face_restorer, [img for _, _, img, _ in group], opts)
        except Exception:
            results = [None] * len(group)
        share = (time.perf_counter() - t0) / len(group)
        for (item, out, img, spent), result in zip(group, results):
            t1 = time.perf_counter()
            try:
                alone = result if result is not None else _restore_images(face_restorer, [img], opts)[0]
                record = _write_photo(item, out, img, alone, opts, summary)
            except Exception as err:
                record = _failed(item, err)
            record.seconds = spent + share + time.perf_counter() - t1
            _finished(summary, reporter, record)
            reporter.file_done(item)


def _within_pixels(photos: list[_Loaded], budget: int) -> Iterable[list[_Loaded]]:
    """Consecutive groups of photos of at most `budget` pixels together (a bigger photo alone)."""
    group: list[_Loaded] = []
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
    keep = opts.save_faces or any(img.high is not None for img in images)  # 16-bit photos paste the faces again
    return face_restorer.restore_frames(rgbs, opts.upscale, opts.only_center_face, keep_faces=keep)


def _write_photo(item: InputItem, out: Path, img: LoadedImage, result: FrameResult, opts: RestoreOptions, summary: Summary) -> FileRecord:
    """One restored photo written (with --save-faces / --compare extras) and counted; its record.
    The extras go first: an output that exists is a photo finished (what --skip-existing tests)."""
    no_face = result.found == 0
    _save_extras(opts, item, img, result)
    if no_face and opts.upscale == 1:
        copy_file(item.path, out)  # the file itself, not a re-encoded copy
        notes = []
    else:
        write_image(out, _output_pixels(img, result, opts), like=img)
        notes = output_notes(img, out)  # e.g. "CMYK written as RGB"
    if notes:
        summary.notes.append(f"{item.path}: {'; '.join(notes)}")
    summary.images += 1
    summary.faces_found += result.found
    summary.faces_restored += result.count
    return FileRecord(str(item.path), str(out), "no_faces" if no_face else "ok", result.found, result.count, notes=notes)


def _output_pixels(img: LoadedImage, result: FrameResult, opts: RestoreOptions) -> np.ndarray:
    """What a restored photo is written as: its restored frame, or for a 16-bit photo its own
    samples with the restored faces pasted on, so the rest keeps all 16 bits (--aligned: the
    restoration itself, widened to 16 bits)."""
    if img.high is None:
        return result.image
    if opts.aligned:
        return widen(result.image, img.high)
    return paste_faces_high(img.high, result.restored, result.affines, opts.upscale, img.is_grey)


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
    face_restorer: FaceRestorer,
    item: InputItem,
    out: Path,
    opts: RestoreOptions,
    summary: Summary,
    reporter: Reporter,
    stop: Callable[[], bool] = _never,
) -> FileRecord:
    """One video, frame chunk by frame chunk (faces of a chunk share model batches), audio kept;
    its record.

    Faces are searched for in the whole frame every `opts.detect_every` frames and followed
    in between (faces/tracking.py). The next chunk is decoded and the previous one encoded in
    background threads while this one is restored; their errors surface here, and the writer
    leaves no output behind then. Once `stop()` holds, the video is dropped the same way
    (`RunStopped`), and a decoder that the terminal's Ctrl-C stopped too does not pass for the
    video's end (the file loop takes any error once `stop()` holds for the run stopping).
    """
    info = probe_video(item.path)
    tracker = FaceTracker(face_restorer.detector, opts.detect_every)
    reporter.file_started(item, info.frame_count)
    found = restored = frames = 0
    size = (round(info.width * opts.upscale), round(info.height * opts.upscale))
    with (
        VideoWriter(out, info.fps, size, audio_from=item.path if info.has_audio else None) as writer,
        Prefetch(_chunks(read_video_frames(item.path), opts.video_chunk), name="decode") as chunks,
        WriteBehind(lambda images: _write_frames(writer, images), name="encode") as encoder,
    ):
        for chunk in chunks:
            if stop():
                raise RunStopped(item.path)
            results = face_restorer.restore_frames(chunk, opts.upscale, opts.only_center_face, detector=tracker)
            found += sum(r.found for r in results)
            restored += sum(r.count for r in results)
            encoder.put([r.image for r in results])
            frames += len(chunk)
            reporter.frames_done(len(chunk))
        if stop():
            raise RunStopped(item.path)
    summary.frames += frames
    summary.videos += 1
    summary.faces_found += found
    summary.faces_restored += restored
    return FileRecord(str(item.path), str(out), "ok" if found else "no_faces", found, restored)


def _write_frames(writer: VideoWriter, images: list[np.ndarray]) -> None:
    for image in images:
        writer.write(image)


def _fail(summary: Summary, reporter: Reporter, message: str) -> None:
    summary.failures.append(message)
    reporter.error(message)


def _failed(item: InputItem, err: Exception, seconds: float = 0.0) -> FileRecord:
    return FileRecord(str(item.path), None, "failed", seconds=seconds, error=_message(item, err))


def _finished(summary: Summary, reporter: Reporter, record: FileRecord) -> None:
    """One input done: counted by its status, its error shown, its record handed on (--report)."""
    summary.files += 1
    if record.status == "skipped":
        summary.skipped += 1
    elif record.status == "no_faces":
        summary.without_faces.append(record.path)
    elif record.status == "failed":
        _fail(summary, reporter, record.error or record.path)
    reporter.file_finished(record)


def run_restore(
    specs: Sequence[str],
    face_restorer: FaceRestorer,
    opts: RestoreOptions,
    reporter: Reporter | None = None,
    shard: Shard | None = None,
    stop: Callable[[], bool] | None = None,
) -> Summary:
    """Restore every input (this shard's, under torchrun); a bad file is reported and counted, and
    the rest goes on. `stop()` turning true ends the run after the photos in hand (module doc)."""
    reporter, shard, stop = reporter or SilentReporter(), shard or Shard(), stop or _never
    summary, t0 = Summary(), time.perf_counter()
    everything, errors = discover_inputs(specs, exclude=[opts.outdir])
    items = shard.take(everything)
    for err in errors if shard.rank == 0 else []:  # every rank sees them; one reports them
        _fail(summary, reporter, str(err))
        reporter.file_finished(FileRecord(str(err.path), None, "failed", error=str(err)))
    try:
        check_outdir(opts.outdir)
    except MediaError as err:
        _fail(summary, reporter, str(err))
        return summary
    if shard.rank == 0:
        summary.temps_removed = remove_orphaned_temps(_output_folders(everything, opts.outdir))
    reporter.start(len(items))
    try:
        _restore_items(items, face_restorer, opts, summary, reporter, stop)
    except KeyboardInterrupt:
        _stopped(summary, len(items), t0)
        raise Interrupted(summary) from None
    _stopped(summary, len(items), t0)
    return summary


def _output_folders(items: Sequence[InputItem], outdir: Path) -> set[Path]:
    """The folders a run writes into: its outputs', and those of --save-faces and --compare."""
    return {(root / item.rel).parent for item in items for root in (outdir, outdir / "faces", outdir / "compare")}


def _stopped(summary: Summary, total: int, t0: float) -> None:
    """The run's end: its time, and how many inputs were left unfinished (interrupted)."""
    summary.seconds = time.perf_counter() - t0
    summary.left = total - summary.files
    summary.interrupted = summary.left > 0


def _restore_items(
    items: Sequence[InputItem],
    face_restorer: FaceRestorer,
    opts: RestoreOptions,
    summary: Summary,
    reporter: Reporter,
    stop: Callable[[], bool],
) -> None:
    photos: list[tuple[InputItem, Path]] = []  # restored together, --batch-size at a time
    for item in items:
        if stop():
            return  # the photos waiting are left unfinished
        t0 = time.perf_counter()
        try:
            out = output_path_for(item, opts.outdir)
            if opts.skip_existing and out.exists():
                record = FileRecord(str(item.path), str(out), "skipped")
            elif item.kind == "video":
                photos = _flush(face_restorer, photos, opts, summary, reporter, stop)  # inputs are done in order
                if stop():
                    return
                record = restore_video(face_restorer, item, out, opts, summary, reporter, stop)
            else:
                photos.append((item, out))
                if len(photos) == face_restorer.batch_size:
                    photos = _flush(face_restorer, photos, opts, summary, reporter, stop)
                continue  # restore_photos reports it done
        except Exception as err:  # one broken file must not stop a batch of thousands
            if stop():  # a video dropped (RunStopped), or an ffmpeg/ffprobe the Ctrl-C reached too
                return  # the file in hand is left unfinished, not failed
            record = _failed(item, err)
        record.seconds = time.perf_counter() - t0
        _finished(summary, reporter, record)
        reporter.file_done(item)
    if not stop():
        _flush(face_restorer, photos, opts, summary, reporter, stop)


def _flush(
    face_restorer: FaceRestorer,
    photos: list[tuple[InputItem, Path]],
    opts: RestoreOptions,
    summary: Summary,
    reporter: Reporter,
    stop: Callable[[], bool] = _never,
) -> list[tuple[InputItem, Path]]:
    """Restore the photos waiting, if any; returns the (now empty) list of photos waiting."""
    if photos:
        restore_photos(face_restorer, photos, opts, summary, reporter, stop)
    return []


def _message(item: InputItem, err: Exception) -> str:
    """The one-line error for a file: media errors name the file and reason already."""
    return str(err) if isinstance(err, MediaError) else f"{item.path}: {type(err).__name__}: {err}"


def restore_shard(
    specs: Sequence[str],
    face_restorer: FaceRestorer,
    opts: RestoreOptions,
    reporter: Reporter,
    shard: Shard,
    stop: Callable[[], bool] | None = None,
) -> Summary:
    """`run_restore` of this process's shard, then the whole run's summary (gathered from every
    rank under torchrun, so all exit with the same code) and the process group left."""
    summary = gather_summary(run_restore(specs, face_restorer, opts, reporter, shard, stop), shard)
    leave_shards()
    return summary
