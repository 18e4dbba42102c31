"""Regenerate the gRPC Python modules from protos/ into server/_proto/ (``make proto``).

protoc writes ``visearch/v1/search_pb2.py`` importing ``from visearch.v1 import search_pb2``,
which would resolve to our own ``visearch`` library package. The modules are therefore
flattened into the ``server._proto`` package and that import is rewritten to a relative one
(the usual post-processing step for generated gRPC code living inside a package).

Usage: ``python scripts/gen_protos.py [--out DIR] [--check]``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
PROTOS = ["visearch/v1/search.proto"]
OUT = REPO / "server" / "_proto"
INIT = '"""Generated gRPC modules for protos/visearch/v1 (do not edit; `make proto`)."""\n'
_IMPORT = re.compile(r"^from visearch\.v1 import (\w+_pb2) as (\w+)$", re.MULTILINE)


def generate() -> dict[str, str]:
    """Run protoc; returns {file name: text} of the flattened, import-fixed modules."""
    from grpc_tools import protoc

    include = Path(protoc.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *PROTOS,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        files = {}
        for path in sorted(Path(tmp).rglob("*.py*")):
            text = path.read_text()
            files[path.name] = _IMPORT.sub(r"from . import \1 as \2", text)
    files["__init__.py"] = INIT
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when the committed modules differ from a fresh generation")
    args = parser.parse_args(argv)
    files = generate()
    if args.check:
        stale = [n for n, t in files.items()
                 if not (args.out / n).exists() or (args.out / n).read_text() != t]
        for name in stale:
            print(f"stale: {args.out / name}", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
