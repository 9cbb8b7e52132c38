"""How a model runs: precision (autocast and gradient scaling), an optional compiled form,
and the one set-up of device, processes, threads and memory every command opens
(:func:`open_runtime`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cenfusion.engine.distributed import DistInfo, init_distributed, resolve_device
from cenfusion.engine.heap import kept_cpu_memory
from cenfusion.engine.run import RuntimeConfig, log
from cenfusion.engine.threads import use_threads
from cenfusion.errors import CenError

__all__ = [
    "CompiledOrEager",
    "GraphSkips",
    "Precision",
    "Runtime",
    "cpu_has_bfloat16",
    "open_runtime",
]


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says a device ran out of memory: ``torch.OutOfMemoryError`` on CUDA,
    a plain ``RuntimeError`` from the CPU allocator (or of a size past what it can count),
    Python's ``MemoryError``."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "allocate memory" in text or "Storage size calculation overflowed" in text
    )


def cpu_has_bfloat16() -> bool:
    """Whether oneDNN computes bfloat16 on this CPU (AVX-512 or newer); elsewhere bfloat16
    convolutions take a slow reference path."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Precision:
    """Autocast and gradient scaling: bfloat16 on the CPU, float16 with a GradScaler on CUDA
    (or ``dtype``: float16 always with the scaler).

    One scaler serves every optimiser of a step (``step`` each, then one ``update``). On a
    CPU without bfloat16 support the run computes in float32, and says so.
    """

    def __init__(
        self, enabled: bool, device: torch.device, dtype: torch.dtype | None = None
    ) -> None:
        self.device = device
        cuda = device.type == "cuda"
        dtype = dtype or (torch.float16 if cuda else torch.bfloat16)
        if enabled and dtype == torch.bfloat16 and not cuda and not cpu_has_bfloat16():
            log.info("warning: --amp: this CPU has no bfloat16 support; computing in float32")
            enabled = False
        self.dtype = dtype if enabled else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward_step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Zero the gradients, back-propagate ``loss`` (scaled) and step ``optimizer``."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)

    def update(self) -> None:
        """End of a training step: adapt the loss scale."""
        self.scaler.update()


def _amp_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``--amp-dtype NAME`` asks for on ``device`` (None: ``auto``, the
    device's default), or :class:`CenError` where the device cannot compute in it."""
    if name == "auto":
        return None
    cuda = device.type == "cuda"
    if name == "float16" and not cuda:
        raise CenError(
            f"--amp-dtype float16: CUDA only; on {device.type} the half precision is bfloat16"
        )
    if name == "bfloat16" and cuda and not torch.cuda.is_bf16_supported(including_emulation=False):
        gpu = torch.cuda.get_device_name(device)
        raise CenError(f"--amp-dtype bfloat16: {gpu} has no bfloat16 units; use float16")
    return getattr(torch, name)


def _dynamo_count(group: str, name: str) -> int:
    """One of the process's compile counters: ``stats/unique_graphs`` (graphs compiled),
    ``inductor/cudagraph_skips``. Imported when asked: importing dynamo costs start-up time."""
    from torch._dynamo.utils import counters

    return int(counters[group][name])


class GraphSkips:
    """Says once when inductor runs a compiled graph without the CUDA graphs that
    ``--compile-mode reduce-overhead`` asks for (a mutated input, a CPU tensor, a dynamic
    shape...). The graph still runs, compiled; inductor counts the skip but names its reason
    only in a log artifact that is off by default, so without this the loss is silent."""

    LOGGER = "torch._inductor.cudagraph_utils.__cudagraphs"

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.seen = _dynamo_count("inductor", "cudagraph_skips")
        self.done = False
        self._handler = _Collect(self.reasons)
        logging.getLogger(self.LOGGER).addHandler(self._handler)

    def check(self) -> None:
        """After a compiled call: warn if any graph compiled so far skipped capture."""
        if self.done or _dynamo_count("inductor", "cudagraph_skips") == self.seen:
            return
        reason = self.reasons[0] if self.reasons else "inductor gave no reason"
        log.info(
            f"warning: --compile-mode reduce-overhead: a compiled graph runs without CUDA "
            f"graphs ({reason}); it runs compiled, launching its kernels one by one"
        )
        self.close()

    def close(self) -> None:
        logging.getLogger(self.LOGGER).removeHandler(self._handler)
        self.done = True


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage().strip().splitlines()[0][:160])


def _shapes(args: tuple) -> str:
    leaves = torch.utils._pytree.tree_leaves(args)
    return ", ".join("x".join(map(str, t.shape)) for t in leaves if isinstance(t, Tensor))


class CompiledOrEager(nn.Module):
    """``torch.compile(net, mode=mode)``, falling back to ``net`` itself (with one warning)
    when compilation fails, which shows only at a call. When ``net`` fails eagerly too, the
    fault is the network's or its input's: that error is raised, as without ``--compile``.

    Each call that compiles says so, with its seconds and input shapes: the warm-up, then
    each recompilation for new shapes, which dynamo bounds (``recompile_limit`` versions of a
    graph; inputs beyond them run eager). ``skips``: checked after each call, where CUDA
    graphs were asked for (a graph of a backward pass is compiled at its first backward, and
    shows at the next call). ``frozen``: inductor treats ``net``'s weights as constants
    (:meth:`Runtime.prepare`)."""

    def __init__(
        self,
        net: nn.Module,
        mode: str = "default",
        skips: GraphSkips | None = None,
        frozen: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        if frozen:
            from torch._inductor import list_mode_options

            options = {**list_mode_options(mode), "freezing": True}
            self.compiled: Any = torch.compile(net, options=options)
        else:
            self.compiled = torch.compile(net, mode=None if mode == "default" else mode)
        self.skips = skips
        self.compilations = 0

    def forward(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.net(*args)
        graphs, start = _dynamo_count("stats", "unique_graphs"), time.perf_counter()
        try:
            out = self.compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure means eager
            out = self.net(*args)
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
            log.info(f"warning: --compile failed ({type(err).__name__}: {first}); running eager")
            self.compiled = None
            return out
        if _dynamo_count("stats", "unique_graphs") > graphs:
            self._compiled_for(args, time.perf_counter() - start)
        if self.skips is not None:
            self.skips.check()
        return out

    def _compiled_for(self, args: tuple, seconds: float) -> None:
        self.compilations += 1
        if self.compilations == 1:
            log.info(f"--compile: compiled in {seconds:.1f} s for inputs {_shapes(args)}")
            return
        limit = torch._dynamo.config.recompile_limit
        log.info(
            f"--compile: compiled again in {seconds:.1f} s for new inputs {_shapes(args)} "
            f"(version {self.compilations}; after {limit}, new inputs run eager)"
        )


@dataclass
class Runtime:
    """Where and how a command runs its models (see :func:`open_runtime`)."""

    device: torch.device
    dist: DistInfo
    precision: Precision
    channels_last: bool
    compile: bool
    compile_mode: str
    graph_skips: GraphSkips | None

    def describe(self) -> str:
        """How models run, in a few words, e.g. ``cpu, bfloat16 autocast, channels-last``."""
        dtype = self.precision.dtype
        precision = "float32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"
        words = [str(self.device), precision]
        words += ["channels-last"] * self.channels_last + ["compiled"] * self.compile
        return ", ".join(words)

    def prepare(self, model: nn.Module, training: bool = False, frozen: bool = False) -> nn.Module:
        """``model`` on the device (channels-last when asked; its weights stay ``model``'s),
        and the module to call: compiled when asked. ``training``: the network of a run's
        steps, whose fixed shapes let cuDNN choose its kernels once, wrapped for DDP in a
        process group. ``frozen``: its weights do not change while it is called (a loaded
        checkpoint's evaluation or prediction), so that the compiler may fold them into its
        code (inductor's freezing; autocast's casts of the weights then happen once)."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        net = model
        if training and self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if training and self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if not self.compile:
            return net
        return CompiledOrEager(net, self.compile_mode, self.graph_skips, frozen)


def _load_compiler_toolchain_quietly() -> None:
    """Import what inductor builds its CPU code with, whose search for a CUDA toolkit warns
    "No CUDA runtime is found" on a machine that has one but no GPU: no news on the CPU."""
    probe = logging.getLogger("torch.utils.cpp_extension")
    level = probe.level
    probe.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        probe.setLevel(level)


@contextlib.contextmanager
def open_runtime(settings: RuntimeConfig, distributed: bool = False) -> Iterator[Runtime]:
    """Open ``settings`` for a command: with ``distributed``, join torchrun's process group
    (when launched by it); choose the device (``auto``, ``cpu``, ``cuda``; the first of
    ``gpu``, or the local rank's), the CPU threads (restored on exit), the precision; on the
    CPU, freed memory stays in the process while it is open
    (:func:`~cenfusion.engine.heap.kept_cpu_memory`). CUDA graphs (``reduce-overhead``) are
    watched for skipped captures (:class:`GraphSkips`); off CUDA the mode is the default.
    The process-wide settings it changes (threads, cuDNN's kernel search) are restored."""
    RuntimeConfig.validate(settings)
    dist = init_distributed(cuda=settings.device != "cpu") if distributed else DistInfo()
    device = resolve_device(settings.device, settings.gpu, dist.local_rank)
    dtype = _amp_dtype(settings.amp_dtype, device) if settings.amp else None
    threads_before = use_threads(settings.threads)
    benchmark_before = torch.backends.cudnn.benchmark
    mode = settings.compile_mode
    if settings.compile and mode == "reduce-overhead" and device.type != "cuda":
        log.info(
            f"warning: --compile-mode reduce-overhead: CUDA graphs need a CUDA device, "
            f"not {device.type}; compiling in the default mode"
        )
        mode = "default"
    skips = GraphSkips() if settings.compile and mode == "reduce-overhead" else None
    if settings.compile and device.type == "cpu":
        _load_compiler_toolchain_quietly()
    try:
        with kept_cpu_memory(settings.keep_memory, device.type):
            precision = Precision(settings.amp, device, dtype)
            yield Runtime(
                device, dist, precision, settings.channels_last, settings.compile, mode, skips
            )
    finally:
        torch.set_num_threads(threads_before)
        torch.backends.cudnn.benchmark = benchmark_before
        if skips is not None:
            skips.close()
