"""Supervised training of the one-step restorer, in two stages.

1. `stage = "autoencoder"`: the VAE alone learns to reconstruct HQ faces (L1 + edge + a small KL),
   which is cheap (no UNet) and gives the latent space everything later builds on.
2. `stage = "restorer"`: starting from that VAE, the encoder and the UNet step learn to map
   degraded faces to clean latents on pairs made on the fly by the batched degradation; the
   decoder is frozen (`freeze`), as in OSEDiff, so it keeps decoding the autoencoder's latents.
"""

from __future__ import annotations

import json
import math
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..models.restorer import OneStepRestorer
from .checkpoint import JsonlLog, TimeBudget, find_checkpoint, load_training_state, save_checkpoint
from .data import AlignedFaces
from .degrade import DegradationConfig, Degrader


@dataclass
class LossWeights:
    restore_l1: float = 1.0
    restore_edge: float = 0.5
    recon_l1: float = 1.0
    recon_edge: float = 0.5
    kl: float = 1e-6


STAGES = ("autoencoder", "restorer")


@dataclass
class RestorerTrainConfig:
    """Everything a run depends on; saved beside the checkpoints so a run can be repeated."""

    data: list[str] = field(default_factory=list)
    model: str = "tiny"
    stage: str = "restorer"
    freeze: list[str] = field(default_factory=list)
    steps: int = 2000
    batch_size: int = 8
    patch_size: int = 256
    lr: float = 2e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    min_sharpness: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "fp32"
    seed: int = 0
    num_workers: int = 2
    log_every: int = 10
    checkpoint_every: int = 200
    losses: LossWeights = field(default_factory=LossWeights)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)

    @classmethod
    def from_file(cls, path: Path) -> "RestorerTrainConfig":
        """Read a TOML or JSON config file; unknown keys are an error, not silently ignored."""
        text = Path(path).read_text()
        raw = json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> "RestorerTrainConfig":
        raw = dict(raw)
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown training config keys: {', '.join(sorted(unknown))}")
        losses = LossWeights(**raw.pop("losses", {}))
        degradation = DegradationConfig.from_dict(raw.pop("degradation", {}))
        cfg = cls(**raw, losses=losses, degradation=degradation)
        if cfg.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {cfg.stage!r}")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


def sobel_edges(x: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical gradients per channel: an L1 on them rewards sharp, aligned edges."""
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device, dtype=x.dtype)
    weight = torch.stack([k, k.T])[:, None].repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), weight, groups=x.shape[1])


def _l1_and_edges(out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.l1_loss(out, target), F.l1_loss(sobel_edges(out), sobel_edges(target))


def autoencoder_losses(model: OneStepRestorer, hq: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reconstruction of HQ faces (in [-1,1]) through the VAE alone."""
    dist = model.vae.encode(hq).latent_dist
    recon = model.vae.decode(dist.mode()).sample
    l1, edge = _l1_and_edges(recon, hq)
    return {"recon_l1": l1, "recon_edge": edge, "kl": dist.kl().mean()}


def restoration_losses(model: OneStepRestorer, lq: torch.Tensor, hq: torch.Tensor) -> dict[str, torch.Tensor]:
    """LQ -> one step -> image, against HQ. Unclamped: a clamp would stop gradients at the limits."""
    restored = model.decode(model.denoise_latent(model.encode(lq)), clamp=False)
    l1, edge = _l1_and_edges(restored, hq)
    return {"restore_l1": l1, "restore_edge": edge}


def stage_losses(model: OneStepRestorer, stage: str, lq: torch.Tensor, hq: torch.Tensor, w: LossWeights) -> dict[str, torch.Tensor]:
    """The loss terms of a stage (images in [-1,1]); 'total' is their weighted sum."""
    terms = autoencoder_losses(model, hq) if stage == "autoencoder" else restoration_losses(model, lq, hq)
    terms["total"] = sum(getattr(w, k) * v for k, v in terms.items())
    return terms


def freeze_modules(model: torch.nn.Module, prefixes: list[str]) -> int:
    """Stop training every parameter under the given module names; returns how many were frozen."""
    frozen = 0
    for name, p in model.named_parameters():
        if any(name == f or name.startswith(f + ".") for f in prefixes):
            p.requires_grad_(False)
            frozen += p.numel()
    if prefixes and not frozen:
        raise ValueError(f"freeze: no parameters under {', '.join(prefixes)}")
    return frozen


def lr_lambda(step: int, cfg: RestorerTrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio of the base rate at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _autocast(device: torch.device, precision: str):
    enabled = precision == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _infinite(loader: DataLoader):
    while True:
        yield from loader


def load_model_for_training(spec: str) -> OneStepRestorer:
    """A config name starts from random weights; a folder continues from saved weights."""
    if Path(spec).is_dir():
        return OneStepRestorer.from_pretrained(spec, torch_dtype=torch.float32)
    return OneStepRestorer.from_config(spec)


def train_restorer(
    cfg: RestorerTrainConfig,
    run_dir: Path,
    device: str = "cpu",
    resume: bool = True,
    max_minutes: float | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict:
    """Train (or resume) and return a summary; the final model is saved in run_dir/final."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    ckpt = find_checkpoint(run_dir) if resume else None
    model = load_model_for_training(str(ckpt / "model") if ckpt else cfg.model).to(dev).train()
    freeze_modules(model, cfg.freeze)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if ckpt:
        step, _ = load_training_state(ckpt, opt)
    (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    data = AlignedFaces([Path(d) for d in cfg.data], patch_size=cfg.patch_size, min_sharpness=cfg.min_sharpness)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    degrader = Degrader(cfg.degradation, seed=cfg.seed + step, device=dev)
    log, budget = JsonlLog(run_dir / "log.jsonl"), TimeBudget(max_minutes)
    batches, t0, seen, start_step = _infinite(loader), time.perf_counter(), 0, step
    terms: dict[str, float] = {}
    save = lambda: save_checkpoint(run_dir, model.save_pretrained, opt, step, {"config": cfg.to_dict()})
    while step < cfg.steps and not budget.expired():
        hq = next(batches).to(dev)
        lq = degrader(hq)[0] if cfg.stage == "restorer" else hq
        with _autocast(dev, cfg.precision):
            losses = stage_losses(model, cfg.stage, lq * 2 - 1, hq * 2 - 1, cfg.losses)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_lambda(step, cfg)
        opt.step()
        step, seen = step + 1, seen + hq.shape[0]
        terms = {k: float(v.detach()) for k, v in losses.items()}
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = seen / (time.perf_counter() - t0)
            log.write(step=step, images_per_s=round(rate, 3), **{k: round(v, 5) for k, v in terms.items()})
        if on_step:
            on_step(step, terms)
        if step % cfg.checkpoint_every == 0:
            save()
    save()
    elapsed = time.perf_counter() - t0
    finished = step >= cfg.steps
    if finished:
        model.eval().save_pretrained(run_dir / "final", dtype=torch.float16)
    return {
        "step": step,
        "steps_this_run": step - start_step,
        "finished": finished,
        "seconds": round(elapsed, 1),
        "images_per_s": round(seen / max(elapsed, 1e-9), 3),
        "last_losses": terms,
    }
