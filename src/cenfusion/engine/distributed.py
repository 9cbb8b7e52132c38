"""Device choice and torchrun-style DDP, shared by every task.

Launch on several GPUs with ``torchrun --nproc-per-node N -m cenfusion.cli seg train ...``:
the rank variables come from the environment; NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cenfusion.errors import CenError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(
    device: str = "auto", gpu: tuple[int, ...] | int | None = (), local_rank: int = 0
) -> torch.device:
    """``"auto"`` picks CUDA when present; ``gpu`` (the released ``--gpu`` flag) picks its index.

    Under torchrun the local rank chooses among the listed GPUs (or all visible ones). Asking
    for a GPU that is not there is an error, never a silent fall-back to the CPU.
    """
    if device not in {"auto", "cpu", "cuda"}:
        raise CenError(f"--device {device}: expected auto, cpu or cuda")
    gpus = (gpu,) if isinstance(gpu, int) else tuple(gpu or ())
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if len(gpus) > 1 and not distributed:
        raise CenError(
            f"--gpu {' '.join(map(str, gpus))}: one process per GPU, start it with "
            f"torchrun --nproc-per-node {len(gpus)} -m cenfusion.cli ..."
        )
    if device == "cpu":
        if gpus:
            raise CenError(f"--gpu {gpus[0]} with --device cpu: choose one")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if device == "cuda" or gpus:
            flag = f"--gpu {gpus[0]}" if gpus else "--device cuda"
            raise CenError(f"{flag}: no CUDA device is visible (use --device cpu)")
        return torch.device("cpu")
    index = gpus[local_rank % len(gpus)] if gpus else local_rank
    if index >= torch.cuda.device_count():
        raise CenError(f"--gpu {index}: only {torch.cuda.device_count()} CUDA device(s) visible")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(cuda: bool = True) -> DistInfo:
    """Join the process group described by torchrun's variables (no-op when absent).

    NCCL when ``cuda`` and a GPU is visible, else gloo (CPU processes).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if not dist.is_initialized():
        backend = "nccl" if cuda and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return info


def on_main(action: Callable[[], T]) -> T:
    """Run ``action`` on rank 0 alone while the other processes wait; all get its result.

    The result travels pickled, so it should be plain data. A :class:`CenError` raised by
    ``action`` is raised on every process, so that none is left waiting at a later collective.
    Outside distributed runs this is ``action()``.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return action()
    outcome: list[Any] = [None]
    failure: CenError | None = None
    if dist.get_rank() == 0:
        try:
            outcome[0] = (action(), None)
        except CenError as err:
            failure, outcome[0] = err, (None, str(err))
    dist.broadcast_object_list(outcome, src=0)
    value, message = outcome[0]
    if failure is not None:
        raise failure
    if message is not None:
        raise CenError(message)
    return value
