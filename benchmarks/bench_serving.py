"""Serving side by side: the torch path against the ONNX Runtime path, one run, the same
index and the same query photos, each through a real ``visearch-serve`` over gRPC.

    .venv/bin/python -m benchmarks.bench_serving --index-root ROOT --world DIR \\
        [--runtimes torch,onnx] [--concurrency 1,4,16] [--duration 20] [--json out.json]

For each runtime a server child process is started on a free loopback port (``--runtime``),
then: Recall@1 / Recall@10 and category accuracy of the ``full`` search (detector, vote,
re-ranking) and of ``gt_box`` over the world's user photos, through gRPC exactly as clients
get them (``benchmarks.recall``); then p50 / p95 / p99 latency, QPS and errors at each
concurrency (``benchmarks.latency``), with the server's median stage times (the ``rerank``
stage is the re-ranking cost per query). The first runtime listed is the baseline the others
are compared with. The servers run one after the other, never at once, so they do not share
the CPU.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from benchmarks.latency import run_latency, server_flags, spawn_server
from benchmarks.machine import machine
from benchmarks.recall import OverGrpc, relevant_skus, run_ablation, summarise
from visearch.catalog import read_manifest


def _one_runtime(args: argparse.Namespace, runtime: str, queries: list, images: list[bytes],
                 relevant: list[set[str]], levels: list[int]) -> dict[str, Any]:
    proc, target = spawn_server(args.index_root, *server_flags(args, runtime=runtime))
    try:
        backend = OverGrpc(target, args.index_root)
        recall: dict[str, Any] = {}
        try:
            for name in ("full", "gt_box"):
                recs = run_ablation(backend, name, queries, images, 10, None)
                s = summarise(recs, queries, relevant)
                recall[name] = {k: s[k] for k in ("recall@1", "recall@10",
                                                  "category_accuracy")}
        finally:
            backend.close()
        load = run_latency(target, images, levels, args.duration, args.max_requests)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return {"runtime": runtime, "recall": recall, "levels": load["levels"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    runtimes = [r for r in args.runtimes.split(",") if r]
    levels = [int(c) for c in args.concurrency.split(",") if c]
    queries = read_manifest(args.world / "queries.jsonl").rows[: args.limit]
    relevant = relevant_skus(queries, args.world / "truth.json")
    images = [q.path.read_bytes() for q in queries]
    report: dict[str, Any] = {"machine": machine(["grpcio", "onnxruntime"]),
                              "index_root": str(args.index_root), "queries": len(queries),
                              "runtimes": []}
    m = report["machine"]
    print(f"machine: {m['cpu_count']} CPUs, torch {m['torch']}, onnxruntime "
          f"{m.get('onnxruntime')}, cuda {m['cuda']}; {len(queries)} user photos", flush=True)
    for runtime in runtimes:
        row = _one_runtime(args, runtime, queries, images, relevant, levels)
        report["runtimes"].append(row)
        r = row["recall"]
        print(f"{runtime}: full R@1 {r['full']['recall@1']:.3f} R@10 "
              f"{r['full']['recall@10']:.3f}; gt_box R@1 {r['gt_box']['recall@1']:.3f} "
              f"R@10 {r['gt_box']['recall@10']:.3f}", flush=True)

    base = report["runtimes"][0]
    print("\n| runtime | conc | QPS | p50 ms | p95 ms | p99 ms | errors | detect ms | "
          "embed ms | rerank ms | full R@1 | full R@10 | gt_box R@1 | gt_box R@10 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in report["runtimes"]:
        r = row["recall"]
        for lv in row["levels"]:
            lat, st = lv["latency_ms"], lv["server_stage_ms"]
            print(f"| {row['runtime']} | {lv['concurrency']} | {lv['qps']:.1f} | "
                  f"{lat['p50']:.1f} | {lat['p95']:.1f} | {lat['p99']:.1f} | "
                  f"{sum(lv['errors'].values())} | {st.get('detect', float('nan')):.1f} | "
                  f"{st.get('embed', float('nan')):.1f} | {st.get('rerank', float('nan')):.2f}"
                  f" | {r['full']['recall@1']:.3f} | {r['full']['recall@10']:.3f} | "
                  f"{r['gt_box']['recall@1']:.3f} | {r['gt_box']['recall@10']:.3f} |")
    for row in report["runtimes"][1:]:
        deltas = {f"{a} {k}": row["recall"][a][k] - base["recall"][a][k]
                  for a in ("full", "gt_box") for k in ("recall@1", "recall@10")}
        print(f"\n{row['runtime']} - {base['runtime']}: " + ", ".join(
            f"{k} {v:+.3f}" for k, v in deltas.items()))
        for lb, lv in zip(base["levels"], row["levels"], strict=True):
            print(f"  concurrency {lv['concurrency']}: p50 {lv['latency_ms']['p50']:.1f} vs "
                  f"{lb['latency_ms']['p50']:.1f} ms, QPS {lv['qps']:.1f} vs {lb['qps']:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_serving",
                                description=__doc__.splitlines()[0])
    p.add_argument("--index-root", type=Path, required=True)
    p.add_argument("--world", type=Path, required=True, help="its queries.jsonl photos")
    p.add_argument("--runtimes", default="torch,onnx", help="the first is the baseline")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per level (max)")
    p.add_argument("--max-requests", type=int, default=2000, help="requests per level (max)")
    p.add_argument("--limit", type=int, default=300, help="user photos used")
    p.add_argument("--workers", type=int, default=16, help="server RPC threads")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-window-ms", type=float, default=2.0)
    p.add_argument("--no-detector", action="store_true")
    p.add_argument("--device", help="the servers' device: cpu / cuda")
    p.add_argument("--json", type=Path)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
