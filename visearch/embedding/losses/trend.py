"""Automatic task weights from each task's validation-loss trend.

After the design of He et al., "Adaptively Weighted Multi-task Deep Network for Person
Attribute Classification" (ACM MM 2017): the main task keeps a fixed, high weight; every
so many steps the auxiliary tasks' losses are measured on held-out images, and a task whose
validation loss stops falling (a hard or noisy task) gets a larger share of the auxiliary
weight budget, a task that is learning quickly a smaller one.

Our reading of the rule, for auxiliary task ``j`` at update ``t`` (``L_j(t)`` its
validation loss, ``L_j(0)`` the first measurement):

- trend ``r_j = L_j(t) / L_j(t - 1)`` (below 1: still improving; near or above 1: stalled);
- difficulty ``d_j = L_j(t) / L_j(0)`` (the share of its first loss still left);
- ``w_j = lo + (B - n * lo) * s_j / sum_i s_i`` with ``s_j = max(r_j * d_j, eps)``, ``B``
  the sum of the auxiliary tasks' configured weights (the budget stays what the fixed
  configuration gives them), ``n`` their number and ``lo = floor * B / n`` the least any
  task keeps (a task never drops out of training).

No library implements this weighting (multi-task libraries ship uncertainty weighting or
GradNorm, which learn weights from training gradients, not validation trends), so it is
written here; it is a few lines of arithmetic on measured losses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


class TrendWeights(nn.Module):
    """The auxiliary tasks' weights, updated from validation losses by :meth:`update`.

    Args:
        names: the auxiliary loss terms it governs (names of
            :class:`~visearch.embedding.losses.WeightedLoss` terms).
        initial: their starting weights (``float``, each > 0); their sum is the budget.
        floor: the smallest share of an equal split a task can fall to (0..1).

    State (buffers, so checkpoints carry it): ``weights float [n]``, ``first float [n]``,
    ``last float [n]`` (validation losses), ``updates int64 []``.
    """

    def __init__(self, names: Sequence[str], initial: Sequence[float], *,
                 floor: float = 0.25) -> None:
        super().__init__()
        if not names or len(names) != len(initial):
            raise ValueError(f"need one initial weight per name, got {names} / {initial}")
        if min(initial) <= 0:
            raise ValueError(f"initial weights must be > 0, got {list(initial)}")
        if not 0 <= floor <= 1:
            raise ValueError(f"floor must be in [0, 1], got {floor}")
        self.names = [str(n) for n in names]
        self.floor = float(floor)
        w = torch.tensor([float(v) for v in initial], dtype=torch.float64)
        self.register_buffer("weights", w)
        self.register_buffer("first", torch.zeros_like(w))
        self.register_buffer("last", torch.zeros_like(w))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    @property
    def budget(self) -> float:
        return float(self.weights.sum())

    def weight(self, name: str) -> float:
        return float(self.weights[self.names.index(name)])

    def as_dict(self) -> dict[str, float]:
        return {n: float(w) for n, w in zip(self.names, self.weights, strict=True)}

    def update(self, val_losses: Mapping[str, float]) -> dict[str, float]:
        """Record one measurement of every governed task's validation loss (finite, > 0)
        and reweight (the first measurement only records). Returns the new weights."""
        missing = [n for n in self.names if n not in val_losses]
        if missing:
            raise KeyError(f"validation losses lack {missing}")
        now = torch.tensor([float(val_losses[n]) for n in self.names], dtype=torch.float64)
        if not bool(torch.isfinite(now).all()) or bool((now <= 0).any()):
            raise ValueError(f"validation losses must be finite and > 0, got {now.tolist()}")
        if int(self.updates) == 0:
            self.first.copy_(now)
        else:
            trend = now / self.last
            difficulty = now / self.first
            score = (trend * difficulty).clamp(min=1e-6)
            budget = self.budget
            lo = self.floor * budget / len(self.names)
            self.weights.copy_(lo + (budget - len(self.names) * lo) * score / score.sum())
        self.last.copy_(now)
        self.updates += 1
        return self.as_dict()
