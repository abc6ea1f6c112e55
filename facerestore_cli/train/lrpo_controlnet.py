"""LRPO on a DiffBIR-kind model: its ControlNet is the policy, as the paper trains it (TRAINING.md,
LRPO table). SwinIR, the SD 2.1 UNet and the VAE stay frozen; the ControlNet trains whole
(`lora_rank = 0`, the paper) or as LoRA on it (`lora_rank` > 0, to fit one GPU).

The policy is DDIM at eta = 1 over the model's own steps (`sampling_steps`, default the base's):
from x_T ~ N(0, I), each transition x_t -> x_prev is the Gaussian N(mu_theta(x_t, c_img), sigma_t^2)
with eps from the ControlNet + UNet, x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) and DDIM's posterior

    sigma_t = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a'),   mu = sqrt(a') x0 + sqrt(1 - a' - sigma_t^2) eps

(models.sampler.ddim_posterior; a' = alphas_cumprod[t - T / steps], alphas_cumprod[0] below 0, as
diffusers' DDIM with DiffBIR's spacing ends), its log-prob the mean over dimensions. One runner
step: degrade a batch; stage 1 + VAE give c_img = c_LQ; `group_size` trajectories per LQ are drawn
without gradient, decoded, colour-fixed against the stage-1 output as at inference and scored by
the composite reward against the GT; then the advantages, noise-level weights, PPO with one
optimizer step per trained timestep (the log-prob recomputed with gradient, so the ratio leaves 1
after the first) and the GT likelihood on the last `likelihood_steps` trained steps, all the
shared functions of train/lrpo_core.py. The GT term is the paper's form with the LQ in the
condition: reg = mean_b[1 - exp(mean log N(g_prev; mu_theta(g_t, c_LQ), sigma_t^2) / 40)], g the
GT latent noised along the same timesteps (`ground_truth_trajectory` from the GT noised to t_1
with the rollout's own x_T, each next state from DDIM's posterior given the GT).

Memory for one GPU: on CUDA with `precision = "bf16"` the frozen parts are bf16 and the step runs
under bf16 autocast; `gradient_checkpointing` covers the UNet and the ControlNet;
`optimizer = "adamw8bit"` takes bitsandbytes' 8-bit AdamW. The estimated peak is reported first.
A finished run writes RUN/controlnet.pth (merged, the upstream flat layout) and RUN/model.toml
(diffbir-v1 on the base's SD and SwinIR, preset "lrpo", `[meta] base`) for `restore --model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from facerestore_cli.errors import InputError
from facerestore_cli.models.color import color_fix
from facerestore_cli.models.diffbir import COLOR_FIX, DiffBIRRestorer, SamplerSettings, make_scheduler
from facerestore_cli.models.model_file import ModelFile
from facerestore_cli.models.sampler import Transition, ddim_posterior, ddim_sigma, gaussian_log_prob
from facerestore_cli.rewards.composite import CompositeReward
from facerestore_cli.train.controlnet import (
    CONTROLNET_FILE,
    MODEL_FILE,
    TunableControlNet,
    build_tuning,
    describe_memory,
    export_tuned,
    load_state,
    optimizer,
    save_state,
    uses_bf16,
)
from facerestore_cli.train.lrpo_core import (
    GroupPolicyMethod,
    LrpoConfig,
    composite_reward,
    frm_captions,
    ground_truth_trajectory,
    group_captions,
    likelihood_regulariser,
    ppo_loss,
    trained_steps,
)
from facerestore_cli.train.runner import autocast, describe_captions, whole_face_batches

#: The tuned ControlNet's file in a finished run, the model file naming it, and its sampler preset.
CONTROLNET_FILE, MODEL_FILE, PRESET = CONTROLNET_FILE, MODEL_FILE, "lrpo"


class DiffBIRPolicy:
    """DDIM's transitions of a tuned DiffBIR model at `eta`, over `steps` of its schedule: what
    models.sampler's shared maths (ddim_posterior, ddim_sigma) needs (`alpha_bar`) plus the mean."""

    def __init__(self, tuning: TunableControlNet, steps: int, eta: float = 1.0) -> None:
        self.tuning, self.model, self.eta = tuning, tuning.model, eta
        sched = make_scheduler(SamplerSettings("ddim", steps, 0.0), self.model.scheduler_config)
        self.alphas = sched.alphas_cumprod.float()
        stride = int(sched.config.num_train_timesteps) // steps
        # below t = 0 DiffBIR's DDIM takes alphas_cumprod[0] (set_alpha_to_one False): t_prev 0 here
        self.timesteps = [(int(t), max(int(t) - stride, 0)) for t in sched.timesteps]

    def alpha_bar(self, t: int | Tensor, batch: int, device: torch.device) -> Tensor:
        return self.alphas[max(int(t), 0)].to(device).reshape(1, 1, 1, 1)

    def distribution(self, z_t: Tensor, c_img: Tensor, t: int, t_prev: int) -> tuple[Tensor, float]:
        """(mu_theta(z_t, c_img), sigma_t) of the move t -> t_prev; with gradient when enabled."""
        eps = self.model.predict_noise(z_t, c_img, torch.tensor(t, device=z_t.device)).float()
        a = self.alpha_bar(t, 1, z_t.device)
        x0 = (z_t.float() - (1 - a).sqrt() * eps) / a.sqrt()
        return ddim_posterior(self, z_t, x0, t, t_prev, self.eta)

    def log_prob(self, z_next: Tensor, z_t: Tensor, c_img: Tensor, t: int, t_prev: int) -> Tensor:
        """log pi(z_next | z_t, c_img), the mean over dimensions (B,)."""
        mean, std = self.distribution(z_t, c_img, t, t_prev)
        return gaussian_log_prob(z_next, mean, max(std, 1e-8))


@dataclass
class Rollout:
    """One sampling round: the transitions, each sample's condition, the GT's trajectory, the scores."""

    path: list[Transition]
    c_img: Tensor
    ground_truth: list[tuple[Tensor, Tensor]]
    scores: dict[str, Tensor]


@torch.no_grad()
def rollout(
    policy: DiffBIRPolicy,
    reward: CompositeReward,
    cfg: LrpoConfig,
    lq: Tensor,
    hq: Tensor,
    gen: torch.Generator,
    captions: list[str] | None = None,
) -> Rollout:
    """Group sampling and scoring for one batch (images in [0, 1]), plus each sample's GT trajectory
    (empty when the likelihood term is off)."""
    model, g = policy.model, cfg.group_size
    cond = model.stage1_image(lq * 2 - 1)
    c_img = model.encode_condition(cond).float().repeat_interleave(g, 0)
    z = x_t = model.initial_noise(c_img, gen)
    path = []
    for t, t_prev in policy.timesteps:
        mean, std = policy.distribution(z, c_img, t, t_prev)
        z_next = mean + std * torch.randn(z.shape, generator=gen).to(z.device)
        log_prob = gaussian_log_prob(z_next, mean, max(std, 1e-8))
        path.append(Transition(t, t_prev, z, z_next, log_prob, std, ddim_sigma(policy, t, t_prev, 1.0)))
        z = z_next
    restored = color_fix(model.decode(z), cond.repeat_interleave(g, 0), COLOR_FIX)
    scores = reward((restored.float() + 1) / 2, hq.repeat_interleave(g, 0), group_captions(captions, g))
    ground_truth = []
    if cfg.likelihood_weight > 0:
        z_gt = model.encode_condition(hq * 2 - 1).float().repeat_interleave(g, 0)
        a = policy.alpha_bar(path[0].t, 1, z.device)
        g_start = a.sqrt() * z_gt + (1 - a).sqrt() * x_t
        ground_truth = ground_truth_trajectory(policy, g_start, z_gt, path, cfg.eta, gen)
    return Rollout(path, c_img, ground_truth, scores)


def step_loss(
    policy: DiffBIRPolicy, cfg: LrpoConfig, step: Transition, c_img: Tensor, advantages: Tensor, ground_truth: tuple[Tensor, Tensor] | None
) -> dict[str, Tensor]:
    """One trained timestep's loss: PPO on the recomputed log-prob, plus the GT likelihood term."""
    log_prob = policy.log_prob(step.z_next, step.z_t, c_img, step.t, step.t_prev)
    loss, clipped = ppo_loss(log_prob, step.log_prob, advantages, cfg.clip_range)
    terms = {"policy": loss, "clip_fraction": clipped, "approx_kl": 0.5 * ((log_prob - step.log_prob) ** 2).mean().detach()}
    terms["ratio_deviation"] = (torch.exp(log_prob - step.log_prob) - 1).abs().max().detach()
    total = loss
    if ground_truth is not None:
        g_t, g_prev = ground_truth
        terms["likelihood"] = likelihood_regulariser(policy.log_prob(g_prev, g_t, c_img, step.t, step.t_prev))
        total = total + cfg.likelihood_weight * terms["likelihood"]
    terms["total"] = total
    return terms


class ControlNetLrpoMethod(GroupPolicyMethod):
    """LRPO of a DiffBIR-kind model's ControlNet on the shared loop. `model` and `spec` come from
    `load_tunable_diffbir`. Its log lines hold the means since the last line."""

    #: the tuned ControlNet is not wrapped by accelerate: its gradients are averaged here.
    average_gradients = True

    def __init__(
        self,
        cfg: LrpoConfig,
        model: DiffBIRRestorer,
        spec: ModelFile,
        on_start: Callable[[list[str]], None] | None = None,
        on_setup: Callable[[dict[str, str]], None] | None = None,
    ) -> None:
        super().__init__(cfg)
        self.loaded, self.spec, self.on_start, self.on_setup = model, spec, on_start, on_setup

    def build(self, ckpt: Path | None) -> None:
        cfg, acc = self.cfg, self.acc
        model, self.loaded = self.loaded, None
        if cfg.sampling_steps is None:
            cfg.sampling_steps = model.steps  # the base's own (its preset's)
        if cfg.eta <= 0:
            raise InputError(f"eta must be > 0 for a DiffBIR policy (eta 0 leaves no transition to score), not {cfg.eta}")
        model.configure(sampler="ddim", steps=cfg.sampling_steps, eta=cfg.eta)
        self.precision = "bf16" if uses_bf16(cfg, acc.device) else "fp32"
        self.reward = composite_reward(cfg, model.vae.encoder, acc.device)  # before any cast: the judge copies the encoder
        if not self.reward.active:
            raise InputError("every reward component was dropped: " + "; ".join(self.reward.report()))
        self.tuning = build_tuning(model, cfg, acc.device)
        self.tuning.fixed = nn.Module()  # ReFL's frozen copy: LRPO has no residual regulariser
        self.policy = DiffBIRPolicy(self.tuning, cfg.sampling_steps, cfg.eta)
        if ckpt is not None:
            load_state(self.tuning, ckpt / "model")
        self.trainable = self.tuning.parameters()
        self.opt = optimizer(self.trainable, cfg)
        self.setup = {
            "tuned": "the whole ControlNet" if cfg.lora_rank == 0 else f"LoRA rank {cfg.lora_rank} on the ControlNet",
            "policy": f"DDIM {cfg.sampling_steps} steps, eta {cfg.eta}, {trained_steps(cfg.sampling_steps, cfg.timestep_fraction)} trained",
            "precision": f"{self.precision} (frozen parts {'bf16' if self.precision == 'bf16' else 'fp32'})",
            "estimated peak memory": describe_memory(
                self.tuning, cfg.lora_rank, cfg.batch_size * cfg.group_size, cfg.face_size, judges=self.reward.networks()
            ),
        }
        if acc.is_main_process:
            if self.on_setup:
                self.on_setup(self.setup)
            if self.on_start:
                self.on_start(self.reward.report())

    def start(self, step: int) -> None:
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process:
            (self.run_dir / "rewards.txt").write_text("\n".join(self.reward.report()) + "\n")
        self.captions = frm_captions(cfg, self.reward)
        self.opt = acc.prepare(self.opt)
        self.batches = whole_face_batches(cfg, acc, start_batch=step * cfg.rounds_per_epoch, captions=self.captions)

    def sample(self, lq: Tensor, hq: Tensor, captions: list[str] | None) -> tuple[dict, list[Transition], list, Any]:
        with autocast(self.acc.device, self.precision):
            got = rollout(self.policy, self.reward, self.cfg, lq, hq, self.gen, captions)
        return got.scores, got.path, got.ground_truth, got.c_img

    def step_losses(
        self, step: Transition, advantages: Tensor, ground_truth: tuple | None, rows: Tensor, scale: float, c_img: Tensor
    ) -> dict[str, Tensor]:
        with autocast(self.acc.device, self.precision):
            losses = step_loss(self.policy, self.cfg, step, c_img[rows], advantages, ground_truth)
        return losses | {"total": losses["total"] * scale}

    def save_model(self, folder: Path) -> None:
        save_state(self.tuning, folder)

    def finish(self, run_dir: Path) -> None:
        export_tuned(self.tuning, self.spec, self.cfg.model, run_dir, "lrpo", PRESET)

    def results(self) -> dict[str, Any]:
        return {
            "tuned": self.setup["tuned"],
            "sampling_steps": self.cfg.sampling_steps,
            "optimizer_steps": self.optimizer_steps,
            "estimated_peak_memory": self.setup["estimated peak memory"],
            "reward_weights": {k: round(w, 4) for k, w in self.reward.active.items()},
            "rewards": self.reward.report(),
            "captions": describe_captions(self.captions),
        }
