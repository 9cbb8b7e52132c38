"""The registry of tasks: the ``cen`` command adds each task's commands from here, and
``cen info`` and ``cen report`` find the task of a checkpoint or of a run folder here, so none
of them names a task in its code.

A task package holds a ``command`` module (:class:`TaskCommands`: light, no torch) and a
``task`` module with its :class:`~cenfusion.engine.task.Task` (imported when first needed).
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

import yaml

from cenfusion.engine.run import CONFIG
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


def task_of_run(run_dir: Path) -> Task | None:
    """The task whose settings a run folder's ``config.yaml`` holds (every key one of its
    config's fields, and no other task's the same); None when it cannot tell."""
    path = run_dir / CONFIG
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except yaml.YAMLError:
        return None
    if not isinstance(config, dict) or not config:
        return None
    fits = [t for t in all_tasks() if set(config) <= {f.name for f in fields(t.config)}]
    return fits[0] if len(fits) == 1 else None
