"""``visearch-index ingest``: validate a catalog and store its images in the LMDB store.

:func:`ingest_catalog` is the typed stage ``rebuild`` calls; the subcommand is a thin
wrapper over it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from visearch.catalog import read_manifest
from visearch.errors import ManifestError
from visearch.parallel import Runner, make_runner
from visearch.progress import progress_bar
from visearch.store import ImageStore


@dataclass(frozen=True)
class IngestResult:
    """What one ingest did, and what the store holds after it."""

    added_items: int
    present_items: int
    added_images: int
    #: catalog rows rejected by the manifest reader (lenient) or by decoding
    rejected: int
    total_items: int
    total_images: int

    def line(self) -> str:
        """The one-line summary ``ingest`` prints."""
        return (f"ingest: {self.added_items} item(s) added, {self.present_items} already "
                f"present, {self.added_images} new image(s), {self.rejected} rejected; store "
                f"holds {self.total_items} item(s), {self.total_images} image(s)")


def ingest_catalog(catalog: Path, store: Path, *, lenient: bool = False,
                   runner: Runner | None = None) -> IngestResult:
    """Validate every row of ``catalog`` and store each image once (by MD5) in the LMDB
    store at ``store`` (created); idempotent, a re-run adds only what is missing. Shows a
    progress bar (:func:`visearch.progress.progress_bar`).

    Raises:
        ManifestError: a bad row (strict, i.e. not ``lenient``) or an unreadable catalog.
    """
    manifest = read_manifest(catalog, strict=not lenient)
    with ImageStore(store) as st, progress_bar(
        total=len(manifest.rows), desc="ingest", unit="img"
    ) as bar:
        report = st.ingest(manifest.rows, strict=not lenient, progress=bar.update,
                           runner=runner)
        total_items, total_images = len(st), st.num_images
    return IngestResult(
        added_items=report.added_items, present_items=report.present_items,
        added_images=report.added_images,
        rejected=len(manifest.rejects) + len(report.failed),
        total_items=total_items, total_images=total_images,
    )


def add_store_argument(p: argparse.ArgumentParser) -> None:
    """``--store``: the subcommands after ``ingest`` read the catalog's images from it."""
    p.add_argument(
        "--store", type=Path, default=None,
        help="the LMDB image store 'ingest' wrote: read the catalog's images from it (as "
        "ingested and validated) instead of from their files",
    )


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
    from index_builder.cmd_index import add_scale_arguments  # cmd_index imports this module

    add_scale_arguments(p)
    p.set_defaults(func=run_ingest)


def run_ingest(args: argparse.Namespace) -> int:
    runner = make_runner(args.ray, workers=None) if args.ray else None
    try:
        result = ingest_catalog(args.catalog, args.store, lenient=args.lenient, runner=runner)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if runner is not None:
            runner.close()
    print(result.line())
    return 0
