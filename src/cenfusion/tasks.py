"""The registry of tasks: the ``cen`` command adds each task's commands from here, and
``cen info`` finds the task of a checkpoint here, so neither names a task in its code.

A task package holds a ``command`` module (:class:`TaskCommands`: light, no torch) and a
``task`` module with its :class:`~cenfusion.engine.task.Task` (imported when first needed).
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol

from cenfusion.engine.task import Task
from cenfusion.errors import CenError
from cenfusion.segmentation import command as segmentation_command
from cenfusion.translation import command as translation_command


class TaskCommands(Protocol):
    """What a task's command module offers the ``cen`` command."""

    #: One line on what the task does, for ``cen demo --task``'s help.
    DEMO_HELP: str

    def add_parsers(self, subparsers: argparse._SubParsersAction) -> None:
        """Add ``cen WORD ...`` (the task's own commands) to ``cen``'s subparsers."""

    def add_data_parsers(self, subparsers: argparse._SubParsersAction) -> None:
        """Add the task's data sets to ``cen data``'s subparsers."""

    def demo(self, flags: dict[str, Any], epochs: list[int] | None) -> None:
        """Run the task's demo with run flags ``flags`` and, if given, another schedule."""


#: Each task's commands, by the word that names the task on the command line.
COMMANDS: dict[str, TaskCommands] = {"seg": segmentation_command, "i2i": translation_command}


def all_tasks() -> tuple[Task, ...]:
    from cenfusion.segmentation.task import SEGMENTATION
    from cenfusion.translation.task import TRANSLATION

    return (SEGMENTATION, TRANSLATION)


def task_named(name: Any, where: str) -> Task:
    """The task whose checkpoints carry ``name``; ``where`` (a file) names the error."""
    tasks = {task.name: task for task in all_tasks()}
    if name not in tasks:
        raise CenError(f"{where}: a {name} checkpoint; expected {' or '.join(tasks)}")
    return tasks[name]
