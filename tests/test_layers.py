"""The package's imports point one way: core < models, data, metrics < engine < reporting <
tasks < commands, with no circle between modules (imports inside functions included)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cenfusion"

#: Layer of each top-level module or subpackage; a module may import its own layer or lower.
LAYERS = {
    "errors": 0,
    "arguments": 0,
    "checkpoint_format": 0,
    "fusion": 0,
    "models": 1,
    "data": 1,
    "metrics": 1,
    "engine": 2,
    "reporting": 3,
    "segmentation": 4,
    "translation": 4,
    "info": 5,
    "tasks": 5,
    "tool_commands": 6,
    "bench": 6,
    "cli": 6,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``cenfusion.*`` module ``path`` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("cenfusion."):
                found.add(node.module)
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    if _is_module(candidate):
                        found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cenfusion."))
    return found


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative).is_dir()


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[1]]


GRAPH = {
    _module_name(path): _imports(path)
    for path in sorted(PACKAGE.rglob("*.py"))
    if path != PACKAGE / "__init__.py"  # the lazy public facade sits above everything
}


def test_every_part_of_the_package_has_a_layer() -> None:
    tops = {name.split(".")[1] for name in GRAPH if name != "cenfusion"}
    assert tops <= set(LAYERS), sorted(tops - set(LAYERS))


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_runs_up_a_layer(module: str) -> None:
    upward = sorted(i for i in GRAPH[module] if _layer(i) > _layer(module))
    assert not upward, f"{module} imports a higher layer: {upward}"


def test_no_import_circle() -> None:
    # A package's __init__ is reached by importing any module under it, so only modules count.
    edges = {m: {i for i in deps if i in GRAPH and i != m} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                circle = stack[stack.index(target) :] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


#: Most lines a module may have: a task's training recipe keeps only its loss, step and
#: validation; the command line only parses and calls.
MAX_LINES = {"segmentation/train.py": 199, "translation/train.py": 199, "cli.py": 249}


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_every_module_reads_in_one_sitting(path: Path) -> None:
    limit = MAX_LINES.get(path.relative_to(PACKAGE).as_posix(), 500)
    lines = len(path.read_text().splitlines())
    assert lines <= limit, f"{path.relative_to(PACKAGE)}: {lines} lines, at most {limit}"
