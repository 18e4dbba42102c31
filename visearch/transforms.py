"""Image -> tensor pipelines (torchvision.transforms.v2) for training and inference.

Both take an RGB ``uint8 [H, W, 3]`` numpy array (what ``visearch.imageio.decode_image``
returns) and give a normalised ``float32 [3, S, S]`` tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2


def train_transform(
    image_size: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[float, float] = (0.35, 1.0),
    flip: float = 0.5,
    jitter: float = 0.3,
    erasing: float = 0.5,
) -> v2.Compose:
    """Augmentations for metric learning on product images.

    Random resized crop (``scale`` of the area, aspect 3/4..4/3), horizontal flip with
    probability ``flip``, colour jitter of brightness/contrast/saturation by ``jitter`` (no hue:
    colour tells SKUs apart), then random erasing with probability ``erasing`` (the reference
    design credits erasing for making the model look at shape as well as texture). Set
    ``jitter`` or ``erasing`` to 0 to switch them off.
    """
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop((image_size, image_size), scale=scale, antialias=True),
    ]
    if flip > 0:
        steps.append(v2.RandomHorizontalFlip(flip))
    if jitter > 0:
        steps.append(v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if erasing > 0:
        steps.append(v2.RandomErasing(p=erasing, scale=(0.02, 0.25), value=0))
    return v2.Compose(steps)


def eval_transform(image_size: int, *, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Resize to ``image_size`` x ``image_size`` (aspect not kept, as in training's random
    resized crop) and normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
