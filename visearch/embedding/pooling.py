"""Global pooling of a feature map into one vector per image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al. 2018) with a learnable exponent ``p``.

    ``(mean(x.clamp(min=eps) ** p)) ** (1/p)`` over the spatial dims: ``p = 1`` is average
    pooling, ``p -> inf`` max pooling. torchvision has no GeM layer, hence this one.

    Input ``float [B, C, H, W]``, output ``float [B, C]``.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learn_p: bool = True) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM exponent p must be > 0, got {p}")
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learn_p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32: x ** p overflows fp16 under autocast for p ~ 3 and large x.
        p = self.p.float()
        x = x.float().clamp(min=self.eps).pow(p)
        return F.adaptive_avg_pool2d(x, 1).flatten(1).pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, eps={self.eps}"


class AvgPool(nn.Module):
    """Global average pooling: ``float [B, C, H, W] -> float [B, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


POOLINGS: dict[str, type[nn.Module]] = {"gem": GeM, "avg": AvgPool}
