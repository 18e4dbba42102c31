"""int8 quantisation of the embedder (``onnxruntime.quantization``) against float32, one run.

    .venv/bin/python -m benchmarks.bench_int8 --index-root ROOT --world DIR [--limit 300]

The world's user photos, cropped to their ground-truth boxes, are embedded by the index
version's embedder four ways: torch (the baseline), its float32 ONNX export, dynamic int8
and static int8 (QDQ, activation ranges from ``--calibration`` of the world's shop images).
Each set of query vectors searches the version's whole index (plain top-k, no vote, no
re-ranking): Recall@1 / Recall@10 over SKUs (split SKUs count), the worst cosine against
torch, and ms per crop at batch 1 on one thread. The rule of issue 18: keep int8 only if
Recall@10 drops by at most 0.005.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import machine
from benchmarks.recall import relevant_skus
from visearch.catalog import read_manifest
from visearch.embedding import embed_arrays, load_embedder
from visearch.embedding.infer import crops_to_batch, load_crop
from visearch.index import IndexRoot
from visearch.metrics import retrieval_metrics
from visearch.runtime.onnx import OrtEmbedder, export_embedder, quantize_embedder


def _ranked_skus(version, x: np.ndarray, k: int) -> list[list[str]]:
    """Per query, the SKUs of its nearest gallery items, best first, each once."""
    _, ids = version.index.search(x, 5 * k)
    out = []
    for row in ids:
        skus: list[str] = []
        for meta in version.items.get_many([int(i) for i in row if i >= 0]):
            if meta is not None and meta["sku"] not in skus:
                skus.append(meta["sku"])
        out.append(skus[:k])
    return out


def _ms_per_crop(embed, crops: list[np.ndarray]) -> float:
    for c in crops[:5]:
        embed([c])
    t0 = time.perf_counter()
    for c in crops:
        embed([c])
    return 1000 * (time.perf_counter() - t0) / len(crops)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_int8", description=__doc__.splitlines()[0])
    p.add_argument("--index-root", type=Path, required=True)
    p.add_argument("--world", type=Path, required=True, help="its queries.jsonl and catalog")
    p.add_argument("--limit", type=int, default=300, help="user photos used")
    p.add_argument("--calibration", type=int, default=48, help="shop images for static int8")
    p.add_argument("--timing-crops", type=int, default=100)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    version = IndexRoot(args.index_root).open()
    model = load_embedder(version.embedder_path)
    queries = read_manifest(args.world / "queries.jsonl").rows[: args.limit]
    relevant = relevant_skus(queries, args.world / "truth.json")
    crops = [load_crop(q.path, q.bbox) for q in queries]
    shop = read_manifest(args.world / "catalog.jsonl").rows[: args.calibration]
    info = machine(["onnxruntime"])
    print(f"machine: {info['cpu_count']} CPUs, torch {info['torch']}, onnxruntime "
          f"{info['onnxruntime']}; {len(queries)} queries, 1 thread")

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_embedder(model, fp32)
        ref = OrtEmbedder(fp32, model.config, intra_op_threads=1)
        calibration = crops_to_batch(ref.transform,
                                     [load_crop(r.path, r.bbox) for r in shop]).numpy()
        dyn, static = Path(tmp) / "dynamic.onnx", Path(tmp) / "static.onnx"
        quantize_embedder(fp32, dyn)
        quantize_embedder(fp32, static, calibration=calibration)
        runners = {
            "torch (baseline)": lambda ims: embed_arrays(model, ims, batch_size=len(ims)),
            "onnx float32": ref.embed_arrays,
            "onnx int8 dynamic": OrtEmbedder(dyn, model.config,
                                             intra_op_threads=1).embed_arrays,
            "onnx int8 static": OrtEmbedder(static, model.config,
                                            intra_op_threads=1).embed_arrays,
        }
        base_x = None
        base_r10 = None
        print("| path | Recall@1 | Recall@10 | dR@10 | worst cosine | ms/crop |")
        print("|---|---|---|---|---|---|")
        for name, embed in runners.items():
            x = embed(crops)
            m = retrieval_metrics(_ranked_skus(version, x, 10), relevant, (1, 10))
            if base_x is None:
                base_x, base_r10 = x, m["recall@10"]
            worst = float(np.min(np.sum(x * base_x, axis=1)))
            ms = _ms_per_crop(embed, crops[: args.timing_crops])
            print(f"| {name} | {m['recall@1']:.4f} | {m['recall@10']:.4f} | "
                  f"{m['recall@10'] - base_r10:+.4f} | {worst:.3f} | {ms:.2f} |", flush=True)
    version.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
