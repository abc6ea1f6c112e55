"""LRPO: online reinforcement learning of the restorer with ground-truth likelihood regularisation,
as the paper's code does it (TRAINING.md, LRPO table).

One runner step is one sampling round followed by the policy's optimizer steps:

1. Degrade a batch of ground-truth faces; encode each degraded face (the start state).
2. Group sampling: draw `group_size` restorations of every face with the restorer run as a
   stochastic DDIM sampler over its own steps (models.sampler: `sampling_steps` steps with
   eta = 1, the last one a Gaussian of std `final_std` around the predicted clean latent; one
   step = a Gaussian policy around the one-step output). Every transition's log-probability
   (mean over dimensions) is kept.
3. Score each restoration with the composite reward (rewards.composite).
4. Advantages: per group, (r - group mean) / (std over every sample of the round, all processes,
   + 1e-4); samples whose advantage is exactly 0 are dropped. Noise-level assignment: step j gets
   A_j = clip(A w_j, -5, 5), w_j = sigma_j / mean(sigma), sigma DDIM's at eta = 1 in sampling order.
5. PPO, one optimizer step after every trained timestep (the first `timestep_fraction` of the
   steps), so later timesteps of the same rollout see a moved policy and the ratio
   exp(logp_new - logp_old) leaves 1: loss = mean(max(-A r, -A clip(r, 1 -+ eps))).
6. Ground-truth likelihood on the last `likelihood_steps` (5) trained steps:
   reg = mean_b[1 - exp(mean_dims log N(g_prev; mu_theta(g_t), sigma_t^2) / 40)], total = policy +
   `likelihood_weight` (1e-3) reg; see `ground_truth_trajectory` for how the LQ conditions it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from facerestore_cli.data.degrade import DegradationConfig
from facerestore_cli.errors import FacerestoreError, InputError
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
from facerestore_cli.rewards.composite import CompositeReward, RewardSources, RewardWeights
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

#: the paper's advantage normaliser: the std over the round's samples plus this.
ADVANTAGE_EPS = 1e-4
#: the GT likelihood's temperature: 1 - exp(mean log N / 40).
LIKELIHOOD_TEMPERATURE = 40.0


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
    #: the share of the sampling steps trained, first ones first (the paper: 0.99 -> 49 of 50). 1.0 here:
    #: with 1-3 steps, 0.99 would drop the last step (or, in one-step mode, the only one).
    timestep_fraction: float = 1.0
    clip_range: float = 1e-4
    advantage_clip: float = 5.0
    noise_level_advantage: bool = True
    #: ground-truth likelihood regularisation; 0 switches it off.
    likelihood_weight: float = 1e-3
    #: on the last this many trained steps (all of them when fewer).
    likelihood_steps: int = 5
    #: each component's judge (rewards.composite.RewardSources): the paper's by default.
    fidelity_metric: str = "lpips-vgg"
    quality_metric: str = "clipiqa"
    structure_metric: str = "dtcwt"
    #: torchvision's VGG16 weights file (vgg16-397923af.pth): LPIPS-VGG's backbone.
    lpips_vgg_weights: str = ""
    #: LPIPS's linear layers; empty: the v0.1 vgg.pth inside the lpips package.
    lpips_linear_weights: str = ""
    #: an open_clip checkpoint of CLIP RN50 (OpenAI weights) for CLIP-IQA.
    clipiqa_weights: str = ""
    clipiqa_arch: str = "RN50-quickgelu"
    #: DTCWT levels of the structure term (the reward server's J = 3).
    dtcwt_levels: int = 3
    #: train without a missing reward component (remaining weights renormalised) or with a fallback judge.
    allow_missing_rewards: bool = False
    rewards: RewardWeights = field(default_factory=RewardWeights)

    def validate(self) -> None:
        """One clear error per impossible setting."""
        super().validate()
        checks = [
            (self.group_size >= 2, f"group_size must be at least 2 (advantages compare restorations of one face), not {self.group_size}"),
            (self.sampling_steps >= 1, f"sampling_steps must be at least 1, not {self.sampling_steps}"),
            (self.sampling_steps == 1 or self.eta > 0, "eta must be > 0 with several sampling steps (eta 0 leaves no transition to score)"),
            (self.final_std > 0, f"final_std must be > 0, not {self.final_std}"),
            (0 < self.timestep_fraction <= 1, f"timestep_fraction must be in (0, 1], not {self.timestep_fraction}"),
            (self.clip_range > 0 and self.advantage_clip > 0, "clip_range and advantage_clip must be > 0"),
            (
                self.likelihood_steps >= 1,
                f"likelihood_steps must be at least 1 (likelihood_weight = 0 switches the term off), not {self.likelihood_steps}",
            ),
            (self.dtcwt_levels >= 1, f"dtcwt_levels must be at least 1, not {self.dtcwt_levels}"),
            (self.likelihood_weight >= 0 and all(w >= 0 for w in asdict(self.rewards).values()), "weights must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    def reward_sources(self) -> RewardSources:
        return RewardSources(
            self.fidelity_metric,
            self.quality_metric,
            self.structure_metric,
            self.lpips_vgg_weights,
            self.lpips_linear_weights,
            self.clipiqa_weights,
            self.clipiqa_arch,
            self.dtcwt_levels,
            self.wavelet_levels,
            self.allow_missing_rewards,
        )


def trained_steps(sampling_steps: int, fraction: float) -> int:
    """How many steps of a trajectory are trained (the first ones): int(steps x fraction), at least 1."""
    return max(1, int(sampling_steps * fraction))


def group_advantages(rewards: torch.Tensor, round_std: torch.Tensor | float | None = None, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """(faces, group) rewards -> advantages: minus the group's mean, over the std of every sample of
    the round (`round_std`, gathered over processes; this batch's when None) + eps."""
    std = rewards.std(unbiased=False) if round_std is None else torch.as_tensor(round_std)
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (std + eps)


def noise_level_weights(sigmas: list[float]) -> list[float]:
    """w_j = sigma_j / mean(sigma) over the trajectory's steps in sampling order (all ones when every sigma is ~0)."""
    mean = sum(sigmas) / len(sigmas)
    return [1.0] * len(sigmas) if mean < 1e-6 else [s / mean for s in sigmas]


def step_advantages(
    advantages: torch.Tensor, noise_levels: list[float], noise_level_weighting: bool = True, clip: float = 5.0
) -> list[torch.Tensor]:
    """Each step's advantage: A_j = clip(A w_j, -clip, clip), w_j from `noise_level_weights` (when enabled)."""
    weights = noise_level_weights(noise_levels) if noise_level_weighting else [1.0] * len(noise_levels)
    return [(advantages * w).clamp(-clip, clip) for w in weights]


def ppo_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (to minimise) and the share of samples whose ratio was clipped."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ((ratio - 1).abs() > clip_range).float().mean()


@torch.no_grad()
def ground_truth_trajectory(
    model: OneStepRestorer, z_lq: torch.Tensor, z_gt: torch.Tensor, path: list[Transition], eta: float, gen: torch.Generator | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(g_t, g_prev) of every step of `path`: the ground truth's latent noised along the same timesteps.

    How the LQ conditions it: this restorer has no condition input besides its state (the prompt
    embedding is fixed); the LQ enters the policy as the start state, its latent read as z_t at
    the first timestep, and every later state descends from it. The GT term takes the same path:
    g_{t_1} = the LQ's latent (the policy's own first state; against the GT it is the GT noised
    with eps_LQ = (z_LQ - sqrt(a_1) z_GT) / sqrt(1 - a_1)), and each next state is drawn from DDIM's
    posterior q_sigma(g_prev | g_t, x0 = z_GT) with the policy's own sigma, so each g_t is the GT
    at that timestep's noise level and still carries the LQ; the last target is z_GT itself.
    The restorer's mean mu_theta(g_t) is then exactly its step from a state the LQ conditions,
    and the likelihood is highest when it predicts the GT from it. (DiffBIR's policy instead
    takes the LQ through its ControlNet and starts from noise; the paper's GT states there
    carry no LQ because the condition does.) In one-step mode the term is the likelihood of
    z_GT under the Gaussian around the restorer's output for the LQ.
    """
    g, out = z_lq.float(), []
    for step in path:
        if step.t_prev == CLEAN:
            out.append((g, z_gt.float()))
            break
        mean, std = ddim_posterior(model, g, z_gt.float(), step.t, step.t_prev, eta)
        noise = torch.randn(g.shape, generator=gen).to(g.device) if gen is not None else torch.randn_like(g)
        g_prev = mean + std * noise
        out.append((g, g_prev))
        g = g_prev
    return out


def likelihood_regulariser(log_prob: torch.Tensor, temperature: float = LIKELIHOOD_TEMPERATURE) -> torch.Tensor:
    """mean_b[1 - exp(mean_dims log N / temperature)]: bounded above by 1, so a far-off GT cannot dominate the policy."""
    return (1 - torch.exp(log_prob / temperature)).mean()


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
    model = load_tunable_restorer(cfg.model).train()
    if cfg.face_size % model.size_multiple:
        raise InputError(f"face_size {cfg.face_size} must be a multiple of {model.size_multiple} for this model")
    model.config.sampling_steps = cfg.sampling_steps
    model.config.validate()  # the steps must fit below the model's timestep
    frm, frm_missing = None, "weight 0"
    if cfg.rewards.frm:
        try:
            frm = load_frm(cfg.frm, device).eval().requires_grad_(False)
        except FacerestoreError as err:
            if not cfg.allow_missing_rewards:
                raise
            frm_missing = f"{cfg.frm}: {err}"
    reward = CompositeReward(cfg.rewards, frm, model.vae.encoder, sources=cfg.reward_sources(), frm_missing=frm_missing)
    model.add_lora(rank_unet=cfg.lora_rank, rank_vae=0, alpha=cfg.lora_alpha)
    model.freeze_base()
    return model.to(device), reward


class LrpoMethod(TrainingMethod):
    """LRPO as a `run_training` method: one sampling round per runner step, then one optimizer step
    per trained timestep (PPO and the likelihood term on UNet LoRA). Its log lines hold the means
    since the last line."""

    rate_key = "restorations_per_s"

    def __init__(self, cfg: LrpoConfig, on_start: Callable[[list[str]], None] | None = None) -> None:
        super().__init__(cfg)
        self.on_start = on_start
        self.window: dict[str, list[float]] = {}
        #: optimizer steps taken over the whole run (several per runner step).
        self.optimizer_steps = 0

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

    def resume(self, extra: dict[str, Any]) -> None:
        self.optimizer_steps = int(extra.get("optimizer_steps", 0))

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"optimizer_steps": self.optimizer_steps}

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
        scores, path, ground_truth = rollout(self.model, self.reward, cfg, lq, hq, self.gen)
        rewards = scores["total"].to(acc.device).view(hq.shape[0], cfg.group_size)
        adv = group_advantages(rewards, acc.gather(rewards).std(unbiased=False)).flatten()
        keep = torch.nonzero(adv != 0).flatten()
        kept_anywhere = int(acc.gather(torch.tensor([keep.numel()], device=acc.device)).sum())
        self.set_lr(step)
        # a round whose every sample scored alike in its group teaches nothing: no optimizer step
        inner = self.policy_updates(path, adv, keep, ground_truth) if kept_anywhere else {}
        terms = {"policy": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0} | ({"likelihood": 0.0} if cfg.likelihood_weight > 0 else {})
        terms.update({k: sum(v) / len(v) for k, v in inner.items()})
        terms.update({f"reward_{k}": float(v.mean()) for k, v in scores.items()})
        terms["reward_std"] = float(rewards.std())
        terms["kept_fraction"] = keep.numel() / adv.numel()
        terms["optimizer_steps"] = float(self.optimizer_steps)
        for k, v in terms.items():
            self.window.setdefault(k, []).append(v)
        return terms, rewards.numel()

    def policy_updates(
        self, path: list[Transition], adv: torch.Tensor, keep: torch.Tensor, ground_truth: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, list[float]]:
        """One optimizer step per trained timestep, in sampling order, on the kept samples; the
        ratio of step j is taken after the updates of steps < j, as in the paper's code."""
        cfg, acc = self.cfg, self.acc
        rows, scale = (keep, 1.0) if keep.numel() else (torch.arange(adv.numel(), device=adv.device), 0.0)
        per_step = step_advantages(adv, [s.noise_level for s in path], cfg.noise_level_advantage, cfg.advantage_clip)
        trained = trained_steps(len(path), cfg.timestep_fraction)
        likelihood_from = trained - min(cfg.likelihood_steps, trained)
        out: dict[str, list[float]] = {}
        for j in range(trained):
            gt = None
            if cfg.likelihood_weight > 0 and j >= likelihood_from:
                gt = tuple(g[rows] for g in ground_truth[j])
            losses = self.objective(path[j].rows(rows), per_step[j][rows], gt, scale)
            update(acc, self.opt, losses["total"], self.trainable, cfg.grad_clip)
            self.optimizer_steps += 1
            for k, v in losses.items():
                if k != "total":
                    out.setdefault(k, []).append(float(v.detach()))
        return out

    def log_row(self, step: int, terms: dict[str, float]) -> dict[str, Any]:
        """The mean since the last line: one batch's reward says more about its faces than the policy."""
        means = {k: round(sum(v) / len(v), 6) for k, v in self.window.items()}
        self.window.clear()
        return means | {"optimizer_steps": self.optimizer_steps}

    def save_model(self, folder: Path) -> None:
        save_model(self.model, folder)

    def finish(self, run_dir: Path) -> None:
        self.model.save_lora(run_dir / LORA_FILE)
        export_final(self.model, run_dir / "final")

    def results(self) -> dict[str, Any]:
        return {
            "sampling_steps": self.cfg.sampling_steps,
            "optimizer_steps": self.optimizer_steps,
            "reward_weights": {k: round(w, 4) for k, w in self.reward.active.items()},
            "rewards": self.reward.report(),
        }


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
    its components, the policy and likelihood terms, approx_kl and clip_fraction), run_dir/rewards.txt,
    run_dir/checkpoint (LoRA, optimizer state, optimizer step count), and when finished
    run_dir/lora.safetensors (for `restore --lora`; it carries the sampling steps) and
    run_dir/final (merged, fp16). `on_start` gets the reward's component report (judges, fallbacks,
    what was dropped and why, renormalisation). Several processes: `accelerate launch` or
    torchrun; each samples its own faces, advantages use the standard deviation over all.
    """
    return run_training(LrpoMethod(cfg, on_start), run_dir, device, resume, max_minutes, on_step)


@torch.no_grad()
def rollout(
    model: OneStepRestorer, reward: CompositeReward, cfg: LrpoConfig, lq: torch.Tensor, hq: torch.Tensor, gen: torch.Generator
) -> tuple[dict[str, torch.Tensor], list[Transition], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Group sampling and scoring for one batch (images in [0, 1]), plus each sample's
    ground-truth trajectory (empty when the likelihood term is off)."""
    z_lq, skips = model.encode_with_skips(lq * 2 - 1)
    z_start = z_lq.float().repeat_interleave(cfg.group_size, 0)
    skips = [s.repeat_interleave(cfg.group_size, 0) for s in skips] if skips is not None else None
    z0, path = sample_trajectories(model, z_start, cfg.sampling_steps, cfg.eta, cfg.final_std, gen)
    restored = (model.decode(z0, skips=skips).float() + 1) / 2
    scores = reward(restored, hq.repeat_interleave(cfg.group_size, 0))
    ground_truth = []
    if cfg.likelihood_weight > 0:
        z_gt = model.encode(hq * 2 - 1).float().repeat_interleave(cfg.group_size, 0)
        ground_truth = ground_truth_trajectory(model, z_start, z_gt, path, cfg.eta, gen)
    return scores, path, ground_truth
