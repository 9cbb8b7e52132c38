"""Reports drawn beside training: in another process, newest request first, failures warned."""

import logging
import os
import time
from functools import partial
from pathlib import Path

from cenfusion.engine.background import BackgroundCalls


def note_when_allowed(gate: Path, notes: Path, arg: Path) -> None:
    """Wait until ``gate`` exists, then append ``arg`` and this process's id to ``notes``."""
    deadline = time.monotonic() + 60
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    with notes.open("a") as f:
        f.write(f"{arg} {os.getpid()}\n")


def fail(arg: Path) -> None:
    raise ValueError(f"no plots for {arg}")


def notes_of(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


def test_a_call_runs_in_another_process_while_the_caller_goes_on(tmp_path: Path) -> None:
    gate, notes = tmp_path / "gate", tmp_path / "notes"
    calls = BackgroundCalls(partial(note_when_allowed, gate, notes), "noting")
    assert not calls.inline
    calls.request(Path("first"))
    assert not notes.exists()
    gate.touch()
    calls.finish()
    ((arg, pid),) = notes_of(notes)
    assert arg == "first" and int(pid) != os.getpid()


def test_a_newer_request_replaces_a_waiting_one(tmp_path: Path) -> None:
    gate, notes = tmp_path / "gate", tmp_path / "notes"
    calls = BackgroundCalls(partial(note_when_allowed, gate, notes), "noting")
    for name in ("a", "b", "c"):
        calls.request(Path(name))
    gate.touch()
    calls.finish()
    assert [arg for arg, _ in notes_of(notes)] == ["a", "c"]


def test_a_failed_call_is_one_warning_with_its_error(tmp_path: Path, caplog) -> None:
    calls = BackgroundCalls(fail, "drawing the run's reports")
    with caplog.at_level(logging.WARNING, logger="cenfusion"):
        calls.request(tmp_path)
        calls.finish()
    assert caplog.messages == [
        f"warning: drawing the run's reports failed: ValueError: no plots for {tmp_path}"
    ]


def test_a_function_that_cannot_be_sent_is_called_here_at_once(tmp_path: Path) -> None:
    seen: list[Path] = []
    calls = BackgroundCalls(lambda arg: seen.append(arg), "noting")
    assert calls.inline
    calls.request(tmp_path)
    assert seen == [tmp_path]


def test_a_run_that_stops_early_stops_the_call(tmp_path: Path) -> None:
    gate, notes = tmp_path / "gate", tmp_path / "notes"
    calls = BackgroundCalls(partial(note_when_allowed, gate, notes), "noting")
    calls.request(Path("a"))
    calls.request(Path("b"))
    child = calls._running[0]
    calls.stop()
    assert child.poll() is not None
    gate.touch()
    calls.finish()
    assert not notes.exists()


def test_a_kept_request_is_made_by_the_next_one_not_again_at_the_end(tmp_path: Path) -> None:
    gate, notes = tmp_path / "gate", tmp_path / "notes"
    calls = BackgroundCalls(partial(note_when_allowed, gate, notes), "noting")
    calls.request(Path("a"))
    calls.request(Path("b"))
    gate.touch()
    calls._running[0].wait()
    calls.request(Path("c"))
    calls.finish()
    assert [arg for arg, _ in notes_of(notes)] == ["a", "c"]
