"""Describe, Cutout and the understanding fields of Search, over a real loopback port, on an
index whose embedder carries category and attribute heads; values are checked against the
heads run in-process and against a photo's own alpha."""

from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from server.client import SearchClient
from server.client import main as query_main
from server.serve import RunningServer, ServeConfig
from visearch.embedding import (
    TaskHeads,
    build_embedder,
    embed_arrays_with_heads,
    embed_items,
    load_crop,
    save_embedder,
)
from visearch.embedding.heads import top_k_prediction
from visearch.index import IndexRoot, build_version

ATTRS = ("color", "pattern")


@pytest.fixture(scope="module")
def indexed(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory):
    """A version of the world's catalog embedded by a tiny model with (seeded) heads."""
    base = tmp_path_factory.mktemp("understanding_index")
    rows = [json.loads(line) for line in (tiny_world / "catalog.jsonl").read_text().splitlines()]
    torch.manual_seed(0)
    model = build_embedder("tiny", dim=32, input_size=64).eval()
    categories = sorted({r["category"] for r in rows})
    values = {a: sorted({r["attributes"][a] for r in rows}) for a in ATTRS}
    model.set_heads(TaskHeads(32, categories, values))
    weights = base / "embedder.pt"
    save_embedder(model, weights)
    items = [(i, str(tiny_world / r["image"]), r.get("bbox")) for i, r in enumerate(rows)]
    ids, feats = zip(*embed_items(model, items, batch_size=128), strict=True)
    meta = [{"sku": r["sku"], "category": r["category"], "image_key": r["image"],
             "title": r.get("title", ""), "attributes": r["attributes"]} for r in rows]
    root = base / "root"
    version = build_version(root, np.concatenate(feats), np.concatenate(ids), meta, weights,
                            k1=21).version
    IndexRoot(root).activate(version)
    return root, model, rows


@pytest.fixture(scope="module")
def target(indexed):
    root, _, _ = indexed
    config = ServeConfig(index_root=root, port=0, use_detector=False, max_message_mb=2.0,
                         workers=4, max_batch_size=4)
    running = RunningServer(config).start()
    yield f"127.0.0.1:{running.port}"
    running.stop(grace=1.0)


@pytest.fixture(scope="module")
def client(target):
    with SearchClient(target, timeout=60) as c:
        c.wait_ready()
        yield c


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_describe_and_search_carry_the_heads_predictions(client, indexed, tiny_world) -> None:
    _, model, rows = indexed
    gallery, _ = embed_arrays_with_heads(model, [load_crop(tiny_world / r["image"], r.get("bbox"))
                                                 for r in rows])
    for row in rows[:40:8]:
        image = (tiny_world / row["image"]).read_bytes()
        described = client.describe(image, bbox=row["bbox"])
        searched = client.search(image, bbox=row["bbox"], top_k=5)
        query, logits = embed_arrays_with_heads(model, [load_crop(tiny_world / row["image"],
                                                                  row["bbox"])])
        # Attributes: the vote of the 20 nearest gallery items' catalog values (brute force,
        # relative softmax at temperature 0.25) and the heads' probabilities, 1 : 0.25.
        sims = gallery @ query[0]
        nearest = np.argsort(-sims, kind="stable")[:20]
        s = sims[nearest].astype(np.float64)
        w = np.exp(-(s.max() - s) / (0.25 * (s.max() - s.min())))
        assert [a.name for a in described.attributes] == list(ATTRS)
        for a in described.attributes:
            head = top_k_prediction(logits[f"attr.{a.name}"][0],
                                    model.heads.attributes[a.name], 99)
            p_head = dict(zip(head.values, head.scores, strict=True))
            p_nn = dict.fromkeys(p_head, 0.0)
            for j, wj in zip(nearest, w, strict=True):
                p_nn[rows[j]["attributes"][a.name]] += wj / w.sum()
            want = {v: (p_nn[v] + 0.25 * p_head[v]) / 1.25 for v in p_head}
            best = sorted(want, key=lambda v: -want[v])[:3]
            assert [v.value for v in a.values] == best
            np.testing.assert_allclose([v.score for v in a.values], [want[v] for v in best],
                                       atol=1e-4)
        # Category top-5: the vote's combined scores (neighbours + head), best first.
        top = [(c.category, c.score) for c in described.category_top]
        assert len(top) == 5 and [s for _, s in top] == sorted((s for _, s in top),
                                                               reverse=True)
        votes = {v.category: v for v in described.category.votes}
        head = top_k_prediction(logits["category"][0], model.heads.categories, 20)
        for c, s in top:
            assert s == pytest.approx(votes[c].combined, abs=1e-6)
            assert votes[c].head == pytest.approx(dict(zip(head.values, head.scores,
                                                           strict=True))[c], abs=1e-5)
            assert s == pytest.approx((votes[c].neighbours + votes[c].head) / 2, abs=1e-5)
        assert described.category.category == top[0][0]
        assert described.main_object.source == "request"
        assert "heads" in [t.stage for t in described.timings]
        # Search reports the same understanding, and its results' catalog attributes.
        assert [(c.category, round(c.score, 5)) for c in searched.category_top] == [
            (c, round(s, 5)) for c, s in top]
        assert [(a.name, [v.value for v in a.values]) for a in searched.attributes] == [
            (a.name, [v.value for v in a.values]) for a in described.attributes]
        by_sku = {r["sku"]: r["attributes"] for r in rows}
        assert searched.results and all(dict(r.attributes) == by_sku[r.sku]
                                        for r in searched.results)


def test_cutout_returns_a_photos_own_alpha_exactly(client) -> None:
    h, w = 60, 80
    yy, xx = np.mgrid[:h, :w]
    alpha = np.where((yy - 30) ** 2 + (xx - 35) ** 2 <= 15 ** 2, 255, 0).astype(np.uint8)
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = 200
    res = client.cutout(_png(np.dstack([rgb, alpha])))
    assert res.status == "ok" and res.quality == pytest.approx(1.0)
    ys, xs = np.nonzero(alpha >= 128)
    assert (res.box.x1, res.box.y1, res.box.x2, res.box.y2) == (
        xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    mask = _decode(res.mask_png)
    rgba = _decode(res.rgba_png)
    np.testing.assert_array_equal(mask, alpha[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    assert rgba.shape == (*mask.shape, 4)
    np.testing.assert_array_equal(rgba[..., 3], mask)
    assert {t.stage for t in res.timings} >= {"decode", "cutout", "encode", "total"}


def test_cutout_of_a_shop_image_with_its_box(client, target, indexed, tiny_world,
                                             tmp_path) -> None:
    _, _, rows = indexed
    row = rows[0]
    image = (tiny_world / row["image"]).read_bytes()
    res = client.cutout(image, bbox=row["bbox"])
    assert res.status == "ok" and 0.0 < res.quality <= 1.0
    x1, y1, x2, y2 = row["bbox"]
    b = res.box
    assert x1 - 1 <= b.x1 < b.x2 <= x2 + 1 and y1 - 1 <= b.y1 < b.y2 <= y2 + 1
    mask, rgba = _decode(res.mask_png), _decode(res.rgba_png)
    assert mask.shape == (b.y2 - b.y1, b.x2 - b.x1) and mask.dtype == np.uint8
    np.testing.assert_array_equal(rgba[..., 3], mask)
    # Matting leaves soft edges: some alpha strictly between 0 and 255.
    assert ((mask > 0) & (mask < 255)).any()
    # visearch-query's cutout mode writes the same two PNGs.
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image)
    out = tmp_path / "cut" / "product.png"
    bbox = ",".join(str(v) for v in row["bbox"])
    assert query_main([str(photo), "--server", target, "--mode", "cutout", "--bbox", bbox,
                       "--out", str(out)]) == 0
    assert out.read_bytes() == res.rgba_png
    assert (tmp_path / "cut" / "product.mask.png").read_bytes() == res.mask_png


def test_query_describe_mode_prints_the_understanding(target, indexed, tiny_world,
                                                      capsys) -> None:
    _, _, rows = indexed
    photo = tiny_world / rows[1]["image"]
    assert query_main([str(photo), "--server", target, "--mode", "describe"]) == 0
    text = capsys.readouterr().out
    assert "category top-5: " in text and "attributes:" in text and "color" in text
    assert query_main([str(photo), "--server", target, "--top-k", "3"]) == 0
    text = capsys.readouterr().out
    assert "category top-5: " in text and "color=" in text  # results' catalog attributes


@pytest.mark.parametrize("call", ["describe", "cutout"])
def test_bad_inputs_get_invalid_argument(client, indexed, tiny_world, call) -> None:
    _, _, rows = indexed
    image = (tiny_world / rows[0]["image"]).read_bytes()
    fn = getattr(client, call)
    for bad, kwargs, says in [
        (b"", {}, "empty image"),
        (b"not an image at all", {}, ""),
        (image[: len(image) // 3], {}, ""),  # truncated
        (image, {"bbox": [0, 0, 5000, 5000]}, "outside"),
        (image, {"bbox": [50, 50, 10, 10]}, "empty"),
        (image, {"bbox": [float("nan"), 0, 10, 10]}, "non-finite"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            fn(bad, **kwargs)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (bad[:20], kwargs)
        assert says in err.value.details()
    # The server is still up and answers a good call.
    assert client.describe(image).index_version


def test_cutout_of_a_cluttered_photo_without_a_box_says_so(client) -> None:
    noise = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    res = client.cutout(_png(noise))  # no detector here, no box: nothing to cut from
    assert res.status == "needs_bbox"
    assert res.rgba_png == b"" and res.mask_png == b"" and not res.HasField("box")
