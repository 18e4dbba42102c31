"""``visearch-bench``: the analysts' benchmarks (recall reports, gRPC load tests) and the
reliability ones (fuzz, crash, soak)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module with add_arguments(parser) and an entry(args) -> int, help[, the
# entry's name when it is not ``run``])
_COMMANDS: dict[str, tuple[str, ...]] = {
    "recall": (
        "benchmarks.recall",
        "Recall@K, mAP, NDCG, category accuracy and ablations over a labelled query set",
    ),
    "latency": (
        "benchmarks.latency",
        "gRPC load generator: p50/p95/p99 latency, QPS and errors at several concurrencies",
    ),
    "fuzz": (
        "benchmarks.fuzz",
        "Hostile inputs through real gRPC: status code per input, no crash/INTERNAL, flat RSS",
    ),
    "crash": (
        "benchmarks.crash",
        "kill -9 at random points of index rebuild/add: the active version verifies and "
        "serves, a re-run completes",
    ),
    "soak": (
        "benchmarks.soak",
        "Open-loop load at a fraction of the maximum QPS with hot index swaps: failed "
        "requests and memory",
        "report_and_exit_code",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visearch-bench", description="Recall and latency benchmarks for visearch."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text, *entry) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(func=getattr(mod, entry[0] if entry else "run"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
