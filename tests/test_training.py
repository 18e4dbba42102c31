"""The training engine: the schedule against closed forms, the step against a hand-written
sequence, exact resume, atomic checkpoints, device and AMP choice."""

from __future__ import annotations

import copy
import errno
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from visearch import training
from visearch.training import (
    EpochStats,
    Trainer,
    WarmupCosine,
    read_checkpoint,
    rng_state,
    set_rng_state,
)

GRID = [(total, warmup) for total in (0, 1, 2, 7, 10, 99, 100, 1000, 2345)
        for warmup in (1, 3, 10, 100, 200)]  # fmt: skip


def _embedder_schedule_before_the_engine(total_steps: int, warmup_steps: int):
    # The embedder's own schedule before the engine, verbatim.
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _detector_schedule_before_the_engine(step: int, *, warmup: int, total: int) -> float:
    # The detector's own schedule before the engine, verbatim.
    if step < warmup:
        return 0.001 + (1 - 0.001) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))


def test_warmup_cosine_reproduces_both_former_schedules_bit_for_bit() -> None:
    for total, warmup in GRID:
        old_emb = _embedder_schedule_before_the_engine(total, warmup)
        emb = WarmupCosine(warmup, total, offset=1)
        det = WarmupCosine(warmup, total, start=0.001, floor=0.02)
        for step in range(total + 3):
            assert emb(step) == old_emb(step), (total, warmup, step)
            assert det(step) == _detector_schedule_before_the_engine(
                step, warmup=warmup, total=total
            ), (total, warmup, step)


@pytest.mark.parametrize(
    ("warmup", "total", "start", "floor", "offset"),
    [(4, 20, 0.0, 0.0, 1), (5, 23, 0.001, 0.02, 0), (1, 1, 0.5, 0.1, 0), (10, 8, 0.0, 0.0, 0)],
)
def test_warmup_cosine_matches_a_closed_form_oracle(
    warmup: int, total: int, start: float, floor: float, offset: int
) -> None:
    schedule = WarmupCosine(warmup, total, start=start, floor=floor, offset=offset)
    steps = np.arange(total + 5, dtype=np.float64)
    # Vectorised oracle: a line through (-offset, start) and (warmup - offset, 1), then a cosine
    # from 1 to floor over [warmup, total], then floor.
    ramp = start + (1 - start) * (steps + offset) / warmup
    t = np.clip((steps - warmup) / max(1, total - warmup), 0, 1)
    decay = floor + (1 - floor) * (np.cos(np.pi * t) + 1) / 2
    oracle = np.where(steps < warmup, ramp, decay)
    got = np.array([schedule(int(s)) for s in steps])
    np.testing.assert_allclose(got, oracle, rtol=0, atol=1e-15)
    # Landmarks, exactly.
    assert schedule(0) == (start + (1 - start) * offset / warmup)
    assert schedule(warmup) == 1.0
    assert schedule(max(total, warmup) + 4) == floor


def test_warmup_cosine_rejects_impossible_parameters() -> None:
    with pytest.raises(ValueError, match="warmup_steps must be >= 1"):
        WarmupCosine(0, 10)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        WarmupCosine(1, 10, floor=1.5)
    with pytest.raises(ValueError, match="offset must be 0 or 1"):
        WarmupCosine(1, 10, offset=2)


class _Net(nn.Module):
    """A small regression net with dropout, so training draws from torch's RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))
        self.bn = nn.BatchNorm1d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.body(x))


def _engine(seed: int, *, total: int = 12, max_grad_norm: float | None = None):
    torch.manual_seed(seed)
    net = _Net()
    groups = [
        {"params": list(net.body[0].parameters()), "lr": 1e-3},
        {"params": list(net.body[3].parameters()) + list(net.bn.parameters()), "lr": 1e-2},
    ]
    engine = Trainer(
        {"model": net},
        groups,
        lr=1e-2,
        weight_decay=1e-2,
        schedule=WarmupCosine(3, total, start=0.001, floor=0.02),
        device="cpu",
        max_grad_norm=max_grad_norm,
    )
    return net, engine


def _data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(n, 1, generator=g)


def _loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(net(x), y)


def test_scheduled_lrs_are_peak_times_factor_and_the_state_holds_no_schedule() -> None:
    net, engine = _engine(0)
    x, y = _data()
    seen = []
    for _ in range(12):
        seen.append([g["lr"] for g in engine.optimiser.param_groups])
        engine.step(_loss(net, x, y))
    schedule = WarmupCosine(3, 12, start=0.001, floor=0.02)
    assert seen == [[1e-3 * schedule(s), 1e-2 * schedule(s)] for s in range(12)]
    assert engine.steps_done == 12
    # A resumed run with other arguments follows them, not the interrupted run's schedule.
    assert engine.scheduler.state_dict()["lr_lambdas"] == [None, None]


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_step_is_the_hand_written_sequence(max_grad_norm: float | None) -> None:
    net, engine = _engine(1, max_grad_norm=max_grad_norm)
    ref = copy.deepcopy(net)
    ref_groups = [
        {"params": list(ref.body[0].parameters()), "lr": 1e-3},
        {"params": list(ref.body[3].parameters()) + list(ref.bn.parameters()), "lr": 1e-2},
    ]
    opt = torch.optim.AdamW(ref_groups, lr=1e-2, weight_decay=1e-2)
    schedule = WarmupCosine(3, 12, start=0.001, floor=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s))
    x, y = _data()
    clipped = False
    for step in range(5):
        torch.manual_seed(step)  # the same dropout masks on both sides
        value = engine.step(_loss(net, x, y))
        torch.manual_seed(step)
        loss = _loss(ref, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(
                [p for g in opt.param_groups for p in g["params"]], max_norm=max_grad_norm
            )
            clipped |= bool(norm > max_grad_norm)
        opt.step()
        sched.step()
        assert value == float(loss.detach())
    assert clipped == (max_grad_norm is not None)
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_non_finite_loss_raises_before_any_update() -> None:
    net, engine = _engine(0)
    x, y = _data()
    bad = _loss(net, x, y) * float("nan")
    before = copy.deepcopy(net.state_dict())  # after the forward pass (BN statistics)
    with pytest.raises(FloatingPointError, match=r"nan .*at optimiser step 1; lower the lear"):
        engine.step(bad, {"mse": bad})
    assert engine.steps_done == 0
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name


class _Crash(RuntimeError):
    pass


def _fit(out: Path, *, seed: int, resume: bool, crash_after: int | None = None):
    """Four epochs of three batches; each batch mixes numpy and python RNG draws into the
    data and the net draws dropout masks from torch, so resuming needs every RNG state."""
    net, engine = _engine(seed)
    x, y = _data()
    ckpt = out / "checkpoint.pt"
    start, history = 0, []
    if resume:
        state = read_checkpoint(ckpt)
        engine.load_state_dict(state)
        start, history = state["epoch"], list(state["history"])
    else:
        training.seed_rngs(7)

    def batches(epoch: int):
        net.train()
        order = np.random.permutation(len(x))
        return [order[i : i + 8] for i in range(0, len(x), 8)]

    def loss_fn(idx):
        noise = random.gauss(0.0, 0.01)
        loss = _loss(net, x[idx] + noise, y[idx])
        return loss, {"mse": loss}, len(idx)

    def end_epoch(stats: EpochStats) -> None:
        history.append(stats.loss)
        engine.save_checkpoint(ckpt, epoch=stats.epoch + 1, history=history)
        if stats.epoch + 1 == crash_after:
            raise _Crash

    losses = engine.fit(4, batches, loss_fn, steps_per_epoch=3, start_epoch=start,
                        end_epoch=end_epoch)  # fmt: skip
    return net, losses, history


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full_net, full_losses, full_history = _fit(tmp_path / "a", seed=0, resume=False)
    with pytest.raises(_Crash):
        _fit(tmp_path / "b", seed=0, resume=False, crash_after=2)
    torch.manual_seed(99)  # scramble the global RNGs: the checkpoint must restore them
    np.random.seed(99)
    random.seed(99)
    net, losses, history = _fit(tmp_path / "b", seed=5, resume=True)
    assert len(full_losses) == 12 and losses == full_losses[6:]
    assert history == full_history
    for (name, a), b in zip(full_net.state_dict().items(), net.state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(a, b), name

    # Control: without the RNG states the same resume draws other dropout masks and noise.
    state = read_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert state["epoch"] == 4
    (tmp_path / "c").mkdir()
    with pytest.raises(_Crash):
        _fit(tmp_path / "c", seed=0, resume=False, crash_after=2)
    state = read_checkpoint(tmp_path / "c" / "checkpoint.pt")
    del state["rng"]
    torch.save(state, tmp_path / "c" / "checkpoint.pt")
    _, other, _ = _fit(tmp_path / "c", seed=0, resume=True)
    assert other != full_losses[6:]


def test_rng_state_round_trips_every_generator() -> None:
    training.seed_rngs(3)
    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net, engine = _engine(0)
    path = tmp_path / "checkpoint.pt"
    engine.save_checkpoint(path, epoch=1)
    x, y = _data()
    engine.step(_loss(net, x, y))
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        engine.save_checkpoint(path, epoch=2)
    monkeypatch.setattr(torch, "save", real_save)
    state = read_checkpoint(path)
    assert state["epoch"] == 1 and state["scheduler"]["last_epoch"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp file left
    engine.save_checkpoint(path, epoch=2)
    assert read_checkpoint(path)["scheduler"]["last_epoch"] == 1


def test_checkpoint_keys_cannot_shadow_the_engine_state(tmp_path: Path) -> None:
    _, engine = _engine(0)
    with pytest.raises(ValueError, match=r"\['optimiser'\] are written by the engine"):
        engine.save_checkpoint(tmp_path / "c.pt", optimiser={})
    with pytest.raises(ValueError, match=r"\['rng'\] are reserved"):
        Trainer({"rng": nn.Linear(1, 1)}, [], lr=1.0, weight_decay=0.0,
                schedule=WarmupCosine(1, 1), device="cpu")  # fmt: skip


def test_amp_is_only_ever_on_for_cuda() -> None:
    net, engine = _engine(0)
    assert engine.device == torch.device("cpu") and not engine.amp
    assert not engine.scaler.is_enabled()
    with engine.autocast():
        assert net.body[0](torch.randn(2, 4)).dtype == torch.float32
    # A CPU checkpoint's empty scaler state is not loaded into a disabled scaler.
    engine.load_state_dict(engine.state_dict())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_raises() -> None:
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        Trainer({"model": nn.Linear(1, 1)}, [], lr=1.0, weight_decay=0.0,
                schedule=WarmupCosine(1, 1), device="cuda")  # fmt: skip
