"""CPU threads that behave on a shared machine.

Three rules, because a busy machine otherwise slows a CPU training down many times over:

- **Passive waiting.** torch's OpenMP threads spin on a core while they wait for the next
  parallel region. When another process wants that core, the spinning thread takes turns
  with it and every parallel region waits for the slowest thread, so a busy neighbour
  slows every step many times over. ``OMP_WAIT_POLICY=PASSIVE`` makes them sleep instead.
  OpenMP reads it once, when torch loads it, so :func:`passive_wait_policy` runs when
  ``cenfusion`` is imported, before torch is (the ``cen`` command always is in time; a
  program that imports torch first keeps its own policy). A value the user set is kept. The cost on an
  idle machine: waking a sleeping thread takes microseconds, paid per parallel region.
- **As many threads as CPUs this process may use** (its affinity, e.g. under ``taskset``
  or a container's CPU set, not the machine's count), or ``--threads N``.
- **One thread per data-loading worker** (:func:`worker_init`): the workers decode and
  augment while the main process computes, they must not compete with its threads.
"""

from __future__ import annotations

import logging
import os
from functools import cache

WAIT_POLICY = "OMP_WAIT_POLICY"


def passive_wait_policy() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already says otherwise."""
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when the user set it to a positive number, else the CPUs this
    process may use."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    return int(given) if given.isdigit() and int(given) > 0 else available_cpus()


def use_threads(threads: int | None) -> int:
    """Make torch compute on ``threads`` threads (``None``: :func:`default_threads`);
    returns the count it had before, to restore."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    return before


def say_too_many_workers(workers: int) -> None:
    """One warning line, once a process, when ``workers`` loading processes outnumber the
    CPUs this process may use: they take CPU time from the model's threads."""
    _say_once(workers, available_cpus())


@cache
def _say_once(workers: int, cpus: int) -> None:
    if workers > cpus:
        logging.getLogger("cenfusion").warning(
            f"warning: --workers {workers} on {cpus} CPUs: loading takes CPU time from the "
            f"model's threads; --workers {cpus} or fewer may be faster"
        )


def worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader: one compute thread per worker process.

    torch's worker loop (2.x) does the same before calling it; stating the rule here keeps
    it true whatever the loop does."""
    import torch

    torch.set_num_threads(1)
