"""Retrieval models. The detector lives in ``visearch.models.detector`` (imported by path)."""

from visearch.models.attention import SpatialAttention
from visearch.models.backbones import BACKBONES
from visearch.models.embedder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Embedder,
    build_embedder,
    load_embedder,
    save_embedder,
)
from visearch.models.pooling import POOLINGS, AvgPool, GeM

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "POOLINGS",
    "AvgPool",
    "Embedder",
    "GeM",
    "SpatialAttention",
    "build_embedder",
    "load_embedder",
    "save_embedder",
]
