"""Hostile-input fuzzing of a real ``visearch-serve`` over gRPC: every input's status code.

    .venv/bin/python -m benchmarks.fuzz --index-root ROOT [--n 10000] [--seed 0] \\
        [--timeout 10] [--max-message-mb 16] [--json out.json]

A seeded generator (:func:`generate_cases`) makes Search / Detect / Embed requests from
truncated and bit-flipped JPEG/PNG/WebP/GIF/TIFF, forged headers (decompression bombs,
20000 x 20000), 1 x 1, CMYK, 16-bit and animated images, zero and random bytes, fields above
the server's message limit, NaN / infinite / inverted / outside bboxes, unknown and huge
categories and extreme ``top_k``, beside untouched images of each format (``valid``, the
control). Kinds are dealt round-robin, so any ``n`` above the number of kinds covers them
all. Each case carries the status codes a correct server may answer.

A ``visearch-serve`` child is started on a free loopback port over ``--index-root`` (with
the active version's detector when it ships one, so that Detect, and Search / Embed without
a box or ``skip_detection``, run the detector on the hostile image) and stopped at the end;
the report counts the status codes per kind and per route (:func:`route`).
The run fails (exit 1) on a crash (the server died), any INTERNAL or
UNKNOWN status, a hang (DEADLINE_EXCEEDED), or server RSS growing by more than 10% between
the end of the warm-up and the end of the run.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from benchmarks import latency
from benchmarks.machine import machine
from server._proto import search_pb2, search_pb2_grpc

OK = frozenset({"OK"})
BAD = frozenset({"INVALID_ARGUMENT"})
#: Damaged data may still decode (a flipped bit in JPEG entropy data, a lost tail PIL pads).
MAYBE = frozenset({"OK", "INVALID_ARGUMENT"})
TOO_BIG = frozenset({"RESOURCE_EXHAUSTED"})
#: Codes that always fail a run: the server broke, not the input.
FAILING = frozenset({"INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED", "CRASH"})
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF")


@dataclass(frozen=True)
class FuzzCase:
    """One hostile request.

    Attributes:
        kind: what was done to the input (a row of the report table).
        method: ``"Search"``, ``"Detect"`` or ``"Embed"``.
        request: the request message of ``method``.
        expected: status code names a correct server may answer.
    """

    kind: str
    method: str
    request: Any
    expected: frozenset[str]


# ---------------------------------------------------------------------- images
def _photo(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A smooth random RGB image ``uint8 [h, w, 3]`` with a block in it (compresses like a
    photo, so damage lands in real entropy-coded data)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3).astype(np.float32)
    img = base + 60 * np.sin(xx[..., None] / rng.uniform(3, 20) + rng.uniform(0, 6, 3))
    img = img + 40 * np.cos(yy[..., None] / rng.uniform(3, 20))
    x1, y1 = int(rng.integers(0, w // 2 + 1)), int(rng.integers(0, h // 2 + 1))
    img[y1:y1 + h // 3, x1:x1 + w // 3] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _valid(rng: np.random.Generator, fmt: str) -> bytes:
    w, h = (int(v) for v in rng.integers(24, 129, 2))
    return _encode(Image.fromarray(_photo(rng, w, h)), fmt)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(
        ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def forged_png(width: int, height: int, rows: int = 4) -> bytes:
    """A small, well-formed-looking RGB PNG whose header declares ``width x height`` but that
    holds only ``rows`` rows of zeros: a decompression bomb, a few hundred bytes long."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = zlib.compress(b"\x00" * (min(rows, height) * (1 + 3 * min(width, 4096))), 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw)
            + _png_chunk(b"IEND", b""))


def forged_jpeg(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its SOF0/SOF2 frame header rewritten to declare ``width x height``."""
    data = bytearray(jpeg)
    for marker in (b"\xff\xc0", b"\xff\xc2"):
        at = data.find(marker)
        if at >= 0:
            struct.pack_into(">HH", data, at + 5, height, width)
            return bytes(data)
    raise ValueError("no SOF0/SOF2 marker in the JPEG")


def forged_gif(gif: bytes, width: int, height: int) -> bytes:
    """``gif`` with its logical screen size rewritten to ``width x height``."""
    data = bytearray(gif)
    struct.pack_into("<HH", data, 6, width, height)
    return bytes(data)


def _bitflip(rng: np.random.Generator, data: bytes, flips: int) -> bytes:
    buf = bytearray(data)
    for pos in rng.integers(0, len(buf) * 8, flips):
        buf[pos // 8] ^= 1 << (pos % 8)
    return bytes(buf)


def _animated(rng: np.random.Generator, fmt: str) -> bytes:
    frames = [Image.fromarray(_photo(rng, 64, 48)) for _ in range(int(rng.integers(2, 6)))]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=80,
                   loop=0)


# ---------------------------------------------------------------------- cases
def _search(image: bytes, **kw: Any) -> search_pb2.SearchRequest:
    box = kw.pop("bbox", None)
    req = search_pb2.SearchRequest(image=image, **kw)
    if box is not None:
        req.bbox.CopyFrom(search_pb2.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3]))
    return req


def _image_cases(rng: np.random.Generator) -> dict[str, Callable[[], tuple[bytes, frozenset]]]:
    """Kind -> a maker of (image bytes, expected codes), for images sent to any method."""
    def fmt() -> str:
        return FORMATS[int(rng.integers(len(FORMATS)))]

    def valid() -> tuple[bytes, frozenset]:
        return _valid(rng, fmt()), OK

    def truncated() -> tuple[bytes, frozenset]:
        data = _valid(rng, fmt())
        return data[: int(rng.integers(1, len(data)))], MAYBE

    def header_only() -> tuple[bytes, frozenset]:
        return _valid(rng, fmt())[: int(rng.integers(1, 16))], BAD

    def bitflip() -> tuple[bytes, frozenset]:
        data = _valid(rng, fmt())
        return _bitflip(rng, data, int(rng.integers(1, 64))), MAYBE

    def bomb_png() -> tuple[bytes, frozenset]:
        # Above the 40 Mpx limit with every side under 16,384, or far above both.
        side = int(rng.choice([7_000, 10_000, 16_000, 65_535, 1_000_000]))
        return forged_png(side, side), BAD

    def header_20000() -> tuple[bytes, frozenset]:
        which = int(rng.integers(3))
        if which == 0:
            return forged_png(20_000, 20_000), BAD
        if which == 1:
            return forged_jpeg(_valid(rng, "JPEG"), 20_000, 20_000), BAD
        return forged_gif(_valid(rng, "GIF"), 20_000, 20_000), MAYBE  # GIF frames are small

    def one_by_one() -> tuple[bytes, frozenset]:
        return _encode(Image.fromarray(_photo(rng, 1, 1)), fmt()), OK

    def zero_dims() -> tuple[bytes, frozenset]:
        return forged_png(0, int(rng.integers(0, 100))), BAD

    def cmyk() -> tuple[bytes, frozenset]:
        img = Image.fromarray(_photo(rng, 80, 60)).convert("CMYK")
        return _encode(img, "JPEG" if rng.random() < 0.6 else "TIFF"), OK

    def sixteen_bit() -> tuple[bytes, frozenset]:
        arr = rng.integers(0, 65536, (50, 70)).astype("<u2")
        img = Image.frombytes("I;16", (70, 50), arr.tobytes())
        return _encode(img, "PNG" if rng.random() < 0.5
                       else "TIFF"), OK

    def animated() -> tuple[bytes, frozenset]:
        return _animated(rng, "GIF" if rng.random() < 0.5 else "WEBP"), OK

    def odd_modes() -> tuple[bytes, frozenset]:
        arr = _photo(rng, 40, 30)
        mode = ["L", "LA", "RGBA", "P", "1"][int(rng.integers(5))]
        return _encode(Image.fromarray(arr).convert(mode), "PNG"), OK

    def zero_bytes() -> tuple[bytes, frozenset]:
        return b"\x00" * int(rng.integers(0, 4096)), BAD

    def random_bytes() -> tuple[bytes, frozenset]:
        return rng.bytes(int(rng.integers(1, 65536))), BAD

    def magic_then_random() -> tuple[bytes, frozenset]:
        magic = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
                 b"GIF89a", b"II*\x00", b"MM\x00*"][int(rng.integers(6))]
        return magic + rng.bytes(int(rng.integers(0, 4096))), BAD

    return {"valid": valid, "truncated": truncated, "header_only": header_only, "bitflip": bitflip,
            "bomb_png": bomb_png, "header_20000": header_20000, "image_1x1": one_by_one,
            "zero_dims": zero_dims, "cmyk": cmyk, "16bit": sixteen_bit, "animated": animated,
            "odd_modes": odd_modes, "zero_bytes": zero_bytes, "random_bytes": random_bytes,
            "magic_random": magic_then_random}


def generate_cases(n: int, seed: int = 0, *, max_message_mb: float = 16.0,
                   categories: tuple[str, ...] = ()) -> Iterator[FuzzCase]:
    """``n`` hostile requests, the same for the same ``seed``; kinds are dealt round-robin.

    Args:
        n: how many cases.
        seed: the generator's seed.
        max_message_mb: the server's message limit; the oversized cases exceed it.
        categories: the index's categories, for valid hints (unknown ones are generated).
    """
    rng = np.random.default_rng(seed)
    images = _image_cases(rng)
    limit = int(max_message_mb * 1024 * 1024)
    huge = b"\xff\xd8\xff" + bytes(limit + 1024)

    def good() -> bytes:
        return _valid(rng, "JPEG")

    def top_k() -> FuzzCase:
        k = int(rng.choice([0, -1, -(2**31), 1, 100, 101, 10_000, 2**31 - 1]))
        return FuzzCase("top_k", "Search", _search(good(), top_k=k),
                        OK if 0 <= k <= 100 else BAD)

    def bbox() -> FuzzCase:
        nan, inf = float("nan"), float("inf")
        which = int(rng.integers(8))
        box, exp = {0: ((nan, 0, 10, 10), BAD), 1: ((0, 0, inf, 10), BAD),
                    2: ((-inf, -inf, inf, inf), BAD), 3: ((20, 20, 5, 5), BAD),
                    4: ((5, 5, 5, 5), BAD), 5: ((-50, -50, 10, 10), MAYBE),
                    6: ((1e6, 1e6, 2e6, 2e6), BAD),
                    7: ((-3.4e38, -3.4e38, 3.4e38, 3.4e38), MAYBE)}[which]
        method = "Search" if rng.random() < 0.6 else "Embed"
        if method == "Search":
            req = _search(good(), bbox=box, options=search_pb2.SearchOptions(
                skip_detection=bool(rng.random() < 0.5)))
        else:
            req = search_pb2.EmbedRequest(image=good(), bbox=search_pb2.Box(
                x1=box[0], y1=box[1], x2=box[2], y2=box[3]))
        return FuzzCase("bbox", method, req, exp)

    def category() -> FuzzCase:
        which = int(rng.integers(4))
        if which == 0 and categories:
            return FuzzCase("category", "Search", _search(
                good(), category_hint=categories[int(rng.integers(len(categories)))]), OK)
        name = ["no-such-category", "\x00", "é" * 1000, "x" * 100_000][which]
        return FuzzCase("category", "Search", _search(good(), category_hint=name), BAD)

    def hint_and_all() -> FuzzCase:
        opts = search_pb2.SearchOptions(all_categories=True)
        hint = categories[0] if categories else "no-such-category"
        return FuzzCase("hint_and_all", "Search",
                        _search(good(), category_hint=hint, options=opts), BAD)

    def oversized() -> FuzzCase:
        method = ["Search", "Detect", "Embed"][int(rng.integers(3))]
        if method == "Search" and rng.random() < 0.5:
            req = _search(good(), category_hint="x" * (limit + 1024))
        else:
            req = {"Search": search_pb2.SearchRequest, "Detect": search_pb2.DetectRequest,
                   "Embed": search_pb2.EmbedRequest}[method](image=huge)
        return FuzzCase("oversized", method, req, TOO_BIG)

    makers: list[tuple[str, Callable[[], FuzzCase]]] = []
    for kind, make in images.items():
        def image_case(kind: str = kind, make: Callable = make) -> FuzzCase:
            data, exp = make()
            method = ["Search", "Search", "Detect", "Embed"][int(rng.integers(4))]
            if method == "Search":
                req: Any = _search(data, options=search_pb2.SearchOptions(
                    skip_detection=bool(rng.random() < 0.3)))
            elif method == "Detect":
                req = search_pb2.DetectRequest(image=data)
            else:
                req = search_pb2.EmbedRequest(image=data)
            return FuzzCase(kind, method, req, exp)
        makers.append((kind, image_case))
    makers += [("top_k", top_k), ("bbox", bbox), ("category", category),
               ("hint_and_all", hint_and_all), ("oversized", oversized)]
    for i in range(n):
        yield makers[i % len(makers)][1]()


#: Every kind :func:`generate_cases` makes, in its round-robin order.
KINDS = (*_image_cases(np.random.default_rng(0)).keys(), "top_k", "bbox", "category",
         "hint_and_all", "oversized")


# ---------------------------------------------------------------------- server
def rss_kb(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (``VmRSS`` of ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def spawn_server(index_root: Path, *, max_message_mb: float = 16.0, workers: int = 4,
                 detector: bool = True, extra: tuple[str, ...] = ()
                 ) -> tuple[subprocess.Popen, str]:
    """``benchmarks.latency.spawn_server`` with the fuzz's settings: ``workers`` RPC threads,
    ``max_message_mb``, and the version's detector unless ``detector`` is False."""
    flags = ("--workers", str(workers), "--max-message-mb", str(max_message_mb),
             *(() if detector else ("--no-detector",)), *extra)
    return latency.spawn_server(index_root, *flags)


def route(method: str, request: Any) -> str:
    """The path a request takes through the server: ``"Detect"``, or ``"Search"`` /
    ``"Embed"`` with ``"(detector)"`` (the main object is detected), ``"(skip_detection)"``
    (the whole image) or ``"(bbox)"`` (the caller's box)."""
    if method == "Detect":
        return method
    skip = (request.options.skip_detection if method == "Search"
            else request.skip_detection)
    how = "bbox" if request.HasField("bbox") else "skip_detection" if skip else "detector"
    return f"{method} ({how})"


def run_fuzz(proc: subprocess.Popen, target: str, cases: Iterator[FuzzCase], *,
             timeout: float = 10.0, warmup: int = 200,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Send every case to the server ``proc`` listening on ``target``; stop at a crash.

    Returns:
        ``{"n", "table": {kind: {code: count}}, "unexpected": [{kind, method, code,
        expected, detail}] (codes outside a case's expected set, at most 50 kept),
        "n_unexpected", "failures": {code: count} (INTERNAL / UNKNOWN / DEADLINE_EXCEEDED /
        CRASH), "routes": {route: {code: count}} (:func:`route`), "rss_kb": {"warm", "end"},
        "rss_growth", "wall_s"}``. ``rss_growth`` is end / warm - 1 (RSS after ``warmup``
        cases and at the end).
    """
    limit = 1 << 30
    channel = grpc.insecure_channel(target, options=[
        ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)])
    stub = search_pb2_grpc.VisualSearchStub(channel)
    grpc.channel_ready_future(channel).result(timeout=30)
    table: dict[str, Counter] = {}
    routes: dict[str, Counter] = {}
    unexpected: list[dict[str, Any]] = []
    n_unexpected = 0
    failures: Counter = Counter()
    rss_warm = rss_end = None
    n = 0
    t0 = time.perf_counter()
    try:
        for case in cases:
            if n == warmup:
                rss_warm = rss_kb(proc.pid)
            detail = ""
            try:
                getattr(stub, case.method)(case.request, timeout=timeout)
                code = "OK"
            except grpc.RpcError as e:
                code, detail = e.code().name, e.details() or ""
                if code == "UNAVAILABLE" and proc.poll() is not None:
                    code = "CRASH"
            n += 1
            table.setdefault(case.kind, Counter())[code] += 1
            routes.setdefault(route(case.method, case.request), Counter())[code] += 1
            if code in FAILING:
                failures[code] += 1
            if code not in case.expected:
                n_unexpected += 1
                if len(unexpected) < 50:
                    unexpected.append({"kind": case.kind, "method": case.method, "code": code,
                                       "expected": sorted(case.expected),
                                       "detail": detail[:300]})
            if progress is not None:
                progress(n)
            if code == "CRASH":
                break
        if proc.poll() is None:
            rss_end = rss_kb(proc.pid)
    finally:
        channel.close()
    if rss_warm is None:  # fewer cases than the warm-up: compare with the end only
        rss_warm = rss_end
    growth = (rss_end / rss_warm - 1.0) if rss_warm and rss_end else None
    return {"n": n, "table": {k: dict(v) for k, v in table.items()},
            "unexpected": unexpected, "n_unexpected": n_unexpected,
            "failures": dict(failures), "routes": {k: dict(v) for k, v in sorted(routes.items())},
            "rss_kb": {"warm": rss_warm, "end": rss_end},
            "rss_growth": growth, "wall_s": time.perf_counter() - t0}


def passed(report: dict[str, Any], max_rss_growth: float = 0.10) -> bool:
    """No crash, INTERNAL, UNKNOWN or hang, and RSS within ``max_rss_growth`` after warm-up."""
    growth = report["rss_growth"]
    return not report["failures"] and growth is not None and growth <= max_rss_growth


def format_table(report: dict[str, Any], key: str = "table") -> str:
    """The kind (``key="table"``) or route (``key="routes"``) x status code table, one row
    per kind or route, one column per code seen."""
    rows = report[key]
    codes = sorted({c for row in rows.values() for c in row})
    width = max([len(k) for k in rows] + [4])
    lines = [f"{'kind' if key == 'table' else 'route':<{width}} "
             + " ".join(f"{c:>18}" for c in codes)]
    for name in KINDS if key == "table" else sorted(rows):
        row = rows.get(name)
        if row:
            lines.append(f"{name:<{width}} " + " ".join(f"{row.get(c, 0):>18}" for c in codes))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-root", type=Path, required=True,
                   help="serve this index root (a child visearch-serve, with the active "
                        "version's detector when it ships one)")
    p.add_argument("--no-detector", action="store_true",
                   help="serve without the detector (the main object is the whole image)")
    p.add_argument("--n", type=int, default=10_000, help="hostile inputs to send")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=10.0, help="per-call deadline, seconds")
    p.add_argument("--warmup", type=int, default=500, help="cases before the first RSS sample")
    p.add_argument("--max-message-mb", type=float, default=16.0,
                   help="the server's message limit")
    p.add_argument("--workers", type=int, default=4, help="server RPC threads")
    p.add_argument("--json", type=Path, help="write the report here")


def run(args: argparse.Namespace) -> int:
    """Serve, send the hostile inputs, print the report; 0 when it passed."""
    proc, target = spawn_server(args.index_root, max_message_mb=args.max_message_mb,
                                workers=args.workers, detector=not args.no_detector)
    try:
        from server.client import SearchClient

        with SearchClient(target) as client:
            client.wait_ready(30)
            info = client.index_info()
            categories = tuple(c.category for c in info.categories)
        from visearch.progress import progress_bar

        # Off a terminal the bar is log lines (INFO): shown even when the rest logs WARNING.
        logging.getLogger("visearch.progress").setLevel(logging.INFO)
        with progress_bar(total=args.n, desc="fuzz", unit="req", file=sys.stderr) as bar:
            report = run_fuzz(proc, target, generate_cases(
                args.n, args.seed, max_message_mb=args.max_message_mb, categories=categories),
                timeout=args.timeout, warmup=min(args.warmup, args.n // 5),
                progress=lambda _: bar.update(1))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    report.update(seed=args.seed, machine=machine(["grpcio", "pillow"]), ok=passed(report),
                  has_detector=info.has_detector, version=info.version)
    m = report["machine"]
    print(f"machine: {m['cpu_count']} CPUs, torch {m['torch']}, grpcio {m['grpcio']}, "
          f"pillow {m['pillow']}, cuda {m['cuda']}")
    print(f"{report['n']} hostile inputs (seed {args.seed}) in {report['wall_s']:.1f} s "
          f"to {target}")
    print(format_table(report))
    print(f"by route (the served version {'has' if info.has_detector else 'has no'} detector):")
    print(format_table(report, "routes"))
    rss = report["rss_kb"]
    growth = report["rss_growth"]
    print(f"server RSS: {rss['warm']} KiB after warm-up, {rss['end']} KiB at the end "
          f"({'n/a' if growth is None else f'{100 * growth:+.1f}%'})")
    print(f"failures (crash / INTERNAL / UNKNOWN / hang): {report['failures'] or 'none'}; "
          f"outside the expected codes: {report['n_unexpected']}")
    for u in report["unexpected"][:10]:
        print(f"  {u['kind']} {u['method']}: {u['code']} (expected {u['expected']}) "
              f"{u['detail'][:120]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    print("PASS" if report["ok"] else "FAIL")
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.fuzz", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
