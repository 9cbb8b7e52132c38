"""Reading ahead: the next items decoded in a background thread while the caller computes on
the current one, so that a device does not wait for the disk and the image decoder."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

__all__ = ["read_ahead"]

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")


def read_ahead(
    items: Iterable[Item], load: Callable[[Item], Loaded], ahead: int
) -> Iterator[Loaded]:
    """``load(item)`` for each of ``items``, in order, with up to ``ahead`` items loaded
    before the caller asks for them, in one background thread (decoders release the GIL).
    An error of ``load`` is raised when its item's turn comes, as it would be without
    reading ahead; ``ahead < 1`` loads each item when asked."""
    if ahead < 1:
        yield from map(load, items)
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cen-read-ahead")
    pending: deque[Future[Loaded]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(load, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
