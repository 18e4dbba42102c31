"""``visearch-index rebuild``: the whole offline pipeline, stage by stage, resumable.

Order (DESIGN.md): ingest -> dedup -> product cut-outs -> copy-paste scenes -> train the
detector (on given COCO annotations, else on the scenes; then box catalog images without a
bbox) -> first-pass embedder -> SKU denoise -> SKU merge -> train the embedder on the
cleaned SKUs (shop images plus the scenes' user-photo-like crops) -> embed the gallery,
build the index and neighbour graph, activate.

Each step is one of ``visearch-index``'s own subcommands, run in-process inside
``run_stage`` with a fingerprint of its inputs (file checksums and the digests of the stages
it reads) and parameters: a re-run skips every stage whose inputs did not change, and a
changed parameter reruns that stage and everything downstream. Trainings keep a scratch
directory with checkpoints, so an interrupted training resumes where it stopped. The
catalog is never rewritten: cleaning produces new manifests under ``<work>/catalogs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from index_builder.cmd_clean import read_removed, read_sku_map
from index_builder.config import DETECTOR_SOURCES, RebuildConfig, load_config
from index_builder.stage import DONE_FILE, StageResult, file_checksum, run_stage
from visearch.catalog import CatalogRow, read_manifest, write_manifest
from visearch.cleaning import apply_cleaning
from visearch.errors import ManifestError
from visearch.imageio import image_files

logger = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """A subcommand run by the pipeline returned a non-zero exit code."""


def _digest(stage_dir: Path) -> str:
    """The fingerprint digest a completed stage recorded in its ``done.json``."""
    return json.loads((stage_dir / DONE_FILE).read_text())["fingerprint_digest"]


def _images_digest(rows: Sequence[Any]) -> str:
    """A cheap digest of the catalog's image files (path, size, mtime), not their bytes."""
    return _images_digest_paths(row.path for row in rows)


def _images_digest_paths(paths: Iterable[Path]) -> str:
    """A cheap digest of files (path, size, mtime), not their bytes."""
    h = hashlib.sha256()
    for path in paths:
        try:
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()


class Pipeline:
    """Runs the stages of one rebuild; ``run()`` returns the new index version's name."""

    def __init__(
        self,
        *,
        catalog: Path,
        root: Path,
        work: Path,
        config: RebuildConfig,
        queries: Path | None,
        detection: Path | None,
        activate: bool = True,
        backgrounds: Path | None = None,
        unlabelled_photos: Path | None = None,
    ) -> None:
        self.catalog = catalog
        self.root = root
        self.work = work
        self.cfg = config
        self.queries = queries
        self.detection = detection
        self.activate = activate
        self.backgrounds = backgrounds
        self.unlabelled_photos = unlabelled_photos
        self.timings: dict[str, float] = {}
        #: where the detector came from, in words (None: no detector); set by run()
        self.detector_source: str | None = None
        self.scenes_summary: dict[str, Any] = {}
        self.cutouts_summary: dict[str, Any] = {}
        self._parser: argparse.ArgumentParser | None = None

    # -- running subcommands ------------------------------------------------------------

    def _cli(self, argv: list[str]) -> None:
        """Run one ``visearch-index`` subcommand in this process; raise on failure."""
        if self._parser is None:
            from index_builder.cli import build_parser

            self._parser = build_parser()
        args = self._parser.parse_args([str(a) for a in argv])
        logger.info("running: visearch-index %s", " ".join(str(a) for a in argv))
        code = int(args.func(args) or 0)
        if code != 0:
            raise StageFailed(f"'visearch-index {argv[0]}' failed with exit code {code}")

    def _timed(self, name: str, argv: list[Any]) -> None:
        """A subcommand that is a resumable stage by itself (dedup, clean, merge)."""
        t0 = time.perf_counter()
        print(f"\n--- stage {name}", flush=True)
        self._cli(argv)
        self.timings[name] = time.perf_counter() - t0
        print(f"--- stage {name}: {self.timings[name]:.1f} s", flush=True)

    def _stage(self, name: str, fingerprint: dict[str, Any], fn: Any) -> StageResult:
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

    def _training_stage(
        self, name: str, fingerprint: dict[str, Any], argv: list[str], outputs: Sequence[str],
        *, gather: dict[str, str] | None = None,
    ) -> StageResult:
        """A training subcommand with a persistent scratch dir (checkpoints survive a crash:
        the next run of the same fingerprint resumes), whose ``outputs`` are published;
        ``gather`` maps an output name to the scratch-relative file it is copied from."""
        scratch = self.work / f"{name}.scratch"
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        marker = scratch / "fingerprint.txt"
        if scratch.exists() and (not marker.is_file() or marker.read_text() != key):
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True, exist_ok=True)
        marker.write_text(key)

        def work(out: Path) -> dict[str, Any]:
            resume = ["--resume"] if any(scratch.rglob("checkpoint.pt")) else []
            self._cli([*argv, "--out", scratch, *resume])
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

    # -- the stages ------------------------------------------------------------------------

    def _use_coco(self) -> bool:
        """Whether the detector trains on given COCO annotations (else on catalog scenes)."""
        source = self.cfg.detector.source
        if source == "coco" and self.detection is None:
            raise ValueError("detector.source is 'coco' but no detection annotations were "
                             "given or found (--detection DIR with train.json)")
        return self.detection is not None and source in ("auto", "coco")

    def _scene_stages(
        self, manifest: Any, removed: set[str], upstream: dict[str, Any]
    ) -> tuple[Path, dict[str, tuple[float, float, float, float]]]:
        """The ``cutouts`` and ``scenes`` stages; returns the scenes folder and the cut-out
        box of each usable catalog image."""
        from index_builder.cmd_scenes import (
            background_files,
            cut_out_catalog,
            read_cutout_boxes,
            synthesize_catalog_scenes,
        )

        sc = self.cfg.scenes
        cut = self._stage(
            "cutouts", {**upstream, "min_quality": sc.min_quality},
            lambda out: cut_out_catalog(manifest.rows, out, rejects=manifest.rejects,
                                        exclude=removed, min_quality=sc.min_quality,
                                        progress=True),
        )
        self.cutouts_summary = cut.summary
        print(f"cut-outs: {cut.summary.get('objects')} usable of {cut.summary.get('rows')} "
              f"catalog rows {cut.summary.get('statuses')} "
              f"(per-row report: {cut.out_dir / 'report.jsonl'})", flush=True)
        backgrounds = background_files(self.backgrounds)
        fp = {"cutouts": _digest(cut.out_dir),
              "config": {k: v for k, v in sc.__dict__.items()
                         if k not in ("query_domain", "detector_epochs", "min_quality")},
              "seed": self.cfg.seed,
              "backgrounds": _images_digest_paths(backgrounds)}
        scenes = self._stage(
            "scenes", fp,
            lambda out: synthesize_catalog_scenes(
                cut.out_dir, out, scenes_per_object=sc.scenes_per_object,
                image_size=sc.image_size, seed=self.cfg.seed, backgrounds=backgrounds,
                max_distractors=sc.max_distractors, crops_per_scene=sc.crops_per_scene,
                crop_jitter=sc.crop_jitter, val_fraction=sc.val_fraction,
                workers=self.cfg.workers, progress=True),
        )
        self.scenes_summary = scenes.summary
        upstream["scenes"] = _digest(scenes.out_dir)
        return scenes.out_dir, read_cutout_boxes(cut.out_dir)

    def _detector_stage(self, train_json: Path, val_json: Path, images_root: Path,
                        epochs: int) -> tuple[Path, str]:
        """Train the detector (optionally with pseudo-labelling rounds on unlabelled photos);
        returns its weights file and its classes in words."""
        d = self.cfg.detector
        train_json, val_json, labels = self._relabel(train_json, val_json)
        has_val = val_json.is_file()
        model = ["--backbone", d.backbone, "--min-size", d.min_size, "--max-size",
                 d.max_size, "--epochs", epochs, "--batch-size", d.batch_size, "--lr", d.lr,
                 "--seed", self.cfg.seed, "--images-root", images_root]
        gather = None
        if self.unlabelled_photos is None:
            argv = ["train-detector", "--train", train_json, *model]
        else:
            argv = ["label-detection", "--labelled", train_json, "--unlabelled",
                    self.unlabelled_photos, "--rounds", d.rounds, *model]
            gather = {"detector.pt": f"round_{d.rounds}/model/detector.pt"}
        if has_val:
            argv += ["--val", val_json]
        fp = {"train": file_checksum(train_json),
              "val": file_checksum(val_json) if has_val else None,
              "images": _images_digest_paths(sorted(images_root.glob("*/*.jpg"))),
              "unlabelled": (_images_digest_paths(image_files(self.unlabelled_photos))
                             if self.unlabelled_photos is not None else None),
              # the main-object floor is used after training (crop), not by it
              "config": {k: v for k, v in d.__dict__.items() if k != "score_thresh"},
              "epochs": epochs, "seed": self.cfg.seed}
        det = self._training_stage("detector", fp, argv,
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
                dst.write_text(json.dumps(relabel(coco)))
            else:
                dst.unlink(missing_ok=True)
            paths.append(dst)
        words = ("main-object (main vs other products)" if labels == "main"
                 else "class-agnostic")
        return paths[0], paths[1], words

    def _query_domain_rows(self, scenes_dir: Path, train_rows: Sequence[CatalogRow],
                           removed: set[str], sku_map: dict[str, str]) -> list[CatalogRow]:
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
            out.append(dataclasses.replace(
                ref, line=len(train_rows) + line, image=obj["image"],
                path=(scenes_dir / obj["image"]).resolve(), bbox=None))
        return out


    def run(self) -> str:
        cfg = self.cfg
        lenient = ["--lenient"] if cfg.lenient else []
        manifest = read_manifest(self.catalog, strict=not cfg.lenient)
        rows = manifest.rows
        base = {
            "catalog": file_checksum(self.catalog),
            "images": _images_digest(rows),
            "lenient": cfg.lenient,
        }

        ingest = self._stage(
            "ingest", base,
            lambda out: self._cli(["ingest", "--catalog", self.catalog, "--store",
                                   out / "store", *lenient]),
        )
        removed: set[str] = set()
        upstream = {**base, "ingest": _digest(ingest.out_dir)}

        # Review decisions (visearch-index review) are applied by every cleaning stage.
        from index_builder.cmd_review import decisions_path

        reviewed = (["--decisions", decisions_path(self.work)]
                    if decisions_path(self.work).is_file() else [])
        if cfg.dedup.enabled:
            radius = ["--radius", cfg.dedup.radius] if cfg.dedup.radius is not None else []
            if cfg.dedup.color_tol is not None:
                radius += ["--color-tol", cfg.dedup.color_tol]
            self._timed("dedup", ["dedup", "--catalog", self.catalog, "--out", self.work,
                                  "--workers", cfg.dedup.workers, *radius, *reviewed,
                                  *lenient])
            removed |= read_removed(self.work / "dedup" / "removed.json")
            upstream["dedup"] = _digest(self.work / "dedup")

        # The detector's training boxes: given COCO annotations, else copy-paste scenes made
        # from the catalog's own cut-outs (a real catalog has no COCO scenes).
        use_coco = self._use_coco()
        scenes_dir: Path | None = None
        cutout_boxes: dict[str, tuple[float, float, float, float]] = {}
        if (cfg.detector.enabled and not use_coco) or cfg.scenes.query_domain:
            scenes_dir, cutout_boxes = self._scene_stages(manifest, removed, upstream)

        detector_path: Path | None = None
        if cfg.detector.enabled:
            if use_coco:
                assert self.detection is not None
                detector_path, kind = self._detector_stage(
                    self.detection / "train.json", self.detection / "val.json",
                    self.detection.parent, cfg.detector.epochs)
                source = f"COCO annotations in {self.detection}"
            else:
                assert scenes_dir is not None
                epochs = cfg.scenes.detector_epochs or cfg.detector.epochs
                detector_path, kind = self._detector_stage(
                    scenes_dir / "train.json", scenes_dir / "val.json", scenes_dir, epochs)
                s = self.scenes_summary
                source = (f"{s.get('train_images', '?')} copy-paste scenes made from "
                          f"{s.get('objects', '?')} catalog cut-outs on "
                          f"{s.get('background_source', '?')} backgrounds")
            if self.unlabelled_photos is not None:
                source += f", + pseudo-labels on {self.unlabelled_photos}"
            self.detector_source = f"{kind}, trained on {source}"
            print(f"detector: {self.detector_source}", flush=True)
        else:
            self.detector_source = None

        # Catalog images without a bbox get the cut-out's box, else the detector's main object.
        catalog = self.catalog
        if any(r.bbox is None for r in rows) and cutout_boxes:
            rows = [dataclasses.replace(r, bbox=cutout_boxes[r.image])
                    if r.bbox is None and r.image in cutout_boxes else r for r in rows]
            catalog = self.work / "catalogs" / "boxed.jsonl"
            catalog.parent.mkdir(parents=True, exist_ok=True)
            write_manifest(catalog, rows)
        if any(r.bbox is None for r in rows) and detector_path is not None:
            crop = self._stage(
                "crop", {**upstream, "catalog": file_checksum(catalog),
                         "detector": file_checksum(detector_path),
                         "thresh": cfg.detector.score_thresh},
                lambda out: self._cli(["crop", "--catalog", catalog, "--detector",
                                       detector_path, "--out", out / "catalog.jsonl",
                                       "--score-thresh", cfg.detector.score_thresh,
                                       *lenient]),
            )
            catalog = crop.out_dir / "catalog.jsonl"
            rows = read_manifest(catalog, strict=not cfg.lenient).rows
            upstream["crop"] = _digest(crop.out_dir)

        catalogs = self.work / "catalogs"
        catalogs.mkdir(parents=True, exist_ok=True)
        sku_map: dict[str, str] = {}
        if cfg.clean.enabled or cfg.merge.enabled:
            first_pass = catalogs / "dedup.jsonl"
            write_manifest(first_pass, apply_cleaning(rows, removed))
            emb = self._embedder_stage("embedder_first_pass", first_pass, upstream,
                                       epochs=cfg.embedder.cleaning_epochs,
                                       steps=cfg.embedder.cleaning_steps_per_epoch, val=False)
            model = emb.out_dir / "embedder.pt"
            excludes: list[Any] = []
            if cfg.dedup.enabled:
                excludes += ["--exclude", self.work / "dedup" / "removed.json"]
            if cfg.clean.enabled:
                self._timed("clean", [
                    "clean", "--catalog", catalog, "--model", model, "--out", self.work,
                    "--eps", cfg.clean.eps, "--return-thresh", cfg.clean.return_thresh,
                    *excludes, *reviewed, *lenient,
                ])
                removed |= read_removed(self.work / "clean" / "removed.jsonl")
                excludes += ["--exclude", self.work / "clean" / "removed.jsonl"]
            if cfg.merge.enabled:
                m = cfg.merge
                thresholds = ",".join(str(t) for t in m.thresholds)
                self._timed("merge", [
                    "merge", "--catalog", catalog, "--model", model, "--out", self.work,
                    "--rule", m.rule, "--thresholds", thresholds,
                    "--false-merge-rate", m.false_merge_rate, "--review-rate", m.review_rate,
                    "--min-confusion", m.min_confusion, *excludes, *reviewed, *lenient,
                ])
                sku_map = read_sku_map(self.work / "merge" / "sku_map.json")
            for stage in ("clean", "merge"):
                if getattr(cfg, stage).enabled:
                    upstream[stage] = _digest(self.work / stage)
        self.review_summary: dict[str, Any] = {}
        if cfg.dedup.enabled or cfg.clean.enabled or cfg.merge.enabled:
            from index_builder.cmd_review import write_review

            self.review_summary = write_review(list(rows), self.catalog, self.work)

        # Training labels are the merged style ids; the gallery keeps the catalog's SKUs.
        train_catalog = catalogs / "train.jsonl"
        gallery_catalog = catalogs / "gallery.jsonl"
        train_rows = apply_cleaning(rows, removed, sku_map)
        extra: list[CatalogRow] = []
        if cfg.scenes.query_domain and scenes_dir is not None:
            extra = self._query_domain_rows(scenes_dir, train_rows, removed, sku_map)
        write_manifest(train_catalog, train_rows + extra)
        write_manifest(gallery_catalog, apply_cleaning(rows, removed))
        styles = f", {len(set(sku_map.values()))} style ids from {len(sku_map)} SKUs"
        print(f"\ncleaning: {len(rows)} catalog rows -> {len(rows) - len(removed)} kept "
              f"({len(removed)} removed){styles if sku_map else ''}")
        if self.review_summary:
            rs = self.review_summary
            print(f"review: {rs['merge']} merges, {rs['duplicate']} cross-SKU duplicates, "
                  f"{rs['denoise']} denoise removals ({rs['pending']} pending, "
                  f"{rs['decided']} decided) -> {rs['page']}", flush=True)
        if extra:
            print(f"query-domain training: {len(extra)} user-photo-like crops from the "
                  f"scenes beside {len(train_rows)} shop images", flush=True)

        emb = self._embedder_stage("embedder", train_catalog, upstream,
                                   epochs=cfg.embedder.epochs,
                                   steps=cfg.embedder.steps_per_epoch, val=True)
        model = emb.out_dir / "embedder.pt"

        build_fp = {
            "gallery": file_checksum(gallery_catalog),
            "embedder": file_checksum(model),
            "detector": file_checksum(detector_path) if detector_path else None,
            "detector_source": self.detector_source,
            "index": cfg.index.__dict__,
            "root": str(self.root.resolve()),
        }
        version_file = "version.json"

        def build(out: Path) -> dict[str, Any]:
            from visearch.index import IndexRoot

            before = set(IndexRoot(self.root).versions()) if self.root.exists() else set()
            argv = ["build", "--root", self.root, "--catalog", gallery_catalog, "--model",
                    model, "--k1", cfg.index.k1, *lenient]
            if detector_path is not None:
                argv += ["--detector", detector_path, "--detector-source",
                         self.detector_source or ""]
            if cfg.index.factory:
                argv += ["--factory", cfg.index.factory]
            if cfg.index.graph_nprobe is not None:
                argv += ["--graph-nprobe", cfg.index.graph_nprobe]
            if cfg.index.graph_ef_search is not None:
                argv += ["--graph-ef-search", cfg.index.graph_ef_search]
            if not self.activate:
                argv += ["--no-activate"]
            self._cli(argv)
            new = sorted(set(IndexRoot(self.root).versions()) - before)
            if len(new) != 1:
                raise StageFailed(f"build should add one index version, added {new}")
            (out / version_file).write_text(json.dumps({"version": new[0]}))
            return {"version": new[0]}

        result = self._stage("build", build_fp, build)
        version = json.loads((result.out_dir / version_file).read_text())["version"]
        if result.skipped and self.activate:
            from visearch.index import IndexRoot

            index_root = IndexRoot(self.root)
            if version in index_root.versions() and index_root.current() != version:
                index_root.activate(version)
        return version

    def _embedder_stage(
        self, name: str, catalog: Path, upstream: dict[str, Any], *, epochs: int,
        steps: int | None, val: bool,
    ) -> StageResult:
        e = self.cfg.embedder
        argv = ["train-embedder", "--catalog", catalog, "--backbone", e.backbone, "--dim",
                e.dim, "--pooling", e.pooling, "--loss", e.loss, "--triplet-weight",
                e.triplet_weight, "--epochs", epochs, "--p", e.p, "--k", e.k, "--image-size",
                e.image_size, "--lr", e.lr, "--seed", self.cfg.seed, "--quiet"]
        if e.attention:
            argv.append("--attention")
        for flag, value in (("--margin", e.margin), ("--scale", e.scale),
                            ("--backbone-lr-mult", e.backbone_lr_mult),
                            ("--frozen-blocks", e.frozen_blocks), ("--augment", e.augment),
                            ("--erasing", e.erasing),
                            ("--steps-per-epoch", steps)):
            if value is not None:
                argv += [flag, value]
        argv.append("--freeze-bn" if e.freeze_bn else "--no-freeze-bn")
        if e.pretrained and Path(e.pretrained).is_file():
            argv += ["--pretrained", e.pretrained]
        if val and self.queries is not None:
            argv += ["--val-queries", self.queries]
        fp = {"catalog": file_checksum(catalog), "config": e.__dict__, "epochs": epochs,
              "steps": steps,
              "queries": file_checksum(self.queries) if val and self.queries else None,
              "seed": self.cfg.seed, "upstream": upstream}
        return self._training_stage(name, fp, argv,
                                    ["embedder.pt", "history.json", "labels.json"])


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
    p.set_defaults(func=run_rebuild)


def run_rebuild(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, profile=args.profile)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for stage in ("dedup", "detector", "clean", "merge"):
        if getattr(args, f"no_{stage}"):
            getattr(cfg, stage).enabled = False
    cfg.lenient = cfg.lenient or args.lenient
    if args.detector_source:
        cfg.detector.source = args.detector_source
    detection = args.detection
    if detection is None and (args.catalog.parent / "detection" / "train.json").is_file():
        detection = args.catalog.parent / "detection"
    if cfg.detector.source == "catalog":
        detection = None
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    pipeline = Pipeline(catalog=args.catalog, root=args.root, work=args.work, config=cfg,
                        queries=args.queries, detection=detection,
                        activate=not args.no_activate, backgrounds=args.backgrounds,
                        unlabelled_photos=args.unlabelled_photos)
    t0 = time.perf_counter()
    try:
        version = pipeline.run()
    except (ManifestError, StageFailed, ValueError) as exc:
        print(f"error: rebuild failed: {exc}", file=sys.stderr)
        return 1
    total = time.perf_counter() - t0
    print("\nrebuild: stage timings")
    for name, seconds in pipeline.timings.items():
        print(f"  {name:<22} {seconds:8.1f} s")
    print(f"  {'total':<22} {total:8.1f} s")
    if pipeline.detector_source:
        print(f"rebuild: detector {pipeline.detector_source}")
    else:
        print("rebuild: WARNING: NO DETECTOR. Search will embed whole user photos, which "
              "matches the background instead of the product (turned off by --no-detector "
              "or detector.enabled = false)", file=sys.stderr)
    print(f"rebuild: index version {version} at {args.root}"
          + ("" if args.no_activate else " (active)"))
    return 0
