"""Write complete index versions: ``build_version`` (from gallery vectors) and
``update_version`` (add/remove items of an existing version, written as a new version).

Both write into an ``IndexRoot.staging()`` directory, which is verified and renamed into
place only when complete; the active version is never touched until ``activate``.

A built version also holds its models exported to ONNX (``embedder.onnx``, ``detector.onnx``,
checked for parity with torch at export: ``visearch.runtime.onnx.export_version_models``),
listed with their checksums and parity figures under the manifest's ``onnx`` key. A model
whose export or parity check fails is left out with a warning and the reason recorded in
``onnx.errors``; the build goes on and that model serves on torch. ``update_version`` copies
the base version's ONNX files (its models are the base's).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visearch import fileio
from visearch.index.backend import (
    ROOT_BACKEND_FILE,
    FaissBackend,
    Gallery,
    MilvusBackend,
    load_gallery,
)
from visearch.index.gallery import GalleryIndex
from visearch.index.graph import NeighbourGraph, build_neighbour_graph, update_neighbour_graph
from visearch.index.items import ITEM_FIELDS, ItemStore
from visearch.index.root import (
    DETECTOR_FILE,
    EMBEDDER_FILE,
    GRAPH_DIR,
    INDEX_DIR,
    ITEMS_FILE,
    MANIFEST,
    MANIFEST_FORMAT,
    ONNX_MODELS,
    IndexRoot,
    IndexVersion,
)
from visearch.index.thumbs import THUMBS_FILE, carry_thumbnails, write_thumbnails

if TYPE_CHECKING:
    from visearch.parallel import Runner

logger = logging.getLogger(__name__)


def _copy(src: Path, dst: Path) -> None:
    fileio.before_write(dst)
    shutil.copyfile(src, dst)


def _timed(what: str, t0: float) -> float:
    seconds = time.perf_counter() - t0
    logger.info("%s in %.2f s", what, seconds)
    return round(seconds, 3)


def _write_version(
    root: IndexRoot,
    *,
    index: Gallery,
    graph: NeighbourGraph,
    items: Iterable[tuple[int, Mapping[str, Any]]],
    embedder_path: Path,
    detector_path: Path | None,
    manifest: dict[str, Any],
    activate: bool,
    timings: dict[str, float],
    export_onnx: bool = False,
    onnx_int8: bool = False,
    onnx_from: IndexVersion | None = None,
    thumbnails: Iterable[tuple[int, bytes]] | None = None,
) -> IndexVersion:
    """Stage every file of a version, write its manifest, verify, publish, maybe activate.

    ONNX files are copied from ``onnx_from`` when given, else exported when ``export_onnx``.
    ``thumbnails`` (item id, JPEG bytes) go to ``thumbs.lmdb`` (``visearch.index.thumbs``).
    """
    cur = root.current()
    staging = root.staging()
    collection = getattr(index, "collection", None)
    if collection is not None:
        manifest["index_backend"] = {"name": "milvus", "uri": index.uri,  # type: ignore
                                     "collection": collection,
                                     "index_type": index.index_type}  # type: ignore
    else:
        manifest["index_backend"] = {"name": "faiss"}
    try:
        with staging as tmp:
            t0 = time.perf_counter()
            index.save(tmp / INDEX_DIR)
            (tmp / GRAPH_DIR).mkdir()
            graph.save(tmp / GRAPH_DIR)
            n_items = ItemStore.write(tmp / ITEMS_FILE, items)
            if n_items != index.ntotal:
                raise ValueError(f"{n_items} item records for {index.ntotal} indexed vectors")
            if thumbnails is not None:
                write_thumbnails(tmp / THUMBS_FILE, thumbnails)
            _copy(embedder_path, tmp / EMBEDDER_FILE)
            model = {"file": EMBEDDER_FILE, "sha256": fileio.file_digest(tmp / EMBEDDER_FILE),
                     "source": str(embedder_path)}
            detector = None
            if detector_path is not None:
                _copy(detector_path, tmp / DETECTOR_FILE)
                detector = {"file": DETECTOR_FILE,
                            "sha256": fileio.file_digest(tmp / DETECTOR_FILE),
                            "source": str(detector_path)}
            timings["write"] = _timed("wrote index files", t0)
            onnx = None
            if onnx_from is not None:
                onnx = _carry_onnx(onnx_from, tmp)
            elif export_onnx:
                from visearch.runtime.onnx import export_version_models

                t0 = time.perf_counter()
                onnx = export_version_models(
                    tmp, tmp / EMBEDDER_FILE, tmp / DETECTOR_FILE if detector else None,
                    int8=onnx_int8,
                )
                timings["onnx"] = _timed("exported models to ONNX", t0)
            files = {}
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                rel = path.relative_to(tmp).as_posix()
                files[rel] = {"sha256": fileio.file_digest(path), "bytes": path.stat().st_size}
            manifest.update(
                format_version=MANIFEST_FORMAT,
                model=model,
                detector=detector,
                onnx=onnx,
                embedding_dim=index.dim,
                metric="inner_product",
                counts={"total": index.ntotal, "per_category": index.counts()},
                factories={k or "*": v for k, v in index.factories.items()},
                built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                timings=timings,
                files=files,
            )
            fileio.before_write(tmp / MANIFEST)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    except BaseException as e:
        if collection is not None:
            # The staged version is gone: so must its collection be (never the active one's).
            from visearch.index.milvus import drop_collection

            drop_collection(index.uri, collection)  # type: ignore[attr-defined]
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"disk full while writing a new index version under {root.path}: free space "
                f"and run again; the active version ({cur}) is untouched ({e})",
            ) from e
        raise
    assert staging.version is not None
    version = root.open(staging.version)
    if activate:
        root.activate(version.version)
    return version


def _carry_onnx(base: IndexVersion, tmp: Path) -> dict[str, Any] | None:
    """Copy ``base``'s ONNX files into ``tmp``; its manifest ``onnx`` entry (None if none).
    A base file that does not match its checksum fails the new version's verification."""
    entry = base.manifest.get("onnx")
    if not entry:
        return None
    entry = json.loads(json.dumps(entry))
    for model in ONNX_MODELS:
        info = entry.get(model)
        if info:
            _copy(base.path / info["file"], tmp / info["file"])
    entry["source"] = base.version
    return entry


def _check_backend(root: IndexRoot, backend: FaissBackend | MilvusBackend | None,
                   ) -> FaissBackend | MilvusBackend:
    """The backend to build with; records a Milvus one in the root (``BACKEND.json``).
    ValueError when it differs from the root's: a root holds one backend's versions."""
    backend = backend or FaissBackend()
    have = root.backend
    if isinstance(backend, FaissBackend):
        if have is not None:
            raise ValueError(f"{root.path} serves its versions from Milvus ({have.uri}); "
                             "build with the Milvus backend (--milvus URI) or use another root")
        return backend
    if have is None:
        if root.versions():
            raise ValueError(f"{root.path} holds faiss versions; build the Milvus versions "
                             "into a new index root")
        root.path.mkdir(parents=True, exist_ok=True)
        fileio.atomic_write_text(root.path / ROOT_BACKEND_FILE,
                                 json.dumps(backend.record(), indent=2, sort_keys=True))
    elif (have.uri, have.alias) != (backend.uri, backend.alias):
        raise ValueError(f"{root.path} serves from Milvus {have.uri} (alias {have.alias}), "
                         f"not {backend.uri} (alias {backend.alias})")
    return backend


def build_version(
    root: IndexRoot | str | os.PathLike[str],
    xb: np.ndarray,
    ids: np.ndarray,
    items: Sequence[Mapping[str, Any]],
    embedder_path: str | os.PathLike[str],
    *,
    detector_path: str | os.PathLike[str] | None = None,
    factory: str | None = None,
    k1: int = 20,
    graph_nprobe: int | None = None,
    graph_ef_search: int | None = None,
    config: Mapping[str, Any] | None = None,
    inputs: Mapping[str, str] | None = None,
    activate: bool = True,
    progress: bool = False,
    onnx: bool = True,
    onnx_int8: bool = False,
    thumbnails: Iterable[tuple[int, bytes]] | None = None,
    backend: FaissBackend | MilvusBackend | None = None,
    runner: Runner | None = None,
) -> IndexVersion:
    """Build a complete index version from gallery vectors and publish it under ``root``.

    Args:
        root: the index root directory (created if needed).
        xb: float32 [N, d] L2-normalised gallery embeddings.
        ids: int64 [N] unique item ids.
        items: N metadata dicts with ``sku`` and ``category`` (and ``image_key``,
            ``title``; extra keys are kept), aligned with ``xb``.
        embedder_path: the embedder weights that produced ``xb`` (copied in).
        detector_path: optional detector weights (copied in).
        factory: forced faiss factory string; None chooses by gallery size.
        k1: neighbours per item in the gallery neighbour graph.
        graph_nprobe, graph_ef_search: search settings for computing the graph through an
            IVF or HNSW index (None: the index's own defaults). They are recorded in the
            manifest and reused by ``update_version``. The graph feeds re-ranking, which
            tolerates a few missed neighbours, so a lower nprobe than online search is
            usually enough; ``benchmarks/bench_index.py`` measures the trade.
        config: extra JSON-serialisable build settings recorded in the manifest.
        inputs: input name -> checksum (catalog, store...) recorded in the manifest.
        activate: switch ``CURRENT`` to the new version.
        progress: tqdm bars for the long stages.
        onnx: export the models to ONNX into the version, with a parity check (a failed
            export is logged and recorded, and does not fail the build).
        onnx_int8: export the embedder int8-quantised (dynamic quantisation; off by default:
            keep it only where Recall@10 drops by at most 0.005).
        thumbnails: ``(item_id, jpeg_bytes)`` pairs (``thumbs.make_thumbnail``) stored in
            the version for the web page; None stores none.
        backend: where the vectors live: None or ``FaissBackend()`` (embedded faiss, the
            default), or ``MilvusBackend(uri)`` (a new collection; the root records the
            backend in ``BACKEND.json`` and activates by alias). A root holds versions of
            one backend only.
        runner: a ``visearch.parallel`` runner (Ray Data) for the neighbour graph's
            searches (None: in this process); the graph does not depend on it.

    Returns:
        The published version.

    Raises:
        ValueError/TypeError: bad arguments. OSError: I/O failure (disk full says so);
        the active version is untouched either way.
    """
    root = root if isinstance(root, IndexRoot) else IndexRoot(root)
    embedder_path = Path(embedder_path)
    if not embedder_path.is_file():
        raise ValueError(f"embedder weights {embedder_path} do not exist")
    det = Path(detector_path) if detector_path is not None else None
    if det is not None and not det.is_file():
        raise ValueError(f"detector weights {det} do not exist")
    if len(items) != len(xb):
        raise ValueError(f"{len(items)} item records for {len(xb)} vectors")
    records = [{f: str(meta.get(f, "")) for f in ITEM_FIELDS} | dict(meta) for meta in items]
    categories = [str(r["category"]) for r in records]
    backend = _check_backend(root, backend)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    index = backend.build(xb, ids, categories, factory=factory)
    timings["index"] = _timed(f"built index of {index.ntotal} vectors", t0)
    t0 = time.perf_counter()
    try:
        # The graph is computed offline with faiss whichever backend serves: through the
        # gallery's own faiss index, or for Milvus through the faiss index the faiss backend
        # would have built (the same graph, so both backends re-rank alike).
        graph_index = index if isinstance(index, GalleryIndex) else GalleryIndex.build(
            xb, ids, categories, factory=factory, partitioned=False)
        graph = build_neighbour_graph(graph_index, k1=k1, nprobe=graph_nprobe,
                                      ef_search=graph_ef_search, progress=progress,
                                      runner=runner)
    except BaseException:
        if isinstance(backend, MilvusBackend):
            index.drop()  # type: ignore[attr-defined]
        raise
    timings["graph"] = _timed("built neighbour graph", t0)
    ids64 = np.asarray(ids, dtype=np.int64)
    graph_search = {"graph_nprobe": graph_nprobe, "graph_ef_search": graph_ef_search}
    manifest = {
        "parent": None,
        "next_id": int(ids64.max()) + 1,
        "config": {"factory": factory, "k1": int(k1),
                   **{k: int(v) for k, v in graph_search.items() if v is not None},
                   **dict(config or {})},
        "inputs": dict(inputs or {}),
    }
    return _write_version(
        root, index=index, graph=graph,
        items=zip(ids64.tolist(), records, strict=True),
        embedder_path=embedder_path, detector_path=det, manifest=manifest,
        activate=activate, timings=timings, export_onnx=onnx, onnx_int8=onnx_int8,
        thumbnails=thumbnails,
    )


def update_version(
    root: IndexRoot | str | os.PathLike[str],
    base: IndexVersion | str | None = None,
    *,
    add_xb: np.ndarray | None = None,
    add_items: Sequence[Mapping[str, Any]] = (),
    add_ids: np.ndarray | None = None,
    remove_ids: np.ndarray | None = None,
    activate: bool = True,
    progress: bool = False,
    add_thumbnails: Sequence[bytes] | None = None,
) -> IndexVersion:
    """Write a new version equal to ``base`` plus added items minus removed ones.

    The base version is not modified. The faiss index is updated in place of a rebuild
    (IVF quantizers are not retrained), the neighbour graph incrementally. The models, and
    their ONNX exports when the base has them, are copied from the base.

    Args:
        root: the index root.
        base: the version to start from (None: the active one).
        add_xb: float32 [n, d] embeddings of new items, made with the base's embedder.
        add_items: n metadata dicts (``sku``, ``category``, ``image_key``, ``title``).
        add_ids: int64 [n] ids for them; None assigns ``manifest["next_id"]`` onwards.
        remove_ids: int64 item ids to remove (unknown ids are ignored and logged).
        activate: switch ``CURRENT`` to the new version.
        add_thumbnails: n JPEG thumbnails of the added items; the base's thumbnails of the
            kept items are carried over.

    Raises:
        IndexFormatError: ``add_xb`` has the wrong dimension for the base index.
    """
    root = root if isinstance(root, IndexRoot) else IndexRoot(root)
    if not isinstance(base, IndexVersion):
        base = root.open(base)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    backend = root.backend or FaissBackend()
    # Milvus: a new collection with the base's items, so the change is visible only there.
    index = backend.copy(load_gallery(base.path / INDEX_DIR))
    try:
        next_id = int(base.manifest["next_id"])
        n_add = 0 if add_xb is None else len(add_xb)
        if n_add != len(add_items):
            raise ValueError(f"{len(add_items)} item records for {n_add} added vectors")
        if add_thumbnails is not None and len(add_thumbnails) != n_add:
            raise ValueError(f"{len(add_thumbnails)} thumbnails for {n_add} added items")
        if add_ids is None:
            add_ids = np.arange(next_id, next_id + n_add, dtype=np.int64)
        add_ids = np.asarray(add_ids, dtype=np.int64)
        records = [{f: str(meta.get(f, "")) for f in ITEM_FIELDS} | dict(meta)
                   for meta in add_items]
        removed = np.zeros(0, dtype=np.int64)
        if remove_ids is not None and len(remove_ids):
            remove_ids = np.unique(np.asarray(remove_ids, dtype=np.int64))
            present = np.isin(remove_ids, index.ids)
            if not present.all():
                logger.warning("ignoring %d ids not in %s: %s", int((~present).sum()),
                               base.version, remove_ids[~present][:10].tolist())
            removed = remove_ids[present]
            index.remove(removed)
        if n_add:
            assert add_xb is not None
            index.add(add_xb, add_ids, [r["category"] for r in records])
        timings["index"] = _timed(f"updated index (+{n_add}, -{len(removed)})", t0)
        t0 = time.perf_counter()
        base_config = base.manifest["config"]
        graph = update_neighbour_graph(base.graph, index, added_ids=add_ids, removed_ids=removed,
                                       nprobe=base_config.get("graph_nprobe"),
                                       ef_search=base_config.get("graph_ef_search"),
                                       progress=progress)
        timings["graph"] = _timed("updated neighbour graph", t0)
        removed_set = set(removed.tolist())
        kept = ((i, meta) for i, meta in base.items.items_iter() if i not in removed_set)
        all_items = list(kept) + list(zip(add_ids.tolist(), records, strict=True))
        manifest = {
            "parent": base.version,
            "next_id": max(next_id, int(add_ids.max()) + 1 if n_add else next_id),
            "config": dict(base.manifest["config"]),
            "inputs": dict(base.manifest.get("inputs", {})),
            "update": {"added": n_add, "removed": int(len(removed))},
        }
        detector = base.detector_path
        added = () if add_thumbnails is None else zip(add_ids.tolist(), add_thumbnails,
                                                      strict=True)
        thumbs = (carry_thumbnails(base.path, removed=removed_set, added=added)
                  if (base.path / THUMBS_FILE).is_file() or add_thumbnails is not None else None)
    except BaseException:
        if isinstance(backend, MilvusBackend):
            index.drop()  # type: ignore[attr-defined]
        raise
    return _write_version(
        root, index=index, graph=graph, items=all_items,
        embedder_path=base.embedder_path, detector_path=detector, manifest=manifest,
        activate=activate, timings=timings, onnx_from=base,
        thumbnails=thumbs,
    )
