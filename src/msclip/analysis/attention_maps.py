"""PNG attention maps from `MSCLIP.forward_intermediates(..., attn_layers=...)` (the same fused model).

* image: for each chosen head, the class token's attention over the patch grid, overlaid on the image;
* caption: for each chosen head, the token-to-token attention matrix over the caption's real tokens
  (start token .. end token), with the tokens as tick labels.
matplotlib's Agg backend is used, so no display is needed.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .plots import pyplot, save_figure


def patch_grid(num_tokens: int, image_size: tuple[int, int] | None = None, patch: int | None = None,
               prefix: int = 1) -> tuple[int, int]:
    """(rows, cols) of the patch grid given the image token count (class token(s) first)."""
    n = num_tokens - prefix
    if image_size and patch and (image_size[0] // patch) * (image_size[1] // patch) == n:
        return image_size[0] // patch, image_size[1] // patch
    side = math.isqrt(n)
    return (side, side) if side * side == n else (1, n)


def cls_attention(attn: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """[H, L, L] -> [H, rows, cols]: attention of token 0 to each patch token."""
    rows, cols = grid
    return attn[:, 0, prefix:prefix + rows * cols].float().reshape(attn.shape[0], rows, cols)


def _layout(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def save_image_attention(attn: torch.Tensor, path: str | os.PathLike, heads: Sequence[int] | None = None,
                         image: np.ndarray | None = None, grid: tuple[int, int] | None = None,
                         title: str = "") -> Path:
    """One PNG: class-token attention per head (over `image`, an HxWx3 float array in [0, 1], if given)."""
    plt = pyplot()
    heads = list(range(attn.shape[0])) if heads is None else list(heads)
    grid = grid or patch_grid(attn.shape[-1])
    maps = cls_attention(attn, grid)[heads].cpu().numpy()
    panels = len(heads) + (image is not None)
    r, c = _layout(panels)
    fig, axes = plt.subplots(r, c, figsize=(2.6 * c, 2.6 * r), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    slots = list(axes.flat)
    if image is not None:
        slots[0].imshow(image)
        slots[0].set_title("image", fontsize=8)
        slots = slots[1:]
    h, w = (image.shape[0], image.shape[1]) if image is not None else grid
    for ax, head, m in zip(slots, heads, maps):
        if image is not None:
            ax.imshow(image)
        ax.imshow(m, cmap="inferno", alpha=0.6 if image is not None else 1.0, extent=(0, w, h, 0),
                  interpolation="nearest")
        ax.set_title(f"head {head}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def save_text_attention(attn: torch.Tensor, tokens: Sequence[str], path: str | os.PathLike,
                        heads: Sequence[int] | None = None, title: str = "") -> Path:
    """One PNG: token-to-token attention per head over the first len(tokens) positions."""
    plt = pyplot()
    heads = list(range(attn.shape[0])) if heads is None else list(heads)
    n = len(tokens)
    mats = attn[heads, :n, :n].float().cpu().numpy()
    r, c = _layout(len(heads))
    side = max(2.6, 0.22 * n + 1.2)
    fig, axes = plt.subplots(r, c, figsize=(side * c, side * r), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, head, m in zip(axes.flat, heads, mats):
        ax.axis("on")
        ax.imshow(m, cmap="viridis", vmin=0.0, interpolation="nearest")
        ax.set_xticks(range(n), tokens, rotation=90, fontsize=6)
        ax.set_yticks(range(n), tokens, fontsize=6)
        ax.set_title(f"head {head}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Model input [3, H, W] -> displayable HxWx3 array in [0, 1]."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (image.float().cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()
