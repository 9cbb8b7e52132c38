"""Ctrl-C during a run is never dropped: held while loader workers start, raised after."""

import logging
import os
import signal
import warnings

import pytest
from torch.utils.data import Sampler

from cenfusion.engine.interrupts import DeferredForkLoader, catching_interrupts, deferred
from cenfusion.engine.threads import available_cpus


class InterruptingSampler(Sampler):
    """Sends this process a SIGINT while the loader builds its iterator (and forks)."""

    def __init__(self) -> None:
        pass

    def __len__(self) -> int:
        return 4

    def __iter__(self):
        os.kill(os.getpid(), signal.SIGINT)
        return iter(range(4))


def raised_in(err: BaseException) -> str:
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_name


def test_a_sigint_in_a_deferred_section_is_raised_when_it_ends() -> None:
    reached = False
    with catching_interrupts(), pytest.raises(KeyboardInterrupt) as excinfo, deferred():
        os.kill(os.getpid(), signal.SIGINT)
        reached = True
    assert reached and raised_in(excinfo.value) == "deferred"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_loader_starts_its_workers_whole_before_ctrl_c_stops_it() -> None:
    loader = DeferredForkLoader(list(range(4)), sampler=InterruptingSampler(), num_workers=2)
    with catching_interrupts(), pytest.raises(KeyboardInterrupt) as excinfo:
        iter(loader)
    assert raised_in(excinfo.value) == "deferred"


def test_a_callers_own_handler_is_left_alone() -> None:
    calls = []
    previous = signal.signal(signal.SIGINT, lambda *args: calls.append(args[0]))
    try:
        with catching_interrupts(), deferred():
            os.kill(os.getpid(), signal.SIGINT)
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_more_workers_than_cpus_is_one_line_of_ours(caplog) -> None:
    """torch's warning at every loader and epoch becomes one line of the run's log."""
    cpus = available_cpus()
    workers = cpus + 3  # a count no other test uses: the line is said once a process
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        for _ in range(2):
            loader = DeferredForkLoader(range(4), num_workers=workers)
            assert sorted(x for batch in loader for x in batch.tolist()) == [0, 1, 2, 3]
    assert not [w for w in caught if "worker" in str(w.message)]
    said = [r.getMessage() for r in caplog.records if "--workers" in r.getMessage()]
    assert said == [
        (
            f"warning: --workers {workers} on {cpus} CPUs: loading takes CPU time from the "
            f"model's threads; --workers {cpus} or fewer may be faster"
        )
    ]
