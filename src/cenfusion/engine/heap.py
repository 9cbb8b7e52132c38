"""Freed CPU memory kept in the process, so that large tensors do not fault their pages afresh.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and hands it back to the kernel on ``free``. The next tensor of that size then faults
in every 4 KiB page again, zero-filled by the kernel, several times slower than reusing a
freed block. Stacking M modalities along the batch makes activations M times larger than
one modality's, so the stacked network crosses that line where a per-modality loop does not
(measured in ``benchmarks/RESULTS.md``).

:func:`kept_cpu_memory` turns glibc's ``mmap`` for large blocks off and never trims the heap,
so freed blocks serve the next tensors. The price: the process's resident memory stays at
its peak until the context ends. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
GLIBC_MMAP_MAX = 65536
GLIBC_TRIM_THRESHOLD = 128 * 1024
NEVER_TRIM = 2**31 - 1
_depth = 0  # open contexts: glibc's settings are the process's, the outermost one restores them


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``mallopt`` and ``malloc_trim``),
    else None."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):
        return None
    if not all(hasattr(libc, f) for f in ("mallopt", "malloc_trim", "gnu_get_libc_version")):
        return None
    return libc


@contextlib.contextmanager
def kept_cpu_memory(enabled: bool = True, device_type: str = "cpu") -> Iterator[bool]:
    """Keep freed memory in this process's heap while the context lasts, for a run whose
    tensors live on ``device_type``: only the CPU's (CUDA's caching allocator already reuses
    its memory, and a GPU run's host side allocates little).

    Yields whether the setting took effect (``False`` when disabled, off the CPU or without
    glibc). When the outermost such context ends, glibc's default limits come back (its
    self-adjusting mmap threshold stays off, as after any ``mallopt``) and the heap's free
    memory is handed back to the system.
    """
    global _depth
    libc = _glibc() if enabled and device_type == "cpu" else None
    if libc is None:
        yield False
        return
    applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    _depth += 1
    try:
        yield applied
    finally:
        _depth -= 1
        if _depth == 0:
            libc.mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)
            libc.malloc_trim(0)
