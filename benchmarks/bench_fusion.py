"""Speed and memory of the fusion core and of a CEN RefineNet training step.

    python benchmarks/bench_fusion.py [--device cuda] [--amp] [--channels-last]
        [--modalities 2 3 4] [--batch 4] [--channels 256] [--hw 64] [--repeats 10]
        [--skip-model] [--depth 101] [--size 480 640] [--model-batch 6]

For the private BatchNorm with exchange (a quarter of the channels exchanging in every
modality) it times the stacked implementation against a per-modality loop (a Python list of
tensors, one ``nn.BatchNorm2d`` each, masked exchange) in three settings: ``train`` (batch
statistics, forward and backward of a random output gradient), ``frozen`` (running statistics, forward and backward, the
setting for pretrained encoders) and ``eval`` (no grad). Both sides are checked to compute
the same output before timing; each time is the median of ``--repeats`` alternating runs.
Then the time and peak memory of one training step of the full model. Not run by CI.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from cenfusion import create_cen_refinenet
from cenfusion.engine.heap import kept_cpu_memory
from cenfusion.fusion import ModalityBatchNorm2d, split_modalities


class LoopNorm(nn.Module):
    """What CEN implementations usually do: a list of tensors, one BN each, masked exchange."""

    def __init__(self, norm: ModalityBatchNorm2d) -> None:
        super().__init__()
        m, c = norm.num_modalities, norm.num_features
        self.bns = nn.ModuleList(nn.BatchNorm2d(c, eps=norm.eps) for _ in range(m))
        with torch.no_grad():
            for i, bn in enumerate(self.bns):
                bn.weight.copy_(norm.weight[i])
                bn.bias.copy_(norm.bias[i])
                bn.running_mean.copy_(norm.running_mean[i])
                bn.running_var.copy_(norm.running_var[i])
        self.threshold = norm.threshold

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        ys = [bn(x) for bn, x in zip(self.bns, xs)]
        outs = []
        for m, (bn, y) in enumerate(zip(self.bns, ys)):
            if len(ys) == 2:
                others = ys[1 - m]
            else:
                others = sum(ys[n] for n in range(len(ys)) if n != m) / (len(ys) - 1)
            mask = (bn.weight.abs() < self.threshold)[None, :, None, None]
            outs.append(torch.where(mask, others, y))
        return outs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_pair(
    first: Callable[[], object],
    second: Callable[[], object],
    device: torch.device,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[float, float]:
    """Median seconds of ``first`` and ``second``, run alternately after two warm-up calls."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(2):
        first()
        second()
    for _ in range(repeats):
        for fn, bucket in zip((first, second), times):
            synchronize(device)
            start = clock()
            fn()
            synchronize(device)
            bucket.append(clock() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def bench_norm(args: argparse.Namespace, device: torch.device, m: int, setting: str) -> None:
    """Time one setting (``train``, ``frozen`` or ``eval``) of the private norm with exchange."""
    c = args.channels
    stacked = ModalityBatchNorm2d(c, m, exchange=True).to(device)
    with torch.no_grad():
        stacked.weight.uniform_(0.5, 1.5)
        stacked.weight[:, : c // 4] = 0.0
        stacked.bias.normal_(0, 0.1)
        stacked.running_mean.normal_(0, 0.1)
        stacked.running_var.uniform_(0.5, 2.0)
    loop = LoopNorm(stacked).to(device)
    stacked.train(setting != "eval")
    loop.train(setting == "train")
    stacked.frozen_stats = setting == "frozen"
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    dtype = torch.bfloat16 if args.amp else torch.float32
    x = torch.randn(m * args.batch, c, args.hw, args.hw, device=device)
    x = x.to(dtype=dtype, memory_format=fmt)
    x.requires_grad_(setting != "eval")
    xs = [t.detach().requires_grad_(setting != "eval") for t in split_modalities(x, m)]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    with torch.no_grad(), amp:
        expected = torch.cat(loop(xs))
        got = stacked(x)
    tol = 3e-2 if args.amp else 1e-4
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)

    if setting == "eval":

        def run_stacked() -> None:
            with torch.no_grad(), amp:
                stacked(x)

        def run_loop() -> None:
            with torch.no_grad(), amp:
                loop(xs)

    else:
        grad = torch.randn_like(got)
        grads = list(split_modalities(grad, m))

        def run_stacked() -> None:
            with amp:
                out = stacked(x)
            out.backward(grad)

        def run_loop() -> None:
            with amp:
                outs = loop(xs)
            torch.autograd.backward(outs, grads)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    t_stacked, t_loop = timed_pair(run_stacked, run_loop, device, args.repeats, clock)
    print(
        f"| {m} | {setting} | {t_stacked * 1e3:8.2f} | {t_loop * 1e3:8.2f} "
        f"| {t_loop / t_stacked:5.2f} |"
    )


def bench_model(
    device: torch.device, depth: int, size: tuple[int, int], batch: int, amp: bool, repeats: int
) -> None:
    """Time one training step (forward, backward, SGD) of CEN RefineNet on two modalities."""
    model = create_cen_refinenet(depth=depth, num_classes=40).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    inputs = torch.randn(2 * batch, 3, *size, device=device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def step() -> None:
        with ctx:
            loss = sum(o.float().mean() for o in model(inputs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t, _ = timed_pair(step, lambda: None, device, repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(
        f"train step R{depth} batch {batch} {size[0]}x{size[1]} amp={amp}: {t:.3f} s "
        f"({batch / t:.1f} img/s), peak {peak:.2f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--amp",
        action="store_true",
        help="bf16 autocast; the norms get bf16 inputs, as from a conv",
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--modalities", type=int, nargs="+", default=(2, 3, 4))
    parser.add_argument("--settings", nargs="+", default=("train", "frozen", "eval"))
    parser.add_argument("--batch", type=int, default=4, help="per modality, fusion part")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--hw", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: process CPU time, steadier on a shared machine (meaningful with one thread)",
    )
    parser.add_argument(
        "--keep-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on the CPU, keep freed memory in the process, as cenfusion's runs do "
        "(cenfusion.engine.heap); --no-keep-memory: glibc's defaults",
    )
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--depth", type=int, default=101)
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640))
    parser.add_argument("--model-batch", type=int, default=6)
    args = parser.parse_args()
    device = torch.device(args.device)
    with kept_cpu_memory(args.keep_memory, device.type) as kept:
        print(
            f"private norm + exchange, B={args.batch} per modality, C={args.channels}, "
            f"{args.hw}x{args.hw}, {device.type}, threads={torch.get_num_threads()}, "
            f"amp={args.amp}, channels_last={args.channels_last}, {args.clock} clock, "
            f"median of {args.repeats}, freed memory kept={kept}"
        )
        print("| M | setting | stacked ms | loop ms | loop/stacked |")
        print("|---|---|---:|---:|---:|")
        for m in args.modalities:
            for setting in args.settings:
                bench_norm(args, device, m, setting)
        if not args.skip_model:
            bench_model(device, args.depth, tuple(args.size), args.model_batch, args.amp, repeats=3)


if __name__ == "__main__":
    main()
