"""Images to the model's input on the device: the one place a batch is cast and normalised.

A loader may hand over uint8 images (N, 3, H, W) so that the copy to the device is 4x smaller and
normalisation runs there on the whole batch; float images are taken as already normalised.
"""
from __future__ import annotations

from typing import Sequence

import torch


def images_to_model_input(images: torch.Tensor, device: torch.device | str, mean: Sequence[float],
                          std: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Move ``images`` to ``device``; uint8 images are scaled to [0, 1] and normalised with ``mean``/``std``."""
    images = images.to(device, non_blocking=True)
    if images.dtype != torch.uint8:
        return images
    m = torch.as_tensor(mean, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    # (x/255 - m)/s as one multiply-add: x * (1/(255 s)) - m/s
    return torch.addcmul(-m / s, images.to(dtype), 1.0 / (255.0 * s))
