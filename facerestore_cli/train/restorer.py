"""Training of the one-step restorer, in three stages (OSEDiff's recipe, at the project's scale).

1. `stage = "autoencoder"`: the VAE alone learns to reconstruct HQ faces (L1 + edge + a small KL),
   which is cheap (no UNet) and gives the latent space everything later builds on.
2. `stage = "prior"`: with the VAE frozen, the UNet learns to denoise HQ face latents at every
   noise level: a small latent diffusion model of faces, the stand-in for Stable Diffusion.
3. `stage = "restorer"`: starting from the prior, the encoder and the UNet step learn to map
   degraded faces to clean latents on pairs made on the fly by the batched degradation (full
   weights, or LoRA with `lora_rank`); the decoder stays frozen (`freeze`), as in OSEDiff. Losses:
   pixel L1 + edges, a perceptual term, and VSD against the frozen prior (`losses.vsd`), whose
   fake-score network is trained alongside on the generator's outputs.
4. Optionally, `skip_levels` on a finished restorer (`model` = its folder) adds skip fusion
   (models.skips: the input's encoder features offered to the decoder); with the encoder and
   UNet frozen, the decoder and the fusion learn to use them, so identity is kept beyond what
   the latent alone carries (configs/train_tiny_skips.toml).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from facerestore_cli.configfile import RunConfig
from facerestore_cli.data.crops import CropDataset
from facerestore_cli.data.degrade import DegradationConfig, Degrader
from facerestore_cli.errors import InputError
from facerestore_cli.models.color import color_fix_unclamped, parse_color_fix
from facerestore_cli.models.loading import load_model_for_training
from facerestore_cli.models.perceptual import EncoderPerceptualLoss
from facerestore_cli.models.restorer import OneStepRestorer
from facerestore_cli.train.losses import diffusion_loss, l1_and_edges, vsd_loss
from facerestore_cli.train.runner import (
    LORA_FILE,
    RunResult,
    TrainingMethod,
    autocast,
    export_final,
    face_batches,
    run_training,
    save_model,
    step_seed,
    update,
)


@dataclass
class LossWeights:
    restore_l1: float = 1.0
    restore_edge: float = 0.5
    #: LPIPS-style distance on frozen autoencoder-encoder features (losses.EncoderPerceptualLoss).
    perceptual: float = 0.0
    #: variational score distillation against the frozen latent prior (restorer stage).
    vsd: float = 0.0
    #: penalty on the output gate's mean |g| (skip level len(up blocks)), meant to keep the gate
    #: shut except where the input's own pixels beat the decoded ones by more than this; in the
    #: runs so far it lowered the gate on every face alike (benchmarks/RESULTS.md).
    gate: float = 0.0
    recon_l1: float = 1.0
    recon_edge: float = 0.5
    kl: float = 1e-6
    #: denoising loss of the prior stage.
    diffusion: float = 1.0


STAGES = ("autoencoder", "prior", "restorer")
PRECISIONS = ("fp32", "bf16")


@dataclass
class RestorerTrainConfig(RunConfig):
    """Everything a run depends on; saved beside the checkpoints so a run can be repeated."""

    TABLES = {"losses": LossWeights, "degradation": DegradationConfig}
    KIND = "training config"

    data: list[str] = field(default_factory=list)
    model: str = "tiny"
    stage: str = "restorer"
    freeze: list[str] = field(default_factory=list)
    steps: int = 2000
    batch_size: int = 8
    patch_size: int = 256
    #: each training face is shrunk by one of these factors first (data.crops.CropDataset): [1.0, 0.5]
    #: teaches the model the 256-px working size `restore --face-size auto` uses for small faces.
    scales: list[float] = field(default_factory=lambda: [1.0])
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
    #: restorer stage: the timestep the one UNet step reads the LQ latent at (None keeps the model's).
    timestep: int | None = None
    #: > 0: train LoRA adapters of this rank on the UNet and VAE encoder (merged at the end) instead of full weights.
    lora_rank: int = 0
    #: restorer stage: skip fusion at these decoder up blocks (models.skips; len(up blocks): the
    #: output gate), added to the model where it lacks them.
    skip_levels: list[int] = field(default_factory=list)
    #: VSD: timesteps the generated latent is noised to, and the fake-score network's learning rate.
    vsd_t_range: list[int] = field(default_factory=lambda: [20, 980])
    fake_score_lr: float = 1e-4
    #: restorer stage: the losses score the restoration after this colour fix (`restore
    #: --color-fix`), i.e. what `restore` delivers; "none" scores the raw decoder output.
    color_fix: str = "none"
    losses: LossWeights = field(default_factory=LossWeights)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise InputError(f"stage must be one of {', '.join(STAGES)}, not {self.stage!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.stage != "restorer" and (
            self.lora_rank or self.losses.vsd or self.losses.perceptual or self.losses.gate or self.timestep is not None or self.skip_levels
        ):
            raise InputError("lora_rank, timestep, skip_levels and the perceptual/vsd/gate losses belong to the restorer stage")
        parse_color_fix(self.color_fix)
        if self.stage != "restorer" and self.color_fix != "none":
            raise InputError("color_fix belongs to the restorer stage")
        if not self.scales or not all(0 < s <= 1 for s in self.scales):
            raise InputError(f"scales must be factors in (0, 1], not {self.scales!r}")


def unet_x0(model: OneStepRestorer, unet: torch.nn.Module, context: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clean-latent estimate of any UNet sharing the model's schedule (prior, fake score)."""
    out = unet(z_t, t, encoder_hidden_states=context.expand(z_t.shape[0], -1, -1)).sample
    return model.predict_x0(z_t, t, out)


class StageObjective(torch.nn.Module):
    """The model being trained plus the frozen networks its stage compares it with.

    `forward(lq, hq)` returns the weighted loss terms ('total' is their sum), so accelerate/DDP
    sees one forward per step. Images are in [-1, 1].
    """

    def __init__(self, model: OneStepRestorer, stage: str, weights: LossWeights, color_fix: str = "none"):
        super().__init__()
        self.model, self.stage, self.weights, self.color_fix = model, stage, weights, color_fix
        self.perceptual = EncoderPerceptualLoss(model.vae.encoder) if stage == "restorer" and weights.perceptual else None
        self.prior = None
        if stage == "restorer" and weights.vsd:
            # Frozen before any LoRA is added: the prior the generator started from.
            self.prior = copy.deepcopy(model.unet).eval().requires_grad_(False)
            self.register_buffer("context", model.prompt_embeds.detach().clone())
        self.last_latent: torch.Tensor | None = None

    def forward(self, lq: torch.Tensor, hq: torch.Tensor, fake_x0=None, t_range=(20, 980)) -> dict[str, torch.Tensor]:
        if self.stage == "autoencoder":
            terms = autoencoder_losses(self.model, hq)
        elif self.stage == "prior":
            terms = prior_losses(self.model, hq)
        else:
            terms = self._restorer_terms(lq, hq, fake_x0, t_range)
        terms["total"] = sum(getattr(self.weights, k) * v for k, v in terms.items())
        return terms

    def _restorer_terms(self, lq, hq, fake_x0, t_range) -> dict[str, torch.Tensor]:
        """LQ -> one step -> image, against HQ. Unclamped: a clamp would stop gradients at the limits."""
        z, restored = self.model.restore_one_step(lq)
        if self.color_fix != "none":
            restored = color_fix_unclamped(restored, lq, self.color_fix)
        l1, edge = l1_and_edges(restored, hq)
        terms = {"restore_l1": l1, "restore_edge": edge}
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(restored, hq)
        if self.prior is not None:

            def real_x0(z_t, t):
                return unet_x0(self.model, self.prior, self.context, z_t, t)

            terms["vsd"] = vsd_loss(z, real_x0, fake_x0, self.model.scheduler, tuple(t_range))
        if self.weights.gate:
            terms["gate"] = self.model.skip_fusion.output_gate.last_gate.abs().mean()
        self.last_latent = z.detach()
        return terms


class FakeScore(torch.nn.Module):
    """VSD's second network: a copy of the prior that keeps learning the generator's own outputs."""

    def __init__(self, model: OneStepRestorer, prior: torch.nn.Module):
        super().__init__()
        self.unet = copy.deepcopy(prior).train().requires_grad_(True)
        self.register_buffer("context", model.prompt_embeds.detach().clone())
        self.model = [model]  # for the schedule only; a list keeps it out of this module's parameters

    def forward(self, z0: torch.Tensor) -> torch.Tensor:
        model = self.model[0]

        def fn(z_t, t):
            return self.unet(z_t, t, encoder_hidden_states=self.context.expand(z_t.shape[0], -1, -1)).sample

        return diffusion_loss(fn, model.scheduler, z0.float())

    @torch.no_grad()
    def x0(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet_x0(self.model[0], self.unet, self.context, z_t, t)


def autoencoder_losses(model: OneStepRestorer, hq: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reconstruction of HQ faces (in [-1,1]) through the VAE alone."""
    dist = model.vae.encode(hq).latent_dist
    recon = model.vae.decode(dist.mode()).sample
    l1, edge = l1_and_edges(recon, hq)
    return {"recon_l1": l1, "recon_edge": edge, "kl": dist.kl().mean()}


def prior_losses(model: OneStepRestorer, hq: torch.Tensor) -> dict[str, torch.Tensor]:
    """The latent prior: the UNet learns to denoise HQ face latents at every noise level."""
    with torch.no_grad():
        z0 = model.encode(hq, sample=False)
    return {"diffusion": diffusion_loss(model.unet_output, model.scheduler, z0)}


def freeze_modules(model: torch.nn.Module, prefixes: list[str]) -> int:
    """Stop training every parameter under the given module names; returns how many were frozen."""
    frozen = 0
    for name, p in model.named_parameters():
        if any(name == f or name.startswith(f + ".") for f in prefixes):
            p.requires_grad_(False)
            frozen += p.numel()
    if prefixes and not frozen:
        raise InputError(f"freeze: no parameters under {', '.join(prefixes)}")
    return frozen


def _build_model(cfg: RestorerTrainConfig, ckpt: Path | None) -> tuple[OneStepRestorer, StageObjective]:
    """The model (from the checkpoint when resuming) and its stage objective, LoRA added last.

    With LoRA the checkpoint holds only the adapters: the frozen base is `cfg.model` itself.
    """
    model = load_model_for_training(cfg.model).train()
    if cfg.timestep is not None:
        model.config.timestep = cfg.timestep
    # Frozen references (prior, perceptual features) always come from the starting model.
    objective = StageObjective(model, cfg.stage, cfg.losses, cfg.color_fix)
    if ckpt is not None and not cfg.lora_rank:
        model = objective.model = load_model_for_training(str(ckpt / "model")).train()
    if cfg.skip_levels:
        model.add_skip_fusion(cfg.skip_levels)
    add_working_sizes(model, cfg.scales)
    if cfg.losses.gate and (model.skip_fusion is None or model.skip_fusion.output_gate is None):
        raise InputError(f"losses.gate needs the output gate: skip level {len(model.vae.decoder.up_blocks)} in skip_levels")
    freeze_modules(model, cfg.freeze)
    if cfg.lora_rank:
        model.add_lora(rank_unet=cfg.lora_rank, rank_vae=cfg.lora_rank)
        model.freeze_base()
        if ckpt is not None:
            model.load_lora(ckpt / "model" / LORA_FILE)
    return model, objective


def add_working_sizes(model: OneStepRestorer, scales: list[float]) -> None:
    """Record the smaller crop sizes training shows the model (`scales` < 1) in its config, so
    `restore --face-size auto` knows it may use them."""
    sizes = {round(model.config.face_size * s) for s in scales if s < 1}
    if not sizes - set(model.config.working_sizes):
        return
    model.config.working_sizes = sorted(set(model.config.working_sizes) | sizes)
    try:
        model.config.validate()
    except ValueError as err:
        raise InputError(f"scales {scales}: {err}") from None


class RestorerMethod(TrainingMethod):
    """The restorer's stages as a `run_training` method: the stage objective (plus VSD's fake
    score network) on crops degraded on the GPU."""

    def min_lr_ratio(self) -> float:
        return self.cfg.min_lr_ratio

    def build(self, ckpt: Path | None) -> None:
        cfg = self.cfg
        self.model, self.objective = _build_model(cfg, ckpt)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.fake = self.fake_opt = None
        if self.objective.prior is not None:
            self.fake = FakeScore(self.model, self.objective.prior)
            self.fake_opt = torch.optim.AdamW(self.fake.parameters(), lr=cfg.fake_score_lr)

    def resume(self, extra: dict[str, Any]) -> None:
        if self.fake is not None and "fake_score" in extra:
            self.fake.load_state_dict(extra["fake_score"])
            self.fake_opt.load_state_dict(extra["fake_score_opt"])

    def start(self, step: int) -> None:
        cfg, acc = self.cfg, self.acc
        data = CropDataset([Path(d) for d in cfg.data], patch_size=cfg.patch_size, min_sharpness=cfg.min_sharpness, scales=cfg.scales)
        self.objective, self.opt = acc.prepare(self.objective, self.opt)
        if self.fake is not None:
            self.fake, self.fake_opt = acc.prepare(self.fake, self.fake_opt)
        self.fake_x0 = acc.unwrap_model(self.fake).x0 if self.fake is not None else None
        self.degrader = Degrader(cfg.degradation, device=acc.device)  # seeded per step (train_step)
        self.batches = face_batches(data, cfg.batch_size, cfg.num_workers, cfg.seed, step, acc)  # a batch a step

    def train_step(self, step: int) -> tuple[dict[str, float], int]:
        cfg, acc = self.cfg, self.acc
        hq = next(self.batches).to(acc.device)
        # each step's degradations from its own seed (as lrpo draws its samples), so a resumed run
        # degrades step N's batch as the uninterrupted run did
        self.degrader.gen.manual_seed(step_seed(cfg.seed, step, acc.process_index))
        lq = self.degrader(hq)[0] if cfg.stage == "restorer" else hq
        with autocast(acc.device, cfg.precision):
            losses = self.objective(lq * 2 - 1, hq * 2 - 1, self.fake_x0, cfg.vsd_t_range)
        self.set_lr(step)
        update(acc, self.opt, losses["total"], self.trainable, cfg.grad_clip)
        if self.fake is not None:
            with autocast(acc.device, cfg.precision):
                losses["fake_score"] = self.fake(acc.unwrap_model(self.objective).last_latent)
            update(acc, self.fake_opt, losses["fake_score"], list(self.fake.parameters()), cfg.grad_clip)
        return {k: float(v.detach()) for k, v in losses.items()}, hq.shape[0]

    def checkpoint_extra(self) -> dict[str, Any]:
        if self.fake is None:
            return {}
        return {"fake_score": self.acc.unwrap_model(self.fake).state_dict(), "fake_score_opt": self.fake_opt.state_dict()}

    def save_model(self, folder: Path) -> None:
        save_model(self.model, folder)

    def finish(self, run_dir: Path) -> None:
        export_final(self.model, run_dir / "final")


def train_restorer(
    cfg: RestorerTrainConfig,
    run_dir: Path,
    device: str = "cpu",
    resume: bool = True,
    max_minutes: float | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> RunResult:
    """Train (or resume); the final model is saved in run_dir/final.

    Runs on one device, or on several with `accelerate launch` (each process gets its shard of
    every batch; only the main process writes logs and checkpoints).
    """
    return run_training(RestorerMethod(cfg), run_dir, device, resume, max_minutes, on_step)
