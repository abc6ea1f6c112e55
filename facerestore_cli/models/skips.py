"""Skip fusion: the degraded image's own encoder features offered to the VAE decoder.

Why: at this project's scale the latent (16 channels at 1/8 size) cannot carry every detail
that makes a face *that* person, so a restorer whose only path to the image is the latent
loses identity even on mildly degraded inputs that already show it (benchmarks/RESULTS.md).
Face restorers that keep identity (CodeFormer's controllable feature transformation, GFPGAN's
spatial feature transform) give the decoder the input's features at full detail, and let it
learn where to trust them. This is that idea on the OSEDiff form: for each decoder up block
named in `RestorerConfig.skip_levels`, the encoder activation of the same resolution and the
decoder's own activation go through a small conv whose zero-initialised output is *added*
to the decoder's activation. Zero init means a model with fresh fusion restores exactly as
before, so it is trained on top of a finished restorer (decoder + fusion, encoder and UNet frozen).

Level `len(up blocks)` (4 for the tiny VAE) is the output gate (`OutputGate`): a per-pixel
weight g in [-1, 1] moves the decoded image towards the input, `out = decoded + g * (input -
decoded)`. Features pass through the decoder's norms and convs only approximately; the gate lets
a face that needs little restoration keep its own pixels exactly, which is where the latent path
loses identity. In the runs so far it learned a near-constant blend rather than one that follows
the degradation, so the bundled model does not use it (benchmarks/RESULTS.md, "Where the
mild-set identity is lost").

The encoder and decoder are run block by block here (the same calls as diffusers' `Encoder`
and `Decoder` forward) so the activations can be taken and given back.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

#: Encoder activations by scale: entry k is at 1/2**k of the image size (k = 0: after conv_in);
#: the last entry is the input image itself (for the output gate).
Skips = list[Tensor]


def decoder_input_channels(block_out_channels: Sequence[int], level: int) -> int:
    """Channels entering decoder up block `level` (0 reads the mid block's output)."""
    rev = list(reversed(block_out_channels))
    return rev[0] if level == 0 else rev[level - 1]


def encoder_scale_for(num_blocks: int, level: int) -> int:
    """Which encoder activation (1/2**k of the image) matches decoder up block `level`'s input."""
    return num_blocks - 1 - level


def encoder_channels(block_out_channels: Sequence[int], scale: int) -> int:
    """Channels of the encoder activation at 1/2**scale of the image."""
    return block_out_channels[0] if scale == 0 else block_out_channels[scale - 1]


def norm_groups(channels: int, groups: int) -> int:
    """The VAE's GroupNorm group count where it divides `channels`, else 1."""
    return groups if channels % groups == 0 else 1


class FuseBlock(nn.Module):
    """decoder activation + conv(concat(encoder activation, decoder activation)), zero at init."""

    def __init__(self, enc_ch: int, dec_ch: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(groups, enc_ch + dec_ch), nn.Conv2d(enc_ch + dec_ch, dec_ch, 3, padding=1), nn.SiLU(), nn.Conv2d(dec_ch, dec_ch, 1)
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, dec: Tensor, enc: Tensor) -> Tensor:
        return dec + self.body(torch.cat([enc.to(dec.dtype), dec], 1))


class OutputGate(nn.Module):
    """decoded + g * (input - decoded), g = tanh(local + global term): zero at init.

    The local term is a conv of the decoder's last and the encoder's first activation (where in
    the face); the global one reads the mean and spread of the encoder's deepest activation (how
    degraded the whole face is), so a clean face and a ruined one can get different gates even
    where their pixels look alike."""

    def __init__(self, ch: int, deep_ch: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(groups, 2 * ch), nn.Conv2d(2 * ch, ch, 1), nn.SiLU(), nn.Conv2d(ch, 1, 3, padding=1))
        self.context = nn.Sequential(nn.Linear(2 * deep_ch, 32), nn.SiLU(), nn.Linear(32, 1))
        for last in (self.body[-1], self.context[-1]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        #: the gate of the last training forward, for the training loss's penalty on it (`losses.gate`).
        self.last_gate: Tensor | None = None

    def forward(self, decoded: Tensor, h: Tensor, enc: Tensor, deep: Tensor, image: Tensor) -> Tensor:
        deep = deep.to(h.dtype).flatten(2)
        stats = torch.cat([deep.mean(-1), deep.std(-1)], 1)
        logit = self.body(torch.cat([enc.to(h.dtype), h], 1)) + self.context(stats)[:, :, None, None]
        g = torch.tanh(logit)
        if self.training:
            self.last_gate = g
        return decoded + g.to(decoded.dtype) * (image.to(decoded.dtype) - decoded)


class SkipFusion(nn.Module):
    """One `FuseBlock` per decoder up block in `levels`, and the `OutputGate` if `levels` has
    the level after the last up block (keys are the level numbers as strings)."""

    def __init__(self, vae_config: dict, levels: Sequence[int]) -> None:
        super().__init__()
        ch = list(vae_config.get("block_out_channels", (64,)))  # levels were checked by RestorerConfig
        self.num_blocks = len(ch)
        groups = int(vae_config.get("norm_num_groups", 32))
        self.blocks = nn.ModuleDict()
        for lv in levels:
            if lv == self.num_blocks:
                self.blocks[str(lv)] = OutputGate(ch[0], ch[-1], norm_groups(2 * ch[0], groups))
                continue
            enc_ch = encoder_channels(ch, encoder_scale_for(len(ch), lv))
            dec_ch = decoder_input_channels(ch, lv)
            self.blocks[str(lv)] = FuseBlock(enc_ch, dec_ch, norm_groups(enc_ch + dec_ch, groups))

    def fuse(self, level: int, h: Tensor, skips: Skips) -> Tensor:
        block = self.blocks[str(level)] if str(level) in self.blocks else None
        return h if block is None else block(h, skips[encoder_scale_for(self.num_blocks, level)])

    @property
    def output_gate(self) -> OutputGate | None:
        key = str(self.num_blocks)
        return self.blocks[key] if key in self.blocks else None  # type: ignore[return-value]

    def gate(self, decoded: Tensor, h: Tensor, skips: Skips) -> Tensor:
        """The decoded image, moved towards the input image by the output gate if there is one."""
        block = self.output_gate
        return decoded if block is None else block(decoded, h, skips[0], skips[-2], skips[-1])


def encode_moments(vae: AutoencoderKL, x: Tensor) -> tuple[Tensor, Skips]:
    """The posterior moments of `vae.encode(x)`, and the encoder's activations at every scale followed by x."""
    enc = vae.encoder
    h = enc.conv_in(x)
    skips = [h]
    for block in enc.down_blocks:
        h = block(h)
        skips.append(h)
    h = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(h))))
    skips.append(x)
    return (vae.quant_conv(h) if vae.quant_conv is not None else h), skips


def decode_fused(vae: AutoencoderKL, z: Tensor, fusion: SkipFusion, skips: Skips) -> Tensor:
    """`vae.decode(z).sample` with the fusion applied before each chosen up block (and the gate after)."""
    dec = vae.decoder
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    h = dec.mid_block(dec.conv_in(z), None)
    for level, block in enumerate(dec.up_blocks):
        h = block(fusion.fuse(level, h, skips), None)
    return fusion.gate(dec.conv_out(dec.conv_act(dec.conv_norm_out(h))), h, skips)
