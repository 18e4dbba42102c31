"""``visearch-index`` index-version commands: build, list, activate, rollback, verify, add,
remove, gc.

Each command is a thin edge over ``visearch.index``: it reads the catalog, embeds with
``visearch.embedding.embed_items`` (tqdm bar), calls the library and prints what happened.
``build`` is the typed function :func:`build_index`, which ``rebuild`` calls too.
Library errors (bad rows, corrupt files, dimension mismatches) become one ``error:`` line
on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index_builder.cmd_ingest import add_store_argument
from visearch.catalog import CatalogRow, read_manifest
from visearch.device import choose_device
from visearch.errors import IndexFormatError, VisearchError
from visearch.fileio import file_digest
from visearch.index import (
    IndexRoot,
    IndexVersion,
    MilvusBackend,
    build_version,
    update_version,
)
from visearch.index.thumbs import make_thumbnails
from visearch.parallel import Runner, make_runner
from visearch.store import store_lookup

logger = logging.getLogger(__name__)


def _cli_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the library's caller-facing errors into one stderr line and exit status 1."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (VisearchError, ValueError, OSError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return wrapper


@dataclass(frozen=True)
class EmbedOptions:
    """How ``build`` and ``add`` embed catalog rows (defaults: the subcommands' flags)."""

    batch_size: int = 64  # images per embedder batch
    workers: int = 0  # DataLoader decode processes
    device: str | None = None  # None: cuda when available
    crop: bool = True  # crop each image to its bbox
    progress: bool = True


@dataclass(frozen=True)
class BuildParams:
    """The index a ``build`` makes (``visearch.index.build_version``)."""

    factory: str | None = None  # a faiss index_factory string; None: chosen by size
    k1: int = 20  # neighbours per item in the graph
    graph_nprobe: int | None = None  # None: the index's search default
    graph_ef_search: int | None = None


def _item(row: CatalogRow) -> dict[str, Any]:
    return {"sku": row.sku, "category": row.category, "image_key": row.image,
            "title": row.title, "attributes": dict(row.attributes), "line": row.line}


def _read_catalog(path: Path, lenient: bool, store: Path | None = None) -> list[CatalogRow]:
    """The usable rows of the catalog at ``path``, their images read from ``store`` when
    given (rows it does not hold read their files); bad rows reported on stderr."""
    t0 = time.perf_counter()
    catalog = read_manifest(path, strict=not lenient, images=store_lookup(store))
    if catalog.rejects:
        print(f"skipped {len(catalog.rejects)} bad row(s) of {path} (lines "
              f"{', '.join(str(r.line) for r in catalog.rejects[:20])}"
              f"{' ...' if len(catalog.rejects) > 20 else ''}); see "
              f"{path.with_suffix('.rejects.jsonl')}", file=sys.stderr)
    if not catalog.rows:
        raise ValueError(f"{path}: no usable rows")
    logger.info("read %d rows of %s in %.2f s", len(catalog.rows), path,
                time.perf_counter() - t0)
    return catalog.rows


def _load_model(path: Path, device: str | None) -> torch.nn.Module:
    from visearch.embedding import load_embedder

    return load_embedder(path, device=choose_device(device))


def _embed(rows: Sequence[CatalogRow], model: torch.nn.Module, opts: EmbedOptions
           ) -> np.ndarray:
    """Embed catalog rows (cropped to their bbox): float32 [N, d] in row order."""
    from visearch.embedding import embed_items

    t0 = time.perf_counter()
    xb = np.zeros((len(rows), int(model.config["dim"])), dtype=np.float32)
    items = ((i, r.source, r.bbox if opts.crop else None) for i, r in enumerate(rows))
    for ids, feats in embed_items(model, items, batch_size=opts.batch_size,
                                  num_workers=opts.workers, progress=opts.progress):
        xb[ids] = feats
    seconds = time.perf_counter() - t0
    logger.info("embedded %d images in %.1f s (%.1f img/s)", len(rows), seconds,
                len(rows) / max(seconds, 1e-9))
    return xb


def _embed_with(runner: Runner | None, rows: Sequence[CatalogRow], model: Path,
                opts: EmbedOptions) -> np.ndarray:
    """Embed catalog rows here (``runner`` None) or on a runner's actor pool: float32
    [N, d] in row order either way."""
    if runner is None:
        return _embed(rows, _load_model(model, opts.device), opts)
    t0 = time.perf_counter()
    items = [(i, r.source, r.bbox if opts.crop else None) for i, r in enumerate(rows)]
    ids, feats = runner.embed(model, items, batch_size=opts.batch_size, device=opts.device,
                              progress=opts.progress)
    xb = np.zeros_like(feats)
    xb[ids] = feats
    logger.info("embedded %d images on %s in %.1f s", len(rows), runner.name,
                time.perf_counter() - t0)
    return xb


def add_scale_arguments(p: argparse.ArgumentParser, *, milvus: bool = False) -> None:
    """``--ray`` (and ``--milvus``): the one flag each that moves the offline stages to Ray
    and the index to a Milvus cluster (README, Scale-out)."""
    p.add_argument("--ray", metavar="local|auto|ADDRESS",
                   help="run the parallel stages on Ray Data: 'local' (a private Ray on "
                   "this machine), 'auto' (the cluster this machine is in) or a cluster "
                   "address; default: the local process pool")
    if not milvus:
        return
    p.add_argument("--milvus", metavar="URI",
                   help="keep the versions' vectors in Milvus: http://host:19530 (a cluster) "
                   "or a Milvus Lite file ending in .db; activation then switches a "
                   "collection alias (default: embedded faiss)")
    p.add_argument("--milvus-alias", default="visearch_active",
                   help="the Milvus alias naming the active version's collection")
    p.add_argument("--milvus-index", default="FLAT",
                   choices=["FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW"],
                   help="the Milvus index type of new collections")


def backend_from_args(args: argparse.Namespace) -> MilvusBackend | None:
    """The backend ``--milvus`` selects (None: faiss, or whatever the root records)."""
    if getattr(args, "milvus", None) is None:
        return None
    return MilvusBackend(args.milvus, alias=args.milvus_alias, index_type=args.milvus_index)


def _summary(version: IndexVersion, root: IndexRoot) -> str:
    m = version.manifest
    active = " (active)" if root.current() == version.version else ""
    return (f"{version.version}{active}: {m['counts']['total']} items in "
            f"{len(m['counts']['per_category'])} categories, d={m['embedding_dim']}, "
            f"{m['factories'].get('*')}, timings {m.get('timings')}")


def build_index(
    root: Path,
    catalog: Path,
    model: Path,
    params: BuildParams,
    *,
    embed: EmbedOptions = EmbedOptions(),
    detector: Path | None = None,
    detector_source: str | None = None,
    lenient: bool = False,
    store: Path | None = None,
    activate: bool = True,
    backend: MilvusBackend | None = None,
    runner: Runner | None = None,
) -> IndexVersion:
    """Embed ``catalog`` with the embedder ``model``, build, verify and publish an index
    version under ``root`` (shipping ``detector`` and recording ``detector_source``, where
    its training boxes came from, in words); returns the new version. With ``store`` the
    gallery images are read from that image store (as ingested), not from their files.
    ``backend``: the version's vectors go to Milvus (None: the root's backend, faiss for a
    new root). ``runner``: embed and compute the graph on it (Ray Data; None: here).

    Raises:
        VisearchError, ValueError, OSError: bad catalog rows (unless ``lenient``), no usable
            rows, unreadable model or a failed build; the active version is kept.
    """
    rows = _read_catalog(catalog, lenient, store)
    xb = _embed_with(runner, rows, model, embed)
    t0 = time.perf_counter()
    version = build_version(
        root, xb, np.arange(len(rows), dtype=np.int64), [_item(r) for r in rows],
        model, detector_path=detector, factory=params.factory, k1=params.k1,
        graph_nprobe=params.graph_nprobe, graph_ef_search=params.graph_ef_search,
        config={"crop": embed.crop, "detector_source": detector_source},
        inputs={"catalog": file_digest(catalog), "catalog_path": str(catalog)},
        activate=activate, progress=embed.progress,
        # from the store when given: the web page shows the images as ingested
        thumbnails=enumerate(make_thumbnails((r.source for r in rows), workers=embed.workers)),
        backend=backend or IndexRoot(root).backend, runner=runner,
    )
    logger.info("built %s in %.1f s", version.version, time.perf_counter() - t0)
    return version


def build_summary(version: IndexVersion, root: Path) -> str:
    """The line ``build`` prints about a new version."""
    return _summary(version, IndexRoot(root))


def _embed_opts(args: argparse.Namespace) -> EmbedOptions:
    return EmbedOptions(batch_size=args.batch_size, workers=args.workers, device=args.device,
                        crop=not args.no_crop, progress=not args.quiet)


@_cli_errors
def cmd_build(args: argparse.Namespace) -> int:
    params = BuildParams(factory=args.factory, k1=args.k1, graph_nprobe=args.graph_nprobe,
                         graph_ef_search=args.graph_ef_search)
    # --workers (decode processes) doubles as the size of a local Ray's actor pools.
    runner = make_runner(args.ray, workers=args.workers or None) if args.ray else None
    try:
        version = build_index(args.root, args.catalog, args.model, params,
                              embed=_embed_opts(args), detector=args.detector,
                              detector_source=args.detector_source, lenient=args.lenient,
                              store=args.store, activate=not args.no_activate,
                              backend=backend_from_args(args), runner=runner)
    finally:
        if runner is not None:
            runner.close()
    print(build_summary(version, args.root))
    return 0


@_cli_errors
def cmd_list(args: argparse.Namespace) -> int:
    root = IndexRoot(args.root)
    current, history = root.current(), root.history()
    target = history[-1] if history else None
    versions = root.versions()
    if not versions:
        print(f"no index versions in {root.path}")
        return 0
    print(f"{'':2}{'version':24} {'built (UTC)':21} {'items':>9} {'dim':>5} "
          f"{'index':18} parent")
    for name in versions:
        try:
            m = root.open(name).manifest
        except IndexFormatError as e:
            print(f"  {name:24} unreadable: {e}")
            continue
        mark = "*" if name == current else ("<" if name == target else "")
        print(f"{mark:2}{name:24} {m['built_at']:21} {m['counts']['total']:>9} "
              f"{m['embedding_dim']:>5} {m['factories'].get('*', '?'):18} {m.get('parent') or '-'}")
    print("* active, < rollback target")
    return 0


@_cli_errors
def cmd_activate(args: argparse.Namespace) -> int:
    root = IndexRoot(args.root)
    if not args.no_verify:
        report = root.open(args.version).verify(checksums=True)
        if not report.ok:
            raise IndexFormatError(f"{args.version} fails verification, not activated: "
                                   + "; ".join(report.problems))
    before = root.current()
    root.activate(args.version)
    print(f"active: {args.version} (was {before})")
    return 0


@_cli_errors
def cmd_rollback(args: argparse.Namespace) -> int:
    root = IndexRoot(args.root)
    before = root.current()
    target = root.rollback()
    print(f"active: {target} (was {before})")
    return 0


@_cli_errors
def cmd_verify(args: argparse.Namespace) -> int:
    root = IndexRoot(args.root)
    version = root.open(args.version)
    report = version.verify(sample=args.sample, checksums=not args.no_checksums)
    if report.ok and not args.no_model:
        from visearch.embedding import load_embedder

        dim = int(load_embedder(version.embedder_path).config["dim"])
        report.checks["model_dim"] = dim
        if dim != version.dim:
            report.problems.append(f"embedder dim {dim} != index dim {version.dim}")
    print(json.dumps({"version": version.version, "ok": report.ok,
                      "problems": report.problems, "checks": report.checks}, indent=1))
    return 0 if report.ok else 1


@_cli_errors
def cmd_add(args: argparse.Namespace) -> int:
    root = IndexRoot(args.root)
    base = root.open(args.version)
    model_path = base.embedder_path
    if args.model is not None:
        model_path = args.model
    rows = _read_catalog(args.catalog, args.lenient, args.store)
    opts = _embed_opts(args)
    model = _load_model(model_path, opts.device)
    dim = int(model.config["dim"])
    if dim != base.dim:
        raise IndexFormatError(
            f"model {model_path} makes {dim}-d embeddings but {base.version} holds {base.dim}-d"
            " vectors: add with the version's own model, or `build` a new index"
        )
    if args.model is not None and file_digest(args.model) != base.manifest["model"]["sha256"]:
        raise ValueError(
            f"{args.model} is not the model {base.version} was built with; embeddings of "
            "different models are not comparable: omit --model or `build` a new index"
        )
    xb = _embed(rows, model, opts)
    version = update_version(root, base, add_xb=xb, add_items=[_item(r) for r in rows],
                             activate=not args.no_activate, progress=not args.quiet,
                             add_thumbnails=list(make_thumbnails((r.source for r in rows),
                                                                 workers=opts.workers)))
    print(f"added {len(rows)} items to {base.version}: " + _summary(version, root))
    return 0


@_cli_errors
def cmd_remove(args: argparse.Namespace) -> int:
    root = IndexRoot(args.root)
    base = root.open(args.version)
    skus = set(args.sku or [])
    if args.skus_file:
        skus.update(s.strip() for s in args.skus_file.read_text().splitlines() if s.strip())
    if not skus:
        raise ValueError("name SKUs to remove with --sku and/or --skus-file")
    t0 = time.perf_counter()
    ids, found = [], set()
    for item_id, meta in base.items.items_iter():
        if meta["sku"] in skus:
            ids.append(item_id)
            found.add(meta["sku"])
    missing = sorted(skus - found)
    if missing:
        print(f"warning: {len(missing)} SKU(s) not in {base.version}: {missing[:20]}",
              file=sys.stderr)
    if not ids:
        raise ValueError(f"none of the {len(skus)} SKU(s) is in {base.version}; nothing to do")
    logger.info("found %d items of %d SKUs in %.2f s", len(ids), len(found),
                time.perf_counter() - t0)
    version = update_version(root, base, remove_ids=np.array(ids, dtype=np.int64),
                             activate=not args.no_activate, progress=not args.quiet)
    print(f"removed {len(ids)} items ({len(found)} SKUs) from {base.version}: "
          + _summary(version, root))
    return 0


@_cli_errors
def cmd_gc(args: argparse.Namespace) -> int:
    deleted = IndexRoot(args.root).gc(args.keep)
    print(f"deleted {len(deleted)} version(s): {' '.join(deleted) or '-'}")
    return 0


def _embed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64, help="images per embedder batch")
    p.add_argument("--workers", type=int, default=0, help="DataLoader decode processes")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--no-crop", action="store_true", help="embed whole images, ignore bboxes")
    p.add_argument("--lenient", action="store_true",
                   help="skip bad catalog rows (reported) instead of failing on the first")
    p.add_argument("--no-activate", action="store_true", help="publish without activating")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_store_argument(p)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the index-version subcommands to ``sub``."""

    def root_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", required=True, type=Path, help="index root directory")

    p = sub.add_parser("build", help="embed a catalog and build, verify and activate a version")
    root_arg(p)
    p.add_argument("--catalog", required=True, type=Path, help="catalog.jsonl")
    p.add_argument("--model", required=True, type=Path, help="embedder.pt")
    p.add_argument("--detector", type=Path, help="detector weights to ship with the version")
    p.add_argument("--detector-source", default=None,
                   help="where the detector's training boxes came from, in words (recorded "
                        "in the manifest)")
    p.add_argument("--factory", help="force a faiss index_factory string (default: by size)")
    p.add_argument("--k1", type=int, default=20, help="neighbours per item in the graph")
    p.add_argument("--graph-nprobe", type=int,
                   help="IVF lists visited while computing the neighbour graph (default: the "
                        "index's search default; lower is faster, see benchmarks/RESULTS.md)")
    p.add_argument("--graph-ef-search", type=int,
                   help="HNSW efSearch while computing the neighbour graph (default: the "
                        "index's)")
    _embed_options(p)
    add_scale_arguments(p, milvus=True)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("list", help="list index versions (active and rollback target marked)")
    root_arg(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("activate", help="switch the active version (atomic)")
    root_arg(p)
    p.add_argument("version")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum verification")
    p.set_defaults(func=cmd_activate)

    p = sub.add_parser("rollback", help="re-activate the previously active version")
    root_arg(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("verify", help="checksums, counts, dims and a self-search check")
    root_arg(p)
    p.add_argument("version", nargs="?", help="default: the active version")
    p.add_argument("--sample", type=int, default=256, help="items in the self-search check")
    p.add_argument("--no-checksums", action="store_true", help="sizes only, no sha256")
    p.add_argument("--no-model", action="store_true", help="do not load the embedder")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("add", help="add catalog rows to a version, written as a new version")
    root_arg(p)
    p.add_argument("--catalog", required=True, type=Path, help="catalog.jsonl of new rows")
    p.add_argument("--version", help="base version (default: the active one)")
    p.add_argument("--model", type=Path,
                   help="embedder (default and only accepted: the version's own)")
    _embed_options(p)
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("remove", help="remove SKUs from a version, written as a new version")
    root_arg(p)
    p.add_argument("--sku", action="append", help="a SKU to remove (repeatable)")
    p.add_argument("--skus-file", type=Path, help="a file of SKUs, one per line")
    p.add_argument("--version", help="base version (default: the active one)")
    p.add_argument("--no-activate", action="store_true", help="publish without activating")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("gc", help="delete old versions (never the active one or its rollback)")
    root_arg(p)
    p.add_argument("--keep", type=int, default=3, help="newest versions to keep")
    p.set_defaults(func=cmd_gc)
