"""Hostile inputs through a real ``visearch-serve`` child: the bounded run of benchmarks/fuzz.py."""

from __future__ import annotations

import io
import signal
from pathlib import Path

import grpc
import pytest
from PIL import Image
from test_server import build_world_index

from benchmarks.fuzz import (
    KINDS,
    FuzzCase,
    forged_png,
    generate_cases,
    passed,
    run_fuzz,
    spawn_server,
)
from server.client import SearchClient
from server.servicer import MAX_DETAILS
from visearch.index import IndexRoot

#: The server's message limit here: small, so the oversized cases stay cheap.
MAX_MESSAGE_MB = 1.0


@pytest.fixture(scope="module")
def fuzz_server(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server over a version that ships a (seeded, untrained) tiny RetinaNet: hostile
    images reach the detector through Detect, Search and Embed."""
    import torch

    from index_builder.cmd_index import BuildParams, EmbedOptions, build_index
    from visearch.detection.model import build_detector, save_detector

    root = tmp_path_factory.mktemp("fuzz_index") / "root"
    _, rows = build_world_index(tiny_world, root)
    torch.manual_seed(0)
    detector = root.parent / "detector.pt"
    save_detector(build_detector("tiny_fpn", sorted({r["category"] for r in rows}),
                                 min_size=64, max_size=96), detector)
    build_index(root, tiny_world / "catalog.jsonl", root.parent / "embedder.pt",
                BuildParams(k1=21), embed=EmbedOptions(progress=False), detector=detector)
    proc, target = spawn_server(root, max_message_mb=MAX_MESSAGE_MB, workers=2)
    try:
        with SearchClient(target, timeout=30) as client:
            client.wait_ready(30)
            info = client.index_info()
            assert info.has_detector and info.version == IndexRoot(root).current()
            categories = tuple(c.category for c in info.categories)
        yield proc, target, categories, tiny_world / rows[0]["image"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def test_generator_is_seeded_and_covers_every_kind() -> None:
    def summary(cases: list[FuzzCase]) -> list[tuple[str, str, bytes]]:
        return [(c.kind, c.method, c.request.SerializeToString()) for c in cases]

    a = list(generate_cases(2 * len(KINDS), seed=3, max_message_mb=0.01))
    b = list(generate_cases(2 * len(KINDS), seed=3, max_message_mb=0.01))
    c = list(generate_cases(2 * len(KINDS), seed=4, max_message_mb=0.01))
    assert summary(a) == summary(b)
    assert summary(a) != summary(c)
    assert [x.kind for x in a] == list(KINDS) * 2
    assert {x.method for x in a} == {"Search", "Detect", "Embed"}
    oversized = [x for x in a if x.kind == "oversized"]
    assert all(x.request.ByteSize() > 0.01 * 1024 * 1024 for x in oversized)


def test_forged_png_declares_the_size_in_few_bytes() -> None:
    data = forged_png(8_000, 9_000)  # 72 Mpx: under PIL's own bomb limit, over ours
    assert len(data) < 2_000
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (8_000, 9_000)


def test_hostile_inputs_get_clean_statuses(fuzz_server) -> None:
    proc, target, categories, photo = fuzz_server
    n = 20 * len(KINDS)  # 400: 20 of each kind
    report = run_fuzz(proc, target, generate_cases(
        n, seed=0, max_message_mb=MAX_MESSAGE_MB, categories=categories),
        timeout=20.0, warmup=100)

    assert report["n"] == n
    assert proc.poll() is None, "the server died"
    assert report["failures"] == {}, report["unexpected"]  # no crash/INTERNAL/UNKNOWN/hang
    # A good share went through the detector, on every RPC that runs it, and every route
    # answered hostile images with clean codes.
    routes = report["routes"]
    assert sum(sum(routes[r].values()) for r in routes if r == "Detect" or "(detector)" in r
               ) >= 0.5 * n
    for name in ("Detect", "Search (detector)", "Embed (detector)"):
        assert routes[name].get("OK", 0) > 0 and routes[name].get("INVALID_ARGUMENT", 0) > 0
        assert set(routes[name]) <= {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, name
    assert sum(sum(row.values()) for row in routes.values()) == n
    assert report["n_unexpected"] == 0, report["unexpected"]
    table = report["table"]
    assert set(table) == set(KINDS)
    # Corrupt or refused inputs are the caller's mistake, every time.
    for kind in ("header_only", "bomb_png", "zero_dims", "zero_bytes", "random_bytes",
                 "magic_random", "hint_and_all"):
        assert table[kind] == {"INVALID_ARGUMENT": 20}, (kind, table[kind])
    # Odd but valid images are served.
    for kind in ("valid", "image_1x1", "cmyk", "16bit", "animated", "odd_modes"):
        assert table[kind] == {"OK": 20}, (kind, table[kind])
    assert table["oversized"] == {"RESOURCE_EXHAUSTED": 20}
    # Damage is mostly caught; what decodes anyway is served, never an error.
    assert table["truncated"].get("INVALID_ARGUMENT", 0) > 0
    assert set(table["category"]) == {"OK", "INVALID_ARGUMENT"}
    assert passed(report), report["rss_kb"]

    with SearchClient(target, timeout=30) as client:  # still serving normally
        res = client.search(photo.read_bytes(), top_k=5)
    assert len(res.results) == 5


def test_long_caller_input_is_cut_from_the_status_message(fuzz_server) -> None:
    """Regression: an unknown 100,000-character category was echoed whole into the status
    message, a trailer over the client's 16 KiB limit, so the caller got
    RESOURCE_EXHAUSTED ("metadata size exceeds hard limit") instead of INVALID_ARGUMENT."""
    _, target, _, photo = fuzz_server
    with SearchClient(target, timeout=30) as client, pytest.raises(grpc.RpcError) as err:
        client.search(photo.read_bytes(), category="x" * 100_000)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown category" in err.value.details()
    assert len(err.value.details()) <= MAX_DETAILS
