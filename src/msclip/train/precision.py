"""Precision modes: fp32, bf16 autocast, fp16 autocast with a gradient scaler (``auto`` picks bf16 where fast)."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import ContextManager

import torch

log = logging.getLogger(__name__)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 math (AVX512-BF16 or AMX). oneDNN also "supports" bf16 on plain
    AVX-512 by converting, but there it is slower than fp32 (measured), so that does not count."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if name not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"train.precision={name!r}: use auto, fp32, bf16 or fp16")
    if name == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
        log.warning("bf16 requested but this CPU has no native bf16 math (AVX512-BF16/AMX); it will be slow")
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
