"""File helpers shared by the index modules: checksums, atomic small-file writes, fault hooks.

``_fault_hook`` is private and exists for tests only (style of faiss ``contrib``'s crash
hooks): when set, it is called with the path of every file about to be written, so a test
can raise ``OSError(ENOSPC)`` (disk full) or SIGKILL the process in the middle of a build.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

_fault_hook: Callable[[Path], None] | None = None


def before_write(path: str | os.PathLike[str]) -> None:
    """Called by every index writer before it writes ``path`` (runs the test fault hook)."""
    if _fault_hook is not None:
        _fault_hook(Path(path))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory entry (after a rename) so the rename survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old or the new content.

    The text goes to a temp file in the same directory, is fsynced, then ``os.replace``d
    over ``path`` (atomic on POSIX within one file system).
    """
    path = Path(path)
    before_write(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
