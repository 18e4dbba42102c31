"""The retrieval embedding: backbones, pooling, attention and neck (``model``), metric-learning
losses (``losses``), training (``train``, ``sampler``) and batch inference (``infer``).

The package exports the model and inference API; training is imported by path
(``visearch.embedding.train``) so that serving never imports it.
"""

from visearch.embedding.attention import SpatialAttention
from visearch.embedding.backbones import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, input_norm
from visearch.embedding.heads import Prediction, TaskHeads
from visearch.embedding.infer import (
    embed_arrays,
    embed_arrays_with_heads,
    embed_items,
    load_crop,
    model_device,
    model_transform,
)
from visearch.embedding.model import (
    Embedder,
    build_embedder,
    load_embedder,
    save_embedder,
)
from visearch.embedding.pooling import POOLINGS, AvgPool, GeM

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "POOLINGS",
    "Prediction",
    "TaskHeads",
    "AvgPool",
    "Embedder",
    "GeM",
    "SpatialAttention",
    "build_embedder",
    "embed_arrays",
    "embed_arrays_with_heads",
    "embed_items",
    "input_norm",
    "load_crop",
    "load_embedder",
    "model_device",
    "model_transform",
    "save_embedder",
]
