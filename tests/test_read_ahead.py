"""Reading ahead keeps the order and the errors of loading one item at a time."""

import threading

import pytest

from cenfusion.data.read_ahead import read_ahead
from cenfusion.errors import CenError


@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_every_item_in_order(ahead: int) -> None:
    assert list(read_ahead(range(10), lambda i: i * i, ahead)) == [i * i for i in range(10)]


def test_the_next_items_load_while_the_caller_holds_one() -> None:
    started = [threading.Event() for _ in range(4)]

    def load(i: int) -> int:
        started[i].set()
        return i

    loads = read_ahead(range(4), load, ahead=2)
    assert next(loads) == 0
    assert started[1].wait(10) and started[2].wait(10)
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
