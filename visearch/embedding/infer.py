"""Batch embedding of images and catalog items with a trained :class:`Embedder`.

Inference runs under ``torch.inference_mode``; on CUDA in fp16 autocast with channels_last
(the outputs are re-normalised in float32). The model's train/eval mode is restored after.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from visearch.embedding.model import Embedder
from visearch.imageio import ImageSource, crop, decode_image
from visearch.transforms import eval_transform

logger = logging.getLogger(__name__)

Box = Sequence[float]
Item = tuple[int, "ImageSource | np.ndarray", "Box | None"]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    return next(iter(model.parameters()), torch.empty(0)).device


def model_transform(model: Embedder) -> Callable[[np.ndarray], torch.Tensor]:
    """The inference transform matching ``model.config`` (input size, mean, std)."""
    cfg = model.config
    return eval_transform(int(cfg["input_size"]), mean=cfg["mean"], std=cfg["std"])


@contextlib.contextmanager
def _eval_on(model: Embedder, device: torch.device | str | None) -> Iterator[torch.device]:
    """Move ``model`` to ``device`` in eval mode; restore its train/eval mode on exit."""
    dev = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.to(dev).eval()
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    try:
        yield dev
    finally:
        model.train(was_training)


def _forward(model: Embedder, batch: torch.Tensor, dev: torch.device) -> np.ndarray:
    # Inference mode and autocast are entered per batch, never across a generator's yield
    # (they are thread-global and would leak into the caller's code).
    autocast = (
        torch.autocast("cuda", dtype=torch.float16)
        if dev.type == "cuda"
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        x = batch.to(dev, non_blocking=True)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        feats = torch.nn.functional.normalize(model.forward_features(x).float(), dim=1)
    return feats.cpu().numpy().astype(np.float32, copy=False)


def embed_arrays(
    model: Embedder,
    images: Sequence[np.ndarray],
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Embed RGB crops ``uint8 [H, W, 3]`` (any sizes) into ``float32 [N, dim]``,
    L2-normalised, in input order. ``device=None`` uses the device the model is on."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    transform = model_transform(model)
    out = np.zeros((len(images), model.dim), dtype=np.float32)
    with _eval_on(model, device) as dev:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = crops_to_batch(transform, chunk)
            out[start : start + len(chunk)] = _forward(model, batch, dev)
    return out


def embed_arrays_with_heads(
    model: Embedder,
    images: Sequence[np.ndarray],
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """As :func:`embed_arrays`, plus the model's head logits (one forward pass):
    ``(float32 [N, dim] L2-normalised, {head name: float32 [N, C]})``; the dict is empty
    when the model has no heads (:class:`~visearch.embedding.heads.TaskHeads`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    transform = model_transform(model)
    out = np.zeros((len(images), model.dim), dtype=np.float32)
    logits: dict[str, list[np.ndarray]] = {}
    with _eval_on(model, device) as dev:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            x = crops_to_batch(transform, chunk).to(dev)
            autocast = (torch.autocast("cuda", dtype=torch.float16) if dev.type == "cuda"
                        else contextlib.nullcontext())
            with torch.inference_mode(), autocast:
                if dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                emb, heads = model.forward_with_heads(x)
            out[start : start + len(chunk)] = emb.cpu().numpy()
            for name, v in heads.items():
                logits.setdefault(name, []).append(v.float().cpu().numpy())
    return out, {k: np.concatenate(v).astype(np.float32, copy=False) for k, v in logits.items()}


def crops_to_batch(
    transform: Callable[[np.ndarray], torch.Tensor], images: Sequence[np.ndarray]
) -> torch.Tensor:
    """RGB crops ``uint8 [H, W, 3]`` (any sizes) -> the model's input ``float32 [B, 3, S, S]``
    (resized and normalised by ``transform``, e.g. :func:`model_transform`). Shared by the torch
    and the ONNX Runtime paths so both see the same pixels."""
    return torch.stack([transform(_check_array(im)) for im in images])


def _check_array(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        got = getattr(image, "shape", type(image).__name__)
        raise TypeError(f"expected an RGB uint8 [H, W, 3] array, got {got}")
    if image.shape[2] != 3:
        raise ValueError(f"expected 3 channels (RGB), got shape {image.shape}")
    # torch.from_numpy (inside the transform) warns on read-only arrays such as PIL's.
    return image if image.flags.writeable else image.copy()


def load_crop(src: ImageSource | np.ndarray, box: Box | None) -> np.ndarray:
    """Decode ``src`` (path, bytes or an RGB array) and crop it to ``box`` (pixels) if given."""
    image = _check_array(src) if isinstance(src, np.ndarray) else decode_image(src)
    return np.array(crop(image, box), dtype=np.uint8, order="C")  # a writable copy


class _ItemDataset(Dataset):
    """Decodes, crops and transforms one shard of items (runs in DataLoader workers)."""

    def __init__(self, items: list[Item], transform: Callable[[np.ndarray], torch.Tensor]):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        item_id, src, box = self.items[i]
        return int(item_id), self.transform(load_crop(src, box))


def embed_items(
    model: Embedder,
    items: Iterable[Item],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    shard_size: int = 8192,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Embed ``(item_id, source, box | None)`` items, decoded in a DataLoader pool.

    ``source`` is a path, encoded bytes or an RGB ``uint8 [H, W, 3]`` array; ``box`` is
    ``(x1, y1, x2, y2)`` in that image's pixels. Items are read ``shard_size`` at a time, so the
    input may be a long iterator. Yields ``(ids int64 [n], feats float32 [n, dim])`` batches in
    input order, feats L2-normalised. A decode failure raises ``ImageDecodeError``.
    ``progress`` shows a tqdm bar (for CLIs).
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    transform = model_transform(model)
    bar = None
    if progress:
        from visearch.progress import progress_bar

        bar = progress_bar(desc="embed", unit="img")
    iterator = iter(items)
    try:
        with _eval_on(model, device) as dev:
            while shard := list(itertools.islice(iterator, shard_size)):
                loader = DataLoader(
                    _ItemDataset(shard, transform),
                    batch_size=batch_size,
                    shuffle=False,
                    num_workers=num_workers,
                    pin_memory=dev.type == "cuda",
                )
                for ids, batch in loader:
                    feats = _forward(model, batch, dev)
                    if bar is not None:
                        bar.update(len(feats))
                    yield ids.numpy().astype(np.int64, copy=False), feats
    finally:
        if bar is not None:
            bar.close()
