"""The `facerestore` command line: option parsing, progress and summaries over the library."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__

console = Console(stderr=True)


def fail(message: str) -> None:
    """A one-line error and exit code 2: for problems that stop a command before it starts."""
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    sys.exit(2)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


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

    def error(self, message: str) -> None:
        self.progress.console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)


def print_summary(summary) -> None:
    table = Table(title="facerestore summary", show_header=False)
    rows = [
        ("files", summary.files),
        ("images / videos (frames)", f"{summary.images} / {summary.videos} ({summary.frames})"),
        ("faces found", summary.faces_found),
        ("faces restored", summary.faces_restored),
        ("files without faces", summary.files_without_faces),
        ("skipped (existing)", summary.skipped),
        ("failures", len(summary.failures)),
        ("time", f"{summary.seconds:.1f} s"),
        ("faces per second", f"{summary.faces_per_s:.2f}"),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="facerestore")
def main() -> None:
    """Restore degraded faces in photos and videos with a one-step diffusion restorer."""


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "outdir", type=click.Path(path_type=Path), required=True, help="Output folder (input folder structure is kept).")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Restorer folder [default: bundled weights/restorer-tiny].")
@click.option("--lora", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None, help="LoRA adapter (.safetensors) from refl/lrpo, merged before restoring.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True, help="fp16 needs CUDA.")
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True, help="Faces restored per model call.")
@click.option("--upscale", type=click.FloatRange(1, 8), default=1.0, show_default=True, help="Scale the whole image by this factor.")
@click.option("--only-center-face", is_flag=True, help="Restore only the face nearest the image centre.")
@click.option("--aligned", is_flag=True, help="Inputs are already aligned face crops (FFHQ layout).")
@click.option("--save-faces", is_flag=True, help="Also write each aligned face and its restoration to OUTPUT/faces.")
@click.option("--compare", is_flag=True, help="Also write before|after images to OUTPUT/compare.")
@click.option("--skip-existing", is_flag=True, help="Skip inputs whose output already exists (resume a run).")
@click.option("--detector", type=click.Choice(["mtcnn", "retinaface"]), default="mtcnn", show_default=True)
@click.option("--det-threshold", type=click.FloatRange(0, 1), default=0.7, show_default=True, help="Face detector confidence threshold.")
@click.option("--min-face-size", type=click.IntRange(8), default=20, show_default=True, help="Smallest face (pixels) to detect.")
def restore(inputs, outdir, model, lora, device, precision, batch_size, upscale, only_center_face, aligned, save_faces, compare, skip_existing, detector, det_threshold, min_face_size) -> None:
    """Restore every face in INPUTS (images, videos, folders, globs) into OUTPUT.

    \b
    Example:
      facerestore restore old_photos/ family.mp4 -o restored/
    """
    from .faces.detector import DetectorUnavailable
    from .pipeline import RestoreOptions, build_engine, run_restore

    try:
        engine = build_engine(model, lora, device, precision, batch_size, detector, det_threshold, min_face_size)
    except (DetectorUnavailable, FileNotFoundError, ValueError) as err:
        fail(str(err))
    opts = RestoreOptions(outdir, upscale, only_center_face, aligned, save_faces, compare, skip_existing)
    with _progress() as progress:
        summary = run_restore(inputs, engine, opts, RichReporter(progress))
    print_summary(summary)
    if not summary.ok:
        console.print(f"[red]{len(summary.failures)} input(s) failed[/red] (listed above)")
        sys.exit(1)


@main.command("prepare-data")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "outdir", type=click.Path(path_type=Path), required=True, help="Folder for aligned crops and manifest.jsonl.")
@click.option("--face-size", type=int, default=512, show_default=True)
@click.option("--min-eye-distance", type=float, default=24.0, show_default=True, help="Drop faces smaller than this (pixels between the eyes in the source).")
@click.option("--min-sharpness", type=float, default=20.0, show_default=True, help="Drop crops whose Laplacian variance (at 128 px) is lower.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def prepare_data(sources, outdir, face_size, min_eye_distance, min_sharpness, device) -> None:
    """Build a training set of aligned face crops from SOURCES (folders or images)."""
    from .faces.detector import build_detector
    from .pipeline import resolve_device
    from .train.data import iter_image_files, prepare_faces

    detector = build_detector("mtcnn", device=resolve_device(device))
    total = sum(1 for _ in iter_image_files(sources))
    with _progress() as progress:
        task = progress.add_task("aligning", total=total)
        stats = prepare_faces(sources, outdir, detector, face_size, min_eye_distance, min_sharpness, on_file=lambda _: progress.advance(task))
    table = Table(title="prepare-data summary", show_header=False)
    for k, v in vars(stats).items():
        table.add_row(k.replace("_", " "), str(v))
    console.print(table)
    if stats.kept == 0:
        fail(f"no usable faces found in {', '.join(map(str, sources))}")


@main.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True, help="Training config (TOML or JSON), e.g. configs/train_tiny.toml.")
@click.option("--out", "run_dir", type=click.Path(path_type=Path), required=True, help="Run folder: checkpoints, log.jsonl, final model.")
@click.option("--data", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Prepared crop folders (override the config).")
@click.option("--steps", type=int, default=None, help="Total steps (override the config).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from OUT/checkpoint when present.")
@click.option("--max-minutes", type=float, default=None, help="Stop cleanly (with a checkpoint) after this long.")
def train(config_path, run_dir, data, steps, device, resume, max_minutes) -> None:
    """Train the one-step restorer on prepared crops with on-the-fly degradations."""
    from .pipeline import resolve_device
    from .train.restorer_training import RestorerTrainConfig, train_restorer

    try:
        cfg = RestorerTrainConfig.from_file(config_path)
    except (ValueError, TypeError) as err:
        fail(f"{config_path}: {err}")
    if data:
        cfg.data = [str(d) for d in data]
    if steps:
        cfg.steps = steps
    if not cfg.data:
        fail("no training data: give --data or set `data` in the config")
    with _progress() as progress:
        task = progress.add_task("training", total=cfg.steps)

        def on_step(step: int, losses: dict[str, float]) -> None:
            progress.update(task, completed=step, description=f"training loss {losses['total']:.4f}")

        result = train_restorer(cfg, run_dir, device=str(resolve_device(device)), resume=resume, max_minutes=max_minutes, on_step=on_step)
    table = Table(title="train summary", show_header=False)
    for k, v in result.items():
        table.add_row(k, str(v))
    console.print(table)
    if result["finished"]:
        console.print(f"final model: {run_dir / 'final'} (use it with `facerestore restore --model`)")
    else:
        console.print(f"stopped at step {result['step']}; run the same command again to resume")


if __name__ == "__main__":
    main()
