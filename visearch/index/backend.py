"""Index backends: where a version's gallery vectors live and how a version is activated.

- ``FaissBackend`` (the default): an embedded faiss ``GalleryIndex`` in the version
  directory, GPU where present; ``<root>/CURRENT`` names the active version.
- ``MilvusBackend``: a Milvus collection per version (a cluster by URI, or a Milvus Lite
  ``*.db`` file), ``visearch.index.milvus.MilvusGallery``; the root records it in
  ``<root>/BACKEND.json`` and a Milvus collection alias names the active version.

Both galleries expose the same interface (``Gallery``), so the query pipeline, the neighbour
graph and ``verify`` need not know which one they hold; ``load_gallery`` picks the class
from the version's ``index/gallery.json``.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from visearch.errors import IndexFormatError
from visearch.index.gallery import META_FILE, GalleryIndex

#: ``<root>/BACKEND.json``: present in a root whose versions live in Milvus
ROOT_BACKEND_FILE = "BACKEND.json"


class Gallery(Protocol):
    """What the pipeline, the graph and ``verify`` use of a gallery index (both backends)."""

    @property
    def dim(self) -> int: ...
    @property
    def ntotal(self) -> int: ...
    @property
    def ids(self) -> np.ndarray: ...
    @property
    def categories(self) -> list[str]: ...
    @property
    def factories(self) -> dict[str, str]: ...
    def counts(self) -> dict[str, int]: ...
    def categories_of(self, ids: np.ndarray) -> list[str]: ...
    def search(self, xq: np.ndarray, k: int, *, category: str | None = None,
               nprobe: int | None = None, ef_search: int | None = None,
               ) -> tuple[np.ndarray, np.ndarray]: ...
    def reconstruct(self, ids: np.ndarray) -> np.ndarray: ...
    def add(self, xb: np.ndarray, ids: np.ndarray, categories: Sequence[str]) -> None: ...
    def remove(self, ids: np.ndarray) -> int: ...
    def save(self, directory: str | os.PathLike[str]) -> list[Path]: ...


@dataclass(frozen=True)
class FaissBackend:
    """The embedded faiss index (the default)."""

    name = "faiss"

    def build(self, xb: np.ndarray, ids: np.ndarray, categories: Sequence[str], *,
              factory: str | None = None) -> GalleryIndex:
        return GalleryIndex.build(xb, ids, categories, factory=factory)

    def copy(self, base: Gallery) -> Gallery:
        """``base`` itself: a faiss index loaded from the base version is already a private
        in-memory copy, saved into the new version's directory."""
        return base


@dataclass(frozen=True)
class MilvusBackend:
    """Milvus: one collection per version, activation by alias switch.

    Attributes:
        uri: ``http://host:19530`` (a Milvus cluster) or a Milvus Lite file ``*.db``.
        alias: the alias that names the active version's collection.
        index_type: ``visearch.index.milvus.INDEX_TYPES`` (FLAT is exact).
        prefix: collection names are ``<prefix>_<random hex>``.
    """

    uri: str
    alias: str = "visearch_active"
    index_type: str = "FLAT"
    prefix: str = "visearch"
    name = "milvus"

    def __post_init__(self) -> None:
        from visearch.index.milvus import INDEX_TYPES, check_name, normalise_uri

        object.__setattr__(self, "uri", normalise_uri(self.uri))
        check_name(self.alias, "alias")
        check_name(self.prefix, "collection prefix")
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"unknown Milvus index type {self.index_type!r}; choose one of "
                             f"{', '.join(INDEX_TYPES)}")

    def new_collection(self) -> str:
        return f"{self.prefix}_{secrets.token_hex(6)}"

    def build(self, xb: np.ndarray, ids: np.ndarray, categories: Sequence[str], *,
              factory: str | None = None) -> Gallery:
        from visearch.index.milvus import MilvusGallery

        if factory is not None:
            raise ValueError("--factory is a faiss option; the Milvus backend takes an "
                             "index type (FLAT, IVF_FLAT, IVF_SQ8, HNSW)")
        return MilvusGallery.build(self.uri, self.new_collection(), xb, ids, categories,
                                   index_type=self.index_type)

    def copy(self, base: Gallery) -> Gallery:
        """A new collection with ``base``'s items: the updated version's own."""
        return base.copy_to(self.new_collection())  # type: ignore[attr-defined]

    def record(self) -> dict[str, Any]:
        """The ``BACKEND.json`` of a root served by this backend."""
        return {"backend": self.name, "uri": self.uri, "alias": self.alias,
                "index_type": self.index_type, "prefix": self.prefix}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> MilvusBackend:
        return cls(uri=record["uri"], alias=record["alias"],
                   index_type=record.get("index_type", "FLAT"),
                   prefix=record.get("prefix", "visearch"))


def gallery_backend(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``gallery.json`` of a version's index directory (``backend`` absent: faiss)."""
    path = Path(directory) / META_FILE
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"cannot read gallery index in {directory}: {e}") from e


def load_gallery(directory: str | os.PathLike[str]) -> Gallery:
    """Open a version's gallery index with the backend its ``gallery.json`` names."""
    meta = gallery_backend(directory)
    backend = meta.get("backend", "faiss")
    if backend == "faiss":
        return GalleryIndex.load(directory)
    if backend == "milvus":
        from visearch.index.milvus import MilvusGallery

        return MilvusGallery.load(directory)
    raise IndexFormatError(f"{directory}: unknown index backend {backend!r} (faiss, milvus)")


def root_backend(root: str | os.PathLike[str]) -> MilvusBackend | None:
    """The Milvus backend a root is served by (its ``BACKEND.json``), or None for faiss."""
    path = Path(root) / ROOT_BACKEND_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"corrupt {path}: {e}") from e
    if record.get("backend") != "milvus":
        raise IndexFormatError(f"{path}: unknown backend {record.get('backend')!r}")
    return MilvusBackend.from_record(record)
