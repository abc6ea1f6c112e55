"""`restore`: faces in photos and videos restored into an output folder. Option parsing, progress
and the summary only; the work is in `facerestore_cli.restore`.

Before anything loads, a run is checked in this order: its options (click, then the ones that do
not go together), its paths (the files --model names), then its device, the only check that may
import torch (a CUDA device, or fp16 with auto): `restore.options.check_before_loading`. The
model and detector are loaded when the first file needs them (`restore.lazy`), so a run with
nothing left to restore (`--skip-existing`) never imports torch. This module and the ones it
imports at the top stay torch-free, so `facerestore --help` is quick.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from pathlib import Path

import click
from rich.markup import escape
from rich.progress import (
    Progress,
)

from facerestore_cli.commands.ui import (
    checked,
    color_fix_option,
    console,
    device_option,
    model_options,
    print_run_summary,
    progress_bar,
    sampling_options,
    user_errors,
)
from facerestore_cli.faces.tracking import DEFAULT_DETECT_EVERY
from facerestore_cli.restore.options import FRAME_PATHS, parse_batch_size, parse_face_size


class RichReporter:
    """Progress bars for `restore`: one over files, one over the frames of the current video."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.files = None
        self.frames = None

    def start(self, total_files: int) -> None:
        self.files = self.progress.add_task("files", total=total_files)

    def file_started(self, item, frames: int | None) -> None:
        self.progress.update(self.files, description=f"files ({item.rel})")
        if frames is not None:
            self.frames = self.progress.add_task(f"frames of {item.rel}", total=frames or None)

    def frames_done(self, n: int) -> None:
        if self.frames is not None:
            self.progress.advance(self.frames, n)

    def file_done(self, item) -> None:
        if self.frames is not None:
            self.progress.remove_task(self.frames)
            self.frames = None
        self.progress.advance(self.files)

    def file_finished(self, record) -> None: ...

    def error(self, message: str) -> None:
        self.progress.console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)


#: How many files without faces the summary names before "and N more".
NAMED_FILES = 5


def named(count: int, paths: list[str], first: int = NAMED_FILES) -> str:
    """`count`, and the first few of `paths` by name: "2 (a.jpg, b.png)", "9 (a.jpg, ... and 4 more)"."""
    if not paths:
        return str(count)
    more = f" and {len(paths) - first} more" if len(paths) > first else ""
    return f"{count} ({', '.join(paths[:first])}{more})"


def print_summary(summary) -> None:
    """The end-of-run table of `restore`, after a warning line for each output whose colour model
    or depth changed ("photo.jpg: CMYK written as RGB")."""
    for note in summary.notes:
        console.print(f"[yellow]warning:[/yellow] {escape(note)}", highlight=False, soft_wrap=True)
    rows = {
        "files": summary.files,
        "images / videos (frames)": f"{summary.images} / {summary.videos} ({summary.frames})",
        "faces found": summary.faces_found,
        "faces restored": summary.faces_restored,
        "files without faces": named(summary.files_without_faces, summary.without_faces),
        "skipped (existing)": summary.skipped,
        "failures": len(summary.failures),
        "time": f"{summary.seconds:.1f} s",
        "faces per second": f"{summary.faces_per_s:.2f}",
    }
    if summary.interrupted:
        rows["left (interrupted)"] = summary.left
    if summary.temps_removed:
        rows["temp files of killed runs removed"] = summary.temps_removed
    print_run_summary("facerestore summary", rows)


def resume_command(ctx: click.Context, world: int = 1) -> str:
    """The command line that resumes this run: the options given, and --skip-existing."""
    from click.core import ParameterSource

    words: list[str] = []
    options: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if ctx.get_parameter_source(param.name or "") not in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            continue
        if isinstance(param, click.Argument):
            words += [str(v) for v in (value if isinstance(value, (tuple, list)) else [value])]
            continue
        name = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        if getattr(param, "is_flag", False):
            options += [name] if value else []
        else:
            options += [name, str(value)]
    if "--skip-existing" not in options:
        options.append("--skip-existing")
    root = ctx.find_root().info_name or "facerestore"
    program = f"torchrun --nproc_per_node {world} -m facerestore_cli.cli" if world > 1 else root
    return f"{program} {shlex.join([ctx.info_name or 'restore', *words, *options])}"


@contextlib.contextmanager
def ctrl_c_stops(stop: threading.Event):
    """While restoring, a first Ctrl-C sets `stop` (the loop finishes the photos in hand and
    stops) and a second raises KeyboardInterrupt (the file in hand is dropped at once). Only the
    main thread can take signals; elsewhere Ctrl-C keeps Python's default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        console.print(
            "\n[yellow]Ctrl-C:[/yellow] stopping after the photos in hand (a video in hand is dropped, to be redone); "
            "Ctrl-C again to stop at once",
            highlight=False,
            soft_wrap=True,
        )

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def print_interrupted(summary, resume: str, lead: bool = True) -> None:
    """After a run Ctrl-C stopped: the summary so far (when given) and the command that resumes
    it (by the first process of a torchrun); exit code 130, as a shell gives a program Ctrl-C ends."""
    if summary is not None:
        print_summary(summary)
    if lead:
        console.print(f"[yellow]interrupted[/yellow]; to resume: {escape(resume)}", highlight=False, soft_wrap=True)
    sys.exit(130)


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "-o", "--output", "outdir", type=click.Path(path_type=Path), required=True, help="Output folder (input folder structure is kept)."
)
@model_options("LoRA adapter (.safetensors) from refl/lrpo, merged before restoring.")
@device_option()
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True, help="fp16 needs CUDA.")
@click.option(
    "--batch-size",
    default="auto",
    show_default=True,
    metavar="auto|N",
    callback=checked(parse_batch_size),
    help="Faces restored per model call; also how many photos are read and restored together (their faces share batches). auto: on a CPU 1 at 512 px, 4 at 256 (what measured fastest on 2 cores), on a GPU 4.",
)
@color_fix_option(
    "Keep the input's colours and shapes: its low frequencies below the restorer's N finest wavelet bands (wavelet = wavelet:3; wavelet:5 lets the model redraw more of a badly degraded face, at some cost to identity), or its channel statistics (adain). auto: wavelet for one-step models, none for DiffBIR-kind models (they fix colours against their stage-1 output themselves)."
)
@sampling_options
@click.option("--upscale", type=click.FloatRange(1, 8), default=1.0, show_default=True, help="Scale the whole image by this factor.")
@click.option("--only-center-face", is_flag=True, help="Restore only the face nearest the image centre.")
@click.option("--aligned", is_flag=True, help="Inputs are already aligned face crops (FFHQ layout).")
@click.option("--save-faces", is_flag=True, help="Also write each aligned face and its restoration to OUTPUT/faces.")
@click.option("--compare", is_flag=True, help="Also write before|after images to OUTPUT/compare.")
@click.option("--skip-existing", is_flag=True, help="Skip inputs whose output already exists (resume a run).")
@click.option("--detector", type=click.Choice(["mtcnn", "retinaface"]), default="mtcnn", show_default=True)
@click.option("--det-threshold", type=click.FloatRange(0, 1), default=0.7, show_default=True, help="Face detector confidence threshold.")
@click.option("--min-face-size", type=click.IntRange(8), default=20, show_default=True, help="Smallest face (pixels) to detect.")
@click.option(
    "--backend",
    type=click.Choice(["torch", "onnx", "tensorrt"]),
    default="torch",
    show_default=True,
    help="Run the restorer in torch, onnxruntime, or TensorRT (fp16, CUDA); the colour fix is the same.",
)
@click.option(
    "--engine",
    "engine_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Engine from `facerestore export` for --backend onnx/tensorrt, checked against --model/--lora [default: made once and cached in ~/.cache/facerestore].",
)
@click.option(
    "--compile",
    "compile_model",
    is_flag=True,
    help="torch.compile the UNet and VAE (channels_last on CUDA): slow first batch, faster after; falls back to eager if compiling fails.",
)
@click.option(
    "--frame-path",
    type=click.Choice(FRAME_PATHS),
    default="auto",
    show_default=True,
    help="Where whole frames are warped, restored and pasted back: tensor keeps each chunk of frames on the model's device (no copies of faces to the host), numpy uses OpenCV on the CPU; auto is tensor on CUDA, numpy otherwise. Both give the same frames within a grey level or two.",
)
@click.option(
    "--face-size",
    default="auto",
    show_default=True,
    metavar="auto|PIXELS",
    callback=checked(parse_face_size),
    help="Crop size faces are restored at. auto: the model's own (512), and for a face no bigger than a smaller size the model was trained for (training `scales`), that size. A number: every face at that size; 256 is up to about 3x faster on a CPU (less for video, where detection then takes most of the time), as close to the ground truth on faces that small, but keeping identity less well on mildly degraded ones (benchmarks/RESULTS.md).",
)
@click.option(
    "--detect-every",
    type=click.IntRange(1),
    default=DEFAULT_DETECT_EVERY,
    show_default=True,
    metavar="FRAMES",
    help="Videos: search the whole frame for faces every FRAMES frames and follow the faces found in between (several times less detection time on a CPU); a face coming into the picture is restored at most FRAMES frames late. 1: search every frame.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE.jsonl",
    help="Write one JSON line per input as it finishes: path, output, status (ok, skipped, failed, no_faces), faces found and restored, seconds, error. Started afresh, or appended to with --skip-existing (a resumed run keeps the report of the run it resumes).",
)
def restore(
    inputs,
    outdir,
    model,
    osediff,
    lora,
    device,
    precision,
    batch_size,
    color_fix,
    sampling,
    upscale,
    only_center_face,
    aligned,
    save_faces,
    compare,
    skip_existing,
    detector,
    det_threshold,
    min_face_size,
    backend,
    engine_path,
    compile_model,
    frame_path,
    face_size,
    detect_every,
    report_path,
) -> None:
    """Restore every face in INPUTS (images, videos, folders, globs) into OUTPUT.

    Under torchrun (WORLD_SIZE > 1) each process restores every WORLD_SIZE-th input on its own
    GPU and rank 0 prints the summary of the whole run.

    \b
    Example:
      facerestore restore old_photos/ family.mp4 -o restored/
      torchrun --nproc_per_node 4 -m facerestore_cli.cli restore frames/ -o restored/ --skip-existing
    """
    from facerestore_cli.restore.lazy import LazyFaceRestorer, build_errors
    from facerestore_cli.restore.loop import restore_shard
    from facerestore_cli.restore.options import DetectionSettings, FaceSettings, ModelChoice, RestoreOptions, check_before_loading
    from facerestore_cli.restore.report import ErrorsOnlyReporter, Interrupted, JsonlReport, ReportingReporter
    from facerestore_cli.restore.shards import Shard, join_shards, wait_for_all

    choice = ModelChoice(
        model=model,
        lora=lora,
        osediff=osediff,
        backend=backend,
        engine_file=engine_path,
        precision=precision,
        compile=compile_model,
        sampling=sampling,
    )
    with user_errors():
        shard = Shard.from_env()
        check_before_loading(choice, device)  # options, paths, then the device: torch only if that needs it
    lead = shard.rank == 0
    who = f"(rank {shard.rank}) " if shard.distributed else ""
    resume = resume_command(click.get_current_context(), shard.world)

    def warn(message: str) -> None:
        console.print(f"[yellow]warning:[/yellow] {who}{escape(message)}", highlight=False, soft_wrap=True)

    def show(message: str) -> None:
        console.print(f"[red]error:[/red] {who}{escape(message)}", highlight=False, soft_wrap=True)

    def build_restorer():
        """The model and detector, loaded when the first file needs them (restore/lazy.py)."""
        from facerestore_cli.restore.face_restorer import build_face_restorer

        built = build_face_restorer(
            choice,
            DetectionSettings(detector=detector, threshold=det_threshold, min_face_size=min_face_size),
            FaceSettings(batch_size=batch_size, color_fix=color_fix, frame_path=frame_path, face_size=face_size),
            device=device,
            warn=warn,
            shard=shard,
        )
        if backend != "torch" and lead:
            console.print(f"backend: {built.model.describe()}", highlight=False, soft_wrap=True, markup=False)
        return built

    report = None
    stop = threading.Event()
    try:
        with user_errors():
            join_shards(shard)
            if report_path is not None:  # rank 0 empties the file before any rank writes to it, unless resuming
                report = JsonlReport(report_path, fresh=lead and not skip_existing)
                wait_for_all(shard)
        face_restorer = LazyFaceRestorer(build_restorer, batch_size)
        opts = RestoreOptions(outdir, upscale, only_center_face, aligned, save_faces, compare, skip_existing, detect_every=detect_every)
        with progress_bar() if lead else contextlib.nullcontext() as progress, ctrl_c_stops(stop), user_errors(), build_errors():
            reporter = RichReporter(progress) if lead else ErrorsOnlyReporter(show)
            if report is not None:
                reporter = ReportingReporter(reporter, report)
            summary = restore_shard(inputs, face_restorer, opts, reporter, shard, stop=stop.is_set)
    except Interrupted as stopped:  # a second Ctrl-C: the file in hand was dropped
        print_interrupted(stopped.summary if lead else None, resume, lead)
    except KeyboardInterrupt:  # before any file was started, or a second Ctrl-C after the last one
        print_interrupted(None, resume, lead)
    finally:
        if report is not None:
            report.close()
    if lead:
        print_summary(summary)
    if not summary.ok and lead:
        console.print(f"[red]{len(summary.failures)} input(s) failed[/red] (listed above)")
    if summary.interrupted:
        print_interrupted(None, resume, lead)
    if not summary.ok:
        sys.exit(1)
