"""Dynamic micro-batching: concurrent callers' items run through a model as one batch.

A worker thread takes the first waiting item, then keeps collecting for at most
``max_wait_ms`` (or until ``max_batch_size`` items), calls ``fn`` once on the batch and hands
each caller its own result through a future. Under load batches fill up and a GPU runs one
forward pass for many requests; alone, a request waits at most the window.

Written by hand because no installed library batches calls across threads
(``concurrent.futures`` pools run one call per item).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()


class MicroBatcher(Generic[T, R]):
    """Batch ``fn`` over items submitted from many threads.

    Args:
        fn: called with a list of 1..max_batch_size items, returns one result per item in
            the same order. An exception fails every future of that batch.
        max_batch_size: the largest batch ``fn`` sees.
        max_wait_ms: how long the first item of a batch waits for company.
        name: the worker thread's name (for logs).
        on_batch: called on the worker thread with the size of every batch (after cancelled
            items are dropped), before ``fn`` runs on it, so a caller whose result has
            arrived knows its batch was observed. For metrics; an exception it raises is
            logged and ignored. Also settable later through the ``on_batch`` attribute.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 2.0,
        name: str = "batcher",
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.batch_sizes: list[int] = []  # a bounded record of recent batch sizes
        self.on_batch = on_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future[R]:
        """Queue one item; the future resolves to its result (or the batch's exception)."""
        future: Future[R] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed; create a new one")
            self._queue.put((item, future))
        return future

    def __call__(self, item: T, timeout: float | None = None) -> R:
        """Submit and wait. Raises ``TimeoutError`` after ``timeout`` seconds (the item is
        then cancelled if the worker has not started its batch)."""
        future = self.submit(item)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop accepting items, finish the queued ones, and stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    def _collect(self) -> tuple[list[tuple[T, Future[R]]], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=remaining) if remaining > 0 else (
                    self._queue.get_nowait())
            except queue.Empty:
                break
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    def _observe(self, size: int) -> None:
        observer = self.on_batch
        if observer is None:
            return
        try:
            observer(size)
        except Exception:  # an observer must never fail the callers' batch
            log.exception("batch observer of %s failed", self._thread.name)

    def _run(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._collect()
            # Callers that gave up (deadline) cancelled their future: skip their items.
            live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            self.batch_sizes.append(len(live))
            del self.batch_sizes[:-1000]
            self._observe(len(live))
            try:
                results = self.fn([item for item, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(
                        f"batch function returned {len(results)} results for {len(live)} items"
                    )
            except BaseException as exc:  # every caller of the batch gets the error
                log.debug("batch of %d failed: %s", len(live), exc)
                for _, fut in live:
                    fut.set_exception(exc)
                continue
            for (_, fut), result in zip(live, results, strict=True):
                fut.set_result(result)
