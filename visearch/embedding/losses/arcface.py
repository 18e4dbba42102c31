"""ArcFace: additive angular margin (Deng et al. 2019)."""

from __future__ import annotations

import math

import torch

from visearch.embedding.losses._cosine import CosineSoftmaxLoss


class ArcFaceLoss(CosineSoftmaxLoss):
    """``CE(s * phi_j, y)`` with ``phi_y = cos(theta_y + m)`` for the true class.

    cos(theta + m) stops decreasing once theta + m passes pi, which would reward pushing an
    embedding *away* from its class. We follow the insightface convention
    (``recognition/arcface_torch/losses.py``, also pytorch-metric-learning's reference):

    - default (``easy_margin=False``): ``phi = cos(theta + m)`` when ``cos(theta) > cos(pi - m)``
      (i.e. theta + m < pi), else the linear continuation ``cos(theta) - m * sin(m)``
      (CosFace-like; insightface's ``mm = sin(pi - m) * m``);
    - ``easy_margin=True``: ``phi = cos(theta + m)`` when ``cos(theta) > 0``, else ``cos(theta)``.

    ``forward(embeddings float [B, D], labels int64 [B]) -> float []``.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        scale: float = 30.0,
        margin: float = 0.5,
        easy_margin: bool = False,
    ) -> None:
        super().__init__(dim, num_classes, scale=scale)
        if not 0 <= margin < math.pi / 2:
            raise ValueError(f"margin must be in [0, pi/2) radians, got {margin}")
        self.margin = float(margin)
        self.easy_margin = bool(easy_margin)

    def target_logits(self, cos_target: torch.Tensor) -> torch.Tensor:
        m = self.margin
        # The clamp keeps sqrt's gradient finite at cos = +-1.
        sin_target = torch.sqrt((1.0 - cos_target.square()).clamp(min=1e-12))
        phi = cos_target * math.cos(m) - sin_target * math.sin(m)
        if self.easy_margin:
            return torch.where(cos_target > 0, phi, cos_target)
        return torch.where(cos_target > math.cos(math.pi - m), phi, cos_target - m * math.sin(m))
