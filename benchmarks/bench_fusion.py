"""Speed and memory of the fusion core and of a CEN RefineNet training step.

    python benchmarks/bench_fusion.py [--device cuda] [--depth 101] [--size 480 640] [--batch 6]

Prints, for the private norm with exchange, the stacked implementation against a plain
per-modality loop (M BatchNorms, a Python loop over modalities), then the time and peak
memory of one training step (forward, backward, SGD) of the full model. Not run by CI.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from cenfusion import create_cen_refinenet
from cenfusion.fusion import ModalityBatchNorm2d


class LoopNorm(nn.Module):
    """What CEN implementations usually do: a list of tensors, one BN each, masked copies."""

    def __init__(self, channels: int, num_modalities: int, threshold: float) -> None:
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(num_modalities))
        self.threshold = threshold

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        ys = [bn(x) for bn, x in zip(self.bns, xs)]
        outs = []
        for m, (bn, y) in enumerate(zip(self.bns, ys)):
            others = sum(ys[n] for n in range(len(ys)) if n != m) / (len(ys) - 1)
            mask = (bn.weight.abs() < self.threshold)[None, :, None, None]
            outs.append(torch.where(mask, others, y))
        return outs


def timed(fn, device: torch.device, repeats: int) -> float:
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def bench_norm(device: torch.device, m: int, b: int, c: int, hw: int, repeats: int) -> None:
    stacked = ModalityBatchNorm2d(c, m, exchange=True).to(device).train()
    loop = LoopNorm(c, m, stacked.threshold).to(device).train()
    with torch.no_grad():
        stacked.weight[:, : c // 4] = 0.0
        for bn in loop.bns:
            bn.weight[: c // 4] = 0.0
    x = torch.randn(m * b, c, hw, hw, device=device, requires_grad=True)
    xs = [t.detach().requires_grad_(True) for t in x.chunk(m)]

    def run_stacked() -> None:
        stacked(x).sum().backward()

    def run_loop() -> None:
        sum(o.sum() for o in loop(xs)).backward()

    t_stacked = timed(run_stacked, device, repeats)
    t_loop = timed(run_loop, device, repeats)
    print(
        f"norm+exchange M={m} B={b} C={c} {hw}x{hw}: stacked {t_stacked * 1e3:.2f} ms, "
        f"per-modality loop {t_loop * 1e3:.2f} ms (fwd+bwd)"
    )


def bench_model(device: torch.device, depth: int, size: tuple[int, int], batch: int, amp: bool) -> None:
    model = create_cen_refinenet(depth=depth, num_classes=40).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    inputs = [torch.randn(batch, 3, *size, device=device) for _ in range(2)]
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else torch.autocast(device.type, enabled=False)

    def step() -> None:
        with ctx:
            loss = sum(o.float().mean() for o in model(inputs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = timed(step, device, 3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(
        f"train step R{depth} batch {batch} {size[0]}x{size[1]} amp={amp}: {t:.3f} s "
        f"({batch / t:.1f} img/s), peak {peak:.2f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--depth", type=int, default=101)
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640))
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    for m in (2, 3):
        bench_norm(device, m, 4, 256, 64, repeats=10)
    if not args.skip_model:
        bench_model(device, args.depth, tuple(args.size), args.batch, args.amp)


if __name__ == "__main__":
    main()
