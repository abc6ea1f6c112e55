"""Loss terms of the restorer's training stages.

Pixel terms (L1 and Sobel edges), a perceptual term on frozen face-trained features, the
diffusion (denoising) loss that trains the latent prior and VSD's "fake score" network, and
variational score distillation (VSD) as OSEDiff applies it to a one-step generator.

No VGG, LPIPS or CLIP weights can be had offline, so the perceptual features come from the
project's own autoencoder encoder, trained on faces: multi-scale activations, unit-normalised
per channel as LPIPS does, compared with L1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sobel_edges(x: Tensor) -> Tensor:
    """Horizontal and vertical gradients per channel: an L1 on them rewards sharp, aligned edges."""
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device, dtype=x.dtype)
    weight = torch.stack([k, k.T])[:, None].repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), weight, groups=x.shape[1])


def l1_and_edges(out: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel L1 and the L1 of Sobel gradients."""
    return F.l1_loss(out, target), F.l1_loss(sobel_edges(out), sobel_edges(target))


def diffusion_target(scheduler, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What the UNet should predict for z_t = add_noise(z0, noise, t), by prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    return z0


def diffusion_loss(unet_fn, scheduler, z0: Tensor, t_range: tuple[int, int] = (0, 999)) -> Tensor:
    """Denoising loss at uniform random timesteps: trains the prior and VSD's fake-score UNet.

    `unet_fn(z_t, t)` returns the raw UNet prediction (epsilon / v / x0, as the scheduler says).
    """
    t = torch.randint(t_range[0], t_range[1] + 1, (z0.shape[0],), device=z0.device)
    noise = torch.randn_like(z0)
    z_t = scheduler.add_noise(z0, noise, t)
    return F.mse_loss(unet_fn(z_t, t).float(), diffusion_target(scheduler, z0, noise, t).float())


def vsd_loss(z: Tensor, real_x0, fake_x0, scheduler, t_range: tuple[int, int] = (20, 980)) -> Tensor:
    """Variational score distillation on generated clean latents `z` (OSEDiff's form).

    z is noised to a random t; the frozen prior (`real_x0(z_t, t)`) and the fake-score network
    trained on the generator's own outputs (`fake_x0(z_t, t)`) each estimate the clean latent.
    Their difference, normalised by the prior's mean error, is the gradient that moves z toward
    the prior's distribution; it is applied through an MSE to a detached target.
    """
    t = torch.randint(t_range[0], t_range[1] + 1, (z.shape[0],), device=z.device)
    with torch.no_grad():
        z_t = scheduler.add_noise(z.detach(), torch.randn_like(z), t)
        real, fake = real_x0(z_t, t).float(), fake_x0(z_t, t).float()
        weight = (z.detach().float() - real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-4)
        grad = (fake - real) / weight
        grad = torch.nan_to_num(grad)
    return 0.5 * F.mse_loss(z.float(), (z.detach().float() - grad))
