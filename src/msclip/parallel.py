"""MS-CLIP-S's parallel conv branch and the lateral adapters that fuse it into the image tokens.

The branch runs on the input image; stage j's output feeds adapter j, which *replaces* the tokens
entering trunk layer `lateral_layers[j]` (there is no residual from the old tokens: they survive only
through a 3x3 depthwise conv). Information flows one way, branch -> trunk.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerNorm, batch_norm_group, conv1x1, depthwise_pool
from .trunk import BeforeBlockHook


class FirstStage(nn.Module):
    def __init__(self, c_out: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(3, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`out`: this stage's result already computed (by `ConvStem.entry_pair`), returned as is."""
        return torch.relu(self.bn(self.conv(x))) if out is None else out


class BottleneckStage(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 bottleneck with a projected shortcut; BN eps 1e-6 as released."""

    def __init__(self, c_in: int, c_out: int, stride: int, eps: float):
        super().__init__()
        mid = c_out // 2
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid, eps=eps)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid, eps=eps)
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out, eps=eps)
        self.residual_conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        self.residual_bn = nn.BatchNorm2d(c_out, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(batch_norm_group(conv1x1(x, self.conv1.weight), [self.bn1]))
        y = torch.relu(batch_norm_group(self.conv2(y), [self.bn2]))
        y = batch_norm_group(conv1x1(y, self.conv3.weight), [self.bn3])
        return torch.relu(y + batch_norm_group(conv1x1(x, self.residual_conv.weight, self.residual_conv.stride[0]),
                                               [self.residual_bn]))


class LateralAdapter(nn.Module):
    """Fuse a branch feature map into the tokens: LN(cat(2*cls, dwBN(grid) + pw(dwBN_k(P))))."""

    def __init__(self, c_branch: int, width: int, kernel: int, eps: float):
        super().__init__()
        # top -> bottom: learned per-channel kxk pooling onto the token grid, then 1x1 to the width
        self.t2b_dw = nn.Conv2d(c_branch, c_branch, kernel, stride=kernel, groups=c_branch, bias=False)
        self.t2b_bn = nn.BatchNorm2d(c_branch)
        self.t2b_pw = nn.Conv2d(c_branch, width, 1, bias=False)
        # bottom: the trunk's patch tokens as a grid through a 3x3 depthwise conv
        self.bottom_dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.bottom_bn = nn.BatchNorm2d(width)
        self.ln = LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, branch: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, d = x.shape
        cls, patches = x[:, :1], x[:, 1:]
        # Row-major token order; as a channels-last view of the tokens (no copy in, none out).
        grid = patches.unflatten(1, (h, w)).permute(0, 3, 1, 2)
        bottom = batch_norm_group(self.bottom_dw(grid), [self.bottom_bn]).permute(0, 2, 3, 1).reshape(b, h * w, d)
        pooled = batch_norm_group(depthwise_pool(branch, self.t2b_dw.weight), [self.t2b_bn])
        if pooled.shape[-2:] != (h, w):
            raise RuntimeError(f"lateral adapter: branch map {tuple(pooled.shape[-2:])} != token grid {(h, w)}")
        # The 1x1 t2b_pw as a linear layer on the token layout.
        top = F.linear(pooled.flatten(2).transpose(1, 2), self.t2b_pw.weight.flatten(1)).to(bottom.dtype)
        # The released models concatenate the class token in front of the top path too: cls + cls.
        return self.ln(torch.cat([cls + cls, bottom + top], dim=1))


class ParallelBranch(nn.Module):
    """The conv branch plus its adapters. It plugs into the trunk as a before-block hook
    (`lateral_hook`): stage j runs lazily, right before trunk layer `lateral_layers[j]`, and adapter j
    replaces the tokens entering that layer."""

    def __init__(self, width: int, strides: list[int], kernels: list[int], lateral_layers: list[int],
                 norm_eps: float, bottleneck_eps: float):
        super().__init__()
        n = len(strides)
        if not (len(kernels) == len(lateral_layers) == n):
            raise ValueError(f"parallel branch: {n} strides, {len(kernels)} kernels, {len(lateral_layers)} layers")
        if list(lateral_layers) != sorted(set(lateral_layers)):
            raise ValueError(f"parallel branch: lateral layers must increase, got {lateral_layers}")
        self.lateral_layers = tuple(lateral_layers)
        channels = [width // 2 ** (n - 1 - j) for j in range(n)]
        self.stages = nn.ModuleList([FirstStage(channels[0], strides[0])])
        for j in range(1, n):
            self.stages.append(BottleneckStage(channels[j - 1], channels[j], strides[j], bottleneck_eps))
        self.adapters = nn.ModuleList(
            LateralAdapter(c, width, k, norm_eps) for c, k in zip(channels, kernels))

    def stage_outputs(self, images: torch.Tensor, first: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """P_0 = stage_0(image), P_j = stage_j(P_{j-1}), computed one at a time as they are drawn;
        `first`: P_0 already computed (by the conv stem's first conv, `ConvStem.entry_pair`)."""
        x = self.stages[0](images, first)  # through the module call: its hooks see the stage as always
        yield x
        for stage in self.stages[1:]:
            x = stage(x)
            yield x

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's feature map at once (for inspection; the model itself uses `lateral_hook`)."""
        return list(self.stage_outputs(images))

    def lateral_hook(self, images: torch.Tensor, h: int, w: int, first: torch.Tensor | None = None) -> BeforeBlockHook:
        """A trunk before-block hook for one forward pass over `images` (token grid h x w; `first`: as
        in `stage_outputs`)."""
        stages = self.stage_outputs(images, first)
        adapter_at = dict(zip(self.lateral_layers, self.adapters))

        def before_block(layer: int, x: torch.Tensor) -> torch.Tensor:
            adapter = adapter_at.get(layer)
            if adapter is None:
                return x
            # The trunk visits layers in increasing order, so the next stage is the one this adapter needs.
            return adapter(x, next(stages), h, w)

        return before_block
