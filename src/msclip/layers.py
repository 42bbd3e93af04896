"""Small building blocks: LayerNorm computed in fp32, QuickGELU MLP, fused multi-head attention."""
from __future__ import annotations

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


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, width: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(width * ratio)
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


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
