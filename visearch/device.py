"""The one place that chooses a torch device."""

from __future__ import annotations

import torch


def choose_device(name: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``name`` when given (``"cpu"``, ``"cuda"``, ``"cuda:1"``), else
    the first GPU when one is visible, else the CPU.

    Raises:
        ValueError: ``name`` asks for CUDA but no GPU is visible, or is not a device name.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"not a torch device: {name!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is visible")
    return dev
