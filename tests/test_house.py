"""The package's floors: each folder imports only the ones below it, and no module takes
part in an import circle (imports inside functions and TYPE_CHECKING blocks count too)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "watcher"

# What each folder may import, besides itself. Siblings on one floor (bucket and engines,
# intake and pipeline) do not import each other.
MAY_IMPORT = {
    "core": set(),
    "bucket": {"core"},
    "engines": {"core"},
    "intake": {"core", "bucket"},
    "pipeline": {"core", "bucket", "engines"},
    "service": {"core", "bucket", "engines", "intake", "pipeline"},
    "cli": {"core", "bucket", "engines", "intake", "pipeline", "service"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every watcher module `path` imports, resolved to the module (not the name in it)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("watcher"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("watcher"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                module = candidate if (ROOT.parent / (candidate.replace(".", "/") + ".py")).exists() \
                    or (ROOT.parent / candidate.replace(".", "/")).is_dir() else node.module
                found.add(module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in ROOT.rglob("*.py")}


def folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in MAY_IMPORT) else None


def test_every_folder_is_on_a_floor() -> None:
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(MAY_IMPORT)
    for name in folders:
        doc = ast.get_docstring(ast.parse((ROOT / name / "__init__.py").read_text()))
        assert doc and len(doc) > 60, f"watcher/{name}/ says in a paragraph what it is for"


def test_imports_point_down() -> None:
    upward = []
    for module, targets in graph().items():
        here = folder(module)
        if here is None:
            continue
        for target in targets:
            there = folder(target)
            if there is not None and there != here and there not in MAY_IMPORT[here]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_module_is_in_an_import_circle() -> None:
    edges = graph()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if target not in edges:
                continue
            if state.get(target) == 1:
                circles.append([*path[path.index(target):], target])
            elif state.get(target) is None:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert circles == []


@pytest.mark.parametrize("made", [
    {"watcher.core.a": {"watcher.core.b"}, "watcher.core.b": {"watcher.core.a"}},
])
def test_the_circle_check_finds_a_circle(made: dict[str, set[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: made)
    with pytest.raises(AssertionError):
        test_no_module_is_in_an_import_circle()
