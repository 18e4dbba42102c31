"""Hard-aware cascaded contrastive loss, after Yuan, Yang & Zhang, "Hard-Aware Deeply
Cascaded Embedding" (HDC), ICCV 2017."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _count(fraction: float, n: int) -> int:
    """``ceil(fraction * n)``, at least 1 (the tolerance keeps 0.1 * 30 at 3, not 4)."""
    return max(1, math.ceil(fraction * n - 1e-9))


class HardAwareCascadeLoss(nn.Module):
    """A cascade of contrastive losses, each level on a harder subset of the batch's pairs.

    HDC trains a cascade of models of growing depth, each on the pairs the previous one
    found hard. With one embedding we keep its mining: every level reads the same
    L2-normalised embeddings ``x`` and cosines ``s_ij = x_i . x_j``. Over the unordered pairs
    ``i < j`` of the batch, ``P`` are the same-label pairs and ``N`` the others. Level ``l``
    keeps the ``ceil(f_l |P|)`` positives of lowest cosine (``P_l``) and the ``ceil(f_l |N|)``
    negatives of highest cosine (``N_l``), at least one of each when any exist; with
    non-increasing ``fractions`` each level's pairs are the hardest of the previous level's.
    Hardness is ranked on detached cosines (ties in row-major pair order)::

        L_l  = mean_{(i,j) in P_l} (1 - s_ij)  +  mean_{(i,j) in N_l} relu(s_ij - margin)^2
        loss = sum_l w_l L_l / sum_l w_l

    ``1 - s_ij`` is half the squared Euclidean distance of the unit vectors (HDC's positive
    term); a mean over an empty set is left out, and the loss is 0 (with a gradient graph)
    when the batch has no pair at all.

    Args:
        fractions: per level, the share of all positive (negative) pairs it keeps, in (0, 1],
            non-increasing; the default levels use all, the hardest half and quarter.
        weights: per level ``w_l >= 0`` (default all 1), not all 0.
        margin: cosine below which a negative pair costs nothing, in [-1, 1).

    ``forward(embeddings float [B, D], labels int64 [B]) -> float []``.
    """

    def __init__(
        self,
        fractions: Sequence[float] = (1.0, 0.5, 0.25),
        weights: Sequence[float] | None = None,
        *,
        margin: float = 0.4,
    ) -> None:
        super().__init__()
        fr = [float(f) for f in fractions]
        if not fr or any(not 0 < f <= 1 for f in fr) or fr != sorted(fr, reverse=True):
            raise ValueError(f"fractions must be non-increasing values in (0, 1], got {fr}")
        w = [1.0] * len(fr) if weights is None else [float(v) for v in weights]
        if len(w) != len(fr) or any(v < 0 for v in w) or sum(w) <= 0:
            raise ValueError(
                f"weights must be {len(fr)} values >= 0 (one per level), not all 0; got {w}"
            )
        if not -1 <= margin < 1:
            raise ValueError(f"margin must be a cosine in [-1, 1), got {margin}")
        self.fractions = fr
        self.level_weights = w
        self.margin = float(margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = embeddings if embeddings.dtype == torch.float64 else embeddings.float()
        x = F.normalize(x, dim=1)
        i, j = torch.triu_indices(len(x), len(x), offset=1, device=x.device)
        s = (x[i] * x[j]).sum(1)
        same = labels.view(-1)[i] == labels.view(-1)[j]
        pos, neg = s[same], s[~same]
        if not len(pos) and not len(neg):
            return x.sum() * 0.0
        pos = pos[torch.sort(pos.detach(), stable=True).indices]  # hardest (lowest) first
        neg = neg[torch.sort(neg.detach(), descending=True, stable=True).indices]
        total = x.new_zeros(())
        for f, w in zip(self.fractions, self.level_weights, strict=True):
            level = x.new_zeros(())
            if len(pos):
                level = level + (1 - pos[: _count(f, len(pos))]).mean()
            if len(neg):
                level = level + F.relu(neg[: _count(f, len(neg))] - self.margin).square().mean()
            total = total + w * level
        return total / sum(self.level_weights)
