"""Reward feedback learning (ReFL) of the one-step restorer against the Face Reward Model, as
DiffusionReward does.

    LQ --encoder(+LoRA)--> z --UNet step(+LoRA)--> z0 --frozen decoder--> restored --FRM--> score

The gradient of the FRM score flows back through the frozen decoder and the UNet step into LoRA
adapters on the UNet and the VAE encoder; the base weights never change. The loss is

    lambda_R (1 - FRM score)                                 reward
  + lambda_s L1(low-frequency wavelet bands of restored, GT) structural consistency
  + lambda_p perceptual distance (losses.EncoderPerceptualLoss)
  + lambda_reg MSE(z0, z0 of the frozen base on the same LQ) regulariser (the base's latent is
                                                            computed with the adapters disabled)

Dynamic FRM: every `frm_update_every` steps the FRM takes one small Bradley-Terry step to prefer
the ground truth over the current restorations, so the generator cannot keep exploiting a frozen
judge (0 keeps the FRM frozen). The FRM runs in eval mode throughout (BatchNorm statistics fixed).

Faces are whole aligned crops resized to `face_size` (the FRM judges whole aligned faces; it
resizes them to its own input size inside `forward`, differentiably), degraded on the fly with the
restorer's 512-px degradation parameters scaled to that size (`data.autopairs.degrade_at`).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from facerestore_cli.data.degrade import DegradationConfig
from facerestore_cli.models.color import low_frequency
from facerestore_cli.models.loading import load_model_folder
from facerestore_cli.models.perceptual import EncoderPerceptualLoss
from facerestore_cli.models.restorer import OneStepRestorer
from facerestore_cli.rewards.frm import FaceRewardModel, load_frm
from facerestore_cli.train.checkpoint import (
    JsonlLog,
    TimeBudget,
    find_checkpoint,
    load_training_state,
    save_checkpoint,
)
from facerestore_cli.train.frm import preference_step
from facerestore_cli.train.runner import (
    LORA_FILE,
    LoraTuningConfig,
    autocast,
    degraded_pair,
    export_final,
    infinite,
    save_model,
    whole_face_loader,
)

PRECISIONS = ("fp32", "bf16")


@dataclass
class ReflLossWeights:
    """DiffusionReward's weights (reward 0.005, wavelet 0.01, perceptual 0.01, regulariser 1e-4)."""

    reward: float = 0.005
    structural: float = 0.01
    perceptual: float = 0.01
    regulariser: float = 1e-4


@dataclass
class ReflConfig(LoraTuningConfig):
    """Everything a ReFL run depends on; saved beside the checkpoints so it can be repeated."""

    TABLES = {"losses": ReflLossWeights, "degradation": DegradationConfig}
    KIND = "refl config"

    weight_decay: float = 0.0
    #: every K steps the FRM learns to prefer ground truth over the current restorations; 0: frozen FRM.
    frm_update_every: int = 10
    frm_lr: float = 1e-5
    frm_grad_clip: float = 1.0
    precision: str = "fp32"
    losses: ReflLossWeights = field(default_factory=ReflLossWeights)

    def validate(self) -> None:
        super().validate()
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.frm_update_every < 0:
            raise ValueError(f"frm_update_every must be >= 0 (0 keeps the FRM frozen), not {self.frm_update_every}")
        if any(w < 0 for w in asdict(self.losses).values()):
            raise ValueError("loss weights must be >= 0")

    @property
    def dynamic_frm(self) -> bool:
        return self.frm_update_every > 0


class ReflObjective(torch.nn.Module):
    """The tuned restorer, the FRM and the frozen perceptual features; `forward` gives the loss terms.

    Build it on the base model *before* LoRA is added (the perceptual features are a frozen copy
    of the base encoder).
    """

    def __init__(self, model: OneStepRestorer, frm: FaceRewardModel, weights: ReflLossWeights, wavelet_levels: int = 4):
        super().__init__()
        self.model, self.weights, self.wavelet_levels = model, weights, wavelet_levels
        self.frm = [frm]  # a list keeps the FRM out of this module's parameters (it has its own optimizer)
        self.perceptual = EncoderPerceptualLoss(model.vae.encoder) if weights.perceptual else None

    def forward(self, lq: torch.Tensor, hq: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Images in [-1, 1]. Returns (terms with 'total' and the mean 'frm_score', restored in [0, 1] detached)."""
        model, w = self.model, self.weights
        z, restored = model.restore_one_step(lq)  # decoder frozen, gradients flow through it
        image01 = (restored.float().clamp(-1, 1) + 1) / 2  # the FRM judges valid images only
        score = self.frm[0](image01)
        terms: dict[str, torch.Tensor] = {"reward": (1 - score).mean()}
        if w.structural:
            levels = self.wavelet_levels
            terms["structural"] = F.l1_loss(low_frequency(restored.float(), levels), low_frequency(hq.float(), levels))
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(restored, hq)
        if w.regulariser:
            with torch.no_grad(), model.adapters_disabled():
                z_base = model.denoise_latent(model.encode(lq))
            terms["regulariser"] = F.mse_loss(z.float(), z_base.float())
        terms["total"] = sum(getattr(w, k) * v for k, v in terms.items())
        terms["frm_score"] = score.detach().mean()
        return terms, image01.detach()


def _warmup(step: int, cfg: ReflConfig) -> float:
    """Linear warm-up, then the constant rate (ReFL fine-tunes briefly; no decay)."""
    return min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def build_refl(cfg: ReflConfig, device: torch.device | str = "cpu") -> tuple[OneStepRestorer, FaceRewardModel, ReflObjective]:
    """The base restorer with fresh LoRA adapters (base frozen), the FRM (frozen, eval) and the objective."""
    model = load_model_folder(cfg.model, torch_dtype=torch.float32).train()
    if cfg.face_size % model.size_multiple:
        raise ValueError(f"face_size {cfg.face_size} must be a multiple of {model.size_multiple} for this model")
    frm = load_frm(cfg.frm).eval().requires_grad_(False)
    objective = ReflObjective(model, frm, cfg.losses, cfg.wavelet_levels)
    model.add_lora(rank_unet=cfg.lora_rank, rank_vae=cfg.lora_rank, alpha=cfg.lora_alpha)
    model.freeze_base()
    return model.to(device), frm.to(device), objective.to(device)


def frm_optimizer(frm: FaceRewardModel, cfg: ReflConfig) -> torch.optim.Optimizer:
    """AdamW over every FRM weight (the FRM keeps requires_grad off outside its own update)."""
    return torch.optim.AdamW(list(frm.parameters()), lr=cfg.frm_lr, weight_decay=0.0)


def train_refl(
    cfg: ReflConfig,
    run_dir: Path,
    device: str = "cpu",
    resume: bool = True,
    max_minutes: float | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict:
    """Fine-tune (or resume) with reward feedback; returns a summary.

    Writes run_dir/log.jsonl, run_dir/checkpoint (LoRA, optimizer, step, RNG and, with a dynamic
    FRM, its weights and optimizer), and when finished run_dir/lora.safetensors (for
    `restore --lora`), run_dir/final (merged, fp16) and, with a dynamic FRM, run_dir/frm_final.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    ckpt = find_checkpoint(run_dir) if resume else None
    model, frm, objective = build_refl(cfg, dev)
    frm_start = copy.deepcopy(frm) if cfg.dynamic_frm else None  # the judge before any update, for the log
    if ckpt is not None:
        model.load_lora(ckpt / "model" / LORA_FILE)
    trainable = model.lora_parameters()
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    frm_opt = frm_optimizer(frm, cfg) if cfg.dynamic_frm else None
    step, frm_updates = 0, 0
    if ckpt is not None:
        step, extra = load_training_state(ckpt, opt)
        frm_updates = int(extra.get("frm_updates", 0))
        if frm_opt is not None and "frm" in extra:
            frm.load_state_dict(extra["frm"])
            frm_opt.load_state_dict(extra["frm_opt"])
            for group in frm_opt.param_groups:
                group["lr"] = cfg.frm_lr  # the config's rate, like the restorer's (set every step)
    (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    loader = whole_face_loader(cfg.data, cfg.batch_size, cfg.min_sharpness, cfg.num_workers)
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + step + 1000)
    log, budget = JsonlLog(run_dir / "log.jsonl"), TimeBudget(max_minutes)
    batches, t0, seen, start_step = infinite(loader), time.perf_counter(), 0, step
    terms: dict[str, float] = {}

    def save() -> None:
        extra = {"config": cfg.to_dict(), "frm_updates": frm_updates}
        if frm_opt is not None:
            extra.update(frm=frm.state_dict(), frm_opt=frm_opt.state_dict())

        save_checkpoint(run_dir, lambda folder: save_model(model, folder), opt, step, extra)

    while step < cfg.steps and not budget.expired():
        hq, lq = degraded_pair(next(batches).to(dev), cfg.face_size, cfg.degradation, gen)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _warmup(step, cfg)
        with autocast(dev, cfg.precision):
            losses, restored = objective(lq * 2 - 1, hq * 2 - 1)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        step, seen = step + 1, seen + hq.shape[0]
        terms = {k: float(v.detach()) for k, v in losses.items()}
        if frm_opt is not None:
            with torch.no_grad():
                terms["frm_start_score"] = float(frm_start(restored).mean())
            if step % cfg.frm_update_every == 0:
                with autocast(dev, cfg.precision):
                    frm_loss, frm_acc = preference_step(frm, frm_opt, hq, restored, cfg.frm_grad_clip)
                frm_updates += 1
                terms.update(frm_loss=frm_loss, frm_accuracy=frm_acc)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = seen / (time.perf_counter() - t0)
            log.write(step=step, images_per_s=round(rate, 3), lr=round(cfg.lr * _warmup(step - 1, cfg), 8), **{k: round(v, 6) for k, v in terms.items()})
        if on_step:
            on_step(step, terms)
        if step % cfg.checkpoint_every == 0:
            save()
    save()
    elapsed = time.perf_counter() - t0
    finished = step >= cfg.steps
    if finished:
        model.save_lora(run_dir / LORA_FILE)
        if frm_opt is not None:
            frm.save_pretrained(run_dir / "frm_final")
        export_final(model, run_dir / "final")
    return {
        "step": step,
        "steps_this_run": step - start_step,
        "finished": finished,
        "seconds": round(elapsed, 1),
        "images_per_s": round(seen / max(elapsed, 1e-9), 3),
        "frm": "dynamic" if cfg.dynamic_frm else "frozen",
        "frm_updates": frm_updates,
        "last_losses": terms,
    }
