"""``visearch-serve``: the VisualSearch gRPC server, with health checking and reflection.

    visearch-serve --index-root DIR --port 50051 [--host 0.0.0.0] [--workers 8]
                   [--admin-token TOKEN] [--tls-cert C --tls-key K] [--max-message-mb 16]
                   [--watch] [--metrics-port PORT] [--http-port PORT] [--no-detector] ...

SIGTERM/SIGINT: health turns NOT_SERVING, new calls are refused, in-flight ones get a grace
period, then the process exits 0.

``--metrics-port`` serves Prometheus metrics (``server/metrics.py`` lists them) over HTTP at
``/metrics`` on the same host; 0 picks a free port, which is logged.

``--http-port`` serves the web page (``server/web.py``) on the same host: upload a photo, see
its detections, category vote and results. Its calls reach this same gRPC server through a
private Unix socket (in a 0700 temp directory), so they get the gRPC side's checks,
limits and metrics, whatever TLS the TCP port uses. Shutdown stops the page first (requests
in flight finish), then gRPC.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server._proto import search_pb2_grpc
from server.metrics import MetricsHTTPServer, ServerMetrics
from server.servicer import SERVICE_NAME, PipelineHolder, VisualSearchServicer
from server.web import WebApp, WebServer
from visearch.detection.main_object import MAIN_SCORE_THRESH
from visearch.index import IndexRoot, IndexVersion
from visearch.search.pipeline import RESTRICT_MIN_SCORE, RerankParams, SearchPipeline
from visearch.search.voting import VoteWeights

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Everything ``visearch-serve`` can be told; converted to library kwargs in one place."""

    index_root: Path
    port: int = 50051
    host: str = "127.0.0.1"
    workers: int = 8
    admin_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_mb: float = 16.0
    watch: bool = False
    watch_interval_s: float = 1.0
    use_detector: bool = True
    device: str | None = None
    #: "onnx" runs the models on ONNX Runtime when the version holds their ONNX files (each
    #: model without one runs on torch, with a warning); "torch" always uses torch
    runtime: str = "onnx"
    #: threads per model call (ONNX Runtime intra-op; torch's, process-wide, set by main()).
    #: 1 by default: requests run in parallel on their own threads and share a micro-batch,
    #: and on a busy CPU a 2-thread team spends its time waiting at barriers (a 96 px
    #: detection took 8 ms on 1 ONNX Runtime thread and 17 ms on 2; torch's 19 ms and 1.5 s,
    #: benchmarks/RESULTS.md, fast serving). None: each runtime's default (every core).
    intra_op_threads: int | None = 1
    rerank: bool = True
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    shortlist: int = 50
    vote_k: int = 20
    #: search the voted category only when its vote is at least this confident (0: always)
    restrict_min_score: float = RESTRICT_MIN_SCORE
    detector_weight: float = 1.0
    neighbour_weight: float = 1.0
    vote_temperature: float | None = 0.25
    detect_thresh: float = MAIN_SCORE_THRESH
    default_top_k: int = 10
    max_top_k: int = 100
    max_batch_size: int = 8
    batch_window_ms: float = 2.0
    grace_s: float = 5.0
    version: str | None = None
    metrics_port: int | None = None  # None: no metrics; 0: a free port
    http_port: int | None = None  # the web page; None: none; 0: a free port

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {
            "vote_weights": VoteWeights(self.detector_weight, self.neighbour_weight,
                                        self.vote_temperature),
            "rerank": RerankParams(self.k1, self.k2, self.lambda_value, self.shortlist)
            if self.rerank else None,
            "vote_k": self.vote_k,
            "restrict_min_score": self.restrict_min_score,
            "detect_thresh": self.detect_thresh,
            "default_top_k": self.default_top_k,
            "max_top_k": self.max_top_k,
            "max_batch_size": self.max_batch_size,
            "batch_window_ms": self.batch_window_ms,
        }

    def factory(self, version: IndexVersion) -> SearchPipeline:
        return SearchPipeline.from_version(version, use_detector=self.use_detector,
                                           device=self.device, runtime=self.runtime,
                                           intra_op_threads=self.intra_op_threads,
                                           **self.pipeline_kwargs())


class RunningServer:
    """A started server: its bound port, pipeline holder, health servicer, CURRENT watcher,
    and with ``config.metrics_port`` set, its :attr:`metrics` and their HTTP server (bound
    by :meth:`start`; its port is then :attr:`metrics_port`); with ``config.http_port``
    set, the web page (:attr:`web`, bound by :meth:`start`, port :attr:`http_port`)."""

    def __init__(self, config: ServeConfig, holder: PipelineHolder | None = None) -> None:
        self.config = config
        self.holder = holder or PipelineHolder(IndexRoot(config.index_root), config.factory,
                                               config.version)
        self.metrics: ServerMetrics | None = None
        self.metrics_http: MetricsHTTPServer | None = None
        if config.metrics_port is not None:
            self.metrics = ServerMetrics()
            self.metrics.watch(self.holder)
        limit = int(config.max_message_mb * 1024 * 1024)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers,
                                       thread_name_prefix="visearch-rpc"),
            interceptors=[self.metrics.interceptor()] if self.metrics else None,
            options=[("grpc.max_receive_message_length", limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)],
        )
        self.servicer = VisualSearchServicer(self.holder, admin_token=config.admin_token,
                                             metrics=self.metrics)
        search_pb2_grpc.add_VisualSearchServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        address = f"{config.host}:{config.port}"
        if config.tls_cert or config.tls_key:
            if not (config.tls_cert and config.tls_key):
                raise ValueError("TLS needs both --tls-cert and --tls-key")
            creds = grpc.ssl_server_credentials(
                [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {address}")
        self.web: WebServer | None = None
        self._web_dir: str | None = None
        if config.http_port is not None:
            # The web page's own way in: plaintext, reachable only by this user.
            self._web_dir = tempfile.mkdtemp(prefix="visearch-web-")
            self._web_target = f"unix:{self._web_dir}/grpc.sock"
            if self.server.add_insecure_port(self._web_target) == 0:
                raise OSError(f"cannot bind {self._web_target} for the web page")
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def metrics_port(self) -> int | None:
        """The bound metrics port once started (None without metrics)."""
        return self.metrics_http.port if self.metrics_http is not None else None

    @property
    def http_port(self) -> int | None:
        """The bound web page port once started (None without the page)."""
        return self.web.port if self.web is not None else None

    def start(self) -> RunningServer:
        """Serve metrics and the web page (when configured), then calls. Raises ``OSError``
        when the metrics or web port cannot be bound (nothing is served then)."""
        if self.metrics is not None and self.metrics_http is None:
            assert self.config.metrics_port is not None
            self.metrics_http = MetricsHTTPServer(self.metrics.registry,
                                                  self.config.metrics_port, self.config.host)
        if self.config.http_port is not None and self.web is None:
            limit = int(self.config.max_message_mb * 1024 * 1024)
            app = WebApp(self._web_target, self.config.index_root, max_upload_bytes=limit)
            try:
                self.web = WebServer(app, self.config.http_port, self.config.host,
                                     grace_s=self.config.grace_s)
            except OSError:
                app.close()
                if self.metrics_http is not None:
                    self.metrics_http.close()
                    self.metrics_http = None
                raise
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.watch:
            self._watcher = threading.Thread(target=self._watch, name="visearch-watch",
                                             daemon=True)
            self._watcher.start()
        log.info("listening on %s:%d (%s)", self.config.host, self.port,
                 "TLS" if self.config.tls_cert else "plaintext")
        return self

    def _watch(self) -> None:
        """Poll ``<root>/CURRENT``; reload when it names another version."""
        failed: str | None = None
        while not self._stop.wait(self.config.watch_interval_s):
            try:
                current = self.holder.root.current()
            except Exception as e:
                log.warning("cannot read CURRENT: %s", e)
                continue
            if current is None or current == self.holder.version or current == failed:
                continue
            try:
                self.holder.reload(current)
                failed = None
            except Exception:  # logged by the holder; retry only when CURRENT changes
                failed = current

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within ``grace`` s, release the index."""
        self._stop.set()
        self.health.enter_graceful_shutdown()
        if self.web is not None:  # its requests in flight still reach gRPC
            self.web.close()
            self.web = None
        self.server.stop(self.config.grace_s if grace is None else grace).wait()
        if self._web_dir is not None:
            shutil.rmtree(self._web_dir, ignore_errors=True)
            self._web_dir = None
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        if self.metrics_http is not None:
            self.metrics_http.close()
            self.metrics_http = None
        self.holder.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visearch-serve", description=__doc__.splitlines()[0])
    p.add_argument("--index-root", type=Path, required=True, help="index root directory")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 / [::] to accept remote calls")
    p.add_argument("--workers", type=int, default=8, help="RPC worker threads")
    p.add_argument("--admin-token", default=os.environ.get("VISEARCH_ADMIN_TOKEN"),
                   help="enables ReloadIndex (default: $VISEARCH_ADMIN_TOKEN)")
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--max-message-mb", type=float, default=16.0,
                   help="larger requests get RESOURCE_EXHAUSTED")
    p.add_argument("--watch", action="store_true", help="reload when <root>/CURRENT changes")
    p.add_argument("--watch-interval", type=float, default=1.0, help="seconds")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (0 picks a free one; "
                        "default: off)")
    p.add_argument("--http-port", type=int, default=None,
                   help="serve the web page on this port (0 picks a free one; default: off)")
    p.add_argument("--version", help="serve this version instead of CURRENT")
    p.add_argument("--no-detector", action="store_true", help="embed the whole image")
    p.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    p.add_argument("--runtime", choices=("onnx", "torch"), default="onnx",
                   help="model runtime: ONNX Runtime (the version's ONNX files; torch for a "
                        "model without one) or torch")
    p.add_argument("--threads", dest="intra_op_threads", type=int, default=1,
                   help="threads per model call, torch and ONNX Runtime (default 1: requests "
                        "run in parallel; 0: every core)")
    p.add_argument("--no-rerank", action="store_true", help="disable k-reciprocal re-ranking")
    p.add_argument("--k1", type=int, default=20)
    p.add_argument("--k2", type=int, default=6)
    p.add_argument("--lambda", dest="lambda_value", type=float, default=0.3)
    p.add_argument("--shortlist", type=int, default=50, help="hits re-ranked per query")
    p.add_argument("--vote-k", type=int, default=20, help="neighbours voting on the category")
    p.add_argument("--restrict-min-score", type=float, default=RESTRICT_MIN_SCORE,
                   help="search the voted category only when the vote's probability is at "
                        "least this, else the whole index (0: always restrict; default "
                        f"{RESTRICT_MIN_SCORE})")
    p.add_argument("--detector-weight", type=float, default=1.0)
    p.add_argument("--neighbour-weight", type=float, default=1.0)
    p.add_argument("--vote-temperature", type=float, default=0.25,
                   help="relative softmax temperature of neighbour votes (0: raw similarity)")
    p.add_argument("--detect-thresh", type=float, default=0.1,
                   help="lowest score of a main object (else the whole image is searched)")
    p.add_argument("--max-top-k", type=int, default=100)
    p.add_argument("--max-batch-size", type=int, default=8, help="micro-batch size")
    p.add_argument("--batch-window-ms", type=float, default=2.0, help="micro-batch window")
    p.add_argument("--grace", type=float, default=5.0, help="shutdown grace period, seconds")
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        index_root=args.index_root, port=args.port, host=args.host, workers=args.workers,
        admin_token=args.admin_token, tls_cert=args.tls_cert, tls_key=args.tls_key,
        max_message_mb=args.max_message_mb, watch=args.watch,
        watch_interval_s=args.watch_interval, use_detector=not args.no_detector,
        device=args.device, runtime=args.runtime,
        intra_op_threads=args.intra_op_threads or None,
        rerank=not args.no_rerank, k1=args.k1, k2=args.k2,
        lambda_value=args.lambda_value, shortlist=args.shortlist, vote_k=args.vote_k,
        restrict_min_score=args.restrict_min_score,
        detector_weight=args.detector_weight, neighbour_weight=args.neighbour_weight,
        vote_temperature=args.vote_temperature or None, detect_thresh=args.detect_thresh,
        max_top_k=args.max_top_k, max_batch_size=args.max_batch_size,
        batch_window_ms=args.batch_window_ms, grace_s=args.grace, version=args.version,
        metrics_port=args.metrics_port, http_port=args.http_port,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    if config.intra_op_threads is not None:
        import torch

        torch.set_num_threads(config.intra_op_threads)  # process-wide: the CLI's to set
    try:
        running = RunningServer(config).start()
    except (ValueError, OSError) as e:
        print(f"visearch-serve: {e}", file=sys.stderr)
        return 2
    if not args.admin_token:
        log.info("no --admin-token: ReloadIndex is disabled%s",
                 " (--watch still reloads)" if args.watch else "")
    print(f"visearch-serve: serving {running.holder.version} on {args.host}:{running.port}",
          flush=True)
    if running.web is not None:
        print(f"visearch-serve: web page at {running.web.url}", flush=True)
    stopped = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down (grace %.1f s)", signum, args.grace)
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopped.wait(0.5):  # a timed wait lets the signal handler run promptly
        pass
    running.stop()
    print("visearch-serve: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
