"""How ``cen bench`` times a step: warm-up, then timed runs (CUDA events on a GPU, the wall
clock on the CPU), their mean and spread; and the matrix-product peak its rates are set
against, measured in the same process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds per step over ``runs`` timed steps: mean and standard deviation."""

    mean_ms: float
    std_ms: float
    runs: int


def time_steps(step: Callable[[], object], device: torch.device, warmup: int, runs: int) -> Timing:
    """Run ``step`` ``warmup`` times untimed (compilation, cuDNN's kernel choice and the
    allocator settle there), then ``runs`` times, each timed on its own."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            step()
            times.append((time.perf_counter() - began) * 1e3)
    spread = statistics.stdev(times) if len(times) > 1 else 0.0
    return Timing(statistics.fmean(times), spread, runs)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix product in ``dtype`` on ``device``: the rate a
    network's convolutions could reach at best, measured rather than taken from a sheet."""
    side = 4096 if device.type == "cuda" else 2048
    a = torch.randn(side, side, device=device).to(dtype)
    b = torch.randn(side, side, device=device).to(dtype)
    timing = time_steps(lambda: torch.mm(a, b), device, warmup=2, runs=5)
    return 2 * side**3 / (timing.mean_ms / 1e3)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """Most memory the device's allocator held since :func:`reset_peak_memory` (CUDA); None
    on the CPU, where one process's high-water mark covers every row it ran."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
