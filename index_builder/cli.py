"""``visearch-index``: the ops CLI for the offline pipeline and index versions.

Each subsystem contributes its subcommands from its own ``cmd_*`` module through
``register(subparsers)``, so no single file has to know every stage.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from visearch.errors import VisearchError

# The order here is the order of ``--help``.
_COMMAND_MODULES = (
    "index_builder.cmd_ingest",
    "index_builder.cmd_index",
    "index_builder.cmd_embedder",
    "index_builder.cmd_detector",
    "index_builder.cmd_scenes",
    "index_builder.cmd_clean",
    "index_builder.cmd_review",
    "index_builder.cmd_tag",
    "index_builder.cmd_rebuild",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visearch-index",
        description="Build, check, activate and roll back visearch indexes; run offline stages.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (VisearchError, ValueError, FileNotFoundError) as exc:
        # Bad input from the command line (a manifest, a path, an option the data cannot
        # satisfy): one readable line, not a traceback.
        logging.getLogger("visearch-index").debug("failed", exc_info=True)
        print(f"error: visearch-index {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
