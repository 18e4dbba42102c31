"""``visearch-index ingest``: validate a catalog and store its images in the LMDB store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from visearch.catalog import read_manifest
from visearch.errors import ManifestError
from visearch.store import ImageStore


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ingest``."""
    p = sub.add_parser(
        "ingest",
        help="validate a catalog.jsonl and store its images (idempotent, resumable)",
        description="Validate every row of a catalog and store each image once (by MD5) in "
        "an LMDB store. Re-running adds only what is missing.",
    )
    p.add_argument("--catalog", type=Path, required=True, help="catalog.jsonl")
    p.add_argument("--store", type=Path, required=True, help="LMDB store directory")
    p.add_argument(
        "--lenient",
        action="store_true",
        help="skip bad rows (written to <catalog>.rejects.jsonl) instead of failing",
    )
    p.set_defaults(func=run_ingest)


def run_ingest(args: argparse.Namespace) -> int:
    try:
        manifest = read_manifest(args.catalog, strict=not args.lenient)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with ImageStore(args.store) as store, tqdm(
        total=len(manifest.rows), desc="ingest", unit="img"
    ) as bar:
        try:
            report = store.ingest(manifest.rows, strict=not args.lenient, progress=bar.update)
        except ManifestError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        total_items, total_images = len(store), store.num_images
    print(
        f"ingest: {report.added_items} item(s) added, {report.present_items} already present, "
        f"{report.added_images} new image(s), {len(manifest.rejects) + len(report.failed)} "
        f"rejected; store holds {total_items} item(s), {total_images} image(s)"
    )
    return 0
