"""``visearch-query``: search a photo on a running server, and the reusable client class.

    visearch-query PHOTO --server HOST:PORT [--top-k 10] [--category shoe]
                   [--bbox x1,y1,x2,y2] [--no-rerank] [--json]
    visearch-query PHOTO --mode describe      # category top-5 and attributes, no results
    visearch-query PHOTO --mode cutout --out product.png   # + product.mask.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server._proto import search_pb2, search_pb2_grpc
from server.servicer import ADMIN_TOKEN_KEY, SERVICE_NAME


class SearchClient:
    """A typed VisualSearch client (also health and reflection), for tests and benchmarks.

    Args:
        target: ``host:port``.
        timeout: default per-call deadline, seconds.
        tls_ca: PEM file of the CA that signed the server's certificate (TLS when given).
        admin_token: sent with ReloadIndex.
        max_message_mb: the largest message the client sends or receives.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        tls_ca: str | Path | None = None,
        admin_token: str | None = None,
        max_message_mb: float = 64.0,
    ) -> None:
        limit = int(max_message_mb * 1024 * 1024)
        options = [("grpc.max_send_message_length", limit),
                   ("grpc.max_receive_message_length", limit)]
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.timeout = timeout
        self.admin_token = admin_token
        self.stub = search_pb2_grpc.VisualSearchStub(self.channel)

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects (``grpc.FutureTimeoutError`` otherwise)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def search(
        self,
        image: bytes,
        *,
        top_k: int = 0,
        category: str | None = None,
        bbox: Sequence[float] | None = None,
        rerank: bool | None = None,
        skip_detection: bool = False,
        all_categories: bool = False,
        timeout: float | None = None,
    ) -> search_pb2.SearchResponse:
        """One Search call; ``grpc.RpcError`` carries the status on failure."""
        request = search_pb2.SearchRequest(
            image=image, top_k=top_k, category_hint=category or "",
            options=search_pb2.SearchOptions(skip_detection=skip_detection,
                                             all_categories=all_categories))
        if rerank is not None:
            request.options.rerank = rerank
        if bbox is not None:
            request.bbox.CopyFrom(search_pb2.Box(x1=bbox[0], y1=bbox[1], x2=bbox[2], y2=bbox[3]))
        return self.stub.Search(request, timeout=timeout or self.timeout)

    def detect(self, image: bytes, *, timeout: float | None = None) -> search_pb2.DetectResponse:
        return self.stub.Detect(search_pb2.DetectRequest(image=image),
                                timeout=timeout or self.timeout)

    def embed(self, image: bytes, *, bbox: Sequence[float] | None = None,
              skip_detection: bool = False,
              timeout: float | None = None) -> search_pb2.EmbedResponse:
        request = search_pb2.EmbedRequest(image=image, skip_detection=skip_detection)
        if bbox is not None:
            request.bbox.CopyFrom(search_pb2.Box(x1=bbox[0], y1=bbox[1], x2=bbox[2], y2=bbox[3]))
        return self.stub.Embed(request, timeout=timeout or self.timeout)

    def describe(self, image: bytes, *, bbox: Sequence[float] | None = None,
                 skip_detection: bool = False,
                 timeout: float | None = None) -> search_pb2.DescribeResponse:
        request = search_pb2.DescribeRequest(image=image, skip_detection=skip_detection)
        if bbox is not None:
            request.bbox.CopyFrom(search_pb2.Box(x1=bbox[0], y1=bbox[1], x2=bbox[2], y2=bbox[3]))
        return self.stub.Describe(request, timeout=timeout or self.timeout)

    def cutout(self, image: bytes, *, bbox: Sequence[float] | None = None,
               timeout: float | None = None) -> search_pb2.CutoutResponse:
        request = search_pb2.CutoutRequest(image=image)
        if bbox is not None:
            request.bbox.CopyFrom(search_pb2.Box(x1=bbox[0], y1=bbox[1], x2=bbox[2], y2=bbox[3]))
        return self.stub.Cutout(request, timeout=timeout or self.timeout)

    def index_info(self, *, timeout: float | None = None) -> search_pb2.IndexInfo:
        return self.stub.GetIndexInfo(search_pb2.GetIndexInfoRequest(),
                                      timeout=timeout or self.timeout)

    def reload(self, version: str | None = None, *, token: str | None = None,
               timeout: float | None = None) -> search_pb2.ReloadIndexResponse:
        """ReloadIndex with the admin token (``token`` or the client's)."""
        token = token if token is not None else self.admin_token
        metadata = [(ADMIN_TOKEN_KEY, token)] if token is not None else None
        return self.stub.ReloadIndex(search_pb2.ReloadIndexRequest(version=version or ""),
                                     metadata=metadata, timeout=timeout or self.timeout)

    def health(self, service: str = SERVICE_NAME, *, timeout: float | None = None) -> str:
        """The health status name (``"SERVING"``, ``"NOT_SERVING"``, ...)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        res = stub.Check(health_pb2.HealthCheckRequest(service=service),
                         timeout=timeout or self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(res.status)

    def list_services(self, *, timeout: float | None = None) -> list[str]:
        """Service names the server lists through reflection."""
        stub = reflection_pb2_grpc.ServerReflectionStub(self.channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = stub.ServerReflectionInfo(iter([request]), timeout=timeout or self.timeout)
        names: list[str] = []
        for res in responses:
            names.extend(s.name for s in res.list_services_response.service)
        return sorted(names)


def _understanding(res: search_pb2.SearchResponse | search_pb2.DescribeResponse) -> list[str]:
    """The main object, the category vote, its top-5 and the predicted attributes."""
    lines = []
    mo = res.main_object
    b = mo.box
    lines.append(f"main object: [{b.x1:.0f}, {b.y1:.0f}, {b.x2:.0f}, {b.y2:.0f}] from "
                 f"{mo.source}{' (fallback)' if mo.fallback else ''}"
                 + (f", {mo.category} {mo.score:.2f}" if mo.category else ""))
    if res.detections:
        lines.append(f"detections: {len(res.detections)} (" + ", ".join(
            f"{d.category} {d.score:.2f}" for d in res.detections[:5]) + ")")
    cat = res.category
    lines.append(f"category: {cat.category or '(all)'} {cat.score:.2f} by {cat.source}")
    for v in cat.votes[:5]:
        lines.append(f"    {v.category:<14} detector {v.detector:.2f}  neighbours "
                     f"{v.neighbours:.2f}  head {v.head:.2f}  combined {v.combined:.2f}")
    if res.category_top:
        lines.append("category top-5: " + ", ".join(
            f"{c.category} {c.score:.2f}" for c in res.category_top))
    if res.attributes:
        lines.append("attributes:")
        for a in res.attributes:
            lines.append(f"    {a.name:<10} " + ", ".join(
                f"{v.value} {v.score:.2f}" for v in a.values))
    return lines


def format_response(res: search_pb2.SearchResponse) -> str:
    """A readable report of one search: object, category vote and top-5, attributes,
    results table (with each item's catalog attributes), timings."""
    lines = [f"index version: {res.index_version}   re-ranked: {'yes' if res.reranked else 'no'}"]
    lines += _understanding(res)
    lines.append("")
    header = f"{'rank':>4}  {'sku':<12} {'score':>6} {'sim':>6}  {'category':<12} title"
    lines += [header, "-" * len(header)]
    for rank, r in enumerate(res.results, 1):
        lines.append(f"{rank:>4}  {r.sku:<12} {r.score:>6.3f} {r.similarity:>6.3f}  "
                     f"{r.category:<12} {r.title}")
        if r.attributes:
            attrs = sorted(r.attributes.items())
            lines.append(f"{'':>6}" + ", ".join(f"{k}={v}" for k, v in attrs))
    lines.append("")
    lines.append("timings (ms): " + "  ".join(f"{t.stage} {t.ms:.1f}" for t in res.timings))
    return "\n".join(lines)


def format_describe(res: search_pb2.DescribeResponse) -> str:
    """A readable report of one Describe call."""
    lines = [f"index version: {res.index_version}", *_understanding(res), ""]
    lines.append("timings (ms): " + "  ".join(f"{t.stage} {t.ms:.1f}" for t in res.timings))
    return "\n".join(lines)


def write_cutout(res: search_pb2.CutoutResponse, out: Path) -> list[Path]:
    """Write the RGBA PNG to ``out`` and the mask to ``<out stem>.mask.png`` beside it;
    returns the paths written (none unless the cut-out's status is "ok")."""
    if res.status != "ok":
        return []
    mask = out.with_name(out.stem + ".mask.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(res.rgba_png)
    mask.write_bytes(res.mask_png)
    return [out, mask]


def _bbox(text: str) -> tuple[float, float, float, float]:
    parts = [float(v) for v in text.replace(" ", "").split(",")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError("--bbox takes x1,y1,x2,y2 (pixels)")
    return (parts[0], parts[1], parts[2], parts[3])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="visearch-query", description=__doc__.splitlines()[0])
    p.add_argument("photo", type=Path, help="image file to search with")
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--category", help="search this category instead of the voted one")
    p.add_argument("--bbox", type=_bbox, help="x1,y1,x2,y2 of the product, in pixels")
    p.add_argument("--no-rerank", action="store_true")
    p.add_argument("--no-detect", action="store_true", help="embed the whole image")
    p.add_argument("--all-categories", action="store_true",
                   help="search the whole index, not only the voted category")
    p.add_argument("--mode", choices=("search", "describe", "cutout"), default="search",
                   help="search (SKUs), describe (category top-5 and attributes only) or "
                   "cutout (write the product's RGBA PNG and alpha mask to --out)")
    p.add_argument("--out", type=Path, default=Path("cutout.png"),
                   help="cutout mode: the RGBA PNG; the mask goes to <stem>.mask.png")
    p.add_argument("--json", action="store_true", help="print the response as JSON")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline, seconds")
    p.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) for a TLS server")
    args = p.parse_args(argv)
    try:
        image = args.photo.read_bytes()
    except OSError as e:
        print(f"visearch-query: cannot read {args.photo}: {e}", file=sys.stderr)
        return 2
    with SearchClient(args.server, timeout=args.timeout, tls_ca=args.tls_ca) as client:
        try:
            if args.mode == "describe":
                res = client.describe(image, bbox=args.bbox, skip_detection=args.no_detect)
            elif args.mode == "cutout":
                res = client.cutout(image, bbox=args.bbox)
            else:
                res = client.search(image, top_k=args.top_k, category=args.category,
                                    bbox=args.bbox, rerank=False if args.no_rerank else None,
                                    skip_detection=args.no_detect,
                                    all_categories=args.all_categories)
        except grpc.RpcError as e:
            print(f"visearch-query: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.mode == "cutout":
        written = write_cutout(res, args.out)
        b = res.box
        print(f"cut-out {res.status}: quality {res.quality:.3f}, box [{b.x1:.0f}, {b.y1:.0f}, "
              f"{b.x2:.0f}, {b.y2:.0f}]" + (f" -> {', '.join(map(str, written))}" if written
                                             else ""))
        return 0 if written else 1
    if args.json:
        print(json.dumps(json_format.MessageToDict(res, preserving_proto_field_name=True),
                         indent=2))
    else:
        print(format_describe(res) if args.mode == "describe" else format_response(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
