"""The floor plan: core (steper_dspy/) <- programs/ <- compilers/ <- evals/ <- the CLI (steper_dspy/cli/).

A folder imports only its own floor and the floors below it. The package's public face
(`steper_dspy/__init__.py`) names higher floors lazily, by string, and is not an import.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {"core": 0, "programs": 1, "compilers": 2, "evals": 3, "cli": 4}


def _floor_of_file(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    if parts[0] == "steper_dspy":
        return "cli" if parts[1] == "cli" else "core"
    return parts[0]


def _floor_of_module(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "steper_dspy":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in FLOORS else "core"


def test_no_folder_imports_a_higher_one():
    upward = []
    for folder in ("steper_dspy", "programs", "compilers", "evals"):
        for path in (ROOT / folder).rglob("*.py"):
            floor = _floor_of_file(path)
            for node in ast.walk(ast.parse(path.read_text())):
                modules = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                modules += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                for module in modules:
                    target = _floor_of_module(module)
                    if target is not None and FLOORS[target] > FLOORS[floor]:
                        upward.append(f"{path.relative_to(ROOT)}:{node.lineno} ({floor}) imports {module} ({target})")
    assert upward == []
