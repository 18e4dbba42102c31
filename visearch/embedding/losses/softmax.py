"""Plain softmax: a linear classifier on the raw embedding (the baseline the margins must beat)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftmaxLoss(nn.Module):
    """``CE(W x + b, y)`` on un-normalised embeddings.

    Also the auxiliary *category head*: train it on the ``"category"`` target of a
    :class:`~visearch.embedding.losses.WeightedLoss`.

    ``forward(embeddings float [B, D], labels int64 [B]) -> float []``.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"need at least 2 classes, got {num_classes}")
        self.fc = nn.Linear(dim, num_classes)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Class scores ``float [B, num_classes]``."""
        return self.fc(embeddings.float())

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(embeddings), labels.long())
