"""``visearch-index rebuild``: the whole offline pipeline, stage by stage, resumable.

Order (DESIGN.md): ingest -> dedup -> train the detector (and crop catalog images without a
bbox) -> first-pass embedder -> SKU denoise -> SKU merge -> train the embedder on the
cleaned SKUs -> embed the gallery, build the index and neighbour graph, activate.

Each step is one of ``visearch-index``'s own subcommands, run in-process inside
``run_stage`` with a fingerprint of its inputs (file checksums and the digests of the stages
it reads) and parameters: a re-run skips every stage whose inputs did not change, and a
changed parameter reruns that stage and everything downstream. Trainings keep a scratch
directory with checkpoints, so an interrupted training resumes where it stopped. The
catalog is never rewritten: cleaning produces new manifests under ``<work>/catalogs/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from index_builder.cmd_clean import read_removed, read_sku_map
from index_builder.config import RebuildConfig, load_config
from index_builder.stage import DONE_FILE, StageResult, file_checksum, run_stage
from visearch.catalog import read_manifest, write_manifest
from visearch.cleaning import apply_cleaning
from visearch.errors import ManifestError

logger = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """A subcommand run by the pipeline returned a non-zero exit code."""


def _digest(stage_dir: Path) -> str:
    """The fingerprint digest a completed stage recorded in its ``done.json``."""
    return json.loads((stage_dir / DONE_FILE).read_text())["fingerprint_digest"]


def _images_digest(rows: Sequence[Any]) -> str:
    """A cheap digest of the catalog's image files (path, size, mtime), not their bytes."""
    h = hashlib.sha256()
    for row in rows:
        try:
            st = row.path.stat()
            h.update(f"{row.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{row.path}\0missing\n".encode())
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
    ) -> None:
        self.catalog = catalog
        self.root = root
        self.work = work
        self.cfg = config
        self.queries = queries
        self.detection = detection
        self.activate = activate
        self.timings: dict[str, float] = {}
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
        self, name: str, fingerprint: dict[str, Any], argv: list[str], outputs: Sequence[str]
    ) -> StageResult:
        """A training subcommand with a persistent scratch dir (checkpoints survive a crash:
        the next run of the same fingerprint resumes), whose ``outputs`` are published."""
        scratch = self.work / f"{name}.scratch"
        key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        marker = scratch / "fingerprint.txt"
        if scratch.exists() and (not marker.is_file() or marker.read_text() != key):
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True, exist_ok=True)
        marker.write_text(key)

        def work(out: Path) -> dict[str, Any]:
            resume = ["--resume"] if (scratch / "checkpoint.pt").is_file() else []
            self._cli([*argv, "--out", scratch, *resume])
            for item in outputs:
                if (scratch / item).is_file():
                    shutil.copy2(scratch / item, out / item)
            return {"outputs": [o for o in outputs if (out / o).is_file()]}

        result = self._stage(name, fingerprint, work)
        shutil.rmtree(scratch, ignore_errors=True)
        return result

    # -- the stages ------------------------------------------------------------------------

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

        if cfg.dedup.enabled:
            radius = ["--radius", cfg.dedup.radius] if cfg.dedup.radius is not None else []
            self._timed("dedup", ["dedup", "--catalog", self.catalog, "--out", self.work,
                                  "--workers", cfg.dedup.workers, *radius, *lenient])
            removed |= read_removed(self.work / "dedup" / "removed.json")
            upstream["dedup"] = _digest(self.work / "dedup")

        detector_path: Path | None = None
        if cfg.detector.enabled and self.detection is not None:
            d = cfg.detector
            train_json = self.detection / "train.json"
            val_json = self.detection / "val.json"
            argv = ["train-detector", "--train", train_json, "--images-root",
                    self.detection.parent, "--backbone", d.backbone, "--min-size", d.min_size,
                    "--max-size", d.max_size, "--epochs", d.epochs, "--batch-size",
                    d.batch_size, "--lr", d.lr, "--seed", cfg.seed]
            if val_json.is_file():
                argv += ["--val", val_json]
            fp = {"train": file_checksum(train_json),
                  "val": file_checksum(val_json) if val_json.is_file() else None,
                  # the main-object floor is used after training (crop), not by it
                  "config": {k: v for k, v in d.__dict__.items() if k != "score_thresh"},
                  "seed": cfg.seed}
            det = self._training_stage("detector", fp, argv, ["detector.pt", "history.json"])
            detector_path = det.out_dir / "detector.pt"

        # Catalog images without a bbox get the detector's main-object box.
        catalog = self.catalog
        if any(r.bbox is None for r in rows) and detector_path is not None:
            crop = self._stage(
                "crop", {**upstream, "detector": file_checksum(detector_path),
                         "thresh": cfg.detector.score_thresh},
                lambda out: self._cli(["crop", "--catalog", self.catalog, "--detector",
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
                    *excludes, *lenient,
                ])
                removed |= read_removed(self.work / "clean" / "removed.jsonl")
                excludes += ["--exclude", self.work / "clean" / "removed.jsonl"]
            if cfg.merge.enabled:
                thresholds = ",".join(str(t) for t in cfg.merge.thresholds)
                self._timed("merge", [
                    "merge", "--catalog", catalog, "--model", model, "--out", self.work,
                    "--thresholds", thresholds, *excludes, *lenient,
                ])
                sku_map = read_sku_map(self.work / "merge" / "sku_map.json")
            for stage in ("clean", "merge"):
                if getattr(cfg, stage).enabled:
                    upstream[stage] = _digest(self.work / stage)

        # Training labels are the merged style ids; the gallery keeps the catalog's SKUs.
        train_catalog = catalogs / "train.jsonl"
        gallery_catalog = catalogs / "gallery.jsonl"
        write_manifest(train_catalog, apply_cleaning(rows, removed, sku_map))
        write_manifest(gallery_catalog, apply_cleaning(rows, removed))
        styles = f", {len(set(sku_map.values()))} style ids from {len(sku_map)} SKUs"
        print(f"\ncleaning: {len(rows)} catalog rows -> {len(rows) - len(removed)} kept "
              f"({len(removed)} removed){styles if sku_map else ''}")

        emb = self._embedder_stage("embedder", train_catalog, upstream,
                                   epochs=cfg.embedder.epochs,
                                   steps=cfg.embedder.steps_per_epoch, val=True)
        model = emb.out_dir / "embedder.pt"

        build_fp = {
            "gallery": file_checksum(gallery_catalog),
            "embedder": file_checksum(model),
            "detector": file_checksum(detector_path) if detector_path else None,
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
                argv += ["--detector", detector_path]
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
    detection = args.detection
    if detection is None and (args.catalog.parent / "detection" / "train.json").is_file():
        detection = args.catalog.parent / "detection"
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    pipeline = Pipeline(catalog=args.catalog, root=args.root, work=args.work, config=cfg,
                        queries=args.queries, detection=detection,
                        activate=not args.no_activate)
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
    print(f"rebuild: index version {version} at {args.root}"
          + ("" if args.no_activate else " (active)"))
    return 0
