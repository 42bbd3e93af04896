"""How the step's math runs: precision modes (fp32, bf16 autocast, fp16 autocast with a gradient scaler;
``auto`` picks bf16 where fast) and the speed settings next to them, each in this one place: the CUDA
backend flags (TF32, cuDNN autotuning), ``train.compile`` (`CompiledForward`, `CompiledStep`) and
``train.channels_last``."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from torch import nn

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


# --- speed settings ---------------------------------------------------------------------------------------

def configure_backends(device: torch.device, *, tf32: bool = True, deterministic: bool = False) -> dict[str, bool]:
    """Set the CUDA speed flags (process-wide; nothing on CPU) and return what was set.

    TF32 runs fp32 matmuls and convolutions on the tensor cores with a 10-bit mantissa (bf16 and fp16
    autocast are unaffected); cuDNN autotuning picks the fastest convolution algorithm per input shape
    (the shapes repeat every step), but is non-deterministic, so ``train.deterministic`` turns it off.
    """
    if device.type != "cuda":
        return {}
    flags = {"matmul_tf32": tf32, "cudnn_tf32": tf32, "cudnn_benchmark": not deterministic}
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn_tf32"]
    torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]
    return flags


def _dynamic_tokens(module: nn.Module, tokens: torch.Tensor | None, trim: bool) -> torch.Tensor | None:
    """Tokens ready for a compiled graph: trimmed eagerly (a data-dependent length never enters the
    graph), contiguous (a trimmed batch is a view with the full context's row stride unless it kept every
    column, and that stride difference alone would compile a second graph), length marked dynamic."""
    if tokens is None:
        return None
    if trim:
        tokens = module.trim_tokens(tokens)
    tokens = tokens.contiguous()
    torch._dynamo.maybe_mark_dynamic(tokens, 1)
    return tokens


class CompiledForward(nn.Module):
    """The training forward of ``module`` compiled with torch.compile (``train.compile: model``).

    Only what the train loop runs goes through it: the checkpoints, the export and the in-training
    zero-shot use ``module`` itself, so state_dict keys stay the model's (no ``_orig_mod.`` prefix) and
    evaluation does not recompile. The text length changes from step to step (each batch is cut to its
    longest caption by `MSCLIP.trim_tokens`), so it is marked dynamic: one graph serves every
    length. Expected compilations: one, plus one for the no-grad feature pass of ``train.accum_freq > 1``.
    """

    def __init__(self, module: nn.Module, backend: Any = "inductor") -> None:
        super().__init__()
        self.module = module
        self._forward = torch.compile(module.forward, backend=backend)  # a function: no second module

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                trim: bool = True) -> Any:
        return self._forward(images, _dynamic_tokens(self.module, tokens, trim), trim=False)


class CompiledStep(CompiledForward):
    """``train.compile: step``: the model forward and the contrastive loss compiled as one function, so
    they form one graph and AOT autograd derives one backward graph for both (`forward_loss`; the loop's
    single micro-batch path). Called like a module it is `CompiledForward` (its own, lazily compiled
    graph): ``train.accum_freq > 1`` needs the features apart for its cached no-grad pass and splice,
    and runs the loss eagerly there. Expected compilations: one per path used (the step; with
    accumulation the grad and no-grad forwards), each serving every text length.
    """

    def __init__(self, module: nn.Module, backend: Any = "inductor") -> None:
        super().__init__(module, backend)
        self._step = torch.compile(self._forward_loss, backend=backend)

    def _forward_loss(self, images: torch.Tensor, tokens: torch.Tensor, loss_fn: nn.Module) -> torch.Tensor:
        out = self.module.forward(images, tokens, trim=False)
        return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])

    def forward_loss(self, images: torch.Tensor, tokens: torch.Tensor, loss_fn: nn.Module,
                     trim: bool = False) -> torch.Tensor:
        """The loss of one batch, forward and ``loss_fn`` in one compiled graph."""
        return self._step(images, _dynamic_tokens(self.module, tokens, trim), loss_fn)


def compile_for_training(model: nn.Module, mode: str, backend: str, distributed: bool) -> nn.Module:
    """What the train loop's forward runs through for ``train.compile`` (``model`` itself for ``off``).

    Under DDP ``step`` falls back to ``model``: DDP must wrap the module whose forward runs (its gradient
    hooks start there), which `CompiledStep.forward_loss` would bypass; the loss with its gather / ring
    exchange then runs eagerly after the compiled forward."""
    if mode == "step" and distributed:
        log.info("train.compile=step under DDP: compiling the forward only (the loss runs eagerly)")
        mode = "model"
    return {"model": CompiledForward, "step": CompiledStep}[mode](model, backend) if mode != "off" else model


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def set_channels_last(model: nn.Module) -> list[str]:
    """Conv stem and parallel conv branch (``train.channels_last``) in NHWC: their weights, and their
    image input through a forward pre-hook. Returns the names of the modules changed."""
    image = getattr(model, "image", None)
    parts = {"image.stem": getattr(image, "stem", None), "image.parallel": getattr(image, "parallel", None)}
    done = []
    for name, part in parts.items():
        if part is None:
            continue
        part.to(memory_format=torch.channels_last)
        first = part if name == "image.stem" else part.stages[0]  # where the image enters
        first.register_forward_pre_hook(_to_channels_last)
        done.append(name)
    return done
