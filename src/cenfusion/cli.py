"""The ``cen`` command: parses flags, builds typed configs, calls task functions."""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

from cenfusion.bench.command import add_bench_parser
from cenfusion.engine.config import (
    CommandParser,
    add_config_flags,
    given_flags,
    options_from_args,
    setting,
)
from cenfusion.engine.run import LogRouting, RunConfig
from cenfusion.errors import MAX_LINE, CenError, describe_os_error, shorten
from cenfusion.tasks import COMMANDS
from cenfusion.tool_commands import add_tool_parsers

#: Frames of an internal error's traceback that ``cen`` prints.
INTERNAL_FRAMES = 4


_WORDS = tuple(COMMANDS)


@dataclass(frozen=True)
class DemoOptions:
    task: str = setting(
        _WORDS[0],
        "; ".join(f"{word}: {commands.DEMO_HELP}" for word, commands in COMMANDS.items()),
        choices=_WORDS,
    )
    seed: int | None = setting(None, "random seed (default: seg 0, i2i 1)")
    epochs: tuple[int, ...] | None = setting(
        None,
        "a longer or shorter schedule, per stage ("
        + ", ".join(f"{w} {' '.join(map(str, c.DEMO_SCHEDULE))}" for w, c in COMMANDS.items())
        + ")",
    )


def _demo(args: argparse.Namespace) -> None:
    o = options_from_args(DemoOptions, args)
    COMMANDS[o.task].demo(given_flags(RunConfig, args), o.epochs)


def _version() -> str:
    """The installed package's version (``unknown`` when run from a source tree)."""
    try:
        return metadata.version("cenfusion")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="cen", description="CEN multimodal fusion")
    parser.add_argument("--version", action="version", version=f"cenfusion {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train on the embedded data, to see the method work")
    add_config_flags(demo, DemoOptions)
    add_config_flags(demo, RunConfig, only=("runs", "device"))
    demo.set_defaults(run=_demo)

    data = sub.add_parser("data", help="prepare data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    for commands in COMMANDS.values():
        commands.add_parsers(sub)
        commands.add_data_parsers(data_sub)
    add_tool_parsers(sub)
    add_bench_parser(sub)
    return parser


def _one_line(err: CenError) -> str:
    """The error's own line, at most :data:`MAX_LINE` characters with the prefix; a
    DataLoader worker wraps it in a traceback, whose last line it is."""
    last = str(err).strip().splitlines()[-1]
    text = last.removeprefix(f"{CenError.__module__}.{CenError.__name__}: ")
    return shorten(text, MAX_LINE - len("cen: error: "))


#: What may fit in memory, by command (the others read what they are given).
_SMALLER = {
    "seg": "smaller --batch-size, --crop-size, --size or --scales, or --amp, may fit",
    "i2i": "smaller --batch-size or --crop-size, or --amp, may fit",
    "bench": "smaller --size, --train-size, --batch or --train-batch may fit",
}


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says the memory could not hold what was asked (torch's own errors
    only once torch is in: the command line starts without it)."""
    if isinstance(err, MemoryError):
        return True
    if "torch" not in sys.modules:
        return False
    from cenfusion.engine.runtime import out_of_memory

    return out_of_memory(err)


def _memory_line(err: BaseException, command: str | None) -> str:
    """One line for a size the memory cannot hold: a setting's to change, not a bug. A
    loader worker's error carries the worker's message on its last line."""
    lines = str(err).strip().splitlines()
    said = next((x for x in reversed(lines) if "memory" in x or "overflow" in x), None)
    said = said or (lines[0] if lines else type(err).__name__)
    said = re.sub(r"^(\w+Error: )?\[enforce fail at [^\]]*\] [^.]*\. ", "", said)
    advice = _SMALLER.get(command or "")
    line = f"out of memory ({said})" + (f"; {advice}" if advice else "")
    return shorten(line, MAX_LINE - len("cen: error: "))


def _report_internal_error(err: BaseException) -> None:
    """A short traceback (the innermost frames) and where to report it."""
    frames = traceback.extract_tb(err.__traceback__)[-INTERNAL_FRAMES:]
    print("Traceback (innermost frames):", file=sys.stderr)
    print("".join(traceback.format_list(frames)).rstrip(), file=sys.stderr)
    url = _issues_url()
    where = f"at {url}" if url else "to the cenfusion maintainers"
    print(
        f"cen: internal error: {type(err).__name__}: {shorten(str(err), 100)}; please "
        f"report it {where} with the command line and this output",
        file=sys.stderr,
    )


def _issues_url() -> str | None:
    """The issue tracker named in the installed package's metadata (``Project-URL``)."""
    try:
        urls = metadata.metadata("cenfusion").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return None
    labelled = dict(u.split(", ", 1) for u in urls if ", " in u)
    return labelled.get("Issues") or labelled.get("Bug Tracker")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cen`` command; returns its exit status: 0, 2 for bad input or an
    operating-system error such as a full disk (one line on stderr), 130 when interrupted,
    1 for an internal error (a short traceback)."""
    args = build_parser().parse_args(argv)
    try:
        with LogRouting():
            from cenfusion.engine.launch import run_per_gpu

            if (code := run_per_gpu(args, argv)) is not None:
                return code
            args.run(args)
    except CenError as err:
        print(f"cen: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader of the output (``| head``) has gone: nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:
        print(f"cen: error: {shorten(describe_os_error(err), MAX_LINE - 12)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cen: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 (every unexpected error ends here)
        if _out_of_memory(err):
            print(f"cen: error: {_memory_line(err, args.command)}", file=sys.stderr)
            return 2
        _report_internal_error(err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
