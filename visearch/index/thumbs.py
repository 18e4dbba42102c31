"""Gallery thumbnails of an index version: ``thumbs.lmdb``, item id -> small JPEG.

A version that carries its thumbnails shows its results without the catalog files or the
build's work directory: the web page (``server/web.py``) serves them by item id, from the
version it searched. The build makes them from each row's ``source``, which is the image as
ingested into the image store (``visearch.store``) when the build reads a store, so what the
page shows is what was indexed, even after the catalog files moved or changed.

One read-only LMDB file beside ``items.lmdb`` and written the same way (``subdir=False``, no
lock file, 8-byte big-endian item ids; readers share one environment per file through
``visearch.index.items``), so it is listed and checksummed in the manifest like every other
file of the version and ``verify`` catches a corrupt one. A version built before thumbnails
existed has no file: :func:`open_thumbnails` returns None and callers show none.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
from collections.abc import Container, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import lmdb

from visearch import fileio
from visearch.errors import IndexFormatError
from visearch.imageio import ImageSource, decode_pil, encode_jpeg
from visearch.index.items import _KEY, _acquire_env, _key, _release_env

logger = logging.getLogger(__name__)

THUMBS_FILE = "thumbs.lmdb"
#: Longest side of a thumbnail, in pixels (a result card on the page is 160 px wide).
THUMB_SIDE = 160
THUMB_QUALITY = 85


def make_thumbnail(src: ImageSource, *, side: int = THUMB_SIDE,
                   quality: int = THUMB_QUALITY) -> bytes:
    """JPEG bytes of ``src`` scaled so its longest side is at most ``side`` px (aspect kept,
    never enlarged). Raises ``ImageDecodeError`` (or ``DamagedStoreError``) like
    ``decode_pil``."""
    image = decode_pil(src, max_side=side, draft=(side, side))
    return encode_jpeg(image, quality=quality)


def make_thumbnails(sources: Iterable[ImageSource], *, workers: int = 0,
                    side: int = THUMB_SIDE, chunksize: int = 64) -> Iterator[bytes]:
    """:func:`make_thumbnail` of each source, in order; with ``workers`` > 0 in that many
    processes (a 1600 x 1200 JPEG takes about 10 ms, so a large catalog needs them).
    Sources must pickle (paths, bytes, ``StoredImage``). Stopping early cancels what is
    left."""
    make = functools.partial(make_thumbnail, side=side)
    if workers <= 0:
        yield from map(make, sources)
        return
    # spawn: workers do not inherit the caller's threads (torch, BLAS) or open LMDB handles.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield from pool.map(make, sources, chunksize=chunksize)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_thumbnails(path: str | os.PathLike[str],
                     thumbnails: Iterable[tuple[int, bytes]]) -> int:
    """Write a new thumbnail file at ``path`` from ``(item_id, jpeg_bytes)`` pairs; returns
    how many. Raises ``ValueError`` on a duplicate id."""
    path = Path(path)
    fileio.before_write(path)
    env = lmdb.open(str(path), subdir=False, map_size=1 << 24, lock=False, sync=True)
    n = 0
    try:
        batch: list[tuple[int, bytes]] = []
        for entry in thumbnails:
            batch.append(entry)
            if len(batch) >= 512:
                n += _put(env, batch)
                batch = []
        n += _put(env, batch)
        env.sync(True)
    finally:
        env.close()
    Path(f"{path}-lock").unlink(missing_ok=True)
    return n


def _put(env: lmdb.Environment, batch: list[tuple[int, bytes]]) -> int:
    """One write transaction; doubles the map while LMDB reports it full."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for item_id, data in batch:
                    if not txn.put(_key(item_id), bytes(data), overwrite=False):
                        raise ValueError(f"duplicate thumbnail for item id {item_id}")
            return len(batch)
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)


class ThumbnailStore:
    """Read-only item id -> JPEG bytes over a version's ``thumbs.lmdb``; ``close()`` when
    done. Raises ``IndexFormatError`` when the file is missing or not LMDB."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise IndexFormatError(f"missing thumbnail file {self.path}")
        try:
            self._env = _acquire_env(self.path)
        except lmdb.Error as e:
            raise IndexFormatError(f"cannot open thumbnails {self.path}: {e}") from e
        self._closed = False

    def get(self, item_id: int) -> bytes | None:
        """The item's JPEG thumbnail, or None when it has none."""
        with self._env.begin() as txn:
            value = txn.get(_key(item_id))
        return None if value is None else bytes(value)

    def items(self) -> Iterator[tuple[int, bytes]]:
        """All ``(item_id, jpeg_bytes)`` pairs in id order."""
        with self._env.begin() as txn:
            for k, v in txn.cursor():
                yield _KEY.unpack(k)[0], bytes(v)

    def __len__(self) -> int:
        return int(self._env.stat()["entries"])

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release_env(self.path)

    def __enter__(self) -> ThumbnailStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def carry_thumbnails(version_path: str | os.PathLike[str], *,
                     removed: Container[int] = (),
                     added: Iterable[tuple[int, bytes]] = ()) -> Iterator[tuple[int, bytes]]:
    """Stream the thumbnails of the version at ``version_path`` less the ``removed`` ids,
    then ``added``: what ``update_version`` writes (the base's file is read, never held
    whole in memory, and closed when the stream ends)."""
    store = open_thumbnails(version_path)
    if store is not None:
        try:
            yield from ((i, data) for i, data in store.items() if i not in removed)
        finally:
            store.close()
    yield from added


def open_thumbnails(version_path: str | os.PathLike[str]) -> ThumbnailStore | None:
    """The thumbnails of the version directory ``version_path``; None when it has none
    (built before thumbnails, or without image sources)."""
    path = Path(version_path) / THUMBS_FILE
    return ThumbnailStore(path) if path.is_file() else None
