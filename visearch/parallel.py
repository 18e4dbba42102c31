"""Runners for the offline stages: the local process pool (the default) or Ray Data.

A stage expresses its parallel part as a function over shards (``Runner.map``) or, for the
embedder, as an actor pool that holds the model (``Runner.embed``); the runner decides
where the shards run. Both runners apply the *same* shard function to the *same* shards,
so the outputs do not depend on the runner: hashes and graph rows are bit-identical,
embeddings equal within float tolerance (a different batch composition can change the last
bits of a convolution's sum).

- ``LocalRunner(workers)``: a ``ProcessPoolExecutor`` (``workers > 1``) or this process.
- ``RayRunner(address)``: Ray Data. ``address="local"`` starts a private single-machine Ray
  (``num_cpus`` workers), ``"auto"`` joins the cluster this machine belongs to, and
  ``"ray://host:10001"`` or ``"host:6379"`` a remote one. Shards travel as pickled bytes
  (no Arrow conversion of Python objects), shared read-only data (a gallery, an index) is
  put in the object store once, and each pool actor loads it once.

``make_runner(ray=None, workers=1)`` is the one place a CLI turns ``--ray`` into a runner.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: an embedder's input item: (item id, image source, box (x1, y1, x2, y2) | None)
EmbedItem = tuple[int, Any, Sequence[float] | None]


class Runner(Protocol):
    """Where an offline stage's shards run."""

    name: str
    workers: int

    def map(self, fn: Callable[..., R], tasks: Sequence[Any], *, shared: Any = None
            ) -> list[R]:
        """``[fn(task) for task in tasks]`` (``fn(task, shared)`` when ``shared`` is given),
        in task order. ``fn`` must be a module-level function (picklable)."""
        ...

    def embed(self, model_path: Path, items: Sequence[EmbedItem], *, batch_size: int = 64,
              device: str | None = None, progress: bool = False,
              ) -> tuple[np.ndarray, np.ndarray]:
        """Embed ``items`` with the embedder at ``model_path``: ``(ids int64 [n],
        feats float32 [n, dim])`` in item order, L2-normalised."""
        ...

    def close(self) -> None:
        """Release the runner's processes."""
        ...


def _call(fn: Callable[..., R], shared: Any, task: Any) -> R:
    return fn(task) if shared is None else fn(task, shared)


class LocalRunner:
    """Today's local pool: ``workers`` processes (1: this process)."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = int(workers)

    def map(self, fn: Callable[..., R], tasks: Sequence[Any], *, shared: Any = None
            ) -> list[R]:
        call = partial(_call, fn, shared)
        if self.workers == 1 or len(tasks) <= 1:
            return [call(t) for t in tasks]
        with ProcessPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(call, tasks))

    def embed(self, model_path: Path, items: Sequence[EmbedItem], *, batch_size: int = 64,
              device: str | None = None, progress: bool = False,
              ) -> tuple[np.ndarray, np.ndarray]:
        from visearch.device import choose_device
        from visearch.embedding import embed_items, load_embedder

        model = load_embedder(model_path, device=choose_device(device))
        ids, feats = [], []
        # The DataLoader's decode processes are this runner's workers.
        for i, f in embed_items(model, items, batch_size=batch_size,
                                num_workers=0 if self.workers == 1 else self.workers,
                                progress=progress):
            ids.append(i)
            feats.append(f)
        return _stack(ids, feats, int(model.config["dim"]))

    def close(self) -> None:
        pass


def _stack(ids: list[np.ndarray], feats: list[np.ndarray], dim: int
           ) -> tuple[np.ndarray, np.ndarray]:
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    return np.concatenate(ids).astype(np.int64), np.concatenate(feats).astype(np.float32)


class _TaskActor:
    """A Ray Data pool actor applying ``fn`` to pickled tasks; ``shared`` is fetched from the
    object store once per actor."""

    def __init__(self, fn: Callable[..., Any], shared_ref: Any = None) -> None:
        import ray

        self.fn = fn
        self.shared = None if shared_ref is None else ray.get(shared_ref[0])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = [pickle.dumps(_call(self.fn, self.shared, pickle.loads(b)))
               for b in batch["task"]]
        return {"i": batch["i"], "out": np.array(out, dtype=object)}


class _EmbedActor:
    """A Ray Data pool actor holding the embedder (one per GPU when there are GPUs)."""

    def __init__(self, model_path: str, device: str | None, batch_size: int) -> None:
        from visearch.device import choose_device
        from visearch.embedding import load_embedder

        self.model = load_embedder(Path(model_path), device=choose_device(device))
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from visearch.embedding import embed_items

        out = []
        for blob in batch["task"]:
            ids, feats = [], []
            # The local runner's code path (decode, crop, transform, forward), so both
            # runners produce the same vectors.
            for i, f in embed_items(self.model, pickle.loads(blob), batch_size=self.batch_size):
                ids.append(i)
                feats.append(f)
            out.append(pickle.dumps(_stack(ids, feats, int(self.model.config["dim"]))))
        return {"i": batch["i"], "out": np.array(out, dtype=object)}


class RayRunner:
    """Ray Data: shards as a dataset, mapped by a pool of ``workers`` actors.

    Args:
        address: ``"local"`` (start a private Ray on this machine), ``"auto"`` (join the
            running cluster) or a cluster address (``ray://host:10001``, ``host:6379``).
        workers: actors in each pool; None: the cluster's CPUs (GPUs for the embedder).
        num_cpus: CPUs of a ``"local"`` Ray (default: ``workers`` or all).
        temp_dir: a ``"local"`` Ray's session directory (default: under the system temp).
    """

    name = "ray"

    def __init__(self, address: str = "local", *, workers: int | None = None,
                 num_cpus: int | None = None, temp_dir: str | os.PathLike[str] | None = None,
                 ) -> None:
        try:
            import ray
        except ImportError as e:  # pragma: no cover - the extra is in dev installs
            raise ImportError("--ray needs Ray Data: pip install 'visearch[scale]'") from e
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.address = address
        self._owns = not ray.is_initialized()
        if self._owns:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            if address == "local":
                kwargs["num_cpus"] = num_cpus or workers or os.cpu_count() or 1
                kwargs["_temp_dir"] = str(temp_dir or tempfile.mkdtemp(prefix="visearch-ray-"))
                ray.init(**kwargs)
            else:
                ray.init(address=address, **kwargs)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.gpus = int(ray.cluster_resources().get("GPU", 0))
        self.workers = int(workers or cpus)
        logger.info("Ray runner at %s: %d workers (%d CPUs, %d GPUs)", address, self.workers,
                    cpus, self.gpus)

    def _run(self, actor: type, kwargs: dict[str, Any], tasks: Sequence[Any], *,
             pool: int, num_gpus: float = 0) -> list[Any]:
        import ray.data

        if not tasks:
            return []
        ds = ray.data.from_items([{"i": i, "task": pickle.dumps(t)}
                                  for i, t in enumerate(tasks)],
                                 override_num_blocks=min(len(tasks), 4 * pool))
        rows = ds.map_batches(actor, fn_constructor_kwargs=kwargs, batch_size=1,
                              compute=ray.data.ActorPoolStrategy(size=pool),
                              num_gpus=num_gpus, batch_format="numpy").take_all()
        rows.sort(key=lambda r: int(r["i"]))
        return [pickle.loads(r["out"]) for r in rows]

    def map(self, fn: Callable[..., R], tasks: Sequence[Any], *, shared: Any = None
            ) -> list[R]:
        import ray

        # A list around the reference keeps Ray from resolving it before the actor asks.
        ref = None if shared is None else [ray.put(shared)]
        return self._run(_TaskActor, {"fn": fn, "shared_ref": ref}, tasks,
                         pool=min(self.workers, max(len(tasks), 1)))

    def embed(self, model_path: Path, items: Sequence[EmbedItem], *, batch_size: int = 64,
              device: str | None = None, progress: bool = False,
              ) -> tuple[np.ndarray, np.ndarray]:
        items = list(items)
        # Shards of whole batches, so that each actor batches as the local runner does.
        shards = [items[s : s + 4 * batch_size] for s in range(0, len(items), 4 * batch_size)]
        pool = min(self.gpus or self.workers, max(len(shards), 1))
        parts = self._run(_EmbedActor, {"model_path": str(model_path), "device": device,
                                        "batch_size": batch_size},
                          shards, pool=pool, num_gpus=1 if self.gpus else 0)
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        return (np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]).astype(np.float32))

    def close(self) -> None:
        import ray

        if self._owns and ray.is_initialized():
            ray.shutdown()


def make_runner(ray: str | None = None, workers: int | None = 1) -> LocalRunner | RayRunner:
    """The runner a CLI's ``--ray`` selects: None -> ``LocalRunner(workers)``; ``local``,
    ``auto`` or an address -> ``RayRunner`` (``workers`` actors on a ``local`` Ray, None:
    one per CPU; a cluster's size is the cluster's)."""
    if ray is None:
        return LocalRunner(1 if workers is None else workers)
    return RayRunner(ray, workers=workers if ray == "local" else None)


def shards(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``range(n)`` in steps of ``size``."""
    for start in range(0, n, size):
        yield start, min(n, start + size)
