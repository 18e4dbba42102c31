"""``visearch-index review``: the cleaning review queue as one HTML page, and decisions.

    visearch-index review --catalog catalog.jsonl --work WORK
    visearch-index review --catalog catalog.jsonl --work WORK --accept 'merge:S001|S007'
    visearch-index review --catalog catalog.jsonl --work WORK --reject 'denoise:shop/S3_4.jpg'

Reads what the cleaning stages under ``WORK`` proposed (``dedup/report.json``: cross-SKU
duplicates; ``clean/removed.jsonl``: denoise removals; ``merge/report.json``: merged and
proposed SKU pairs), appends any ``--accept`` / ``--reject`` decisions to the decisions file
(default ``WORK/review/decisions.jsonl``) and writes the page (default
``WORK/review/index.html``). ``visearch-index rebuild`` reads the same decisions file.

Images come from the image store when the rows were read with one (``rebuild`` does;
``--store`` here): their thumbnails, written once beside the page (``thumbs/<md5>.jpg``), show
what cleaning saw even after a catalog file changed or moved. Rows without a stored image
link their catalog file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from index_builder.cmd_ingest import add_store_argument
from visearch.catalog import CatalogRow, read_manifest
from visearch.cleaning.review import (
    Decision,
    ReviewItem,
    append_decisions,
    denoise_items,
    duplicate_items,
    merge_items,
    read_decisions,
    render_page,
)
from visearch.errors import ManifestError
from visearch.fileio import atomic_open
from visearch.index.thumbs import make_thumbnail
from visearch.store import StoredImage, store_lookup

REVIEW_DIR = "review"
DECISIONS_FILE = "decisions.jsonl"
PAGE_FILE = "index.html"
THUMBS_DIR = "thumbs"


@dataclass(frozen=True)
class ReviewSummary:
    """The review page written: proposals of each kind, how many are pending and decided."""

    merge: int
    duplicate: int
    denoise: int
    pending: int
    decided: int
    page: Path


def decisions_path(work: Path) -> Path:
    """Where the pipeline keeps review decisions under a work directory."""
    return work / REVIEW_DIR / DECISIONS_FILE


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``review``."""
    p = sub.add_parser(
        "review",
        help="write the cleaning review page; record accept/reject decisions",
        description=__doc__.split("\n\n")[2],
    )
    p.add_argument("--catalog", type=Path, required=True, help="catalog.jsonl")
    p.add_argument("--work", type=Path, required=True,
                   help="the work directory of the cleaning stages (rebuild --work)")
    p.add_argument("--out", type=Path, help="page to write (default WORK/review/index.html)")
    p.add_argument("--decisions", type=Path,
                   help="decisions JSONL (default WORK/review/decisions.jsonl)")
    p.add_argument("--accept", action="append", default=[], metavar="ID",
                   help="accept an item (id as on the page), repeatable")
    p.add_argument("--reject", action="append", default=[], metavar="ID",
                   help="reject an item, repeatable")
    p.add_argument("--note", default="", help="a note stored with these decisions")
    p.add_argument("--lenient", action="store_true", help="skip bad catalog rows")
    add_store_argument(p)
    p.set_defaults(func=run_review)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def review_items(rows: list[CatalogRow], work: Path) -> list[ReviewItem]:
    """Every proposal the stages under ``work`` made (stages that did not run add none)."""
    images: dict[str, list[str]] = {}
    for r in rows:
        images.setdefault(r.sku, []).append(r.image)
    items: list[ReviewItem] = []
    merge = _read_json(work / "merge" / "report.json")
    if merge:
        items += merge_items(merge.get("candidates", []), images)
    dedup = _read_json(work / "dedup" / "report.json")
    if dedup:
        items += duplicate_items(dedup.get("cross_sku_detail", []))
    clean = _read_json(work / "clean" / "report.json")
    if clean:
        # Every removal denoising proposed, those a reviewer rejected included (kept).
        items += denoise_items(clean.get("removed_detail", []), images,
                               kept=clean.get("kept_by_review", []))
    return items


def write_review(
    rows: list[CatalogRow], catalog: Path, work: Path, *, out: Path | None = None,
    decisions: Path | None = None,
) -> ReviewSummary:
    """Write the review page of the stages under ``work`` over the ``catalog`` file's
    ``rows`` (default ``<work>/review/index.html``, with the decisions of ``decisions``,
    default ``<work>/review/decisions.jsonl``); returns its counts and path."""
    out = out or work / REVIEW_DIR / PAGE_FILE
    decided = read_decisions(decisions or decisions_path(work))
    items = review_items(rows, work)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent.resolve()

    paths = {r.image: r.path for r in rows}
    stored = {r.image: r.stored for r in rows if isinstance(r.stored, StoredImage)}

    def image_url(image: str) -> str:
        src = stored.get(image)
        if src is not None:  # content-addressed: an existing thumbnail is the right one
            thumb = out.parent / THUMBS_DIR / f"{src.md5}.jpg"
            if not thumb.is_file():
                thumb.parent.mkdir(exist_ok=True)
                with atomic_open(thumb, fsync=False) as f:
                    f.write(make_thumbnail(src))
            return f"{THUMBS_DIR}/{thumb.name}"
        path = Path(paths.get(image, catalog.parent / image)).resolve()
        return Path(os.path.relpath(path, base)).as_posix()

    command = f"visearch-index review --catalog {catalog} --work {work}"
    out.write_text(render_page(items, decided, image_url, command=command), encoding="utf-8")
    return ReviewSummary(
        merge=sum(i.kind == "merge" for i in items),
        duplicate=sum(i.kind == "duplicate" for i in items),
        denoise=sum(i.kind == "denoise" for i in items),
        pending=sum(i.id not in decided for i in items),
        decided=sum(i.id in decided for i in items),
        page=out,
    )


def run_review(args: argparse.Namespace) -> int:
    try:
        rows = read_manifest(args.catalog, strict=not args.lenient,
                             images=store_lookup(args.store)).rows
    except (ManifestError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    path = args.decisions or decisions_path(args.work)
    new = [Decision(i, "accept", args.note) for i in args.accept]
    new += [Decision(i, "reject", args.note) for i in args.reject]
    try:
        if new:
            append_decisions(path, new)
            print(f"review: {len(new)} decision(s) recorded in {path}; the next rebuild "
                  "applies them")
        summary = write_review(rows, args.catalog, args.work, out=args.out, decisions=path)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"review: {summary.merge} merges, {summary.duplicate} cross-SKU duplicates, "
          f"{summary.denoise} denoise removals; {summary.pending} pending, "
          f"{summary.decided} decided -> {summary.page}")
    return 0
