"""A weighted sum of losses, each reading its own target (SKU, category, attributes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from visearch.embedding.losses.trend import TrendWeights


@dataclass(frozen=True)
class LossTerm:
    """One term of a :class:`WeightedLoss`: ``weight * loss(embeddings, targets[target])``."""

    name: str
    loss: nn.Module
    weight: float = 1.0
    target: str = "sku"


class WeightedLoss(nn.Module):
    """``sum_i w_i * loss_i(embeddings, targets[target_i])``.

    Typical: ArcFace on ``"sku"`` (1.0) + batch-hard triplet on ``"sku"`` (1.0) + a category
    :class:`SoftmaxLoss` on ``"category"`` (0.1) + :class:`AttributeLoss` on ``"attributes"``.

    ``forward(embeddings float [B, D], targets {name: tensor}) -> (total float [], parts)``,
    ``parts`` mapping each term's name to its unweighted value (a detached float tensor).

    With ``trend`` (a :class:`TrendWeights` over some of the terms, usually the auxiliary
    heads), those terms' weights are the trend's current ones, updated during training from
    validation losses; the other terms keep their fixed weights.
    """

    def __init__(self, terms: Sequence[LossTerm], *, trend: TrendWeights | None = None) -> None:
        super().__init__()
        if not terms:
            raise ValueError("WeightedLoss needs at least one LossTerm")
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"loss term names must be unique, got {names}")
        self.losses = nn.ModuleDict({t.name: t.loss for t in terms})
        self.weights = {t.name: float(t.weight) for t in terms}
        self.targets = {t.name: t.target for t in terms}
        if trend is not None and not set(trend.names) <= set(names):
            raise ValueError(f"trend weights name unknown terms {trend.names}; terms: {names}")
        self.trend = trend

    def weight(self, name: str) -> float:
        """Term ``name``'s current weight."""
        if self.trend is not None and name in self.trend.names:
            return self.trend.weight(name)
        return self.weights[name]

    def forward(
        self, embeddings: torch.Tensor, targets: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = embeddings.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for name, loss in self.losses.items():
            key = self.targets[name]
            if key not in targets:
                raise KeyError(f"loss term {name!r} needs target {key!r}; got {sorted(targets)}")
            value = loss(embeddings, targets[key])
            parts[name] = value.detach()
            total = total + self.weight(name) * value
        return total, parts
