"""The project's exception types: one base class, one subclass per kind of bad input."""

from __future__ import annotations


class VisearchError(Exception):
    """Base class of every error visearch raises on purpose."""


class ImageDecodeError(VisearchError, ValueError):
    """Bytes or a file that cannot be used as an image: empty, truncated, not an image,
    an unsupported mode, or too large (decompression bomb, pixel or side limits)."""


class ManifestError(VisearchError, ValueError):
    """A bad row in a catalog or query manifest; ``line`` is 1-based (0: the file itself)."""

    def __init__(self, message: str, *, line: int = 0, path: str | None = None) -> None:
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(f"{where}{message}")
        self.line = line
        self.path = path
        self.reason = message


class IndexFormatError(VisearchError):
    """A missing, truncated or corrupt index file, or vectors whose dimension does not match."""


class DamagedStoreError(VisearchError):
    """The store does not hold what it recorded: an image whose bytes no longer hash to
    their MD5 key, or an image an item or source names that is missing. Not a bad catalog
    image (``ImageDecodeError``): a rebuild must stop, not skip the row. Re-ingest into a
    new store."""
