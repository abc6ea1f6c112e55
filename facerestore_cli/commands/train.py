"""`train`: the one-step restorer trained on prepared crops. Option parsing and printing only;
the work is in `facerestore_cli.train.restorer`."""

from __future__ import annotations

import click

from facerestore_cli.commands.ui import (
    config_and_data_options,
    load_run_config,
    print_run_end,
    print_run_summary,
    progress_bar,
    run_device,
    secondary_process,
)


@click.command()
@config_and_data_options(
    "Training config (TOML or JSON), e.g. configs/train_tiny.toml.", "Run folder: checkpoints, log.jsonl, final model."
)
def train(config_path, run_dir, data, steps, device, resume, max_minutes) -> None:
    """Train the one-step restorer on prepared crops with on-the-fly degradations."""
    from facerestore_cli.train.restorer import RestorerTrainConfig, train_restorer

    cfg = load_run_config(
        RestorerTrainConfig, config_path, steps, "data", data, "no training data: give --data or set `data` in the config"
    )
    dev = run_device(device)
    if secondary_process():
        train_restorer(cfg, run_dir, device=dev, resume=resume, max_minutes=max_minutes)
        return
    with progress_bar() as progress:
        task = progress.add_task("training", total=cfg.steps)

        def on_step(step: int, losses: dict[str, float]) -> None:
            progress.update(task, completed=step, description=f"training loss {losses['total']:.4f}")

        result = train_restorer(cfg, run_dir, device=dev, resume=resume, max_minutes=max_minutes, on_step=on_step)
    print_run_summary("train summary", result.summary())
    print_run_end(result.finished, result.step, [f"final model: {run_dir / 'final'} (use it with `facerestore restore --model`)"])
