"""Auxiliary attribute heads (multi-task): one linear classifier per attribute."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -1


class AttributeLoss(nn.Module):
    """Mean over attributes of ``CE(W_a x + b_a, y_a)``, on un-normalised embeddings.

    ``labels`` is ``int64 [B, A]``: the value index of attribute ``a`` for each image, or
    ``-1`` where unknown (ignored). Attributes with no known value in the batch are skipped.

    ``forward(embeddings float [B, D], labels int64 [B, A]) -> float []``.
    """

    def __init__(self, dim: int, num_values: Sequence[int]) -> None:
        super().__init__()
        if not num_values or min(num_values) < 1:
            raise ValueError(f"need at least one attribute with >= 1 value, got {num_values}")
        self.heads = nn.ModuleList(nn.Linear(dim, int(n)) for n in num_values)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.dim() != 2 or labels.shape[1] != len(self.heads):
            raise ValueError(
                f"attribute labels must be [B, {len(self.heads)}], got {tuple(labels.shape)}"
            )
        x = embeddings.float()
        terms = []
        for a, head in enumerate(self.heads):
            y = labels[:, a].long()
            if bool((y != IGNORE).any()):
                terms.append(F.cross_entropy(head(x), y, ignore_index=IGNORE))
        if not terms:
            return x.sum() * 0.0
        return torch.stack(terms).mean()
