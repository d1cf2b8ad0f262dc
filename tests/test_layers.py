"""The layers stay honest: the core imports no integration, integrations use only the
core's public modules. Every import counts, lazy ones inside functions too."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Shells: they may import integrations lazily (the demo, the command line), and the shim
# that lets a checkout see integrations/ as resilience.integrations.
SHELLS = {"resilience/__main__.py", "resilience/_demo.py", "resilience/integrations/__init__.py"}


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module or module.name) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_the_core_imports_no_integration() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in python_files("resilience")
        if str(path.relative_to(ROOT)) not in SHELLS
        for line, name in imports(path)
        if name.startswith("resilience.integrations")
    ]
    assert found == []


def test_integrations_import_no_private_module_or_name_of_the_core() -> None:
    found = []
    for path in python_files("integrations"):
        for line, name in imports(path):
            parts = name.split(".")
            if parts[0] != "resilience" or parts[1:2] == ["integrations"]:
                continue
            if any(part.startswith("_") and part != "__future__" for part in parts[1:]):
                found.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert found == []
