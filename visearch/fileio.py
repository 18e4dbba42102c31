"""File helpers for every writer in visearch: atomic writes, file digests, a test fault hook.

One copy of each, so that every file visearch writes (index files, manifests, checkpoints,
catalog and COCO JSON, stage reports) is either the old or the new content after a crash.

``_fault_hook`` is private and exists for tests only (in the style of faiss ``contrib``'s
crash hooks): when set, it is called with the path of every file about to be written, so a
test can raise ``OSError(ENOSPC)`` (disk full) or SIGKILL the process in the middle of a
build.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

_fault_hook: Callable[[Path], None] | None = None


def before_write(path: str | os.PathLike[str]) -> None:
    """Called by every atomic writer before it writes ``path`` (runs the test fault hook)."""
    if _fault_hook is not None:
        _fault_hook(Path(path))


def file_digest(path: str | os.PathLike[str], algo: str = "sha256") -> str:
    """Hex digest of a file's bytes (``hashlib.file_digest``, streamed)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algo).hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory entry (after a rename) so the rename survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "wb", *, fsync: bool = True, **kwargs: Any
) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` for writing; on a clean exit it replaces ``path``.

    Readers see either the old or the new content, never a partial file: the data goes to
    ``.<name>.tmp-<pid>`` in the same directory, is flushed (and fsynced unless
    ``fsync=False``), then ``os.replace``d over ``path`` (atomic on POSIX within one file
    system). On an exception the temp file is removed and ``path`` is untouched.

    Args:
        path: the destination file; its directory must exist.
        mode: ``"wb"`` or ``"w"`` (then ``encoding`` defaults to UTF-8).
        fsync: fsync the file and its directory (durable across a power cut).
        **kwargs: passed to ``open`` (e.g. ``newline``).
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open writes; mode must contain 'w', got {mode!r}")
    path = Path(path)
    before_write(path)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see ``atomic_open``)."""
    with atomic_open(path, "w", fsync=fsync) as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_open``)."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)
