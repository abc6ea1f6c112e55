"""The one loop every training method runs in (`train`, `train-frm`, `refl`, `lrpo`), and the
pieces the restorer's loops share: data, precision, saving.

`run_training` owns what the methods used to repeat and let drift: resume from the run folder's
checkpoint, the --max-minutes budget, the JSONL log, the checkpoint cadence, accelerate (so every
method runs under torchrun / `accelerate launch`, rank 0 logging and saving) and the summary. A
method (`TrainingMethod`) supplies only its state and its step.

A run with LoRA adapters checkpoints only the adapters (the frozen base is the config's
model), and every run exports its final model merged, in fp16, as `restore --model` loads it.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from facerestore_cli.configfile import RunConfig
from facerestore_cli.data.autopairs import degrade_at
from facerestore_cli.data.captions import CaptionLookup
from facerestore_cli.data.crops import CropDataset
from facerestore_cli.data.degrade import DegradationConfig, sample_params
from facerestore_cli.data.order import ResumableOrder
from facerestore_cli.errors import InputError
from facerestore_cli.models.restorer import OneStepRestorer
from facerestore_cli.paths import DEFAULT_FRM, DEFAULT_RESTORER
from facerestore_cli.rewards.frm import resize_for_model
from facerestore_cli.train.checkpoint import (
    JsonlLog,
    TimeBudget,
    find_checkpoint,
    load_training_state,
    save_checkpoint,
)

#: The adapters' file inside a checkpoint's model folder and a LoRA run's folder.
LORA_FILE = "lora.safetensors"


def face_batches(data: Dataset, batch_size: int, num_workers: int, seed: int, start_batch: int, acc) -> Iterator:
    """Endless batches of `data`, this process's share, in `ResumableOrder` from its
    `start_batch`-th batch on: a run resumed at step N (and so at batch N x batches a step)
    reads the faces, and draws the crops, that the uninterrupted run did from there."""
    order = ResumableOrder(len(data), seed, start_batch * batch_size, acc.process_index, acc.num_processes)
    loader = DataLoader(data, batch_size=batch_size, sampler=order, num_workers=num_workers, persistent_workers=num_workers > 0)
    return iter(loader)


@dataclass
class LoraTuningConfig(RunConfig):
    """What the reward fine-tuning runs (`refl`, `lrpo`) share: a frozen restorer, the FRM, LoRA
    adapters, whole aligned faces degraded on the fly, and the run's bookkeeping."""

    data: list[str] = field(default_factory=list)
    #: the restorer folder to tune (its weights stay frozen; LoRA adapters learn).
    model: str = field(default_factory=lambda: str(DEFAULT_RESTORER))
    #: the FRM folder (or an upstream HPSv2 / FaceRewardModel.pth checkpoint).
    frm: str = field(default_factory=lambda: str(DEFAULT_FRM))
    #: the faces' captions for the FRM: a JSONL file ({"image", "caption"}), "txt" (a .txt beside each image) or "".
    captions: str = ""
    #: the caption of faces without one (every face when `captions` is "").
    caption: str = ""
    lora_rank: int = 4
    #: LoRA alpha (scale = alpha / rank); None keeps the model config's.
    lora_alpha: float | None = None
    steps: int = 500
    batch_size: int = 4
    #: whole aligned faces are resized to this (a multiple of the model's size multiple, 32 for tiny).
    face_size: int = 256
    lr: float = 1e-4
    warmup_steps: int = 10
    grad_clip: float = 1.0
    #: wavelet levels of the low-frequency (structure) comparisons (4 at 256 px = the colour fix's 5 at 512 px).
    wavelet_levels: int = 4
    min_sharpness: float = 0.0
    seed: int = 0
    num_workers: int = 1
    log_every: int = 10
    checkpoint_every: int = 100
    degradation: DegradationConfig = field(default_factory=DegradationConfig)

    def validate(self) -> None:
        if self.lora_rank < 1:
            raise InputError(f"lora_rank must be at least 1 (only LoRA adapters are tuned), not {self.lora_rank}")
        if self.face_size < 32 or self.batch_size < 1 or self.steps < 1:
            raise InputError("face_size must be >= 32, batch_size and steps >= 1")


def accelerator(device: str):
    """accelerate places the model and shards the data across processes (`accelerate launch`).

    Mixed precision is a plain bf16 autocast (`runner.autocast`), not accelerate's: its process-wide
    state cannot change precision between runs in one process (tests, notebooks).
    """
    from accelerate import Accelerator

    return Accelerator(cpu=torch.device(device).type == "cpu")


def whole_face_batches(cfg: LoraTuningConfig, acc, start_batch: int, captions: CaptionLookup | None = None) -> Iterator:
    """`face_batches` of whole aligned faces, as the reward fine-tuning loops (refl, lrpo) use
    them; with `captions`, batches of (faces, their captions) for the Face Reward Model."""
    data = CropDataset([Path(d) for d in cfg.data], patch_size=None, min_sharpness=cfg.min_sharpness, captions=captions)
    return face_batches(data, cfg.batch_size, cfg.num_workers, cfg.seed, start_batch, acc)


def describe_captions(captions: CaptionLookup | None) -> str:
    """The run summary's line on the FRM's captions (None: the FRM reads none)."""
    return captions.describe() if captions is not None else "unused (this FRM reads no captions)"


def degraded_pair(
    hq: torch.Tensor, face_size: int, degradation: DegradationConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(HQ, LQ) at face_size in [0, 1]: the restorer's training degradation (DegradationConfig),
    its 512-px parameters scaled to face_size. The degradation runs where `gen` draws (the CPU: its
    parameters, kernels and noise come from it; JPEG is a CPU codec), then LQ joins HQ's device."""
    hq = resize_for_model(hq, face_size)
    params = sample_params(degradation, hq.shape[0], gen)
    return hq, degrade_at(hq.to(gen.device), params, degradation.blur_kernel_size, gen).to(hq.device)


def autocast(device: torch.device, precision: str):
    """bf16 autocast (weights and optimizer state stay fp32); no GradScaler needed, unlike fp16."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def save_model(model: OneStepRestorer, folder: Path) -> None:
    """The model's checkpoint form: its LoRA adapters alone when it has any, else the full folder."""
    if model.lora_adapters:
        folder.mkdir(parents=True, exist_ok=True)
        model.save_lora(folder / LORA_FILE)
    else:
        model.save_pretrained(folder)


def export_final(model: OneStepRestorer, folder: Path) -> None:
    """The shipped form: LoRA merged into the base, fp16 weights."""
    if model.lora_adapters:
        model.merge_lora()
    model.eval().save_pretrained(folder, dtype=torch.float16)


# ------------------------------------------------------------------ learning rate


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 1.0) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio at the last step (1.0: constant rate,
    as the short reward fine-tunings use)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def update(acc, opt: torch.optim.Optimizer, loss: torch.Tensor, params: list, grad_clip: float, average: bool = False) -> None:
    """One optimiser step through accelerate, clipped. Models accelerate wrapped average their
    gradients over processes themselves; `average` does it for a model that is not wrapped."""
    opt.zero_grad(set_to_none=True)
    acc.backward(loss)
    if average and acc.num_processes > 1:
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= acc.num_processes
    acc.clip_grad_norm_(params, grad_clip)
    opt.step()


# ------------------------------------------------------------------ the loop


@dataclass
class RunResult:
    """What every run reports. Indexable by name (`result["step"]`, extras included), as the
    summaries were dicts before; `summary()` is the table the commands print."""

    finished: bool
    step: int
    steps_this_run: int
    seconds: float
    last_losses: dict[str, float] = field(default_factory=dict)
    #: the throughput (e.g. images_per_s) and the method's own results (e.g. frm_updates).
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        if key in self.extra:
            return self.extra[key]
        if key in self.__dataclass_fields__ and key != "extra":
            return getattr(self, key)
        raise KeyError(key)

    def summary(self) -> dict[str, Any]:
        head = {"step": self.step, "steps_this_run": self.steps_this_run, "finished": self.finished, "seconds": self.seconds}
        return head | self.extra | {"last_losses": self.last_losses}


class TrainingMethod:
    """One method's part of a run; `run_training` calls these hooks and does everything else.

    `build` makes the model(s) and `self.opt` (the checkpointed optimiser), `resume` takes the
    checkpoint's extras, `start` makes the data and calls `acc.prepare`, `train_step` runs one
    step and returns (loss terms, samples this process used), `finish` exports the result.
    """

    #: the log's and summary's throughput key.
    rate_key = "images_per_s"
    #: decimals of the logged loss terms.
    log_digits = 5

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.acc: Any = None
        self.opt: torch.optim.Optimizer | None = None
        self.run_dir = Path()

    def build(self, ckpt: Path | None) -> None:
        raise NotImplementedError

    def resume(self, extra: dict[str, Any]) -> None:
        """Restore what the checkpoint's extras hold beyond the model and optimiser."""

    def start(self, step: int) -> None:
        """Data, generators and `acc.prepare`, once the step to start from is known."""

    def train_step(self, step: int) -> tuple[dict[str, float], int]:
        raise NotImplementedError

    def log_row(self, step: int, terms: dict[str, float]) -> dict[str, Any]:
        return {"lr": round(self.lr_at(step - 1), 8), **{k: round(v, self.log_digits) for k, v in terms.items()}}

    def after_step(self, step: int, log: JsonlLog) -> None:
        """Extra work between steps (the FRM's validation)."""

    def before_final_save(self, step: int, log: JsonlLog) -> None:
        """Extra work once the loop ends, before the last checkpoint."""

    def checkpoint_extra(self) -> dict[str, Any]:
        return {}

    def save_model(self, folder: Path) -> None:
        raise NotImplementedError

    def finish(self, run_dir: Path) -> None:
        """Export the finished run's results (main process only)."""
        raise NotImplementedError

    def results(self) -> dict[str, Any]:
        """The method's own entries of the summary."""
        return {}

    def min_lr_ratio(self) -> float:
        return 1.0

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        return cfg.lr * lr_factor(step, cfg.warmup_steps, cfg.steps, self.min_lr_ratio())

    def set_lr(self, step: int) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step)


def step_seed(seed: int, step: int, process: int, part: int = 0) -> int:
    """The seed of one step's draws, from the run's seed, the step, the process and a part of the
    step (LRPO's rounds): a resumed run draws what the uninterrupted one did at the same step,
    whatever was drawn before."""
    return ((seed * 100003 + step) * 1009 + part) * 1013 + process


def step_generator(seed: int, step: int, process: int, part: int = 0) -> torch.Generator:
    """A CPU generator for one step's draws (degradations, sampling noise, ReFL's step m): `step_seed`."""
    return torch.Generator().manual_seed(step_seed(seed, step, process, part))


def seed_everything(seed: int) -> None:
    """Seed torch's, Python's and numpy's global generators, so a run's `seed` makes the run."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def run_training(
    method: TrainingMethod,
    run_dir: Path,
    device: str = "cpu",
    resume: bool = True,
    max_minutes: float | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> RunResult:
    """Train (or resume) one method until its steps are done or the time budget ends.

    Writes run_dir/train_config.json, log.jsonl and checkpoint (every `checkpoint_every` steps
    and at the end), and when finished whatever `method.finish` exports.
    """
    cfg, run_dir = method.cfg, Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    acc = method.acc = accelerator(device)
    method.run_dir = run_dir
    # every generator drawn from without a seed of its own (the steps and the faces' order have
    # theirs: step_generator, data.order): torch's, Python's and numpy's; a resume restores all three
    seed_everything(cfg.seed + acc.process_index)
    ckpt = find_checkpoint(run_dir) if resume else None
    method.build(ckpt)
    step = 0
    if ckpt is not None:
        step, extra = load_training_state(ckpt, method.opt)
        method.resume(extra)
    if acc.is_main_process:
        (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    method.start(step)
    return _loop(method, run_dir, step, max_minutes, on_step)


def _loop(method: TrainingMethod, run_dir: Path, step: int, max_minutes: float | None, on_step: Callable | None) -> RunResult:
    cfg, acc = method.cfg, method.acc
    log, main = JsonlLog(run_dir / "log.jsonl"), acc.is_main_process
    t0, seen, start_step, terms = time.perf_counter(), 0, step, {}
    budget = TimeBudget(max_minutes)
    while step < cfg.steps and not _out_of_time(acc, budget):
        terms, used = method.train_step(step)
        step, seen = step + 1, seen + used * acc.num_processes
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = method.log_row(step, terms)
            if main:
                log.write(step=step, **{method.rate_key: round(seen / (time.perf_counter() - t0), 3)}, **row)
        if on_step and main:
            on_step(step, terms)
        method.after_step(step, log)
        if step % cfg.checkpoint_every == 0:
            _save(method, run_dir, step)
    method.before_final_save(step, log)
    _save(method, run_dir, step)
    elapsed, finished = time.perf_counter() - t0, step >= cfg.steps
    if finished and main:
        method.finish(run_dir)
    acc.wait_for_everyone()
    rate = {method.rate_key: round(seen / max(elapsed, 1e-9), 3)} | peak_device_memory(acc.device)
    return RunResult(finished, step, step - start_step, round(elapsed, 1), terms, rate | method.results())


def peak_device_memory(device: torch.device) -> dict[str, float]:
    """The CUDA allocator's peak of this process (GiB), for the summary: what the printed estimate
    is checked against. Nothing on the CPU, where resident memory is the OS's to measure."""
    if device.type != "cuda":
        return {}
    return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}


def _out_of_time(acc, budget: TimeBudget) -> bool:
    """Whether any process's budget has ended: all processes must stop at the same step, or one
    would wait forever in the next step's gradient exchange."""
    if acc.num_processes == 1:
        return budget.expired()
    flag = torch.tensor([float(budget.expired())], device=acc.device)
    return bool(acc.reduce(flag, reduction="sum").item() > 0)


def _save(method: TrainingMethod, run_dir: Path, step: int) -> None:
    if method.acc.is_main_process:
        extra = {"config": method.cfg.to_dict(), **method.checkpoint_extra()}
        save_checkpoint(run_dir, method.save_model, method.opt, step, extra)
