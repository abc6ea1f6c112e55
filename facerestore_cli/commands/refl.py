"""`refl`: reward feedback learning of the restorer against the Face Reward Model.
Option parsing and printing only; the work is in `facerestore_cli.train.refl`."""

from __future__ import annotations

import click

from facerestore_cli.commands.ui import (
    base_model_option,
    config_and_data_options,
    console,
    load_run_config,
    print_run_end,
    print_run_summary,
    progress_bar,
    run_device,
    secondary_process,
    user_errors,
)


@click.command("refl")
@config_and_data_options(
    "ReFL config (TOML or JSON), e.g. configs/refl_tiny.toml.", "Run folder: checkpoints, log.jsonl, lora.safetensors, final model."
)
@base_model_option
def refl_cmd(config_path, run_dir, data, steps, device, resume, max_minutes, model) -> None:
    """Fine-tune the restorer with reward feedback from the FRM (DiffusionReward).

    A one-step restorer learns LoRA adapters; a DiffBIR-kind --model (a diffbir-v1 model file)
    learns its ControlNet (whole with lora_rank = 0, else LoRA on it) and the run writes
    RUN/model.toml for `restore --model`. The estimated peak memory is printed at the start.

    \b
    Example:
      facerestore refl --config configs/refl_tiny.toml --data data/train_faces --out runs/refl
      facerestore restore photos/ -o out/ --lora runs/refl/lora.safetensors
      facerestore refl --config configs/refl_published_smoke.toml --model diffbir.toml --data crops --out runs/cn
      facerestore restore photos/ -o out/ --model runs/cn/model.toml
    """
    from facerestore_cli.train.refl import ReflConfig, train_refl

    cfg = load_run_config(ReflConfig, config_path, steps, "data", data, "no training data: give --data or set `data` in the config")
    cfg.model = model or cfg.model
    dev = run_device(device)

    def on_start(setup: dict[str, str]) -> None:
        for key, value in setup.items():
            console.print(f"refl: {key}: {value}")

    if secondary_process():
        train_refl(cfg, run_dir, device=dev, resume=resume, max_minutes=max_minutes)
        return
    with progress_bar() as progress:
        task = progress.add_task("refl", total=cfg.steps)

        def on_step(step: int, terms: dict[str, float]) -> None:
            desc = f"refl loss {terms['total']:.5f} reward {terms['frm_score']:+.4f}"
            if "frm_accuracy" in terms:
                desc += f" frm acc {terms['frm_accuracy']:.2f}"
            progress.update(task, completed=step, description=desc)

        with user_errors():
            result = train_refl(cfg, run_dir, device=dev, resume=resume, max_minutes=max_minutes, on_step=on_step, on_start=on_start)
    print_run_summary("refl summary", result.summary())
    if (run_dir / "model.toml").is_file() and "tuned" in result.extra:
        done = [f"tuned ControlNet: {run_dir / 'controlnet.pth'}; model file: {run_dir / 'model.toml'} (restore --model ...)"]
    else:
        done = [f"LoRA: {run_dir / 'lora.safetensors'} (restore --model {cfg.model} --lora ...); merged model: {run_dir / 'final'}"]
    if result.extra["frm"] == "dynamic":
        done.append(f"updated FRM: {run_dir / 'frm_final'}")
    print_run_end(result.finished, result.step, done)
