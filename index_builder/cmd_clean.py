"""``visearch-index dedup | clean | merge``: the catalog-cleaning stages.

Each is a resumable stage (``index_builder.stage.run_stage``) under ``--out``: it is skipped
when its inputs (checksums) and parameters are unchanged. None rewrites the catalog; each
writes what to drop or rename, which ``visearch.cleaning.apply_cleaning`` applies:

- ``<out>/dedup/removed.json``: JSON list of catalog ``image`` fields (duplicates to drop,
  within a SKU only); ``report.json`` has the groups, each removal's representative and
  distance, and the cross-SKU duplicate pairs (reported for review, never removed).
- ``<out>/clean/removed.jsonl``: one ``{"image", "sku", "reason", "distance"}`` per line;
  ``report.json`` has them per SKU too.
- ``<out>/merge/sku_map.json``: ``{old_sku: style_id}`` for every SKU; ``report.json`` has
  the merge groups, and (calibrated rule) every examined pair with its evidence and
  decision, the pairs for review among them.

``--decisions`` (a review decisions JSONL, see ``visearch-index review``) is applied by each
stage: accepted cross-SKU duplicates are dropped, rejected denoise removals kept, accepted
merges merged and rejected ones never.

``--store`` (the LMDB store ``visearch-index ingest`` wrote) makes each stage read the
catalog's images from the store, as ingested and validated, instead of from their files.

The typed functions :func:`dedup_catalog`, :func:`clean_catalog` and :func:`merge_catalog`
are what ``rebuild`` calls; the subcommands are thin wrappers over them. Below them,
:func:`dedup_stage`, :func:`clean_stage` and :func:`merge_stage` run on rows and embeddings
already in memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index_builder.cmd_index import add_scale_arguments
from index_builder.cmd_ingest import add_store_argument
from index_builder.stage import StageResult, run_stage, stat_digest
from visearch.catalog import CatalogRow, read_manifest
from visearch.cleaning import apply_cleaning, calibrated_merge, denoise_skus, merge_skus
from visearch.cleaning.calibrated import FALSE_MERGE_RATE, MIN_CONFUSION, REVIEW_RATE
from visearch.cleaning.dedup import (
    COLOR_TOL,
    HASH_KIND,
    HASH_KINDS,
    HASH_SIZE,
    RADIUS,
    dedup_images,
    hash_images,
)
from visearch.cleaning.denoise import EPS, MIN_SIZE, RETURN_THRESH
from visearch.cleaning.merge import FOLDS, THRESHOLDS
from visearch.cleaning.review import Decision, read_decisions, reviewed_pairs
from visearch.fileio import file_digest
from visearch.parallel import Runner, make_runner
from visearch.store import store_lookup

EMBED_STAGE = "clean-embed"


# ---- typed arguments and results --------------------------------------------------------------


@dataclass(frozen=True)
class DedupParams:
    """The ``dedup`` stage's parameters (``visearch.cleaning.dedup.dedup_images``)."""

    radius: int = RADIUS  # inclusive Hamming radius
    #: largest relative chroma difference of two near-duplicates; None: grey-scale hash only
    color_tol: float | None = COLOR_TOL
    hash_size: int = HASH_SIZE
    hash_kind: str = HASH_KIND
    method: str = "auto"  # faiss binary index for the range search: auto, flat, multihash
    workers: int = 1  # hashing processes


@dataclass(frozen=True)
class EmbeddingSource:
    """Where ``clean`` and ``merge`` get the catalog's embeddings: a precomputed file
    (``embeddings``), or a model (``model``) run once over the catalog in the shared
    ``clean-embed`` stage with the other fields."""

    model: Path | None = None
    #: .npz with 'embeddings' float32 [N, D] and 'images' [N], or .npy [rows, D]
    embeddings: Path | None = None
    batch_size: int = 64
    num_workers: int = 0
    device: str | None = None  # None: the model's

    def __post_init__(self) -> None:
        if (self.model is None) == (self.embeddings is None):
            raise ValueError("give exactly one of an embedder model and an embeddings file")


@dataclass(frozen=True)
class CleanParams:
    """The ``clean`` stage's parameters (``visearch.cleaning.denoise_skus``)."""

    eps: float = EPS  # step-1 DBSCAN eps (cosine distance)
    return_thresh: float | None = RETURN_THRESH  # None skips step 2
    return_rule: str = "centroid"
    min_size: int = MIN_SIZE  # smaller SKUs are kept whole


@dataclass(frozen=True)
class MergeParams:
    """The ``merge`` stage's parameters: rule "calibrated" (``calibrated_merge``) or
    "confusion" (``merge_skus``); see :func:`merge_stage`."""

    rule: str = "calibrated"
    thresholds: tuple[float, ...] = THRESHOLDS
    folds: int = FOLDS
    soft: bool = True
    by_category: bool = True
    false_merge_rate: float = FALSE_MERGE_RATE
    review_rate: float = REVIEW_RATE
    min_confusion: float = MIN_CONFUSION
    color_tol: float | None = None  # None: no colour check
    workers: int = 1  # processes for colour signatures


@dataclass(frozen=True)
class CleaningResult:
    """What ``clean_catalog`` or ``merge_catalog`` did: the shared embedding stage (None
    when the embeddings were given) and the stage itself."""

    embed: StageResult | None
    stage: StageResult

    def report(self, what: str) -> str:
        """The lines the subcommand ``what`` prints: the embedding stage's (when it ran),
        then its own."""
        lines = [report_line(self.embed, "embed")] if self.embed is not None else []
        return "\n".join([*lines, report_line(self.stage, what)])


# ---- stage outputs, for the rebuild pipeline ------------------------------------------------


def read_removed(path: str | os.PathLike[str]) -> set[str]:
    """Catalog ``image`` fields listed in a ``removed.json`` (JSON list of strings or of
    objects with ``image``) or ``removed.jsonl`` (one object with ``image`` per line)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        items: Iterable[Any] = (json.loads(line) for line in text.splitlines() if line.strip())
    else:
        items = json.loads(text)
    out: set[str] = set()
    for it in items:
        out.add(it if isinstance(it, str) else it["image"])
    return out


def read_sku_map(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``{old_sku: style_id}`` map written by ``merge``."""
    return dict(json.loads(Path(path).read_text(encoding="utf-8")))


def report_line(result: StageResult, what: str) -> str:
    """The line the cleaning subcommands (and ``rebuild``) print for a stage."""
    state = "up to date, skipped" if result.skipped else f"done in {result.seconds:.1f} s"
    summary = ", ".join(f"{k} {v}" for k, v in result.summary.items())
    return f"{what}: {state}: {summary} -> {result.out_dir}"


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def rows_digest(rows: Sequence[CatalogRow]) -> str:
    """Digest of every image's name, size and mtime: changes when an image file changes,
    without reading the images. A row read from the store counts by its stored image
    (store and MD5), so its file may move or change without rerunning anything."""
    files = stat_digest((r.image, r.path) for r in rows if r.stored is None)
    stored = [r for r in rows if r.stored is not None]
    if not stored:
        return files
    h = hashlib.sha256(files.encode())
    for r in stored:
        assert r.stored is not None  # filtered above
        h.update(f"{r.image}\0{r.stored.name}\n".encode())
    return h.hexdigest()


def _labels_digest(rows: Sequence[CatalogRow]) -> str:
    """Digest of the rows' images, SKUs and categories (what denoise and merge read)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r.image}\0{r.sku}\0{r.category}\n".encode())
    return h.hexdigest()


def _decisions(path: Path | None) -> tuple[dict[str, Decision], str | None]:
    """The decisions at ``path`` and a checksum for the fingerprint (None when absent)."""
    if path is None or not Path(path).is_file():
        return {}, None
    return read_decisions(path), file_digest(path)


# ---- dedup ------------------------------------------------------------------------------------


def dedup_stage(
    rows: Sequence[CatalogRow],
    work_dir: Path,
    *,
    inputs: dict[str, Any],
    radius: int = RADIUS,
    hash_size: int = HASH_SIZE,
    hash_kind: str = HASH_KIND,
    color_tol: float | None = COLOR_TOL,
    method: str = "auto",
    workers: int = 1,
    decisions: Path | None = None,
    force: bool = False,
    runner: Runner | None = None,
) -> StageResult:
    """The ``dedup`` stage over catalog ``rows``: ``<work_dir>/dedup/removed.json`` and
    ``report.json``. ``inputs`` identifies the catalog (e.g. ``{"catalog": checksum}``); the
    images' names, sizes and mtimes are added to the fingerprint here. Removals stay within
    a SKU; an accepted cross-SKU duplicate in ``decisions`` drops its ``image b``.
    ``runner`` (Ray Data) hashes instead of ``workers`` processes: the same hashes, so it
    is not part of the fingerprint."""
    reviewed, reviewed_sum = _decisions(decisions)
    fingerprint = {**inputs, "images": rows_digest(rows), "radius": radius,
                   "hash_size": hash_size, "hash_kind": hash_kind, "color_tol": color_tol,
                   "decisions": reviewed_sum,
                   "skus": _labels_digest(rows)}

    # A catalog may list one image file on several rows: it is hashed (and kept) once.
    unique = list({r.image: r for r in rows}.values())

    def work(out: Path) -> dict[str, Any]:
        result = dedup_images(
            [r.source for r in unique],
            [r.image for r in unique],
            skus=[r.sku for r in unique],
            radius=radius,
            hash_size=hash_size,
            kind=hash_kind,
            color_tol=color_tol,
            method=method,
            workers=workers,
            progress=True,
            runner=runner,
        )
        accepted = {b for _, b in reviewed_pairs(reviewed, "duplicate", "accept")}
        dropped = {p.image_b for p in result.cross_sku if p.image_b in accepted}
        _write_json(out / "removed.json", sorted(result.removed_images | dropped))
        report = result.to_dict()
        report["removed_by_review"] = sorted(dropped)
        _write_json(out / "report.json", report)
        return {**result.summary(), "removed_by_review": len(dropped)}

    return run_stage("dedup", work_dir, fingerprint, work, force=force)


def dedup_catalog(
    catalog: Path,
    work_dir: Path,
    params: DedupParams,
    *,
    lenient: bool = False,
    decisions: Path | None = None,
    store: Path | None = None,
    force: bool = False,
    runner: Runner | None = None,
) -> StageResult:
    """The ``dedup`` stage over the ``catalog`` file (see :func:`dedup_stage`); its
    checksum identifies the catalog. With ``store`` the images are read from that image
    store (``ImageStore.lookup``), not from their files.

    Raises:
        ManifestError: a bad catalog row (unless ``lenient``).
    """
    rows = read_manifest(catalog, strict=not lenient, images=store_lookup(store)).rows
    return dedup_stage(
        rows,
        work_dir,
        inputs={"catalog": file_digest(catalog)},
        radius=params.radius,
        hash_size=params.hash_size,
        hash_kind=params.hash_kind,
        color_tol=params.color_tol,
        method=params.method,
        workers=params.workers,
        decisions=decisions,
        force=force,
        runner=runner,
    )


# ---- embeddings shared by clean and merge -----------------------------------------------------


def _load_embeddings(path: Path, rows: Sequence[CatalogRow]) -> np.ndarray:
    """``float32 [len(rows), D]`` for the catalog ``rows``, from an ``.npz`` (matched by
    image) or an ``.npy`` (one row per catalog row, in catalog order)."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            emb, images = z["embeddings"], [str(s) for s in z["images"]]
        pos = {name: i for i, name in enumerate(images)}
        missing = [r.image for r in rows if r.image not in pos]
        if missing:
            raise ValueError(f"{path}: no embedding for {len(missing)} image(s), e.g. {missing[0]}")
        return np.ascontiguousarray(emb[[pos[r.image] for r in rows]], dtype=np.float32)
    emb = np.load(path, allow_pickle=False)
    if emb.ndim != 2 or len(emb) != len(rows):
        raise ValueError(
            f"{path}: expected [{len(rows)}, D] (one row per catalog row), got {emb.shape}; "
            "or pass an .npz with 'embeddings' and 'images'"
        )
    return np.ascontiguousarray(emb, dtype=np.float32)


def _embeddings(
    catalog: Path, rows: list[CatalogRow], work_dir: Path, source: EmbeddingSource,
    force: bool,
) -> tuple[np.ndarray, str, StageResult | None]:
    """Embeddings of all catalog ``rows``, a checksum of where they came from, and the
    ``clean-embed`` stage that computed them (None: read from ``source.embeddings``)."""
    if source.embeddings is not None:
        emb = _load_embeddings(source.embeddings, rows)
        return emb, file_digest(source.embeddings), None
    from visearch.embedding import embed_items, load_embedder

    assert source.model is not None  # EmbeddingSource holds one of the two
    model_path = source.model
    fingerprint = {
        "catalog": file_digest(catalog),
        "images": rows_digest(rows),
        "model": file_digest(model_path),
    }

    def work(out: Path) -> dict[str, Any]:
        model = load_embedder(model_path, device=source.device or "cpu")
        items = ((i, r.source, r.bbox) for i, r in enumerate(rows))
        ids, feats = [], []
        for b_ids, b_feats in embed_items(
            model,
            items,
            batch_size=source.batch_size,
            num_workers=source.num_workers,
            device=source.device,
            progress=True,
        ):
            ids.append(b_ids)
            feats.append(b_feats)
        emb = np.concatenate(feats)[np.argsort(np.concatenate(ids))]
        np.savez(out / "embeddings.npz", embeddings=emb, images=np.array([r.image for r in rows]))
        return {"images": len(rows), "dim": int(emb.shape[1])}

    result = run_stage(EMBED_STAGE, work_dir, fingerprint, work, force=force)
    path = result.out_dir / "embeddings.npz"
    return _load_embeddings(path, rows), file_digest(path), result


def _cleaning_inputs(
    catalog: Path, work_dir: Path, source: EmbeddingSource, exclude: Sequence[Path],
    *, lenient: bool, store: Path | None, force: bool,
) -> tuple[list[CatalogRow], np.ndarray, dict[str, Any], StageResult | None]:
    """The catalog rows left after ``exclude`` (images read from ``store`` when given),
    their embeddings, the fingerprint, and the embedding stage (None for given
    embeddings)."""
    rows = read_manifest(catalog, strict=not lenient, images=store_lookup(store)).rows
    emb, emb_sum, embed = _embeddings(catalog, rows, work_dir, source, force)
    removed: set[str] = set()
    for path in exclude:
        removed |= read_removed(path)
    keep = np.array([r.image not in removed for r in rows], dtype=bool)
    kept_rows = apply_cleaning(rows, removed)
    fingerprint = {
        "catalog": file_digest(catalog),
        "embeddings": emb_sum,
        "exclude": [file_digest(p) for p in exclude],
    }
    return kept_rows, emb[keep], fingerprint, embed


# ---- clean ------------------------------------------------------------------------------------


def clean_stage(
    rows: Sequence[CatalogRow],
    embeddings: np.ndarray,
    work_dir: Path,
    *,
    inputs: dict[str, Any],
    eps: float = EPS,
    return_thresh: float | None = RETURN_THRESH,
    return_rule: str = "centroid",
    min_size: int = MIN_SIZE,
    decisions: Path | None = None,
    force: bool = False,
) -> StageResult:
    """The ``clean`` stage (SKU denoising) over ``rows`` and their ``embeddings``
    (``float32 [len(rows), D]``): ``<work_dir>/clean/removed.jsonl`` and ``report.json``
    (with the removals per SKU). ``inputs`` identifies rows and embeddings (checksums) for
    the fingerprint. A removal rejected in ``decisions`` is kept (listed as such)."""
    reviewed, reviewed_sum = _decisions(decisions)
    kept_by_review = {s[0] for s in reviewed_pairs(reviewed, "denoise", "reject")}
    fingerprint = {
        "decisions": reviewed_sum,
        **inputs,
        "rows": _labels_digest(rows),
        "eps": eps,
        "return_thresh": return_thresh,
        "return_rule": return_rule,
        "min_size": min_size,
    }

    def work(out: Path) -> dict[str, Any]:
        result = denoise_skus(
            embeddings,
            [r.sku for r in rows],
            eps=eps,
            return_thresh=return_thresh,
            return_rule=return_rule,
            min_size=min_size,
            progress=True,
        )
        per_sku: dict[str, list[dict[str, Any]]] = {}
        kept: list[str] = []
        with open(out / "removed.jsonl", "w", encoding="utf-8") as f:
            for rem in result.removed:
                rec = {
                    "image": rows[rem.index].image,
                    "sku": rem.sku,
                    "reason": rem.reason,
                    "distance": rem.distance,
                }
                if rec["image"] in kept_by_review:
                    kept.append(rec["image"])
                    continue
                f.write(json.dumps(rec) + "\n")
                per_sku.setdefault(rem.sku, []).append(
                    {k: rec[k] for k in ("image", "reason", "distance")}
                )
        report = result.to_dict()
        for rec in report["removed_detail"]:
            rec["image"] = rows[rec.pop("index")].image
        report["per_sku"] = dict(sorted(per_sku.items()))
        report["kept_by_review"] = kept
        _write_json(out / "report.json", report)
        return {**result.summary(), "removed": len(result.removed) - len(kept),
                "kept_by_review": len(kept)}

    return run_stage("clean", work_dir, fingerprint, work, force=force)


def clean_catalog(
    catalog: Path,
    work_dir: Path,
    source: EmbeddingSource,
    params: CleanParams,
    *,
    exclude: Sequence[Path] = (),
    lenient: bool = False,
    decisions: Path | None = None,
    store: Path | None = None,
    force: bool = False,
) -> CleaningResult:
    """The ``clean`` stage over the ``catalog`` file less the images listed in ``exclude``
    (earlier stages' removed files), with the embeddings of ``source``; the images are
    read from ``store`` when given.

    Raises:
        ManifestError: a bad catalog row (unless ``lenient``).
        ValueError, FileNotFoundError: embeddings that do not match the catalog, or missing.
    """
    rows, emb, fingerprint, embed = _cleaning_inputs(
        catalog, work_dir, source, exclude, lenient=lenient, store=store, force=force)
    result = clean_stage(
        rows,
        emb,
        work_dir,
        inputs=fingerprint,
        eps=params.eps,
        return_thresh=params.return_thresh,
        return_rule=params.return_rule,
        min_size=params.min_size,
        decisions=decisions,
        force=force,
    )
    return CleaningResult(embed, result)


# ---- merge ------------------------------------------------------------------------------------


def merge_stage(
    rows: Sequence[CatalogRow],
    embeddings: np.ndarray,
    work_dir: Path,
    *,
    inputs: dict[str, Any],
    thresholds: Sequence[float] = THRESHOLDS,
    folds: int = FOLDS,
    soft: bool = True,
    by_category: bool = True,
    rule: str = "calibrated",
    false_merge_rate: float = FALSE_MERGE_RATE,
    review_rate: float = REVIEW_RATE,
    min_confusion: float = MIN_CONFUSION,
    color_tol: float | None = None,
    workers: int = 1,
    decisions: Path | None = None,
    force: bool = False,
) -> StageResult:
    """The ``merge`` stage over ``rows`` and their ``embeddings``: ``<work_dir>/merge/
    sku_map.json`` (every SKU -> style id) and ``report.json``.

    ``rule``: "calibrated" (``calibrated_merge``: ``false_merge_rate``, ``review_rate``,
    ``min_confusion``; ``color_tol``: the colour check on the images' colour signatures,
    computed here with ``workers`` processes, None for none; ``decisions`` applied) or
    "confusion" (``merge_skus``: ``thresholds``,
    ``soft``; reviewed decisions do not apply to it)."""
    if rule not in ("calibrated", "confusion"):
        raise ValueError(f"merge rule must be 'calibrated' or 'confusion', got {rule!r}")
    reviewed, reviewed_sum = _decisions(decisions)
    fingerprint = {
        **inputs,
        "rows": _labels_digest(rows),
        "rule": rule,
        "folds": folds,
        "by_category": by_category,
        **({"thresholds": list(thresholds), "soft": soft} if rule == "confusion" else
           {"false_merge_rate": false_merge_rate, "review_rate": review_rate,
            "min_confusion": min_confusion, "decisions": reviewed_sum,
            "color_tol": color_tol, "images": rows_digest(rows) if color_tol else None}),
    }

    def work(out: Path) -> dict[str, Any]:
        skus = [r.sku for r in rows]
        cats = [r.category for r in rows] if by_category else None
        if rule == "confusion":
            result = merge_skus(embeddings, skus, categories=cats, thresholds=thresholds,
                                folds=folds, soft=soft, progress=True)
        else:
            colors = None
            if color_tol is not None:
                colors = hash_images([r.source for r in rows], workers=workers,
                                     progress=True).color
            result = calibrated_merge(
                embeddings, skus, categories=cats, false_merge_rate=false_merge_rate,
                review_rate=review_rate, min_confusion=min_confusion, folds=folds,
                accepted=reviewed_pairs(reviewed, "merge", "accept"),
                rejected=reviewed_pairs(reviewed, "merge", "reject"),
                colors=colors,
                color_tol=color_tol if color_tol is not None else COLOR_TOL,
            )
        _write_json(out / "sku_map.json", result.sku_map)
        _write_json(out / "report.json", result.to_dict())
        return result.summary()

    return run_stage("merge", work_dir, fingerprint, work, force=force)


def merge_catalog(
    catalog: Path,
    work_dir: Path,
    source: EmbeddingSource,
    params: MergeParams,
    *,
    exclude: Sequence[Path] = (),
    lenient: bool = False,
    decisions: Path | None = None,
    store: Path | None = None,
    force: bool = False,
) -> CleaningResult:
    """The ``merge`` stage over the ``catalog`` file less the images listed in ``exclude``,
    with the embeddings of ``source`` (see :func:`merge_stage`); the images are read
    from ``store`` when given.

    Raises:
        ManifestError: a bad catalog row (unless ``lenient``).
        ValueError, FileNotFoundError: embeddings that do not match the catalog, or missing.
    """
    rows, emb, fingerprint, embed = _cleaning_inputs(
        catalog, work_dir, source, exclude, lenient=lenient, store=store, force=force)
    result = merge_stage(
        rows,
        emb,
        work_dir,
        inputs=fingerprint,
        thresholds=params.thresholds,
        folds=params.folds,
        soft=params.soft,
        by_category=params.by_category,
        rule=params.rule,
        false_merge_rate=params.false_merge_rate,
        review_rate=params.review_rate,
        min_confusion=params.min_confusion,
        color_tol=params.color_tol,
        workers=params.workers,
        decisions=decisions,
        force=force,
    )
    return CleaningResult(embed, result)


# ---- CLI --------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dedup``, ``clean`` and ``merge``."""
    p = sub.add_parser(
        "dedup",
        help="find exact (MD5) and near (pHash + colour) duplicates within each SKU",
        description="Hash every catalog image (MD5 of the bytes, pHash and a colour signature "
        "of a small decode), group duplicates within a Hamming radius and a colour tolerance "
        "within each SKU, keep the largest (then earliest) image of each group. Duplicates "
        "across SKUs are reported for review, never removed. Writes <out>/dedup/removed.json "
        "and report.json; deletes nothing.",
    )
    _common(p)
    p.add_argument("--radius", type=int, default=RADIUS, help="inclusive Hamming radius")
    p.add_argument(
        "--color-tol",
        type=float,
        default=COLOR_TOL,
        help="largest relative chroma difference of two near-duplicates; <0 turns the "
        "colour check off (grey-scale dHash only)",
    )
    p.add_argument("--hash-size", type=int, default=HASH_SIZE, help="hash grid side")
    p.add_argument("--hash", choices=sorted(HASH_KINDS), default=HASH_KIND,
                   help="perceptual hash (default %(default)s; dhash was the earlier choice)")
    p.add_argument(
        "--method",
        choices=("auto", "flat", "multihash"),
        default="auto",
        help="faiss binary index for the Hamming range search",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="hashing processes")
    add_scale_arguments(p)
    p.set_defaults(func=run_dedup)

    p = sub.add_parser(
        "clean",
        help="SKU denoising: drop images that do not fit their SKU (hierarchical DBSCAN)",
        description="Per SKU: DBSCAN (cosine, min_samples 2) keeps the largest cluster; images "
        "outside it within --return-thresh of it come back. Writes <out>/clean/removed.jsonl.",
    )
    _common(p)
    _embedding_args(p)
    p.add_argument("--eps", type=float, default=EPS, help="step-1 DBSCAN eps (cosine dist.)")
    p.add_argument(
        "--return-thresh",
        type=float,
        default=RETURN_THRESH,
        help="step 2 returns images within this cosine distance of the core; <0 skips step 2",
    )
    p.add_argument("--return-rule", choices=("centroid", "nearest"), default="centroid")
    p.add_argument("--min-size", type=int, default=MIN_SIZE, help="smaller SKUs are kept whole")
    p.set_defaults(func=run_clean)

    p = sub.add_parser(
        "merge",
        help="SKU merging: merge SKUs that are one product under two ids",
        description="Rule 'calibrated' (default): a pair merges when a cross-validated "
        "classifier confuses it both ways (--min-confusion) and its images are as alike as "
        "one SKU's images, improbably so for distinct SKUs (--false-merge-rate, against the "
        "catalog's nearest-other-SKU pairs); weaker pairs go to review. Rule 'confusion': "
        "the symmetrised confusion schedule (--thresholds), retrained each round. Writes "
        "<out>/merge/sku_map.json and report.json.",
    )
    _common(p)
    _embedding_args(p)
    p.add_argument("--rule", choices=("calibrated", "confusion"), default="calibrated")
    p.add_argument("--false-merge-rate", type=float, default=FALSE_MERGE_RATE,
                   help="calibrated: modelled share of distinct nearest SKU pairs that merge")
    p.add_argument("--review-rate", type=float, default=REVIEW_RATE,
                   help="calibrated: pairs up to this false-merge probability go to review")
    p.add_argument("--min-confusion", type=float, default=MIN_CONFUSION,
                   help="calibrated: held-out confusion needed in each direction")
    p.add_argument("--color-tol", type=float, default=-1.0,
                   help="calibrated: largest colour distance of two SKUs' mean hue "
                   f"directions for a merge, e.g. {COLOR_TOL}; <0 (the default) turns the "
                   "check off: on the synthetic world it blocked true splits (close-ups, "
                   "greyish products) and no colourway needed it")
    p.add_argument("--workers", type=int, default=1, help="processes for colour signatures")
    p.add_argument(
        "--thresholds",
        type=_floats,
        default=THRESHOLDS,
        help="comma-separated schedule, highest first (default %(default)s)",
    )
    p.add_argument("--folds", type=int, default=FOLDS, help="cross-validation folds")
    p.add_argument(
        "--hard", action="store_true", help="confusion from argmax counts (default: probabilities)"
    )
    p.add_argument(
        "--across-categories",
        action="store_true",
        help="one classifier over all SKUs (default: one per category, merging within it)",
    )
    p.set_defaults(func=run_merge)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", type=Path, required=True, help="catalog.jsonl")
    p.add_argument("--out", type=Path, required=True, help="work directory of the stages")
    p.add_argument("--force", action="store_true", help="run even when up to date")
    p.add_argument("--lenient", action="store_true", help="skip bad catalog rows")
    p.add_argument(
        "--decisions",
        type=Path,
        default=None,
        help="review decisions JSONL (visearch-index review) to apply",
    )
    add_store_argument(p)


def _embedding_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="embedder .pt (visearch save_embedder)")
    src.add_argument(
        "--embeddings",
        type=Path,
        help=".npz with 'embeddings' float32 [N, D] and 'images' [N] (catalog image fields), "
        "or .npy [rows, D] aligned with the catalog rows",
    )
    p.add_argument(
        "--exclude",
        type=Path,
        action="append",
        default=[],
        help="removed.json / removed.jsonl of an earlier stage (repeatable)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="embedding batch size")
    p.add_argument("--num-workers", type=int, default=0, help="decode workers when embedding")
    p.add_argument("--device", default=None, help="torch device (default: the model's)")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _source(args: argparse.Namespace) -> EmbeddingSource:
    return EmbeddingSource(model=args.model, embeddings=args.embeddings,
                           batch_size=args.batch_size, num_workers=args.num_workers,
                           device=args.device)


def _run(stage: Callable[[], str]) -> int:
    """Run a subcommand's stage and print its report line; a bad catalog, argument or
    missing file is one error line and exit code 1 (ManifestError is a ValueError)."""
    try:
        line = stage()
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(line)
    return 0


def run_dedup(args: argparse.Namespace) -> int:
    params = DedupParams(
        radius=args.radius,
        color_tol=args.color_tol if args.color_tol >= 0 else None,
        hash_size=args.hash_size,
        hash_kind=args.hash,
        method=args.method,
        workers=args.workers,
    )

    def run() -> str:
        runner = make_runner(args.ray, workers=args.workers) if args.ray else None
        try:
            return report_line(
                dedup_catalog(args.catalog, args.out, params, lenient=args.lenient,
                              decisions=args.decisions, store=args.store, force=args.force,
                              runner=runner), "dedup")
        finally:
            if runner is not None:
                runner.close()

    return _run(run)


def run_clean(args: argparse.Namespace) -> int:
    params = CleanParams(
        eps=args.eps,
        return_thresh=args.return_thresh if args.return_thresh >= 0 else None,
        return_rule=args.return_rule,
        min_size=args.min_size,
    )
    return _run(lambda: clean_catalog(
        args.catalog, args.out, _source(args), params, exclude=args.exclude,
        lenient=args.lenient, decisions=args.decisions, store=args.store,
        force=args.force).report("clean"))


def run_merge(args: argparse.Namespace) -> int:
    params = MergeParams(
        rule=args.rule,
        thresholds=tuple(args.thresholds),
        folds=args.folds,
        soft=not args.hard,
        by_category=not args.across_categories,
        false_merge_rate=args.false_merge_rate,
        review_rate=args.review_rate,
        min_confusion=args.min_confusion,
        color_tol=args.color_tol if args.color_tol >= 0 else None,
        workers=args.workers,
    )
    return _run(lambda: merge_catalog(
        args.catalog, args.out, _source(args), params, exclude=args.exclude,
        lenient=args.lenient, decisions=args.decisions, store=args.store,
        force=args.force).report("merge"))
