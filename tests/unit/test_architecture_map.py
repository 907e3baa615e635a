"""docs/architecture.md's "Map" against the tree: every path it names
exists, and every module of nitro/ and every C file of cffi_build/ is on it.

The map is an indented tree in a fenced block: an entry is a name at two
spaces per level under its directory (a name ending in "/"), then its
description; "a, b" names two files; a line indented deeper than an entry
could be continues the description above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
STEP = 2  # spaces per level


def map_lines(text: str) -> list[str]:
    """The lines of the first fenced block after the "## Map" heading."""
    _, found, after = text.partition("\n## Map\n")
    assert found, "docs/architecture.md has no '## Map' section"
    body = after.split("```", 2)
    assert len(body) == 3, "the Map section has no fenced block"
    return body[1].splitlines()


def _names(entry: str) -> list[str]:
    """The file or directory names at the start of an entry line."""
    tokens = entry.split()
    names = [tokens[0]]
    while names[-1].endswith(",") and len(tokens) > len(names):
        names.append(tokens[len(names)])
    return [n.rstrip(",") for n in names]


def map_paths(lines: list[str]) -> set[str]:
    """Repository paths (directories end in "/") the map names."""
    paths: set[str] = set()
    dirs: list[tuple[int, str]] = []  # the open directories: (indent, path)
    for line in lines:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        while dirs and dirs[-1][0] >= indent:
            dirs.pop()
        if indent != (dirs[-1][0] + STEP if dirs else 0):
            continue  # a description's continuation
        parent = dirs[-1][1] if dirs else ""
        names = _names(line)
        paths.update(parent + n for n in names)
        if len(names) == 1 and names[0].endswith("/"):
            dirs.append((indent, parent + names[0]))
    return paths


def _is_plumbing(py: Path) -> bool:
    """A package's __init__/__main__ that defines nothing (a docstring,
    re-exports, a call of main): not a module the map must explain."""
    if py.name not in ("__init__.py", "__main__.py"):
        return False
    tree = ast.parse(py.read_text())
    return not any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                   for n in tree.body)


def must_be_on_map() -> set[str]:
    py = {p for p in (REPO / "nitro").rglob("*.py") if not _is_plumbing(p)}
    c = {p for ext in ("*.c", "*.cpp", "*.h") for p in (REPO / "cffi_build").glob(ext)}
    return {p.relative_to(REPO).as_posix() for p in py | c}


@pytest.fixture(scope="module")
def named() -> set[str]:
    return map_paths(map_lines(DOC.read_text()))


def test_the_parser_reads_nested_entries_and_name_lists() -> None:
    lines = ["a/", "  b.py          what b is", "                continued: not/a/path.py",
             "  c/", "    d.h, e.c    two names", "    sub/f.py one space", "g/h.txt top level"]
    assert map_paths(lines) == {"a/", "a/b.py", "a/c/", "a/c/d.h", "a/c/e.c", "a/c/sub/f.py", "g/h.txt"}


def test_every_path_on_the_map_exists(named: set[str]) -> None:
    missing = sorted(p for p in named if not (REPO / p).exists()
                     or (p.endswith("/") and not (REPO / p).is_dir()))
    assert not missing, f"docs/architecture.md's map names paths that do not exist: {missing}"


def test_every_module_and_c_file_is_on_the_map(named: set[str]) -> None:
    absent = sorted(must_be_on_map() - named)
    assert not absent, f"not on docs/architecture.md's map: {absent}"
