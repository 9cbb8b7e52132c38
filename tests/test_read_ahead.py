"""Reading ahead keeps the order and the errors of loading one item at a time."""

import threading

import pytest

from cenfusion.data.read_ahead import read_ahead
from cenfusion.errors import CenError


@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_every_item_in_order(ahead: int) -> None:
    assert list(read_ahead(range(10), lambda i: i * i, ahead)) == [i * i for i in range(10)]


def test_the_next_item_loads_in_the_background_while_the_caller_holds_one() -> None:
    """Item 1 can finish only once the caller holds item 0: a loader that read ahead in the
    caller's thread would wait for it there, and fail."""
    holding, started = threading.Event(), threading.Event()

    def load(i: int) -> int:
        if i == 1:
            started.set()
            if not holding.wait(10):
                raise TimeoutError("item 1 was loaded before item 0 was handed over")
        return i

    loads = read_ahead(range(4), load, ahead=2)
    assert next(loads) == 0
    assert started.wait(10)
    holding.set()
    assert list(loads) == [1, 2, 3]


def test_an_error_comes_at_its_items_turn() -> None:
    def load(i: int) -> int:
        if i == 2:
            raise CenError("sample 2: not an image")
        return i

    loads = read_ahead(range(6), load, ahead=3)
    assert [next(loads), next(loads)] == [0, 1]
    with pytest.raises(CenError, match="sample 2: not an image"):
        next(loads)
