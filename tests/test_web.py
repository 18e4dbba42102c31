"""The web page side of ``visearch-serve --http-port``, over HTTP against a real server.

The index is built by ``visearch-index build``'s own function from an image store, after
which a catalog file is overwritten: the page's thumbnails must be the store's images.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from index_builder.cmd_index import BuildParams, EmbedOptions, build_index
from index_builder.cmd_ingest import ingest_catalog
from server.client import SearchClient
from server.serve import RunningServer, ServeConfig
from visearch.embedding import build_embedder, save_embedder
from visearch.imageio import encode_jpeg
from visearch.index import IndexRoot, update_version
from visearch.index.thumbs import THUMB_SIDE, ThumbnailStore, make_thumbnail, open_thumbnails
from visearch.store import ImageStore

#: The catalog row whose file is overwritten after ingest.
CHANGED = 3


def build_web_index(world: Path, base: Path) -> tuple[Path, Path, list[dict]]:
    """Copy ``world``'s catalog, ingest it into a store, overwrite row ``CHANGED``'s file,
    then build an index (tiny untrained embedder, seed 0) from the store. Returns the index
    root, the store and the catalog rows."""
    catalog_dir = base / "catalog"
    catalog_dir.mkdir()
    shutil.copy(world / "catalog.jsonl", catalog_dir / "catalog.jsonl")
    shutil.copytree(world / "shop", catalog_dir / "shop")
    catalog = catalog_dir / "catalog.jsonl"
    rows = [json.loads(line) for line in catalog.read_text().splitlines()]
    store = base / "store"
    ingest_catalog(catalog, store)
    changed = catalog_dir / rows[CHANGED]["image"]
    changed.write_bytes(encode_jpeg(np.full((96, 96, 3), (200, 0, 200), np.uint8)))
    torch.manual_seed(0)
    weights = base / "embedder.pt"
    save_embedder(build_embedder("tiny", dim=64, input_size=64).eval(), weights)
    root = base / "root"
    build_index(root, catalog, weights, BuildParams(k1=21),
                embed=EmbedOptions(batch_size=128, progress=False), store=store)
    return root, store, rows


@pytest.fixture(scope="module")
def web_index(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory):
    return build_web_index(tiny_world, tmp_path_factory.mktemp("web_index"))


def start_web_server(root: Path, **kwargs) -> RunningServer:
    config = ServeConfig(index_root=root, port=0, http_port=0, use_detector=False,
                         max_message_mb=1.0, max_batch_size=4, **kwargs)
    return RunningServer(config).start()


@pytest.fixture(scope="module")
def server(web_index):
    running = start_web_server(web_index[0])
    yield running
    running.stop(grace=1.0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(server):
    with SearchClient(f"127.0.0.1:{server.port}", timeout=30) as c:
        c.wait_ready()
        yield c


def _shop_bytes(web_index, i: int) -> bytes:
    """Row ``i``'s image as ingested (the store's bytes, whatever the file holds now)."""
    _, store, rows = web_index
    with ImageStore(store, readonly=True) as st:
        md5 = next(m["md5"] for _, m in st.iter_items() if m["line"] == i + 1)
        return st.get_bytes(md5)


def _box_query(box: list[float]) -> str:
    return "&".join(f"{k}={v}" for k, v in zip(("x1", "y1", "x2", "y2"), box, strict=True))


def test_page_and_assets_are_served(http) -> None:
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and "/static/app.js" in page.text
    js = http.get("/static/app.js")
    assert js.status_code == 200 and "/api/search" in js.text
    # Nothing may come from another site: machines serving this can be offline.
    for asset in (page.text, js.text, http.get("/static/style.css").text):
        assert "http://" not in asset and "https://" not in asset


def test_search_upload_matches_grpc_and_thumbnails_come_from_the_store(
        http, grpc_client, web_index) -> None:
    root, _, rows = web_index
    i = 10
    image, box = _shop_bytes(web_index, i), rows[i]["bbox"]
    resp = http.post(f"/api/search?top_k=5&{_box_query(box)}", content=image,
                     headers={"content-type": "image/jpeg"})
    assert resp.status_code == 200, resp.text
    data = resp.json()
    expected = grpc_client.search(image, top_k=5, bbox=box)
    assert [r["sku"] for r in data["results"]] == [r.sku for r in expected.results]
    # The gallery holds this very crop: rank 1 even with an untrained model.
    assert data["results"][0]["sku"] == rows[i]["sku"]
    assert data["indexVersion"] == IndexRoot(root).current()
    assert data["category"]["category"] in {v["category"] for v in data["category"]["votes"]}
    version = data["indexVersion"]
    with ThumbnailStore(root / version / "thumbs.lmdb") as thumbs:
        for r in data["results"]:
            assert r["thumbnail"] == f"/thumbs/{version}/{r['itemId']}"
            got = http.get(r["thumbnail"])
            assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
            assert got.content == thumbs.get(int(r["itemId"]))
            assert max(Image.open(io.BytesIO(got.content)).size) <= THUMB_SIDE
        # Item ids are catalog row numbers: the changed row's thumbnail is the ingested
        # image's, not the file's new content.
        stored = _shop_bytes(web_index, CHANGED)
        assert thumbs.get(CHANGED) == make_thumbnail(stored)
        on_disk = (root.parent / "catalog" / rows[CHANGED]["image"]).read_bytes()
        assert thumbs.get(CHANGED) != make_thumbnail(on_disk)
        assert len(thumbs) == len(rows)


def test_multipart_upload_and_box(http, grpc_client, web_index) -> None:
    _, _, rows = web_index
    i = 20
    image = _shop_bytes(web_index, i)
    box = rows[i]["bbox"]
    resp = http.post(f"/api/search?top_k=3&rerank=0&{_box_query(box)}",
                     files={"image": ("photo.jpg", image, "image/jpeg")})
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["mainObject"]["source"] == "request"
    assert [data["mainObject"]["box"][k] for k in ("x1", "y1", "x2", "y2")] == box
    assert data["reranked"] is False
    expected = grpc_client.search(image, top_k=3, bbox=box, rerank=False)
    assert [r["sku"] for r in data["results"]] == [r.sku for r in expected.results]


@pytest.mark.parametrize("body", [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\0" * 64])
def test_bad_upload_gets_the_servers_message(http, grpc_client, body: bytes) -> None:
    resp = http.post("/api/search", content=body)
    assert resp.status_code == 400
    with pytest.raises(grpc.RpcError) as err:
        grpc_client.search(body)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert resp.json() == {"error": err.value.details(), "code": "INVALID_ARGUMENT"}


def test_bad_requests_are_explained(http, web_index, server) -> None:
    image = _shop_bytes(web_index, 0)
    half_box = http.post("/api/search?x1=1&y1=2", content=image)
    assert half_box.status_code == 400 and "all four of x1, y1, x2, y2" in half_box.json()["error"]
    bad_k = http.post("/api/search?top_k=ten", content=image)
    assert bad_k.status_code == 400 and "top_k='ten'" in bad_k.json()["error"]
    too_many = http.post("/api/search?top_k=100000", content=image)
    assert too_many.status_code == 400 and "top_k" in too_many.json()["error"]
    no_field = http.post("/api/search", files={"photo": ("a.jpg", image, "image/jpeg")})
    assert no_field.status_code == 400 and "'image'" in no_field.json()["error"]
    huge = http.post("/api/search", content=b"\0" * (2 << 20))
    assert huge.status_code == 413 and "larger than this server takes" in huge.json()["error"]
    # The server is still up and answering.
    assert http.post("/api/search", content=image).status_code == 200


def test_detect_endpoint(http, web_index) -> None:
    image = _shop_bytes(web_index, 0)
    data = http.post("/api/detect", content=image).json()
    with Image.open(io.BytesIO(image)) as im:
        assert (data["width"], data["height"]) == im.size
    assert data["detections"] == [] and data["mainObject"]["fallback"] is True


def test_health_panel_data(http, web_index, server) -> None:
    root, _, rows = web_index
    info = http.get("/api/info").json()
    assert info["health"] == {"server": "SERVING", "service": "SERVING"}
    index = info["index"]
    assert index["version"] == IndexRoot(root).current() == server.holder.version
    assert int(index["ntotal"]) == len(rows) and index["dim"] == 64
    counts = {c["category"]: int(c["count"]) for c in index["categories"]}
    expected: dict[str, int] = {}
    for r in rows:
        expected[r["category"]] = expected.get(r["category"], 0) + 1
    assert counts == expected
    assert index["hasDetector"] is False and index["hasThumbnails"] is True
    assert index["builtAt"].endswith("Z")
    assert http.get("/api/health").json() == {"server": "SERVING", "service": "SERVING"}


def test_thumbnail_not_found(http, server) -> None:
    version = server.holder.version
    assert http.get(f"/thumbs/{version}/999999").status_code == 404
    for name in ("v9999-20260101T000000", "..", "%2e%2e"):
        resp = http.get(f"/thumbs/{name}/0")
        assert resp.status_code == 404


def test_update_version_carries_thumbnails(web_index, tmp_path: Path) -> None:
    root, store, rows = web_index
    work = tmp_path / "root"
    shutil.copytree(root, work)
    base = IndexRoot(work).open()
    added = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    vec = base.index.reconstruct(np.array([0]))
    new = update_version(work, base, add_xb=vec,
                         add_items=[{"sku": "NEW", "category": rows[0]["category"]}],
                         remove_ids=np.array([1]), add_thumbnails=[added], activate=False)
    with open_thumbnails(base.path) as old, open_thumbnails(new.path) as thumbs:
        next_id = int(base.manifest["next_id"])
        assert thumbs.get(next_id) == added and thumbs.get(1) is None
        assert thumbs.get(0) == old.get(0) and len(thumbs) == len(old)
    assert new.verify(sample=16).ok
    with pytest.raises(ValueError, match="2 thumbnails for 1 added items"):
        update_version(work, base, add_xb=vec, add_items=[{"sku": "X", "category": "bag"}],
                       add_thumbnails=[added, added], activate=False)
    # Without thumbnails for the added items, the kept ones are still carried.
    bare = update_version(work, base, add_xb=vec, activate=False,
                          add_items=[{"sku": "X", "category": rows[0]["category"]}])
    with open_thumbnails(bare.path) as thumbs:
        assert len(thumbs) == len(rows) and thumbs.get(next_id) is None


def test_stop_closes_the_page(web_index) -> None:
    running = start_web_server(web_index[0])
    url = f"http://127.0.0.1:{running.http_port}/api/health"
    assert httpx.get(url, timeout=10).status_code == 200
    running.stop(grace=1.0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=5)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_page_works_beside_a_tls_port(tmp_path: Path, web_index) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"],
        check=True, capture_output=True, timeout=60)
    running = start_web_server(web_index[0], tls_cert=cert, tls_key=key)
    try:
        # The page reaches gRPC through its own socket; the TCP port speaks TLS only.
        base = f"http://127.0.0.1:{running.http_port}"
        info = httpx.get(f"{base}/api/info", timeout=30).json()
        assert info["health"]["service"] == "SERVING"
        assert int(info["index"]["ntotal"]) == len(web_index[2])
        found = httpx.post(f"{base}/api/search?top_k=3", content=_shop_bytes(web_index, 0),
                           timeout=30)
        assert found.status_code == 200 and len(found.json()["results"]) == 3
        with SearchClient(f"127.0.0.1:{running.port}", timeout=5) as plain, \
                pytest.raises(grpc.RpcError):
            plain.index_info()
    finally:
        running.stop(grace=0.5)
