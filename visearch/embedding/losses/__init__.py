"""Metric-learning losses. Each takes ``(embeddings float [B, D], labels)`` and normalises the
embeddings itself where its formula says so."""

from visearch.embedding.losses._cosine import CosineSoftmaxLoss
from visearch.embedding.losses.arcface import ArcFaceLoss
from visearch.embedding.losses.attributes import AttributeLoss
from visearch.embedding.losses.cosface import CosFaceLoss
from visearch.embedding.losses.hdc import HardAwareCascadeLoss
from visearch.embedding.losses.mutual import mutual_kl
from visearch.embedding.losses.normface import NormFaceLoss
from visearch.embedding.losses.softmax import SoftmaxLoss
from visearch.embedding.losses.trend import TrendWeights
from visearch.embedding.losses.triplet import BatchHardTripletLoss
from visearch.embedding.losses.weighted import LossTerm, WeightedLoss

__all__ = [
    "ArcFaceLoss",
    "AttributeLoss",
    "BatchHardTripletLoss",
    "CosFaceLoss",
    "CosineSoftmaxLoss",
    "HardAwareCascadeLoss",
    "LossTerm",
    "NormFaceLoss",
    "SoftmaxLoss",
    "TrendWeights",
    "WeightedLoss",
    "mutual_kl",
]
