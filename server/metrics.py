"""Prometheus metrics of the VisualSearch server, in one registry per server.

Every metric the server exports is defined here:

========================================  =========  =============================================
name                                      type       labels / meaning
========================================  =========  =============================================
``grpc_server_handled_total``             counter    ``grpc_service``, ``grpc_method``,
                                                     ``grpc_code``: unary calls finished, by
                                                     status code (``OK``, ``INVALID_ARGUMENT``...)
``grpc_server_handling_seconds``          histogram  ``grpc_service``, ``grpc_method``: end to
                                                     end time in the handler, seconds
``visearch_stage_seconds``                histogram  ``grpc_method``, ``stage``: the pipeline's
                                                     own stage timings of successful calls
                                                     (``decode``, ``detect``, ``embed``, ...,
                                                     ``total``), seconds
``visearch_batch_size``                   histogram  ``model`` (``embed`` / ``detect``): items per
                                                     micro-batch forward pass
``visearch_index_info``                   info       ``version``: the index version new requests
                                                     get (changes on hot swap)
``visearch_index_items``                  gauge      items in that version's index
``visearch_index_reloads_total``          counter    hot swaps since the server started
========================================  =========  =============================================

The ``grpc_server_*`` names and labels are those of the grpc-ecosystem Prometheus
interceptors (go-grpc-prometheus, py-grpc-prometheus), so their dashboards work unchanged.
Calls refused before the handler runs (oversized messages, unknown methods) and streaming
calls (health ``Watch``, reflection) are not counted.

A per-server :class:`prometheus_client.CollectorRegistry` (never the process-global default)
lets several servers live in one process, as the tests do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from server.servicer import PipelineHolder
    from visearch.search.pipeline import SearchPipeline

log = logging.getLogger(__name__)

# Seconds. Pipeline stages run from microseconds (vote) to a second (a cold CPU detector).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Items per forward pass; powers of two, as --max-batch-size usually is.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The server's metrics and the hooks that feed them.

    Wire-up: pass :meth:`interceptor` to ``grpc.server(interceptors=...)`` (request counts,
    end-to-end latency), give this object to the servicer (stage timings), call
    :meth:`watch` with the pipeline holder (batch sizes, index version), and expose
    :attr:`registry` with :class:`MetricsHTTPServer`.

    Args:
        registry: where the metrics live (default: a fresh registry of this server's own).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.handled = Counter(
            "grpc_server_handled", "Unary RPCs completed on the server, by status code.",
            ["grpc_service", "grpc_method", "grpc_code"], registry=self.registry)
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the handler's start to its response or error, seconds.",
            ["grpc_service", "grpc_method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram(
            "visearch_stage_seconds",
            "Query pipeline stage times of successful calls, seconds (stage 'total' is the "
            "pipeline's own end to end).",
            ["grpc_method", "stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "visearch_batch_size", "Items per micro-batched model forward pass.",
            ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self._index: _IndexCollector | None = None

    # ------------------------------------------------------------------ feeding
    def observe_call(self, service: str, method: str, code: grpc.StatusCode,
                     seconds: float) -> None:
        """One finished call of ``/service/method`` with status ``code`` after ``seconds``."""
        self.handled.labels(service, method, code.name).inc()
        self.handling_seconds.labels(service, method).observe(seconds)

    def observe_stages(self, method: str, timings_ms: dict[str, float]) -> None:
        """The pipeline's stage timings of one successful call (milliseconds, as the
        pipeline reports them; recorded in seconds)."""
        for stage, ms in timings_ms.items():
            self.stage_seconds.labels(method, stage).observe(ms / 1000.0)

    def batch_observer(self, model: str) -> Callable[[int], None]:
        """The ``MicroBatcher.on_batch`` callback that records ``model``'s batch sizes."""
        return self.batch_size.labels(model).observe

    def attach_batchers(self, pipeline: SearchPipeline) -> None:
        """Record the batch sizes of the pipeline's embed (and detect) workers."""
        for model, batcher in pipeline.batchers.items():
            batcher.on_batch = self.batch_observer(model)

    def watch(self, holder: PipelineHolder) -> None:
        """Export the holder's active version and item count (read at scrape time, so a hot
        swap shows on the next scrape) and record the batch sizes of every pipeline it
        serves, this one and reloaded ones. Call once per server."""
        if self._index is not None:
            raise RuntimeError("ServerMetrics.watch was already called; one holder per server")
        self._index = _IndexCollector(holder)
        self.registry.register(self._index)
        holder.add_load_hook(self.attach_batchers)

    def interceptor(self) -> grpc.ServerInterceptor:
        """A server interceptor that counts unary calls by status and times them."""
        return _MetricsInterceptor(self)


class _IndexCollector(Collector):
    """The served index version, its item count and the reload count, read at scrape time."""

    def __init__(self, holder: PipelineHolder) -> None:
        self.holder = holder

    @staticmethod
    def _families(version: str | None, items: int, reloads: int) -> list[Metric]:
        info = InfoMetricFamily("visearch_index", "The index version new requests get.",
                                labels=["version"])
        gauge = GaugeMetricFamily("visearch_index_items", "Items in the served index.")
        counter = CounterMetricFamily("visearch_index_reloads",
                                      "Index hot swaps since the server started.")
        if version is not None:
            info.add_metric([version], {})
            gauge.add_metric([], items)
            counter.add_metric([], reloads)
        return [info, gauge, counter]

    def describe(self) -> Iterable[Metric]:
        return self._families(None, 0, 0)

    def collect(self) -> Iterable[Metric]:
        # One lease: the version and its item count come from the same pipeline.
        with self.holder.lease() as pipeline:
            version, items = pipeline.version.version, pipeline.index.ntotal
        return self._families(version, int(items), self.holder.reloads)


def _split_method(full: str) -> tuple[str, str]:
    """``/visearch.v1.VisualSearch/Search`` -> (``visearch.v1.VisualSearch``, ``Search``)."""
    service, _, method = full.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


class _MetricsInterceptor(grpc.ServerInterceptor):
    """Wraps unary-unary handlers; the status is what the handler set or aborted with."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        service, method = _split_method(handler_call_details.method)
        inner = handler.unary_unary
        metrics = self.metrics

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            t0 = time.perf_counter()
            # An exception without context.abort() reaches the caller as UNKNOWN.
            code = grpc.StatusCode.UNKNOWN
            try:
                response = inner(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except Exception:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                # Recorded before gRPC sends the reply: a caller that has its answer sees
                # its call counted.
                metrics.observe_call(service, method, code, time.perf_counter() - t0)

        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class MetricsHTTPServer:
    """``GET /metrics`` (any path, in fact) for one registry, on prometheus_client's own
    threaded WSGI server.

    Args:
        registry: what to expose.
        port: TCP port; 0 picks a free one (read it back from :attr:`port`).
        host: address to bind.

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, registry: CollectorRegistry, port: int = 0,
                 host: str = "127.0.0.1") -> None:
        self.host = host
        self._httpd: WSGIServer
        self._thread: threading.Thread
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._httpd.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

