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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from facerestore_cli.data.degrade import DegradationConfig
from facerestore_cli.errors import InputError
from facerestore_cli.models.color import low_frequency
from facerestore_cli.models.loading import load_tunable_restorer
from facerestore_cli.models.perceptual import EncoderPerceptualLoss
from facerestore_cli.models.restorer import OneStepRestorer
from facerestore_cli.rewards.frm import FaceRewardModel, load_frm
from facerestore_cli.train.frm import preference_step
from facerestore_cli.train.runner import (
    LORA_FILE,
    LoraTuningConfig,
    RunResult,
    TrainingMethod,
    autocast,
    degraded_pair,
    export_final,
    infinite,
    run_training,
    save_model,
    update,
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
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.frm_update_every < 0:
            raise InputError(f"frm_update_every must be >= 0 (0 keeps the FRM frozen), not {self.frm_update_every}")
        if any(w < 0 for w in asdict(self.losses).values()):
            raise InputError("loss weights must be >= 0")

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


def build_refl(cfg: ReflConfig, device: torch.device | str = "cpu") -> tuple[OneStepRestorer, FaceRewardModel, ReflObjective]:
    """The base restorer with fresh LoRA adapters (base frozen), the FRM (frozen, eval) and the objective."""
    model = load_tunable_restorer(cfg.model).train()
    if cfg.face_size % model.size_multiple:
        raise InputError(f"face_size {cfg.face_size} must be a multiple of {model.size_multiple} for this model")
    frm = load_frm(cfg.frm).eval().requires_grad_(False)
    objective = ReflObjective(model, frm, cfg.losses, cfg.wavelet_levels)
    model.add_lora(rank_unet=cfg.lora_rank, rank_vae=cfg.lora_rank, alpha=cfg.lora_alpha)
    model.freeze_base()
    return model.to(device), frm.to(device), objective.to(device)


def frm_optimizer(frm: FaceRewardModel, cfg: ReflConfig) -> torch.optim.Optimizer:
    """AdamW over every FRM weight (the FRM keeps requires_grad off outside its own update)."""
    return torch.optim.AdamW(list(frm.parameters()), lr=cfg.frm_lr, weight_decay=0.0)


class ReflMethod(TrainingMethod):
    """ReFL as a `run_training` method: LoRA steps on the reward, and the dynamic FRM's own steps.

    Under several processes every process makes the same FRM step on the whole gathered batch,
    so the judges stay equal without a DDP wrapper (the FRM's methods are called directly).
    """

    log_digits = 6

    def build(self, ckpt: Path | None) -> None:
        cfg = self.cfg
        self.model, self.frm, self.objective = build_refl(cfg, self.acc.device)
        self.frm_start = copy.deepcopy(self.frm) if cfg.dynamic_frm else None  # the judge before any update, for the log
        if ckpt is not None:
            self.model.load_lora(ckpt / "model" / LORA_FILE)
        self.trainable = self.model.lora_parameters()
        self.opt = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.frm_opt = frm_optimizer(self.frm, cfg) if cfg.dynamic_frm else None
        self.frm_updates = 0

    def resume(self, extra: dict[str, Any]) -> None:
        self.frm_updates = int(extra.get("frm_updates", 0))
        if self.frm_opt is not None and "frm" in extra:
            self.frm.load_state_dict(extra["frm"])
            self.frm_opt.load_state_dict(extra["frm_opt"])
            for group in self.frm_opt.param_groups:
                group["lr"] = self.cfg.frm_lr  # the config's rate, like the restorer's (set every step)

    def start(self, step: int) -> None:
        cfg, acc = self.cfg, self.acc
        loader = whole_face_loader(cfg.data, cfg.batch_size, cfg.min_sharpness, cfg.num_workers)
        self.objective, self.opt, loader = acc.prepare(self.objective, self.opt, loader)
        self.gen = torch.Generator().manual_seed(cfg.seed * 100003 + step + 1000 + 7919 * acc.process_index)
        self.batches = infinite(loader)

    def train_step(self, step: int) -> tuple[dict[str, float], int]:
        cfg, acc = self.cfg, self.acc
        hq, lq = degraded_pair(next(self.batches).to(acc.device), cfg.face_size, cfg.degradation, self.gen)
        self.set_lr(step)
        with autocast(acc.device, cfg.precision):
            losses, restored = self.objective(lq * 2 - 1, hq * 2 - 1)
        update(acc, self.opt, losses["total"], self.trainable, cfg.grad_clip)
        terms = {k: float(v.detach()) for k, v in losses.items()}
        if self.frm_opt is not None:
            terms.update(self._frm_step(step + 1, hq, restored))
        return terms, hq.shape[0]

    def _frm_step(self, step: int, hq: torch.Tensor, restored: torch.Tensor) -> dict[str, float]:
        """The dynamic FRM's log terms, and every `frm_update_every` steps its preference step."""
        cfg, acc = self.cfg, self.acc
        with torch.no_grad():
            terms = {"frm_start_score": float(self.frm_start(restored).mean())}
        if step % cfg.frm_update_every == 0:
            with autocast(acc.device, cfg.precision):
                frm_loss, frm_acc = preference_step(self.frm, self.frm_opt, acc.gather(hq), acc.gather(restored), cfg.frm_grad_clip)
            self.frm_updates += 1
            terms.update(frm_loss=frm_loss, frm_accuracy=frm_acc)
        return terms

    def checkpoint_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"frm_updates": self.frm_updates}
        if self.frm_opt is not None:
            extra.update(frm=self.frm.state_dict(), frm_opt=self.frm_opt.state_dict())
        return extra

    def save_model(self, folder: Path) -> None:
        save_model(self.model, folder)

    def finish(self, run_dir: Path) -> None:
        self.model.save_lora(run_dir / LORA_FILE)
        if self.frm_opt is not None:
            self.frm.save_pretrained(run_dir / "frm_final")
        export_final(self.model, run_dir / "final")

    def results(self) -> dict[str, Any]:
        return {"frm": "dynamic" if self.cfg.dynamic_frm else "frozen", "frm_updates": self.frm_updates}


def train_refl(
    cfg: ReflConfig,
    run_dir: Path,
    device: str = "cpu",
    resume: bool = True,
    max_minutes: float | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> RunResult:
    """Fine-tune (or resume) with reward feedback; returns the run's summary.

    Writes run_dir/log.jsonl, run_dir/checkpoint (LoRA, optimizer, step, RNG and, with a dynamic
    FRM, its weights and optimizer), and when finished run_dir/lora.safetensors (for
    `restore --lora`), run_dir/final (merged, fp16) and, with a dynamic FRM, run_dir/frm_final.
    Several processes: `accelerate launch` or torchrun, each on its shard of the faces.
    """
    return run_training(ReflMethod(cfg), run_dir, device, resume, max_minutes, on_step)
