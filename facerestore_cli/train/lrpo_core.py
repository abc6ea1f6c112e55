"""LRPO's shared parts: the config and the maths both policies use (train/lrpo.py for one-step
restorers, train/lrpo_controlnet.py for DiffBIR-kind models' ControlNets): advantages, noise-level
assignment, PPO's clipped surrogate, the ground truth's trajectory and the likelihood term.
See train/lrpo.py for the method (TRAINING.md, LRPO table)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from facerestore_cli.data.captions import CaptionLookup
from facerestore_cli.data.degrade import DegradationConfig
from facerestore_cli.errors import FacerestoreError, InputError
from facerestore_cli.models.restorer import OneStepRestorer
from facerestore_cli.models.sampler import CLEAN, LatentDenoiser, Transition, ddim_posterior
from facerestore_cli.rewards.composite import CompositeReward, RewardSources, RewardWeights
from facerestore_cli.rewards.frm import load_frm
from facerestore_cli.train.controlnet import OPTIMIZERS
from facerestore_cli.train.runner import LoraTuningConfig, TrainingMethod, degraded_pair, step_generator, update

#: the paper's advantage normaliser: the std over the epoch's samples plus this.
ADVANTAGE_EPS = 1e-4
#: the GT likelihood's temperature: 1 - exp(mean log N / 40).
LIKELIHOOD_TEMPERATURE = 40.0
#: a one-step base's sampling steps when the config sets none.
ONE_STEP_SAMPLING_STEPS = 3
PRECISIONS = ("fp32", "bf16")
#: round r's sampling generator is part SAMPLING_PARTS + r of its step; its degradations are part 1 + r.
SAMPLING_PARTS = 1000


@dataclass
class LrpoConfig(LoraTuningConfig):
    """Everything an LRPO run depends on; saved beside the checkpoints. The policy and reward
    defaults are the paper's (lr, group, clip range, advantage clip, likelihood, judges); the run's
    size is not (200 steps of one sampling round, where the paper runs 100 epochs of 12 rounds:
    configs/paper/lrpo_diffbir.toml sets those)."""

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
    #: sampling rounds per runner step (an epoch): advantages divide by the std over all of them, then
    #: each round is trained in turn. The paper: 12 sampling batches per epoch; 1 = one round a step.
    rounds_per_epoch: int = 1
    #: one-step bases: 1 is the restorer with a Gaussian policy around its output, more few-step DDIM
    #: (unset: ONE_STEP_SAMPLING_STEPS). DiffBIR-kind bases: the DDIM steps of the policy (unset: the base's own).
    sampling_steps: int | None = None
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
    #: DiffBIR-kind bases (whose ControlNet is tuned; lora_rank 0 = the whole ControlNet, as the paper):
    #: "bf16" holds the frozen parts in bf16 and runs under bf16 autocast on CUDA (the CPU runs fp32).
    precision: str = "fp32"
    #: DiffBIR-kind bases: "adamw" or "adamw8bit" (bitsandbytes' 8-bit AdamW, to fit one GPU).
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    #: DiffBIR-kind bases: gradient checkpointing on the UNet and the ControlNet.
    gradient_checkpointing: bool = False
    rewards: RewardWeights = field(default_factory=RewardWeights)

    def validate(self) -> None:
        """One clear error per impossible setting."""
        # lora_rank 0 tunes a DiffBIR base's whole ControlNet; a one-step base refuses it when built
        LoraTuningConfig.validate(replace(self, lora_rank=max(self.lora_rank, 1)))
        steps = self.sampling_steps
        checks = [
            (self.lora_rank >= 0, f"lora_rank must be >= 0 (0: the whole ControlNet of a DiffBIR model), not {self.lora_rank}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}"),
            (self.rounds_per_epoch >= 1, f"rounds_per_epoch must be at least 1, not {self.rounds_per_epoch}"),
            (self.group_size >= 2, f"group_size must be at least 2 (advantages compare restorations of one face), not {self.group_size}"),
            (steps is None or steps >= 1, f"sampling_steps must be at least 1, not {steps}"),
            (steps == 1 or self.eta > 0, "eta must be > 0 with several sampling steps (eta 0 leaves no transition to score)"),
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
        """The judges of the composite reward: the config's keys of the same names, by keyword
        (the config names the three judges `*_metric` and the flag `allow_missing_rewards`)."""
        same = ("lpips_vgg_weights", "lpips_linear_weights", "clipiqa_weights", "clipiqa_arch", "dtcwt_levels", "wavelet_levels")
        return RewardSources(
            fidelity=self.fidelity_metric,
            quality=self.quality_metric,
            structure=self.structure_metric,
            allow_missing=self.allow_missing_rewards,
            **{k: getattr(self, k) for k in same},
        )


def trained_steps(sampling_steps: int, fraction: float) -> int:
    """How many steps of a trajectory are trained (the first ones): int(steps x fraction), at least 1."""
    return max(1, int(sampling_steps * fraction))


def group_advantages(rewards: torch.Tensor, epoch_std: torch.Tensor | float | None = None, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """(faces, group) rewards -> advantages: minus the group's mean, over the std of every sample of
    the epoch (`epoch_std`: all its rounds, gathered over processes; these rewards' when None) + eps."""
    std = rewards.std(unbiased=False) if epoch_std is None else torch.as_tensor(epoch_std)
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
    model: OneStepRestorer | LatentDenoiser,
    z_lq: torch.Tensor,
    z_gt: torch.Tensor,
    path: list[Transition],
    eta: float,
    gen: torch.Generator | None = None,
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
    takes the LQ through its ControlNet and starts from noise: train/lrpo_controlnet.py passes
    as `z_lq` the GT noised to t_1 with the rollout's own x_T, and its states carry no LQ
    because the condition c_LQ does.) In one-step mode the term is the likelihood of
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


def composite_reward(cfg: LrpoConfig, encoder: torch.nn.Module | None, device: torch.device | str = "cpu") -> CompositeReward:
    """The configured composite reward (rewards.composite), its FRM loaded frozen on `device`; a
    missing FRM drops the component when `allow_missing_rewards`. `encoder`: the base's VAE
    encoder, the judge of the "encoder" fidelity fallback."""
    frm, frm_missing = None, "weight 0"
    if cfg.rewards.frm:
        try:
            frm = load_frm(cfg.frm, device).eval().requires_grad_(False)
        except FacerestoreError as err:
            if not cfg.allow_missing_rewards:
                raise
            frm_missing = f"{cfg.frm}: {err}"
    return CompositeReward(cfg.rewards, frm, encoder, sources=cfg.reward_sources(), frm_missing=frm_missing).to(device)


def frm_captions(cfg: LrpoConfig, reward: CompositeReward) -> CaptionLookup | None:
    """The faces' captions for the reward's FRM (`captions`, `caption`), or None when it reads none."""
    frm = reward.frm
    return CaptionLookup.from_config(cfg.captions, cfg.caption) if frm is not None and frm.uses_captions else None


def with_captions(batch: Any) -> tuple[torch.Tensor, list[str] | None]:
    """A loader batch as (faces, captions or None)."""
    if isinstance(batch, (list, tuple)):
        return batch[0], list(batch[1])
    return batch, None


def group_captions(captions: list[str] | None, group_size: int) -> list[str] | None:
    """Each face's caption once per candidate of its group, in sampling order."""
    return None if captions is None else [c for c in captions for _ in range(group_size)]


class GroupPolicyMethod(TrainingMethod):
    """What LRPO's two methods share (one-step restorers, DiffBIR ControlNets): a runner step is an
    epoch of `rounds_per_epoch` sampling rounds, group advantages over the std of the whole epoch,
    then per round one optimizer step per trained timestep in sampling order on the kept samples,
    so step j's ratio is taken after the updates of steps < j as in the paper's code. Subclasses
    sample (`sample`) and price one timestep (`step_losses`); their log lines hold the means since
    the last line."""

    rate_key = "restorations_per_s"
    #: a policy accelerate did not wrap averages its gradients over processes itself.
    average_gradients = False

    def __init__(self, cfg: LrpoConfig) -> None:
        super().__init__(cfg)
        self.window: dict[str, list[float]] = {}
        #: optimizer steps taken over the whole run (several per runner step).
        self.optimizer_steps = 0

    def resume(self, extra: dict[str, Any]) -> None:
        self.optimizer_steps = int(extra.get("optimizer_steps", 0))

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"optimizer_steps": self.optimizer_steps}

    def sample(self, lq: torch.Tensor, hq: torch.Tensor, captions: list[str] | None) -> tuple[dict, list[Transition], list, Any]:
        """One round: (scores, transitions, the GT's trajectory, what `step_losses` needs)."""
        raise NotImplementedError

    def step_losses(
        self, step: Transition, advantages: torch.Tensor, ground_truth: tuple | None, rows: torch.Tensor, scale: float, context: Any
    ) -> dict[str, torch.Tensor]:
        """One trained timestep's terms on the kept `rows`; "total" already multiplied by `scale`."""
        raise NotImplementedError

    def train_step(self, step: int) -> tuple[dict[str, float], int]:
        cfg, acc = self.cfg, self.acc
        rounds = [self.sample_round(step, i) for i in range(cfg.rounds_per_epoch)]
        rewards = torch.stack([r[0] for r in rounds])  # (rounds, faces, group)
        epoch_std = acc.gather(rewards).std(unbiased=False)
        self.set_lr(step)
        inner: dict[str, list[float]] = {}
        kept = 0
        for round_rewards, path, ground_truth, context, _ in rounds:
            adv = group_advantages(round_rewards, epoch_std).flatten()
            keep = torch.nonzero(adv != 0).flatten()
            kept += keep.numel()
            kept_anywhere = int(acc.gather(torch.tensor([keep.numel()], device=acc.device)).sum())
            # a round whose every sample scored alike in its group teaches nothing: no optimizer step
            for k, v in (self.policy_updates(path, adv, keep, ground_truth, context) if kept_anywhere else {}).items():
                inner.setdefault(k, []).extend(v)
        terms = {"policy": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0} | ({"likelihood": 0.0} if cfg.likelihood_weight > 0 else {})
        terms.update({k: sum(v) / len(v) for k, v in inner.items()})
        for key in rounds[0][4]:
            terms[f"reward_{key}"] = sum(float(r[4][key].mean()) for r in rounds) / len(rounds)
        terms["reward_std"] = float(epoch_std)  # the spread the advantages are divided by
        terms["kept_fraction"] = kept / rewards.numel()
        terms["optimizer_steps"] = float(self.optimizer_steps)
        for k, v in terms.items():
            self.window.setdefault(k, []).append(v)
        return terms, rewards.numel()

    def sample_round(self, step: int, index: int) -> tuple[torch.Tensor, list[Transition], list, Any, dict]:
        """Degrade the next batch and sample it: ((faces, group) rewards, transitions, the GT's
        trajectory, the subclass's context, each reward component's scores). The degradations
        and the sampling noise come from generators of their own, seeded by (seed, step, round,
        process): an ablation that draws less noise (no GT trajectory) still trains on the same LQ
        faces and the same samples, round after round, and a resumed run draws as the
        uninterrupted one did."""
        cfg, acc = self.cfg, self.acc
        faces, captions = with_captions(next(self.batches))
        degradations = step_generator(cfg.seed, step, acc.process_index, part=1 + index)
        self.gen = step_generator(cfg.seed, step, acc.process_index, part=SAMPLING_PARTS + index)
        hq, lq = degraded_pair(faces.to(acc.device), cfg.face_size, cfg.degradation, degradations)
        scores, path, ground_truth, context = self.sample(lq, hq, captions)
        rewards = scores["total"].to(acc.device).view(hq.shape[0], cfg.group_size)
        return rewards, path, ground_truth, context, scores

    def policy_updates(
        self, path: list[Transition], adv: torch.Tensor, keep: torch.Tensor, ground_truth: list, context: Any = None
    ) -> dict[str, list[float]]:
        """One optimizer step per trained timestep; a process with no kept sample still steps with
        the loss scaled by 0, so torchrun processes stay in step."""
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
            losses = self.step_losses(path[j].rows(rows), per_step[j][rows], gt, rows, scale, context)
            update(acc, self.opt, losses["total"], self.trainable, cfg.grad_clip, average=self.average_gradients)
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
