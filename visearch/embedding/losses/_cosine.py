"""Shared base of the normalised-softmax family (NormFace, CosFace, ArcFace)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CosineSoftmaxLoss(nn.Module):
    """Cross-entropy over ``scale * f(cos(theta))``, theta the angle between the normalised
    embedding and its normalised class weight. Subclasses define ``f`` for the true class in
    :meth:`target_logits`; other classes keep ``cos(theta)``.

    ``forward(embeddings float [B, D], labels int64 [B] in [0, num_classes)) -> float []``.
    """

    def __init__(self, dim: int, num_classes: int, *, scale: float) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"need at least 2 classes, got {num_classes}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(dim))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine to every class centre, ``float [B, num_classes]`` in [-1, 1]."""
        cos = F.normalize(embeddings.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).T
        return cos.clamp(-1.0, 1.0)

    def target_logits(self, cos_target: torch.Tensor) -> torch.Tensor:
        """Margin applied to the true class's cosine ``float [B]`` (identity by default)."""
        return cos_target

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Margin-free class scores ``scale * cos``, ``float [B, num_classes]`` (for inference)."""
        return self.scale * self.cosine(embeddings)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(embeddings)
        labels = labels.long().view(-1, 1)
        target = self.target_logits(cos.gather(1, labels).squeeze(1))
        logits = cos.scatter(1, labels, target.unsqueeze(1))
        return F.cross_entropy(self.scale * logits, labels.squeeze(1))
