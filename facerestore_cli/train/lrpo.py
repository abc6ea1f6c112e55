"""LRPO: online reinforcement learning of the restorer with ground-truth likelihood regularisation.

One step of training:

1. Degrade a batch of ground-truth faces; encode each degraded face (the start state).
2. Group sampling: draw `group_size` restorations of every face with the restorer run as a
   stochastic sampler (models.sampler: `sampling_steps` DDIM steps with eta > 0, the last one a
   Gaussian around the predicted clean latent; one step = a Gaussian policy around the one-step
   output). Every transition's log-probability is kept.
3. Score each restoration with the composite reward (rewards.composite).
4. Advantages: reward minus its group's mean, divided by the standard deviation over the whole
   batch (all processes). Noise-level assignment: step k of a trajectory gets
   A * sigma_k / mean_k(sigma_k), sigma_k = sqrt(1 - alpha_bar(t_k)), clipped to +-advantage_clip.
5. PPO: loss = mean over steps of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) with
   ratio = pi(z_next | z_t) / pi_old(z_next | z_t), on LoRA weights of the UNet only (the encoder
   makes the start state and stays frozen, so the state the ratio is defined on does not move).
6. Ground-truth likelihood: on the `likelihood_steps` lowest-noise steps, the ground truth's
   latent z0 is noised straight from q(z_t | z0) (not by compounding step after step) and its
   DDIM posterior sample (or z0 itself for the last step) is the target whose log-probability
   under the policy is raised: loss += likelihood_weight * -log pi(target | z_t).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from facerestore_cli.data.degrade import DegradationConfig
from facerestore_cli.errors import InputError
from facerestore_cli.models.loading import load_tunable_restorer
from facerestore_cli.models.restorer import OneStepRestorer
from facerestore_cli.models.sampler import (
    CLEAN,
    Transition,
    ddim_posterior,
    gaussian_log_prob,
    sample_trajectories,
    step_distribution,
    transition_log_prob,
)
from facerestore_cli.rewards.composite import CompositeReward, RewardWeights
from facerestore_cli.rewards.frm import load_frm
from facerestore_cli.train.runner import (
    LORA_FILE,
    LoraTuningConfig,
    RunResult,
    TrainingMethod,
    degraded_pair,
    export_final,
    infinite,
    run_training,
    save_model,
    update,
    whole_face_loader,
)


@dataclass
class LrpoConfig(LoraTuningConfig):
    """Everything an LRPO run depends on; saved beside the checkpoints. Defaults are the paper's."""

    TABLES = {"rewards": RewardWeights, "degradation": DegradationConfig}
    KIND = "lrpo config"

    steps: int = 200
    #: degraded faces per step (per process); each is restored group_size times.
    batch_size: int = 2
    lr: float = 1e-6
    warmup_steps: int = 0
    log_every: int = 5
    checkpoint_every: int = 25
    group_size: int = 9
    #: 1: the one-step restorer with a Gaussian policy around its output; more: few-step DDIM.
    sampling_steps: int = 3
    eta: float = 1.0
    #: spread of the last transition (the Gaussian around the predicted clean latent), latent units.
    final_std: float = 0.05
    clip_range: float = 1e-4
    advantage_clip: float = 5.0
    noise_level_advantage: bool = True
    #: ground-truth likelihood regularisation; 0 switches it off.
    likelihood_weight: float = 1e-3
    likelihood_steps: int = 1
    quality_metric: str = "pyiqa:musiq"
    fidelity_metric: str = "encoder"
    rewards: RewardWeights = field(default_factory=RewardWeights)

    def validate(self) -> None:
        """One clear error per impossible setting."""
        super().validate()
        checks = [
            (self.group_size >= 2, f"group_size must be at least 2 (advantages compare restorations of one face), not {self.group_size}"),
            (self.sampling_steps >= 1, f"sampling_steps must be at least 1, not {self.sampling_steps}"),
            (self.sampling_steps == 1 or self.eta > 0, "eta must be > 0 with several sampling steps (eta 0 leaves no transition to score)"),
            (self.final_std > 0, f"final_std must be > 0, not {self.final_std}"),
            (self.clip_range > 0 and self.advantage_clip > 0, "clip_range and advantage_clip must be > 0"),
            (
                1 <= self.likelihood_steps <= self.sampling_steps,
                f"likelihood_steps must be between 1 and sampling_steps ({self.sampling_steps})",
            ),
            (self.likelihood_weight >= 0 and all(w >= 0 for w in asdict(self.rewards).values()), "weights must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)


def group_advantages(rewards: torch.Tensor, batch_std: torch.Tensor | float | None = None, eps: float = 1e-6) -> torch.Tensor:
    """(faces, group) rewards -> advantages: minus the group mean, over the whole batch's std."""
    std = rewards.std() if batch_std is None else torch.as_tensor(batch_std)
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (std + eps)


def step_advantages(
    advantages: torch.Tensor, noise_levels: list[float], noise_level_weighting: bool = True, clip: float = 5.0
) -> list[torch.Tensor]:
    """Each step's advantage: scaled by sigma_t / mean sigma of the trajectory (when enabled), clipped."""
    mean = sum(noise_levels) / len(noise_levels)
    scales = [s / mean if noise_level_weighting else 1.0 for s in noise_levels]
    return [(advantages * w).clamp(-clip, clip) for w in scales]


def ppo_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (to minimise) and the share of samples whose ratio was clipped."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ((ratio - 1).abs() > clip_range).float().mean()


def ground_truth_targets(
    model: OneStepRestorer, z_gt: torch.Tensor, t: int, t_prev: int, eta: float, gen: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(state, target) for the likelihood term at one step, both drawn from the ground truth directly.

    state  ~ q(z_t | z0) = N(sqrt(a) z0, 1 - a)
    target ~ DDIM posterior q(z_prev | z_t, z0) with the policy's own std, or z0 at the last step.
    """

    def noise() -> torch.Tensor:
        return torch.randn(z_gt.shape, generator=gen).to(z_gt.device)

    z0 = z_gt.float()
    a = model.alpha_bar(t, 1, z0.device)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise()
    if t_prev == CLEAN:
        return z_t, z0
    mean, std = ddim_posterior(model, z_t, z0, t, t_prev, eta)
    return z_t, mean + std * noise()


class LrpoObjective(torch.nn.Module):
    """The policy's loss for one batch of sampled trajectories (one forward, so DDP can wrap it)."""

    def __init__(self, model: OneStepRestorer, cfg: LrpoConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(
        self, path: list[Transition], advantages: list[torch.Tensor], likelihood_states: list[tuple[int, int, torch.Tensor, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        cfg, terms = self.cfg, {}
        policy, clipped, kl = [], [], []
        for step, adv in zip(path, advantages):
            log_prob = transition_log_prob(self.model, step, cfg.eta, cfg.final_std)
            loss, frac = ppo_loss(log_prob, step.log_prob, adv, cfg.clip_range)
            policy.append(loss)
            clipped.append(frac)
            kl.append((step.log_prob - log_prob).mean().detach())
        terms["policy"] = torch.stack(policy).mean()
        terms["clip_fraction"] = torch.stack(clipped).mean()
        terms["approx_kl"] = torch.stack(kl).mean()
        total = terms["policy"]
        if likelihood_states:
            nll = []
            for t, t_prev, z_t, target in likelihood_states:
                dist = step_distribution(self.model, z_t, t, t_prev, cfg.eta, cfg.final_std)
                nll.append(-gaussian_log_prob(target, dist.mean, max(dist.std, 1e-8)).mean())
            terms["likelihood"] = torch.stack(nll).mean()
            total = total + cfg.likelihood_weight * terms["likelihood"]
        terms["total"] = total
        return terms


def build_lrpo(cfg: LrpoConfig, device: torch.device | str = "cpu") -> tuple[OneStepRestorer, CompositeReward]:
    """The base restorer in the configured sampling mode with fresh UNet LoRA (base frozen), and the reward."""
    model = load_tunable_restorer(cfg.model).train()
    if cfg.face_size % model.size_multiple:
        raise InputError(f"face_size {cfg.face_size} must be a multiple of {model.size_multiple} for this model")
    model.config.sampling_steps = cfg.sampling_steps
    model.config.validate()  # the steps must fit below the model's timestep
    frm = load_frm(cfg.frm, device).eval().requires_grad_(False) if cfg.rewards.frm else None
    reward = CompositeReward(cfg.rewards, frm, model.vae.encoder, cfg.quality_metric, cfg.fidelity_metric, cfg.wavelet_levels)
    model.add_lora(rank_unet=cfg.lora_rank, rank_vae=0, alpha=cfg.lora_alpha)
    model.freeze_base()
    return model.to(device), reward


class LrpoMethod(TrainingMethod):
    """LRPO as a `run_training` method: group sampling, advantages over all processes, PPO and the
    likelihood term on UNet LoRA. Its log lines hold the means since the last line."""

    rate_key = "restorations_per_s"

    def __init__(self, cfg: LrpoConfig, on_start: Callable[[list[str]], None] | None = None) -> None:
        super().__init__(cfg)
        self.on_start = on_start
        self.window: dict[str, list[float]] = {}

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
        loader = whole_face_loader(cfg.data, cfg.batch_size, cfg.min_sharpness, cfg.num_workers)
        self.objective, self.opt, loader = acc.prepare(LrpoObjective(self.model, cfg), self.opt, loader)
        self.gen = torch.Generator().manual_seed(cfg.seed * 100003 + step * 7919 + acc.process_index)
        self.batches = infinite(loader)

    def train_step(self, step: int) -> tuple[dict[str, float], int]:
        cfg, acc = self.cfg, self.acc
        hq, lq = degraded_pair(next(self.batches).to(acc.device), cfg.face_size, cfg.degradation, self.gen)
        scores, path, likelihood_states = rollout(self.model, self.reward, cfg, lq, hq, self.gen)
        rewards = scores["total"].to(acc.device).view(hq.shape[0], cfg.group_size)
        adv = group_advantages(rewards, acc.gather(rewards).std()).flatten()
        per_step = step_advantages(adv, [s.noise_level for s in path], cfg.noise_level_advantage, cfg.advantage_clip)
        self.set_lr(step)
        losses = self.objective(path, per_step, likelihood_states)
        update(acc, self.opt, losses["total"], self.trainable, cfg.grad_clip)
        terms = {k: float(v.detach()) for k, v in losses.items()}
        terms.update({f"reward_{k}": float(v.mean()) for k, v in scores.items()})
        terms["reward_std"] = float(rewards.std())
        for k, v in terms.items():
            self.window.setdefault(k, []).append(v)
        return terms, rewards.numel()

    def log_row(self, step: int, terms: dict[str, float]) -> dict[str, Any]:
        """The mean since the last line: one batch's reward says more about its faces than the policy."""
        means = {k: round(sum(v) / len(v), 6) for k, v in self.window.items()}
        self.window.clear()
        return means

    def save_model(self, folder: Path) -> None:
        save_model(self.model, folder)

    def finish(self, run_dir: Path) -> None:
        self.model.save_lora(run_dir / LORA_FILE)
        export_final(self.model, run_dir / "final")

    def results(self) -> dict[str, Any]:
        return {"sampling_steps": self.cfg.sampling_steps, "rewards": self.reward.report()}


def train_lrpo(
    cfg: LrpoConfig,
    run_dir: Path,
    device: str = "cpu",
    resume: bool = True,
    max_minutes: float | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_start: Callable[[list[str]], None] | None = None,
) -> RunResult:
    """Fine-tune (or resume) with LRPO; returns the run's summary.

    Writes run_dir/log.jsonl (every `log_every` steps, the means since the last line of the reward,
    its components, the policy and likelihood terms), run_dir/rewards.txt,
    run_dir/checkpoint, and when finished run_dir/lora.safetensors (for `restore --lora`; it
    carries the sampling steps) and run_dir/final (merged, fp16). `on_start` gets the reward's
    component report (what counts, what was dropped and why). Several processes: `accelerate launch`
    or torchrun; each samples its own faces, advantages use the standard deviation over all.
    """
    return run_training(LrpoMethod(cfg, on_start), run_dir, device, resume, max_minutes, on_step)


@torch.no_grad()
def rollout(
    model: OneStepRestorer, reward: CompositeReward, cfg: LrpoConfig, lq: torch.Tensor, hq: torch.Tensor, gen: torch.Generator
) -> tuple[dict[str, torch.Tensor], list[Transition], list]:
    """Group sampling and scoring for one batch (images in [0, 1]), plus the likelihood term's states."""
    z_lq, skips = model.encode_with_skips(lq * 2 - 1)
    z_start = z_lq.float().repeat_interleave(cfg.group_size, 0)
    skips = [s.repeat_interleave(cfg.group_size, 0) for s in skips] if skips is not None else None
    z0, path = sample_trajectories(model, z_start, cfg.sampling_steps, cfg.eta, cfg.final_std, gen)
    restored = (model.decode(z0, skips=skips).float() + 1) / 2
    scores = reward(restored, hq.repeat_interleave(cfg.group_size, 0))
    likelihood_states = []
    if cfg.likelihood_weight > 0:
        z_gt = model.encode(hq * 2 - 1).float()
        for step in path[-cfg.likelihood_steps :]:
            likelihood_states.append((step.t, step.t_prev, *ground_truth_targets(model, z_gt, step.t, step.t_prev, cfg.eta, gen)))
    return scores, path, likelihood_states
