"""Ctrl-C during a run is never dropped: held while loader workers start, raised after."""

import os
import signal

import pytest
from torch.utils.data import Sampler

from cenfusion.engine.interrupts import DeferredForkLoader, catching_interrupts, deferred


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
