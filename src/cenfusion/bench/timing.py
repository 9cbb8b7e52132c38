"""How ``cen bench`` times a step: warm-up, then timed runs (CUDA events on a GPU, the wall
clock on the CPU), their mean and spread; the matrix peak its rates are set
against, measured in the same process; and a step's profile, which says what bounds it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType


@dataclass(frozen=True)
class Timing:
    """Milliseconds per step over ``runs`` timed steps: mean, standard deviation and the
    fastest."""

    mean_ms: float
    std_ms: float
    best_ms: float
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
    return Timing(statistics.fmean(times), spread, min(times), runs)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the faster of a large square matrix product and a 3x3 convolution (in
    NCHW and channels-last) in ``dtype`` on ``device``, each its fastest of ten runs: the
    rate a network's convolutions could reach at best, measured rather than taken from a
    sheet (on a shared machine a mean can fall far below it). The convolution is there
    because its library can outrun the product's: on an AMD CPU, MKL's float32 product
    reached half of oneDNN's convolution. On CUDA the float32 product uses TF32 exactly
    when cuDNN's convolutions do (torch's default: they do, matrix products do not), so
    that float32 rows are set against the rate their convolutions can reach."""
    cuda = device.type == "cuda"
    side = 8192 if cuda else 2048
    a = torch.randn(side, side, device=device).to(dtype)
    b = torch.randn(side, side, device=device).to(dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        product = time_steps(lambda: torch.mm(a, b), device, warmup=2, runs=10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    rates = [2 * side**3 / (product.best_ms / 1e3)]
    batch, channels, size = (8, 1024, 128) if cuda else (1, 256, 64)
    weight = torch.randn(channels, channels, 3, 3, device=device).to(dtype)
    x = torch.randn(batch, channels, size, size, device=device).to(dtype)
    flops = 2 * batch * channels**2 * 9 * size**2
    with torch.no_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            w, y = weight.to(memory_format=layout), x.to(memory_format=layout)
            conv = time_steps(partial(F.conv2d, y, w, padding=1), device, warmup=2, runs=10)
            rates.append(flops / (conv.best_ms / 1e3))
    return max(rates)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """Most memory the device's allocator held since :func:`reset_peak_memory` (CUDA); None
    on the CPU, where one process's high-water mark covers every row it ran."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


@dataclass(frozen=True)
class StepProfile:
    """One step under ``torch.profiler``."""

    kernels: int | None
    """Device kernels and copies the step ran (CUDA; None on the CPU). At small batches a
    GPU step is bound by the host's work per launch, so fewer launches is the lever."""
    device_busy_ms: float | None
    """Their summed duration: set against the step's time, the share of it the device
    computed rather than waited for the host."""
    table: str
    """The busiest operators by self time, on the device (CUDA) and on the host."""


def profile_step(step: Callable[[], object], device: torch.device) -> StepProfile:
    """Run ``step`` once more under ``torch.profiler`` (after its timed runs: warm)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = device.type == "cuda"
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as profiler:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    averages = profiler.key_averages()
    sorts = ["self_device_time_total"] * cuda + ["self_cpu_time_total"]
    table = "\n".join(
        averages.table(sort_by=key, row_limit=15, max_name_column_width=60) for key in sorts
    )
    if not cuda:
        return StepProfile(None, None, table)
    kernels, busy_us = device_work(profiler.events())
    return StepProfile(kernels, busy_us / 1e3, table)


def device_work(events: Iterable) -> tuple[int, float]:
    """How many of the profiler's ``events`` ran on a CUDA device, and their summed
    microseconds (one stream: they do not overlap)."""
    work = [e.time_range.elapsed_us() for e in events if e.device_type == DeviceType.CUDA]
    return len(work), float(sum(work))
