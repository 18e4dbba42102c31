"""Versioned index directories: ``IndexRoot`` (list, activate, roll back, gc, stage) and
``IndexVersion`` (one complete, verified, read-only version).

Layout::

    <root>/CURRENT                 the active version's name (one line), replaced atomically
    <root>/BACKEND.json            only for Milvus: URI and alias; the alias (switched by
                                   Milvus atomically) names the active version's collection
    <root>/HISTORY                 JSON list of previously active versions (rollback targets)
    <root>/v0007-20261123T051700/  a version: manifest.json, index/, graph/, items.lmdb,
                                   [thumbs.lmdb], embedder.pt, [detector.pt],
                                   [embedder.onnx], [detector.onnx]; thumbs.lmdb holds
                                   the web page's result thumbnails (index/thumbs.py),
                                   absent from versions built before them
    <root>/.staging-<pid>-<hex>/   a build in progress (removed when its process is gone)

A version directory appears under its name only by ``os.rename`` of a complete staging
directory that passed ``verify``, and ``CURRENT`` only ever changes by ``os.replace`` of a
fully written temp file, so a reader sees either the old or the new active version, and a
killed build leaves only a staging directory that the next ``staging()`` removes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visearch import fileio
from visearch.errors import IndexFormatError
from visearch.index.backend import Gallery, MilvusBackend, load_gallery, root_backend
from visearch.index.graph import NeighbourGraph
from visearch.index.items import ItemStore

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
HISTORY = "HISTORY"
INDEX_DIR = "index"
GRAPH_DIR = "graph"
ITEMS_FILE = "items.lmdb"
EMBEDDER_FILE = "embedder.pt"
DETECTOR_FILE = "detector.pt"
ONNX_MODELS = ("embedder", "detector")  # keys of the manifest's "onnx" entry

_VERSION_RE = re.compile(r"^v(\d{4,})-\d{8}T\d{6}$")
_STAGING_RE = re.compile(r"^\.staging-(\d+)-[0-9a-f]+$")
_HISTORY_MAX = 32


@dataclass
class VerifyReport:
    """What ``IndexVersion.verify`` found; ``ok`` when ``problems`` is empty."""

    version: str
    problems: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


class IndexVersion:
    """One index version directory. The index, graph and item map load lazily on first use.

    Attributes:
        version: the directory name, e.g. ``v0003-20261123T051700``.
        path: the directory.
        manifest: the parsed ``manifest.json``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.version = self.path.name
        try:
            self.manifest: dict[str, Any] = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise IndexFormatError(f"cannot read {self.path / MANIFEST}: {e}") from e
        if self.manifest.get("format_version") != MANIFEST_FORMAT:
            raise IndexFormatError(
                f"{self.path / MANIFEST}: format version {self.manifest.get('format_version')!r}"
                f", this code reads {MANIFEST_FORMAT}; rebuild the index"
            )
        self._index: Gallery | None = None
        self._graph: NeighbourGraph | None = None
        self._items: ItemStore | None = None
        # Servers touch these from many threads; each loads once.
        self._load_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"IndexVersion({str(self.path)!r})"

    @property
    def dim(self) -> int:
        """Embedding dimension d."""
        return int(self.manifest["embedding_dim"])

    @property
    def index(self) -> Gallery:
        """The gallery index, faiss (``GalleryIndex``) or Milvus (``MilvusGallery``) as the
        version's ``index/gallery.json`` says (IndexFormatError when a file is missing or
        corrupt)."""
        with self._load_lock:
            if self._index is None:
                self._index = load_gallery(self.path / INDEX_DIR)
            return self._index

    @property
    def graph(self) -> NeighbourGraph:
        """The gallery neighbour graph (memory-mapped)."""
        with self._load_lock:
            if self._graph is None:
                self._graph = NeighbourGraph.load(self.path / GRAPH_DIR)
            return self._graph

    @property
    def items(self) -> ItemStore:
        """id -> {sku, category, image_key, title} (read-only LMDB mapping)."""
        with self._load_lock:
            if self._items is None:
                self._items = ItemStore(self.path / ITEMS_FILE)
            return self._items

    @property
    def embedder_path(self) -> Path:
        """The embedder weights this version was built with (copied into the version)."""
        return self.path / self.manifest["model"]["file"]

    @property
    def detector_path(self) -> Path | None:
        """The detector weights shipped with this version, or None."""
        det = self.manifest.get("detector")
        return self.path / det["file"] if det else None

    @property
    def collection(self) -> str | None:
        """The Milvus collection holding this version's vectors, or None (faiss)."""
        return (self.manifest.get("index_backend") or {}).get("collection")

    def onnx_path(self, model: str) -> Path | None:
        """The version's ONNX export of ``model`` (``"embedder"`` or ``"detector"``), or None
        when the version has none (built without ONNX, or its export failed: see the
        manifest's ``onnx.errors``).

        The file is checked against the manifest's sha256 first, so a server never loads a
        corrupt graph. Raises IndexFormatError when it is missing or differs.
        """
        if model not in ONNX_MODELS:
            raise ValueError(f"unknown model {model!r}; choose one of {ONNX_MODELS}")
        info = (self.manifest.get("onnx") or {}).get(model)
        if not info:
            return None
        path = self.path / info["file"]
        if not path.is_file():
            raise IndexFormatError(f"{self.version}: ONNX {model} file {info['file']} is "
                                   "missing; rebuild the version or serve it on torch")
        if fileio.file_digest(path) != info["sha256"]:
            raise IndexFormatError(f"{self.version}: ONNX {model} file {info['file']}: sha256 "
                                   "differs from the manifest (corrupt)")
        return path

    def close(self) -> None:
        """Release the item map's LMDB handle (the index and graph are plain memory)."""
        with self._load_lock:
            if self._items is not None:
                self._items.close()
                self._items = None

    def verify(self, *, sample: int = 256, checksums: bool = True, seed: int = 0) -> VerifyReport:
        """Check the version: file checksums and sizes, counts, dimensions, graph/item/index
        agreement, and a self-search sanity check (each of ``sample`` items, searched with
        its own stored vector, comes back at rank 1, ties counted, for >= 99% of them; for
        lossy PQ/SQ indexes, whose stored vectors are approximations, within the top 10 for
        >= 90%).

        Never raises for a bad version: the problems are listed in the report.
        """
        t0 = time.perf_counter()
        report = VerifyReport(self.version)
        problems = report.problems
        m = self.manifest
        files = m.get("files", {})
        for rel, info in sorted(files.items()):
            path = self.path / rel
            if not path.is_file():
                problems.append(f"missing file {rel}")
            elif path.stat().st_size != info["bytes"]:
                problems.append(
                    f"{rel}: {path.stat().st_size} bytes, manifest says {info['bytes']} "
                    "(truncated or rewritten)"
                )
            elif checksums and fileio.file_digest(path) != info["sha256"]:
                problems.append(f"{rel}: sha256 differs from the manifest (corrupt)")
        for model in ONNX_MODELS:
            # The ONNX entry names its file and checksum too; both lists must agree.
            info = (m.get("onnx") or {}).get(model)
            if not info:
                continue
            rel = info["file"]
            if rel not in files:
                problems.append(f"ONNX {model} file {rel} is not in the manifest's file list")
                if not (self.path / rel).is_file():
                    problems.append(f"missing file {rel}")
            elif files[rel]["sha256"] != info["sha256"]:
                problems.append(f"{rel}: the ONNX entry's sha256 differs from the file list's")
        report.checks["files"] = len(files)
        if problems:
            report.checks["seconds"] = round(time.perf_counter() - t0, 3)
            return report
        try:
            index = load_gallery(self.path / INDEX_DIR)
            graph = NeighbourGraph.load(self.path / GRAPH_DIR)
            items = ItemStore(self.path / ITEMS_FILE)
        except IndexFormatError as e:
            problems.append(str(e))
            return report
        except Exception as e:  # a Milvus server that refuses or is gone (MilvusException)
            if self.collection is None:
                raise
            problems.append(f"cannot open Milvus collection {self.collection}: {e}")
            return report
        try:
            self._check_contents(index, graph, items, report, sample=sample, seed=seed)
        finally:
            items.close()
        report.checks["seconds"] = round(time.perf_counter() - t0, 3)
        return report

    def _check_contents(
        self, index: Gallery, graph: NeighbourGraph, items: ItemStore,
        report: VerifyReport, *, sample: int, seed: int,
    ) -> None:
        problems = report.problems
        m = self.manifest
        total = int(m["counts"]["total"])
        if index.dim != self.dim:
            problems.append(f"index dim {index.dim} != manifest embedding_dim {self.dim}")
        if index.ntotal != total:
            problems.append(f"index holds {index.ntotal} vectors, manifest says {total}")
        if index.counts() != {k: int(v) for k, v in m["counts"]["per_category"].items()}:
            problems.append(f"per-category counts {index.counts()} differ from the manifest")
        if len(items) != total:
            problems.append(f"item map holds {len(items)} items, manifest says {total}")
        ids = index.ids
        if len(graph) != len(ids) or not np.array_equal(np.sort(graph.ids), np.sort(ids)):
            problems.append("neighbour graph rows do not match the index's items")
        if graph.k1 != int(m["config"]["k1"]):
            problems.append(f"graph k1 {graph.k1} != manifest k1 {m['config']['k1']}")
        report.checks.update(total=total, dim=index.dim, categories=len(index.categories))
        if problems or len(ids) == 0:
            return
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(ids, size=min(sample, len(ids)), replace=False))
        cats = index.categories_of(pick)
        metas = items.get_many(pick.tolist())
        wrong = [int(i) for i, c, meta in zip(pick, cats, metas, strict=True)
                 if meta is None or meta.get("category") != c]
        if wrong:
            problems.append(f"item map category disagrees with the index for ids {wrong[:10]}")
        lossy = any("PQ" in f or "SQ" in f for f in index.factories.values())
        depth = 10 if lossy else 1
        xq = index.reconstruct(pick)
        found = np.zeros(len(pick), dtype=bool)
        D, I = index.search(xq, 10)  # noqa: E741
        for r, item in enumerate(pick):
            hit = np.flatnonzero(I[r] == item)
            # Tie-aware: an exact duplicate may come first with the same similarity; with
            # 10 or more duplicates (the same rows added again and again) the item may not
            # be listed at all, behind ties of its own similarity (found by the crash test).
            found[r] = (hit[0] < depth or D[r, hit[0]] >= D[r, 0] - 1e-5) if len(hit) else (
                D[r, -1] >= D[r, 0] - 1e-5 and float(xq[r] @ xq[r]) >= D[r, 0] - 1e-5)
        rate = float(found.mean())
        need = 0.9 if lossy else 0.99
        report.checks["self_search_rate"] = rate
        report.checks["self_search_depth"] = depth
        if rate < need:
            problems.append(
                f"self-search: only {rate:.1%} of {len(pick)} items find themselves "
                f"within rank {depth} (expected >= {need:.0%})"
            )


class _Staging:
    """Context manager of ``IndexRoot.staging()``; ``.version`` is set on success."""

    def __init__(self, root: IndexRoot) -> None:
        self.root = root
        self.path: Path | None = None
        self.version: str | None = None

    def __enter__(self) -> Path:
        self.root.path.mkdir(parents=True, exist_ok=True)
        self.root.clean_staging()
        self.path = self.root.path / f".staging-{os.getpid()}-{secrets.token_hex(4)}"
        self.path.mkdir()
        return self.path

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self.path is not None
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            report = IndexVersion(self.path).verify()
            if not report.ok:
                raise IndexFormatError(
                    "the staged index failed verification, nothing was published: "
                    + "; ".join(report.problems)
                )
            self.version = self.root._publish(self.path)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise


class IndexRoot:
    """A directory of index versions with one active version named by ``CURRENT``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root)

    def __repr__(self) -> str:
        return f"IndexRoot({str(self.path)!r})"

    # -- reading ----------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Complete versions, oldest first (staging directories are not versions)."""
        if not self.path.is_dir():
            return []
        found = [p.name for p in self.path.iterdir()
                 if p.is_dir() and _VERSION_RE.match(p.name) and (p / MANIFEST).is_file()]
        return sorted(found, key=lambda v: int(_VERSION_RE.match(v).group(1)))  # type: ignore

    @property
    def backend(self) -> MilvusBackend | None:
        """The Milvus backend this root's versions live in (``BACKEND.json``), or None for
        embedded faiss."""
        return root_backend(self.path)

    def current(self) -> str | None:
        """The active version's name, or None when none was activated.

        A Milvus root's active version is the one whose collection its alias names (the
        alias, not ``CURRENT``, is the switch there)."""
        backend = self.backend
        if backend is not None:
            from visearch.index.milvus import alias_target

            target = alias_target(backend.uri, backend.alias)
            if target is None:
                return None
            for v in reversed(self.versions()):
                if IndexVersion(self.path / v).collection == target:
                    return v
            raise IndexFormatError(f"Milvus alias {backend.alias} names collection {target}, "
                                   f"which no version in {self.path} holds")
        try:
            name = (self.path / CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    def history(self) -> list[str]:
        """Previously active versions, most recent last (``rollback`` goes to the last)."""
        try:
            return list(json.loads((self.path / HISTORY).read_text()))
        except FileNotFoundError:
            return []
        except ValueError as e:
            raise IndexFormatError(f"corrupt {self.path / HISTORY}: {e}") from e

    def open(self, version: str | None = None) -> IndexVersion:
        """The named version, or the active one when ``version`` is None."""
        name = version or self.current()
        if name is None:
            raise ValueError(
                f"no active index version in {self.path}; build one or `activate` a version"
            )
        path = self.path / name
        if not (path / MANIFEST).is_file():
            known = ", ".join(self.versions()) or "none"
            raise ValueError(f"no index version {name!r} in {self.path} (versions: {known})")
        return IndexVersion(path)

    # -- switching ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise CURRENT/HISTORY updates between processes (readers need no lock)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _switch(self, target: str, history: list[str]) -> None:
        # HISTORY first: a crash between the two writes leaves CURRENT unchanged and at
        # worst one extra rollback entry, never a CURRENT that history does not explain.
        fileio.atomic_write_text(self.path / HISTORY, json.dumps(history[-_HISTORY_MAX:]))
        backend = self.backend
        if backend is None:
            fileio.atomic_write_text(self.path / CURRENT, target + "\n")
            return
        from visearch.index.milvus import switch_alias

        collection = IndexVersion(self.path / target).collection
        if collection is None:
            raise ValueError(f"{target} is a faiss version; this root serves from Milvus "
                             f"({backend.uri})")
        switch_alias(backend.uri, backend.alias, collection)

    def activate(self, version: str) -> None:
        """Make ``version`` the active one (atomic); the previous one becomes the rollback
        target. ValueError for an unknown version."""
        self.open(version)
        with self._locked():
            cur = self.current()
            if cur == version:
                return
            history = self.history()
            if cur is not None:
                history.append(cur)
            self._switch(version, history)
        logger.info("activated %s (was %s)", version, cur)

    def rollback(self) -> str:
        """Re-activate the previously active version; returns its name.

        ValueError when there is nothing to roll back to.
        """
        with self._locked():
            history = [v for v in self.history() if (self.path / v / MANIFEST).is_file()]
            cur = self.current()
            while history and history[-1] == cur:
                history.pop()
            if not history:
                raise ValueError(f"nothing to roll back to in {self.path} (active: {cur})")
            target = history.pop()
            self._switch(target, history)
        logger.info("rolled back from %s to %s", cur, target)
        return target

    def gc(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions; never the active one nor the
        rollback target. Returns the deleted names."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        with self._locked():
            versions = self.versions()
            protected = set(versions[-keep:])
            cur = self.current()
            history = self.history()
            protected.update(v for v in (cur, history[-1] if history else None) if v)
            doomed = [v for v in versions if v not in protected]
            backend = self.backend
            for v in doomed:
                collection = IndexVersion(self.path / v).collection
                if backend is not None and collection is not None:
                    from visearch.index.milvus import drop_collection

                    drop_collection(backend.uri, collection)
                # Rename first so a half-deleted directory never looks like a version.
                trash = self.path / f".trash-{v}-{secrets.token_hex(4)}"
                os.rename(self.path / v, trash)
                shutil.rmtree(trash)
            if doomed:
                fileio.atomic_write_text(
                    self.path / HISTORY, json.dumps([v for v in history if v not in doomed])
                )
        self.clean_staging()
        logger.info("gc: deleted %d versions %s", len(doomed), doomed)
        return doomed

    # -- building -----------------------------------------------------------------------------

    def staging(self) -> _Staging:
        """A context manager yielding an empty staging directory; on a clean exit its
        contents are verified and renamed into place as a new version (``.version`` of the
        returned object); on an exception or a failed verification it is deleted."""
        return _Staging(self)

    def clean_staging(self) -> list[Path]:
        """Delete staging and trash directories left by processes that are gone (a killed
        build); returns what was deleted."""
        removed = []
        if not self.path.is_dir():
            return removed
        for p in self.path.iterdir():
            m = _STAGING_RE.match(p.name)
            if m and _pid_alive(int(m.group(1))) or not (m or p.name.startswith(".trash-")):
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            logger.warning("removed an interrupted build's leftovers: %s", p)
        return removed

    def _publish(self, staged: Path) -> str:
        seq = max((int(_VERSION_RE.match(v).group(1)) for v in self.versions()),  # type: ignore
                  default=0)
        while True:
            seq += 1
            name = f"v{seq:04d}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
            try:
                os.rename(staged, self.path / name)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue  # a concurrent build took this number
                raise
            fileio.fsync_dir(self.path)
            logger.info("published index version %s", name)
            return name


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
