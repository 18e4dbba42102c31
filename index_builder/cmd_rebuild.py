"""``visearch-index rebuild``: the whole offline pipeline, stage by stage, resumable.

Order (DESIGN.md): ingest -> dedup -> product cut-outs -> copy-paste scenes -> train the
detector (on given COCO annotations, else on the scenes; then box catalog images without a
bbox) -> first-pass embedder -> SKU denoise -> SKU merge -> train the embedder on the
cleaned SKUs (shop images plus the scenes' user-photo-like crops) -> embed the gallery,
build the index and neighbour graph, activate.

Each step calls the typed function behind one of ``visearch-index``'s own subcommands
(``ingest_catalog``, ``dedup_catalog``, ``cut_out_catalog``, ``synthesize_catalog_scenes``,
``train_detector_on_coco`` or ``label_detection``, ``crop_catalog``,
``train_embedder_on_catalog``, ``clean_catalog``, ``merge_catalog``, ``write_review``,
``build_index``) with arguments made from the typed, validated ``RebuildConfig`` in one
place (the ``*_params`` functions below), inside ``run_stage`` with a fingerprint of its
inputs (file checksums and the digests of the stages it reads) and parameters: a re-run
skips every stage whose inputs did not change, and a changed parameter reruns that stage
and everything downstream. Trainings keep a scratch directory with checkpoints, so an
interrupted training resumes where it stopped. The catalog is never rewritten: cleaning
produces new manifests under ``<work>/catalogs/``.

After ``ingest`` the LMDB image store (``<work>/ingest/store``) is the one source of the
catalog's images: every later stage reads its manifest with the store
(``read_manifest(images=store.lookup)``) and decodes the ingested, validated bytes, so a
catalog file that moves or changes during the rebuild changes nothing downstream (a re-run
sees the change and ingests again).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from index_builder.cmd_clean import (
    CleanParams,
    DedupParams,
    EmbeddingSource,
    MergeParams,
    clean_catalog,
    dedup_catalog,
    merge_catalog,
    read_removed,
    read_sku_map,
    report_line,
)
from index_builder.cmd_detector import (
    DetectorTrainParams,
    crop_catalog,
    default_backbone_weights,
    label_detection,
    train_detector_on_coco,
)
from index_builder.cmd_embedder import (
    EmbedderTrainParams,
    default_pretrained,
    steps_per_epoch,
    train_embedder_on_catalog,
)
from index_builder.cmd_index import (
    BuildParams,
    add_scale_arguments,
    backend_from_args,
    build_index,
    build_summary,
)
from index_builder.cmd_ingest import ingest_catalog
from index_builder.cmd_review import ReviewSummary, decisions_path, write_review
from index_builder.config import DETECTOR_SOURCES, RebuildConfig, load_config, validate
from index_builder.stage import (
    StageResult,
    fingerprint_digest,
    recorded_digest,
    run_stage,
    stat_digest,
)
from visearch.catalog import CatalogRow, Manifest, read_manifest, write_manifest
from visearch.cleaning import apply_cleaning
from visearch.cleaning.dedup import COLOR_TOL, RADIUS
from visearch.errors import ManifestError, VisearchError
from visearch.fileio import atomic_write_text, file_digest
from visearch.imageio import image_files
from visearch.index.backend import MilvusBackend
from visearch.parallel import Runner, make_runner
from visearch.store import store_lookup

logger = logging.getLogger(__name__)

T = TypeVar("T")

Box = tuple[float, float, float, float]
VERSION_FILE = "version.json"


class StageFailed(RuntimeError):
    """A stage of the pipeline failed the way its subcommand reports a failed run."""


@dataclass(frozen=True)
class RebuildInputs:
    """The files a rebuild reads and writes (``RebuildConfig`` holds its parameters)."""

    catalog: Path  # catalog.jsonl
    root: Path  # the index root the new version is published under
    work: Path  # the stages' outputs (resumable)
    queries: Path | None = None  # queries.jsonl: validation Recall@1 while training
    detection: Path | None = None  # a folder with COCO train.json (and val.json)
    backgrounds: Path | None = None  # photos to paste cut-outs on (else procedural)
    unlabelled_photos: Path | None = None  # adds pseudo-labelling rounds to the detector
    # Where it runs, not what it computes (outputs do not depend on it: no fingerprint).
    ray: str | None = None  # Ray Data for the offline stages: local|auto|ADDRESS
    milvus: MilvusBackend | None = None  # the index's vectors in Milvus (None: the root's)


@dataclass(frozen=True)
class RebuildResult:
    """A finished rebuild: the index version it published, its detector's provenance in
    words (None: no detector), and the seconds each stage took, in order."""

    version: str
    detector_source: str | None
    timings: dict[str, float]


# -- config -> stage arguments ------------------------------------------------------------
# The one place where config values become the stages' typed arguments. A value is what the
# stage's subcommand flag would give (argparse's int/float conversion), and an argument
# the config does not set keeps the subcommand's default.


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def dedup_params(cfg: RebuildConfig) -> DedupParams:
    d = cfg.dedup
    color_tol = COLOR_TOL if d.color_tol is None else float(d.color_tol)
    return DedupParams(radius=RADIUS if d.radius is None else d.radius,
                       color_tol=color_tol if color_tol >= 0 else None, workers=d.workers)


def detector_params(cfg: RebuildConfig, *, epochs: int) -> DetectorTrainParams:
    d = cfg.detector
    return DetectorTrainParams(
        backbone=d.backbone, backbone_weights=default_backbone_weights(d.backbone),
        min_size=d.min_size, max_size=d.max_size, epochs=epochs, batch_size=d.batch_size,
        lr=float(d.lr), seed=cfg.seed,
    )


def embedder_params(cfg: RebuildConfig, *, epochs: int, steps: int | None,
                    final: bool = True) -> EmbedderTrainParams:
    """The embedder training of ``cfg``: the final one (early stopping and the time budget
    as configured) or, with ``final=False``, the cleaning stages' first pass (neither)."""
    e = cfg.embedder
    if e.pretrained and Path(e.pretrained).is_file():
        pretrained = Path(e.pretrained)
    else:  # the backbone's shipped weights when present, else from scratch
        pretrained = default_pretrained(e.backbone)
    return EmbedderTrainParams(
        backbone=e.backbone, dim=e.dim, pooling=e.pooling, attention=e.attention,
        pretrained=pretrained, loss=e.loss, margin=_float(e.margin),
        scale=_float(e.scale), triplet_weight=float(e.triplet_weight),
        category_weight=float(e.category_weight), attribute_weight=float(e.attribute_weight),
        attributes=tuple(e.attributes), task_weights=e.task_weights, erasing=float(e.erasing),
        augment=e.augment if e.augment is not None else EmbedderTrainParams.augment,
        epochs=epochs, p=e.p, k=e.k, steps_per_epoch=steps, min_steps=e.min_steps if final else 0,
        image_size=e.image_size if final else e.cleaning_image_size, lr=float(e.lr),
        backbone_lr_mult=float(e.backbone_lr_mult), frozen_blocks=e.frozen_blocks,
        freeze_bn=e.freeze_bn, seed=cfg.seed, progress=True,
        patience=e.patience if final else None, holdout_queries=e.holdout_queries,
        budget_minutes=e.budget_minutes if final else None,
        hdc_weight=float(e.hdc_weight), sampler=e.sampler, lookalike_group=e.lookalike_group,
        peer_backbone=e.peer_backbone if final else None, mutual_weight=float(e.mutual_weight),
        workers=e.loader_workers,
    )


def training_plan(cfg: RebuildConfig, skus: int) -> str:
    """The final embedder training's schedule for a catalog of ``skus`` SKUs, in words
    (printed when ``rebuild`` starts; the measured time estimate follows before training)."""
    e = cfg.embedder
    per_epoch = steps_per_epoch(embedder_params(cfg, epochs=e.epochs,
                                                steps=e.steps_per_epoch), skus)
    stop = f", early stopping after {e.patience} epochs without gain" if e.patience else ""
    budget = (f"; budget {e.budget_minutes:g} min" if e.budget_minutes is not None
              else "; no time budget")
    return (f"plan: profile {cfg.profile}: the final embedder trains up to {e.epochs} epochs "
            f"x {per_epoch} steps of {e.p} x {e.k} images ({skus} SKUs, {e.backbone} at "
            f"{e.image_size} px){stop}{budget}")


def clean_params(cfg: RebuildConfig) -> CleanParams:
    c = cfg.clean
    return CleanParams(eps=float(c.eps),
                       return_thresh=float(c.return_thresh) if c.return_thresh >= 0 else None)


def merge_params(cfg: RebuildConfig) -> MergeParams:
    m = cfg.merge
    return MergeParams(rule=m.rule, thresholds=tuple(float(t) for t in m.thresholds),
                       false_merge_rate=float(m.false_merge_rate),
                       review_rate=float(m.review_rate), min_confusion=float(m.min_confusion))


def build_params(cfg: RebuildConfig) -> BuildParams:
    i = cfg.index
    return BuildParams(factory=i.factory or None, k1=i.k1, graph_nprobe=i.graph_nprobe,
                       graph_ef_search=i.graph_ef_search)


# -- helpers ------------------------------------------------------------------------------


def _paths_digest(paths: Iterable[Path]) -> str:
    """A cheap digest of files (path, size, mtime), not their bytes."""
    return stat_digest((str(p), p) for p in paths)


@contextlib.contextmanager
def _fails_as(name: str, *errors: type[BaseException]) -> Iterator[None]:
    """The errors a stage's subcommand reports as a failed run (one line, exit status 1)
    fail the rebuild the same way, as ``StageFailed``, not with a traceback."""
    try:
        yield
    except errors as exc:
        raise StageFailed(f"{name}: {exc}") from exc


def query_domain_rows(scenes_dir: Path, train_rows: Sequence[CatalogRow], removed: set[str],
                      sku_map: Mapping[str, str]) -> list[CatalogRow]:
    """The scenes' crops of each main object as training rows: the SKU's training label
    (merged style id), its attributes and title; crops of removed images are left out."""
    crops = scenes_dir / "crops.jsonl"
    if not crops.is_file():
        return []
    by_sku = {r.sku: r for r in train_rows}
    out: list[CatalogRow] = []
    for line, text in enumerate(crops.read_text(encoding="utf-8").splitlines(), start=1):
        obj = json.loads(text)
        if obj.get("attributes", {}).get("cutout") in removed:
            continue
        ref = by_sku.get(sku_map.get(obj["sku"], obj["sku"]))
        if ref is None:
            continue
        # A crop is a file of the scenes stage, not a stored catalog image.
        out.append(dataclasses.replace(
            ref, line=len(train_rows) + line, image=obj["image"],
            path=(scenes_dir / obj["image"]).resolve(), bbox=None, stored=None))
    return out


class Pipeline:
    """The stages of one rebuild, in order; ``run()`` returns the new index version's name.

    Between stages it carries the catalog images removed so far (``removed``) and
    ``upstream``: the fingerprint digests of the completed stages, which the fingerprints of
    the stages downstream include.
    """

    def __init__(self, inputs: RebuildInputs, config: RebuildConfig, *,
                 activate: bool = True) -> None:
        self.inputs = inputs
        self.cfg = config
        self.work = inputs.work
        self.activate = activate
        self.timings: dict[str, float] = {}
        #: where the detector came from, in words (None: no detector); set by run()
        self.detector_source: str | None = None
        self.scenes_summary: dict[str, Any] = {}
        self.cutouts_summary: dict[str, Any] = {}
        self.review_summary: ReviewSummary | None = None
        self.removed: set[str] = set()
        self.upstream: dict[str, Any] = {}
        #: the image store ingest wrote: where every later stage reads the images
        self.store = self.work / "ingest" / "store"
        self._runner: Runner | None = None

    @property
    def runner(self) -> Runner | None:
        """The Ray runner (``inputs.ray``), started on first use; None: the local pool."""
        if self._runner is None and self.inputs.ray:
            self._runner = make_runner(self.inputs.ray, workers=self.cfg.workers)
        return self._runner

    def close(self) -> None:
        """Stop the Ray runner this rebuild started."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    # -- running stages -------------------------------------------------------------------

    def _stage(self, name: str, fingerprint: dict[str, Any],
               fn: Callable[[Path], Mapping[str, Any] | None]) -> StageResult:
        """A resumable stage (``run_stage``) under the work directory, timed and announced."""
        t0 = time.perf_counter()
        print(f"\n--- stage {name}", flush=True)
        result = run_stage(name, self.work, fingerprint, fn)
        self.timings[name] = time.perf_counter() - t0
        print(
            f"--- stage {name}: "
            + ("up to date, skipped" if result.skipped else f"done in {result.seconds:.1f} s"),
            flush=True,
        )
        return result

    def _timed(self, name: str, fn: Callable[[], T]) -> T:
        """A stage function that is a resumable stage by itself (dedup, clean, merge)."""
        t0 = time.perf_counter()
        print(f"\n--- stage {name}", flush=True)
        out = fn()
        self.timings[name] = time.perf_counter() - t0
        print(f"--- stage {name}: {self.timings[name]:.1f} s", flush=True)
        return out

    def _training_stage(
        self, name: str, fingerprint: dict[str, Any], train: Callable[[Path, bool], None],
        outputs: Sequence[str], *, gather: dict[str, str] | None = None,
    ) -> StageResult:
        """A training, ``train(scratch_dir, resume)``, with a persistent scratch dir
        (checkpoints survive a crash: the next run of the same fingerprint resumes), whose
        ``outputs`` are published; ``gather`` maps an output name to the scratch-relative
        file it is copied from."""
        scratch = self.work / f"{name}.scratch"
        key = fingerprint_digest(fingerprint)
        marker = scratch / "fingerprint.txt"
        if scratch.exists() and (not marker.is_file() or marker.read_text() != key):
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True, exist_ok=True)
        marker.write_text(key)

        def work(out: Path) -> dict[str, Any]:
            train(scratch, any(scratch.rglob("checkpoint.pt")))
            for item, src in (gather or {}).items():
                if (scratch / src).is_file():
                    shutil.copy2(scratch / src, scratch / item)
            for item in outputs:
                if (scratch / item).is_file():
                    shutil.copy2(scratch / item, out / item)
            return {"outputs": [o for o in outputs if (out / o).is_file()]}

        result = self._stage(name, fingerprint, work)
        shutil.rmtree(scratch, ignore_errors=True)
        return result

    # -- the pipeline ----------------------------------------------------------------------

    def run(self) -> str:
        cfg = self.cfg
        manifest = read_manifest(self.inputs.catalog, strict=not cfg.lenient)
        print(training_plan(cfg, len({r.sku for r in manifest.rows})), flush=True)
        self._ingest(manifest)
        # From here on every image is read from the store, as ingested.
        manifest = read_manifest(self.inputs.catalog, strict=not cfg.lenient,
                                 images=store_lookup(self.store))
        # Review decisions (visearch-index review) are applied by every cleaning stage.
        decisions = decisions_path(self.work)
        reviewed = decisions if decisions.is_file() else None
        if cfg.dedup.enabled:
            self._dedup(reviewed)

        # The detector's training boxes: given COCO annotations, else copy-paste scenes made
        # from the catalog's own cut-outs (a real catalog has no COCO scenes).
        use_coco = self._use_coco()
        scenes_dir: Path | None = None
        cutout_boxes: dict[str, Box] = {}
        if (cfg.detector.enabled and not use_coco) or cfg.scenes.query_domain:
            scenes_dir, cutout_boxes = self._scene_stages(manifest)
        detector_path = self._detector(use_coco, scenes_dir) if cfg.detector.enabled else None

        catalog, rows = self._boxed_catalog(manifest.rows, cutout_boxes, detector_path)
        (self.work / "catalogs").mkdir(parents=True, exist_ok=True)
        sku_map = self._clean_and_merge(catalog, rows, reviewed)
        if cfg.dedup.enabled or cfg.clean.enabled or cfg.merge.enabled:
            self.review_summary = write_review(list(rows), self.inputs.catalog, self.work)
        train_catalog, gallery_catalog = self._training_catalogs(rows, sku_map, scenes_dir)

        emb = self._embedder("embedder", train_catalog, epochs=cfg.embedder.epochs,
                             steps=cfg.embedder.steps_per_epoch, val=True)
        return self._build(gallery_catalog, emb.out_dir / "embedder.pt", detector_path)

    def _ingest(self, manifest: Manifest) -> None:
        """Stage ``ingest``; sets ``upstream`` to the catalog's identity and its digest."""
        catalog, lenient = self.inputs.catalog, self.cfg.lenient
        base = {
            "catalog": file_digest(catalog),
            "images": _paths_digest(row.path for row in manifest.rows),
            "lenient": lenient,
        }

        def work(out: Path) -> None:
            print(ingest_catalog(catalog, out / "store", lenient=lenient,
                                 runner=self.runner).line())

        ingest = self._stage("ingest", base, work)
        self.upstream = {**base, "ingest": recorded_digest(ingest.out_dir)}

    def _dedup(self, decisions: Path | None) -> None:
        params = dedup_params(self.cfg)

        def run() -> StageResult:
            result = dedup_catalog(self.inputs.catalog, self.work, params,
                                   lenient=self.cfg.lenient, decisions=decisions,
                                   store=self.store, runner=self.runner)
            print(report_line(result, "dedup"))
            return result

        result = self._timed("dedup", run)
        self.removed |= read_removed(result.out_dir / "removed.json")
        self.upstream["dedup"] = recorded_digest(result.out_dir)

    def _use_coco(self) -> bool:
        """Whether the detector trains on given COCO annotations (else on catalog scenes)."""
        source = self.cfg.detector.source
        detection = self.inputs.detection
        if source == "coco" and detection is None:
            raise ValueError("detector.source is 'coco' but no detection annotations were "
                             "given or found (--detection DIR with train.json)")
        return detection is not None and source in ("auto", "coco")

    def _scene_stages(self, manifest: Manifest) -> tuple[Path, dict[str, Box]]:
        """The ``cutouts`` and ``scenes`` stages; returns the scenes folder and the cut-out
        box of each usable catalog image."""
        from index_builder.cmd_scenes import (
            background_files,
            cut_out_catalog,
            read_cutout_boxes,
            synthesize_catalog_scenes,
        )

        sc, removed = self.cfg.scenes, set(self.removed)
        cut = self._stage(
            "cutouts", {**self.upstream, "min_quality": sc.min_quality},
            lambda out: cut_out_catalog(manifest.rows, out, rejects=manifest.rejects,
                                        exclude=removed, min_quality=sc.min_quality,
                                        progress=True, runner=self.runner).to_dict(),
        )
        self.cutouts_summary = cut.summary
        print(f"cut-outs: {cut.summary.get('objects')} usable of {cut.summary.get('rows')} "
              f"catalog rows {cut.summary.get('statuses')} "
              f"(per-row report: {cut.out_dir / 'report.jsonl'})", flush=True)
        backgrounds = background_files(self.inputs.backgrounds)
        fp = {"cutouts": recorded_digest(cut.out_dir),
              "config": {k: v for k, v in dataclasses.asdict(sc).items()
                         if k not in ("query_domain", "detector_epochs", "min_quality")},
              "seed": self.cfg.seed,
              "backgrounds": _paths_digest(backgrounds)}
        scenes = self._stage(
            "scenes", fp,
            lambda out: synthesize_catalog_scenes(
                cut.out_dir, out, scenes_per_object=sc.scenes_per_object,
                image_size=sc.image_size, seed=self.cfg.seed, backgrounds=backgrounds,
                max_distractors=sc.max_distractors, crops_per_scene=sc.crops_per_scene,
                crop_jitter=sc.crop_jitter, val_fraction=sc.val_fraction,
                workers=self.cfg.workers, progress=True, runner=self.runner).to_dict(),
        )
        self.scenes_summary = scenes.summary
        self.upstream["scenes"] = recorded_digest(scenes.out_dir)
        return scenes.out_dir, read_cutout_boxes(cut.out_dir)

    def _detector(self, use_coco: bool, scenes_dir: Path | None) -> Path:
        """Stage ``detector`` on the COCO annotations or the scenes; sets
        ``detector_source`` and returns the weights file."""
        cfg = self.cfg
        if use_coco:
            detection = self.inputs.detection
            assert detection is not None  # _use_coco
            detector_path, kind = self._detector_stage(
                detection / "train.json", detection / "val.json", detection.parent,
                cfg.detector.epochs)
            source = f"COCO annotations in {detection}"
        else:
            assert scenes_dir is not None  # run() makes scenes when there is no COCO
            epochs = cfg.scenes.detector_epochs or cfg.detector.epochs
            detector_path, kind = self._detector_stage(
                scenes_dir / "train.json", scenes_dir / "val.json", scenes_dir, epochs)
            s = self.scenes_summary
            source = (f"{s.get('train_images', '?')} copy-paste scenes made from "
                      f"{s.get('objects', '?')} catalog cut-outs on "
                      f"{s.get('background_source', '?')} backgrounds")
        if self.inputs.unlabelled_photos is not None:
            source += f", + pseudo-labels on {self.inputs.unlabelled_photos}"
        self.detector_source = f"{kind}, trained on {source}"
        print(f"detector: {self.detector_source}", flush=True)
        return detector_path

    def _detector_stage(self, train_json: Path, val_json: Path, images_root: Path,
                        epochs: int) -> tuple[Path, str]:
        """Train the detector (optionally with pseudo-labelling rounds on unlabelled photos);
        returns its weights file and its classes in words."""
        d = self.cfg.detector
        train_json, val_json, labels = self._relabel(train_json, val_json)
        val = val_json if val_json.is_file() else None
        params = detector_params(self.cfg, epochs=epochs)
        unlabelled = self.inputs.unlabelled_photos

        def train(scratch: Path, resume: bool) -> None:
            if unlabelled is None:
                result = train_detector_on_coco(train_json, scratch, params, val=val,
                                                images_root=images_root, resume=resume)
                print(json.dumps(result.summary(), indent=1))
            else:
                rounds = label_detection(train_json, unlabelled, scratch, params,
                                         rounds=d.rounds, val=val, images_root=images_root,
                                         resume=resume)
                print(rounds.table())

        # label-detection leaves the last round's detector under its own folder
        gather = (None if unlabelled is None
                  else {"detector.pt": f"round_{d.rounds}/model/detector.pt"})
        fp = {"train": file_digest(train_json),
              "val": file_digest(val) if val is not None else None,
              "images": _paths_digest(sorted(images_root.glob("*/*.jpg"))),
              "unlabelled": (_paths_digest(image_files(unlabelled))
                             if unlabelled is not None else None),
              # the main-object floor is used after training (crop), not by it
              "config": {k: v for k, v in dataclasses.asdict(d).items()
                         if k != "score_thresh"},
              "epochs": epochs, "seed": self.cfg.seed}
        det = self._training_stage("detector", fp, train,
                                   ["detector.pt", "history.json", "rounds.json"],
                                   gather=gather)
        return det.out_dir / "detector.pt", labels

    def _relabel(self, train_json: Path, val_json: Path) -> tuple[Path, Path, str]:
        """The COCO files with the classes of ``detector.labels`` (copies under
        ``<work>/detector_inputs/``), and those classes in words."""
        from visearch.detection.data import read_coco
        from visearch.scenes import collapse_categories, main_categories

        labels = self.cfg.detector.labels
        if labels == "category":
            return train_json, val_json, "class-aware"
        train = read_coco(train_json)
        if labels == "main" and not any("main" in a for a in train["annotations"]):
            logger.warning("%s marks no main object: the detector learns the categories",
                           train_json)
            return train_json, val_json, "class-aware (the annotations mark no main object)"
        relabel = main_categories if labels == "main" else collapse_categories
        out = self.work / "detector_inputs"
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for src, coco in ((train_json, train),
                          (val_json, read_coco(val_json) if val_json.is_file() else None)):
            dst = out / f"{src.stem}_{labels}.json"
            if coco is not None:
                atomic_write_text(dst, json.dumps(relabel(coco)))
            else:
                dst.unlink(missing_ok=True)
            paths.append(dst)
        words = ("main-object (main vs other products)" if labels == "main"
                 else "class-agnostic")
        return paths[0], paths[1], words

    def _boxed_catalog(self, rows: list[CatalogRow], cutout_boxes: dict[str, Box],
                       detector_path: Path | None) -> tuple[Path, list[CatalogRow]]:
        """The catalog whose rows all have a bbox where one can be found, and its rows:
        a row without one gets its cut-out's box, else the detector's main object (stage
        ``crop``). The catalog file itself when every row has a box."""
        cfg = self.cfg
        catalog = self.inputs.catalog
        if any(r.bbox is None for r in rows) and cutout_boxes:
            rows = [dataclasses.replace(r, bbox=cutout_boxes[r.image])
                    if r.bbox is None and r.image in cutout_boxes else r for r in rows]
            catalog = self.work / "catalogs" / "boxed.jsonl"
            catalog.parent.mkdir(parents=True, exist_ok=True)
            write_manifest(catalog, rows)
        if any(r.bbox is None for r in rows) and detector_path is not None:
            boxed = catalog

            def crop(out: Path) -> None:
                result = crop_catalog(boxed, detector_path, out / "catalog.jsonl",
                                      score_thresh=float(cfg.detector.score_thresh),
                                      lenient=cfg.lenient, store=self.store)
                print(json.dumps(result.to_dict()))

            done = self._stage(
                "crop", {**self.upstream, "catalog": file_digest(catalog),
                         "detector": file_digest(detector_path),
                         "thresh": cfg.detector.score_thresh},
                crop,
            )
            catalog = done.out_dir / "catalog.jsonl"
            rows = read_manifest(catalog, strict=not cfg.lenient,
                                 images=store_lookup(self.store)).rows
            self.upstream["crop"] = recorded_digest(done.out_dir)
        return catalog, rows

    def _clean_and_merge(self, catalog: Path, rows: list[CatalogRow],
                         decisions: Path | None) -> dict[str, str]:
        """Stages ``embedder_first_pass``, ``clean`` (adds to ``removed``) and ``merge``,
        as enabled; returns merge's SKU -> style id map ({} without merge)."""
        cfg = self.cfg
        if not (cfg.clean.enabled or cfg.merge.enabled):
            return {}
        first_pass = self.work / "catalogs" / "dedup.jsonl"
        write_manifest(first_pass, apply_cleaning(rows, self.removed))
        emb = self._embedder("embedder_first_pass", first_pass,
                             epochs=cfg.embedder.cleaning_epochs,
                             steps=cfg.embedder.cleaning_steps_per_epoch, val=False,
                             final=False)
        source = EmbeddingSource(model=emb.out_dir / "embedder.pt")
        exclude: list[Path] = []
        if cfg.dedup.enabled:
            exclude.append(self.work / "dedup" / "removed.json")
        sku_map: dict[str, str] = {}
        if cfg.clean.enabled:
            self._cleaning_stage("clean", clean_catalog, clean_params(cfg), catalog, source,
                                 list(exclude), decisions)
            self.removed |= read_removed(self.work / "clean" / "removed.jsonl")
            exclude.append(self.work / "clean" / "removed.jsonl")
        if cfg.merge.enabled:
            self._cleaning_stage("merge", merge_catalog, merge_params(cfg), catalog, source,
                                 exclude, decisions)
            sku_map = read_sku_map(self.work / "merge" / "sku_map.json")
        for stage in ("clean", "merge"):
            if getattr(cfg, stage).enabled:
                self.upstream[stage] = recorded_digest(self.work / stage)
        return sku_map

    def _cleaning_stage(self, name: str, run: Any, params: Any, catalog: Path,
                        source: EmbeddingSource, exclude: list[Path],
                        decisions: Path | None) -> None:
        """One timed cleaning stage (``clean_catalog`` or ``merge_catalog``), its report
        printed; a bad input fails the rebuild naming the stage."""
        def stage() -> None:
            with _fails_as(name, ValueError, FileNotFoundError):
                result = run(catalog, self.work, source, params, exclude=exclude,
                             lenient=self.cfg.lenient, decisions=decisions,
                             store=self.store)
            print(result.report(name))

        self._timed(name, stage)

    def _training_catalogs(self, rows: list[CatalogRow], sku_map: dict[str, str],
                           scenes_dir: Path | None) -> tuple[Path, Path]:
        """``<work>/catalogs/train.jsonl`` (labels: the merged style ids; plus the scenes'
        crops for query-domain training) and ``gallery.jsonl`` (the catalog's SKUs), both
        without the removed images; prints what cleaning did."""
        cfg = self.cfg
        catalogs = self.work / "catalogs"
        train_catalog = catalogs / "train.jsonl"
        gallery_catalog = catalogs / "gallery.jsonl"
        train_rows = apply_cleaning(rows, self.removed, sku_map)
        extra: list[CatalogRow] = []
        if cfg.scenes.query_domain and scenes_dir is not None:
            extra = query_domain_rows(scenes_dir, train_rows, self.removed, sku_map)
        write_manifest(train_catalog, train_rows + extra)
        write_manifest(gallery_catalog, apply_cleaning(rows, self.removed))
        removed = self.removed
        styles = f", {len(set(sku_map.values()))} style ids from {len(sku_map)} SKUs"
        print(f"\ncleaning: {len(rows)} catalog rows -> {len(rows) - len(removed)} kept "
              f"({len(removed)} removed){styles if sku_map else ''}")
        if self.review_summary is not None:
            rs = self.review_summary
            print(f"review: {rs.merge} merges, {rs.duplicate} cross-SKU duplicates, "
                  f"{rs.denoise} denoise removals ({rs.pending} pending, "
                  f"{rs.decided} decided) -> {rs.page}", flush=True)
        if extra:
            print(f"query-domain training: {len(extra)} user-photo-like crops from the "
                  f"scenes beside {len(train_rows)} shop images", flush=True)
        return train_catalog, gallery_catalog

    def _embedder(self, name: str, catalog: Path, *, epochs: int, steps: int | None,
                  val: bool, final: bool = True) -> StageResult:
        """A training of the embedder on ``catalog`` (stage ``name``)."""
        cfg = self.cfg
        queries = self.inputs.queries if val else None
        params = embedder_params(cfg, epochs=epochs, steps=steps, final=final)

        def train(scratch: Path, resume: bool) -> None:
            result = train_embedder_on_catalog(catalog, scratch, params, val_queries=queries,
                                               resume=resume, store=self.store)
            print(json.dumps(result.summary(), indent=1))

        fp = {"catalog": file_digest(catalog), "config": dataclasses.asdict(cfg.embedder),
              "epochs": epochs, "steps": steps,
              "queries": file_digest(queries) if queries else None,
              "seed": cfg.seed, "upstream": dict(self.upstream)}
        return self._training_stage(name, fp, train,
                                    ["embedder.pt", "history.json", "labels.json"])

    def _build(self, gallery_catalog: Path, model: Path, detector_path: Path | None) -> str:
        """Stage ``build``: embed the gallery, build and publish the version (activated
        unless told not to; a skipped build re-activates the version it made)."""
        from visearch.index import IndexRoot

        cfg, root = self.cfg, self.inputs.root
        detector_source = (self.detector_source or "") if detector_path is not None else None
        build_fp = {
            "gallery": file_digest(gallery_catalog),
            "embedder": file_digest(model),
            "detector": file_digest(detector_path) if detector_path else None,
            "detector_source": self.detector_source,
            "index": dataclasses.asdict(cfg.index),
            "root": str(root.resolve()),
            # a Milvus version is another output than a faiss one
            **({"milvus": self.inputs.milvus.record()} if self.inputs.milvus else {}),
        }

        def build(out: Path) -> dict[str, Any]:
            before = set(IndexRoot(root).versions()) if root.exists() else set()
            with _fails_as("build", VisearchError, ValueError, OSError, KeyError):
                version = build_index(root, gallery_catalog, model, build_params(cfg),
                                      detector=detector_path,
                                      detector_source=detector_source,
                                      lenient=cfg.lenient, store=self.store,
                                      activate=self.activate, backend=self.inputs.milvus,
                                      runner=self.runner)
                print(build_summary(version, root))
            new = sorted(set(IndexRoot(root).versions()) - before)
            if len(new) != 1:
                raise StageFailed(f"build should add one index version, added {new}")
            (out / VERSION_FILE).write_text(json.dumps({"version": new[0]}))
            return {"version": new[0]}

        result = self._stage("build", build_fp, build)
        version = json.loads((result.out_dir / VERSION_FILE).read_text())["version"]
        if result.skipped and self.activate:
            index_root = IndexRoot(root)
            if version in index_root.versions() and index_root.current() != version:
                index_root.activate(version)
        return version


def rebuild(inputs: RebuildInputs, config: RebuildConfig, *,
            activate: bool = True) -> RebuildResult:
    """Run the whole pipeline (see the module docstring) and publish a new index version.

    ``config`` is checked first (as ``load_config`` checks a file) and recorded as
    ``<work>/config.json``. Raises ``ManifestError``, ``StageFailed`` or ``ValueError`` on
    bad input; a failed rebuild never touches the active version.
    """
    validate(config)
    inputs.work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(inputs.work / "config.json", json.dumps(config.to_dict(), indent=2))
    pipeline = Pipeline(inputs, config, activate=activate)
    try:
        version = pipeline.run()
    finally:
        pipeline.close()
    return RebuildResult(version, pipeline.detector_source, dict(pipeline.timings))


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``rebuild``."""
    p = sub.add_parser(
        "rebuild",
        help="the whole offline pipeline: ingest, clean, train, embed, build (resumable)",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--catalog", type=Path, required=True, help="catalog.jsonl")
    p.add_argument("--root", type=Path, required=True, help="index root directory")
    p.add_argument("--work", type=Path, required=True,
                   help="working directory for stage outputs (resumable)")
    p.add_argument("--config", type=Path, help="JSON config (see index_builder/config.py)")
    p.add_argument("--profile", choices=["cpu-small", "gpu"], help="config profile")
    p.add_argument("--queries", type=Path,
                   help="queries.jsonl for validation Recall@1 while training")
    p.add_argument("--detection", type=Path,
                   help="folder with COCO train.json/val.json for the detector "
                   "(default: <catalog folder>/detection when present)")
    p.add_argument("--detector-source", choices=DETECTOR_SOURCES,
                   help="the detector's training boxes: 'coco' (the detection annotations), "
                   "'catalog' (copy-paste scenes made from the catalog's cut-outs), 'auto' "
                   "(coco when annotations are given or found, else catalog; the default)")
    p.add_argument("--backgrounds", type=Path,
                   help="a folder of ordinary photos (e.g. unlabelled user photos) to paste "
                   "the cut-outs on (default: procedural backgrounds)")
    p.add_argument("--unlabelled-photos", type=Path,
                   help="a folder of unlabelled user photos: adds semi-supervised "
                   "pseudo-labelling rounds (label-detection) to the detector training")
    for stage in ("dedup", "detector", "clean", "merge"):
        p.add_argument(f"--no-{stage}", action="store_true", help=f"skip the {stage} stage")
    p.add_argument("--lenient", action="store_true", help="skip bad catalog rows")
    p.add_argument("--no-activate", action="store_true", help="build without activating")
    add_scale_arguments(p, milvus=True)
    p.set_defaults(func=run_rebuild)


def run_rebuild(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    for stage in ("dedup", "detector", "clean", "merge"):
        if getattr(args, f"no_{stage}"):
            overrides[stage] = {"enabled": False}
    if args.lenient:
        overrides["lenient"] = True
    if args.detector_source:
        overrides.setdefault("detector", {})["source"] = args.detector_source
    try:
        cfg = load_config(args.config, profile=args.profile, overrides=overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    detection = args.detection
    if detection is None and (args.catalog.parent / "detection" / "train.json").is_file():
        detection = args.catalog.parent / "detection"
    if cfg.detector.source == "catalog":
        detection = None
    inputs = RebuildInputs(catalog=args.catalog, root=args.root, work=args.work,
                           queries=args.queries, detection=detection,
                           backgrounds=args.backgrounds,
                           unlabelled_photos=args.unlabelled_photos, ray=args.ray,
                           milvus=backend_from_args(args))
    t0 = time.perf_counter()
    try:
        result = rebuild(inputs, cfg, activate=not args.no_activate)
    except (ManifestError, StageFailed, ValueError) as exc:
        print(f"error: rebuild failed: {exc}", file=sys.stderr)
        return 1
    total = time.perf_counter() - t0
    print("\nrebuild: stage timings")
    for name, seconds in result.timings.items():
        print(f"  {name:<22} {seconds:8.1f} s")
    print(f"  {'total':<22} {total:8.1f} s")
    if result.detector_source:
        print(f"rebuild: detector {result.detector_source}")
    else:
        print("rebuild: WARNING: NO DETECTOR. Search will embed whole user photos, which "
              "matches the background instead of the product (turned off by --no-detector "
              "or detector.enabled = false)", file=sys.stderr)
    print(f"rebuild: index version {result.version} at {args.root}"
          + ("" if args.no_activate else " (active)"))
    return 0
