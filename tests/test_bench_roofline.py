"""The roofline floor of ``cen bench``: operators counted, each bound by the peak or by memory."""

import pytest
import torch
import torch.nn.functional as F

from cenfusion.bench import cases, roofline
from cenfusion.bench.roofline import (
    OperatorCost,
    floor,
    floor_by_operator,
    memory_bandwidth,
    operator_costs,
)
from cenfusion.bench.timing import Timing
from cenfusion.info import count_flops

F32 = 4


def test_each_operator_reads_and_writes_its_tensors_once() -> None:
    with torch.device("meta"):
        x, w = torch.empty(2, 8, 16, 16), torch.empty(4, 8, 3, 3)
        plane = 2 * 4 * 16 * 16 * F32

        def step() -> None:
            y = F.conv2d(x, w, padding=1)
            y.relu_()
            z = y + torch.ones(4, 1, 1).expand(4, 16, 16)
            z.copy_(y)
            torch.cat([y, z]).view(-1)
            torch.add(y, y, out=z)

        costs = operator_costs(step)
    assert [(c.name, c.flops, c.bytes) for c in costs] == [
        ("convolution", 2 * (2 * 4 * 16 * 16) * (8 * 9), x.numel() * F32 + w.numel() * F32 + plane),
        ("relu_", 0, 2 * plane),  # in place: read, then written
        ("ones", 0, 4 * F32),
        ("add", 0, 2 * plane + 4 * F32),  # the broadcast operand is its 4 stored values
        ("copy_", 0, 2 * plane),  # the target is overwritten, not read
        ("cat", 0, 4 * plane),
        ("add", 0, 2 * plane),  # one read of y, the out= tensor written
    ]


def test_the_counted_flops_are_torchs_for_the_whole_network() -> None:
    with torch.device("meta"):
        model = cases.refinenet(50).eval()
        xs = [torch.empty(1, 3, 64, 96) for _ in range(2)]

        def step() -> None:
            with torch.no_grad():
                model(xs)

        costs = operator_costs(step)
    assert sum(c.flops for c in costs) == count_flops(model, 2, (64, 96))
    assert {"convolution", "addcmul", "where"} <= {c.name for c in costs}  # folded norms


def test_the_floor_takes_each_operator_at_its_slower_bound() -> None:
    costs = [
        OperatorCost("convolution", flops=4000, bytes=100),  # 4 ms of compute, 1 of memory
        OperatorCost("relu", flops=0, bytes=300),  # 3 ms of memory
        OperatorCost("add", flops=1000, bytes=200),  # 1 ms of compute, 2 of memory
    ]
    got = floor(costs, peak_flops=1e6, bandwidth=1e5)
    assert got.ms == pytest.approx(9.0) and got.memory_ms == pytest.approx(5.0)
    assert got.gigabytes == pytest.approx(600 / 1e9)


def test_bandwidth_is_the_fastest_copy_of_a_large_tensor(monkeypatch) -> None:
    copies: list[tuple[int, int]] = []

    def timed(step, device, warmup, runs):
        copies.append((warmup, runs))
        step()
        return Timing(mean_ms=4.0, std_ms=1.0, best_ms=2.0, runs=runs)

    monkeypatch.setattr(roofline, "time_steps", timed)
    assert memory_bandwidth(torch.device("cpu")) == pytest.approx(2 * 64 * 2**20 / 2e-3)
    assert copies == [(2, 10)]


def test_the_floor_by_operator_sums_each_operators_calls() -> None:
    costs = [
        OperatorCost("relu", flops=0, bytes=300),
        OperatorCost("convolution", flops=4000, bytes=100),
        OperatorCost("relu", flops=0, bytes=200),
        OperatorCost("add", flops=0, bytes=100),
    ]
    parts = floor_by_operator(costs, peak_flops=1e6, bandwidth=1e5, top=2)
    assert parts == [
        {"operator": "relu", "calls": 2, "gbytes": 5e-7, "floor_ms": 5.0, "memory_ms": 5.0},
        {"operator": "convolution", "calls": 1, "gbytes": 1e-7, "floor_ms": 4.0, "memory_ms": 0.0},
    ]
