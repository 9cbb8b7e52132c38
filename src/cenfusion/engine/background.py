"""Work a run does beside training, in a fresh interpreter: its reports after a validation.

Drawing a run's plots takes seconds of the host's time after every validation; done on the
training process it leaves the device idle meanwhile (and, under DDP, every other process
waiting at the next collective). :class:`BackgroundCalls` runs ``fn(arg)`` in a child
``python`` instead, one call at a time. A request made while a call runs waits for it, and a
newer request replaces a waiting one: the call reads the run's files when it starts, so the
newest request covers the older ones. A failed call is one warning in the run's log; training
goes on. The child is out of the terminal's reach (its own session: a Ctrl-C would print
its traceback); a run that stops early stops it (:meth:`BackgroundCalls.stop`).

A fresh interpreter, not a ``multiprocessing`` child: the spawn and forkserver methods import
the caller's main script again (a user's script without a ``__main__`` guard would train
again), and a fork of a process holding CUDA or torch's thread pools is not safe.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from cenfusion.engine.run import log

__all__ = ["BackgroundCalls"]

_CHILD = (
    "import os, pickle, sys\n"
    "getattr(os, 'nice', lambda n: 0)(10)\n"
    "fn, arg = pickle.load(sys.stdin.buffer)\n"
    "fn(arg)\n"
)
"""The child's program: lower its priority below training's, then make the call."""


class BackgroundCalls:
    """``fn(arg)`` in a child interpreter, one call at a time; see the module's text.

    ``fn`` must be picklable by reference (a module-level function, or a ``partial`` of one);
    one that is not (a lambda, a local function) is called on this process instead, at once.
    ``what`` names the work in the warning a failed call gives.
    """

    def __init__(self, fn: Callable[[Path], object], what: str) -> None:
        self.fn = fn
        self.what = what
        try:
            pickle.dumps(fn)
            self.inline = False
        except (pickle.PicklingError, AttributeError, TypeError):
            self.inline = True
        self._running: tuple[subprocess.Popen, IO[bytes]] | None = None
        self._waiting: Path | None = None

    def request(self, arg: Path) -> None:
        """Call ``fn(arg)`` now if no call runs; else keep it, in place of any kept before, to
        make at the next request or at :meth:`finish`."""
        if self.inline:
            self.fn(arg)
            return
        if self._running is not None and self._running[0].poll() is None:
            self._waiting = arg
            return
        self._reap()
        self._waiting = None
        self._start(arg)

    def finish(self) -> None:
        """Wait for the running call and make the waiting one, if any."""
        if self._running is not None:
            self._running[0].wait()
            self._reap()
        if self._waiting is not None:
            arg, self._waiting = self._waiting, None
            self._start(arg)
            self._running[0].wait()  # type: ignore[index]
            self._reap()

    def stop(self) -> None:
        """End the running call and forget the waiting one (the run stopped early: its
        folder may be moved or replaced next); nothing after :meth:`finish`."""
        self._waiting = None
        if self._running is not None:
            child, errors = self._running
            self._running = None
            child.terminate()
            child.wait()
            errors.close()

    def _start(self, arg: Path) -> None:
        errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed once the call has ended)
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,
            # the child imports what ``fn`` refers to from where this process found it
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path))},
        )
        with child.stdin:  # type: ignore[union-attr]
            pickle.dump((self.fn, arg), child.stdin)  # type: ignore[arg-type]
        self._running = (child, errors)

    def _reap(self) -> None:
        """Warn of the ended call's failure, with the last line it wrote (its error)."""
        if self._running is None:
            return
        child, errors = self._running
        self._running = None
        with errors:
            if child.returncode == 0:
                return
            errors.seek(0)
            lines = errors.read().decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else f"exit status {child.returncode}"
        log.warning(f"warning: {self.what} failed: {why}")
