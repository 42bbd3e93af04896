"""Shared timing helpers for the benchmarks."""
from __future__ import annotations

import os
import time
from typing import Callable

import torch


def device_from_env() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and os.environ.get("MSCLIP_BENCH_CPU") != "1" else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], device: torch.device, reps: int = 2, warmup: int = 1) -> float:
    """Best wall time of `reps` calls after `warmup` calls (best-of is robust to noisy neighbours)."""
    for _ in range(warmup):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def print_table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}")
    print(f"{'workload':<44}{'msclip':>12}{'reference':>12}{'ratio':>8}")
    for name, ours, ref in rows:
        ratio = f"{ours / ref:.2f}x" if ref else "-"
        ref_s = f"{ref:.1f}" if ref else "-"
        print(f"{name:<44}{ours:>12.1f}{ref_s:>12}{ratio:>8}")


def gemm_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, reps: int = 5) -> float:
    """The machine's measured GEMM rate: the best over a few square sizes (best of `reps` each, the current
    thread count), the ceiling that model GFLOP/s are compared against (a datasheet peak is rarely
    reachable on a CPU, and which size runs fastest differs between CPUs and precisions)."""
    best = 0.0
    for n in ((512, 1024, 2048) if device.type == "cpu" else (4096, 8192)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        best = max(best, 2 * n ** 3 / best_time(lambda: a @ b, device, reps=reps) / 1e9)
    return best


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (``torch.utils.flop_counter``: matmuls, convolutions and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def print_efficiency(title: str, rows: list[tuple[str, float, float, float]]) -> None:
    """rows: (workload, FLOPs per item, items/s, measured GEMM GFLOP/s of its precision)."""
    print(f"\n{title}")
    print(f"{'workload':<44}{'GFLOP/item':>12}{'GFLOP/s':>10}{'of GEMM':>9}")
    for name, flops, rate, peak in rows:
        achieved = flops * rate / 1e9
        print(f"{name:<44}{flops / 1e9:>12.2f}{achieved:>10.1f}{100 * achieved / peak:>8.0f}%")
