"""Freed CPU memory kept in the process: glibc's own accounting says where a large block came from.

Each scenario runs in a fresh interpreter: what the heap holds depends on everything the
process allocated before, so in the test process itself a large block may come from memory
that earlier tests freed.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from cenfusion.engine.heap import _glibc

LIBC = _glibc()
pytestmark = pytest.mark.skipif(
    LIBC is None or not hasattr(LIBC, "mallinfo2"), reason="needs glibc >= 2.33"
)

PROBE = """
import ctypes, json, resource
import torch
from cenfusion.engine.heap import _glibc, kept_cpu_memory

BIG = 48 * 2**20  # above glibc's largest mmap threshold (32 MiB)
LIBC = _glibc()


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


LIBC.mallinfo2.restype = MallInfo2


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def mapped() -> bool:
    '''Whether a written tensor of BIG bytes gets an mmap of its own (glibc's default).'''
    before = LIBC.mallinfo2().hblkhd
    t = torch.ones(BIG, dtype=torch.uint8)
    result = LIBC.mallinfo2().hblkhd - before >= BIG
    del t
    return result


seen = {}
"""


def probe(scenario: str) -> dict:
    """Run ``scenario`` after :data:`PROBE` in a fresh interpreter; returns its ``seen``."""
    code = PROBE + textwrap.dedent(scenario) + "\nprint(json.dumps(seen))\n"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_large_blocks_come_from_the_heap_and_stay_there_while_kept() -> None:
    seen = probe(
        """
        seen["before"] = mapped()
        with kept_cpu_memory() as applied:
            seen["applied"] = applied
            seen["kept"] = mapped()
            seen["free_in_heap"] = LIBC.mallinfo2().fordblks >= BIG
            resident_kept = resident()
            seen["kept_again"] = mapped()
        seen["handed_back"] = resident() <= resident_kept - 0.9 * BIG
        seen["after"] = mapped()
        """
    )
    assert seen == {
        "before": True,
        "applied": True,
        "kept": False,
        "free_in_heap": True,
        "kept_again": False,
        "handed_back": True,
        "after": True,
    }


def test_nested_contexts_keep_memory_until_the_outermost_ends() -> None:
    seen = probe(
        """
        with kept_cpu_memory():
            with kept_cpu_memory():
                seen["inner"] = mapped()
            seen["outer"] = mapped()
        seen["after"] = mapped()
        """
    )
    assert seen == {"inner": False, "outer": False, "after": True}


def test_disabled_or_off_the_cpu_changes_nothing() -> None:
    seen = probe(
        """
        with kept_cpu_memory(enabled=False) as applied:
            seen["disabled"] = applied, mapped()
        with kept_cpu_memory(device_type="cuda") as applied:
            seen["cuda"] = applied, mapped()
        """
    )
    assert seen == {"disabled": [False, True], "cuda": [False, True]}


@pytest.mark.parametrize("keep", [True, False])
def test_runs_on_the_cpu_keep_memory_unless_told_not_to(tmp_path, keep: bool) -> None:
    seen = probe(
        f"""
        from dataclasses import replace
        from cenfusion.engine.trainer import prepare
        from cenfusion.segmentation.config import SYNTHETIC

        cfg = replace(SYNTHETIC, device="cpu", runs={str(tmp_path)!r}, keep_memory={keep})
        with prepare(cfg) as ctx:
            seen["device"] = ctx.device.type
            seen["mapped"] = mapped()
        seen["after"] = mapped()
        """
    )
    assert seen == {"device": "cpu", "mapped": not keep, "after": True}
