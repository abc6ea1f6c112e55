"""The `facerestore` command line: option parsing, progress and summaries over the library."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .commands.common import config_and_data_options, load_run_config, print_run_end, print_run_summary, run_device, secondary_process
from .frames import FRAME_PATHS
from .faces.tracking import DEFAULT_DETECT_EVERY
from .models.color import DEFAULT_COLOR_FIX, parse_color_fix

console = Console(stderr=True)


def fail(message: str) -> None:
    """A one-line error and exit code 2: for problems that stop a command before it starts."""
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)


def _checked(parse: Callable[[str], object], keep_text: bool = False) -> Callable[[click.Context, click.Parameter, str], object]:
    """A click callback from a parser whose ValueError gives the one-line reason: the parsed
    value, or the text itself (`keep_text`) once the parser accepts it."""

    def callback(ctx: click.Context, param: click.Parameter, value: str) -> object:
        try:
            parsed = parse(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
        return value if keep_text else parsed

    return callback


def _pipeline_parser(name: str) -> Callable[[str], object]:
    """pipeline.`name`, imported at first use: pipeline loads diffusers, too slow for --help."""

    def parse(value: str) -> object:
        from . import pipeline

        return getattr(pipeline, name)(value)

    return parse


def color_fix_option(help: str):
    """--color-fix, as `restore` and `eval` share it: wavelet[:N], adain or none."""
    return click.option("--color-fix", default=DEFAULT_COLOR_FIX, show_default=True, metavar="wavelet[:N]|adain|none", callback=_checked(parse_color_fix, keep_text=True), help=help)


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
    """The end-of-run table of `restore`."""
    print_run_summary("facerestore summary", {
        "files": summary.files,
        "images / videos (frames)": f"{summary.images} / {summary.videos} ({summary.frames})",
        "faces found": summary.faces_found,
        "faces restored": summary.faces_restored,
        "files without faces": summary.files_without_faces,
        "skipped (existing)": summary.skipped,
        "failures": len(summary.failures),
        "time": f"{summary.seconds:.1f} s",
        "faces per second": f"{summary.faces_per_s:.2f}",
    })  # fmt: skip


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="facerestore")
def main() -> None:
    """Restore degraded faces in photos and videos with a one-step diffusion restorer."""


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "outdir", type=click.Path(path_type=Path), required=True, help="Output folder (input folder structure is kept).")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Restorer folder, or a Stable Diffusion 2.1-base folder [default: bundled weights/restorer-tiny].")
@click.option("--osediff", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None, help="Upstream OSEDiff checkpoint (.pkl) applied to an SD 2.1-base --model.")
@click.option("--lora", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None, help="LoRA adapter (.safetensors) from refl/lrpo, merged before restoring.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True, help="fp16 needs CUDA.")
@click.option("--batch-size", default="auto", show_default=True, metavar="auto|N", callback=_checked(_pipeline_parser("parse_batch_size")), help="Faces restored per model call; also how many photos are read and restored together (their faces share batches). auto: on a CPU 1 at 512 px, 4 at 256 (what measured fastest on 2 cores), on a GPU 4.")
@color_fix_option("Keep the input's colours and shapes: its low frequencies below the restorer's N finest wavelet bands (wavelet = wavelet:3; wavelet:5 lets the model redraw more of a badly degraded face, at some cost to identity), or its channel statistics (adain).")
@click.option("--upscale", type=click.FloatRange(1, 8), default=1.0, show_default=True, help="Scale the whole image by this factor.")
@click.option("--only-center-face", is_flag=True, help="Restore only the face nearest the image centre.")
@click.option("--aligned", is_flag=True, help="Inputs are already aligned face crops (FFHQ layout).")
@click.option("--save-faces", is_flag=True, help="Also write each aligned face and its restoration to OUTPUT/faces.")
@click.option("--compare", is_flag=True, help="Also write before|after images to OUTPUT/compare.")
@click.option("--skip-existing", is_flag=True, help="Skip inputs whose output already exists (resume a run).")
@click.option("--detector", type=click.Choice(["mtcnn", "retinaface"]), default="mtcnn", show_default=True)
@click.option("--det-threshold", type=click.FloatRange(0, 1), default=0.7, show_default=True, help="Face detector confidence threshold.")
@click.option("--min-face-size", type=click.IntRange(8), default=20, show_default=True, help="Smallest face (pixels) to detect.")
@click.option("--backend", type=click.Choice(["torch", "onnx", "tensorrt"]), default="torch", show_default=True, help="Run the restorer in torch, onnxruntime, or TensorRT (fp16, CUDA); the colour fix is the same.")
@click.option("--engine", "engine_path", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Engine from `facerestore export` for --backend onnx/tensorrt, checked against --model/--lora [default: made once and cached in ~/.cache/facerestore].")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the UNet and VAE (channels_last on CUDA): slow first batch, faster after; falls back to eager if compiling fails.")
@click.option("--frame-path", type=click.Choice(FRAME_PATHS), default="auto", show_default=True, help="Where whole frames are warped, restored and pasted back: tensor keeps each chunk of frames on the model's device (no copies of faces to the host), numpy uses OpenCV on the CPU; auto is tensor on CUDA, numpy otherwise. Both give the same frames within a grey level or two.")
@click.option("--face-size", default="auto", show_default=True, metavar="auto|PIXELS", callback=_checked(_pipeline_parser("parse_face_size")), help="Crop size faces are restored at. auto: the model's own (512), and for a face no bigger than a smaller size the model was trained for (training `scales`), that size. A number: every face at that size; 256 is up to about 3x faster on a CPU (less for video, where detection then takes most of the time), as close to the ground truth on faces that small, but keeping identity less well on mildly degraded ones (benchmarks/RESULTS.md).")
@click.option("--detect-every", type=click.IntRange(1), default=DEFAULT_DETECT_EVERY, show_default=True, metavar="FRAMES", help="Videos: search the whole frame for faces every FRAMES frames and follow the faces found in between (several times less detection time on a CPU); a face coming into the picture is restored at most FRAMES frames late. 1: search every frame.")
def restore(inputs, outdir, model, osediff, lora, device, precision, batch_size, color_fix, upscale, only_center_face, aligned, save_faces, compare, skip_existing, detector, det_threshold, min_face_size, backend, engine_path, compile_model, frame_path, face_size, detect_every) -> None:
    """Restore every face in INPUTS (images, videos, folders, globs) into OUTPUT.

    Under torchrun (WORLD_SIZE > 1) each process restores every WORLD_SIZE-th input on its own
    GPU and rank 0 prints the summary of the whole run.

    \b
    Example:
      facerestore restore old_photos/ family.mp4 -o restored/
      torchrun --nproc_per_node 4 -m facerestore_cli.cli restore frames/ -o restored/ --skip-existing
    """
    from .faces.detector import DetectorUnavailable
    from .pipeline import ErrorsOnlyReporter, RestoreOptions, Shard, build_engine, join_shards, restore_shard

    try:
        shard = Shard.from_env()
        join_shards(shard)
        who = f"(rank {shard.rank}) " if shard.distributed else ""

        def warn(message: str) -> None:
            console.print(f"[yellow]warning:[/yellow] {who}{escape(message)}", highlight=False, soft_wrap=True)

        engine = build_engine(model, lora, device, precision, batch_size, detector, det_threshold, min_face_size, osediff, color_fix, backend, engine_path, compile_model, warn, shard, frame_path=frame_path, face_size=face_size)
    except (DetectorUnavailable, FileNotFoundError, ValueError) as err:
        fail(str(err))
    lead = shard.rank == 0
    if backend != "torch" and lead:
        console.print(f"backend: {engine.model.describe()}", highlight=False, soft_wrap=True, markup=False)
    opts = RestoreOptions(outdir, upscale, only_center_face, aligned, save_faces, compare, skip_existing, detect_every=detect_every)
    show = lambda m: console.print(f"[red]error:[/red] {who}{escape(m)}", highlight=False, soft_wrap=True)  # noqa: E731
    with _progress() if lead else contextlib.nullcontext() as progress:
        summary = restore_shard(inputs, engine, opts, RichReporter(progress) if lead else ErrorsOnlyReporter(show), shard)
    if lead:
        print_summary(summary)
    if not summary.ok:
        if lead:
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
    print_run_summary("prepare-data summary", vars(stats))
    if stats.kept == 0:
        fail(f"no usable faces found in {', '.join(map(str, sources))}")


@main.command()
@config_and_data_options("Training config (TOML or JSON), e.g. configs/train_tiny.toml.", "Run folder: checkpoints, log.jsonl, final model.")
def train(config_path, run_dir, data, steps, device, resume, max_minutes) -> None:
    """Train the one-step restorer on prepared crops with on-the-fly degradations."""
    from .train.restorer_training import RestorerTrainConfig, train_restorer

    cfg = load_run_config(RestorerTrainConfig, config_path, steps, "data", data, "no training data: give --data or set `data` in the config")
    dev = run_device(device)
    if secondary_process():
        train_restorer(cfg, run_dir, device=dev, resume=resume, max_minutes=max_minutes)
        return
    with _progress() as progress:
        task = progress.add_task("training", total=cfg.steps)

        def on_step(step: int, losses: dict[str, float]) -> None:
            progress.update(task, completed=step, description=f"training loss {losses['total']:.4f}")

        result = train_restorer(cfg, run_dir, device=dev, resume=resume, max_minutes=max_minutes, on_step=on_step)
    print_run_summary("train summary", result)
    print_run_end(result["finished"], result["step"], [f"final model: {run_dir / 'final'} (use it with `facerestore restore --model`)"])


# ------------------------------------------------------------------ test sets and evaluation
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


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "outdir", type=click.Path(path_type=Path), required=True, help="Pair folder to write: hq/, lq/, degradations.jsonl.")
@click.option("--seed", type=int, default=0, show_default=True, help="Master seed (each image's seed derives from it and the file name).")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="TOML/JSON with degradation ranges (top level or a [degradation] table, e.g. a training config).")
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

    from .evaluate import EvalInputError, degrade_folder, load_degradation_config, source_images
    from .train.degrade import DegradationConfig

    try:
        cfg = load_degradation_config(config_path) if config_path else DegradationConfig()
        given = {"blur_sigma": blur_sigma, "downsample": downsample, "noise_sigma": noise, "jpeg_quality": jpeg_quality}
        cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
        total = len(source_images(src))
        with _progress() as progress:
            task = progress.add_task("degrading", total=min(total, limit or total))
            summary = degrade_folder(src, outdir, cfg, seed, size, limit, on_image=lambda _: progress.advance(task))
    except EvalInputError as err:
        fail(str(err))
    for name in summary.unreadable:
        console.print(f"[red]error:[/red] {name}: unreadable image, skipped", highlight=False)
    console.print(f"{summary.images} pairs in {outdir} ({summary.seconds:.1f} s); parameters per image in {outdir / 'degradations.jsonl'}")
    if summary.images == 0:
        fail(f"no readable images in {src}")


def _ranked(result, method: str, metric: str) -> bool:
    """Whether a cell competes for best: not the ground truth, nor the input scored against itself."""
    return method != "ground_truth" and not (method == "input" and result.reference.get(metric) == "input")


def _metric_table(result) -> Table:
    table = Table(title=f"{result.source}: {result.images} image(s)")
    table.add_column("method")
    for m in result.metrics:
        table.add_column(f"{m.name} {'↓' if m.lower_better else '↑'}", justify="right")
    table.add_column("s / image", justify="right")
    best = {}
    for m in result.metrics:
        vals = [(v, k) for k, row in result.table.items() if _ranked(result, k, m.name) and (v := row.get(m.name)) is not None and v == v]
        if vals:
            best[m.name] = (min if m.lower_better else max)(vals)[1]
    for method in result.methods:
        row = result.table[method]
        cells = []
        for m in result.metrics:
            v = row.get(m.name)
            text = "" if v is None else ("n/a" if v != v else f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}")
            if not _ranked(result, method, m.name) and text:
                text = f"({text})"  # the input against itself: perfect by construction
            cells.append(f"[bold]{text}[/bold]" if best.get(m.name) == method else text)
        secs = result.seconds_per_image.get(method)
        table.add_row(method, *cells, "" if secs is None else f"{secs:.3f}")
    return table


@main.command("eval")
@click.option("--pairs", type=click.Path(path_type=Path), default=None, help="Pair folder with lq/ and hq/ (from `facerestore degrade`).")
@click.option("--lq", "lq_dirs", multiple=True, type=click.Path(path_type=Path), help="Folder of LQ aligned crops without ground truth, searched recursively; repeat to pool several in one table.")
@click.option("--input-reference", is_flag=True, help="Also score identity metrics against the degraded input (as identity@input): for --lq sets without ground truth.")
@click.option("--model", "models", multiple=True, type=click.Path(path_type=Path), help="Restorer folder; repeat to compare several [default: bundled weights/restorer-tiny].")
@click.option("--baselines-only", is_flag=True, help="Score only the baselines (input, bicubic_unsharp).")
@click.option("--metrics", default="all", show_default=True, help="Comma-separated metric names (see --list-metrics).")
@click.option("--grid", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write a PNG grid: input | baseline | restored | ground truth.")
@click.option("--grid-rows", type=click.IntRange(1), default=6, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the table, reasons and per-image scores as JSON.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=4, show_default=True)
@color_fix_option("Colour fix after the restorer (as `restore` applies it).")
@click.option("--size", type=click.IntRange(16), default=None, help="Restore and score at SIZE x SIZE [default: the ground truth's size].")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N images.")
@click.option("--list-metrics", is_flag=True, help="List every metric, whether it can run here and why not, then exit.")
def evaluate_cmd(pairs, lq_dirs, input_reference, models, baselines_only, metrics, grid, grid_rows, json_path, device, precision, batch_size, color_fix, size, limit, list_metrics) -> None:
    """Restore degraded faces with each --model and baselines, and score them with quality metrics.

    With --pairs every metric runs against the ground truth. With --lq (real photos, no ground
    truth) only no-reference metrics run, unless --input-reference: then identity and
    identity_dist are also scored against the degraded input itself, reported as identity@input
    and identity_dist@input (does the output still show the person in the input?). The `input`
    row is that very image, so it scores perfectly there by construction: shown in parentheses,
    never ranked. PSNR/SSIM are not scored against the input (they would reward doing nothing).

    \b
    Examples:
      facerestore eval --pairs data/val_pairs --model runs/tiny/final --grid grid.png --json scores.json
      facerestore eval --lq real/CodeFormer/inputs/cropped_faces --lq real/GPEN/examples/grays --input-reference
    """
    import json

    out = Console()
    if not out.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        out = Console(width=200)
    if list_metrics:
        from .metrics import list_metrics as names, metric_info

        table = Table(title="metrics")
        for col in ("name", "kind", "better", "here", "what"):
            table.add_column(col)
        for n in names():
            i = metric_info(n)
            table.add_row(i.name, i.kind, "lower" if i.lower_better else "higher", "yes" if i.available else f"no: {i.unavailable_reason}", i.description)
        out.print(table)
        return
    from .evaluate import EvalInputError, evaluate
    from .pipeline import DEFAULT_MODEL, resolve_device, resolve_dtype

    if (pairs is None) == (not lq_dirs):
        fail("give exactly one of --pairs DIR or --lq DIR (repeatable)")
    if baselines_only and models:
        fail("--baselines-only and --model exclude each other")
    wanted = None if metrics.strip().lower() == "all" else [m for m in metrics.split(",") if m.strip()]
    try:
        dev = resolve_device(device)
        dtype = resolve_dtype(precision, dev)
        chosen = [] if baselines_only else list(models) or [DEFAULT_MODEL]
        with _progress() as progress:
            task = progress.add_task("evaluating", total=None)
            result = evaluate(
                pairs=pairs, lq=list(lq_dirs) or None, models=chosen, metrics=wanted, device=dev, dtype=dtype, batch_size=batch_size, color_fix=color_fix, size=size,
                grid=grid, grid_rows=grid_rows, limit=limit, input_reference=input_reference,
                on_start=lambda n: progress.update(task, total=n), on_batch=lambda n: progress.advance(task, n),
            )  # fmt: skip
    except (EvalInputError, ValueError) as err:
        fail(str(err))
    out.print(_metric_table(result))
    at_input = [m for m, ref in result.reference.items() if ref == "input"]
    if at_input:
        out.print(f"{', '.join(at_input)}: against the degraded input, not ground truth; (input) is that image itself, perfect by construction", highlight=False, soft_wrap=True)
    for m in result.metrics:
        if any(result.counts[k].get(m.name, 1) == 0 for k in result.methods):
            out.print(f"n/a: {m.name} could not be computed for those images ({m.description})", highlight=False, soft_wrap=True)
    by_reason: dict[str, list[str]] = {}
    for name, reason in {**result.unavailable, **result.skipped}.items():
        by_reason.setdefault(reason, []).append(name)
    if by_reason:
        out.print("not computed: " + "; ".join(f"{', '.join(n)}: {r}" for r, n in by_reason.items()), highlight=False, soft_wrap=True)
    if result.grid:
        out.print(f"grid: {result.grid}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        out.print(f"json: {json_path}")


from .commands import frm as _frm  # noqa: E402  (registered last: it imports console/fail from here)

for _cmd in (_frm.frm_pairs, _frm.frm_import, _frm.frm_annotate, _frm.train_frm_cmd, _frm.frm_eval, _frm.score_cmd, _frm.label_cmd):
    main.add_command(_cmd)

from .commands import refl as _refl  # noqa: E402

main.add_command(_refl.refl_cmd)

from .commands import lrpo as _lrpo  # noqa: E402

main.add_command(_lrpo.lrpo_cmd)

from .commands import export as _export  # noqa: E402

main.add_command(_export.export_cmd)

if __name__ == "__main__":
    main()
