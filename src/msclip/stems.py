"""Image stems: the ViT patchify conv, or MS-CLIP-S's residual conv stem (early specialization)."""
from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, as in ViT/CLIP (no bias)."""

    def __init__(self, width: int, patch_size: int):
        super().__init__()
        self.conv = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class BasicStage(nn.Module):
    """One 'basic_v0' block: ReLU(BN(conv3x3(x)) + BN(conv1x1(x))), no inner ReLU, no second conv."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.down_conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        self.down_bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn1(self.conv1(x)) + self.down_bn(self.down_conv(x)))


class ConvStem(nn.Module):
    """Residual conv stem that replaces patchify + the first image block (MS-CLIP-S).

    conv(3 -> D/16, stride 2) + BN + ReLU, then four basic stages doubling channels to D with the
    configured strides, then a 1x1 conv D -> D (no bias, no BN, no activation).
    """

    def __init__(self, width: int, strides: list[int], first_kernel: int = 3):
        super().__init__()
        c = width // 16
        self.conv1 = nn.Conv2d(3, c, first_kernel, stride=2, padding=first_kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.stages = nn.ModuleList()
        for s in strides:
            self.stages.append(BasicStage(c, 2 * c, s))
            c *= 2
        self.last_conv = nn.Conv2d(width, width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        for stage in self.stages:
            x = stage(x)
        return self.last_conv(x)
