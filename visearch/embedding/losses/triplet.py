"""Batch-hard triplet loss (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchHardTripletLoss(nn.Module):
    """For each anchor: ``relu(max_p d(a, p) - min_n d(a, n) + margin)``, averaged over the
    anchors that have at least one positive and one negative in the batch (0 when none do).

    ``d`` is the Euclidean distance between L2-normalised embeddings (in [0, 2]) when
    ``normalize`` (default), else between the raw embeddings. Needs P x K batches (K >= 2).

    ``forward(embeddings float [B, D], labels int64 [B]) -> float []``.
    """

    def __init__(self, margin: float = 0.3, *, normalize: bool = True) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.normalize = bool(normalize)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = embeddings.float()
        if self.normalize:
            x = F.normalize(x, dim=1)
        # Squared distances by the Gram trick, clamped so sqrt has a finite gradient at 0.
        sq = x.square().sum(1)
        dist = (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp(min=1e-12).sqrt()
        same = labels.view(-1, 1) == labels.view(1, -1)
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos = same & ~eye
        neg = ~same
        valid = pos.any(1) & neg.any(1)
        if not bool(valid.any()):
            return x.sum() * 0.0
        hardest_pos = dist.masked_fill(~pos, float("-inf")).amax(1)
        hardest_neg = dist.masked_fill(~neg, float("inf")).amin(1)
        losses = F.relu(hardest_pos - hardest_neg + self.margin)
        return losses[valid].mean()
