"""ItemStore: the id -> {sku, category, image_key, title} map of an index version, in LMDB.

A read-only mapping over one LMDB file (``subdir=False``, no lock file, so reading never
changes the version directory's checksummed files). Keys are 8-byte big-endian item ids,
values UTF-8 JSON objects.
"""

from __future__ import annotations

import json
import numbers
import os
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lmdb

from visearch import fileio
from visearch.errors import IndexFormatError

ITEM_FIELDS = ("sku", "category", "image_key", "title")
_KEY = struct.Struct(">q")


def _key(item_id: int) -> bytes:
    return _KEY.pack(int(item_id))


# py-lmdb refuses to open one file twice in a process, but several IndexVersion objects
# (a reload, a verify beside a server) may read the same version: share one env per file.
_ENVS: dict[str, list[Any]] = {}  # realpath -> [env, users]
_ENVS_LOCK = threading.Lock()


def _acquire_env(path: Path) -> lmdb.Environment:
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is None:
            env = lmdb.open(key, subdir=False, readonly=True, lock=False, readahead=False,
                            max_readers=512)
            entry = _ENVS[key] = [env, 0]
        entry[1] += 1
        return entry[0]


def _release_env(path: Path) -> None:
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del _ENVS[key]


class ItemStore(Mapping[int, dict[str, Any]]):
    """Read-only ``Mapping[int, dict]`` of item metadata; ``close()`` when done."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise IndexFormatError(f"missing item map {self.path}")
        try:
            self._env = _acquire_env(self.path)
        except lmdb.Error as e:
            raise IndexFormatError(f"cannot open item map {self.path}: {e}") from e
        self._closed = False

    @staticmethod
    def write(
        path: str | os.PathLike[str], items: Iterable[tuple[int, Mapping[str, Any]]]
    ) -> int:
        """Write a new item map at ``path`` from ``(item_id, {sku, category, image_key,
        title, ...})`` pairs; returns the number of items. Extra keys are kept."""
        path = Path(path)
        fileio.before_write(path)
        records = [(_key(i), json.dumps(dict(meta), sort_keys=True).encode()) for i, meta in items]
        for _, value in records:
            meta = json.loads(value)
            missing = [f for f in ("sku", "category") if f not in meta]
            if missing:
                raise ValueError(f"item metadata lacks {missing}: {meta}")
        # LMDB needs an upper bound on the file size; pages and B-tree overhead stay well
        # under 4x the payload for small JSON values.
        payload = sum(len(k) + len(v) for k, v in records)
        env = lmdb.open(str(path), subdir=False, map_size=max(1 << 24, 4 * payload + (1 << 24)),
                        lock=False, sync=True)
        try:
            with env.begin(write=True) as txn:
                for k, v in sorted(records):
                    if not txn.put(k, v, overwrite=False):
                        raise ValueError(f"duplicate item id {_KEY.unpack(k)[0]}")
            env.sync(True)
        finally:
            env.close()
        Path(f"{path}-lock").unlink(missing_ok=True)
        return len(records)

    def __getitem__(self, item_id: int) -> dict[str, Any]:
        with self._env.begin() as txn:
            value = txn.get(_key(item_id))
        if value is None:
            raise KeyError(item_id)
        return json.loads(value)

    def get_many(self, item_ids: Iterable[int]) -> list[dict[str, Any] | None]:
        """Metadata of each id (None for an unknown id, e.g. the -1 padding), one txn."""
        out: list[dict[str, Any] | None] = []
        with self._env.begin() as txn:
            for i in item_ids:
                value = txn.get(_key(i)) if int(i) >= 0 else None
                out.append(json.loads(value) if value is not None else None)
        return out

    def __iter__(self) -> Iterator[int]:
        with self._env.begin() as txn:
            for k in txn.cursor().iternext(keys=True, values=False):
                yield _KEY.unpack(k)[0]

    def items_iter(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """All ``(item_id, metadata)`` pairs in id order."""
        with self._env.begin() as txn:
            for k, v in txn.cursor():
                yield _KEY.unpack(k)[0], json.loads(v)

    def __len__(self) -> int:
        return int(self._env.stat()["entries"])

    def __contains__(self, item_id: object) -> bool:
        if not isinstance(item_id, numbers.Integral):
            return False
        with self._env.begin() as txn:
            return txn.get(_key(item_id)) is not None

    def close(self) -> None:
        """Release this store's handle (the file closes when its last reader closes)."""
        if not self._closed:
            self._closed = True
            _release_env(self.path)
