"""CosFace: additive cosine margin (Wang et al. 2018, "Large Margin Cosine Loss")."""

from __future__ import annotations

import torch

from visearch.embedding.losses._cosine import CosineSoftmaxLoss


class CosFaceLoss(CosineSoftmaxLoss):
    """``CE(s * (cos(theta_j) - m * [j == y]), y)``.

    ``forward(embeddings float [B, D], labels int64 [B]) -> float []``.
    """

    def __init__(
        self, dim: int, num_classes: int, *, scale: float = 30.0, margin: float = 0.35
    ) -> None:
        super().__init__(dim, num_classes, scale=scale)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = float(margin)

    def target_logits(self, cos_target: torch.Tensor) -> torch.Tensor:
        return cos_target - self.margin
