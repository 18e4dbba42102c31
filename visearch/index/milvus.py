"""MilvusGallery: the gallery index in a Milvus collection (a cluster by URI, or Milvus Lite).

The same search interface as ``GalleryIndex`` (``search``, ``reconstruct``,
``categories_of``, ``counts``, ``add``, ``remove``, ``save``/``load``), so the query
pipeline, the neighbour graph and ``IndexVersion.verify`` use it unchanged; the version
loader picks it from ``index/gallery.json`` (``visearch.index.backend.load_gallery``).

How the index concepts map onto Milvus:

- one index version = one collection (``id`` INT64 primary key, ``category`` VARCHAR
  partition key, ``vector`` FLOAT_VECTOR, inner-product metric). The category is the
  partition key, so a category-restricted search is one ``search`` call whose filter
  ``category == "..."`` Milvus resolves to that key's partitions.
- activation and rollback switch a collection **alias** (``alter_alias``: Milvus swaps it
  atomically; clients that search the alias see the old or the new collection, never a mix):
  ``switch_alias`` / ``alias_target``, called by ``IndexRoot``.
- ``add`` / ``remove`` are ``upsert`` / ``delete``; ``update_version`` first copies the base
  collection into the new version's (``copy_to``), so the change is visible only there.
- the neighbour graph is computed offline (faiss over the vectors) and stored on disk with
  the version, as for faiss.

The item ids and categories are also kept beside the version (``gallery_ids.npy``,
``gallery_categories.npy``, 12 bytes per item), so ``categories_of`` and ``counts`` (used per
query by the category vote) need no round trip. Search consistency is ``Strong``: a search
after an insert sees it, on a cluster as in Milvus Lite.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from visearch import fileio
from visearch.errors import IndexFormatError
from visearch.index.gallery import (
    CATS_FILE,
    IDS_FILE,
    META_FILE,
    PAD_SIMILARITY,
    _as_ids,
    _as_vectors,
    _check_normalised,
    default_nlist,
    default_nprobe,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
BACKEND = "milvus"
#: Milvus index types this backend builds (Milvus Lite implements all of them)
INDEX_TYPES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "HNSW")
DEFAULT_EF_SEARCH = 64
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
# Rows per insert/upsert call and ids per query call: Milvus caps a request's size (64 MB
# by default) and a query's result window (16384); 2048 rows of d=256 are 2 MB.
BATCH = 2048
# Queries per search call (Milvus caps nq at 16384).
QUERY_BATCH = 1024
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_VARCHAR_MAX = 512


# One client per URI per process: a MilvusClient holds a gRPC channel (thread-safe), and
# opening one per call costs a connection handshake, which a loaded machine can time out
# (seen with Milvus Lite's in-process server under a load of 14 on 2 cores).
_CLIENTS: dict[str, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _client(uri: str) -> Any:
    """The process's ``pymilvus.MilvusClient`` for ``uri`` (``http://host:19530`` or a
    Milvus Lite ``*.db`` path). Imported here: pymilvus is the optional ``scale`` extra."""
    with _CLIENTS_LOCK:
        if uri not in _CLIENTS:
            _CLIENTS[uri] = _new_client(uri)
        return _CLIENTS[uri]


def _new_client(uri: str) -> Any:
    try:
        from pymilvus import MilvusClient
    except ImportError as e:  # pragma: no cover - the extra is in dev installs
        raise ImportError("the milvus backend needs pymilvus (and milvus-lite for a local "
                          "file): pip install 'visearch[scale]'") from e
    from pymilvus.exceptions import MilvusException

    if "://" not in uri:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)  # Milvus Lite wants the folder
    try:
        return MilvusClient(uri)
    except MilvusException as e:
        # An OSError: the CLIs print it as one line, the server's watcher logs and retries.
        raise ConnectionError(f"cannot reach Milvus at {uri}: {e.message}; check the URI "
                              "and that the Milvus server is up") from e


def normalise_uri(uri: str | os.PathLike[str]) -> str:
    """``uri`` as recorded in a version: a server URI as given, a Milvus Lite file made
    absolute (a server started elsewhere must find the same file)."""
    s = os.fspath(uri)
    if "://" in s:
        return s
    if not s.endswith(".db"):
        raise ValueError(f"Milvus URI {s!r}: give http://host:port for a cluster, or a "
                         "Milvus Lite file path ending in .db")
    return str(Path(s).resolve())


def check_name(name: str, what: str = "collection") -> str:
    """A valid Milvus collection or alias name (letters, digits, underscores)."""
    if not _NAME_RE.match(name):
        raise ValueError(f"bad Milvus {what} name {name!r}: use letters, digits and "
                         "underscores, starting with a letter or underscore")
    return name


def _quote(category: str) -> str:
    """``category`` as a Milvus filter string literal."""
    return json.dumps(category)  # double quotes, backslash escapes: Milvus's string syntax


def switch_alias(uri: str, alias: str, collection: str) -> None:
    """Point ``alias`` at ``collection`` (created if missing): Milvus swaps it atomically."""
    client = _client(uri)
    check_name(alias, "alias")
    if alias_target(uri, alias, client=client) is None:
        client.create_alias(collection_name=collection, alias=alias)
    else:
        client.alter_alias(collection_name=collection, alias=alias)
    logger.info("Milvus alias %s -> %s", alias, collection)


def alias_target(uri: str, alias: str, *, client: Any = None) -> str | None:
    """The collection ``alias`` names, or None when the alias does not exist."""
    client = client or _client(uri)
    if alias not in client.list_aliases().get("aliases", []):
        return None
    return str(client.describe_alias(alias)["collection_name"])


def drop_collection(uri: str, collection: str) -> None:
    """Drop ``collection`` (a version deleted by gc, or a failed build's); missing is fine."""
    client = _client(uri)
    if client.has_collection(collection):
        client.drop_collection(collection)
        logger.info("dropped Milvus collection %s", collection)


class MilvusGallery:
    """Cosine-similarity search over a gallery held in one Milvus collection.

    Build with ``MilvusGallery.build`` or ``MilvusGallery.load``. Concurrent ``search``
    calls are fine (the client is thread-safe); ``add``/``remove`` are not meant to run
    concurrently with each other.
    """

    def __init__(self, uri: str, collection: str, dim: int, ids: np.ndarray,
                 codes: np.ndarray, names: list[str], index_type: str) -> None:
        self.uri = uri
        self.collection = check_name(collection)
        self._client = _client(uri)
        self._dim = int(dim)
        self._ids = ids
        self._codes = codes
        self._names = names
        self.index_type = index_type
        self._order: np.ndarray | None = None

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def create(cls, uri: str | os.PathLike[str], collection: str, dim: int, n_hint: int, *,
               index_type: str = "FLAT") -> MilvusGallery:
        """An empty collection for vectors of dimension ``dim`` (``n_hint`` sizes IVF)."""
        from pymilvus import DataType, MilvusClient

        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown Milvus index type {index_type!r}; choose one of "
                             f"{', '.join(INDEX_TYPES)}")
        uri = normalise_uri(uri)
        client = _client(uri)
        check_name(collection)
        if client.has_collection(collection):
            raise ValueError(f"Milvus collection {collection!r} already exists at {uri}")
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("category", DataType.VARCHAR, max_length=_VARCHAR_MAX,
                         is_partition_key=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
        params: dict[str, int] = {}
        if index_type.startswith("IVF"):
            params = {"nlist": default_nlist(max(n_hint, 1))}
        elif index_type == "HNSW":
            params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="vector", index_type=index_type, metric_type="IP",
                               params=params)
        client.create_collection(collection, schema=schema, index_params=index_params,
                                 consistency_level="Strong")
        logger.info("created Milvus collection %s (%s, d=%d) at %s", collection, index_type,
                    dim, uri)
        return cls(uri, collection, dim, np.zeros(0, np.int64), np.zeros(0, np.int32), [],
                   index_type)

    @classmethod
    def build(cls, uri: str | os.PathLike[str], collection: str, xb: np.ndarray,
              ids: np.ndarray, categories: Sequence[str], *,
              index_type: str = "FLAT") -> MilvusGallery:
        """A new collection holding the gallery (same arguments as ``GalleryIndex.build``).

        Args:
            uri: ``http://host:19530`` (a cluster) or a Milvus Lite file ``*.db``.
            collection: the new collection's name (must not exist).
            xb: float32 [N, d], L2-normalised. ids: int64 [N], unique, >= 0.
            categories: N category names.
            index_type: ``INDEX_TYPES``; FLAT is exact.
        """
        xb = _as_vectors(xb, None, "gallery vectors")
        if len(xb) == 0:
            raise ValueError("cannot build an index of an empty gallery")
        gallery = cls.create(uri, collection, xb.shape[1], len(xb), index_type=index_type)
        try:
            gallery.add(xb, ids, categories)
        except BaseException:
            drop_collection(gallery.uri, collection)
            raise
        return gallery

    def copy_to(self, collection: str) -> MilvusGallery:
        """A new collection holding this one's items (the start of an updated version)."""
        other = MilvusGallery.create(self.uri, collection, self._dim, self.ntotal,
                                     index_type=self.index_type)
        try:
            for start in range(0, self.ntotal, BATCH):
                ids = self._ids[start : start + BATCH]
                cats = [self._names[c] for c in self._codes[start : start + BATCH]]
                other.add(self.reconstruct(ids), ids, cats)
        except BaseException:
            other.drop()
            raise
        return other

    def drop(self) -> None:
        """Drop the collection."""
        drop_collection(self.uri, self.collection)

    # -- properties (as GalleryIndex) -------------------------------------------------------

    @property
    def dim(self) -> int:
        """Embedding dimension d."""
        return self._dim

    @property
    def ntotal(self) -> int:
        """Number of gallery vectors."""
        return int(len(self._ids))

    @property
    def categories(self) -> list[str]:
        """Sorted category names seen by the index."""
        return sorted(self._names)

    @property
    def ids(self) -> np.ndarray:
        """int64 [N]: the gallery's item ids (a copy)."""
        return self._ids.copy()

    @property
    def partitioned(self) -> bool:
        """Category search is always available (the partition key)."""
        return True

    @property
    def factories(self) -> dict[str, str]:
        """``{"": "milvus:<INDEX_TYPE>"}`` (one collection serves every category)."""
        return {"": f"milvus:{self.index_type}"}

    def counts(self) -> dict[str, int]:
        """Vectors per category."""
        counts = np.bincount(self._codes, minlength=len(self._names))
        return {name: int(counts[i]) for i, name in sorted(enumerate(self._names),
                                                            key=lambda t: t[1])}

    def categories_of(self, ids: np.ndarray) -> list[str]:
        """Category of each of ``ids`` (int64 [n]); KeyError for an unknown id."""
        return [self._names[c] for c in self._codes[self._rows_of(ids)]]

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros(0, dtype=np.intp)
        if len(self._ids) == 0:
            raise KeyError(f"item ids not in the index (it is empty): {ids[:10].tolist()}")
        if self._order is None:
            self._order = np.argsort(self._ids, kind="stable")
        sorted_ids = self._ids[self._order]
        pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        missing = ids[sorted_ids[pos] != ids]
        if len(missing):
            raise KeyError(f"item ids not in the index: {missing[:10].tolist()}")
        return self._order[pos]

    # -- queries ----------------------------------------------------------------------------

    def search(self, xq: np.ndarray, k: int, *, category: str | None = None,
               nprobe: int | None = None, ef_search: int | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar gallery items of each query, as ``GalleryIndex.search``.

        Args:
            xq: float32 [M, d], L2-normalised. k: results per query (>= 1).
            category: restrict to this category (the partition key filter, one call).
            nprobe: IVF lists to visit (default ``default_nprobe(nlist)``).
            ef_search: HNSW search breadth (default ``DEFAULT_EF_SEARCH``, at least k).

        Returns:
            ``(D, I)``: D float32 [M, k] cosine similarities, descending; I int64 [M, k]
            item ids; padded with ``PAD_SIMILARITY`` / -1 when fewer than k items match.
        """
        xq = _as_vectors(xq, self._dim, "query vectors")
        if not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        expr = ""
        if category is not None:
            if category not in self._names:
                raise ValueError(f"unknown category {category!r}; the index has: "
                                 f"{', '.join(self.categories)}")
            expr = f"category == {_quote(category)}"
        params: dict[str, int] = {}
        if self.index_type.startswith("IVF"):
            params["nprobe"] = int(nprobe or default_nprobe(default_nlist(max(self.ntotal, 1))))
        elif self.index_type == "HNSW":
            params["ef"] = int(max(ef_search or DEFAULT_EF_SEARCH, k))
        D = np.full((len(xq), k), PAD_SIMILARITY, dtype=np.float32)
        I = np.full((len(xq), k), -1, dtype=np.int64)  # noqa: E741
        for start in range(0, len(xq), QUERY_BATCH):
            batch = xq[start : start + QUERY_BATCH]
            hits = self._client.search(
                self.collection, data=batch.tolist(), limit=int(k), filter=expr,
                search_params={"metric_type": "IP", "params": params},
            )
            for r, row in enumerate(hits):
                n = min(len(row), k)
                D[start + r, :n] = [h["distance"] for h in row[:n]]
                I[start + r, :n] = [h["id"] for h in row[:n]]
        return D, I

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """float32 [n, d]: the stored vectors of ``ids`` (int64 [n]), exact (Milvus keeps
        the raw vectors beside any index). KeyError for an unknown id."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._rows_of(ids)
        out = np.zeros((len(ids), self._dim), dtype=np.float32)
        for start in range(0, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            rows = self._client.query(self.collection, ids=chunk.tolist(),
                                      output_fields=["vector"])
            got = {int(r["id"]): r["vector"] for r in rows}
            if len(got) != len(set(chunk.tolist())):
                missing = [int(i) for i in chunk if int(i) not in got][:10]
                raise IndexFormatError(f"Milvus collection {self.collection} lacks items "
                                       f"{missing} that the version lists")
            out[start : start + len(chunk)] = np.asarray([got[int(i)] for i in chunk],
                                                         dtype=np.float32)
        return out

    # -- updates ----------------------------------------------------------------------------

    def add(self, xb: np.ndarray, ids: np.ndarray, categories: Sequence[str]) -> None:
        """Upsert items (same arguments as ``GalleryIndex.add``); ids must be new."""
        xb = _as_vectors(xb, self._dim, "added vectors")
        n = len(xb)
        _check_normalised(xb, "added vectors")
        ids = _as_ids(ids, n)
        cats = [str(c) for c in categories]
        if len(cats) != n:
            raise ValueError(f"got {len(cats)} categories for {n} vectors")
        too_long = [c for c in set(cats) if len(c.encode()) > _VARCHAR_MAX]
        if too_long:
            raise ValueError(f"category names longer than {_VARCHAR_MAX} bytes: {too_long[:3]}")
        dup = ids[np.isin(ids, self._ids)]
        if len(dup):
            raise ValueError(f"item ids already in the index: {dup[:10].tolist()}")
        for start in range(0, n, BATCH):
            rows = [{"id": int(i), "category": c, "vector": v}
                    for i, c, v in zip(ids[start : start + BATCH].tolist(),
                                       cats[start : start + BATCH],
                                       xb[start : start + BATCH].tolist(), strict=True)]
            self._client.upsert(self.collection, rows)
        # Seal the segments: Milvus builds the vector index on sealed segments only (a
        # growing one is scanned row by row: 0.2 s a query at 5k vectors in Milvus Lite,
        # 4 ms after a flush).
        self._client.flush(self.collection)
        for name in sorted(set(cats)):
            if name not in self._names:
                self._names.append(name)
        code_of = {c: i for i, c in enumerate(self._names)}
        codes = np.fromiter((code_of[c] for c in cats), dtype=np.int32, count=n)
        self._ids = np.concatenate([self._ids, ids])
        self._codes = np.concatenate([self._codes, codes])
        self._order = None

    def remove(self, ids: np.ndarray) -> int:
        """Delete items by id (int64 [n]); unknown ids are ignored. Returns how many."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        hit = np.isin(self._ids, ids)
        if not hit.any():
            return 0
        gone = self._ids[hit]
        for start in range(0, len(gone), BATCH):
            self._client.delete(self.collection, ids=gone[start : start + BATCH].tolist())
        self._client.flush(self.collection)
        self._ids = self._ids[~hit]
        self._codes = self._codes[~hit]
        self._order = None
        return int(hit.sum())

    # -- persistence ------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write the version's side of the index into ``directory``: ``gallery.json``
        (backend, URI, collection, index type) and the id / category-code arrays. The
        vectors stay in Milvus."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for fname, arr in ((IDS_FILE, self._ids), (CATS_FILE, self._codes)):
            fileio.before_write(out / fname)
            np.save(out / fname, arr)
            written.append(out / fname)
        meta = {
            "format_version": FORMAT_VERSION,
            "backend": BACKEND,
            "uri": self.uri,
            "collection": self.collection,
            "index_type": self.index_type,
            "dim": self._dim,
            "metric": "inner_product",
            "ntotal": self.ntotal,
            "category_names": self._names,
        }
        fileio.before_write(out / META_FILE)
        (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        written.append(out / META_FILE)
        return written

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> MilvusGallery:
        """Open the collection a ``save``d directory names.

        Raises:
            IndexFormatError: unreadable files, or a collection that is missing or holds a
                different number of items than the version lists.
        """
        src = Path(directory)
        try:
            meta = json.loads((src / META_FILE).read_text())
            ids = np.load(src / IDS_FILE).astype(np.int64)
            codes = np.load(src / CATS_FILE).astype(np.int32)
        except (OSError, ValueError, EOFError) as e:
            raise IndexFormatError(f"cannot read Milvus gallery in {src}: {e}") from e
        if meta.get("backend") != BACKEND or meta.get("format_version") != FORMAT_VERSION:
            raise IndexFormatError(f"{src / META_FILE} is not a Milvus gallery of format "
                                   f"{FORMAT_VERSION}")
        if len(ids) != meta["ntotal"] or len(codes) != len(ids):
            raise IndexFormatError(f"{src}: id arrays disagree with {META_FILE}")
        gallery = cls(meta["uri"], meta["collection"], int(meta["dim"]), ids, codes,
                      list(meta["category_names"]), meta["index_type"])
        client = gallery._client
        if not client.has_collection(gallery.collection):
            raise IndexFormatError(f"Milvus collection {gallery.collection} is missing at "
                                   f"{gallery.uri}; roll back to another version or rebuild")
        client.load_collection(gallery.collection)
        stats = client.query(gallery.collection, filter="", output_fields=["count(*)"])
        held = int(stats[0]["count(*)"])
        if held != len(ids):
            raise IndexFormatError(f"Milvus collection {gallery.collection} holds {held} "
                                   f"items, the version lists {len(ids)}")
        return gallery
