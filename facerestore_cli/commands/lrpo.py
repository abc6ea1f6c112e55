"""`lrpo`: online reinforcement learning of the restorer with ground-truth likelihood regularisation.
Option parsing and printing only; the work is in `facerestore_cli.train.lrpo`."""

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


@click.command("lrpo")
@config_and_data_options(
    "LRPO config (TOML or JSON), e.g. configs/lrpo_tiny.toml.",
    "Run folder: checkpoints, log.jsonl, rewards.txt, lora.safetensors, final model.",
)
@base_model_option
def lrpo_cmd(config_path, run_dir, data, steps, device, resume, max_minutes, model) -> None:
    """Fine-tune the restorer's UNet LoRA by online RL (LRPO): group sampling, the paper's composite
    reward (a missing component stops the run unless the config sets allow_missing_rewards), PPO
    with noise-level advantages and one optimizer step per trained timestep, and a ground-truth
    likelihood term.

    A DiffBIR-kind --model (a diffbir-v1 model file) trains its ControlNet as the paper does (whole
    with lora_rank = 0, else LoRA on it) with a DDIM eta = 1 policy over its steps, and the run
    writes RUN/controlnet.pth and RUN/model.toml for `restore --model`. The estimated peak memory
    is printed at the start.

    \b
    Example:
      facerestore lrpo --config configs/lrpo_tiny.toml --data data/train_faces --out runs/lrpo
      facerestore restore photos/ -o out/ --lora runs/lrpo/lora.safetensors
      facerestore lrpo --config configs/lrpo_published_smoke.toml --model diffbir.toml --data crops --out runs/cn
      facerestore restore photos/ -o out/ --model runs/cn/model.toml
    """
    from facerestore_cli.train.lrpo import LrpoConfig, train_lrpo

    cfg = load_run_config(LrpoConfig, config_path, steps, "data", data, "no training data: give --data or set `data` in the config")
    cfg.model = model or cfg.model
    dev = run_device(device)

    def on_setup(setup: dict[str, str]) -> None:
        for key, value in setup.items():
            console.print(f"lrpo: {key}: {value}", highlight=False)

    if secondary_process():
        train_lrpo(cfg, run_dir, device=dev, resume=resume, max_minutes=max_minutes)
        return
    with progress_bar() as progress:
        task = progress.add_task("lrpo", total=cfg.steps)

        def on_start(report: list[str]) -> None:
            progress.console.print("reward components:\n  " + "\n  ".join(report), highlight=False)

        def on_step(step: int, terms: dict[str, float]) -> None:
            progress.update(
                task,
                completed=step,
                description=f"lrpo reward {terms['reward_total']:+.4f} policy {terms['policy']:+.5f} "
                f"kl {terms['approx_kl']:.2e} clip {terms['clip_fraction']:.2f}",
            )

        with user_errors():
            result = train_lrpo(
                cfg, run_dir, device=dev, resume=resume, max_minutes=max_minutes, on_step=on_step, on_start=on_start, on_setup=on_setup
            )
    print_run_summary("lrpo summary", result.summary())
    steps = result.extra.get("sampling_steps", cfg.sampling_steps)
    if "tuned" in result.extra:
        done = [f"tuned ControlNet: {run_dir / 'controlnet.pth'}; model file: {run_dir / 'model.toml'} (restore --model ...)"]
    else:
        mode = "one step" if steps == 1 else f"{steps} sampling steps"
        done = [
            f"LoRA ({mode}): {run_dir / 'lora.safetensors'} (restore --model {cfg.model} --lora ...); merged model: {run_dir / 'final'}"
        ]
    print_run_end(result.finished, result.step, done)
