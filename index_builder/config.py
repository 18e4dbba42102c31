"""The ``rebuild`` pipeline's configuration: typed dataclasses, read from JSON at the edge.

The library takes plain keyword arguments; this module is the one place where a config
file becomes typed values (STYLE.md rule 3). Every value is checked on load against its
field's type (``bool``, ``int``, ``float``, ``str``, ``Literal`` choices, ``X | None``,
``list[float]``, nested sections), its range where it has an obvious one, and, for model,
loss and augmentation names, against the registry that resolves it. Unknown keys are
errors, so a typo in a config file never silently falls back to a default. Each error
names the key path and what was expected.

Profiles: ``cpu-small`` (the default; what ``make demo`` runs on 2 cores in minutes) and
``gpu`` (bigger inputs and longer schedules for a machine with a GPU). A config file may
name a profile and override any field: ``{"profile": "cpu-small", "embedder": {"epochs": 8}}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

#: ``field`` metadata keys read by the validator: bounds (with their operators) and names
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<="}
_NAMES = "names"


def _checked(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    names: Callable[[], Sequence[str]] | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field whose value (each element, for a list; unless None) must lie in
    ``[ge, le]`` / above ``gt``, or be one of ``names()`` (a registry's names, looked up
    when a config is loaded)."""
    meta = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), (_NAMES, names))
            if v is not None}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# Registry names, imported when a config is validated (the registries import torch).
def _embedder_backbones() -> list[str]:
    from visearch.embedding import BACKBONES

    return BACKBONES.names()


def _poolings() -> list[str]:
    from visearch.embedding import POOLINGS

    return sorted(POOLINGS)


def _losses() -> list[str]:
    from index_builder.cmd_embedder import LOSSES

    return LOSSES.names()


def _augments() -> list[str]:
    from visearch.transforms import AUGMENTS

    return list(AUGMENTS)


def _detector_backbones() -> list[str]:
    from visearch.detection.model import DETECTOR_BACKBONES

    return DETECTOR_BACKBONES.names()


DetectorSource = Literal["auto", "coco", "catalog"]
DetectorLabels = Literal["category", "product", "main"]
MergeRule = Literal["calibrated", "confusion"]
TaskWeights = Literal["fixed", "auto"]
EmbedderSampler = Literal["pk", "lookalike"]


@dataclass(frozen=True)
class DedupConfig:
    enabled: bool = True
    radius: int | None = _checked(None, ge=0)  # pHash Hamming radius; None: the stage's default
    #: colour check of near-duplicates (relative chroma difference); None: the stage's
    #: default (visearch.cleaning.dedup.COLOR_TOL), a negative value turns it off
    color_tol: float | None = None
    workers: int = _checked(2, ge=1)


@dataclass(frozen=True)
class DetectorConfig:
    enabled: bool = True
    #: where its training boxes come from: "coco" (given detection annotations), "catalog"
    #: (copy-paste scenes made from the catalog's own cut-outs), "auto" (coco when given or
    #: found beside the catalog, else catalog)
    source: DetectorSource = "auto"
    #: the detector's classes: "category" (the catalog's categories), "product" (one class:
    #: the category is voted anyway) or "main" ("main" and "other": it learns which object
    #: the photo is of from scenes that mark it; COCO files without main marks fall back to
    #: "category"). Measured in benchmarks/RESULTS.md (catalog-only photo search).
    labels: DetectorLabels = "main"
    #: semi-supervised rounds on --unlabelled-photos (label-detection), when given
    rounds: int = _checked(1, ge=0)
    backbone: str = _checked("mobilenet_v2_fpn", names=_detector_backbones)
    min_size: int = _checked(96, ge=1)
    max_size: int = _checked(96, ge=1)
    epochs: int = _checked(12, ge=1)  # bench_detector: val mAP@.5 ~0.26 at 12 epochs
    batch_size: int = _checked(8, ge=1)
    lr: float = _checked(2e-3, gt=0)
    score_thresh: float = _checked(0.1, ge=0, le=1)  # main-object floor (MAIN_SCORE_THRESH)


@dataclass(frozen=True)
class ScenesConfig:
    """Copy-paste scenes made from catalog cut-outs: the detector's training data when no
    detection annotations are given, and user-photo-like crops for the embedder."""

    #: scenes = this x usable cut-outs. On the demo's world 1.0 found the main object in
    #: 0.843 of the user photos against 0.817 at 0.5 (12 epochs each; twice the training)
    scenes_per_object: float = _checked(1.0, ge=0)
    image_size: int = _checked(128, ge=1)
    max_distractors: int = _checked(3, ge=0)
    crops_per_scene: int = _checked(1, ge=0)
    #: detector-like box jitter, fraction of the box per side
    crop_jitter: float = _checked(0.15, ge=0, le=1)
    val_fraction: float = _checked(0.1, ge=0, le=1)
    #: cut-outs below this quality score are not pasted (bench_cutout: 0.3 drops 1 % of the
    #: usable cut-outs, most of them wrong, and keeps 98.7 % at mask IoU >= 0.9)
    min_quality: float = _checked(0.3, ge=0, le=1)
    #: train the embedder on the crops too (query-domain training), mixed with shop images
    query_domain: bool = True
    #: detector epochs on synthesized scenes (None: detector.epochs)
    detector_epochs: int | None = _checked(None, ge=1)


@dataclass(frozen=True)
class CleanConfig:
    enabled: bool = True
    eps: float = _checked(0.25, gt=0)
    #: best F1 in benchmarks.bench_cleaning (step 1 + 2) on the 400-step first pass: F1 0.94
    #: at 0.35 (RESULTS.md, issue 17); a negative value skips step 2
    return_thresh: float = 0.35


@dataclass(frozen=True)
class MergeConfig:
    enabled: bool = True
    #: "calibrated" (mutual confusion + embedding evidence at a false-merge rate; weaker
    #: pairs go to review) or "confusion" (the symmetrised-confusion schedule below)
    rule: MergeRule = "calibrated"
    false_merge_rate: float = _checked(0.01, ge=0, le=1)
    review_rate: float = _checked(0.1, ge=0, le=1)
    min_confusion: float = _checked(0.15, ge=0, le=1)
    thresholds: list[float] = _checked(default_factory=lambda: [0.5, 0.4, 0.3], ge=0, le=1)


@dataclass(frozen=True)
class EmbedderConfig:
    """Defaults: the best measured CPU recipe. The loss and augmentation: benchmarks.
    bench_embedder on a 400-SKU world, 400 steps (user-photo R@1 0.54 / 0.575 over seeds
    0 / 1, vs 0.49 / 0.47 with random erasing and 0.22 for the untrained ImageNet backbone).
    The schedule and resolution: benchmarks.bench_catalog_scale (issue 22): epochs over the
    SKUs with early stopping instead of 400 fixed steps, 128 px instead of 96."""

    backbone: str = _checked("mobilenet_v2", names=_embedder_backbones)
    dim: int = _checked(256, ge=1)
    pooling: str = _checked("gem", names=_poolings)
    attention: bool = False
    loss: str = _checked("arcface", names=_losses)
    triplet_weight: float = _checked(0.0, ge=0)
    #: the final training's passes over the SKUs (8 x 187 steps on 3,000 SKUs: R@1 0.421 vs
    #: 0.268 for 400 fixed steps at 96 px; RESULTS.md, issue 22)
    epochs: int = _checked(8, ge=1)
    #: None: one pass over the SKUs (#SKUs // p batches; see min_steps)
    steps_per_epoch: int | None = _checked(None, ge=1)
    p: int = _checked(16, ge=1)
    k: int = _checked(4, ge=1)
    #: 128 px: +0.045 R@1 over 96 px at 1,000 SKUs, same steps (RESULTS.md, issue 22)
    image_size: int = _checked(128, ge=1)
    lr: float = _checked(2e-3, gt=0)
    #: ArcFace/CosFace margin (None: the loss's default); s=30, m=0.5 collapse on short runs
    margin: float | None = _checked(0.2, ge=0)
    scale: float | None = _checked(16.0, gt=0)
    backbone_lr_mult: float = _checked(0.3, ge=0)
    frozen_blocks: int = _checked(7, ge=0)
    #: wild-photo augmentation: +0.13 R@1 on user photos (None: train-embedder's default,
    #: "strong")
    augment: str | None = _checked("strong", names=_augments)
    #: random erasing probability; it cost 0.05 / 0.11 R@1 (seeds 0 / 1) on top of the strong
    #: augmentation in 400 steps. The gpu profile keeps the reference design's 0.5 (unmeasured)
    erasing: float = _checked(0.0, ge=0, le=1)
    freeze_bn: bool = True  # keep the trunk's ImageNet BN statistics: +0.075 R@1
    #: a local weights file for the backbone; None (or a missing file): the backbone's own
    #: shipped weights (``weights/``, fetched at install; see
    #: ``index_builder.cmd_embedder.default_pretrained``), so any backbone gets its own file
    pretrained: str | None = None
    #: the served understanding heads (category and attribute classifiers on the embedding),
    #: trained as auxiliary losses with these weights (0: no such head)
    category_weight: float = _checked(0.1, ge=0)
    attribute_weight: float = _checked(0.1, ge=0)
    #: catalog attribute names that get a head
    attributes: list[str] = field(default_factory=lambda: ["color", "pattern", "material"])
    #: "fixed": the weights above; "auto": the heads' weights follow their validation-loss
    #: trends on 5 % held-out training images (benchmarks/bench_understanding.py)
    task_weights: TaskWeights = "fixed"
    #: the first-pass model whose embeddings drive denoising and merging (its thresholds
    #: were measured at 96 px: RESULTS.md, issue 17)
    cleaning_epochs: int = _checked(1, ge=1)
    cleaning_image_size: int = _checked(96, ge=1)
    #: 400, not 150: merge recall 0.82 vs 0.45 and denoise F1 0.94 vs 0.88 on the noisy world
    #: (RESULTS.md, issue 17), for about 2.5 min more per 300-SKU rebuild on 2 CPU cores
    cleaning_steps_per_epoch: int | None = _checked(400, ge=1)
    #: early stopping of the final training: epochs without a gain in held-out catalog
    #: images' mAP@10 (the best epoch's weights are kept); None: run every epoch. Off in
    #: cpu-small: on 3,000 SKUs held-out shop images stopped gaining after epoch 3, whose
    #: weights give user-photo R@1 0.213, against 0.421 after 8 (RESULTS.md, issue 22)
    patience: int | None = _checked(None, ge=1)
    holdout_queries: int = _checked(256, ge=1)  # held-out catalog images (one per SKU)
    #: the final training's wall-clock budget in minutes: rebuild measures the training rate,
    #: prints the estimate before it starts and cuts the epochs to fit; None: no budget
    budget_minutes: float | None = _checked(60.0, gt=0)
    #: with steps_per_epoch None: a small catalog's epochs are lengthened so that all
    #: together make at least this many steps (300 SKUs: 8 x 50 steps, the 400 steps
    #: measured best there; 3,000 SKUs: 8 x 187, unchanged)
    min_steps: int = _checked(400, ge=0)
    #: "pk": random SKUs per batch; "lookalike": families of look-alike SKUs (hard negatives)
    sampler: EmbedderSampler = "pk"
    lookalike_group: int = _checked(4, ge=2)  # SKUs per look-alike family in a batch
    hdc_weight: float = _checked(0.0, ge=0)  # hard-aware cascaded contrastive term (0: none)
    #: deep mutual learning in the final training: a peer of this backbone (its shipped
    #: weights), trained alongside and then dropped (None: no peer); each network's KL term
    #: toward the other has weight ``mutual_weight``
    peer_backbone: str | None = _checked(None, names=_embedder_backbones)
    mutual_weight: float = _checked(1.0, ge=0)
    #: DataLoader decode/augment processes of the trainings (0: in the training process;
    #: on 2 CPU cores extra processes only compete with the model for the cores)
    loader_workers: int = _checked(0, ge=0)


@dataclass(frozen=True)
class IndexConfig:
    factory: str | None = None  # None: chosen by gallery size
    #: the graph row holds the item itself, so re-ranking with k1=20 needs 21
    k1: int = _checked(21, ge=1)
    graph_nprobe: int | None = _checked(None, ge=1)  # None: the index's search default
    graph_ef_search: int | None = _checked(None, ge=1)


@dataclass(frozen=True)
class RebuildConfig:
    profile: str = "cpu-small"
    seed: int = _checked(0, ge=0)
    workers: int = _checked(2, ge=1)
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


DETECTOR_SOURCES: tuple[str, ...] = typing.get_args(DetectorSource)
DETECTOR_LABELS: tuple[str, ...] = typing.get_args(DetectorLabels)

PROFILES: dict[str, dict[str, Any]] = {
    "cpu-small": {},
    # Every stage on tiny models, in seconds: for tests and the crash benchmark, where what
    # counts is that the pipeline runs (and where it is killed), not recall.
    "tiny": {
        "workers": 1,
        "dedup": {"workers": 1},
        "detector": {"backbone": "tiny_fpn", "min_size": 64, "max_size": 64, "epochs": 1},
        "embedder": {"backbone": "tiny", "dim": 32, "epochs": 1, "cleaning_epochs": 1,
                     "image_size": 48, "p": 8, "k": 2, "attention": False,
                     "pretrained": None, "frozen_blocks": 0, "steps_per_epoch": None,
                     "cleaning_steps_per_epoch": None, "cleaning_image_size": 48,
                     "patience": None, "budget_minutes": None, "min_steps": 0},
        "index": {"k1": 11},
    },
    "gpu": {
        "detector": {"backbone": "resnet50_fpn", "min_size": 512, "max_size": 512,
                     "epochs": 24, "batch_size": 16},
        # Larger catalogs (10^4+ SKUs) on one GPU: the cpu-small recipe's schedule scaled up
        # (issue 22). A backbone with local ImageNet weights (resnet50 has none here and
        # would train from scratch), full resolution, nothing frozen, 40 passes over the
        # SKUs, a 4-hour budget, decode/augment in 8 processes.
        # Not yet measured on a GPU: benchmarks/gpu_suite.sh GPU_TRAIN=1 runs it.
        "embedder": {"backbone": "mobilenet_v2", "image_size": 224, "epochs": 40, "p": 32,
                     "steps_per_epoch": None, "frozen_blocks": 0, "cleaning_epochs": 10,
                     "cleaning_image_size": 224, "erasing": 0.5,
                     "budget_minutes": 240.0, "min_steps": 2000, "loader_workers": 8,
                     "cleaning_steps_per_epoch": None},
    },
}


# -- validation -------------------------------------------------------------------------


def _describe(tp: Any) -> str:
    """``tp`` in words, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return f"one of {args}"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list ({_describe(args[0])} each)" if args else "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _matches(value: Any, tp: Any) -> bool:
    """Whether a JSON value has type ``tp`` (an int is a number; a bool is not)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return (isinstance(value, int | float) and not isinstance(value, bool)
                and math.isfinite(value))
    if tp is str:
        return isinstance(value, str)
    raise TypeError(f"config field type {tp!r} has no check")  # a new field type: add it


def _check_value(value: Any, tp: Any, meta: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` unless ``value`` has type ``tp`` and lies in ``meta``'s range."""
    if not _matches(value, tp):
        raise ValueError(f"config key {where} must be {_describe(tp)}, got {value!r}")
    if value is None:
        return
    bounds = [(_BOUNDS[k], meta[k]) for k in _BOUNDS if k in meta]
    for v in value if isinstance(value, list) else [value]:
        if not all({">=": v >= b, ">": v > b, "<=": v <= b}[op] for op, b in bounds):
            rng = " and ".join(f"{op} {b}" for op, b in bounds)
            what = "each element" if isinstance(value, list) else "it"
            raise ValueError(f"config key {where} is out of range: {what} must be {rng}, "
                             f"got {value!r}")
        if _NAMES in meta and v not in (names := meta[_NAMES]()):
            raise ValueError(f"config key {where} must be one of {names}, got {v!r}")


def _with(obj: T, overrides: Mapping[str, Any], where: str = "") -> T:
    """A copy of dataclass ``obj`` with ``overrides`` checked and applied, recursing into
    sections (an override of a section is an object of some of its keys)."""
    if not isinstance(overrides, Mapping):
        raise ValueError(f"config {where.rstrip('.') or 'file'} must be an object, "
                         f"got {overrides!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(f"unknown config key {where}{key!r}; valid keys: {sorted(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(f"config key {where}{key!r} must be an object "
                                 f"(keys {[f.name for f in dataclasses.fields(current)]}), "
                                 f"got {value!r}")
            changes[key] = _with(current, value, f"{where}{key}.")
        else:
            _check_value(value, hints[key], fields[key].metadata, f"{where}{key!r}")
            changes[key] = list(value) if isinstance(value, list) else value
    return dataclasses.replace(obj, **changes)  # type: ignore[type-var]


def validate(cfg: RebuildConfig) -> RebuildConfig:
    """Check every value of a config built in code, as ``load_config`` checks a file's;
    returns ``cfg``. Raises ``ValueError`` like ``load_config``."""
    _with(RebuildConfig(), cfg.to_dict())
    return cfg


def load_config(
    path: str | os.PathLike[str] | None = None, *, profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RebuildConfig:
    """A ``RebuildConfig`` from a profile, then a JSON file, then explicit overrides (each a
    nested object of some of the keys, checked as it is applied).

    Raises:
        ValueError: an unreadable file, an unknown profile or key, a value of the wrong
            type or out of range; the message names the key path and what was expected.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"config {path} must hold a JSON object")
    name = profile or data.get("profile", "cpu-small")
    if not isinstance(name, str) or name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {sorted(PROFILES)}")
    cfg = _with(RebuildConfig(profile=name), PROFILES[name])
    cfg = _with(cfg, {k: v for k, v in data.items() if k != "profile"})
    if overrides:
        cfg = _with(cfg, {k: v for k, v in overrides.items() if k != "profile"})
    return cfg
