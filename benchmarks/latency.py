"""gRPC load generator: latency percentiles, QPS, errors and server stage times.

    .venv/bin/python -m benchmarks.latency --index-root ROOT --world DIR \\
        [--concurrency 1,4,16,64] [--duration 5] [--max-requests 2000] [--json out.json]
    .venv/bin/python -m benchmarks.latency --server 127.0.0.1:50051 --photos DIR

With ``--index-root`` a ``visearch-serve`` child process is started on a free loopback port
and stopped (SIGTERM) at the end, and the same pipeline is first timed here without gRPC, one
request at a time, as the baseline. Every run is bounded by a request count and a
duration per concurrency level and stops by itself; targets must be loopback addresses.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.machine import machine
from server.client import SearchClient

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _check_loopback(target: str) -> None:
    host = target.rsplit(":", 1)[0]
    if host not in _LOOPBACK:
        raise ValueError(f"the load generator only targets loopback addresses, got {target!r}")


def _percentiles(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"),
                "mean": float("nan")}
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def _one_level(client: SearchClient, photos: Sequence[bytes], concurrency: int,
               duration_s: float, max_requests: int, search_kwargs: dict[str, Any],
               timeout: float) -> dict[str, Any]:
    lock = threading.Lock()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stages: dict[str, list[float]] = {}
    issued = [0]
    t_end = time.monotonic() + duration_s

    def worker(seed: int) -> None:
        i = seed
        while True:
            with lock:
                if issued[0] >= max_requests or time.monotonic() >= t_end:
                    return
                issued[0] += 1
            photo = photos[i % len(photos)]
            i += concurrency
            t0 = time.perf_counter()
            try:
                res = client.search(photo, timeout=timeout, **search_kwargs)
            except grpc.RpcError as e:
                with lock:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1
                continue
            ms = (time.perf_counter() - t0) * 1000.0
            with lock:
                latencies.append(ms)
                for t in res.timings:
                    stages.setdefault(t.stage, []).append(t.ms)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True)
               for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": len(latencies) + sum(errors.values()),
        "ok": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "qps": len(latencies) / wall if wall > 0 else 0.0,
        "latency_ms": _percentiles(latencies),
        "server_stage_ms": {k: float(np.median(v)) for k, v in stages.items()},
    }


def run_latency(
    target: str,
    photos: Sequence[bytes],
    concurrencies: Sequence[int] = (1, 4, 16, 64),
    duration_s: float = 5.0,
    max_requests: int = 2000,
    *,
    top_k: int = 10,
    rerank: bool | None = None,
    timeout: float = 30.0,
    warmup: int = 3,
) -> dict[str, Any]:
    """Load a VisualSearch server with Search calls at each concurrency level.

    Args:
        target: ``host:port`` of a loopback server.
        photos: encoded images, cycled through.
        concurrencies: client threads per level (one shared channel).
        duration_s: the most each level runs, seconds.
        max_requests: the most requests each level issues.
        top_k, rerank: Search options (``rerank=None``: the server's default).
        timeout: per-call deadline, seconds.
        warmup: untimed calls before the first level.

    Returns:
        ``{"target", "levels": [{"concurrency", "requests", "ok", "errors": {code: n},
        "wall_s", "qps", "latency_ms": {p50, p95, p99, mean},
        "server_stage_ms": {stage: median ms}}]}``.
    """
    _check_loopback(target)
    if not photos:
        raise ValueError("no photos to send")
    if duration_s <= 0 or max_requests < 1 or any(c < 1 for c in concurrencies):
        raise ValueError("duration_s > 0, max_requests >= 1 and concurrencies >= 1 please")
    kwargs: dict[str, Any] = {"top_k": top_k, "rerank": rerank}
    with SearchClient(target, timeout=timeout) as client:
        client.wait_ready(timeout=30)
        for i in range(warmup):
            client.search(photos[i % len(photos)], **kwargs)
        levels = [_one_level(client, photos, c, duration_s, max_requests, kwargs, timeout)
                  for c in concurrencies]
    return {"target": target, "levels": levels}


def _baseline(pipeline: Any, photos: Sequence[bytes], n: int, top_k: int,
              rerank: bool) -> dict[str, Any]:
    """The same searches without gRPC, one at a time (after a few untimed ones)."""
    for i in range(min(5, n)):
        pipeline.search(photos[i % len(photos)], top_k=top_k, rerank=rerank)
    ms = []
    for i in range(n):
        t0 = time.perf_counter()
        pipeline.search(photos[i % len(photos)], top_k=top_k, rerank=rerank)
        ms.append((time.perf_counter() - t0) * 1000.0)
    return {"requests": n, "latency_ms": _percentiles(ms),
            "qps": n / (sum(ms) / 1000.0) if ms else 0.0}


def _photos(args: argparse.Namespace) -> list[bytes]:
    if args.world:
        rows = [json.loads(line) for line in
                (args.world / "queries.jsonl").read_text().splitlines() if line.strip()]
        paths = [args.world / r["image"] for r in rows]
    elif args.photos:
        paths = sorted(p for p in args.photos.iterdir()
                       if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    else:
        raise ValueError("give --world DIR (its queries.jsonl photos) or --photos DIR")
    if not paths:
        raise ValueError("no photos found")
    return [p.read_bytes() for p in paths[: args.max_photos]]


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="HOST:PORT of a running loopback server")
    where.add_argument("--index-root", type=Path,
                       help="start a server on a free loopback port over this index root")
    p.add_argument("--world", type=Path, help="a synthetic world: its user photos are sent")
    p.add_argument("--photos", type=Path, help="a folder of images to send")
    p.add_argument("--max-photos", type=int, default=200)
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per level (max)")
    p.add_argument("--max-requests", type=int, default=2000, help="requests per level (max)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--no-rerank", action="store_true")
    p.add_argument("--workers", type=int, default=16, help="server RPC threads (--index-root)")
    p.add_argument("--max-batch-size", type=int, default=8, help="(--index-root)")
    p.add_argument("--batch-window-ms", type=float, default=2.0, help="(--index-root)")
    p.add_argument("--no-detector", action="store_true", help="(--index-root)")
    p.add_argument("--runtime", choices=("onnx", "torch"), default="onnx",
                   help="the server's model runtime (--index-root)")
    p.add_argument("--device", help="the server's device: cpu / cuda (--index-root)")
    p.add_argument("--baseline-requests", type=int, default=50,
                   help="in-process pipeline calls for the no-gRPC baseline (--index-root)")
    p.add_argument("--json", type=Path, help="write the report here")


def spawn_server(index_root: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """``visearch-serve`` over ``index_root`` in a child process (its own GIL) on a free
    loopback port, with more ``visearch-serve`` flags. Returns the process and
    ``host:port``; the caller stops it (SIGTERM)."""
    cmd = [sys.executable, "-m", "server.serve", "--index-root", str(index_root),
           "--port", "0", "--host", "127.0.0.1", "--log-level", "WARNING", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, f"127.0.0.1:{int(line.rsplit(':', 1)[1])}"


def server_flags(args: argparse.Namespace, *, runtime: str | None = None) -> list[str]:
    """The ``visearch-serve`` flags this benchmark's arguments ask for (``runtime``
    overrides ``args.runtime``)."""
    flags = ["--workers", str(args.workers), "--max-batch-size", str(args.max_batch_size),
             "--batch-window-ms", str(args.batch_window_ms),
             "--runtime", runtime or getattr(args, "runtime", "onnx")]
    if args.no_detector:
        flags.append("--no-detector")
    if getattr(args, "device", None):
        flags += ["--device", args.device]
    return flags


def run(args: argparse.Namespace) -> int:
    levels = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    photos = _photos(args)
    rerank = False if args.no_rerank else None
    proc = None
    baseline = None
    if args.index_root:
        from visearch.index import IndexRoot
        from visearch.search.pipeline import SearchPipeline

        pipeline = SearchPipeline.from_version(IndexRoot(args.index_root).open(),
                                               use_detector=not args.no_detector,
                                               runtime=args.runtime, device=args.device)
        try:
            baseline = _baseline(pipeline, photos, args.baseline_requests, args.top_k,
                                 rerank is None)
        finally:
            pipeline.close()
        proc, target = spawn_server(args.index_root, *server_flags(args))
    else:
        target = args.server
    try:
        report = run_latency(target, photos, levels, args.duration, args.max_requests,
                             top_k=args.top_k, rerank=rerank)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    report["baseline_in_process"] = baseline
    report["machine"] = machine(["grpcio"])
    report["photos"] = len(photos)
    m = report["machine"]
    print(f"machine: {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} threads),"
          f" faiss {m['faiss']}, grpcio {m['grpcio']}, cuda {m['cuda']}")
    print(f"target {report['target']}, {len(photos)} photos, re-rank "
          f"{'off' if args.no_rerank else 'server default'}")
    if baseline:
        b = baseline["latency_ms"]
        print(f"baseline (in-process pipeline, no gRPC, sequential): p50 {b['p50']:.1f} ms  "
              f"p95 {b['p95']:.1f} ms  QPS {baseline['qps']:.1f}")
    print(f"{'conc':>4} {'ok':>6} {'err':>5} {'QPS':>7} {'p50':>8} {'p95':>8} {'p99':>8}  "
          "server stages (median ms)")
    for lv in report["levels"]:
        lat = lv["latency_ms"]
        st = "  ".join(f"{k} {v:.1f}" for k, v in lv["server_stage_ms"].items())
        print(f"{lv['concurrency']:>4} {lv['ok']:>6} {sum(lv['errors'].values()):>5} "
              f"{lv['qps']:>7.1f} {lat['p50']:>8.1f} {lat['p95']:>8.1f} {lat['p99']:>8.1f}  {st}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.latency", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
