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
