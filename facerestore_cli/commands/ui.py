"""What every command shares on the command line: the console, one-line errors, progress bars,
summary tables, option callbacks, and the options of the long-running training commands."""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from facerestore_cli.errors import FacerestoreError
from facerestore_cli.models.color_spec import AUTO_COLOR_FIX, parse_color_fix_choice

console = Console(stderr=True)


def fail(message: str) -> None:
    """A one-line error and exit code 2: for problems that stop a command before it starts."""
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)


@contextmanager
def user_errors(prefix: str = "") -> Iterator[None]:
    """Run a command's work: an error the user can fix (`FacerestoreError`) ends it with one line
    (after `prefix`) and exit code 2; anything else is a bug and keeps its traceback."""
    try:
        yield
    except FacerestoreError as err:
        fail(f"{prefix}{err}")


def device_option(help: str | None = None) -> Callable:
    """--device, with the same choices and default in every command."""
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help=help)


def checked(parse: Callable[[str], object], keep_text: bool = False) -> Callable[[click.Context, click.Parameter, str], object]:
    """A click callback from a parser whose `FacerestoreError` gives the one-line reason: the
    parsed value, or the text itself (`keep_text`) once the parser accepts it."""

    def callback(ctx: click.Context, param: click.Parameter, value: str) -> object:
        try:
            parsed = parse(value)
        except FacerestoreError as e:
            raise click.BadParameter(str(e)) from None
        return value if keep_text else parsed

    return callback


def color_fix_option(help: str):
    """--color-fix, as `restore` and `eval` share it: auto, wavelet[:N], adain or none."""
    return click.option(
        "--color-fix",
        default=AUTO_COLOR_FIX,
        show_default=True,
        metavar="auto|wavelet[:N]|adain|none",
        callback=checked(parse_color_fix_choice, keep_text=True),
        help=help,
    )


MODEL_HELP = (
    "A published model's name (see `facerestore models`) or model file (.toml), a restorer folder, "
    "or Stable Diffusion 2.1-base (a diffusers folder or the ldm .ckpt) [default: bundled weights/restorer-tiny]."
)


def model_options(lora_help: str, model_help: str = MODEL_HELP) -> Callable:
    """--model, --osediff and --lora, as every command that runs a restorer takes them."""
    options = [
        click.option("--model", type=click.Path(path_type=Path), default=None, help=model_help),
        click.option(
            "--osediff",
            type=click.Path(path_type=Path, exists=True, dir_okay=False),
            default=None,
            help="Upstream OSEDiff checkpoint (.pkl) applied to a Stable Diffusion 2.1-base --model.",
        ),
        click.option("--lora", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None, help=lora_help),
    ]

    def decorate(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def sampling_options(f: Callable) -> Callable:
    """--steps, --sampler, --eta and --seed: a multi-step (diffbir-v1) model's sampling, each
    defaulting to its paper's (DiffBIR v1: spaced 50; DiffusionReward: DDIM 50, eta 1; LRPO: DDIM
    50, eta 0.8); the command gets them as one `sampling` dict of the options given."""
    options = [
        click.option(
            "--steps", type=click.IntRange(1, 1000), default=None, help="Sampling steps of a multi-step model [default: its paper's, 50]."
        ),
        click.option(
            "--sampler", type=click.Choice(["ddim", "spaced"]), default=None, help="Sampler of a multi-step model [default: its paper's]."
        ),
        click.option("--eta", type=click.FloatRange(0, 1), default=None, help="DDIM eta of a multi-step model [default: its paper's]."),
        click.option(
            "--seed",
            type=int,
            default=None,
            help="Noise seed of a multi-step model; the same seed gives the same output [default: its paper's].",
        ),
    ]

    def collect(**kwargs: Any) -> Any:
        given = {k: kwargs.pop(k) for k in ("steps", "sampler", "eta", "seed")}
        return f(**kwargs, sampling={k: v for k, v in given.items() if v is not None})

    collect = functools.wraps(f)(collect)
    for option in reversed(options):
        collect = option(collect)
    return collect


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def run_options(out_help: str) -> Callable:
    """--out, --steps, --device, --resume/--no-resume and --max-minutes, the same for every run command.

    A lent GPU command lasts at most 10 minutes, so every run stops on --max-minutes with a
    checkpoint and the same command resumes it.
    """
    options = [
        click.option("--out", "run_dir", type=click.Path(path_type=Path), required=True, help=out_help),
        click.option("--steps", type=click.IntRange(1), default=None, help="Total steps (override the config)."),
        device_option(),
        click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from OUT/checkpoint when present."),
        click.option(
            "--max-minutes", type=float, default=None, help="Stop cleanly (with a checkpoint) after this long; run again to resume."
        ),
    ]

    def decorate(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def base_model_option(f: Callable) -> Callable:
    """--model of `refl`/`lrpo`: the restorer to tune, any value `restore --model` takes; it
    overrides the config's `model`."""
    return click.option(
        "--model", default=None, help="The restorer to tune, as `restore --model` takes it [default: the config's `model`]."
    )(f)


def config_and_data_options(config_help: str, out_help: str) -> Callable:
    """--config FILE, the run options and --data FOLDER...: the command line of every run
    command that trains on prepared crops (`train`, `refl`, `lrpo`)."""
    config = click.option(
        "--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True, help=config_help
    )
    data = click.option(
        "--data",
        multiple=True,
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Prepared crop folders (override the config).",
    )
    return lambda f: config(run_options(out_help)(data(f)))


def print_run_end(finished: bool, step: int, done: Sequence[str]) -> None:
    """After a run's summary: where its results are (`done` lines), or how to resume it."""
    for line in done if finished else [f"stopped at step {step}; run the same command again to resume"]:
        console.print(line, highlight=False, soft_wrap=True, markup=False)


def secondary_process() -> bool:
    """True in the processes of `torchrun` / `accelerate launch` other than the first: they train
    their shard silently, and only the first prints progress and the summary."""
    import os

    return int(os.environ.get("RANK", "0")) != 0


def run_device(name: str) -> str:
    """The --device of a run as a torch device string; a one-line error when it cannot be had."""
    from facerestore_cli.devices import resolve_device

    with user_errors():
        return str(resolve_device(name))


def load_run_config(cls: type, path: Path, steps: int | None, inputs_field: str, inputs: Sequence[Path], missing: str) -> Any:
    """A run's config file with the command line's overrides (--steps and its input folders or files).

    A bad file or a run with nothing to train on ends the command with a one-line error.
    """

    with user_errors(f"{path}: "):
        cfg = cls.from_file(path)
    if inputs:
        setattr(cfg, inputs_field, [str(p) for p in inputs])
    if steps:
        cfg.steps = steps
    if not getattr(cfg, inputs_field):
        fail(missing)
    return cfg


def print_run_summary(title: str, result: dict[str, Any]) -> None:
    """The end-of-run table of a fine-tuning command (lists and loss dicts on one line each)."""
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for k, v in result.items():
        if isinstance(v, dict):
            v = ", ".join(f"{name} {x:.5g}" for name, x in v.items())
        elif isinstance(v, list):
            v = "; ".join(map(str, v))
        table.add_row(k.replace("_", " "), str(v))
    console.print(table)
