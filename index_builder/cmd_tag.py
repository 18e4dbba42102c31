"""``visearch-index tag``: fill a catalog's missing categories and attributes from the
embedder's heads, into a NEW manifest.

    visearch-index tag --catalog catalog.jsonl --model embedder.pt --out tagged.jsonl
                       [--min-score 0.5] [--decisions review/decisions.jsonl]

Each row without a category (absent or empty) or without one of the model's attributes is
embedded (cropped to its ``bbox`` when it has one) and the heads' most probable value fills
the gap:

- a missing **category** is always written (a catalog row needs one), with its score;
- a missing **attribute** is written when its probability is at least ``--min-score``, or
  when a reviewer accepted that row's tags (``tag:<image>`` in ``--decisions``);
- every row with a prediction under ``--min-score`` goes to the review queue
  (:func:`visearch.cleaning.review.tag_items`), whose page is written beside the output;
  a rejected row keeps its attributes missing.

Values the catalog already has are never replaced. The scores go to ``<out>.tags.jsonl``
(one line per tagged row: ``{"line", "image", "sku", "fields": {name: {"value", "score",
"written"}}, "review"}``; the manifest format has no score field). The input catalog is
never rewritten: ``--out`` must be another file, written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from visearch.catalog import CatalogRow, iter_lines, parse_row, write_manifest
from visearch.cleaning.review import read_decisions, render_page, tag_items
from visearch.device import choose_device
from visearch.embedding import embed_arrays_with_heads, load_crop, load_embedder
from visearch.embedding.heads import top_k_prediction
from visearch.errors import ManifestError
from visearch.fileio import atomic_open

#: a stand-in category for validating rows that have none (never written out)
_MISSING = "\x00missing"


@dataclass(frozen=True)
class TagSummary:
    """What ``tag`` did: rows read, rows with something missing, fields written, rows sent
    to review, bad rows skipped, and the files written."""

    rows: int
    incomplete: int
    written: int
    review: int
    skipped: int
    out: Path
    scores: Path
    page: Path


def read_incomplete_catalog(
    path: Path, *, lenient: bool = False
) -> tuple[list[tuple[CatalogRow, bool]], list[tuple[int, str]]]:
    """The rows of a catalog whose ``category`` may be absent or empty (validated like any
    manifest row otherwise), each with whether its category is missing; and the bad lines
    ``(line, reason)`` skipped when ``lenient`` (else the first raises ``ManifestError``)."""
    rows: list[tuple[CatalogRow, bool]] = []
    bad: list[tuple[int, str]] = []
    root = path.parent.resolve()
    for number, text in iter_lines(path):
        try:
            obj = json.loads(text)
            missing = isinstance(obj, dict) and not str(obj.get("category") or "").strip()
            if missing:
                obj = {**obj, "category": _MISSING}
            rows.append((parse_row(obj, line=number, root=root), missing))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            if not lenient:
                raise ManifestError(str(exc), line=number, path=str(path)) from None
            bad.append((number, str(exc)))
    return rows, bad


def tag_catalog(
    catalog: Path, model_path: Path, out: Path, *, min_score: float = 0.5,
    decisions: Path | None = None, review_page: Path | None = None, lenient: bool = False,
    batch_size: int = 32, device: str | None = None,
) -> TagSummary:
    """Fill the missing categories/attributes of ``catalog`` into the new manifest ``out``
    (see the module docstring). Raises ``ValueError`` when ``out`` is the input, the model
    has no heads, or ``min_score`` is outside [0, 1]; ``ManifestError`` on a bad row unless
    ``lenient``."""
    if not 0 <= min_score <= 1:
        raise ValueError(f"--min-score must be in [0, 1], got {min_score}")
    if out.resolve() == catalog.resolve() or (out.exists() and os.path.samefile(out, catalog)):
        raise ValueError(f"--out {out} is the input catalog; tag writes a new manifest and "
                         "never rewrites its input: choose another path")
    model = load_embedder(model_path, device=choose_device(device))
    if model.heads is None:
        raise ValueError(f"{model_path} has no category/attribute heads: train it with "
                         "--category-weight / --attribute-weight > 0")
    heads = model.heads
    rows, bad = read_incomplete_catalog(catalog, lenient=lenient)
    accepted = {d.subjects[0]: d.decision for d in read_decisions(decisions).values()
                if d.kind == "tag"}

    todo = [i for i, (r, missing) in enumerate(rows)
            if (missing and heads.category is not None)
            or any(a not in r.attributes for a in heads.attributes)]
    logits: dict[str, np.ndarray] = {}
    if todo:
        crops = [load_crop(rows[i][0].source, rows[i][0].bbox) for i in todo]
        _, logits = embed_arrays_with_heads(model, crops, batch_size=batch_size)

    records: list[dict[str, Any]] = []
    written = 0
    out_rows: list[CatalogRow] = []
    position = {i: j for j, i in enumerate(todo)}
    for i, (row, missing) in enumerate(rows):
        if i not in position:
            out_rows.append(row)
            continue
        j = position[i]
        decision = accepted.get(row.image)
        fields: dict[str, dict[str, Any]] = {}
        category = row.category
        if missing and heads.category is not None:
            pred = top_k_prediction(logits["category"][j], heads.categories, 1)
            category = pred.values[0]
            fields["category"] = {"value": category, "score": pred.scores[0], "written": True}
        attributes = dict(row.attributes)
        for name, values in heads.attributes.items():
            if name in attributes:
                continue
            pred = top_k_prediction(logits[f"attr.{name}"][j], values, 1)
            write = (pred.scores[0] >= min_score or decision == "accept") and (
                decision != "reject")
            fields[name] = {"value": pred.values[0], "score": pred.scores[0], "written": write}
            if write:
                attributes[name] = pred.values[0]
        written += sum(f["written"] for f in fields.values())
        out_rows.append(replace(row, category=category, attributes=attributes))
        review = any(f["score"] < min_score for f in fields.values())
        records.append({"line": row.line, "image": row.image, "sku": row.sku,
                        "fields": fields, "review": review})
    if any(r.category == _MISSING for r in out_rows):  # a row without category, no head
        raise ValueError(f"{model_path} has no category head but rows of {catalog} lack a "
                         "category")

    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(out, out_rows)
    scores = out.with_name(out.stem + ".tags.jsonl")
    with atomic_open(scores, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    page = review_page or out.parent / "review_tag" / "index.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    items = tag_items([r for r in records if r["review"]])
    paths = {r.image: r.path for r, _ in rows}
    base = page.parent.resolve()

    def image_url(image: str) -> str:
        return Path(os.path.relpath(paths.get(image, catalog.parent / image), base)).as_posix()

    command = f"visearch-index review --catalog {catalog} --work WORK"
    with atomic_open(page, "w") as f:
        f.write(render_page(items, read_decisions(decisions), image_url,
                            title="visearch auto-tag review", command=command))
    return TagSummary(rows=len(rows), incomplete=len(todo), written=written,
                      review=len(items), skipped=len(bad), out=out, scores=scores, page=page)


def cmd_tag(args: argparse.Namespace) -> int:
    s = tag_catalog(args.catalog, args.model, args.out, min_score=args.min_score,
                    decisions=args.decisions, review_page=args.review_page,
                    lenient=args.lenient, batch_size=args.batch_size, device=args.device)
    print(f"tag: {s.rows} rows, {s.incomplete} with missing fields, {s.written} values "
          f"written, {s.review} rows to review, {s.skipped} bad rows skipped -> {s.out} "
          f"(scores {s.scores}, review page {s.page})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tag``."""
    p = sub.add_parser("tag", help="fill missing categories/attributes into a new manifest",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--catalog", type=Path, required=True, help="catalog.jsonl (read only)")
    p.add_argument("--model", type=Path, required=True,
                   help="an embedder with heads (embedder.pt, e.g. an index version's)")
    p.add_argument("--out", type=Path, required=True, help="the new manifest to write")
    p.add_argument("--min-score", type=float, default=0.5,
                   help="write an attribute at this probability or above; rows with a "
                   "lower one go to review")
    p.add_argument("--decisions", type=Path, help="review decisions JSONL (tag:<image> items)")
    p.add_argument("--review-page", type=Path,
                   help="review page to write (default <out dir>/review_tag/index.html)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", help="torch device (default: cuda when available)")
    p.add_argument("--lenient", action="store_true", help="skip bad rows (reported)")
    p.set_defaults(func=cmd_tag)
