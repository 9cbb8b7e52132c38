"""Every ``cen`` command shown in the README and in ``docs/`` parses, with flags that exist."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from cenfusion.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _commands() -> list[str]:
    """``cen ...`` lines of the shell blocks of the README and the docs (continuations
    joined), and their inline ``cen ...`` code spans."""
    text = "\n".join(page.read_text() for page in PAGES)
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    blocks += re.findall(r"(?<!`)`(cen [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        line = line.split("#")[0].strip()
        if "cen " in line and not line.startswith("make"):
            commands.append(line[line.index("cen ") :])
    return commands


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The parser of the deepest sub-command named at the start of ``words``."""
    for word in words:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        parser = actions[0].choices[word]
    return parser


def test_the_readme_shows_commands() -> None:
    assert len(_commands()) >= 10


@pytest.mark.parametrize("command", _commands())
def test_readme_command_flags_exist(command: str) -> None:
    words = shlex.split(command)[1:]
    parser = _subparser(build_parser(), words)
    known = {s for a in parser._actions for s in a.option_strings}
    flags = [w.split("=")[0] for w in words if w.startswith("-") and not _is_number(w)]
    unknown = [f for f in flags if f not in known]
    assert not unknown, f"{command}: {unknown} not among the flags of `{parser.prog}`"


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True
