"""End-to-end: the VisualSearch server on a real loopback port over a tiny world's index."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from server.client import SearchClient, format_response
from server.client import main as query_main
from server.serve import RunningServer, ServeConfig
from visearch.embedding import build_embedder, embed_items, save_embedder
from visearch.index import IndexRoot, build_version

REPO = Path(__file__).resolve().parent.parent
TOKEN = "s3cret"


def build_world_index(world: Path, root: Path, *, versions: int = 1) -> tuple[list[str], list]:
    """Index the world's catalog crops with a tiny untrained embedder; ``versions`` copies."""
    torch.manual_seed(0)
    model = build_embedder("tiny", dim=64, input_size=64).eval()
    weights = root.parent / "embedder.pt"
    save_embedder(model, weights)
    rows = [json.loads(line) for line in (world / "catalog.jsonl").read_text().splitlines()]
    items = [(i, str(world / r["image"]), r.get("bbox")) for i, r in enumerate(rows)]
    ids, feats = zip(*embed_items(model, items, batch_size=128), strict=True)
    xb, ids = np.concatenate(feats), np.concatenate(ids)
    meta = [{"sku": r["sku"], "category": r["category"], "image_key": r["image"],
             "title": r.get("title", "")} for r in rows]
    names = []
    for _ in range(versions):
        # k1 = 21: the graph keeps each item itself, re-ranking needs 20 others.
        names.append(build_version(root, xb, ids, meta, weights, k1=21).version)
    return names, rows


@pytest.fixture(scope="module")
def world_index(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("server_index")
    root = base / "root"
    names, rows = build_world_index(tiny_world, root, versions=2)
    IndexRoot(root).activate(names[0])
    truth = json.loads((tiny_world / "truth.json").read_text())
    mislabelled = {m["image"] for m in truth["mislabelled"]}
    return root, names, rows, mislabelled


@pytest.fixture(scope="module")
def server(world_index):
    root, names, _, _ = world_index
    config = ServeConfig(index_root=root, port=0, admin_token=TOKEN, use_detector=False,
                         max_message_mb=2.0, workers=8, max_batch_size=4)
    running = RunningServer(config).start()
    yield running
    running.stop(grace=1.0)


@pytest.fixture(scope="module")
def client(server):
    with SearchClient(f"127.0.0.1:{server.port}", admin_token=TOKEN, timeout=30) as c:
        c.wait_ready()
        yield c


def _shop(world: Path, row: dict) -> tuple[bytes, list[float]]:
    return (world / row["image"]).read_bytes(), row["bbox"]


def test_health_reflection_and_index_info(client, world_index) -> None:
    _, names, rows, _ = world_index
    assert client.health() == "SERVING"
    assert client.health("") == "SERVING"
    assert client.list_services() == ["grpc.health.v1.Health",
                                      "grpc.reflection.v1alpha.ServerReflection",
                                      "visearch.v1.VisualSearch"]
    info = client.index_info()
    assert info.ntotal == len(rows) and info.dim == 64 and not info.has_detector
    assert sum(c.count for c in info.categories) == len(rows)
    assert json.loads(info.manifest_json)["counts"]["total"] == len(rows)
    assert info.version in names


@pytest.mark.parametrize("rerank", [True, False])
def test_shop_images_find_their_own_sku(client, world_index, tiny_world, rerank) -> None:
    _, _, rows, mislabelled = world_index
    sample = [r for r in rows[::7] if r["image"] not in mislabelled]
    wrong = []
    for row in sample:
        image, bbox = _shop(tiny_world, row)
        res = client.search(image, top_k=5, bbox=bbox, rerank=rerank)
        skus = [r.sku for r in res.results]
        assert len(skus) == len(set(skus)) == 5  # one result per SKU
        scores = [r.score for r in res.results]
        assert scores == sorted(scores, reverse=True)
        assert res.reranked == rerank
        if skus[0] != row["sku"]:
            wrong.append(row["image"])
    # The exact image is in the gallery: rank 1 for all, even with an untrained model.
    assert not wrong, f"{len(wrong)}/{len(sample)} shop images missed: {wrong[:5]}"


def test_response_fields(client, world_index, tiny_world) -> None:
    _, _, rows, _ = world_index
    image, bbox = _shop(tiny_world, rows[0])
    res = client.search(image, top_k=3, bbox=bbox)
    assert res.main_object.source == "request" and not res.main_object.fallback
    assert [res.main_object.box.x1, res.main_object.box.y2] == [bbox[0], bbox[3]]
    assert res.category.category == rows[0]["category"]
    assert res.category.source == "neighbours"
    assert res.category.votes[0].category == res.category.category
    assert sum(v.neighbours for v in res.category.votes) == pytest.approx(1.0, abs=1e-5)
    top = res.results[0]
    assert (top.item_id, top.image_key, top.title) == (0, rows[0]["image"], rows[0]["title"])
    assert top.similarity == pytest.approx(1.0, abs=1e-4)
    stages = [t.stage for t in res.timings]
    assert stages == ["decode", "detect", "embed", "search_all", "vote", "search_category",
                      "rerank", "group", "total"]
    # The hint overrides the vote; whole-image search without a bbox also answers.
    other = next(r["category"] for r in rows if r["category"] != rows[0]["category"])
    hinted = client.search(image, top_k=3, bbox=bbox, category=other)
    assert hinted.category.source == "hint"
    assert {r.category for r in hinted.results} == {other}
    whole = client.search(image, top_k=2)
    assert whole.main_object.source == "image" and len(whole.results) == 2
    emb = client.embed(image, bbox=bbox)
    assert len(emb.embedding) == 64
    assert np.linalg.norm(emb.embedding) == pytest.approx(1.0, abs=1e-4)
    det = client.detect(image)
    assert (det.width, det.height) == (96, 96) and len(det.detections) == 0


def _png_with_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


BAD_IMAGES = {
    "empty": b"",
    "not an image": b"hello, this is not a photo",
    "bomb": _png_with_size(30_000, 30_000),
    "10000x10000": _jpeg_with_size(10_000, 10_000),
}


@pytest.mark.parametrize("name", [*BAD_IMAGES, "truncated"])
def test_bad_images_are_invalid_argument(client, world_index, tiny_world, name) -> None:
    _, _, rows, _ = world_index
    good, bbox = _shop(tiny_world, rows[1])
    image = good[: len(good) // 2] if name == "truncated" else BAD_IMAGES[name]
    with pytest.raises(grpc.RpcError) as err:
        client.search(image, top_k=3)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details()
    assert client.search(good, top_k=1, bbox=bbox).results[0].sku == rows[1]["sku"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bbox": [50, 50, 500, 90]}, "outside"),
        ({"bbox": [-40, 10, 20, 30]}, "outside"),
        ({"bbox": [30, 30, 30, 60]}, "empty"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1_000_000}, "top_k"),
        ({"category": "spaceship"}, "unknown category"),
        ({"category": "bag", "all_categories": True}, "exclude each other"),
    ],
)
def test_bad_arguments_are_invalid_argument(client, world_index, tiny_world, kwargs,
                                            message) -> None:
    _, _, rows, _ = world_index
    good, bbox = _shop(tiny_world, rows[2])
    with pytest.raises(grpc.RpcError) as err:
        client.search(good, **kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert client.search(good, top_k=1, bbox=bbox).results[0].sku == rows[2]["sku"]


def test_all_categories_option_reaches_the_pipeline(client, world_index, tiny_world) -> None:
    _, _, rows, _ = world_index
    image, bbox = _shop(tiny_world, rows[5])
    voted = client.search(image, top_k=40, bbox=bbox)
    everywhere = client.search(image, top_k=40, bbox=bbox, all_categories=True)
    assert {r.category for r in voted.results} == {voted.category.category}
    assert len({r.category for r in everywhere.results}) > 1
    assert everywhere.category.category == voted.category.category
    assert everywhere.results[0].sku == rows[5]["sku"]


def test_oversized_payload_and_deadline(client, world_index, tiny_world) -> None:
    _, _, rows, _ = world_index
    good, bbox = _shop(tiny_world, rows[3])
    with pytest.raises(grpc.RpcError) as err:
        client.search(os.urandom(3 * 1024 * 1024))  # the server takes 2 MB
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as err:
        client.search(good, bbox=bbox, timeout=1e-4)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.search(good, top_k=1, bbox=bbox).results[0].sku == rows[3]["sku"]


def test_reload_needs_the_token(client, server) -> None:
    for token in ("", "nope"):
        with pytest.raises(grpc.RpcError) as err:
            client.reload(token=token)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with SearchClient(f"127.0.0.1:{server.port}") as anonymous, \
            pytest.raises(grpc.RpcError) as err:
        anonymous.reload()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_hot_reload_under_load_drops_nothing(client, server, world_index, tiny_world) -> None:
    root, names, rows, mislabelled = world_index
    queries = [_shop(tiny_world, r) + (r["sku"],) for r in rows[:40]
               if r["image"] not in mislabelled]
    # A third version whose index file is corrupt: loading it must fail cleanly.
    broken = root / (names[1] + "-broken")
    shutil.copytree(root / names[1], broken)
    for f in (broken / "index").iterdir():
        if f.suffix == ".faiss" or "faiss" in f.name:
            f.write_bytes(f.read_bytes()[:100])

    stop = threading.Event()
    failures: list[str] = []
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def hammer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            image, bbox, sku = queries[int(rng.integers(len(queries)))]
            try:
                res = client.search(image, top_k=3, bbox=bbox)
                ok = res.results[0].sku == sku
                with lock:
                    seen[res.index_version] = seen.get(res.index_version, 0) + 1
                    if not ok:
                        failures.append(f"wrong sku for {sku}")
            except grpc.RpcError as e:
                with lock:
                    failures.append(f"{e.code().name}: {e.details()}")

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        assert server.holder.version == names[0]
        IndexRoot(root).activate(names[1])
        res = client.reload()
        assert (res.previous_version, res.version, res.changed) == (names[0], names[1], True)
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as err:
            client.reload(broken.name)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert names[1] in err.value.details()
        time.sleep(0.3)
        res = client.reload(names[0])
        assert (res.version, res.changed) == (names[0], True)
        assert not client.reload(names[0]).changed
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
        shutil.rmtree(broken)
        IndexRoot(root).activate(names[0])
    assert not failures, failures[:5]
    assert seen.get(names[0], 0) > 0 and seen.get(names[1], 0) > 0, seen
    assert server.holder.version == names[0]


def test_watch_picks_up_current(world_index, tmp_path) -> None:
    # A copy of the root: LMDB refuses to open one file twice in a process, and the module's
    # server holds the original open.
    root = tmp_path / "root"
    shutil.copytree(world_index[0], root)
    names = world_index[1]
    config = ServeConfig(index_root=root, port=0, use_detector=False, watch=True,
                         watch_interval_s=0.1, rerank=False)
    running = RunningServer(config).start()
    try:
        with SearchClient(f"127.0.0.1:{running.port}") as c:
            assert c.index_info().version == names[0]
            IndexRoot(root).activate(names[1])
            deadline = time.monotonic() + 20
            while c.index_info().version != names[1] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert c.index_info().version == names[1]
            with pytest.raises(grpc.RpcError) as err:  # no token configured
                c.reload(token="x")
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        running.stop(grace=0.5)


def test_query_cli_table_and_json(server, world_index, tiny_world, capsys) -> None:
    _, _, rows, _ = world_index
    photo = tiny_world / rows[4]["image"]
    box = ",".join(str(v) for v in rows[4]["bbox"])
    target = f"127.0.0.1:{server.port}"
    assert query_main([str(photo), "--server", target, "--top-k", "3", "--bbox", box]) == 0
    out = capsys.readouterr().out.splitlines()
    first = out[next(i for i, line in enumerate(out) if line.startswith("----")) + 1]
    assert first.split()[:2] == ["1", rows[4]["sku"]]
    assert out[-1].startswith("timings (ms)")
    assert query_main([str(photo), "--server", target, "--top-k", "2", "--bbox", box,
                       "--json", "--no-rerank"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["results"][0]["sku"] == rows[4]["sku"] and len(data["results"]) == 2
    assert query_main([str(photo), "--server", target, "--category", "nope"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    with SearchClient(target) as c:
        assert "rank" in format_response(c.search(photo.read_bytes(), top_k=1))


def test_serve_main_stops_on_sigterm(world_index) -> None:
    root, _, _, _ = world_index
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.serve", "--index-root", str(root), "--port", "0",
         "--no-detector", "--no-rerank", "--grace", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, proc.stderr.read() if proc.poll() is not None else line
        port = int(line.rsplit(":", 1)[1])
        with SearchClient(f"127.0.0.1:{port}") as c:
            assert c.health() == "SERVING"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
