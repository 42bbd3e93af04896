"""The transformer trunk that both modalities pass through.

Every block component (ln_1, attn_in, attn_out, ln_2, mlp) is an `nn.ModuleDict` keyed either by
"shared" (one module serves both modalities) or by "image" / "text" (one module each). So sharing is
visible in parameter names (`trunk.blocks.3.mlp.shared.c_fc.weight` vs `...mlp.image.c_fc.weight`),
each tensor has exactly one name, and gradients of both modalities accumulate in a shared tensor.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import COMPONENTS, MODALITIES, ModelCfg
from .layers import LayerNorm, Mlp, multi_head_attention

# Called before a block runs: (layer index, tokens [B, L, D]) -> tokens. Used for lateral fusion.
BeforeBlockHook = Callable[[int, torch.Tensor], torch.Tensor]


def _make_component(name: str, width: int, mlp_ratio: float, eps: float) -> nn.Module:
    if name in ("ln_1", "ln_2"):
        return LayerNorm(width, eps=eps)
    if name == "attn_in":
        return nn.Linear(width, 3 * width)
    if name == "attn_out":
        return nn.Linear(width, width)
    return Mlp(width, mlp_ratio)


class Block(nn.Module):
    """Pre-norm residual attention block whose components are shared or modality-specific."""

    def __init__(self, cfg: ModelCfg, layer: int):
        super().__init__()
        shared = cfg.shared_components(layer)
        towers = {"image": cfg.vision, "text": cfg.text}
        present = [m for m in MODALITIES if cfg.runs(m, layer)]
        self.modalities = tuple(present)
        for comp in COMPONENTS:
            if comp in shared:
                t = towers["image"]
                parts = {"shared": _make_component(comp, t.width, t.mlp_ratio, cfg.norm_eps)}
            else:
                parts = {m: _make_component(comp, towers[m].width, towers[m].mlp_ratio, cfg.norm_eps)
                         for m in present}
            self.add_module(comp, nn.ModuleDict(parts))

    def part(self, comp: str, modality: str) -> nn.Module:
        parts: nn.ModuleDict = getattr(self, comp)
        return parts["shared"] if "shared" in parts else parts[modality]

    def forward(self, x: torch.Tensor, modality: str, heads: int, causal: bool,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.part("ln_1", modality)(x)
        attn, weights = multi_head_attention(h, self.part("attn_in", modality), self.part("attn_out", modality),
                                             heads, causal, need_weights)
        x = x + attn
        x = x + self.part("mlp", modality)(self.part("ln_2", modality)(x))
        return x, weights


class Trunk(nn.Module):
    def __init__(self, cfg: ModelCfg):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.layers = {m: cfg.modality_layers(m) for m in MODALITIES}
        self.heads = {"image": cfg.vision.heads, "text": cfg.text.heads}
        self.grad_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        modality: str,
        before_block: BeforeBlockHook | None = None,
        collect: dict | None = None,
        attn_layers: tuple[int, ...] = (),
    ) -> torch.Tensor:
        """Run the blocks `modality` uses. `collect`, if given, receives per-layer hidden states
        (list "hidden", after each block) and attention maps ({"attn": {layer: [B, H, L, L]}})."""
        causal = modality == "text"
        heads = self.heads[modality]
        for i in self.layers[modality]:
            if before_block is not None:
                x = before_block(i, x)
            block = self.blocks[i]
            need = collect is not None and i in attn_layers
            if self.grad_checkpointing and torch.is_grad_enabled() and not need:
                x, w = checkpoint(block, x, modality, heads, causal, False, use_reentrant=False)
            else:
                x, w = block(x, modality, heads, causal, need)
            if collect is not None:
                collect.setdefault("hidden", []).append(x)
                collect.setdefault("layers", []).append(i)
                if w is not None:
                    collect.setdefault("attn", {})[i] = w
        return x
