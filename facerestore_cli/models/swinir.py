"""SwinIR, DiffBIR v1's stage-1 face restorer, and the loader of `face_swinir_v1.ckpt`.

There is no maintained PyPI package for SwinIR, so the network is written here from the facts in
../shared/upstream/SPEC.md §2.4 (key names, shapes, hyper-parameters) and the published Swin
Transformer / SwinIR maths; no upstream code is copied. Module, parameter and buffer names equal
the upstream keys, so the published state dict loads with `strict=True` (buffers included).

Layout: PixelUnshuffle(8) + conv in, eight residual Swin groups (window attention, every other
block shifted by window_size // 2 with a mask), then three ×2 nearest-neighbour upsamples: the
output is the size of the input. Only the published variant's options are built
(`upsampler="nearest+conv"`, `resi_connection="1conv"`); others raise instead of loading wrongly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from facerestore_cli.errors import InputError
from facerestore_cli.models.checkpoints import CheckpointError, check_keys, load_state_dict
from facerestore_cli.models.sd21 import cast_module

#: The published config (DiffBIR `configs/inference/swinir.yaml`, SPEC §2.4).
FACE_SWINIR_V1: dict[str, Any] = {
    "img_size": 64,
    "patch_size": 1,
    "in_chans": 3,
    "embed_dim": 180,
    "depths": [6] * 8,
    "num_heads": [6] * 8,
    "window_size": 8,
    "mlp_ratio": 2.0,
    "sf": 8,
    "img_range": 1.0,
    "upsampler": "nearest+conv",
    "resi_connection": "1conv",
    "unshuffle": True,
    "unshuffle_scale": 8,
}
#: The RGB mean SwinIR subtracts before the body (DIV2K's, kept by DiffBIR).
RGB_MEAN = (0.4488, 0.4371, 0.4040)
#: Feature width of the upsampling tail (fixed upstream, not in the config).
NUM_FEAT = 64
#: The value masked attention pairs get before the softmax (upstream's, so fp16 stays finite).
MASK_VALUE = -100.0


def window_partition(x: Tensor, ws: int) -> Tensor:
    """(B, H, W, C) -> (B * nW, ws * ws, C), windows in row-major order per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: Tensor, ws: int, h: int, w: int) -> Tensor:
    """Inverse of `window_partition`: (B * nW, ws * ws, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, ws: int, shift: int, device: torch.device | str | None = None) -> Tensor:
    """(nW, ws², ws²) additive mask for a grid rolled by -shift: pairs of tokens that were not
    neighbours before the roll (different regions of one window) get MASK_VALUE, others 0."""
    labels = torch.zeros(1, h, w, 1, device=device)
    spans = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    region = 0
    for hs in spans:
        for wsl in spans:
            labels[:, hs, wsl, :] = region
            region += 1
    per_window = window_partition(labels, ws).squeeze(-1)  # (nW, ws²)
    differs = per_window.unsqueeze(1) != per_window.unsqueeze(2)
    return torch.zeros(differs.shape, device=device).masked_fill(differs, MASK_VALUE)


def relative_position_index(ws: int) -> Tensor:
    """(ws², ws²) int64: row of the bias table for each (query, key) pair, from their offset."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window, with a learned relative position bias."""

    def __init__(self, dim: int, ws: int, num_heads: int) -> None:
        super().__init__()
        self.ws, self.num_heads = ws, num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(ws), persistent=True)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B * nW, N, C); mask (nW, N, N) or None. Scale head_dim**-0.5 (SDPA's default)."""
        bn, n, c = x.shape
        q, k, v = self.qkv(x).view(bn, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        index = self.relative_position_index.long().view(-1)
        bias = self.relative_position_bias_table[index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:  # (nW, heads, N, N), one copy per image of the batch
            bias = bias + mask.unsqueeze(1).to(bias.dtype)
            bias = bias.repeat(bn // mask.shape[0], 1, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(bn, n, c))


class Mlp(nn.Module):
    """The block's feed-forward: fc1, GELU, fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP, both residual. `resolution` is the token grid the
    persistent mask is built for; other grids get a mask computed on the fly."""

    def __init__(self, dim: int, resolution: int, num_heads: int, ws: int, shift: int, mlp_ratio: float) -> None:
        super().__init__()
        if resolution <= ws:  # one window covers the grid: no shift (upstream's rule, fixes the layout)
            ws, shift = resolution, 0
        self.resolution, self.ws, self.shift = resolution, ws, shift
        if shift > 0:
            self.register_buffer("attn_mask", shifted_window_mask(resolution, resolution, ws, shift), persistent=True)
        else:
            self.attn_mask: Tensor | None = None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, ws, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _mask(self, h: int, w: int, device: torch.device) -> Tensor | None:
        if self.shift == 0:
            return None
        if (h, w) == (self.resolution, self.resolution) and self.attn_mask is not None:
            return self.attn_mask
        return shifted_window_mask(h, w, self.ws, self.shift, device)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        h, w = size
        b, _, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, self.ws), self._mask(h, w, x.device))
        y = window_reverse(y, self.ws, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    """A run of blocks, unshifted and shifted alternately."""

    def __init__(self, dim: int, resolution: int, depth: int, num_heads: int, ws: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, resolution, num_heads, ws, 0 if i % 2 == 0 else ws // 2, mlp_ratio) for i in range(depth)
        )

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        for block in self.blocks:
            x = block(x, size)
        return x


class RSTB(nn.Module):
    """Residual Swin Transformer group: blocks, then a 3x3 conv on the image-shaped tokens, plus the input."""

    def __init__(self, dim: int, resolution: int, depth: int, num_heads: int, ws: int, mlp_ratio: float) -> None:
        super().__init__()
        self.residual_group = BasicLayer(dim, resolution, depth, num_heads, ws, mlp_ratio)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        b, n, c = x.shape
        y = self.residual_group(x, size).transpose(1, 2).reshape(b, c, *size)
        return self.conv(y).flatten(2).transpose(1, 2) + x


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> tokens (B, H*W, C) with LayerNorm (patch_size 1: no projection)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.flatten(2).transpose(1, 2))


class SwinIR(ModelMixin, ConfigMixin):
    """SwinIR with the "nearest+conv" tail and an optional pixel-unshuffle head (DiffBIR's stage 1).

    forward(x): RGB in [0, 1], (B, 3, H, W), any H, W -> (B, 3, H * sf / unshuffle_scale, ...).
    """

    @register_to_config
    def __init__(
        self,
        img_size: int = 64,
        patch_size: int = 1,
        in_chans: int = 3,
        embed_dim: int = 180,
        depths: Sequence[int] = (6, 6, 6, 6, 6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6, 6, 6, 6, 6),
        window_size: int = 8,
        mlp_ratio: float = 2.0,
        sf: int = 8,
        img_range: float = 1.0,
        upsampler: str = "nearest+conv",
        resi_connection: str = "1conv",
        unshuffle: bool = True,
        unshuffle_scale: int = 8,
    ) -> None:
        super().__init__()
        if upsampler != "nearest+conv" or resi_connection != "1conv" or patch_size != 1:
            raise InputError(
                f"SwinIR: only upsampler 'nearest+conv', resi_connection '1conv' and patch_size 1 are built "
                f"(got {upsampler!r}, {resi_connection!r}, {patch_size})"
            )
        if sf < 2 or sf & (sf - 1) or len(depths) != len(num_heads) or window_size < 2:
            raise InputError(
                f"SwinIR: sf must be a power of two >= 2, window_size >= 2 and depths/num_heads of equal length "
                f"(got sf {sf}, window {window_size}, {list(depths)}, {list(num_heads)})"
            )
        self.n_up = int(math.log2(sf))
        self.pad_factor = window_size * (unshuffle_scale if unshuffle else 1)
        first = nn.Conv2d(in_chans * unshuffle_scale**2 if unshuffle else in_chans, embed_dim, 3, 1, 1)
        self.conv_first = nn.Sequential(nn.PixelUnshuffle(unshuffle_scale), first) if unshuffle else first
        self.patch_embed = PatchEmbed(embed_dim)
        grid = img_size // patch_size
        self.layers = nn.ModuleList(RSTB(embed_dim, grid, d, h, window_size, mlp_ratio) for d, h in zip(depths, num_heads))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, NUM_FEAT, 3, 1, 1), nn.LeakyReLU(inplace=True))
        for i in range(1, self.n_up + 1):
            self.add_module(f"conv_up{i}", nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, 1, 1))
        self.conv_hr = nn.Conv2d(NUM_FEAT, NUM_FEAT, 3, 1, 1)
        self.conv_last = nn.Conv2d(NUM_FEAT, in_chans, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Upstream's init (truncated normal 0.02 for linears and bias tables), so an untrained
        model is a sensible starting point for fine-tuning; a loaded checkpoint overwrites it."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, WindowAttention):
            nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    def _mean(self, x: Tensor) -> Tensor:
        if self.config.in_chans == 3:
            return torch.tensor(RGB_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return torch.zeros(1, self.config.in_chans, 1, 1, device=x.device, dtype=x.dtype)

    @staticmethod
    def _reflect_pad(x: Tensor, factor: int) -> Tensor:
        """Pad bottom/right to a multiple of `factor` by reflection (repeated when the image is smaller
        than the padding; replicated for a 1-pixel side, where reflection is undefined)."""
        while (x.shape[-2] % factor) or (x.shape[-1] % factor):
            ph = min(-x.shape[-2] % factor, x.shape[-2] - 1)
            pw = min(-x.shape[-1] % factor, x.shape[-1] - 1)
            if ph == pw == 0:
                return F.pad(x, (0, -x.shape[-1] % factor, 0, -x.shape[-2] % factor), mode="replicate")
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """The Swin body on a feature map (B, embed_dim, h, w), h and w multiples of the window."""
        b, c, h, w = x.shape
        t = self.patch_embed(x)
        for layer in self.layers:
            t = layer(t, (h, w))
        return self.norm(t).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise InputError(f"SwinIR: expected (B, {self.config.in_chans}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        mean = self._mean(x)
        x = self._reflect_pad((x - mean) * self.config.img_range, self.pad_factor)
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        x = self.conv_before_upsample(x)
        for i in range(1, self.n_up + 1):
            x = self.lrelu(getattr(self, f"conv_up{i}")(F.interpolate(x, scale_factor=2, mode="nearest")))
        x = self.conv_last(self.lrelu(self.conv_hr(x)))
        x = x / self.config.img_range + mean
        scale = self.config.sf // (self.config.unshuffle_scale if self.config.unshuffle else 1)
        return x[:, :, : h * scale, : w * scale]


def load_face_swinir(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: Mapping[str, Any] | None = None,
) -> SwinIR:
    """SwinIR from a published `face_swinir_v1.ckpt` (flat or `{"state_dict": ...}`, `module.` or not),
    in eval mode with gradients off (it is a frozen stage 1). Built on the meta device, so the
    weights are read once; a file of another kind or size is one CheckpointError line.
    `config` defaults to FACE_SWINIR_V1 (tests pass tiny ones)."""
    state = load_state_dict(path, slot="swinir", layout="a SwinIR state dict")
    with torch.device("meta"):
        model = SwinIR(**dict(FACE_SWINIR_V1 if config is None else config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(state, expected, "swinir", path)
    extra = [k for k in state if k not in expected]
    if extra:
        reason = f"{len(extra)} unexpected tensors, e.g. {', '.join(extra[:3])} (a SwinIR of another configuration)"
        raise CheckpointError("swinir", path, reason)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError("swinir", path, f"cannot load: {str(err).splitlines()[0]}") from None
    return cast_module(model, device, dtype).eval().requires_grad_(False)
