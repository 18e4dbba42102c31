"""The web page of ``visearch-serve --http-port``: a Starlette app for people, beside gRPC.

Routes (JSON in camelCase, as ``google.protobuf.json_format.MessageToDict`` writes the
responses, so fields added to the protos reach the page without a change here):

- ``GET /``: the page (``server/static/``: HTML, JS and CSS shipped as package data; nothing
  is fetched from another site);
- ``POST /api/search``: the image as the raw body, or as the ``image`` field of a
  ``multipart/form-data`` form; query parameters ``top_k``, ``category_hint``, ``rerank``
  (``0``/``1``), ``all_categories``, and the product box ``x1, y1, x2, y2`` (original
  pixels, all four or none). Answers the ``SearchResponse``, each result with a
  ``thumbnail`` URL;
- ``POST /api/detect``: the same upload; the ``DetectResponse``;
- ``GET /api/info``: the served index (``GetIndexInfo``, manifest summarised) and gRPC health
  of the server and of the service; ``GET /api/health``: health alone (HTTP 503 unless both
  are SERVING);
- ``GET /thumbs/{version}/{item_id}``: an item's JPEG thumbnail from that version's
  ``thumbs.lmdb`` (``visearch.index.thumbs``), made at build time from the image store.

**Why through gRPC.** Every search and detect goes through a real gRPC channel to the same
server (``serve.py`` gives the HTTP side a private Unix socket on the same ``grpc.server``),
not a second in-process path: the page then gets exactly what an app gets: the same
validation and messages, message-size limit, deadlines, micro-batching, health, and the
same Prometheus counts. A gRPC status becomes an HTTP status (:data:`HTTP_STATUS`) with the
server's own message as ``{"error": ..., "code": ...}``. Only the thumbnails are read in
process: they are files of an immutable index version, not part of the gRPC contract.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from server._proto import search_pb2, search_pb2_grpc
from visearch.errors import IndexFormatError
from visearch.index import IndexRoot
from visearch.index.thumbs import ThumbnailStore, open_thumbnails

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["VisualSearch"].full_name

#: gRPC status -> HTTP status of the JSON error.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.CANCELLED: 503,
}
#: Versions whose thumbnail files stay open (a reload adds one; older ones are closed).
_OPEN_THUMBS = 4


class UploadError(ValueError):
    """A malformed HTTP request (no image field, a bad query parameter): HTTP ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _error(message: str, status: int, code: str) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status)


def _to_dict(message: Any) -> dict[str, Any]:
    """The message as JSON-ready dict, camelCase, zeros and empty lists written out (the
    page need not guess defaults)."""
    try:
        return MessageToDict(message, always_print_fields_with_no_presence=True)
    except TypeError:  # protobuf < 5.26 names the same option differently
        return MessageToDict(message, including_default_value_fields=True)


class WebApp:
    """The Starlette app over a gRPC ``target`` and the index ``root`` (for thumbnails).

    Args:
        target: gRPC address of the VisualSearch server (``unix:/path`` or ``host:port``),
            plaintext.
        index_root: the server's index root.
        max_upload_bytes: largest accepted request body; larger gets HTTP 413 before it is
            read whole (the gRPC server's own message limit applies on top).
        timeout_s: deadline of each gRPC call, seconds.
    """

    def __init__(self, target: str, index_root: str | Path, *, max_upload_bytes: int,
                 timeout_s: float = 30.0) -> None:
        self.root = IndexRoot(index_root)
        self.max_upload_bytes = int(max_upload_bytes)
        self.timeout_s = timeout_s
        limit = self.max_upload_bytes + (1 << 16)
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", limit),
                             ("grpc.max_receive_message_length", limit)])
        self.stub = search_pb2_grpc.VisualSearchStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self._thumbs: OrderedDict[str, ThumbnailStore | None] = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self.app = Starlette(routes=[
            Route("/", self.page),
            Route("/api/search", self.search, methods=["POST"]),
            Route("/api/detect", self.detect, methods=["POST"]),
            Route("/api/info", self.info),
            Route("/api/health", self.health_status),
            Route("/thumbs/{version}/{item_id:int}", self.thumbnail),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ])

    def close(self) -> None:
        """Close the gRPC channel and every open thumbnail file."""
        self.channel.close()
        with self._thumbs_lock:
            for store in self._thumbs.values():
                if store is not None:
                    store.close()
            self._thumbs.clear()

    # ------------------------------------------------------------------ request parsing
    async def _read_image(self, request: Request) -> bytes:
        """The uploaded bytes: the ``image`` form field, or the raw body. Reads at most
        ``max_upload_bytes`` (HTTP 413 beyond)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_upload_bytes:
            raise UploadError(self._too_large(int(declared)), 413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_upload_bytes:
                raise UploadError(self._too_large(len(body)), 413)
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            return bytes(body)
        data = bytes(body)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": data, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        except Exception as e:  # python-multipart's parse errors, Starlette's limits
            raise UploadError(f"cannot read the multipart form: {e}") from e
        try:
            field = form.get("image")
            if field is None or isinstance(field, str):
                raise UploadError("the form has no file field named 'image': send the photo "
                                  "as image=@photo.jpg, or as the raw request body")
            return await field.read()
        finally:
            await form.close()

    def _too_large(self, size: int) -> str:
        return (f"upload of {size / 2**20:.1f} MiB is larger than this server takes "
                f"({self.max_upload_bytes / 2**20:.1f} MiB): send a smaller photo")

    @staticmethod
    def _number(params: Any, name: str, kind: type, default: Any = None) -> Any:
        raw = params.get(name)
        if raw is None or raw == "":
            return default
        try:
            return kind(raw)
        except ValueError:
            raise UploadError(f"query parameter {name}={raw!r} is not "
                              f"{'an integer' if kind is int else 'a number'}") from None

    def _search_request(self, request: Request, image: bytes) -> search_pb2.SearchRequest:
        q = request.query_params
        req = search_pb2.SearchRequest(image=image, top_k=self._number(q, "top_k", int, 0),
                                       category_hint=q.get("category_hint", ""))
        coords = [self._number(q, k, float) for k in ("x1", "y1", "x2", "y2")]
        if any(c is not None for c in coords):
            if any(c is None for c in coords):
                raise UploadError("a product box needs all four of x1, y1, x2, y2 (original "
                                  "pixels), or none of them")
            req.bbox.CopyFrom(search_pb2.Box(x1=coords[0], y1=coords[1], x2=coords[2],
                                             y2=coords[3]))
        if q.get("rerank") is not None:
            req.options.rerank = q["rerank"] not in ("0", "false", "no")
        req.options.all_categories = q.get("all_categories", "0") not in ("0", "false", "no")
        return req

    async def _call(self, method: Any, message: Any) -> Any:
        """Run a unary gRPC call off the event loop (the stub blocks)."""
        return await run_in_threadpool(method, message, timeout=self.timeout_s)

    @staticmethod
    def _grpc_error(e: grpc.RpcError) -> JSONResponse:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = (e.details() if hasattr(e, "details") else None) or str(code)
        return _error(details, HTTP_STATUS.get(code, 500), code.name)

    # ------------------------------------------------------------------ endpoints
    async def page(self, request: Request) -> Response:
        return Response((STATIC_DIR / "index.html").read_bytes(), media_type="text/html")

    async def search(self, request: Request) -> Response:
        try:
            req = self._search_request(request, await self._read_image(request))
            resp = await self._call(self.stub.Search, req)
        except UploadError as e:
            return _error(str(e), e.status, "INVALID_ARGUMENT" if e.status == 400
                          else "RESOURCE_EXHAUSTED")
        except grpc.RpcError as e:
            return self._grpc_error(e)
        out = _to_dict(resp)
        for result in out.get("results", []):
            result["thumbnail"] = f"/thumbs/{resp.index_version}/{result['itemId']}"
        return JSONResponse(out)

    async def detect(self, request: Request) -> Response:
        try:
            image = await self._read_image(request)
            resp = await self._call(self.stub.Detect, search_pb2.DetectRequest(image=image))
        except UploadError as e:
            return _error(str(e), e.status, "INVALID_ARGUMENT" if e.status == 400
                          else "RESOURCE_EXHAUSTED")
        except grpc.RpcError as e:
            return self._grpc_error(e)
        return JSONResponse(_to_dict(resp))

    async def _health(self) -> dict[str, str]:
        """``{"server": status, "service": status}``: gRPC health of the whole server ("")
        and of VisualSearch; ``<gRPC code>: <details>`` when the call fails."""
        out = {}
        for key, name in (("server", ""), ("service", SERVICE_NAME)):
            try:
                resp = await self._call(self.health.Check,
                                        health_pb2.HealthCheckRequest(service=name))
                out[key] = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as e:
                out[key] = f"{e.code().name}: {e.details()}"
        return out

    async def health_status(self, request: Request) -> Response:
        health = await self._health()
        ok = all(v == "SERVING" for v in health.values())
        return JSONResponse(health, status_code=200 if ok else 503)

    async def info(self, request: Request) -> Response:
        health = await self._health()
        try:
            info = await self._call(self.stub.GetIndexInfo, search_pb2.GetIndexInfoRequest())
        except grpc.RpcError as e:
            return JSONResponse({"health": health, "error": e.details(),
                                 "code": e.code().name}, status_code=503)
        index = _to_dict(info)
        manifest = json.loads(index.pop("manifestJson", "{}") or "{}")
        index["builtAt"] = manifest.get("built_at", "")
        index["parent"] = manifest.get("parent")
        try:
            thumbs = await run_in_threadpool(self._store, info.version)
        except (KeyError, IndexFormatError) as e:  # the page still works, without thumbnails
            log.warning("no thumbnails for %s: %s", info.version, e)
            thumbs = None
        index["hasThumbnails"] = thumbs is not None
        return JSONResponse({"health": health, "index": index})

    def _store(self, version: str) -> ThumbnailStore | None:
        """The thumbnails of ``version`` (None when it has none), opened once and kept for
        the last few versions asked for. ``KeyError`` for a name that is not a version."""
        with self._thumbs_lock:
            if version in self._thumbs:
                self._thumbs.move_to_end(version)
                return self._thumbs[version]
            # Only the root's own version names reach the file system (no "../x").
            if version not in self.root.versions():
                raise KeyError(version)
            store = open_thumbnails(self.root.path / version)
            self._thumbs[version] = store
            while len(self._thumbs) > _OPEN_THUMBS:
                _, old = self._thumbs.popitem(last=False)
                if old is not None:
                    old.close()
            return store

    def _thumbnail_bytes(self, version: str, item_id: int) -> bytes | None:
        store = self._store(version)
        if store is None:
            return None
        with self._thumbs_lock:  # a store closed by eviction is never read
            return store.get(item_id) if self._thumbs.get(version) is store else None

    async def thumbnail(self, request: Request) -> Response:
        version, item_id = request.path_params["version"], request.path_params["item_id"]
        try:
            data = await run_in_threadpool(self._thumbnail_bytes, version, item_id)
        except KeyError:
            return _error(f"no index version {version!r}", 404, "NOT_FOUND")
        except IndexFormatError as e:
            return _error(str(e), 500, "INTERNAL")
        if data is None:
            return _error(f"no thumbnail of item {item_id} in {version}", 404, "NOT_FOUND")
        # A version never changes: its thumbnails can be cached for good.
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=31536000, immutable"})


class _Uvicorn(uvicorn.Server):
    """uvicorn's server with an event set once it listens (startup is otherwise silent)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


class WebServer:
    """Serve ``web`` with uvicorn on a thread of this process (no signal handlers: the
    process's owner handles signals and calls :meth:`close`).

    The socket is bound here, so a taken port raises ``OSError`` at once and port 0's choice
    is known (:attr:`port`) before the first request.

    Args:
        web: the app.
        port: TCP port; 0 picks a free one.
        host: address to bind.
        grace_s: how long :meth:`close` lets requests in flight finish.
    """

    def __init__(self, web: WebApp, port: int = 0, host: str = "127.0.0.1",
                 grace_s: float = 5.0) -> None:
        self.web = web
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host.strip("[]"), port))
            self._sock.listen(128)
        except OSError:
            self._sock.close()
            raise
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(web.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=max(1, round(grace_s)))
        self._server = _Uvicorn(config)
        self._thread = threading.Thread(target=self._run, name="visearch-http", daemon=True)
        self._thread.start()
        # Wait for uvicorn to listen, or for its thread to end (a failed start, logged).
        while not self._server.ready.wait(0.05):
            if not self._thread.is_alive():
                self.close()
                raise OSError(f"the HTTP server on {host}:{self.port} did not start")
        log.info("web page on http://%s:%d/", host, self.port)

    def _run(self) -> None:
        self._server.run(sockets=[self._sock])

    @property
    def url(self) -> str:
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def close(self) -> None:
        """Stop taking connections, let requests in flight finish (within the grace
        period), release the port and the app's channel."""
        self._server.should_exit = True
        self._thread.join(timeout=(self._server.config.timeout_graceful_shutdown or 5) + 5)
        self._sock.close()
        self.web.close()
