"""Colour correction after the one-step restorer, as OSEDiff and StableSR do at inference.

A latent restorer can shift colours (a small VAE most of all). The wavelet fix keeps the
restoration's high frequencies (the detail it adds) and takes the low frequencies (colour and
shading) from the input, which degradations such as blur, noise and JPEG barely change.

How many wavelet bands the restorer supplies is the fidelity knob (``wavelet:N``, N = 1..8 at
512 px; each band doubles the scale). With 5, as OSEDiff uses, the bundled model redraws the
mid-scale shapes of nearly clean faces (eyes, mouth) and their identity distance got worse than
the input's; with 3 it keeps the input's shapes larger than about 8 px and adds finer detail,
and identity beat the input on both held-out sets (benchmarks/RESULTS.md). Heavily degraded
photos can take more: ``wavelet:5``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The --color-fix values and their parsing need no torch (color_spec.py); callers also name them from here.
from facerestore_cli.models.color_spec import (  # noqa: F401
    AUTO_COLOR_FIX,
    COLOR_FIXES,
    DEFAULT_COLOR_FIX,
    DEFAULT_WAVELET_LEVELS,
    MAX_WAVELET_LEVELS,
    color_fix_for,
    parse_color_fix,
    parse_color_fix_choice,
)


def _blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """The a-trous [1 2 1]/4 kernel (3x3, dilated), per channel, replicate padding."""
    k = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
    kernel = (k[:, None] * k[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    x = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(x, kernel, groups=x.shape[1], dilation=dilation)


def low_frequency(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """What is left after removing `levels` wavelet detail bands (dilations 1, 2, 4, ...)."""
    for i in range(levels):
        x = _blur(x, 2**i)
    return x


def wavelet_color_fix(restored: torch.Tensor, source: torch.Tensor, levels: int = DEFAULT_WAVELET_LEVELS) -> torch.Tensor:
    """Restored detail on the source's low frequencies."""
    return restored - low_frequency(restored, levels) + low_frequency(source, levels)


def adain_color_fix(restored: torch.Tensor, source: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel mean and standard deviation of the source, on the restored image."""
    dims = (2, 3)
    r_mean, r_std = restored.mean(dims, keepdim=True), restored.std(dims, keepdim=True) + eps
    s_mean, s_std = source.mean(dims, keepdim=True), source.std(dims, keepdim=True)
    return (restored - r_mean) / r_std * s_std + s_mean


def color_fix_unclamped(restored: torch.Tensor, source: torch.Tensor, method: str = DEFAULT_COLOR_FIX) -> torch.Tensor:
    """The fix named as `parse_color_fix` reads it, in float32 and not clamped, so a training loss
    on it passes gradients everywhere."""
    name, levels = parse_color_fix(method)
    r, s = restored.float(), source.float()
    if name == "none":
        return r
    return wavelet_color_fix(r, s, levels) if name == "wavelet" else adain_color_fix(r, s)


def color_fix(restored: torch.Tensor, source: torch.Tensor, method: str = DEFAULT_COLOR_FIX) -> torch.Tensor:
    """Apply a fix to images in [-1, 1] (computed in float32, clamped, dtype kept)."""
    if method == "none":
        return restored
    return color_fix_unclamped(restored, source, method).clamp(-1, 1).to(restored.dtype)
