"""`torch.export` of the image and the text encoder, with a dynamic batch (and text length) dimension.

The exported programs return the encoders' outputs: unnormalised features [B, embed_dim]. The text encoder
takes tokens [B, L] for any 1 <= L <= context_length (trimmed inputs are exact: the text is causal and
pooled at the EOT = largest-id position), so nothing data-dependent (the model's own trimming) is traced.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from ..model import MSCLIP

KINDS = ("image", "text")
INPUT_NAMES = {"image": "images", "text": "tokens"}
OUTPUT_NAME = "features"


class ImageEncoder(nn.Module):
    """images [B, 3, S, S] float32 (preprocessed) -> features [B, embed_dim], unnormalised."""

    def __init__(self, model: MSCLIP):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class TextEncoder(nn.Module):
    """tokens [B, L] int64, L <= context length -> features [B, embed_dim], unnormalised."""

    def __init__(self, model: MSCLIP):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, trim=False)  # trimming is data-dependent: the caller's choice


def encoder_modules(model: MSCLIP) -> dict[str, nn.Module]:
    return {"image": ImageEncoder(model).eval(), "text": TextEncoder(model).eval()}


def example_inputs(model: MSCLIP, kind: str, batch: int = 2) -> torch.Tensor:
    """A tracing input: batch 2, because torch.export specialises a dimension traced at size 1."""
    cfg = model.cfg
    if kind == "image":
        size = cfg.vision.image_size
        dtype = model.image.positional_embedding.dtype
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=dtype)
    length = cfg.text.context_length
    tokens = torch.zeros(batch, length, dtype=torch.long)
    tokens[:, 0] = cfg.text.vocab_size - 2  # SOT
    for row in range(batch):  # EOT at different places, so no position is constant-folded
        tokens[row, 1 + row % max(1, length - 2)] = cfg.text.vocab_size - 1
    return tokens


def dynamic_shapes(model: MSCLIP, kind: str) -> dict:
    batch = Dim("batch", min=1, max=1 << 16)
    if kind == "image":
        return {INPUT_NAMES["image"]: {0: batch}}
    return {INPUT_NAMES["text"]: {0: batch, 1: Dim("seq", min=1, max=model.cfg.text.context_length)}}


def export_encoder(model: MSCLIP, kind: str) -> ExportedProgram:
    """One encoder as an ExportedProgram (eval mode; dynamic batch, and dynamic length for text)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    module = encoder_modules(model)[kind]
    with torch.no_grad():
        return torch.export.export(module, (example_inputs(model, kind),), dynamic_shapes=dynamic_shapes(model, kind))


def export_encoders(model: MSCLIP) -> dict[str, ExportedProgram]:
    was_training = model.training
    model.eval()
    try:
        return {kind: export_encoder(model, kind) for kind in KINDS}
    finally:
        model.train(was_training)
