"""Reward feedback learning (ReFL) of the restorer against the Face Reward Model, as
DiffusionReward does it (facts: shared/upstream/TRAINING.md).

    LQ --encoder--> z_T --sampler steps, no grad, random eta--> z_{t_m} --UNet step m (+LoRA)--> x0_m
       --frozen decoder--> restored --FRM(caption)--> score

One-step models (`sampling_steps` = 1) train their single step, LoRA on the UNet and the VAE
encoder, as before. In the few-step mode (`sampling_steps` > 1, models.sampler) the trajectory
runs without gradients up to a step m drawn from the last `refl_last_steps` steps (the paper: one
of the last 1-2), each move with eta ~ U(0, 1); only step m runs with gradients and its predicted
x0 is decoded and scored. The encoder output then reaches the loss only through the no-grad
prefix, so few-step runs put LoRA on the UNet alone (as the paper trains only its ControlNet).

The loss (DiffusionReward's weights, train.refl_losses):

    0.005 (1 - FRM score)                                   reward (caption per face, data.captions)
  + 0.01  L1(DTCWT low-pass of restored, of GT)             structural (J=3, near_sym_b, qshift_b)
  + 0.01  LPIPS-VGG (local VGG16 weights; else the named encoder-feature fallback)
  + 1e-4  regulariser (`output_latent`: x0 of step m against the frozen base's x0 on the same
          input, adapters disabled; pluggable: a ControlNet-residual regulariser registers in
          refl_losses.REGULARISERS)

Dynamic FRM: every `frm_update_every` steps the FRM takes one step to prefer the ground truth over
the current restorations (0.1 x 2-way cross-entropy over logit_scale <t, i>), training only its
last image groups and text layers (open_clip: 20 and 11; the compact CNN: its last
`frm_unlocked_compact_groups` of stem, stages, head) with AdamW lr 2e-6, weight decay 0.35 (none on
biases, norms, logit_scale), grad clip 1.0, linear warm-up over 500 FRM updates, then constant.
The FRM runs in eval mode throughout (BatchNorm statistics fixed).

Faces are whole aligned crops resized to `face_size`, degraded on the fly with the restorer's
512-px degradation parameters scaled to that size (`data.autopairs.degrade_at`).

A DiffBIR-kind `--model` (a diffbir-v1 model file or store name) is tuned as the paper tunes it:
its ControlNet (whole, `lora_rank = 0`, or LoRA on it), with the control-residual regulariser,
exported as a model file `restore --model` takes (`ControlNetReflMethod`; train/controlnet.py, train/refl_controlnet.py).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from facerestore_cli.data.captions import CaptionLookup
from facerestore_cli.data.degrade import DegradationConfig
from facerestore_cli.errors import InputError
from facerestore_cli.models.diffbir import DiffBIRRestorer
from facerestore_cli.models.loading import load_tunable_diffbir, load_tunable_restorer
from facerestore_cli.models.model_file import ModelFile
from facerestore_cli.models.restorer import OneStepRestorer
from facerestore_cli.models.sampler import sampling_timesteps, step_distribution
from facerestore_cli.rewards.frm import FaceRewardModel, load_frm
from facerestore_cli.train import refl_controlnet as rc
from facerestore_cli.train.controlnet import (
    OPTIMIZERS,
    TunableControlNet,
    build_tuning,
    describe_memory,
    export_tuned,
    load_state,
    optimizer,
    save_state,
    uses_bf16,
)
from facerestore_cli.train.frm import dynamic_frm_optimizer, preference_step, unlocked_parameters
from facerestore_cli.train.refl_losses import STRUCTURAL_KINDS, LowPassL1, ReflStep, make_regulariser, perceptual_loss
from facerestore_cli.train.runner import (
    LORA_FILE,
    LoraTuningConfig,
    RunResult,
    TrainingMethod,
    autocast,
    degraded_pair,
    describe_captions,
    export_final,
    run_training,
    save_model,
    step_generator,
    update,
    whole_face_batches,
)

log = logging.getLogger(__name__)

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
    """Everything a ReFL run depends on; saved beside the checkpoints so it can be repeated.
    Defaults are the paper's (TRAINING.md) where it has one."""

    TABLES = {"losses": ReflLossWeights, "degradation": DegradationConfig}
    KIND = "refl config"

    weight_decay: float = 0.0
    precision: str = "fp32"
    #: the restorer's sampling steps to tune in (None: the model's own; 1: the single step).
    sampling_steps: int | None = None
    #: few-step mode: the trained step m is drawn from this many last steps (paper: 2).
    refl_last_steps: int = 2
    #: "dtcwt" (the paper's DTCWT low-pass) or "blur_pyramid" (the earlier stand-in, `wavelet_levels`).
    structural_loss: str = "dtcwt"
    dtcwt_levels: int = 3
    #: torchvision's VGG16 weights file for LPIPS-VGG; "" uses the encoder-feature fallback.
    lpips_vgg: str = ""
    #: regulariser kind (refl_losses.REGULARISERS); "output_latent" compares against the frozen base.
    #: A ControlNet (DiffBIR-kind) base takes "control_residuals" (the paper's) in its place.
    regulariser: str = "output_latent"
    #: ControlNet bases: "adamw" or "adamw8bit" (bitsandbytes' 8-bit AdamW, to fit one GPU).
    optimizer: str = "adamw"
    #: ControlNet bases: gradient checkpointing on the UNet and the ControlNet.
    gradient_checkpointing: bool = False
    #: every K steps the FRM learns to prefer ground truth over the current restorations; 0: frozen FRM.
    frm_update_every: int = 10
    frm_lr: float = 2e-6
    frm_weight_decay: float = 0.35
    #: linear warm-up of the FRM's rate over this many FRM updates, then constant.
    frm_warmup_steps: int = 500
    frm_grad_clip: float = 1.0
    frm_loss_weight: float = 0.1
    #: open_clip FRM: trainable last image groups / text layers (paper: 20 / 11).
    frm_unlocked_image_groups: int = 20
    frm_unlocked_text_layers: int = 11
    #: compact FRM: trainable last groups of (stem, stages, head), the analogue of the paper's 20 of ViT-H's ~34.
    frm_unlocked_compact_groups: int = 3
    losses: ReflLossWeights = field(default_factory=ReflLossWeights)

    def validate(self) -> None:
        # lora_rank 0 tunes a ControlNet base's whole ControlNet; a one-step base refuses it when built
        LoraTuningConfig.validate(replace(self, lora_rank=max(self.lora_rank, 1)))
        checks = [
            (self.lora_rank >= 0, f"lora_rank must be >= 0 (0: the whole ControlNet of a DiffBIR model), not {self.lora_rank}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}"),
            (self.frm_update_every >= 0, f"frm_update_every must be >= 0 (0 keeps the FRM frozen), not {self.frm_update_every}"),
            (all(w >= 0 for w in asdict(self.losses).values()), "loss weights must be >= 0"),
            (self.sampling_steps is None or self.sampling_steps >= 1, f"sampling_steps must be >= 1, not {self.sampling_steps}"),
            (self.refl_last_steps >= 1, f"refl_last_steps must be >= 1, not {self.refl_last_steps}"),
            (self.structural_loss in STRUCTURAL_KINDS, f"structural_loss must be one of {', '.join(STRUCTURAL_KINDS)}"),
            (self.dtcwt_levels >= 1 and self.frm_warmup_steps >= 0, "dtcwt_levels must be >= 1 and frm_warmup_steps >= 0"),
            (
                min(self.frm_unlocked_image_groups, self.frm_unlocked_text_layers, self.frm_unlocked_compact_groups) >= 0,
                "frm_unlocked_* must be >= 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    @property
    def dynamic_frm(self) -> bool:
        return self.frm_update_every > 0


def refl_forward(
    model: OneStepRestorer, lq: torch.Tensor, last_steps: int, gen: torch.Generator | None = None
) -> tuple[ReflStep, torch.Tensor]:
    """The trained step and the decoded (unclamped) restoration of LQ in [-1, 1].

    One step (`config.sampling_steps` = 1): the restorer's single step. Several: the sampler's
    steps run without gradients until a step m drawn from the last `last_steps`, with eta ~ U(0, 1)
    drawn per move; step m runs with gradients and its x0 prediction is decoded.
    """
    z, skips = model.encode_with_skips(lq)
    steps = model.config.sampling_steps
    if steps == 1:
        x0 = model.denoise_latent(z)
        return ReflStep(lq, z, model.config.timestep, 0, x0), model.decode(x0, clamp=False, skips=skips)
    schedule = sampling_timesteps(model.config.timestep, steps)
    m = steps - 1 - int(torch.randint(min(last_steps, steps), (1,), generator=gen))
    etas = torch.rand(steps, generator=gen)
    z_t = z
    with torch.no_grad():
        for i in range(m):
            t, t_prev = schedule[i]
            dist = step_distribution(model, z_t, t, t_prev, float(etas[i]), 0.0)
            noise = torch.randn(z_t.shape, generator=gen).to(z_t.device)
            z_t = (dist.mean + dist.std * noise).to(z.dtype)
    t = schedule[m][0]
    x0 = model.denoise_latent(z_t, t)
    return ReflStep(lq, z_t, t, m, x0), model.decode(x0, clamp=False, skips=skips)


class ReflObjective(torch.nn.Module):
    """The tuned restorer, the FRM and the frozen guard terms; `forward` gives the loss terms.

    Build it on the base model *before* LoRA is added (the fallback perceptual features are a
    frozen copy of the base encoder).
    """

    #: the kind of model it tunes (the regulariser must be made for it).
    BASE = "one-step"

    def __init__(
        self, model: OneStepRestorer | DiffBIRRestorer, frm: FaceRewardModel, weights: ReflLossWeights, cfg: ReflConfig | None = None
    ):
        super().__init__()
        cfg = cfg or ReflConfig()
        self.model, self.weights, self.last_steps = model, weights, cfg.refl_last_steps
        self.frm = [frm]  # a list keeps the FRM out of this module's parameters (it has its own optimizer)
        self.structural = LowPassL1(cfg.structural_loss, cfg.dtcwt_levels, cfg.wavelet_levels) if weights.structural else None
        self.perceptual = perceptual_loss(model.vae.encoder, cfg.lpips_vgg) if weights.perceptual else None
        self.regulariser = make_regulariser(self.regulariser_kind(cfg.regulariser), self.BASE)

    def regulariser_kind(self, configured: str) -> str:
        return configured

    def trained_step(self, lq: torch.Tensor, gen: torch.Generator | None) -> tuple[ReflStep, torch.Tensor]:
        """The trained step and the decoded (unclamped) restoration of LQ in [-1, 1]."""
        return refl_forward(self.model, lq, self.last_steps, gen)

    def regularised(self) -> object:
        """What the regulariser compares with its frozen start."""
        return self.model

    def describe(self) -> dict[str, str]:
        """Which form of each guard term this run uses (the summary names fallbacks)."""
        off = "off (weight 0)"
        return {
            "structural": self.structural.name if self.structural is not None else off,
            "perceptual": self.perceptual.name if self.perceptual is not None else off,
            "regulariser": self.regulariser.name if self.weights.regulariser else off,
        }

    def forward(
        self, lq: torch.Tensor, hq: torch.Tensor, captions: list[str] | None = None, gen: torch.Generator | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Images in [-1, 1]. Returns (terms with 'total', the mean 'frm_score' and the trained
        'refl_step', restored in [0, 1] detached)."""
        w = self.weights
        step, restored = self.trained_step(lq, gen)
        image01 = (restored.float().clamp(-1, 1) + 1) / 2  # the FRM judges valid images only
        score = self.frm[0](image01, captions)
        terms: dict[str, torch.Tensor] = {"reward": (1 - score).mean()}
        if self.structural is not None:
            terms["structural"] = self.structural(restored, hq)
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(restored, hq)
        if w.regulariser:
            terms["regulariser"] = self.regulariser(self.regularised(), step)
        terms["total"] = sum(getattr(w, k) * v for k, v in terms.items())
        terms["frm_score"] = score.detach().mean()
        terms["refl_step"] = torch.tensor(float(step.index))
        return terms, image01.detach()


def build_refl(cfg: ReflConfig, device: torch.device | str = "cpu") -> tuple[OneStepRestorer, FaceRewardModel, ReflObjective]:
    """The base restorer in the configured sampling mode with fresh LoRA adapters (base frozen; the
    encoder gets none in few-step mode), the FRM (frozen, eval) and the objective."""
    if cfg.lora_rank == 0:
        raise InputError("lora_rank = 0 (the whole ControlNet) is for DiffBIR-kind models; a one-step restorer tunes LoRA (lora_rank >= 1)")
    model = load_tunable_restorer(cfg.model).train()
    if cfg.face_size % model.size_multiple:
        raise InputError(f"face_size {cfg.face_size} must be a multiple of {model.size_multiple} for this model")
    if cfg.sampling_steps is not None:
        model.config.sampling_steps = cfg.sampling_steps
        model.config.validate()  # the steps must fit below the model's timestep
    frm = load_frm(cfg.frm).eval().requires_grad_(False)
    objective = ReflObjective(model, frm, cfg.losses, cfg)
    rank_vae = cfg.lora_rank if model.config.sampling_steps == 1 else 0
    model.add_lora(rank_unet=cfg.lora_rank, rank_vae=rank_vae, alpha=cfg.lora_alpha)
    model.freeze_base()
    return model.to(device), frm.to(device), objective.to(device)


def frm_optimizer(frm: FaceRewardModel, cfg: ReflConfig) -> torch.optim.Optimizer:
    """AdamW over the FRM's unlocked last layers (the rest stays as loaded), decay as the paper."""
    image = cfg.frm_unlocked_image_groups if frm.config.backbone == "open_clip" else cfg.frm_unlocked_compact_groups
    named = unlocked_parameters(frm, image, cfg.frm_unlocked_text_layers)
    return dynamic_frm_optimizer(named, cfg.frm_lr, cfg.frm_weight_decay)


class ReflMethod(TrainingMethod):
    """ReFL as a `run_training` method: LoRA steps on the reward, and the dynamic FRM's own steps.

    Under several processes every process makes the same FRM step on the whole gathered batch,
    so the judges stay equal without a DDP wrapper (the FRM's methods are called directly).
    """

    log_digits = 6

    def build(self, ckpt: Path | None) -> None:
        cfg = self.cfg
        self.model, self.frm, self.objective = build_refl(cfg, self.acc.device)
        if ckpt is not None:
            self.model.load_lora(ckpt / "model" / LORA_FILE)
        self.trainable = self.model.lora_parameters()
        self.opt = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.precision = cfg.precision
        self.build_judge()

    def judges_in_memory(self) -> tuple[list[torch.nn.Module], int]:
        """What the memory estimate adds for the judges: their networks (the objective's, with the
        FRM and its start copy) and how many FRM weights the dynamic FRM trains."""
        nets = [m for m in (self.objective, self.frm, self.frm_start) if m is not None]
        trained = sum(p.numel() for g in self.frm_opt.param_groups for p in g["params"]) if self.frm_opt is not None else 0
        return nets, trained

    def build_judge(self) -> None:
        """The dynamic FRM's optimiser and start copy, the captions and the setup the log names."""
        cfg = self.cfg
        self.frm_start = copy.deepcopy(self.frm) if cfg.dynamic_frm else None  # the judge before any update, for the log
        self.frm_opt = frm_optimizer(self.frm, cfg) if cfg.dynamic_frm else None
        self.frm_updates, self.logged_setup = 0, False
        self.captions = CaptionLookup.from_config(cfg.captions, cfg.caption)
        self.setup = self.objective.describe()
        if self.setup["perceptual"].startswith("encoder_features") and self.acc.is_main_process:
            log.warning("refl: the perceptual term is %s", self.setup["perceptual"])

    def resume(self, extra: dict[str, Any]) -> None:
        self.frm_updates = int(extra.get("frm_updates", 0))
        if self.frm_opt is not None and "frm" in extra:
            self.frm.load_state_dict(extra["frm"])
            self.frm_opt.load_state_dict(extra["frm_opt"])  # its rate is set before every FRM step

    def start(self, step: int) -> None:
        cfg, acc = self.cfg, self.acc
        self.objective, self.opt = acc.prepare(self.objective, self.opt)
        self.batches = whole_face_batches(cfg, acc, start_batch=step, captions=self.captions)  # a batch a step
        self.setup["captions"] = describe_captions(self.captions if self.frm.uses_captions else None)

    def train_step(self, step: int) -> tuple[dict[str, float], int]:
        cfg, acc = self.cfg, self.acc
        faces, captions = next(self.batches)
        captions = list(captions) if self.frm.uses_captions else None
        self.gen = step_generator(cfg.seed, step, acc.process_index)  # a resumed run draws as the straight one
        hq, lq = degraded_pair(faces.to(acc.device), cfg.face_size, cfg.degradation, self.gen)
        self.set_lr(step)
        with autocast(acc.device, self.precision):
            losses, restored = self.objective(lq * 2 - 1, hq * 2 - 1, captions, gen=self.gen)
        update(acc, self.opt, losses["total"], self.trainable, cfg.grad_clip)
        terms = {k: float(v.detach()) for k, v in losses.items()}
        if self.frm_opt is not None:
            terms.update(self._frm_step(step + 1, hq, restored, captions))
        return terms, hq.shape[0]

    def frm_lr_now(self) -> float:
        """The FRM's rate at its next update: linear warm-up over `frm_warmup_steps` updates, then constant."""
        warmup = self.cfg.frm_warmup_steps
        return self.cfg.frm_lr * (min(1.0, (self.frm_updates + 1) / warmup) if warmup else 1.0)

    def _frm_step(self, step: int, hq: torch.Tensor, restored: torch.Tensor, captions: list[str] | None) -> dict[str, float]:
        """The dynamic FRM's log terms, and every `frm_update_every` steps its preference step."""
        cfg, acc = self.cfg, self.acc
        with torch.no_grad():
            terms = {"frm_start_score": float(self.frm_start(restored, captions).mean())}
        if step % cfg.frm_update_every == 0:
            if captions is not None and acc.num_processes > 1:
                from accelerate.utils import gather_object

                captions = list(gather_object(captions))
            for group in self.frm_opt.param_groups:
                group["lr"] = self.frm_lr_now()
            with autocast(acc.device, self.precision):
                frm_loss, frm_acc = preference_step(
                    self.frm, self.frm_opt, acc.gather(hq), acc.gather(restored), cfg.frm_grad_clip, captions, cfg.frm_loss_weight
                )
            self.frm_updates += 1
            terms.update(frm_loss=frm_loss, frm_accuracy=frm_acc)
        return terms

    def log_row(self, step: int, terms: dict[str, float]) -> dict[str, Any]:
        """The first row a run writes also names the forms of its terms (fallbacks included)."""
        row = super().log_row(step, terms)
        if not self.logged_setup:
            row["setup"], self.logged_setup = self.setup, True
        return row

    def checkpoint_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"frm_updates": self.frm_updates}
        if self.frm_opt is not None:
            extra.update(frm=self.frm.state_dict(), frm_opt=self.frm_opt.state_dict())
        return extra

    def save_model(self, folder: Path) -> None:
        save_model(self.model, folder)

    def finish(self, run_dir: Path) -> None:
        self.model.save_lora(run_dir / LORA_FILE, base=self.cfg.model)
        if self.frm_opt is not None:
            self.frm.save_pretrained(run_dir / "frm_final")
        export_final(self.model, run_dir / "final")

    def results(self) -> dict[str, Any]:
        steps = self.model.config.sampling_steps
        frm = "frozen"
        if self.cfg.dynamic_frm:
            unlocked = sum(p.numel() for g in self.frm_opt.param_groups for p in g["params"])
            frm = f"dynamic (every {self.cfg.frm_update_every} steps, {unlocked} of {sum(p.numel() for p in self.frm.parameters())} weights unlocked)"
        return {
            "frm": "dynamic" if self.cfg.dynamic_frm else "frozen",
            "frm_updates": self.frm_updates,
            "frm_training": frm,
            "sampling_steps": steps,
            "trained_step": "the single step" if steps == 1 else f"one of the last {min(self.cfg.refl_last_steps, steps)} of {steps}",
            **self.setup,
        }


class ControlNetReflObjective(ReflObjective):
    """ReFL's loss on a DiffBIR model: the trained step is the ControlNet's (rc.trained_step) and
    the regulariser compares its control residuals with the frozen copy's."""

    BASE = "controlnet"

    def __init__(self, tuning: TunableControlNet, frm: FaceRewardModel, weights: ReflLossWeights, cfg: ReflConfig):
        super().__init__(tuning.model, frm, weights, cfg)
        self.tuning = tuning

    def regulariser_kind(self, configured: str) -> str:
        return "control_residuals" if configured == "output_latent" else configured

    def trained_step(self, lq: torch.Tensor, gen: torch.Generator | None) -> tuple[ReflStep, torch.Tensor]:
        return rc.trained_step(self.tuning, lq, self.model.steps, self.last_steps, gen)

    def regularised(self) -> object:
        return self.tuning


class ControlNetReflMethod(ReflMethod):
    """ReFL of a DiffBIR-kind model's ControlNet (whole or LoRA) on the shared loop; the data, the
    dynamic FRM and the step are ReflMethod's. `model` and `spec` come from `load_tunable_diffbir`."""

    def __init__(self, cfg: ReflConfig, model: DiffBIRRestorer, spec: ModelFile, on_start: Callable | None = None) -> None:
        super().__init__(cfg)
        self.loaded, self.spec, self.on_start = model, spec, on_start

    def build(self, ckpt: Path | None) -> None:
        cfg, device = self.cfg, self.acc.device
        model, self.loaded = self.loaded, None
        if cfg.sampling_steps is not None:
            model.configure(steps=cfg.sampling_steps)
        self.precision = "bf16" if uses_bf16(cfg, device) else "fp32"
        self.frm = load_frm(cfg.frm).eval().requires_grad_(False).to(device)
        self.tuning = build_tuning(model, cfg, device)
        self.model = model
        self.objective = ControlNetReflObjective(self.tuning, self.frm, cfg.losses, cfg).to(device)
        if ckpt is not None:
            load_state(self.tuning, ckpt / "model")
        self.trainable = self.tuning.parameters()
        self.opt = optimizer(self.trainable, cfg)
        self.build_judge()
        self.setup.update(
            tuned="the whole ControlNet" if cfg.lora_rank == 0 else f"LoRA rank {cfg.lora_rank} on the ControlNet",
            precision=f"{self.precision} (frozen parts {'bf16' if self.precision == 'bf16' else 'fp32'})",
            estimated_peak_memory=describe_memory(
                self.tuning, cfg.lora_rank, cfg.batch_size, cfg.face_size, "refl", *self.judges_in_memory()
            ),
        )
        if self.on_start is not None and self.acc.is_main_process:
            self.on_start({"estimated peak memory": self.setup["estimated_peak_memory"]})

    def save_model(self, folder: Path) -> None:
        save_state(self.tuning, folder)

    def finish(self, run_dir: Path) -> None:
        export_tuned(self.tuning, self.spec, self.cfg.model, run_dir, "refl", self.spec.preset)
        if self.frm_opt is not None:
            self.frm.save_pretrained(run_dir / "frm_final")


def train_refl(
    cfg: ReflConfig,
    run_dir: Path,
    device: str = "cpu",
    resume: bool = True,
    max_minutes: float | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_start: Callable[[dict[str, str]], None] | None = None,
) -> RunResult:
    """Fine-tune (or resume) with reward feedback; returns the run's summary.

    Writes run_dir/log.jsonl, run_dir/checkpoint (LoRA, optimizer, step, RNG and, with a dynamic
    FRM, its weights and optimizer), and when finished run_dir/lora.safetensors (for
    `restore --lora`), run_dir/final (merged, fp16) and, with a dynamic FRM, run_dir/frm_final.
    Several processes: `accelerate launch` or torchrun, each on its shard of the faces.

    A DiffBIR-kind `cfg.model` tunes its ControlNet instead (`ControlNetReflMethod`): the
    checkpoint holds the trainable ControlNet weights, and a finished run writes
    run_dir/controlnet.pth and run_dir/model.toml (for `restore --model`). `on_start` is told the
    run's setup (the estimated peak memory) before the first step.
    """
    loaded = load_tunable_diffbir(cfg.model)
    method = ControlNetReflMethod(cfg, *loaded, on_start=on_start) if loaded is not None else ReflMethod(cfg)
    return run_training(method, run_dir, device, resume, max_minutes, on_step)
