"""The retrieval embedder: trunk -> (spatial attention) -> pooling -> projection -> BN-neck.

``Embedder.forward`` returns L2-normalised embeddings, so inner product is cosine similarity
(the index searches by inner product). ``forward_features`` returns the same vectors before
normalisation, which is what the losses take (they normalise where their formula says so).
A model may carry :class:`~visearch.embedding.heads.TaskHeads` (category and attribute
classifiers, :meth:`Embedder.set_heads`); ``forward_with_heads`` returns both.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visearch.embedding.attention import SpatialAttention
from visearch.embedding.backbones import BACKBONES, input_norm
from visearch.embedding.heads import TaskHeads
from visearch.embedding.pooling import POOLINGS
from visearch.fileio import atomic_open

logger = logging.getLogger(__name__)

FORMAT = "visearch-embedder/1"


class Embedder(nn.Module):
    """Image -> embedding. Input ``float [B, 3, H, W]`` (normalised with ``config['mean']`` and
    ``config['std']``, H = W = ``config['input_size']`` by convention); output ``float [B, dim]``.

    Build it with :func:`build_embedder`; ``config`` is a plain dict that, with the state dict,
    fully describes the model (it is what :func:`save_embedder` writes).
    """

    def __init__(
        self,
        trunk: nn.Module,
        channels: int,
        *,
        dim: int,
        pooling: nn.Module,
        attention: nn.Module | None,
        config: dict[str, Any],
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.attention = attention if attention is not None else nn.Identity()
        self.pool = pooling
        self.proj = nn.Linear(channels, dim, bias=False)
        # BN-neck (Luo et al. 2019, "Bag of Tricks"): batch-normalised embedding, bias frozen at
        # zero so the normalised vectors stay centred on the origin.
        self.neck = nn.BatchNorm1d(dim)
        self.neck.bias.requires_grad_(False)
        self.config = dict(config)
        self.heads: TaskHeads | None = None

    def set_heads(self, heads: TaskHeads | None) -> None:
        """Attach (or, with None, remove) the category/attribute heads; the config records
        their classes so :func:`save_embedder` / :func:`load_embedder` round-trip them."""
        self.heads = heads
        if heads is None:
            self.config.pop("heads", None)
        else:
            self.config["heads"] = heads.config()

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.config["dim"])

    def forward_features(self, x: torch.Tensor, *, neck: bool = True) -> torch.Tensor:
        """Un-normalised embeddings ``float [B, dim]`` (what the losses take).

        With ``neck=False``, the projection before the BN-neck, i.e. the neck's inputs
        ``float [B, dim]`` (used to set the neck's running statistics).
        """
        fmap = self.attention(self.trunk(x))
        pooled = self.pool(fmap)
        z = self.proj(pooled.to(self.proj.weight.dtype))
        return self.neck(z) if neck else z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings ``float [B, dim]``."""
        return F.normalize(self.forward_features(x).float(), dim=1)

    def forward_with_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(embeddings float [B, dim] L2-normalised, {head name: logits float [B, C]})``;
        the dict is empty when the model has no heads."""
        z = self.forward_features(x).float()
        logits = self.heads(z) if self.heads is not None else {}
        return F.normalize(z, dim=1), logits


def build_embedder(
    backbone: str,
    *,
    dim: int = 256,
    pooling: str = "gem",
    attention: bool = False,
    pretrained: str | os.PathLike[str] | None = None,
    input_size: int = 224,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> Embedder:
    """Build an :class:`Embedder`.

    Args:
        backbone: a name in ``visearch.embedding.BACKBONES``.
        dim: embedding dimension.
        pooling: ``"gem"`` (generalised mean, learnable p) or ``"avg"``.
        attention: insert a :class:`SpatialAttention` block after the trunk.
        pretrained: a local torchvision weights file for the backbone's classification model
            (e.g. ``weights/mobilenet_v2-b0353104.pth``); None trains from scratch.
        input_size: square input side in pixels the model is trained and served at.
        mean, std: per-channel input normalisation (RGB, for values in [0, 1]); None: what
            the backbone's pretrained weights expect (:func:`~.backbones.input_norm`, ImageNet's
            for the torchvision trunks).
    """
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {sorted(POOLINGS)}")
    factory = BACKBONES.get(backbone)
    default_mean, default_std = input_norm(backbone)
    mean = default_mean if mean is None else mean
    std = default_std if std is None else std
    trunk, channels = factory(Path(pretrained) if pretrained is not None else None)
    config = {
        "format": FORMAT,
        "backbone": backbone,
        "dim": int(dim),
        "pooling": pooling,
        "attention": bool(attention),
        "input_size": int(input_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "pretrained": os.fspath(pretrained) if pretrained is not None else None,
    }
    return Embedder(
        trunk,
        channels,
        dim=dim,
        pooling=POOLINGS[pooling](),
        attention=SpatialAttention() if attention else None,
        config=config,
    )


def save_embedder(model: Embedder, path: str | os.PathLike[str]) -> None:
    """Write ``{"config", "state_dict"}`` (tensors on the CPU) to one file, atomically
    (:func:`visearch.fileio.atomic_open`); missing parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_open(path, "wb") as f:
        torch.save({"config": dict(model.config), "state_dict": state}, f)


def load_embedder(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Embedder:
    """Load a model written by :func:`save_embedder`, in eval mode, on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedder file {path} not found")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
        raise ValueError(f"{path} is not a visearch embedder file (no config/state_dict)")
    cfg = blob["config"]
    model = build_embedder(
        cfg["backbone"],
        dim=cfg["dim"],
        pooling=cfg["pooling"],
        attention=cfg["attention"],
        pretrained=None,
        input_size=cfg["input_size"],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )
    if cfg.get("heads"):
        model.set_heads(TaskHeads.from_config(int(cfg["dim"]), cfg["heads"]))
    model.load_state_dict(blob["state_dict"], strict=True)
    model.config = dict(cfg)
    logger.debug("loaded embedder %s from %s", cfg["backbone"], path)
    return model.to(device).eval()
