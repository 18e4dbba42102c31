"""The VisualSearch servicer: thin, typed, calling :class:`visearch.search.pipeline.SearchPipeline`.

:class:`PipelineHolder` owns the pipeline being served and swaps it atomically on reload:
every request leases the pipeline it started with, a retired pipeline is closed only when
its last request has finished, and a version that fails to load leaves the old one serving.
Load hooks (:meth:`PipelineHolder.add_load_hook`) see every pipeline before it takes requests
(server metrics attach their batch observers there).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from server._proto import search_pb2, search_pb2_grpc
from server.metrics import ServerMetrics
from visearch.embedding.heads import Prediction
from visearch.errors import IndexFormatError
from visearch.index import IndexRoot, IndexVersion
from visearch.search.pipeline import ChosenObject, Detection, SearchPipeline
from visearch.search.voting import CategoryDecision

log = logging.getLogger(__name__)

ADMIN_TOKEN_KEY = "x-visearch-admin-token"
SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["VisualSearch"].full_name
#: Longest status message sent back, in characters. The message travels in a trailer that
#: clients cap (16 KiB by default) and may quote the caller's input (an unknown category):
#: a longer one reaches the client as RESOURCE_EXHAUSTED instead of the real status.
MAX_DETAILS = 1024


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End the call with ``code``; the message cut to ``MAX_DETAILS`` characters (saying how
    long it was). Every status the servicer sends goes through here."""
    if len(message) > MAX_DETAILS:
        message = f"{message[:MAX_DETAILS - 40]}... (message cut, {len(message)} characters)"
    context.abort(code, message)  # raises: the handler ends here

PipelineFactory = Callable[[IndexVersion], SearchPipeline]
LoadHook = Callable[[SearchPipeline], None]


class PipelineHolder:
    """The served pipeline, with leases and atomic hot reload.

    Args:
        root: the index root; versions are opened from it.
        factory: builds a pipeline for a version (loads the models, warms up).
        version: the version to serve first (default: the one ``CURRENT`` names).
    """

    def __init__(self, root: IndexRoot, factory: PipelineFactory, version: str | None = None):
        self.root = root
        self.factory = factory
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._leases: dict[int, int] = {}
        self._retired: dict[int, SearchPipeline] = {}
        self._hooks: list[LoadHook] = []
        self._pipeline = factory(root.open(version))
        self.reloads = 0
        log.info("serving index version %s", self._pipeline.version.version)

    @property
    def version(self) -> str:
        """The version new requests get."""
        return self._pipeline.version.version

    def add_load_hook(self, hook: LoadHook) -> None:
        """Run ``hook(pipeline)`` now on the served pipeline, then on every reloaded one
        before it is swapped in. A hook that raises is logged and never blocks serving."""
        with self._reload_lock:
            self._hooks.append(hook)
            self._run_hook(hook, self._pipeline)

    @staticmethod
    def _run_hook(hook: LoadHook, pipeline: SearchPipeline) -> None:
        try:
            hook(pipeline)
        except Exception:
            log.exception("load hook %r failed on index version %s", hook,
                          pipeline.version.version)

    @contextlib.contextmanager
    def lease(self) -> Iterator[SearchPipeline]:
        """The current pipeline, kept open until the block exits even if a reload retires it."""
        with self._lock:
            pipeline = self._pipeline
            self._leases[id(pipeline)] = self._leases.get(id(pipeline), 0) + 1
        try:
            yield pipeline
        finally:
            with self._lock:
                left = self._leases[id(pipeline)] - 1
                self._leases[id(pipeline)] = left
                done = left == 0 and id(pipeline) in self._retired
                if left == 0:
                    del self._leases[id(pipeline)]
                if done:
                    del self._retired[id(pipeline)]
            if done:
                self._close(pipeline)

    def reload(self, version: str | None = None) -> tuple[str, str, bool]:
        """Verify ``version`` (default: ``CURRENT``: file sizes and sha256 against its
        manifest, counts, a 64-item self-search), load it and swap it in.

        Returns ``(previous, now_serving, changed)``. Raises ``ValueError`` or
        ``IndexFormatError`` (or whatever loading raised) when the version cannot be served;
        the old pipeline keeps serving then.
        """
        with self._reload_lock:
            previous = self.version
            target = version or self.root.current()
            if target is None:
                raise ValueError(f"no active index version in {self.root.path}")
            if target == previous:
                return previous, previous, False
            t0 = time.perf_counter()
            try:
                version = self.root.open(target)
                # A version damaged after it was published (a flipped byte in the FAISS
                # file still parses) would otherwise be loaded and served: check its files
                # against the manifest's sha256 first (benchmarks/soak.py found this).
                report = version.verify(checksums=True, sample=64)
                if not report.ok:
                    version.close()
                    raise IndexFormatError(f"{target} fails verification: "
                                           + "; ".join(report.problems[:3]))
                fresh = self.factory(version)
            except Exception:
                log.exception("cannot load index version %s; still serving %s", target, previous)
                raise
            for hook in self._hooks:
                self._run_hook(hook, fresh)
            with self._lock:
                old, self._pipeline = self._pipeline, fresh
                idle = id(old) not in self._leases
                if not idle:
                    self._retired[id(old)] = old
                self.reloads += 1
            if idle:
                self._close(old)
            log.info("now serving index version %s (was %s; loaded in %.2f s)",
                     target, previous, time.perf_counter() - t0)
            return previous, target, True

    @staticmethod
    def _close(pipeline: SearchPipeline) -> None:
        try:
            pipeline.close()
        except Exception:  # closing must never break serving
            log.exception("closing pipeline for %s failed", pipeline.version.version)

    def close(self) -> None:
        """Close the served pipeline and any retired one."""
        with self._lock:
            pipelines = [self._pipeline, *self._retired.values()]
            self._retired.clear()
        for p in pipelines:
            self._close(p)


# ---------------------------------------------------------------------- conversions
def _box(box: tuple[float, float, float, float]) -> search_pb2.Box:
    return search_pb2.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3])


def _detections(dets: list[Detection]) -> list[search_pb2.Detection]:
    return [search_pb2.Detection(box=_box(d.box), category=d.category, score=d.score)
            for d in dets]


def _main_object(obj: ChosenObject) -> search_pb2.MainObject:
    return search_pb2.MainObject(box=_box(obj.box), category=obj.category or "",
                                 score=obj.score, fallback=obj.fallback, source=obj.source)


def _timings(timings: dict[str, float]) -> list[search_pb2.StageTiming]:
    return [search_pb2.StageTiming(stage=k, ms=v) for k, v in timings.items()]


def _decision(decision: CategoryDecision) -> search_pb2.CategoryDecision:
    return search_pb2.CategoryDecision(
        category=decision.category or "", score=decision.score, source=decision.source,
        votes=[search_pb2.CategoryVote(category=v.category, detector=v.detector,
                                       neighbours=v.neighbours, combined=v.combined,
                                       head=v.head)
               for v in decision.votes],
    )


def _category_top(top: list[tuple[str, float]]) -> list[search_pb2.CategoryScore]:
    return [search_pb2.CategoryScore(category=c, score=s) for c, s in top]


def _attributes(attributes: dict[str, Prediction]) -> list[search_pb2.AttributePrediction]:
    return [search_pb2.AttributePrediction(
        name=name, values=[search_pb2.AttributeValue(value=v, score=s)
                           for v, s in zip(p.values, p.scores, strict=True)])
        for name, p in attributes.items()]


def _request_box(message: search_pb2.SearchRequest | search_pb2.EmbedRequest
                 | search_pb2.DescribeRequest | search_pb2.CutoutRequest):
    if not message.HasField("bbox"):
        return None
    b = message.bbox
    return (b.x1, b.y1, b.x2, b.y2)


class VisualSearchServicer(search_pb2_grpc.VisualSearchServicer):
    """``visearch.v1.VisualSearch`` over a :class:`PipelineHolder`.

    Caller mistakes (bad image, top_k, bbox, category) -> INVALID_ARGUMENT; a passed
    deadline -> DEADLINE_EXCEEDED; admin calls without the right token -> PERMISSION_DENIED
    (UNAUTHENTICATED when missing); anything else -> INTERNAL, logged.

    Args:
        holder: the served pipeline.
        admin_token: enables ReloadIndex for callers that send it.
        metrics: records the pipeline's per-stage timings of successful calls (request
            counts and end-to-end latency come from :meth:`ServerMetrics.interceptor`).
    """

    def __init__(self, holder: PipelineHolder, *, admin_token: str | None = None,
                 metrics: ServerMetrics | None = None) -> None:
        self.holder = holder
        self.admin_token = admin_token
        self.metrics = metrics

    def _observe(self, method: str, timings: dict[str, float]) -> None:
        if self.metrics is not None:
            self.metrics.observe_stages(method, timings)

    @staticmethod
    def _deadline(context: grpc.ServicerContext) -> float | None:
        left = context.time_remaining()
        return None if left is None else time.monotonic() + left

    def _call(self, context: grpc.ServicerContext, fn: Callable[[SearchPipeline], object]):
        try:
            with self.holder.lease() as pipeline:
                return fn(pipeline)
        except ValueError as e:  # includes ImageDecodeError
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except TimeoutError as e:
            _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except Exception as e:
            log.exception("request failed")
            _abort(context, grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")

    def Search(self, request: search_pb2.SearchRequest, context: grpc.ServicerContext):
        deadline = self._deadline(context)
        opts = request.options
        rerank = opts.rerank if opts.HasField("rerank") else True

        def run(p: SearchPipeline) -> search_pb2.SearchResponse:
            res = p.search(request.image, top_k=request.top_k,
                           category_hint=request.category_hint or None,
                           bbox=_request_box(request), rerank=rerank,
                           skip_detection=opts.skip_detection,
                           all_categories=opts.all_categories, deadline=deadline)
            self._observe("Search", res.timings)
            return search_pb2.SearchResponse(
                detections=_detections(res.detections),
                main_object=_main_object(res.main_object),
                category=_decision(res.category),
                results=[search_pb2.SearchResult(
                    sku=h.sku, score=h.score, item_id=h.item_id, category=h.category,
                    title=h.title, image_key=h.image_key, similarity=h.similarity,
                    attributes=h.attributes)
                    for h in res.results],
                index_version=res.index_version,
                timings=_timings(res.timings),
                reranked=res.reranked,
                category_top=_category_top(res.category_top),
                attributes=_attributes(res.attributes),
            )

        return self._call(context, run)

    def Detect(self, request: search_pb2.DetectRequest, context: grpc.ServicerContext):
        deadline = self._deadline(context)

        def run(p: SearchPipeline) -> search_pb2.DetectResponse:
            res = p.detect(request.image, deadline=deadline)
            self._observe("Detect", res.timings)
            return search_pb2.DetectResponse(
                detections=_detections(res.detections), main_object=_main_object(res.main_object),
                width=res.width, height=res.height, timings=_timings(res.timings))

        return self._call(context, run)

    def Embed(self, request: search_pb2.EmbedRequest, context: grpc.ServicerContext):
        deadline = self._deadline(context)

        def run(p: SearchPipeline) -> search_pb2.EmbedResponse:
            vec, chosen, timings = p.embed(request.image, bbox=_request_box(request),
                                           skip_detection=request.skip_detection,
                                           deadline=deadline)
            self._observe("Embed", timings)
            return search_pb2.EmbedResponse(embedding=vec.tolist(), box=_box(chosen.box),
                                            index_version=p.version.version,
                                            timings=_timings(timings))

        return self._call(context, run)

    def Describe(self, request: search_pb2.DescribeRequest, context: grpc.ServicerContext):
        deadline = self._deadline(context)

        def run(p: SearchPipeline) -> search_pb2.DescribeResponse:
            res = p.describe(request.image, bbox=_request_box(request),
                             skip_detection=request.skip_detection, deadline=deadline)
            self._observe("Describe", res.timings)
            return search_pb2.DescribeResponse(
                detections=_detections(res.detections),
                main_object=_main_object(res.main_object),
                category=_decision(res.category),
                category_top=_category_top(res.category_top),
                attributes=_attributes(res.attributes),
                index_version=res.index_version, timings=_timings(res.timings))

        return self._call(context, run)

    def Cutout(self, request: search_pb2.CutoutRequest, context: grpc.ServicerContext):
        deadline = self._deadline(context)

        def run(p: SearchPipeline) -> search_pb2.CutoutResponse:
            res = p.cutout(request.image, bbox=_request_box(request), deadline=deadline)
            self._observe("Cutout", res.timings)
            return search_pb2.CutoutResponse(
                rgba_png=res.rgba_png, mask_png=res.mask_png, quality=res.quality,
                box=_box(res.box) if res.box is not None else None, status=res.status,
                index_version=res.index_version, timings=_timings(res.timings))

        return self._call(context, run)

    def GetIndexInfo(self, request: search_pb2.GetIndexInfoRequest,
                     context: grpc.ServicerContext):
        def run(p: SearchPipeline) -> search_pb2.IndexInfo:
            counts = p.index.counts()
            return search_pb2.IndexInfo(
                version=p.version.version, ntotal=p.index.ntotal, dim=p.index.dim,
                categories=[search_pb2.CategoryCount(category=c, count=n)
                            for c, n in sorted(counts.items())],
                has_detector=p.detector is not None,
                manifest_json=json.dumps(p.version.manifest, sort_keys=True),
                max_top_k=p.max_top_k,
            )

        return self._call(context, run)

    def ReloadIndex(self, request: search_pb2.ReloadIndexRequest,
                    context: grpc.ServicerContext):
        if not self.admin_token:
            _abort(context, grpc.StatusCode.PERMISSION_DENIED,
                          "ReloadIndex is disabled: start the server with --admin-token")
        given = dict(context.invocation_metadata()).get(ADMIN_TOKEN_KEY)
        if given is None:
            _abort(context, grpc.StatusCode.UNAUTHENTICATED,
                          f"ReloadIndex needs the admin token in the {ADMIN_TOKEN_KEY!r} metadata")
        if not hmac.compare_digest(str(given).encode(), self.admin_token.encode()):
            _abort(context, grpc.StatusCode.PERMISSION_DENIED, "wrong admin token")
        try:
            previous, now, changed = self.holder.reload(request.version or None)
        except Exception as e:
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                   f"cannot load index version {request.version or 'CURRENT'}: "
                   f"{type(e).__name__}: {e}; still serving {self.holder.version}")
        return search_pb2.ReloadIndexResponse(previous_version=previous, version=now,
                                              changed=changed)
