"""The blind face degradation, batched in torch so it runs where the model trains (CPU or GPU).

HQ -> blur (isotropic or anisotropic Gaussian) -> downsample -> Gaussian noise -> JPEG -> resize
back, each sample drawn with its own parameters. JPEG is done in torch (8x8 DCT + quantisation
on YCbCr with 4:2:0 chroma) so a whole batch is degraded without a round trip through an image
codec per sample.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class DegradationConfig:
    """Parameter ranges, sampled uniformly per image. Defaults follow the common blind-face recipe."""

    blur_sigma: tuple[float, float] = (0.1, 12.0)
    blur_kernel_size: int = 41
    anisotropic_prob: float = 0.5
    downsample: tuple[float, float] = (1.0, 12.0)
    noise_sigma: tuple[float, float] = (0.0, 15.0)
    jpeg_quality: tuple[int, int] = (30, 100)
    grey_noise_prob: float = 0.4
    #: share of samples drawn only from the gentle end of every range, so the restorer also learns
    #: to leave nearly clean faces alone (uniform draws put few samples there).
    mild_fraction: float = 0.0
    #: how much of each range, from its gentle end, a mild sample may use.
    mild_share: float = 0.4

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DegradationConfig":
        known = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _uniform(
    lo_hi: tuple[float, float],
    n: int,
    gen: torch.Generator,
    device: torch.device,
    gentle: torch.Tensor | None = None,
    share: float = 1.0,
    gentle_high: bool = False,
) -> torch.Tensor:
    """Uniform draws in lo_hi; samples marked `gentle` stay in the first `share` of the range
    from its gentle end (the low end, or the high end for JPEG quality)."""
    lo, hi = lo_hi
    u = torch.rand(n, generator=gen, device=device)
    if gentle is not None:
        u = torch.where(gentle, 1 - (1 - u) * share if gentle_high else u * share, u)
    return lo + (hi - lo) * u


def gaussian_kernels(sigma_x: torch.Tensor, sigma_y: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """One normalised (possibly rotated, anisotropic) Gaussian kernel per sample: B x size x size."""
    device = sigma_x.device
    r = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    u = cos * xx + sin * yy
    v = -sin * xx + cos * yy
    sx, sy = sigma_x[:, None, None], sigma_y[:, None, None]
    k = torch.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    return k / k.sum(dim=(1, 2), keepdim=True)


def blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve each image with its own kernel (grouped conv, reflect padding)."""
    b, c, h, w = x.shape
    size = kernels.shape[-1]
    pad = size // 2
    xp = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    weight = kernels.repeat_interleave(c, dim=0)[:, None]
    return F.conv2d(xp, weight, groups=b * c).reshape(b, c, h, w)


def resize_each(x: torch.Tensor, sizes: list[tuple[int, int]], mode: str = "bilinear") -> list[torch.Tensor]:
    """Resize sample i to sizes[i] (sizes differ per sample, so this cannot be one call)."""
    return [F.interpolate(x[i : i + 1], size=s, mode=mode, align_corners=False, antialias=mode != "nearest") for i, s in enumerate(sizes)]


# Standard JPEG (ITU T.81 Annex K) quantisation tables.
_LUMA_Q = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float32,
)
_CHROMA_Q = torch.full((8, 8), 99.0)
_CHROMA_Q[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]], dtype=torch.float32)


def _dct_matrix(device: torch.device) -> torch.Tensor:
    n = torch.arange(8, dtype=torch.float32, device=device)
    m = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m


def _quality_scale(quality: torch.Tensor) -> torch.Tensor:
    """libjpeg's mapping from quality (1..100) to a table scale factor."""
    q = quality.clamp(1, 100).float()
    return torch.where(q < 50, 5000 / q, 200 - 2 * q) / 100


def _jpeg_channel(x: torch.Tensor, table: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """Quantise one channel plane batch (B x H x W, H and W multiples of 8) in the DCT domain."""
    b, h, w = x.shape
    blocks = x.reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    coef = dct @ blocks @ dct.T
    t = table[:, None, None]
    coef = torch.round(coef / t) * t
    out = dct.T @ coef @ dct
    return out.permute(0, 1, 3, 2, 4).reshape(b, h, w)


def jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG-compress a batch in [0,1] (B x 3 x H x W), one quality per sample, 4:2:0 chroma."""
    b, _, h, w = x.shape
    device = x.device
    ph, pw = (-h) % 16, (-w) % 16
    x = F.pad(x, (0, pw, 0, ph), mode="replicate") * 255
    r, g, bl = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * bl - 128
    cb = -0.168736 * r - 0.331264 * g + 0.5 * bl
    cr = 0.5 * r - 0.418688 * g - 0.081312 * bl
    scale = _quality_scale(quality.to(device))[:, None, None]
    luma_t = torch.clamp(torch.floor(_LUMA_Q.to(device) * scale + 0.5), 1, 255)
    chroma_t = torch.clamp(torch.floor(_CHROMA_Q.to(device) * scale + 0.5), 1, 255)
    dct = _dct_matrix(device)
    y = _jpeg_channel(y, luma_t, dct)
    chroma = torch.stack([cb, cr], 1)
    small = F.avg_pool2d(chroma, 2)
    small = torch.stack([_jpeg_channel(small[:, i], chroma_t, dct) for i in range(2)], 1)
    cb, cr = F.interpolate(small, scale_factor=2, mode="bilinear", align_corners=False).unbind(1)
    y = y + 128
    out = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return (out[:, :, :h, :w] / 255).clamp(0, 1)


@dataclass
class DegradationParams:
    """What was drawn for each sample, so a degraded set can be described and rebuilt."""

    sigma_x: torch.Tensor
    sigma_y: torch.Tensor
    theta: torch.Tensor
    scale: torch.Tensor
    noise: torch.Tensor
    grey_noise: torch.Tensor
    quality: torch.Tensor

    def row(self, i: int) -> dict:
        return {k: round(float(getattr(self, k)[i]), 4) for k in self.__dataclass_fields__}


def sample_params(cfg: DegradationConfig, n: int, gen: torch.Generator, device: torch.device = torch.device("cpu")) -> DegradationParams:
    """Draw one set of degradation parameters per sample.

    With `mild_fraction` 0 no extra random numbers are drawn, so seeded test sets rebuild exactly."""
    gentle = torch.rand(n, generator=gen, device=device) < cfg.mild_fraction if cfg.mild_fraction > 0 else None
    draw = lambda lo_hi, high=False: _uniform(lo_hi, n, gen, device, gentle, cfg.mild_share, high)  # noqa: E731
    sx = draw(cfg.blur_sigma)
    aniso = torch.rand(n, generator=gen, device=device) < cfg.anisotropic_prob
    sy = torch.where(aniso, draw(cfg.blur_sigma), sx)
    theta = torch.where(aniso, _uniform((0.0, math.pi), n, gen, device), torch.zeros(n, device=device))
    return DegradationParams(
        sigma_x=sx,
        sigma_y=sy,
        theta=theta,
        scale=draw(cfg.downsample),
        noise=draw(cfg.noise_sigma),
        grey_noise=torch.rand(n, generator=gen, device=device) < cfg.grey_noise_prob,
        quality=draw(cfg.jpeg_quality, True).round(),
    )


def apply_degradation(hq: torch.Tensor, p: DegradationParams, kernel_size: int, gen: torch.Generator) -> torch.Tensor:
    """Degrade a batch of HQ images in [0,1] (B x 3 x H x W) with the given parameters."""
    b, c, h, w = hq.shape
    x = blur(hq, gaussian_kernels(p.sigma_x.to(hq.device), p.sigma_y.to(hq.device), p.theta.to(hq.device), kernel_size))
    small = [(max(8, round(h / float(s))), max(8, round(w / float(s)))) for s in p.scale]
    xs = resize_each(x, small)
    out = []
    for i, xi in enumerate(xs):
        shape = (1, 1 if p.grey_noise[i] else c, *xi.shape[-2:])
        noise = torch.randn(shape, generator=gen, device=gen.device).to(xi.device) * float(p.noise[i]) / 255
        xi = (xi + noise).clamp(0, 1)
        xi = jpeg(xi, p.quality[i : i + 1])
        out.append(F.interpolate(xi, size=(h, w), mode="bilinear", align_corners=False))
    return torch.cat(out).clamp(0, 1)


class Degrader:
    """Draws parameters and degrades batches; seeded so a test set can be rebuilt exactly."""

    def __init__(self, cfg: DegradationConfig | None = None, seed: int = 0, device: str | torch.device = "cpu"):
        self.cfg = cfg or DegradationConfig()
        self.device = torch.device(device)
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    @torch.no_grad()
    def __call__(self, hq: torch.Tensor) -> tuple[torch.Tensor, DegradationParams]:
        params = sample_params(self.cfg, hq.shape[0], self.gen)
        return apply_degradation(hq.to(self.device), params, self.cfg.blur_kernel_size, self.gen), params
