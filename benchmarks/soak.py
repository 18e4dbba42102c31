"""Soak test of a real ``visearch-serve``: 80% of its measured maximum QPS for a duration, with
a hot index swap every minute, one of them to a corrupted version.

    .venv/bin/python -m benchmarks.soak --duration 600 [--world DIR] [--model embedder.pt] \\
        [--detector detector.pt] [--swap-every 60] [--load 0.8] [--out DIR] [--json out.json]

Set-up (in ``--out``): an index root with two good versions of the same catalog (A, active,
and B) and a third (C) whose FAISS index file is damaged after it was published (same size,
bytes flipped: only the manifest's sha256 can tell). The catalog is ``--world``'s (default: a
generated synthetic world of ``--skus`` SKUs), embedded with ``--model`` (default: a seeded,
untrained tiny embedder), shipped with ``--detector`` when given. A ``visearch-serve`` child
serves it with an admin token.

Then:

1. **maximum QPS**, closed loop (``benchmarks.latency.run_latency``): ``--concurrency``
   client threads, each sending its next Search as soon as the last one returned, for
   ``--probe`` seconds;
2. **open loop at ``--load`` of it** for ``--duration`` seconds: Searches are sent on a fixed
   schedule (request i at ``i / rate`` s, whether or not earlier ones returned), so a server
   that slows down builds a queue instead of slowing the client down;
3. every ``--swap-every`` seconds a ReloadIndex (admin token) swaps to the other good
   version; the middle swap asks for C instead, which must be refused (FAILED_PRECONDITION)
   while the version before it keeps serving.

Reported: requests, failed requests (by status code), achieved rate, latency p50/p99, the
versions answering and the server's RSS per window (``--window``, default a minute), each
reload's outcome, and the server's RSS at the start of the soak and at its end. The run
fails (exit 1) on any failed Search, a reload that did not do what it should, or RSS growing
by more than 10%.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.fuzz import rss_kb
from benchmarks.latency import run_latency, spawn_server
from benchmarks.machine import machine
from server._proto import search_pb2, search_pb2_grpc
from server.client import ADMIN_TOKEN_KEY

#: the admin token of the soak's own loopback server
TOKEN = "soak-admin-token"
#: the server's index file the corruption damages
DAMAGED_FILE = "index"


def corrupt_version(version_dir: Path, *, seed: int = 0) -> Path:
    """Damage a published version in place: flip 64 bytes in the middle of its largest
    index file (the size stays the same). Returns the damaged file."""
    files = sorted((p for p in (version_dir / DAMAGED_FILE).rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    if not files:
        raise ValueError(f"{version_dir} has no files under {DAMAGED_FILE}/ to damage")
    target = files[-1]
    data = bytearray(target.read_bytes())
    rng = np.random.default_rng(seed)
    mid = len(data) // 2
    for pos in rng.integers(max(0, mid - 4096), min(len(data), mid + 4096), 64):
        data[pos] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def build_soak_root(out: Path, *, world: Path | None = None, model: Path | None = None,
                    detector: Path | None = None, skus: int = 60, seed: int = 0
                    ) -> dict[str, Any]:
    """The index root of the soak (see the module docstring) under ``out/root``.

    Returns ``{"root", "good": [A, B], "corrupt": C, "damaged": file, "photos": [paths]}``.
    """
    from index_builder.cmd_index import BuildParams, EmbedOptions, build_index
    from visearch.embedding import build_embedder, save_embedder

    out.mkdir(parents=True, exist_ok=True)
    if world is None:
        from visearch.synth import generate_world

        world = out / "world"
        if not (world / "catalog.jsonl").is_file():
            generate_world(world, skus=skus, seed=seed, image_size=96, scenes=0)
    if model is None:
        import torch

        torch.manual_seed(seed)
        model = out / "embedder.pt"
        save_embedder(build_embedder("tiny", dim=64, input_size=64).eval(), model)
    root = out / "root"
    opts = EmbedOptions(progress=False)
    catalog = world / "catalog.jsonl"
    # k1 = 21: the graph keeps each item itself, re-ranking needs 20 others.
    params = BuildParams(k1=21)
    versions = [build_index(root, catalog, model, params, embed=opts, detector=detector,
                            activate=i == 0).version for i in range(3)]
    damaged = corrupt_version(root / versions[2], seed=seed)
    queries = [json.loads(x) for x in (world / "queries.jsonl").read_text().splitlines()]
    return {"root": root, "good": versions[:2], "corrupt": versions[2], "damaged": damaged,
            "photos": [world / q["image"] for q in queries]}


def _percentile(ms: list[float], q: float) -> float:
    return float(np.percentile(ms, q)) if ms else float("nan")


def soak(target: str, pid: int, photos: list[bytes], *, rate: float, duration_s: float,
         swap_every_s: float, good: list[str], corrupt: str, window_s: float = 60.0,
         timeout: float = 30.0, max_outstanding: int = 2000) -> dict[str, Any]:
    """Open-loop Searches at ``rate`` per second for ``duration_s`` with a ReloadIndex every
    ``swap_every_s`` (alternating between the ``good`` versions; the middle swap to
    ``corrupt``), against the server ``pid`` listening on ``target``.

    Returns:
        ``{"requests", "ok", "failed": {code: n}, "late": requests not sent because
        ``max_outstanding`` were in flight, "rate", "achieved_rate", "windows": [{"start_s",
        "requests", "failed", "p50_ms", "p99_ms", "versions": {version: n}, "rss_kb" (at
        the window's end)}], "reloads":
        [{"at_s", "version", "expect", "code", "serving_after", "detail"}], "rss_kb":
        {"start", "end"}, "rss_growth"}``.
    """
    if rate <= 0 or duration_s <= 0 or swap_every_s <= 0:
        raise ValueError("rate, duration_s and swap_every_s must be > 0")
    channel = grpc.insecure_channel(target)
    stub = search_pb2_grpc.VisualSearchStub(channel)
    grpc.channel_ready_future(channel).result(timeout=30)
    requests = [search_pb2.SearchRequest(image=p, top_k=10) for p in photos]
    lock = threading.Lock()
    done = threading.Condition(lock)
    n_windows = int(np.ceil(duration_s / window_s))
    latencies: list[list[float]] = [[] for _ in range(n_windows)]
    failed_w: list[Counter] = [Counter() for _ in range(n_windows)]
    versions_w: list[Counter] = [Counter() for _ in range(n_windows)]
    outstanding = [0]

    def finished(fut: grpc.Future, sent: float, w: int) -> None:
        ms = (time.perf_counter() - sent) * 1000.0
        with lock:
            outstanding[0] -= 1
            try:
                res = fut.result()
                latencies[w].append(ms)
                versions_w[w][res.index_version] += 1
            except grpc.RpcError as e:
                failed_w[w][e.code().name] += 1
            done.notify_all()

    swaps = int((duration_s - 1e-9) // swap_every_s)
    corrupt_at = swaps // 2 if swaps >= 2 else 0
    reloads: list[dict[str, Any]] = []
    reload_threads: list[threading.Thread] = []
    serving = [good[0]]

    def reload(i: int, at: float) -> None:
        name = corrupt if i == corrupt_at else good[(i + 1 - (i > corrupt_at)) % len(good)]
        expect = "FAILED_PRECONDITION" if name == corrupt else "OK"
        entry: dict[str, Any] = {"at_s": round(at, 2), "version": name, "expect": expect}
        try:
            res = stub.ReloadIndex(search_pb2.ReloadIndexRequest(version=name),
                                   metadata=[(ADMIN_TOKEN_KEY, TOKEN)], timeout=120)
            entry.update(code="OK", detail=f"{res.previous_version} -> {res.version}")
        except grpc.RpcError as e:
            entry.update(code=e.code().name, detail=(e.details() or "")[:300])
        info = stub.GetIndexInfo(search_pb2.GetIndexInfoRequest(), timeout=timeout)
        entry["serving_after"] = info.version
        entry["serving_before"] = serving[0]
        serving[0] = info.version
        with lock:
            reloads.append(entry)

    rss_start = rss_kb(pid)
    rss_w: list[int | None] = [None] * n_windows  # RSS as each window ends
    current_w = 0
    late = 0
    sent_n = 0
    t0 = time.perf_counter()
    next_swap = 0
    while True:
        at = sent_n / rate
        if at >= duration_s:
            break
        while next_swap < swaps and (next_swap + 1) * swap_every_s <= at:
            thread = threading.Thread(target=reload, args=(next_swap, at), daemon=True)
            thread.start()
            reload_threads.append(thread)
            next_swap += 1
        wait = t0 + at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # the open-loop schedule, not a synchronisation
        w = min(int(at // window_s), n_windows - 1)
        if w > current_w:
            rss_w[current_w] = rss_kb(pid)
            current_w = w
        with lock:
            if outstanding[0] >= max_outstanding:
                late += 1
                sent_n += 1
                continue
            outstanding[0] += 1
        sent = time.perf_counter()
        fut = stub.Search.future(requests[sent_n % len(requests)], timeout=timeout)
        fut.add_done_callback(lambda f, s=sent, w=w: finished(f, s, w))
        sent_n += 1
    with done:
        done.wait_for(lambda: outstanding[0] == 0, timeout=timeout + 5)
    wall = time.perf_counter() - t0
    for thread in reload_threads:
        thread.join(timeout=180)
    rss_end = rss_kb(pid)
    rss_w = [rss_end if v is None else v for v in rss_w]
    channel.close()
    windows = [{"start_s": round(i * window_s, 1), "requests": len(latencies[i])
                + sum(failed_w[i].values()), "failed": dict(failed_w[i]),
                "p50_ms": _percentile(latencies[i], 50), "p99_ms": _percentile(latencies[i], 99),
                "versions": dict(versions_w[i]), "rss_kb": rss_w[i]} for i in range(n_windows)]
    ok = sum(len(x) for x in latencies)
    failed = sum((c for c in failed_w), Counter())
    return {"requests": ok + sum(failed.values()), "ok": ok, "failed": dict(failed),
            "late": late, "rate": rate, "achieved_rate": ok / wall, "wall_s": wall,
            "windows": windows, "reloads": sorted(reloads, key=lambda r: r["at_s"]),
            "rss_kb": {"start": rss_start, "end": rss_end},
            "rss_growth": rss_end / rss_start - 1.0}


def passed(report: dict[str, Any], max_rss_growth: float = 0.10) -> tuple[bool, list[str]]:
    """Whether the soak passed, and why not."""
    why = []
    if report["failed"] or report["late"]:
        why.append(f"failed searches {report['failed']}, unsent {report['late']}")
    for r in report["reloads"]:
        if r["code"] != r["expect"]:
            why.append(f"reload to {r['version']} answered {r['code']}, expected {r['expect']}")
        if r["expect"] == "OK" and r["serving_after"] != r["version"]:
            why.append(f"after the reload to {r['version']} {r['serving_after']} serves")
        if r["expect"] != "OK" and r["serving_after"] != r["serving_before"]:
            why.append(f"the refused reload to {r['version']} changed the served version")
    if not any(r["expect"] != "OK" for r in report["reloads"]):
        why.append("no swap to the corrupted version was made (duration < 2 swaps?)")
    if report["rss_growth"] > max_rss_growth:
        why.append(f"RSS grew {100 * report['rss_growth']:.1f}%")
    return not why, why


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Set up, measure the maximum QPS, soak; returns the whole report."""
    setup = build_soak_root(args.out, world=args.world, model=args.model,
                            detector=args.detector, skus=args.skus, seed=args.seed)
    photos = [p.read_bytes() for p in setup["photos"][: args.max_photos]]
    flags = ["--admin-token", TOKEN, "--workers", str(args.workers)]
    if args.detector is None:
        flags.append("--no-detector")
    proc, target = spawn_server(setup["root"], *flags)
    try:
        probe = run_latency(target, photos, [args.concurrency], duration_s=args.probe,
                            max_requests=10**9, warmup=10)["levels"][0]
        rate = args.load * probe["qps"]
        report = soak(target, proc.pid, photos, rate=rate, duration_s=args.duration,
                      swap_every_s=args.swap_every, good=setup["good"],
                      corrupt=setup["corrupt"], window_s=args.window)
        alive = proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    ok, why = passed(report)
    if not alive:
        ok, why = False, [*why, "the server died"]
    report.update(max_qps={k: probe[k] for k in ("concurrency", "qps", "ok", "errors",
                                                 "latency_ms")},
                  load=args.load, duration_s=args.duration, swap_every_s=args.swap_every,
                  damaged=str(setup["damaged"]), photos=len(photos),
                  machine=machine(["grpcio"]), ok=ok, problems=why)
    return report


def print_report(report: dict[str, Any]) -> None:
    m, mx = report["machine"], report["max_qps"]
    print(f"machine: {m['cpu_count']} CPUs, torch {m['torch']}, grpcio {m['grpcio']}, "
          f"cuda {m['cuda']}")
    print(f"max QPS (closed loop, concurrency {mx['concurrency']}): {mx['qps']:.1f} "
          f"(p50 {mx['latency_ms']['p50']:.1f} ms, p99 {mx['latency_ms']['p99']:.1f} ms, "
          f"errors {mx['errors'] or 0})")
    print(f"soak: {report['duration_s']:.0f} s open loop at {100 * report['load']:.0f}% = "
          f"{report['rate']:.1f} QPS (achieved {report['achieved_rate']:.1f}); "
          f"{report['requests']} requests, failed {sum(report['failed'].values())} "
          f"{report['failed'] or ''}, unsent {report['late']}")
    print(f"{'window':>8} {'requests':>9} {'failed':>7} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'RSS KiB':>9}  versions")
    for w in report["windows"]:
        print(f"{w['start_s']:>7.0f}s {w['requests']:>9} {sum(w['failed'].values()):>7} "
              f"{w['p50_ms']:>8.1f} {w['p99_ms']:>8.1f} {w['rss_kb']:>9}  "
              + ", ".join(f"{v}: {n}" for v, n in sorted(w["versions"].items())))
    for r in report["reloads"]:
        print(f"reload at {r['at_s']:.0f} s to {r['version']}: {r['code']} (expected "
              f"{r['expect']}); serving {r['serving_after']} - {r['detail'][:140]}")
    rss = report["rss_kb"]
    print(f"server RSS: {rss['start']} KiB at the start, {rss['end']} KiB at the end "
          f"({100 * report['rss_growth']:+.1f}%)")
    print("PASS" if report["ok"] else "FAIL: " + "; ".join(report["problems"]))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=600.0, help="soak seconds")
    p.add_argument("--swap-every", type=float, default=60.0, help="seconds between swaps")
    p.add_argument("--window", type=float, default=60.0, help="seconds per report row")
    p.add_argument("--load", type=float, default=0.8, help="fraction of the maximum QPS")
    p.add_argument("--probe", type=float, default=20.0,
                   help="seconds of the closed-loop maximum-QPS measurement")
    p.add_argument("--concurrency", type=int, default=8,
                   help="client threads of the maximum-QPS measurement")
    p.add_argument("--workers", type=int, default=16, help="server RPC threads")
    p.add_argument("--world", type=Path, help="a synthetic world (default: generate one)")
    p.add_argument("--skus", type=int, default=60, help="SKUs of a generated world")
    p.add_argument("--model", type=Path, help="embedder.pt (default: a tiny untrained one)")
    p.add_argument("--detector", type=Path, help="detector weights to ship and serve")
    p.add_argument("--max-photos", type=int, default=64, help="user photos cycled through")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("/tmp/visearch-soak"),
                   help="scratch folder (world, index root)")
    p.add_argument("--json", type=Path, help="write the report here")


def report_and_exit_code(args: argparse.Namespace) -> int:
    """:func:`run`, printed (and written to ``--json``); 0 when the soak passed."""
    report = run(args)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.soak", description=__doc__.splitlines()[0])
    add_arguments(p)
    return report_and_exit_code(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
