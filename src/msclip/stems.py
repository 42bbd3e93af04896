"""Image stems: the ViT patchify conv, or MS-CLIP-S's residual conv stem (early specialization)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import batch_norm_group, conv1x1


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
        # Not one conv with the 1x1 kernel padded into a 3x3: on CPU that measured no faster on the tiny
        # models (the 3x3 cost grows with its output channels) and doubles the stage's FLOPs at full size.
        main = batch_norm_group(self.conv1(x), [self.bn1])
        down = batch_norm_group(conv1x1(x, self.down_conv.weight, self.down_conv.stride[0]), [self.down_bn])
        return torch.relu(main + down)


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

    def forward(self, x: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
        """Images -> [B, D, h, w]; `first`: relu(bn1(conv1(images))) already computed (`entry_pair`)."""
        x = torch.relu(self.bn1(self.conv1(x))) if first is None else first
        for stage in self.stages:
            x = stage(x)
        # The 1x1 last conv as a linear layer on the token layout the image tower flattens the map to.
        h, w = x.shape[-2:]
        tokens = F.linear(x.flatten(2).transpose(1, 2), self.last_conv.weight.flatten(1))
        return tokens.transpose(1, 2).unflatten(2, (h, w))

    def entry_pair(self, images: torch.Tensor, entry: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(relu(bn1(conv1(images))), entry(images)) as one conv and one BN, for `entry` another conv ->
        BN -> ReLU on the same images with the same conv geometry (MS-CLIP-S's parallel branch starts so);
        None when the geometry differs. Pass the halves to `forward(images, first)` and `entry(images, out)`."""
        conv, bn = entry.conv, entry.bn
        if not _same_geometry(self.conv1, conv):
            return None
        if self.conv1.weight.is_contiguous(memory_format=torch.channels_last):  # train.channels_last
            images = images.contiguous(memory_format=torch.channels_last)
        y = F.conv2d(images, torch.cat([self.conv1.weight, conv.weight]), stride=conv.stride, padding=conv.padding)
        stem, side = torch.relu(batch_norm_group(y, [self.bn1, bn])).split([self.bn1.num_features, bn.num_features], 1)
        return stem, side


def _same_geometry(a: nn.Conv2d, b: nn.Conv2d) -> bool:
    keys = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    return all(getattr(a, k) == getattr(b, k) for k in keys) and a.bias is None and b.bias is None
