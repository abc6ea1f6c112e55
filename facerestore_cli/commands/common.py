"""What the long-running training commands (`train`, `train-frm`, `refl`, `lrpo`) share on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import click


def cli_module():
    """cli.py, for its console, `fail` and progress bar (imported late: cli.py registers the commands)."""
    from .. import cli

    return cli


def run_options(out_help: str) -> Callable:
    """--out, --steps, --device, --resume/--no-resume and --max-minutes, the same for every run command.

    A lent GPU command lasts at most 10 minutes, so every run stops on --max-minutes with a
    checkpoint and the same command resumes it.
    """
    options = [
        click.option("--out", "run_dir", type=click.Path(path_type=Path), required=True, help=out_help),
        click.option("--steps", type=click.IntRange(1), default=None, help="Total steps (override the config)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from OUT/checkpoint when present."),
        click.option("--max-minutes", type=float, default=None, help="Stop cleanly (with a checkpoint) after this long; run again to resume."),
    ]

    def decorate(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def config_and_data_options(config_help: str, out_help: str) -> Callable:
    """--config FILE, the run options and --data FOLDER...: the command line of every run
    command that trains on prepared crops (`train`, `refl`, `lrpo`)."""
    config = click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True, help=config_help)
    data = click.option("--data", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Prepared crop folders (override the config).")
    return lambda f: config(run_options(out_help)(data(f)))


def print_run_end(finished: bool, step: int, done: Sequence[str]) -> None:
    """After a run's summary: where its results are (`done` lines), or how to resume it."""
    console = cli_module().console
    for line in done if finished else [f"stopped at step {step}; run the same command again to resume"]:
        console.print(line, highlight=False, soft_wrap=True, markup=False)


def secondary_process() -> bool:
    """True in the processes of `torchrun` / `accelerate launch` other than the first: they train
    their shard silently, and only the first prints progress and the summary."""
    import os

    return int(os.environ.get("RANK", "0")) != 0


def run_device(name: str) -> str:
    """The --device of a run as a torch device string; a one-line error when it cannot be had."""
    from ..devices import resolve_device

    try:
        return str(resolve_device(name))
    except ValueError as err:
        cli_module().fail(str(err))


def load_run_config(cls: type, path: Path, steps: int | None, inputs_field: str, inputs: Sequence[Path], missing: str) -> Any:
    """A run's config file with the command line's overrides (--steps and its input folders or files).

    A bad file or a run with nothing to train on ends the command with a one-line error.
    """
    cli = cli_module()
    try:
        cfg = cls.from_file(path)
    except (ValueError, TypeError) as err:
        cli.fail(f"{path}: {err}")
    if inputs:
        setattr(cfg, inputs_field, [str(p) for p in inputs])
    if steps:
        cfg.steps = steps
    if not getattr(cfg, inputs_field):
        cli.fail(missing)
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
    cli_module().console.print(table)
