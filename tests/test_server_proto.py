"""The committed generated modules are what scripts/gen_protos.py makes from the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from server._proto import search_pb2, search_pb2_grpc

REPO = Path(__file__).resolve().parent.parent


def test_committed_modules_match_a_fresh_generation() -> None:
    proc = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"run `make proto`: {proc.stderr}"


def test_generated_modules_are_our_package_not_the_library() -> None:
    # protoc's `from visearch.v1 import search_pb2` would hit the visearch library package.
    grpc_src = Path(search_pb2_grpc.__file__).read_text()
    assert "from visearch.v1 import" not in grpc_src
    assert "from . import search_pb2" in grpc_src
    assert search_pb2.DESCRIPTOR.name == "visearch/v1/search.proto"
    assert search_pb2.DESCRIPTOR.package == "visearch.v1"
    methods = [m.name for m in search_pb2.DESCRIPTOR.services_by_name["VisualSearch"].methods]
    assert methods == ["Search", "Detect", "Embed", "GetIndexInfo", "ReloadIndex", "Describe",
                       "Cutout"]
