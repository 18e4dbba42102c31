"""Catalog and query manifests (``catalog.jsonl``, ``queries.jsonl``): a validating reader.

Each line is one JSON object: ``{"image": "img/000123.jpg", "sku": "S000123",
"category": "shoe", "bbox": [x1, y1, x2, y2], "attributes": {"color": "red"},
"title": "..."}``; ``bbox``, ``attributes`` and ``title`` are optional, image paths are
relative to the manifest's folder. Every row is validated; a bad row is either fatal
(``strict``) or skipped, counted, logged and written to a rejects file. Never dropped silently.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visearch.errors import ImageDecodeError, ManifestError
from visearch.fileio import atomic_open
from visearch.imageio import ByteSource, ImageSource, image_size

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("image", "sku", "category")
OPTIONAL_FIELDS = ("bbox", "attributes", "title")
KNOWN_FIELDS = frozenset(REQUIRED_FIELDS + OPTIONAL_FIELDS)

Box = tuple[float, float, float, float]

#: Where a manifest's images are read from instead of their files: for an image's absolute
#: path, the stored image and its ``(width, height)``, or None to read the file
#: (``visearch.store.ImageStore.lookup``).
ImageLookup = Callable[[Path], "tuple[ByteSource, tuple[int, int]] | None"]


@dataclass(frozen=True)
class CatalogRow:
    """One validated manifest row.

    Attributes:
        line: 1-based line number in the manifest.
        image: the image path as written in the manifest (relative to its folder).
        path: the absolute path of the image file.
        sku: the SKU id (for queries: the ground truth).
        category: the product category.
        bbox: ``(x1, y1, x2, y2)`` of the product in original image pixels, or None.
        attributes: free-form string attributes (colour, pattern, ...).
        title: product title, possibly empty.
        stored: where the image's bytes are read from when not from ``path``: the image as
            ingested into the store (``visearch.store.StoredImage``), or None.
    """

    line: int
    image: str
    path: Path
    sku: str
    category: str
    bbox: Box | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    title: str = ""
    stored: ByteSource | None = field(default=None, compare=False)

    @property
    def source(self) -> ImageSource:
        """What every stage reads the image from: the stored image when the row has one
        (the bytes ingested and validated), else the file at ``path``."""
        return self.stored if self.stored is not None else self.path

    def to_json(self) -> dict[str, Any]:
        """The row as written in a manifest (``image`` relative, optional fields if set)."""
        out: dict[str, Any] = {"image": self.image, "sku": self.sku, "category": self.category}
        if self.bbox is not None:
            out["bbox"] = list(self.bbox)
        if self.attributes:
            out["attributes"] = dict(self.attributes)
        if self.title:
            out["title"] = self.title
        return out


@dataclass(frozen=True)
class Reject:
    """A manifest line that was not accepted, and why."""

    line: int
    reason: str
    raw: str


@dataclass
class Manifest:
    """The accepted rows and the rejected lines of one manifest file."""

    path: Path
    rows: list[CatalogRow]
    rejects: list[Reject]

    def __len__(self) -> int:
        return len(self.rows)


def _check_str(obj: dict[str, Any], key: str, *, required: bool) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing required field {key!r}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"field {key!r} is empty")
    return value


def _check_bbox(value: Any) -> Box:
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise ValueError("field 'bbox' must be a list of 4 numbers [x1, y1, x2, y2]")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise ValueError(f"field 'bbox' must hold numbers, got {value!r}")
    x1, y1, x2, y2 = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"field 'bbox' has non-finite values: {value!r}")
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"bbox {value!r} is empty: need x1 < x2 and y1 < y2")
    return (x1, y1, x2, y2)


def _check_attributes(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"field 'attributes' must be an object, got {type(value).__name__}")
    out: dict[str, str] = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise ValueError(
                f"attribute {k!r} must be a string or a number, got {type(v).__name__}"
            )
        out[str(k)] = str(v)
    return out


def parse_row(
    obj: Any, *, line: int, root: Path, check_images: bool = True,
    images: ImageLookup | None = None,
) -> CatalogRow:
    """Validate one decoded JSON value as a manifest row. An image ``images`` knows is
    taken from it (its size from there, the file is not opened); any other is checked in
    its file when ``check_images``.

    Raises:
        ValueError: with a message naming the problem (the caller adds the line number).
    """
    if not isinstance(obj, dict):
        raise ValueError(f"a row must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - KNOWN_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown field(s) {unknown}; known fields are {sorted(KNOWN_FIELDS)}"
        )
    image = _check_str(obj, "image", required=True)
    sku = _check_str(obj, "sku", required=True)
    category = _check_str(obj, "category", required=True)
    title = _check_str(obj, "title", required=False)
    bbox = _check_bbox(obj["bbox"]) if obj.get("bbox") is not None else None
    attributes = (
        _check_attributes(obj["attributes"]) if obj.get("attributes") is not None else {}
    )
    path = Path(image) if os.path.isabs(image) else (root / image)
    path = path.resolve()
    found = images(path) if images is not None else None
    stored = found[0] if found is not None else None
    if found is not None or check_images:
        if found is not None:
            width, height = found[1]
        else:
            try:
                width, height = image_size(path)
            except ImageDecodeError as exc:
                raise ValueError(str(exc)) from None
        if bbox is not None:
            x1, y1, x2, y2 = bbox
            if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
                raise ValueError(
                    f"bbox {list(bbox)} lies outside the {width} x {height} image"
                )
    return CatalogRow(line, image, path, sku, category, bbox, attributes, title, stored)


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for every non-blank line of a text file."""
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                yield number, text.rstrip("\n")


def read_manifest(
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    rejects_path: str | os.PathLike[str] | None = None,
    check_images: bool = True,
    images: ImageLookup | None = None,
) -> Manifest:
    """Read and validate a ``catalog.jsonl`` or ``queries.jsonl`` file.

    Args:
        path: the manifest; image paths in it are relative to its folder.
        strict: True: the first bad row raises ``ManifestError`` naming its line.
            False: bad rows are skipped, counted, logged and written to ``rejects_path``.
        rejects_path: where lenient mode writes rejected lines as JSONL
            ``{"line", "reason", "raw"}``; default ``<manifest>.rejects.jsonl``.
        check_images: open each image's header: the file must exist, be an image, and
            contain the bbox.
        images: read the images it knows from there instead of their files
            (``ImageStore.lookup``: each row's ``stored``; the bbox is checked against the
            stored size); the files of those images are never opened.

    Returns:
        The accepted rows in file order, and the rejects.

    Raises:
        ManifestError: strict mode and a bad row, or the file cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError("manifest file not found", path=str(path))
    root = path.parent.resolve()
    rows: list[CatalogRow] = []
    rejects: list[Reject] = []
    try:
        lines = list(iter_lines(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read manifest: {exc}", path=str(path)) from exc
    for number, text in lines:
        try:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
            rows.append(parse_row(obj, line=number, root=root, check_images=check_images,
                                 images=images))
        except ValueError as exc:
            if strict:
                raise ManifestError(str(exc), line=number, path=str(path)) from None
            rejects.append(Reject(number, str(exc), text))
            logger.warning("%s:%d: rejected: %s", path, number, exc)
    if rejects:
        out = Path(rejects_path) if rejects_path else path.with_suffix(".rejects.jsonl")
        with open(out, "w", encoding="utf-8") as f:
            for r in rejects:
                f.write(json.dumps({"line": r.line, "reason": r.reason, "raw": r.raw}) + "\n")
        logger.warning(
            "%s: %d row(s) accepted, %d rejected (written to %s)",
            path, len(rows), len(rejects), out,
        )
    else:
        logger.info("%s: %d row(s) accepted", path, len(rows))
    return Manifest(path, rows, rejects)


def write_manifest(path: str | os.PathLike[str], rows: list[CatalogRow]) -> None:
    """Write rows as a manifest (atomically: temp file + rename). Image paths are written
    relative to the new manifest's folder, so the file can live anywhere."""
    path = Path(path)
    root = path.parent.resolve()
    with atomic_open(path, "w") as f:
        for row in rows:
            obj = row.to_json()
            obj["image"] = os.path.relpath(row.path, root)
            f.write(json.dumps(obj, sort_keys=True) + "\n")
