"""A spatial attention block (where to look), not channel attention (what to look for).

The reference design found spatial attention helps same-item retrieval and channel attention
hurts; this is the spatial half of CBAM (Woo et al. 2018), which torchvision does not ship.
"""

from __future__ import annotations

import torch
from torch import nn


class SpatialAttention(nn.Module):
    """Reweight every location of a feature map by a learned mask in (0, 1).

    The mask is ``sigmoid(conv([mean_c(x), max_c(x)]))``: a 2-channel summary of each location
    through a ``kernel_size`` convolution. The block is residual, ``x * (1 + mask)``, so a fresh
    block starts close to identity and cannot wipe out a pretrained trunk's features.

    Input and output ``float [B, C, H, W]``.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=True)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The attention mask, ``float [B, 1, H, W]`` in (0, 1)."""
        summary = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(summary))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1.0 + self.mask(x))
