"""Small building blocks: LayerNorm computed in fp32, QuickGELU MLP, fused multi-head attention, and the
conv/BatchNorm primitives of MS-CLIP-S's stem and branch (few kernel launches, CPU-friendly layouts)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm that normalises in float32 and returns the input dtype.

    MS-CLIP uses a TF-style LN with eps=1e-12 (inside the square root, biased variance), which is
    exactly `F.layer_norm`; OpenAI CLIP uses eps=1e-5. Computing in fp32 keeps bf16 runs stable.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)  # one fused op
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


QUICK_GELU_ALPHA = 1.702


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), as written in OpenAI CLIP (`Mlp` computes the same function faster)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


class Mlp(nn.Module):
    """c_fc -> QuickGELU -> c_proj.

    QuickGELU(h) = silu(a h) / a with a = 1.702, and both scalings are moved onto the (small) weights:
    silu(x (aW1)^T + a b1) @ (W2 / a)^T + b2. The [tokens, hidden] activation then costs one fused silu
    kernel forward and one backward instead of ~8 elementwise passes (15 % of a tiny-model CPU step).
    One path for every input (no branch on the row count): eager, compiled and exported graphs compute the
    same thing, and torch.export keeps a symbolic batch. With fewer rows than channels (one image at
    inference) scaling the weights costs a few percent more than it saves.
    The parameters, and so checkpoints, are unchanged; results agree to fp32 rounding.
    """

    def __init__(self, width: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(width * ratio)
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = QUICK_GELU_ALPHA
        h = F.silu(F.linear(x, self.c_fc.weight * a, self.c_fc.bias * a))
        return F.linear(h, self.c_proj.weight / a, self.c_proj.bias)


def multi_head_attention(
    x: torch.Tensor,
    in_proj: nn.Linear,
    out_proj: nn.Linear,
    heads: int,
    causal: bool,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Self-attention on batch-first tokens [B, L, D].

    The projections are passed in (not owned) because a shared projection may be split into a
    different number of heads per modality. The default path is fused SDPA; `need_weights` takes
    an explicit softmax path on the same weights so analysis tools can read the attention maps.
    """
    b, n, d = x.shape
    q, k, v = F.linear(x, in_proj.weight, in_proj.bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    weights = None
    if need_weights:
        scores = (q * (d // heads) ** -0.5) @ k.transpose(-2, -1)
        if causal:
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        weights = scores.float().softmax(dim=-1).to(q.dtype)
        out = weights @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out = out.transpose(1, 2).reshape(b, n, d)
    return out_proj(out), weights


# oneDNN's NCHW 1x1 / depthwise kernels are slow for a handful of channels on CPU (a 4 -> 4 1x1 conv on a
# 32x32 map, batch 128: 12 ms forward + backward vs 0.6 ms as one GEMM over the channels); from 16
# channels on they win again (measured on the tiny models' shapes, 1 thread).
_GEMM_MAX_CHANNELS = 8


def _few_channels(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.shape[1] <= _GEMM_MAX_CHANNELS


def conv1x1(x: torch.Tensor, weight: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """`F.conv2d(x, weight, stride=stride)` for a bias-free 1x1 kernel (no padding: a strided 1x1 conv
    reads every stride-th pixel). With few input channels on CPU it is one GEMM over the channels; its
    result then has a channel-major ([C, B, H, W]) memory layout, which `batch_norm_group` and further
    1x1 convs read without a copy."""
    if stride > 1:
        x = x[:, :, ::stride, ::stride]
    if not _few_channels(x):
        return F.conv2d(x, weight)
    return torch.einsum("oc,bchw->bohw", weight.flatten(1), x)


def depthwise_pool(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.conv2d(x, weight, stride=k, groups=C)` for a depthwise k x k kernel with stride k (learned
    per-channel pooling of non-overlapping k x k cells; needs H, W divisible by k)."""
    b, c, h, w = x.shape
    k = weight.shape[-1]
    if k == 1:
        return x * weight.view(1, c, 1, 1)
    if not _few_channels(x) or h % k or w % k:
        return F.conv2d(x, weight, stride=k, groups=c)
    return torch.einsum("bcikjl,ckl->bcij", x.reshape(b, c, h // k, k, w // k, k), weight.view(c, k, k))


def _bn_update_factor(norm: nn.BatchNorm2d) -> float:
    """What `nn.BatchNorm2d.forward` does before normalising: count the batch, return the running-stats
    factor (momentum, or 1 / count for a cumulative average)."""
    if not norm.training:
        return 0.0
    norm.num_batches_tracked.add_(1)
    return 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum


def _batch_norm(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                training: bool, factor: float, eps: float) -> torch.Tensor:
    """F.batch_norm; a channel-major tensor (see `conv1x1`) is normalised as [1, C, B*H*W] (the same
    statistics: per channel over B*H*W values) instead of being copied to NCHW first."""
    if x.dim() == 4 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous():
        c, b, h, w = x.transpose(0, 1).shape
        y = F.batch_norm(x.transpose(0, 1).reshape(1, c, b * h * w), mean, var, weight, bias, training, factor, eps)
        return y.view(c, b, h, w).transpose(0, 1)
    return F.batch_norm(x, mean, var, weight, bias, training, factor, eps)


def batch_norm_group(x: torch.Tensor, norms: Sequence[nn.BatchNorm2d]) -> torch.Tensor:
    """`norms[i]` applied to the i-th block of x's channels (block sizes = their num_features), as one
    normalisation over the concatenated parameters and running statistics when their settings agree.

    Exactly the modules' own computation, statistics updates included: the running statistics are
    updated in the concatenated copy and written back, so the parameters and buffers (and checkpoints)
    stay those of the modules."""
    if not all(n.affine and n.track_running_stats for n in norms):
        return torch.cat([n(part) for n, part in zip(norms, x.split([n.num_features for n in norms], 1))], 1)
    factors = [_bn_update_factor(n) for n in norms]
    training = norms[0].training
    if len(norms) == 1:
        n = norms[0]
        return _batch_norm(x, n.running_mean, n.running_var, n.weight, n.bias, training, factors[0], n.eps)
    if len({(f, n.eps, n.training) for f, n in zip(factors, norms)}) > 1:  # e.g. only one module in eval mode
        parts = x.split([n.num_features for n in norms], 1)
        return torch.cat([_batch_norm(p, n.running_mean, n.running_var, n.weight, n.bias, n.training, f, n.eps)
                          for p, n, f in zip(parts, norms, factors)], 1)
    mean = torch.cat([n.running_mean for n in norms])
    var = torch.cat([n.running_var for n in norms])
    y = _batch_norm(x, mean, var, torch.cat([n.weight for n in norms]), torch.cat([n.bias for n in norms]),
                    training, factors[0], norms[0].eps)
    if training:
        with torch.no_grad():
            sizes = [n.num_features for n in norms]
            for n, m, v in zip(norms, mean.split(sizes), var.split(sizes)):
                n.running_mean.copy_(m)
                n.running_var.copy_(v)
    return y
