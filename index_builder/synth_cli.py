"""``visearch-synth``: generate the synthetic product world, or draw its contact sheet.

    visearch-synth --out DIR --skus N --seed S [--image-size 128 --workers 2 --shop-masks ...]
    visearch-synth sheet --world DIR --out sheet.png [--rows 8]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
from pathlib import Path

from visearch.imageio import image_files
from visearch.synth import generate_world, write_contact_sheet


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="visearch-synth",
        description="Generate a deterministic synthetic product world (catalog, user photos, "
        "detection scenes, ground truth). `visearch-synth sheet --help` draws a contact sheet.",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--skus", type=int, required=True, help="number of SKU ids")
    p.add_argument("--seed", type=int, required=True, help="random seed")
    p.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    p.add_argument("--shop-per-sku", type=int, default=4, help="shop images per SKU")
    p.add_argument("--photos-per-sku", type=int, default=1, help="user photos per SKU")
    p.add_argument("--scenes", type=int, default=None,
                   help="detection scenes (default max(200, skus))")
    p.add_argument("--dup-rate", type=float, default=0.1, help="near-duplicates per shop image")
    p.add_argument("--mislabel-rate", type=float, default=0.03,
                   help="fraction of shop images filed under a wrong SKU")
    p.add_argument("--split-rate", type=float, default=0.03,
                   help="fraction of SKUs whose product is also listed under other ids")
    p.add_argument("--colourway-rate", type=float, default=0.0,
                   help="probability that a look-alike family is a colourway family (one "
                   "product in several body colours); 0 keeps the default world")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="rendering processes")
    p.add_argument("--shop-masks", action="store_true",
                   help="also write each shop image's and user photo's drawn product mask "
                   "(a photo's: the visible part of its product) as masks/<stem>.png, "
                   "ground truth for cut-outs; other files are unchanged")
    p.add_argument("--photo-backgrounds", type=Path, default=None, metavar="DIR",
                   help="render the user photos on random crops of the .jpg/.png/.webp "
                   "photos in DIR (e.g. Debian's gnome-backgrounds) instead of procedural "
                   "clutter; the catalog is unchanged")
    p.add_argument("--contact-sheet", type=Path, default=None, metavar="PNG",
                   help="also write a contact sheet PNG")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _sheet_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="visearch-synth sheet",
        description="Draw shop images (green boxes) and user photos (red boxes) of a few SKUs, "
        "look-alike families first, into one PNG.",
    )
    p.add_argument("--world", type=Path, required=True, help="a generated world directory")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--rows", type=int, default=8, help="number of SKUs (rows)")
    return p


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished workers: on a shared machine
    images per CPU-second is the rate per core that wall-clock time cannot show."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "sheet":
        args = _sheet_parser().parse_args(argv[1:])
        try:
            path = write_contact_sheet(args.world, args.out, rows=args.rows)
        except ValueError as e:
            print(f"error: {e}")
            return 2
        print(f"wrote {path}")
        return 0
    parser = _generate_parser()
    args = parser.parse_args(argv)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    try:
        world = generate_world(
            args.out, skus=args.skus, seed=args.seed, image_size=args.image_size,
            shop_per_sku=args.shop_per_sku, photos_per_sku=args.photos_per_sku,
            scenes=args.scenes, dup_rate=args.dup_rate, mislabel_rate=args.mislabel_rate,
            split_rate=args.split_rate, workers=args.workers, progress=not args.quiet,
            shop_masks=args.shop_masks,
            photo_backgrounds=(image_files(args.photo_backgrounds, what="--photo-backgrounds")
                               if args.photo_backgrounds else []),
            colourway_rate=args.colourway_rate,
        )
    except ValueError as e:
        parser.error(str(e))
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    counts = world["counts"]
    print(f"world written to {args.out}")
    for key, value in counts.items():
        print(f"  {key:20s} {value}")
    rate = counts["images"] / elapsed
    print(f"  {counts['images']} images in {elapsed:.1f} s: {rate:.0f} images/s, "
          f"{rate / args.workers:.0f} images/s per worker ({args.workers} workers); "
          f"CPU {cpu:.1f} s: {counts['images'] / max(cpu, 1e-9):.0f} images per CPU-second")
    if args.contact_sheet is not None:
        print(f"contact sheet: {write_contact_sheet(args.out, args.contact_sheet)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
