"""``machine()``: what a benchmark's figures were measured on, described the same way by all."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Sequence
from typing import Any


def machine(packages: Sequence[str] = ()) -> dict[str, Any]:
    """CPU count and torch threads, platform, Python, torch/faiss/numpy versions, whether
    CUDA is available and the first GPU's name (None without one), and the installed
    version of each distribution named in ``packages`` (e.g. ``"grpcio"``)."""
    import numpy as np
    import torch

    try:  # a GPU machine without a registry may lack faiss; describe it anyway
        import faiss

        faiss_version: str | None = faiss.__version__
    except ImportError:
        faiss_version = None

    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "faiss": faiss_version, "numpy": np.__version__,
        "cuda": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }
    for name in packages:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    return info
