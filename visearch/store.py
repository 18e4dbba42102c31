"""The image store: an LMDB environment holding each image once, by content hash.

Three named databases: ``images`` maps the MD5 of the encoded bytes to the bytes, ``items``
maps an item key (``"<md5>:<sku>"``: the same picture filed under two SKUs is two items, the
same row ingested twice is one) to JSON metadata (sku, category, bbox, attributes, title,
source path, manifest line, width, height), and ``sources`` maps the absolute path of each
ingested catalog file to the MD5, width and height of the bytes last ingested from it.
Ingest decodes every image to validate it, commits in batches (so an interrupted ingest
keeps what it committed and a re-run adds only what is missing), and doubles the map size
whenever LMDB reports it full. LMDB readers in several processes are safe; an
``ImageStore`` re-opens its environment after pickling, so it can be handed to DataLoader
workers.

After ingest the store is the one source of the catalog's images: every later stage reads a
manifest with ``images=store.lookup`` (``read_manifest``), which gives each row a
:class:`StoredImage` (``CatalogRow.stored``), and decodes ``row.source``. A catalog file
moved, deleted or overwritten after ingest does not change what the stages read, and every
read checks the bytes against their MD5: a damaged store raises
:class:`DamagedStoreError`, never a silently different image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb

from visearch.catalog import CatalogRow, ImageLookup, Reject
from visearch.errors import DamagedStoreError, ImageDecodeError, ManifestError
from visearch.imageio import decode_pil, image_size

if TYPE_CHECKING:
    from visearch.parallel import Runner

logger = logging.getLogger(__name__)

_IMAGES = b"images"
_ITEMS = b"items"
_SOURCES = b"sources"
#: LMDB map size a new store starts with; it grows by doubling (LMDB files are sparse, so a
#: large map costs nothing until it is used).
INITIAL_MAP_SIZE = 64 << 20


def item_key(md5: str, sku: str) -> str:
    """The store's key of an item: the image's MD5 and the SKU it is filed under."""
    return f"{md5}:{sku}"


@dataclass(frozen=True)
class StoredImage:
    """An image in the store at ``store``, by the MD5 of its bytes: an ``ImageSource``
    (``visearch.imageio.ByteSource``) every image loader accepts. Picklable (two plain
    fields): DataLoader and process-pool workers open the store themselves, once per
    process."""

    store: Path
    md5: str

    @property
    def name(self) -> str:
        """``<store>#<md5>``: how messages name the image."""
        return f"{self.store}#{self.md5}"

    def read_bytes(self) -> bytes:
        """The image's encoded bytes, checked against the MD5.

        Raises:
            DamagedStoreError: the store lacks the image or its bytes changed.
            FileNotFoundError: no store at ``store``.
        """
        store = _reader(self.store)
        try:
            return store.get_bytes(self.md5)
        except KeyError:
            raise DamagedStoreError(
                f"image store {self.store} has no image {self.md5} although it was ingested "
                "there: the store is damaged or was replaced; re-run ingest"
            ) from None


#: Every open ``ImageStore`` by resolved path: LMDB refuses to open one environment twice
#: in a process, so ``StoredImage`` reads go through the store already open, if any.
_open_stores: dict[Path, ImageStore] = {}


def _identity(path: Path) -> tuple[int, int, int]:
    """(pid, device, inode) of the store's data file: a handle is valid for this process
    and these files only (a re-run stage renames a new store into place)."""
    try:
        st = (path / "data.mdb").stat()
    except OSError:
        raise FileNotFoundError(f"no image store at {path}") from None
    return os.getpid(), st.st_dev, st.st_ino


def _reader(path: Path) -> ImageStore:
    """The open ``ImageStore`` at ``path`` in this process, else a readonly one opened
    now and kept; one opened before a fork, or on files since replaced, is closed and
    opened again."""
    path = Path(path).resolve()
    identity = _identity(path)
    store = _open_stores.get(path)
    if store is not None and store.identity == identity:
        return store
    if store is not None:
        # Inherited through fork or replaced on disk. Closing it releases only this
        # process's reader slots and locks; the parent's handle is untouched.
        store.close()
    store = ImageStore(path, readonly=True)
    store.shared = True
    return store


def store_lookup(path: str | os.PathLike[str] | None) -> ImageLookup | None:
    """``read_manifest``'s ``images`` argument for the store at ``path``: this process's
    readonly store's :meth:`ImageStore.lookup`; None (read the files) when ``path`` is None.

    Raises:
        FileNotFoundError: no store at ``path``.
    """
    return None if path is None else _reader(Path(path)).lookup


@dataclass
class IngestReport:
    """What one ``ingest`` call did. ``failed`` rows were not stored (bad images)."""

    added_items: int = 0
    present_items: int = 0
    added_images: int = 0
    shared_images: int = 0
    failed: list[Reject] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)


def _check_image(data: bytes) -> tuple[int, int, str]:
    """``(width, height, "")`` of an encoded image, or ``(0, 0, reason)`` when it does not
    decode. The draft decode checks the whole stream at a fraction of the cost."""
    try:
        decode_pil(data, draft=(64, 64))
        width, height = image_size(data)
    except ImageDecodeError as exc:
        return 0, 0, str(exc)
    return width, height, ""


def check_image_files(paths: list[str]) -> list[tuple[str, int, int, str]]:
    """A runner's shard of :meth:`ImageStore.ingest`: ``(md5 of the bytes, width, height,
    reason)`` per file, reason ``""`` when it decodes. An unreadable file gives md5 ``""``
    (ingest then reads and reports it itself)."""
    out = []
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError:
            out.append(("", 0, 0, ""))
            continue
        out.append((hashlib.md5(data).hexdigest(), *_check_image(data)))
    return out


class ImageStore:
    """LMDB store of catalog images (once per content hash) and their items.

    Args:
        path: the LMDB directory (created when writable and missing).
        readonly: open for reading only (many processes may do so at once).
        batch_size: rows per write transaction during ingest.
        initial_map_size: LMDB map size in bytes to open with; ingest doubles it whenever
            LMDB reports the map full.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, readonly: bool = False, batch_size: int = 256,
        initial_map_size: int = INITIAL_MAP_SIZE,
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.batch_size = batch_size
        self.initial_map_size = initial_map_size
        self._open()

    def _open(self) -> None:
        if self.readonly and not self.path.exists():
            raise FileNotFoundError(f"no image store at {self.path}")
        key = self.path.resolve()
        other = _open_stores.get(key)
        if other is not None and (other.shared or other.identity[0] != os.getpid()):
            # The handle StoredImage reads opened, or one inherited through fork: this
            # store takes its place. (Another store opened by a caller is LMDB's error.)
            other.close()
        #: opened by StoredImage reads (``_reader``), not by a caller
        self.shared = False
        self.path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(self.path),
            map_size=self.initial_map_size,
            max_dbs=4,
            readonly=self.readonly,
            lock=True,
            readahead=False,
            subdir=True,
        )
        if self.readonly:
            # A readonly environment cannot create databases; an empty store has none yet.
            try:
                self._images = self.env.open_db(_IMAGES, create=False)
                self._items = self.env.open_db(_ITEMS, create=False)
            except lmdb.NotFoundError as exc:
                raise FileNotFoundError(f"{self.path} is not an image store") from exc
            try:
                self._sources: Any = self.env.open_db(_SOURCES, create=False)
            except lmdb.NotFoundError:
                # A store ingested before sources were recorded: its rows read their files.
                logger.warning("image store %s records no sources; ingest again to read "
                               "the images from it", self.path)
                self._sources = None
        else:
            self._images = self.env.open_db(_IMAGES)
            self._items = self.env.open_db(_ITEMS)
            self._sources = self.env.open_db(_SOURCES)
        self.identity = _identity(key)
        _open_stores[key] = self

    # Pickling (DataLoader workers): reopen the environment in the child process.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "readonly": True, "batch_size": self.batch_size,
                "initial_map_size": self.initial_map_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open()

    def close(self) -> None:
        self.env.close()
        key = self.path.resolve()
        if _open_stores.get(key) is self:
            del _open_stores[key]

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        with self.env.begin(db=self._items) as txn:
            return txn.stat(self._items)["entries"]

    @property
    def num_images(self) -> int:
        """Distinct images stored."""
        with self.env.begin(db=self._images) as txn:
            return txn.stat(self._images)["entries"]

    def has_item(self, key: str) -> bool:
        with self.env.begin(db=self._items) as txn:
            return txn.get(key.encode()) is not None

    def get_item(self, key: str) -> dict[str, Any]:
        """Metadata of item ``key``; KeyError when absent."""
        with self.env.begin(db=self._items) as txn:
            raw = txn.get(key.encode())
        if raw is None:
            raise KeyError(f"no item {key!r} in {self.path}")
        return json.loads(raw)

    def get_bytes(self, md5: str) -> bytes:
        """Encoded bytes of the image with this MD5, checked against it.

        Raises:
            KeyError: no such image.
            DamagedStoreError: the stored bytes do not hash to ``md5``.
        """
        with self.env.begin(db=self._images) as txn:
            raw = txn.get(md5.encode())
        if raw is None:
            raise KeyError(f"no image {md5} in {self.path}")
        data = bytes(raw)
        actual = hashlib.md5(data).hexdigest()
        if actual != md5:
            raise DamagedStoreError(
                f"image store {self.path} is damaged: the image stored under MD5 {md5} "
                f"has bytes with MD5 {actual} ({len(data)} bytes); re-ingest the catalog "
                "into a new store"
            )
        return data

    def lookup(self, path: Path) -> tuple[StoredImage, tuple[int, int]] | None:
        """The image last ingested from the file at ``path`` (absolute, resolved) and its
        ``(width, height)`` (EXIF rotation applied), or None when none was: what
        ``read_manifest(images=...)`` takes."""
        if self._sources is None:
            return None
        with self.env.begin(db=self._sources) as txn:
            raw = txn.get(str(path).encode())
        if raw is None:
            return None
        meta = json.loads(raw)
        return StoredImage(self.path.resolve(), meta["md5"]), (meta["width"], meta["height"])

    def iter_items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(item key, metadata) for every item, in key order."""
        with self.env.begin(db=self._items) as txn:
            for key, raw in txn.cursor():
                yield key.decode(), json.loads(raw)

    def _put_batch(self, batch: list[tuple[str, bytes, str, dict[str, Any]]],
                   sources: dict[str, dict[str, Any]]) -> None:
        """Write (md5, bytes, item key, meta) tuples and the ``{path: {md5, width,
        height}}`` sources in one transaction, growing the map."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for md5, data, key, meta in batch:
                        txn.put(md5.encode(), data, db=self._images, overwrite=False)
                        txn.put(key.encode(), json.dumps(meta).encode(), db=self._items)
                    for path, source in sources.items():
                        txn.put(path.encode(), json.dumps(source).encode(), db=self._sources)
                return
            except lmdb.MapFullError:
                new_size = self.env.info()["map_size"] * 2
                logger.info("store %s full; growing map to %d MiB", self.path, new_size >> 20)
                self.env.set_mapsize(new_size)

    def ingest(
        self,
        rows: Iterable[CatalogRow],
        *,
        strict: bool = False,
        progress: Any = None,
        runner: Runner | None = None,
        _fail_after: int | None = None,
    ) -> IngestReport:
        """Store the images and items of ``rows`` that are not stored yet.

        Every image is decoded once to validate it (a truncated or non-image file is a
        failed row, with its manifest line). Idempotent: items already present are counted
        in ``present_items`` and not rewritten. Each stored row's file is recorded as the
        source of its image (``lookup``), the last ingest of a path winning.

        Args:
            rows: validated manifest rows.
            strict: raise ``ManifestError`` on the first image that fails to decode,
                instead of recording it in ``failed``.
            progress: an optional callable ``progress(n)`` called with the number of rows
                handled since the last call (e.g. a tqdm bar's ``update``).
            runner: a ``visearch.parallel`` runner (a process pool, Ray Data) that reads
                and decodes every row's image in shards first (:func:`check_image_files`);
                this process then stores them in row order, as without one. None: decode
                here, row by row.

        Returns:
            An ``IngestReport``; ``keys`` lists the item key of every stored row in order.
        """
        if self.readonly:
            raise ValueError("this ImageStore was opened readonly; open it writable to ingest")
        report = IngestReport()
        batch: list[tuple[str, bytes, str, dict[str, Any]]] = []
        batch_images: set[str] = set()
        batch_keys: set[str] = set()
        batch_sources: dict[str, dict[str, Any]] = {}
        checked: dict[str, tuple[str, int, int, str]] = {}
        if runner is not None:
            rows = list(rows)
            paths = sorted({str(r.path) for r in rows})
            parts = runner.map(check_image_files, [paths[s:s + 64]
                                                   for s in range(0, len(paths), 64)])
            checked = dict(zip(paths, (c for part in parts for c in part), strict=True))
        for handled, row in enumerate(rows, start=1):
            reason = ""
            try:
                data = row.path.read_bytes()
            except OSError as exc:
                data = None
                reason = f"cannot read image {row.path}: {exc.strerror or exc}"
            md5 = hashlib.md5(data).hexdigest() if data is not None else ""
            key = item_key(md5, row.sku)
            if data is not None and (key in batch_keys or self.has_item(key)):
                report.present_items += 1
                report.keys.append(key)
                width, height = image_size(data)  # validated when it was stored
                batch_sources[str(row.path)] = {"md5": md5, "width": width, "height": height}
            elif data is not None:
                pre = checked.get(str(row.path))
                if pre is not None and pre[0] == md5:  # the runner decoded these bytes
                    width, height, reason = pre[1], pre[2], pre[3]
                else:
                    width, height, reason = _check_image(data)
                if not reason:
                    stored = md5 in batch_images or self._has_image(md5)
                    report.shared_images += int(stored)
                    report.added_images += int(not stored)
                    batch_images.add(md5)
                    meta = {
                        "md5": md5,
                        "sku": row.sku,
                        "category": row.category,
                        "bbox": list(row.bbox) if row.bbox else None,
                        "attributes": row.attributes,
                        "title": row.title,
                        "source": str(row.path),
                        "line": row.line,
                        "width": width,
                        "height": height,
                    }
                    batch.append((md5, data, key, meta))
                    batch_sources[str(row.path)] = {"md5": md5, "width": width,
                                                    "height": height}
                    batch_keys.add(key)
                    report.added_items += 1
                    report.keys.append(key)
            if reason:
                if strict:
                    raise ManifestError(reason, line=row.line, path=str(row.path))
                report.failed.append(Reject(row.line, reason, json.dumps(row.to_json())))
                logger.warning("line %d: not ingested: %s", row.line, reason)
            if len(batch) >= self.batch_size or len(batch_sources) >= 16 * self.batch_size:
                self._put_batch(batch, batch_sources)
                batch, batch_images, batch_keys, batch_sources = [], set(), set(), {}
            if progress is not None:
                progress(1)
            if _fail_after is not None and handled >= _fail_after:
                raise RuntimeError(f"_fail_after: simulated crash after {handled} rows")
        if batch or batch_sources:
            self._put_batch(batch, batch_sources)
        logger.info(
            "ingest into %s: %d item(s) added, %d already present, %d new image(s), "
            "%d failed",
            self.path, report.added_items, report.present_items, report.added_images,
            len(report.failed),
        )
        return report

    def _has_image(self, md5: str) -> bool:
        with self.env.begin(db=self._images) as txn:
            return txn.get(md5.encode()) is not None
