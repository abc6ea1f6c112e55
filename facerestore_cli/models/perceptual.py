"""A perceptual distance in the restorer's own VAE-encoder feature space (no ImageNet backbone
is available offline): used as a training loss and as LRPO's fidelity reward.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class EncoderPerceptualLoss(nn.Module):
    """LPIPS-style distance on the activations of a frozen copy of a VAE encoder's down blocks.

    Each level's features are unit-normalised along channels, so every level counts alike
    whatever its scale; the loss is the mean L1 between the normalised maps, summed over levels.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        enc = copy.deepcopy(encoder).float().eval()
        enc.requires_grad_(False)
        self.conv_in = enc.conv_in
        self.blocks = enc.down_blocks

    def train(self, mode: bool = True) -> "EncoderPerceptualLoss":
        return super().train(False)  # frozen: norm layers never switch to training behaviour

    def features(self, x: Tensor) -> list[Tensor]:
        h, out = self.conv_in(x.float()), []
        for block in self.blocks:
            h = block(h)
            out.append(h / (h.norm(dim=1, keepdim=True) + 1e-6))
        return out

    def distance(self, x: Tensor, target: Tensor) -> Tensor:
        """Per-sample distance (B,): the mean L1 of each level's normalised maps, summed over levels."""
        with torch.no_grad():
            ref = self.features(target)
        return sum((a - b).abs().flatten(1).mean(1) for a, b in zip(self.features(x), ref))

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return self.distance(x, target).mean()
