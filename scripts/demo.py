"""``make demo``: the whole system end to end on a synthetic world, on this machine's CPU.

1. generate a synthetic product world (catalog, user photos, detection scenes, truth);
2. ``visearch-index rebuild``: ingest, dedup, train the detector, first-pass embedder,
   SKU denoise, SKU merge, train the embedder on the cleaned SKUs, embed, build, activate;
3. start ``visearch-serve`` on a free loopback port;
4. ``visearch-bench recall`` through gRPC, with its ablations, report and plots;
5. ``visearch-bench latency``: a short load run at several concurrencies;
6. print a summary table and stop the server (SIGTERM).

Everything goes under ``--out``. A re-run reuses the world and every rebuild stage whose
inputs did not change, so only the serving and benchmark steps run again.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _run(step: str, cmd: list[str]) -> float:
    """Run one CLI step, echoing it; exit on failure. Returns seconds taken."""
    print(f"\n==> {step}\n    $ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    result = subprocess.run(cmd)
    if result.returncode != 0:
        print(f"demo: step '{step}' failed (exit {result.returncode})", file=sys.stderr)
        raise SystemExit(result.returncode)
    return time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(target: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """Poll the standard gRPC health service until it says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"demo: the server exited early with code {proc.returncode}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise SystemExit(f"demo: the server at {target} did not become healthy in {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--skus", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--config", type=Path, help="rebuild config JSON (default profile)")
    parser.add_argument("--detector-source", choices=("catalog", "coco"), default="catalog",
                        help="train the detector on scenes made from the catalog (default) or "
                        "on the world's labelled COCO scenes")
    parser.add_argument("--latency-seconds", type=float, default=4.0)
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    world, root, work = out / "world", out / "indexes", out / "work"
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    if not (world / "world.json").is_file():
        timings["world"] = _run(
            "1/5 generate the synthetic world",
            [str(BIN / "visearch-synth"), "--out", str(world), "--skus", str(args.skus),
             "--seed", str(args.seed), "--workers", str(args.workers),
             "--contact-sheet", str(out / "contact_sheet.png"), "-q"],
        )
    # The catalog-only path, the one a real user has: the world's COCO scenes are not used;
    # the detector trains on copy-paste scenes made from the catalog's own cut-outs.
    rebuild = [str(BIN / "visearch-index"), "rebuild", "--catalog",
               str(world / "catalog.jsonl"), "--root", str(root), "--work", str(work),
               "--detector-source", args.detector_source]
    if args.config:
        rebuild += ["--config", str(args.config)]
    timings["rebuild"] = _run("2/5 the offline pipeline (visearch-index rebuild)", rebuild)

    port = _free_port()
    target = f"127.0.0.1:{port}"
    serve = [str(BIN / "visearch-serve"), "--index-root", str(root), "--host", "127.0.0.1",
             "--port", str(port)]
    print(f"\n==> 3/5 start the gRPC server\n    $ {' '.join(serve)}", flush=True)
    log = open(out / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.perf_counter()
        _wait_serving(target, server)
        timings["server start"] = time.perf_counter() - t0
        print(f"    serving on {target} (log: {out / 'server.log'})", flush=True)
        timings["recall"] = _run(
            "4/5 recall through gRPC (visearch-bench recall)",
            [str(BIN / "visearch-bench"), "recall", "--server", target, "--index-root",
             str(root), "--queries", str(world / "queries.jsonl"), "--out",
             str(out / "recall")],
        )
        timings["latency"] = _run(
            "5/5 latency under load (visearch-bench latency)",
            [str(BIN / "visearch-bench"), "latency", "--server", target, "--world", str(world),
             "--concurrency", "1,4,16", "--duration", str(args.latency_seconds),
             "--max-requests", "400", "--json", str(out / "latency.json")],
        )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
        log.close()
        print(f"\n==> server stopped (exit code {code})", flush=True)

    _summary(out, timings, time.perf_counter() - t_start)
    return 0


def _summary(out: Path, timings: dict[str, float], total: float) -> None:
    recall = json.loads((out / "recall" / "report.json").read_text())
    latency_path = out / "latency.json"
    latency = json.loads(latency_path.read_text()) if latency_path.is_file() else {}
    world = json.loads((out / "world" / "world.json").read_text())
    counts = world.get("counts", world)
    print("\n" + "=" * 72)
    print("visearch demo summary")
    print("=" * 72)
    print(f"world: {counts.get('skus', '?')} SKUs, {counts.get('catalog_rows', '?')} catalog "
          f"images, {recall['queries']} user-photo queries; engine {recall['engine']}")
    print("\n| ablation | Recall@1 | Recall@5 | Recall@10 | mAP@10 | category acc | hit rate |")
    print("|---|---|---|---|---|---|---|")
    for name, s in recall["ablations"].items():
        hit = s.get("main_object_hit_rate")
        print(f"| {name} | {s['recall@1']:.3f} | {s['recall@5']:.3f} | {s['recall@10']:.3f} "
              f"| {s['map@10']:.3f} | {s['category_accuracy']:.3f} | "
              f"{'-' if hit is None else f'{hit:.3f}'} |")
    levels = latency.get("levels", [])
    if levels:
        print("\n| concurrency | QPS | p50 ms | p95 ms | p99 ms | errors |")
        print("|---|---|---|---|---|---|")
        for lv in levels:
            lat = lv["latency_ms"]
            print(f"| {lv['concurrency']} | {lv['qps']:.1f} | {lat['p50']:.1f} | "
                  f"{lat['p95']:.1f} | {lat['p99']:.1f} | {sum(lv['errors'].values())} |")
    print("\n| step | seconds |")
    print("|---|---|")
    for step, seconds in timings.items():
        print(f"| {step} | {seconds:.1f} |")
    print(f"| total | {total:.1f} |")
    print(f"\nrecall report: {out / 'recall' / 'report.json'}")
    print(f"plots:         {out / 'recall' / 'recall_at_k.png'}, "
          f"{out / 'recall' / 'recall_per_category.png'}")
    print(f"failures:      {out / 'recall' / 'failures.png'}")
    print(f"latency:       {latency_path}")
    print(f"contact sheet: {out / 'contact_sheet.png'}")
    print(f"(machine: {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    sys.exit(main())
