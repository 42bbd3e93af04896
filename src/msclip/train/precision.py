"""Precision modes: fp32, bf16 autocast, fp16 autocast with a gradient scaler (``auto`` picks bf16 where fast)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import ContextManager

import torch

log = logging.getLogger(__name__)


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels (AVX512-BF16 / AMX); otherwise bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if name == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
        log.warning("bf16 requested but this CPU has no native bf16 kernels; using fp32")
        return "fp32"
    if name == "fp16" and device.type == "cpu":
        log.warning("fp16 on CPU has no fast kernels (orders of magnitude slower than bf16)")
    return name


@dataclass
class Precision:
    name: str  # fp32 | bf16 | fp16 (resolved)
    device: torch.device

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling against underflow; bf16 has fp32's range and does not."""
        if self.name != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)


def get_precision(name: str, device: torch.device) -> Precision:
    return Precision(resolve_precision(name, device), device)
