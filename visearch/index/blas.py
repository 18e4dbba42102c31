"""faiss's process-wide knobs, scoped to the calls that need them: ``small_batch_blas`` (the
brute-force BLAS threshold) and ``faiss_threads`` (OpenMP threads of the calling thread).

faiss computes exact inner products with its own SIMD loop while ``queries x d`` is below
``faiss.cvar.distance_compute_blas_threshold`` (128000 by default, i.e. 500 queries at
d=256) and with one BLAS matrix product above it. Exact search of the batches this library
sends (16-256 queries: a search micro-batch, a neighbour-graph block, the SKU centroids of
a merge) ran 8-10x slower on the SIMD loop than through BLAS (measured with
``benchmarks/bench_index.py``), so those calls run with the threshold at 4096 (16 queries
at d=256).

The threshold is a process-wide C++ global, and the two paths round differently (their
results may differ in the last bits, and so in the order of near-ties), so it is not set
for the whole process: each call that needs it enters ``small_batch_blas()``, which
lowers the threshold while at least one caller in the process is inside and restores the
previous value when the last one leaves. Callers on other threads (a server's concurrent
searches) share one lowered value instead of restoring it under each other's feet; other
faiss users in the process see the lowered value only while such a call runs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import faiss

#: ``queries x d`` from which faiss uses BLAS inside ``small_batch_blas()``.
SMALL_BATCH_BLAS_THRESHOLD = 4096


class _ScopedBlasThreshold:
    """Holds ``faiss.cvar.distance_compute_blas_threshold`` at most ``value`` while any
    thread is inside ``__call__()``; reference-counted, so nesting and threads are safe."""

    def __init__(self, value: int) -> None:
        self._value = value
        self._lock = threading.Lock()
        self._users = 0
        self._saved = 0

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = faiss.cvar.distance_compute_blas_threshold
                faiss.cvar.distance_compute_blas_threshold = min(self._saved, self._value)
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    faiss.cvar.distance_compute_blas_threshold = self._saved


#: Context manager: ``with small_batch_blas(): index.search(xq, k)``.
small_batch_blas = _ScopedBlasThreshold(SMALL_BATCH_BLAS_THRESHOLD)


@contextlib.contextmanager
def faiss_threads(n: int | None) -> Iterator[None]:
    """Run faiss's OpenMP regions of the calling thread on ``n`` threads (None: unchanged).

    A server searches one query per request, with requests in parallel on their own
    threads. faiss splits even one query over every core (its OpenMP team), and on a
    loaded CPU the team's barrier waits dominate: a 1,300-item search took 15 ms with 2
    threads and 0.3 ms with 1 on the 2-core machine under load (``benchmarks/RESULTS.md``,
    fast serving). ``omp_set_num_threads`` sets the calling thread's own ICV (libgomp, which
    faiss's wheels ship: a thread outside an OpenMP team has its own), so other threads keep
    theirs; the previous value is restored on exit.
    """
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"faiss threads must be >= 1 or None, got {n}")
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
