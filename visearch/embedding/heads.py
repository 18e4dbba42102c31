"""The embedder's understanding heads: a category classifier and one classifier per catalog
attribute, on the embedding before normalisation (the BN-neck's output, what the training
losses :class:`~visearch.embedding.losses.SoftmaxLoss` and
:class:`~visearch.embedding.losses.AttributeLoss` train).

They are trained as auxiliary multi-task losses; after training their weights are copied
here (:func:`TaskHeads.from_loss`), saved with the model and served: one small matrix product
per head on a vector the search computes anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Prediction:
    """One head's top-k: ``values`` best first with their softmax probabilities."""

    values: tuple[str, ...]
    scores: tuple[float, ...]


class TaskHeads(nn.Module):
    """Linear classifiers on un-normalised embeddings ``float [B, dim]``.

    Args:
        dim: embedding dimension.
        categories: the category head's classes (empty: no category head).
        attributes: attribute name -> its values, in the order of the head's outputs.

    ``forward(features float [B, dim]) -> {"category": float [B, C], "attr.<name>":
    float [B, V_name]}`` raw logits (only the heads that exist).
    """

    def __init__(
        self, dim: int, categories: Sequence[str], attributes: Mapping[str, Sequence[str]]
    ) -> None:
        super().__init__()
        self.categories = [str(c) for c in categories]
        self.attributes = {str(a): [str(v) for v in vals] for a, vals in attributes.items()}
        if len(self.categories) == 1:
            raise ValueError("a category head needs at least 2 categories (or none)")
        if any(not vals for vals in self.attributes.values()):
            raise ValueError(f"every attribute head needs values, got {self.attributes}")
        self.category = nn.Linear(dim, len(self.categories)) if self.categories else None
        self.attribute = nn.ModuleDict(
            {a: nn.Linear(dim, len(vals)) for a, vals in self.attributes.items()})

    @property
    def names(self) -> list[str]:
        """Output names, in :meth:`forward`'s order (``"category"`` first when present)."""
        return (["category"] if self.category is not None else []) + [
            f"attr.{a}" for a in self.attributes]

    def labels(self, name: str) -> list[str]:
        """The classes of output ``name``."""
        return self.categories if name == "category" else self.attributes[name[len("attr."):]]

    def config(self) -> dict[str, Any]:
        """What :meth:`from_config` needs (stored in the embedder's config)."""
        return {"categories": list(self.categories),
                "attributes": {a: list(v) for a, v in self.attributes.items()}}

    @classmethod
    def from_config(cls, dim: int, cfg: Mapping[str, Any]) -> TaskHeads:
        return cls(dim, cfg.get("categories", []), cfg.get("attributes", {}))

    @classmethod
    def from_loss(
        cls, dim: int, loss: nn.Module, categories: Sequence[str],
        attributes: Mapping[str, Sequence[str]],
    ) -> TaskHeads | None:
        """Heads holding copies of the trained classifiers of a
        :class:`~visearch.embedding.losses.WeightedLoss`: its term on target ``"category"``
        (a :class:`SoftmaxLoss`) and on ``"attributes"`` (an :class:`AttributeLoss`, heads in
        ``attributes``' order). None when it has neither."""
        from visearch.embedding.losses import AttributeLoss, SoftmaxLoss

        cat_fc = attr_heads = None
        for name, term in loss.losses.items():  # type: ignore[union-attr]
            target = loss.targets[name]  # type: ignore[index]
            if target == "category" and isinstance(term, SoftmaxLoss):
                cat_fc = term.fc
            elif target == "attributes" and isinstance(term, AttributeLoss):
                attr_heads = term.heads
        if cat_fc is None and attr_heads is None:
            return None
        if attr_heads is not None and len(attr_heads) != len(attributes):
            raise ValueError(f"{len(attr_heads)} attribute heads for {len(attributes)} names")
        heads = cls(dim, categories if cat_fc is not None else [],
                    attributes if attr_heads is not None else {})
        with torch.no_grad():
            if cat_fc is not None and heads.category is not None:
                heads.category.load_state_dict(_cpu(cat_fc.state_dict()))
            if attr_heads is not None:
                for name, src in zip(heads.attribute, attr_heads, strict=True):
                    heads.attribute[name].load_state_dict(_cpu(src.state_dict()))
        return heads

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        x = features.float()
        out: dict[str, torch.Tensor] = {}
        if self.category is not None:
            out["category"] = self.category(x)
        for a, head in self.attribute.items():
            out[f"attr.{a}"] = head(x)
        return out

    def top_k(self, logits: Mapping[str, np.ndarray], k: int = 5) -> dict[str, Prediction]:
        """One image's logits (``{name: float [C]}``, as :meth:`forward` names them) ->
        ``{name: Prediction}`` with the ``k`` most probable classes (softmax), best first,
        ties by class order."""
        return {name: top_k_prediction(np.asarray(v), self.labels(name), k)
                for name, v in logits.items()}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``float [..., C]`` (float64 for stability)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k_prediction(logits: np.ndarray, labels: Sequence[str], k: int) -> Prediction:
    """``float [C]`` logits over ``labels`` -> the ``k`` most probable, best first."""
    p = softmax(np.asarray(logits).reshape(-1))
    if len(p) != len(labels):
        raise ValueError(f"{len(p)} logits for {len(labels)} labels")
    order = np.argsort(-p, kind="stable")[: max(0, k)]
    return Prediction(tuple(labels[i] for i in order), tuple(float(p[i]) for i in order))


def _cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}
