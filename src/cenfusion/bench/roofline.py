"""A step's floor, ``cen bench``'s measure of what bounds a step: the time it would take if
each of its operators ran at the device's matrix peak or moved its tensors at the
device's memory bandwidth, whichever bounds that operator (a roofline per operator), summed
over the operators, which eager execution runs one after another.

Operators are counted as the step dispatches them (:func:`operator_costs`), usually on the
meta device: shapes and dtypes without computing. Their FLOPs are torch's counter's; their
bytes are those of the tensors they read and write, each once. Views and allocations move
nothing. A kernel that passes over its input twice (a BatchNorm's statistics, then its
normalisation) is counted once, so the sum is a floor, not an estimate; a compiled step
fuses operators and can go below it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from cenfusion.bench.timing import time_steps

__all__ = [
    "Floor",
    "OperatorCost",
    "floor",
    "floor_by_operator",
    "memory_bandwidth",
    "operator_costs",
]

#: Operators that allocate without writing, or read no tensor data.
_NO_TRAFFIC = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "resize_",
    "set_",
    "_local_scalar_dense",
}
#: In-place operators that overwrite their first argument without reading it.
_OVERWRITE = {"copy_", "fill_", "zero_", "bernoulli_", "uniform_", "normal_", "random_"}


@dataclass(frozen=True)
class OperatorCost:
    """One dispatched operator: its name, FLOPs and the bytes it reads and writes."""

    name: str
    flops: int
    bytes: int


def _stored_bytes(tensor: Tensor) -> int:
    """Bytes of ``tensor``'s distinct elements (a broadcast dimension, stride 0, is one)."""
    sizes = [n for n, stride in zip(tensor.shape, tensor.stride()) if stride != 0]
    return math.prod(sizes) * tensor.element_size()


def _tensors(value: Any) -> list[Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, Tensor)]


def _traffic(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> int:
    """Bytes ``func`` reads and writes: every tensor argument read once (an ``out=`` argument
    and an overwritten one are not read), every written argument and new output written once."""
    name = func.overloadpacket.__name__
    if name in _NO_TRAFFIC:
        return 0
    positional = [a for a in func._schema.arguments if not a.kwarg_only]
    bound = list(zip(positional, args))
    bound += [(a, kwargs[a.name]) for a in func._schema.arguments if a.name in kwargs]
    reads: dict[int, Tensor] = {}
    writes: dict[int, Tensor] = {}
    for argument, value in bound:
        written = argument.alias_info is not None and argument.alias_info.is_write
        read = not written or not (argument.kwarg_only or name in _OVERWRITE)
        for tensor in _tensors(value):
            if written:
                writes[id(tensor)] = tensor
            if read:
                reads[id(tensor)] = tensor
    for tensor in _tensors(out):
        writes[id(tensor)] = tensor
    return sum(_stored_bytes(t) for t in (*reads.values(), *writes.values()))


class _Counting(TorchDispatchMode):
    """Records each operator below autocast and autograd, as the device would run it, with
    the FLOPs that ``counter`` (entered before this mode) adds for it."""

    def __init__(self, counter: FlopCounterMode) -> None:
        super().__init__()
        self.counter = counter
        self.costs: list[OperatorCost] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        if not func.is_view:
            flops = self.counter.get_total_flops() - before
            self.costs.append(
                OperatorCost(func.overloadpacket.__name__, flops, _traffic(func, args, kwargs, out))
            )
        return out


def operator_costs(step: Callable[[], object]) -> list[OperatorCost]:
    """Every operator one call of ``step`` dispatches, with its FLOPs and bytes."""
    with FlopCounterMode(display=False) as counter, _Counting(counter) as counting:
        step()
    return counting.costs


@dataclass(frozen=True)
class Floor:
    """The roofline floor of a step on a device (:func:`floor`)."""

    ms: float
    memory_ms: float
    """The part of :attr:`ms` in operators bound by memory rather than by the matrix peak."""
    gigabytes: float
    """What the operators read and write, in all."""


def floor(costs: Sequence[OperatorCost], peak_flops: float, bandwidth: float) -> Floor:
    """Each operator at the slower of ``peak_flops`` (FLOP/s) and ``bandwidth`` (bytes/s),
    summed over ``costs``."""
    total = memory = 0.0
    for cost in costs:
        compute, move = cost.flops / peak_flops, cost.bytes / bandwidth
        total += max(compute, move)
        memory += move if move > compute else 0.0
    return Floor(total * 1e3, memory * 1e3, sum(c.bytes for c in costs) / 1e9)


def floor_by_operator(
    costs: Sequence[OperatorCost], peak_flops: float, bandwidth: float, top: int = 12
) -> list[dict[str, Any]]:
    """The ``top`` operators by their part of the floor (:func:`floor` of each operator's
    calls): calls, gigabytes moved, milliseconds at the floor and how many of them are bound
    by memory. Set beside a profile's device time per operator, it says which kernels run
    far from what the hardware allows."""
    calls: dict[str, list[OperatorCost]] = {}
    for cost in costs:
        calls.setdefault(cost.name, []).append(cost)
    parts = []
    for name, group in calls.items():
        bound = floor(group, peak_flops, bandwidth)
        parts.append(
            {
                "operator": name,
                "calls": len(group),
                "gbytes": bound.gigabytes,
                "floor_ms": bound.ms,
                "memory_ms": bound.memory_ms,
            }
        )
    return sorted(parts, key=lambda part: -part["floor_ms"])[:top]


def memory_bandwidth(device: torch.device) -> float:
    """Bytes per second of copying a large tensor (each byte read once and written once), the
    fastest of ten copies: the rate a memory-bound operator could reach at best."""
    mib = 1024 if device.type == "cuda" else 64
    source = torch.ones(mib * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    timing = time_steps(lambda: target.copy_(source), device, warmup=2, runs=10)
    return 2 * source.numel() * source.element_size() / (timing.best_ms / 1e3)
