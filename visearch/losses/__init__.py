"""Metric-learning losses. Each takes ``(embeddings float [B, D], labels)`` and normalises the
embeddings itself where its formula says so."""

from visearch.losses._cosine import CosineSoftmaxLoss
from visearch.losses.arcface import ArcFaceLoss
from visearch.losses.attributes import AttributeLoss
from visearch.losses.cosface import CosFaceLoss
from visearch.losses.normface import NormFaceLoss
from visearch.losses.softmax import SoftmaxLoss
from visearch.losses.triplet import BatchHardTripletLoss
from visearch.losses.weighted import LossTerm, WeightedLoss

__all__ = [
    "ArcFaceLoss",
    "AttributeLoss",
    "BatchHardTripletLoss",
    "CosFaceLoss",
    "CosineSoftmaxLoss",
    "LossTerm",
    "NormFaceLoss",
    "SoftmaxLoss",
    "WeightedLoss",
]
