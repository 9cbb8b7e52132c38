"""How a model runs: precision (autocast and gradient scaling), an optional compiled form,
and the inference set-up every command outside training shares (:func:`inference_runtime`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cenfusion.engine.distributed import resolve_device
from cenfusion.engine.heap import kept_cpu_memory
from cenfusion.engine.run import log

__all__ = [
    "CompiledOrEager",
    "InferenceRuntime",
    "Precision",
    "cpu_has_bfloat16",
    "inference_runtime",
]


def cpu_has_bfloat16() -> bool:
    """Whether oneDNN computes bfloat16 on this CPU (AVX-512 or newer); elsewhere bfloat16
    convolutions take a slow reference path."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Precision:
    """Autocast and gradient scaling: bfloat16 on the CPU, float16 with a GradScaler on CUDA.

    One scaler serves every optimiser of a step (``step`` each, then one ``update``). On a
    CPU without bfloat16 support the run computes in float32, and says so.
    """

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.device = device
        cuda = device.type == "cuda"
        if enabled and not cuda and not cpu_has_bfloat16():
            log.info("warning: --amp: this CPU has no bfloat16 support; computing in float32")
            enabled = False
        self.dtype = (torch.float16 if cuda else torch.bfloat16) if enabled else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled and cuda)

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


class CompiledOrEager(nn.Module):
    """``torch.compile(net)``, falling back to ``net`` itself (with one warning) when
    compilation fails, which shows only at a call. When ``net`` fails eagerly too, the fault
    is the network's or its input's: that error is raised, as without ``--compile``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.compiled: Any = torch.compile(net)

    def forward(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.net(*args)
        try:
            return self.compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure means eager
            out = self.net(*args)
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
            log.info(f"warning: --compile failed ({type(err).__name__}: {first}); running eager")
            self.compiled = None
            return out


@dataclass(frozen=True)
class InferenceRuntime:
    """Where and how a model runs for evaluation or prediction."""

    device: torch.device
    precision: Precision
    channels_last: bool = False
    compile: bool = False

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` on the device in eval mode (channels-last when asked; its weights stay
        ``model``'s), and the module to call: compiled when asked, else ``model``."""
        model.to(self.device).eval()
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return CompiledOrEager(model) if self.compile else model


@contextlib.contextmanager
def inference_runtime(
    device: str = "auto",
    gpu: Sequence[int] = (),
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    keep_memory: bool = True,
) -> Iterator[InferenceRuntime]:
    """The device (``auto``, ``cpu``, ``cuda``; ``gpu`` the first index), the precision and
    the layout a command runs its model with; on the CPU, freed memory stays in the process
    while the context is open (:func:`~cenfusion.engine.heap.kept_cpu_memory`)."""
    target = resolve_device(device, gpu)
    with kept_cpu_memory(keep_memory, target.type):
        yield InferenceRuntime(target, Precision(amp, target), channels_last, compile)
