"""NormFace: normalised softmax (Wang et al. 2017)."""

from __future__ import annotations

from visearch.embedding.losses._cosine import CosineSoftmaxLoss


class NormFaceLoss(CosineSoftmaxLoss):
    """``CE(s * cos(theta_j), y)``: softmax over scaled cosines, no margin.

    ``forward(embeddings float [B, D], labels int64 [B]) -> float []``.
    """

    def __init__(self, dim: int, num_classes: int, *, scale: float = 16.0) -> None:
        super().__init__(dim, num_classes, scale=scale)
