"""LRPO: online reinforcement learning of the restorer with ground-truth likelihood regularisation,
as the paper's code does it (TRAINING.md, LRPO table).

One runner step is an epoch: `rounds_per_epoch` sampling rounds (steps 1-3; the paper's 12), then
the policy's optimizer steps on each round in turn (4-6):

1. Degrade a batch of ground-truth faces; encode each degraded face (the start state).
2. Group sampling: draw `group_size` restorations of every face with the restorer run as a
   stochastic DDIM sampler over its own steps (models.sampler: `sampling_steps` steps with
   eta = 1, the last one a Gaussian of std `final_std` around the predicted clean latent; one
   step = a Gaussian policy around the one-step output). Every transition's log-probability
   (mean over dimensions) is kept.
3. Score each restoration with the composite reward (rewards.composite).
4. Advantages: per group, (r - group mean) / (std over every sample of the epoch, all processes,
   + 1e-4); samples whose advantage is exactly 0 are dropped. Noise-level assignment: step j gets
   A_j = clip(A w_j, -5, 5), w_j = sigma_j / mean(sigma), sigma DDIM's at eta = 1 in sampling order.
5. PPO, one optimizer step after every trained timestep (the first `timestep_fraction` of the
   steps), so later timesteps of the same rollout see a moved policy and the ratio
   exp(logp_new - logp_old) leaves 1: loss = mean(max(-A r, -A clip(r, 1 -+ eps))).
6. Ground-truth likelihood on the last `likelihood_steps` (5) trained steps:
   reg = mean_b[1 - exp(mean_dims log N(g_prev; mu_theta(g_t), sigma_t^2) / 40)], total = policy +
   `likelihood_weight` (1e-3) reg; see `ground_truth_trajectory` for how the LQ conditions it.

The config and these shared functions live in train/lrpo_core.py (re-exported here). A DiffBIR-kind
`--model` is trained as the paper does, its ControlNet the policy (train/lrpo_controlnet.py);
`train_lrpo` picks the method from the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from facerestore_cli.errors import InputError
from facerestore_cli.models.loading import load_tunable_diffbir, load_tunable_restorer
from facerestore_cli.models.restorer import OneStepRestorer
from facerestore_cli.models.sampler import (
    Transition,
    gaussian_log_prob,
    sample_trajectories,
    step_distribution,
    transition_log_prob,
)
from facerestore_cli.rewards.composite import CompositeReward
from facerestore_cli.train.lrpo_controlnet import ControlNetLrpoMethod
from facerestore_cli.train.lrpo_core import (
    ADVANTAGE_EPS,
    LIKELIHOOD_TEMPERATURE,
    ONE_STEP_SAMPLING_STEPS,
    GroupPolicyMethod,
    LrpoConfig,
    composite_reward,
    frm_captions,
    ground_truth_trajectory,
    group_advantages,
    group_captions,
    likelihood_regulariser,
    noise_level_weights,
    ppo_loss,
    step_advantages,
    trained_steps,
)
from facerestore_cli.train.runner import (
    LORA_FILE,
    RunResult,
    describe_captions,
    export_final,
    run_training,
    save_model,
    whole_face_batches,
)

#: the shared parts (train/lrpo_core.py) are importable from here too, as before they moved.
__all__ = [
    "ADVANTAGE_EPS",
    "LIKELIHOOD_TEMPERATURE",
    "ControlNetLrpoMethod",
    "LrpoConfig",
    "LrpoMethod",
    "LrpoObjective",
    "build_lrpo",
    "ground_truth_trajectory",
    "group_advantages",
    "likelihood_regulariser",
    "noise_level_weights",
    "ppo_loss",
    "rollout",
    "step_advantages",
    "train_lrpo",
    "trained_steps",
]


class LrpoObjective(torch.nn.Module):
    """The loss of one trained timestep of a batch of trajectories (one forward, so DDP can wrap it)."""

    def __init__(self, model: OneStepRestorer, cfg: LrpoConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(
        self, step: Transition, advantages: torch.Tensor, ground_truth: tuple[torch.Tensor, torch.Tensor] | None = None, scale: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """`scale` 0 keeps a process with no sample to train in step with the others (DDP) without moving anything."""
        cfg = self.cfg
        log_prob = transition_log_prob(self.model, step, cfg.eta, cfg.final_std)
        policy, clipped = ppo_loss(log_prob, step.log_prob, advantages, cfg.clip_range)
        terms = {"policy": policy, "clip_fraction": clipped, "approx_kl": 0.5 * ((log_prob - step.log_prob) ** 2).mean().detach()}
        total = policy
        if ground_truth is not None:
            g_t, g_prev = ground_truth
            dist = step_distribution(self.model, g_t, step.t, step.t_prev, cfg.eta, cfg.final_std)
            terms["likelihood"] = likelihood_regulariser(gaussian_log_prob(g_prev, dist.mean, max(dist.std, 1e-8)))
            total = total + cfg.likelihood_weight * terms["likelihood"]
        terms["total"] = total * scale
        return terms


def build_lrpo(cfg: LrpoConfig, device: torch.device | str = "cpu") -> tuple[OneStepRestorer, CompositeReward]:
    """The base restorer in the configured sampling mode with fresh UNet LoRA (base frozen), and the reward."""
    if cfg.lora_rank == 0:
        raise InputError("lora_rank = 0 (the whole ControlNet) is for DiffBIR-kind models; a one-step restorer tunes LoRA (lora_rank >= 1)")
    model = load_tunable_restorer(cfg.model).train()
    if cfg.face_size % model.size_multiple:
        raise InputError(f"face_size {cfg.face_size} must be a multiple of {model.size_multiple} for this model")
    if cfg.sampling_steps is None:
        cfg.sampling_steps = ONE_STEP_SAMPLING_STEPS
    model.config.sampling_steps = cfg.sampling_steps
    model.config.validate()  # the steps must fit below the model's timestep
    reward = composite_reward(cfg, model.vae.encoder, device)
    model.add_lora(rank_unet=cfg.lora_rank, rank_vae=0, alpha=cfg.lora_alpha)
    model.freeze_base()
    return model.to(device), reward


class LrpoMethod(GroupPolicyMethod):
    """LRPO of a one-step restorer's UNet LoRA (its few-step sampling mode) as a `run_training`
    method; the round, advantages and inner optimizer steps are `GroupPolicyMethod`'s."""

    def __init__(self, cfg: LrpoConfig, on_start: Callable[[list[str]], None] | None = None) -> None:
        super().__init__(cfg)
        self.on_start = on_start

    def build(self, ckpt: Path | None) -> None:
        cfg, acc = self.cfg, self.acc
        self.model, self.reward = build_lrpo(cfg, acc.device)
        if not self.reward.active:
            raise InputError("every reward component was dropped: " + "; ".join(self.reward.report()))
        if ckpt is not None:
            self.model.load_lora(ckpt / "model" / LORA_FILE)
        if self.on_start and acc.is_main_process:
            self.on_start(self.reward.report())
        self.trainable = self.model.lora_parameters()
        self.opt = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=0.0)

    def start(self, step: int) -> None:
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process:
            (self.run_dir / "rewards.txt").write_text("\n".join(self.reward.report()) + "\n")
        self.captions = frm_captions(cfg, self.reward)
        self.objective, self.opt = acc.prepare(LrpoObjective(self.model, cfg), self.opt)
        self.batches = whole_face_batches(cfg, acc, start_batch=step * cfg.rounds_per_epoch, captions=self.captions)

    def sample(self, lq: torch.Tensor, hq: torch.Tensor, captions: list[str] | None) -> tuple[dict, list[Transition], list, Any]:
        scores, path, ground_truth = rollout(self.model, self.reward, self.cfg, lq, hq, self.gen, captions)
        return scores, path, ground_truth, None

    def step_losses(
        self, step: Transition, advantages: torch.Tensor, ground_truth: tuple | None, rows: torch.Tensor, scale: float, context: Any
    ) -> dict[str, torch.Tensor]:
        return self.objective(step, advantages, ground_truth, scale)

    def save_model(self, folder: Path) -> None:
        save_model(self.model, folder)

    def finish(self, run_dir: Path) -> None:
        self.model.save_lora(run_dir / LORA_FILE, base=self.cfg.model)
        export_final(self.model, run_dir / "final")

    def results(self) -> dict[str, Any]:
        return {
            "sampling_steps": self.cfg.sampling_steps,
            "optimizer_steps": self.optimizer_steps,
            "reward_weights": {k: round(w, 4) for k, w in self.reward.active.items()},
            "rewards": self.reward.report(),
            "captions": describe_captions(self.captions),
        }


def train_lrpo(
    cfg: LrpoConfig,
    run_dir: Path,
    device: str = "cpu",
    resume: bool = True,
    max_minutes: float | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_start: Callable[[list[str]], None] | None = None,
    on_setup: Callable[[dict[str, str]], None] | None = None,
) -> RunResult:
    """Fine-tune (or resume) with LRPO; returns the run's summary.

    Writes run_dir/log.jsonl (every `log_every` steps, the means since the last line of the reward,
    its components, the policy and likelihood terms, approx_kl and clip_fraction), run_dir/rewards.txt,
    run_dir/checkpoint (LoRA, optimizer state, optimizer step count), and when finished
    run_dir/lora.safetensors (for `restore --lora`; it carries the sampling steps) and
    run_dir/final (merged, fp16). `on_start` gets the reward's component report (judges, fallbacks,
    what was dropped and why, renormalisation). Several processes: `accelerate launch` or
    torchrun; each samples its own faces, advantages use the standard deviation over all.

    A DiffBIR-kind `cfg.model` (a diffbir-v1 model file or store name) tunes its ControlNet
    instead (`ControlNetLrpoMethod`, train/lrpo_controlnet.py): the checkpoint holds the trainable
    ControlNet weights, and a finished run writes run_dir/controlnet.pth and run_dir/model.toml
    (for `restore --model`). `on_setup` is told its setup (the estimated peak memory) first.
    """
    loaded = load_tunable_diffbir(cfg.model)
    method = LrpoMethod(cfg, on_start) if loaded is None else ControlNetLrpoMethod(cfg, *loaded, on_start=on_start, on_setup=on_setup)
    return run_training(method, run_dir, device, resume, max_minutes, on_step)


@torch.no_grad()
def rollout(
    model: OneStepRestorer,
    reward: CompositeReward,
    cfg: LrpoConfig,
    lq: torch.Tensor,
    hq: torch.Tensor,
    gen: torch.Generator,
    captions: list[str] | None = None,
) -> tuple[dict[str, torch.Tensor], list[Transition], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Group sampling and scoring for one batch (images in [0, 1]), plus each sample's
    ground-truth trajectory (empty when the likelihood term is off)."""
    z_lq, skips = model.encode_with_skips(lq * 2 - 1)
    z_start = z_lq.float().repeat_interleave(cfg.group_size, 0)
    skips = [s.repeat_interleave(cfg.group_size, 0) for s in skips] if skips is not None else None
    z0, path = sample_trajectories(model, z_start, cfg.sampling_steps, cfg.eta, cfg.final_std, gen)
    restored = (model.decode(z0, skips=skips).float() + 1) / 2
    scores = reward(restored, hq.repeat_interleave(cfg.group_size, 0), group_captions(captions, cfg.group_size))
    ground_truth = []
    if cfg.likelihood_weight > 0:
        z_gt = model.encode(hq * 2 - 1).float().repeat_interleave(cfg.group_size, 0)
        ground_truth = ground_truth_trajectory(model, z_start, z_gt, path, cfg.eta, gen)
    return scores, path, ground_truth
