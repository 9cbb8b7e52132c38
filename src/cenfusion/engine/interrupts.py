"""Ctrl-C during a run: a ``KeyboardInterrupt`` that Python cannot drop.

A SIGINT that arrives while a data loader forks its workers makes Python's handler raise
inside the fork's callbacks, where the ``KeyboardInterrupt`` is printed as "ignored" and
dropped: the run would go on to its end. One that arrives while the loader builds its
iterator leaves a half-built one, whose clean-up prints errors of its own. While
:func:`catching_interrupts` holds, a SIGINT inside :func:`deferred` is kept and raised when
the deferred section ends; elsewhere it raises at once, as Python's own handler does.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from torch.utils.data import DataLoader

from cenfusion.engine.threads import say_too_many_workers

__all__ = ["DeferredForkLoader", "catching_interrupts", "deferred"]


class _State:
    depth = 0
    pending = False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if _State.depth:
        _State.pending = True
        return
    raise KeyboardInterrupt


@contextmanager
def catching_interrupts() -> Iterator[None]:
    """Handle SIGINT as described in the module's text, where Python's own handler is in
    place on the main thread (a caller's own handler is left alone)."""
    ours = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if not ours:
        yield
        return
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _State.pending = False


@contextmanager
def deferred() -> Iterator[None]:
    """Hold a SIGINT until the section ends, then raise it as a ``KeyboardInterrupt``."""
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
        if not _State.depth and _State.pending:
            _State.pending = False
            raise KeyboardInterrupt


class DeferredForkLoader(DataLoader):
    """A DataLoader that starts its workers (forks them) with Ctrl-C deferred.

    More workers than CPUs is said once a process, in one line of the run's log, instead of
    torch's five-line warning at every loader and epoch."""

    def __iter__(self) -> Iterator[Any]:
        with deferred():
            return super().__iter__()

    def check_worker_number_rationality(self) -> None:
        say_too_many_workers(self.num_workers)
