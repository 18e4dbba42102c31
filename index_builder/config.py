"""The ``rebuild`` pipeline's configuration: typed dataclasses, read from JSON at the edge.

The library takes plain keyword arguments; this module is the one place where a config
file becomes those arguments (STYLE.md rule 3). Unknown keys are errors, so a typo in a
config file never silently falls back to a default.

Profiles: ``cpu-small`` (the default; what ``make demo`` runs on 2 cores in minutes) and
``gpu`` (bigger inputs and longer schedules for a machine with a GPU). A config file may
name a profile and override any field: ``{"profile": "cpu-small", "embedder": {"epochs": 8}}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DedupConfig:
    enabled: bool = True
    radius: int | None = None  # pHash Hamming radius; None: the dedup stage's default
    #: colour check of near-duplicates (relative chroma difference); None: the stage's
    #: default (visearch.cleaning.dedup.COLOR_TOL), a negative value turns it off
    color_tol: float | None = None
    workers: int = 2


@dataclass
class DetectorConfig:
    enabled: bool = True
    #: where its training boxes come from: "coco" (given detection annotations), "catalog"
    #: (copy-paste scenes made from the catalog's own cut-outs), "auto" (coco when given or
    #: found beside the catalog, else catalog)
    source: str = "auto"
    #: the detector's classes: "category" (the catalog's categories), "product" (one class:
    #: the category is voted anyway) or "main" ("main" and "other": it learns which object
    #: the photo is of from scenes that mark it; COCO files without main marks fall back to
    #: "category"). Measured in benchmarks/RESULTS.md (catalog-only photo search).
    labels: str = "main"
    #: semi-supervised rounds on --unlabelled-photos (label-detection), when given
    rounds: int = 1
    backbone: str = "mobilenet_v2_fpn"
    min_size: int = 96
    max_size: int = 96
    epochs: int = 12  # bench_detector: val mAP@.5 ~0.26 at 12 epochs on this CPU
    batch_size: int = 8
    lr: float = 2e-3
    score_thresh: float = 0.1  # main-object floor (detector.MAIN_SCORE_THRESH)


@dataclass
class ScenesConfig:
    """Copy-paste scenes made from catalog cut-outs: the detector's training data when no
    detection annotations are given, and user-photo-like crops for the embedder."""

    #: scenes = this x usable cut-outs. On the demo's world 1.0 found the main object in
    #: 0.843 of the user photos against 0.817 at 0.5 (12 epochs each; twice the training)
    scenes_per_object: float = 1.0
    image_size: int = 128
    max_distractors: int = 3
    crops_per_scene: int = 1
    crop_jitter: float = 0.15  # detector-like box jitter, fraction of the box per side
    val_fraction: float = 0.1
    #: cut-outs below this quality score are not pasted (bench_cutout: 0.3 drops 1 % of the
    #: usable cut-outs, most of them wrong, and keeps 98.7 % at mask IoU >= 0.9)
    min_quality: float = 0.3
    #: train the embedder on the crops too (query-domain training), mixed with shop images
    query_domain: bool = True
    #: detector epochs on synthesized scenes (None: detector.epochs)
    detector_epochs: int | None = None


@dataclass
class CleanConfig:
    enabled: bool = True
    eps: float = 0.25
    return_thresh: float = 0.4  # best F1 in benchmarks.bench_cleaning (step 1 + 2)


@dataclass
class MergeConfig:
    enabled: bool = True
    #: "calibrated" (mutual confusion + embedding evidence at a false-merge rate; weaker
    #: pairs go to review) or "confusion" (the symmetrised-confusion schedule below)
    rule: str = "calibrated"
    false_merge_rate: float = 0.01
    review_rate: float = 0.1
    min_confusion: float = 0.15
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.4, 0.3])


@dataclass
class EmbedderConfig:
    """Defaults: the best measured CPU recipe (benchmarks.bench_embedder on a 400-SKU world,
    400 steps: user-photo R@1 0.54 / 0.575 over seeds 0 / 1, vs 0.49 / 0.47 with random
    erasing and 0.22 for the untrained ImageNet backbone)."""

    backbone: str = "mobilenet_v2"
    dim: int = 256
    pooling: str = "gem"
    attention: bool = False
    loss: str = "arcface"
    triplet_weight: float = 0.0
    epochs: int = 1
    steps_per_epoch: int | None = 400
    p: int = 16
    k: int = 4
    image_size: int = 96
    lr: float = 2e-3
    margin: float | None = 0.2  # ArcFace/CosFace margin; s=30, m=0.5 collapse on short runs
    scale: float | None = 16.0
    backbone_lr_mult: float = 0.3
    frozen_blocks: int = 7
    augment: str | None = "strong"  # wild-photo augmentation: +0.13 R@1 on user photos
    #: random erasing probability; it cost 0.05 / 0.11 R@1 (seeds 0 / 1) on top of the strong
    #: augmentation in 400 steps. The gpu profile keeps the reference design's 0.5 (unmeasured)
    erasing: float = 0.0
    freeze_bn: bool = True  # keep the trunk's ImageNet BN statistics: +0.075 R@1
    pretrained: str | None = "weights/mobilenet_v2-b0353104.pth"
    #: the first-pass model whose embeddings drive denoising and merging
    cleaning_epochs: int = 1
    cleaning_steps_per_epoch: int | None = 150


@dataclass
class IndexConfig:
    factory: str | None = None  # None: chosen by gallery size
    k1: int = 21  # the graph row holds the item itself, so re-ranking with k1=20 needs 21
    graph_nprobe: int | None = None  # None: the index's search default
    graph_ef_search: int | None = None


@dataclass
class RebuildConfig:
    profile: str = "cpu-small"
    seed: int = 0
    workers: int = 2
    lenient: bool = False
    dedup: DedupConfig = field(default_factory=DedupConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    scenes: ScenesConfig = field(default_factory=ScenesConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DETECTOR_SOURCES = ("auto", "coco", "catalog")
DETECTOR_LABELS = ("category", "product", "main")

PROFILES: dict[str, dict[str, Any]] = {
    "cpu-small": {},
    "gpu": {
        "detector": {"backbone": "resnet50_fpn", "min_size": 512, "max_size": 512,
                     "epochs": 24, "batch_size": 16},
        "embedder": {"backbone": "resnet50", "image_size": 224, "epochs": 30, "p": 32,
                     "steps_per_epoch": None, "frozen_blocks": 0, "cleaning_epochs": 10,
                     "erasing": 0.5,
                     "cleaning_steps_per_epoch": None},
    },
}


def _apply(obj: Any, overrides: dict[str, Any], where: str) -> None:
    """Set fields of dataclass ``obj`` from ``overrides``, recursing into sections."""
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(
                f"unknown config key {where}{key!r}; valid keys: {sorted(names)}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where}{key!r} must be an object")
            _apply(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, value)
    if isinstance(obj, DetectorConfig):
        for key, valid in (("source", DETECTOR_SOURCES), ("labels", DETECTOR_LABELS)):
            if getattr(obj, key) not in valid:
                raise ValueError(f"config key {where}{key!r} must be one of {valid}, "
                                 f"got {getattr(obj, key)!r}")


def load_config(
    path: str | os.PathLike[str] | None = None, *, profile: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> RebuildConfig:
    """A ``RebuildConfig`` from a profile, then a JSON file, then explicit overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"config {path} must hold a JSON object")
    name = profile or data.get("profile", "cpu-small")
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {sorted(PROFILES)}")
    cfg = RebuildConfig(profile=name)
    _apply(cfg, PROFILES[name], "")
    _apply(cfg, {k: v for k, v in data.items() if k != "profile"}, "")
    if overrides:
        _apply(cfg, overrides, "")
    return cfg
