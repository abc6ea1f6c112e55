"""`prepare-data` (aligned training crops) and `degrade` (rebuildable degraded test sets).
Option parsing and printing only; the work is in `facerestore_cli.data`."""

from __future__ import annotations

from pathlib import Path

import click

from facerestore_cli.commands.ui import (
    console,
    device_option,
    fail,
    print_run_summary,
    progress_bar,
    user_errors,
)


@click.command("prepare-data")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o", "--output", "outdir", type=click.Path(path_type=Path), required=True, help="Folder for aligned crops and manifest.jsonl."
)
@click.option("--face-size", type=int, default=512, show_default=True)
@click.option(
    "--min-eye-distance",
    type=float,
    default=24.0,
    show_default=True,
    help="Drop faces smaller than this (pixels between the eyes in the source).",
)
@click.option(
    "--min-sharpness", type=float, default=20.0, show_default=True, help="Drop crops whose Laplacian variance (at 128 px) is lower."
)
@device_option()
def prepare_data(sources, outdir, face_size, min_eye_distance, min_sharpness, device) -> None:
    """Build a training set of aligned face crops from SOURCES (folders or images)."""
    from facerestore_cli.data.crops import iter_image_files, prepare_faces
    from facerestore_cli.devices import resolve_device
    from facerestore_cli.faces.detector import build_detector

    with user_errors():
        detector = build_detector("mtcnn", device=resolve_device(device))
        total = sum(1 for _ in iter_image_files(sources))
        with progress_bar() as progress:
            task = progress.add_task("aligning", total=total)
            stats = prepare_faces(
                sources, outdir, detector, face_size, min_eye_distance, min_sharpness, on_file=lambda _: progress.advance(task)
            )
    print_run_summary("prepare-data summary", vars(stats))
    if stats.kept == 0:
        fail(f"no usable faces found in {', '.join(map(str, sources))}")


class _Range(click.ParamType):
    """LO,HI (or one number for both)."""

    name = "LO,HI"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            parts = [float(v) for v in str(value).split(",")]
        except ValueError:
            parts = []
        if len(parts) == 1:
            parts *= 2
        if len(parts) != 2 or parts[0] > parts[1]:
            self.fail(f"{value!r} is not LO,HI with LO <= HI", param, ctx)
        return tuple(parts)


@click.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o", "--output", "outdir", type=click.Path(path_type=Path), required=True, help="Pair folder to write: hq/, lq/, degradations.jsonl."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Master seed (each image's seed derives from it and the file name).")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML/JSON with degradation ranges (top level or a [degradation] table, e.g. a training config).",
)
@click.option("--blur-sigma", type=_Range(), help="Gaussian blur sigma range (pixels of the HQ crop).")
@click.option("--downsample", type=_Range(), help="Downsampling factor range.")
@click.option("--noise", type=_Range(), help="Gaussian noise sigma range (of 255).")
@click.option("--jpeg-quality", type=_Range(), help="JPEG quality range.")
@click.option("--size", type=click.IntRange(16), default=None, help="Resize HQ crops to SIZE x SIZE first (the ranges assume 512).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N crops.")
def degrade(src, outdir, seed, config_path, blur_sigma, downsample, noise, jpeg_quality, size, limit) -> None:
    """Degrade aligned HQ face crops in SRC (a folder or a prepare-data manifest) into a test set.

    \b
    Example:
      facerestore prepare-data ../shared/data/faces/val -o data/val_faces
      facerestore degrade data/val_faces -o data/val_pairs --seed 123 --blur-sigma 0.5,4
    """
    from dataclasses import replace

    from facerestore_cli.data.degrade import DegradationConfig
    from facerestore_cli.data.testsets import (
        degrade_folder,
        load_degradation_config,
        source_images,
    )

    with user_errors():
        cfg = load_degradation_config(config_path) if config_path else DegradationConfig()
        given = {"blur_sigma": blur_sigma, "downsample": downsample, "noise_sigma": noise, "jpeg_quality": jpeg_quality}
        cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
        total = len(source_images(src))
        with progress_bar() as progress:
            task = progress.add_task("degrading", total=min(total, limit or total))
            summary = degrade_folder(src, outdir, cfg, seed, size, limit, on_image=lambda _: progress.advance(task))
    for name in summary.unreadable:
        console.print(f"[red]error:[/red] {name}: unreadable image, skipped", highlight=False)
    console.print(f"{summary.images} pairs in {outdir} ({summary.seconds:.1f} s); parameters per image in {outdir / 'degradations.jsonl'}")
    if summary.images == 0:
        fail(f"no readable images in {src}")
