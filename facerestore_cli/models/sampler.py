"""The restorer as a few-step stochastic sampler: the policy that LRPO trains.

The one-step restorer reads the degraded latent as z_t at `config.timestep` and predicts the clean
latent in one UNet call. The few-step mode walks the same path in `steps` DDIM steps

    t_1 = timestep > t_2 > ... > t_K  ->  clean

Each step predicts x0 with the UNet and moves to the next timestep with DDIM (eta > 0 makes the
move a Gaussian with a known variance, so every transition has a tractable log-probability). The
last step lands on the clean latent: its mean is the UNet's x0 prediction and its spread is
`final_std`, a Gaussian policy around the output. With steps = 1 that last step is the whole
path: the one-step restorer with a Gaussian policy around its output, the fallback the LRPO
paper's setting leaves for one-step models.

Restoring (no sampling) follows the means: `restore_latent` with steps = 1 is exactly the
one-step restorer, so a model trained in one mode restores the same way in `restore`.
Cost: steps UNet calls per face instead of one (the encoder and decoder run once either way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from facerestore_cli.models.configs import RestorerConfig


class LatentDenoiser(Protocol):
    """What the sampler needs of a restorer (`LatentDenoiser` is one): its config, its noise
    schedule and its x0 prediction. A protocol, so the restorer can use the sampler without the
    two modules importing each other."""

    config: RestorerConfig

    def alpha_bar(self, t: int | Tensor, batch: int, device: torch.device) -> Tensor: ...

    def denoise_latent(self, z: Tensor, timestep: int | Tensor | None = None) -> Tensor: ...


#: t_prev of the last step: the clean latent (alpha_bar = 1).
CLEAN = -1


def sampling_timesteps(start: int, steps: int) -> list[tuple[int, int]]:
    """(t, t_prev) of each step, evenly spaced from `start` down to the clean latent."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, not {steps}")
    if steps > start + 1:
        raise ValueError(f"{steps} steps do not fit below timestep {start}")
    ts = [round(start - i * (start + 1) / steps) for i in range(steps)]
    return list(zip(ts, ts[1:] + [CLEAN]))


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """Per-sample log-density of a diagonal Gaussian, averaged over dimensions (B,).

    Averaging (not summing) over the latent's dimensions keeps log-ratios of a few thousand
    dimensions in a range where PPO's ratio clipping means something.
    """
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    std = std.reshape(-1, *([1] * (x.dim() - 1))) if std.dim() else std
    logp = -((x.float() - mean.float()) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).mean(1)


@dataclass
class StepDistribution:
    """The Gaussian a transition z_t -> z_prev draws from."""

    mean: Tensor
    std: float
    x0: Tensor


def step_distribution(model: LatentDenoiser, z_t: Tensor, t: int, t_prev: int, eta: float, final_std: float) -> StepDistribution:
    """DDIM's transition from z_t (at t) towards t_prev, with eta's share of fresh noise.

    With a = alpha_bar(t), a' = alpha_bar(t_prev), x0 the UNet's prediction and eps = (z_t - sqrt(a) x0) / sqrt(1 - a):
        std  = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')
        mean = sqrt(a') x0 + sqrt(1 - a' - std^2) eps
    The last step (t_prev = CLEAN) has mean x0 and std `final_std`.
    """
    x0 = model.denoise_latent(z_t, t).float()
    if t_prev == CLEAN:
        return StepDistribution(x0, final_std, x0)
    mean, std = ddim_posterior(model, z_t, x0, t, t_prev, eta)
    return StepDistribution(mean, std, x0)


def ddim_sigma(model: LatentDenoiser, t: int, t_prev: int, eta: float = 1.0) -> float:
    """DDIM's sigma of the move t -> t_prev: eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a').

    The last move (t_prev = CLEAN) is taken to timestep 0, as DDIM's own schedule ends (ldm's
    `alphas_prev` starts at alphas_cumprod[0]), so its sigma is small but not zero: the noise
    level LRPO's advantage assignment weighs each step by (w_j = sigma_j / mean sigma, eta = 1).
    """
    a = model.alpha_bar(t, 1, torch.device("cpu")).double()
    a_prev = model.alpha_bar(max(t_prev, 0), 1, torch.device("cpu")).double()
    if t_prev == CLEAN and t == 0:
        return 0.0
    return float(eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev))


def ddim_posterior(model: LatentDenoiser, z_t: Tensor, x0: Tensor, t: int, t_prev: int, eta: float) -> tuple[Tensor, float]:
    """Mean and std of DDIM's move from z_t towards t_prev given a clean latent x0 (predicted by
    the UNet for the policy, the ground truth's for the likelihood term)."""
    a, a_prev = model.alpha_bar(t, 1, z_t.device), model.alpha_bar(t_prev, 1, z_t.device)
    eps = (z_t.float() - a.sqrt() * x0) / (1 - a).sqrt()
    std = eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
    return a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp_min(0).sqrt() * eps, float(std)


@dataclass
class Transition:
    """One sampled step of a batch of trajectories, kept for the policy update."""

    t: int
    t_prev: int
    z_t: Tensor
    z_next: Tensor
    log_prob: Tensor
    std: float
    #: DDIM's sigma of this move at eta = 1 (`ddim_sigma`): what noise-level advantage assignment weighs by.
    noise_level: float

    def rows(self, index: Tensor) -> Transition:
        """This step for a subset of the batch (the samples LRPO trains on)."""
        return replace(self, z_t=self.z_t[index], z_next=self.z_next[index], log_prob=self.log_prob[index])


@torch.no_grad()
def sample_trajectories(
    model: LatentDenoiser, z_start: Tensor, steps: int, eta: float, final_std: float, generator: torch.Generator | None = None
) -> tuple[Tensor, list[Transition]]:
    """Draw one trajectory per start latent; returns the sampled clean latents and the transitions."""
    z, path = z_start.float(), []
    for t, t_prev in sampling_timesteps(model.config.timestep, steps):
        dist = step_distribution(model, z, t, t_prev, eta, final_std)
        noise = torch.randn(z.shape, generator=generator, device=generator.device if generator else z.device).to(z.device)
        z_next = dist.mean + dist.std * noise if dist.std > 0 else dist.mean
        level = ddim_sigma(model, t, t_prev, 1.0)
        path.append(Transition(t, t_prev, z, z_next, gaussian_log_prob(z_next, dist.mean, max(dist.std, 1e-8)), dist.std, level))
        z = z_next
    return z, path


def transition_log_prob(model: LatentDenoiser, step: Transition, eta: float, final_std: float) -> Tensor:
    """log pi(z_next | z_t) under the model's current weights (with gradients)."""
    dist = step_distribution(model, step.z_t, step.t, step.t_prev, eta, final_std)
    return gaussian_log_prob(step.z_next, dist.mean, max(dist.std, 1e-8))


def restore_latent(model: LatentDenoiser, z: Tensor, steps: int) -> Tensor:
    """Clean latent along the sampler's means (deterministic); steps = 1 is the one-step restorer."""
    if steps == 1:
        return model.denoise_latent(z)
    for t, t_prev in sampling_timesteps(model.config.timestep, steps):
        z = step_distribution(model, z, t, t_prev, eta=0.0, final_std=0.0).mean.to(z.dtype)
    return z
