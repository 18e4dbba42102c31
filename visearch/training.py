"""One training engine for visearch's models (the embedder and the detector).

A training (``visearch.embedding.train``, ``visearch.detection.train``) keeps its own data,
model and loss; everything else lives here, once:

- the device, through :func:`visearch.device.choose_device`;
- AdamW over the caller's parameters or parameter groups;
- the learning-rate schedule :class:`WarmupCosine` (linear warm-up, then cosine decay to a
  floor), applied by ``torch.optim.lr_scheduler.LambdaLR`` and stepped once per optimiser step;
- mixed precision: fp16 autocast and a ``GradScaler``, both enabled only on CUDA;
- the optimisation step (:meth:`Trainer.step`): zero the gradients, scaled backward, optional
  gradient-norm clipping, optimiser step, scaler update, schedule step;
- checkpoints written atomically (:func:`visearch.fileio.atomic_open`) and exact resume:
  module weights and buffers, optimiser, scheduler, scaler, and the python, numpy, torch and
  CUDA RNG states;
- the epoch loop with its progress bar (:meth:`Trainer.fit`; a tqdm bar on a terminal,
  periodic log lines otherwise: :func:`visearch.progress.progress_bar`).

On CPU a run resumed from the checkpoint of epoch ``e`` ends with the same weights, bit for bit,
as an uninterrupted run, provided the training draws the randomness of each epoch from the
global RNGs (restored here) or from generators seeded by the epoch number.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from visearch.device import choose_device
from visearch.fileio import atomic_open
from visearch.progress import progress_bar

logger = logging.getLogger(__name__)

B = TypeVar("B")

# Keys the engine writes into a checkpoint besides one per module.
ENGINE_KEYS = ("optimiser", "scheduler", "scaler", "rng")


@dataclass(frozen=True)
class WarmupCosine:
    """Learning-rate factor (multiplies each group's peak ``lr``) at optimiser step ``step``.

    ``step`` counts optimiser steps from 0. Warm-up, for ``step < warmup_steps``, is linear::

        start + (1 - start) * (step + offset) / warmup_steps

    then a cosine decay from 1 at ``warmup_steps`` to ``floor`` at ``total_steps`` (and
    ``floor`` after it)::

        floor + (1 - floor) * 0.5 * (1 + cos(pi * min(1, (step - warmup_steps)
                                                      / max(1, total_steps - warmup_steps))))

    The two trainings differ only in the parameters: the embedder warms up from 0 with
    ``offset=1`` (its first step already trains at ``1 / warmup_steps`` of the peak, instead
    of wasting a step at factor 0) and decays to 0; the detector warms up from
    ``start=0.001`` and decays to ``floor=0.02``. The expressions are evaluated exactly as
    written above, in this order, so the factors are the same floats as the two hand-written
    schedules this class replaced (``tests/test_training.py`` keeps those as oracles).

    Args:
        warmup_steps: optimiser steps of the linear warm-up, >= 1.
        total_steps: optimiser steps of the whole run, >= 0.
        start: the factor the warm-up starts from, in [0, 1].
        floor: the factor the cosine decays to, in [0, 1].
        offset: 0 or 1, steps counted as already warmed up at step 0.
    """

    warmup_steps: int
    total_steps: int
    start: float = 0.0
    floor: float = 0.0
    offset: int = 0

    def __post_init__(self) -> None:
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {self.warmup_steps}")
        if self.total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {self.total_steps}")
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.floor <= 1.0):
            raise ValueError(
                f"start and floor are factors of the peak lr in [0, 1], got {self.start}, "
                f"{self.floor}"
            )
        if self.offset not in (0, 1):
            raise ValueError(f"offset must be 0 or 1, got {self.offset}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start + (1 - self.start) * (step + self.offset) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_rngs(seed: int, *, torch_only: bool = False) -> None:
    """Seed torch's CPU and CUDA RNGs with ``seed`` and, unless ``torch_only``, numpy's and
    python's global RNGs (numpy takes ``seed mod 2**32``)."""
    torch.manual_seed(seed)
    if not torch_only:
        np.random.seed(seed % 2**32)
        random.seed(seed)


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)``: seed numpy and python in a worker from the torch
    seed the DataLoader gave it (drawn from its ``generator``), so augmentations that use
    numpy or python RNGs are reproducible too."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch and CUDA global RNG states, as tensors, lists and ints only
    (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the RNG states of :func:`rng_state` (the CUDA ones only where a GPU is
    visible)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint written by :meth:`Trainer.save_checkpoint`, its tensors on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _value(x: torch.Tensor | float) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


@dataclass
class EpochStats:
    """What one epoch of :meth:`Trainer.fit` did: ``epoch`` is 0-based, ``loss_sum`` and
    ``part_sums`` add the per-step values, ``seconds`` is wall time of the batches."""

    epoch: int
    steps: int = 0
    images: int = 0
    loss_sum: float = 0.0
    part_sums: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        """Mean loss per step."""
        return self.loss_sum / max(self.steps, 1)

    @property
    def parts(self) -> dict[str, float]:
        """Mean of each loss term per step."""
        return {name: v / max(self.steps, 1) for name, v in self.part_sums.items()}

    @property
    def images_per_s(self) -> float:
        """Training throughput in images per second."""
        return self.images / max(self.seconds, 1e-9)


class Trainer:
    """AdamW + :class:`WarmupCosine` + AMP + checkpoints for ``modules``.

    The modules (e.g. ``{"model": embedder, "loss": loss}``) are moved to the device; their
    state dicts are saved under these names. ``params`` is what ``torch.optim.AdamW`` takes:
    tensors, or parameter groups (dicts with ``"params"`` and optionally their own ``"lr"``).

    Args:
        modules: the modules whose weights are trained and checkpointed, by checkpoint key.
        params: the parameters to optimise, or parameter groups.
        lr: peak learning rate of groups without their own ``"lr"``.
        weight_decay: AdamW's decoupled weight decay.
        schedule: the learning-rate factor per optimiser step.
        device: a device name or None for :func:`visearch.device.choose_device`'s default
            (CUDA when visible, else CPU).
        amp: fp16 autocast and gradient scaling; only ever enabled on CUDA.
        max_grad_norm: clip the (unscaled) gradients to this total L2 norm before each step;
            None does not clip.

    Raises:
        ValueError: ``device`` asks for CUDA but none is visible, or a key of ``modules`` is
            one of the engine's own checkpoint keys.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float,
        weight_decay: float,
        schedule: WarmupCosine,
        device: torch.device | str | None = None,
        amp: bool = True,
        max_grad_norm: float | None = None,
    ) -> None:
        clash = set(modules) & set(ENGINE_KEYS)
        if clash:
            raise ValueError(f"module names {sorted(clash)} are reserved checkpoint keys")
        self.device = choose_device(device)
        self.modules = dict(modules)
        for module in self.modules.values():
            module.to(self.device)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.max_grad_norm = max_grad_norm
        self.schedule = schedule
        self.optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        # A plain function, not the schedule object: LambdaLR then stores no schedule
        # parameters in its state_dict, so a resumed run follows its own arguments (for
        # instance more epochs than the interrupted run had).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimiser, lambda step: schedule(step)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """fp16 autocast when AMP is on (CUDA), else a no-op; wrap the forward pass in it."""
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp)

    @property
    def steps_done(self) -> int:
        """Optimiser steps taken so far, including those restored from a checkpoint."""
        return int(self.scheduler.last_epoch)

    def step(self, loss: torch.Tensor, parts: Mapping[str, Any] | None = None) -> float:
        """One optimisation step on the scalar ``loss``; returns its value.

        In this order: zero the gradients, backward of the (scaled) loss, unscale and clip
        the gradient norm when ``max_grad_norm`` is set, optimiser step, scaler update,
        schedule step. ``parts`` (the loss terms) only go into the error message.

        Raises:
            FloatingPointError: ``loss`` is NaN or infinite; nothing is updated then.
        """
        value = float(loss.detach())
        if not math.isfinite(value):
            terms = f" (terms {({k: _value(v) for k, v in parts.items()})})" if parts else ""
            raise FloatingPointError(
                f"training loss became {value}{terms} at optimiser step "
                f"{self.steps_done + 1}; lower the learning rate"
            )
        self.optimiser.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.max_grad_norm is not None:
            self.scaler.unscale_(self.optimiser)
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimiser.param_groups for p in g["params"]],
                max_norm=self.max_grad_norm,
            )
        self.scaler.step(self.optimiser)
        self.scaler.update()
        self.scheduler.step()
        return value

    def fit(
        self,
        epochs: int,
        batches: Callable[[int], Iterable[B]],
        loss_fn: Callable[[B], tuple[torch.Tensor, Mapping[str, Any], int]],
        *,
        steps_per_epoch: int,
        start_epoch: int = 0,
        end_epoch: Callable[[EpochStats], bool | None] | None = None,
        progress: bool = False,
        desc: str = "train",
    ) -> list[float]:
        """Run epochs ``start_epoch .. epochs - 1``; return the loss of every step run.

        Per epoch: ``batches(epoch)`` gives the epoch's batches (it also sets train mode and
        any per-epoch seeds); per batch, ``loss_fn(batch)`` returns ``(loss, parts, images)``
        (the scalar loss, its terms, the batch size) and :meth:`step` optimises it; after the
        batches, ``end_epoch`` gets the epoch's :class:`EpochStats` (validation, history and
        :meth:`save_checkpoint` go there).

        Args:
            epochs: the last epoch, exclusive (a resumed run continues up to it).
            batches: the batches of an epoch (0-based).
            loss_fn: a batch's loss; runs its forward pass under :meth:`autocast` itself.
            steps_per_epoch: batches per epoch, for the progress bar.
            start_epoch: the first epoch to run (epochs done by a restored checkpoint).
            end_epoch: called after each epoch; returning True stops training there (early
                stopping).
            progress: show one bar over all steps with the loss and images/s
                (:func:`visearch.progress.progress_bar`).
            desc: the bar's label.
        """
        bar = None
        if progress:
            bar = progress_bar(
                total=epochs * steps_per_epoch,
                initial=start_epoch * steps_per_epoch,
                unit="step",
                desc=desc,
            )
        step_losses: list[float] = []
        try:
            for epoch in range(start_epoch, epochs):
                stats = EpochStats(epoch)
                epoch_batches = batches(epoch)
                t0 = time.perf_counter()
                for batch in epoch_batches:
                    loss, parts, images = loss_fn(batch)
                    value = self.step(loss, parts)
                    step_losses.append(value)
                    stats.steps += 1
                    stats.images += images
                    stats.loss_sum += value
                    for name, part in parts.items():
                        stats.part_sums[name] = stats.part_sums.get(name, 0.0) + _value(part)
                    if bar is not None:
                        rate = stats.images / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix(epoch=epoch + 1, loss=f"{value:.3f}", img_s=f"{rate:.0f}")
                        bar.update(1)
                stats.seconds = time.perf_counter() - t0
                if end_epoch is not None and end_epoch(stats):
                    break
        finally:
            if bar is not None:
                bar.close()
        return step_losses

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs to continue bit for bit: each module's
        state dict under its name, ``optimiser``, ``scheduler``, ``scaler`` and ``rng``."""
        state = {name: module.state_dict() for name, module in self.modules.items()}
        state["optimiser"] = self.optimiser.state_dict()
        state["scheduler"] = self.scheduler.state_dict()
        state["scaler"] = self.scaler.state_dict()
        state["rng"] = rng_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (e.g. a :func:`read_checkpoint`). The scaler state is
        loaded only when AMP is on and the state has one (a CPU run saves an empty one); the
        RNG states only when present."""
        for name, module in self.modules.items():
            module.load_state_dict(state[name])
        self.optimiser.load_state_dict(state["optimiser"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.amp and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if "rng" in state:
            set_rng_state(state["rng"])

    def save_checkpoint(self, path: str | os.PathLike[str], **extra: Any) -> None:
        """Write :meth:`state_dict` plus ``extra`` (epoch, config, history, ...) to ``path``
        atomically: a crash leaves the previous checkpoint whole.

        Raises:
            ValueError: a key of ``extra`` would overwrite an engine or module key.
        """
        state = self.state_dict()
        clash = set(extra) & set(state)
        if clash:
            raise ValueError(f"checkpoint keys {sorted(clash)} are written by the engine")
        state.update(extra)
        with atomic_open(path, "wb") as f:
            torch.save(state, f)
