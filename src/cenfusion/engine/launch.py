"""One process per listed GPU: ``cen seg train --gpu 0 1`` starts itself once per GPU.

This is what ``torchrun --nproc-per-node N -m cenfusion.cli ...`` does, kept behind the
released ``--gpu`` flag. Each child runs the same ``cen`` arguments with the variables torchrun
sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``); its local rank picks its GPU from the ``--gpu`` list
(:func:`~cenfusion.engine.distributed.resolve_device`). Only the standard library is imported
here, so that ``cen --help`` stays quick.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from cenfusion.errors import CenError

#: The ``(command, sub-command)`` pairs that train in several processes.
DISTRIBUTED_COMMANDS = frozenset({("seg", "train"), ("i2i", "train")})

_STOP_GRACE_S = 10.0


def free_port() -> int:
    """A TCP port of this machine that was free a moment ago (for the rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cen_command(argv: Sequence[str]) -> list[str]:
    """The command line that runs ``cen *argv`` with this Python."""
    return [sys.executable, "-m", "cenfusion.cli", *argv]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment of process ``rank`` of a one-machine group, as torchrun sets it."""
    return {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _exit_code(returncode: int) -> int:
    """A process's exit status as a shell reports it (``128 + N`` for signal ``N``)."""
    return 128 - returncode if returncode < 0 else returncode


def _stop(processes: list[subprocess.Popen]) -> None:
    """Terminate the processes still running; kill those that outlive the grace period."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + _STOP_GRACE_S
    for process in running:
        try:
            process.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def launch(command: Sequence[str], world_size: int, poll_s: float = 0.2) -> int:
    """Run ``command`` in ``world_size`` local processes of one process group; wait for all.

    When one fails the others are stopped, as torchrun does: they would otherwise wait for
    it at their next collective. Returns 0, or the exit code of the first process found
    failed (lowest rank first); a ``KeyboardInterrupt`` stops every process and propagates.
    """
    port = free_port()
    processes = [
        subprocess.Popen(list(command), env=rank_env(rank, world_size, port))
        for rank in range(world_size)
    ]
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                return _exit_code(failed[0])
            if all(code == 0 for code in codes):
                return 0
            time.sleep(poll_s)
    finally:
        _stop(processes)


def run_per_gpu(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int | None:
    """Start one process per GPU when a training command lists several (``--gpu 0 1``).

    Returns None when the command should simply run in this process: one GPU or none, a
    command that does not train, or a process already started by a launcher (``WORLD_SIZE``
    set). Otherwise returns :func:`launch`'s exit code. ``argv`` defaults to ``sys.argv[1:]``.
    """
    gpus = tuple(getattr(args, "gpu", None) or ())
    name = getattr(args, "command", None)
    command = (name, getattr(args, f"{name}_command", None))
    if len(gpus) < 2 or command not in DISTRIBUTED_COMMANDS or "WORLD_SIZE" in os.environ:
        return None
    import torch

    listed = " ".join(map(str, gpus))
    if getattr(args, "device", None) == "cpu":
        raise CenError(f"--gpu {listed} with --device cpu: choose one")
    if not torch.cuda.is_available():
        raise CenError(f"--gpu {listed}: no CUDA device is visible (use --device cpu)")
    if len(set(gpus)) != len(gpus):
        raise CenError(f"--gpu {listed}: each GPU once (one process per GPU)")
    if max(gpus) >= torch.cuda.device_count():
        raise CenError(f"--gpu {listed}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return launch(cen_command(sys.argv[1:] if argv is None else argv), len(gpus))
