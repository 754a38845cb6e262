"""The modules of src/thawlab import each other without a circle: every `import` and `from` statement, those
inside functions and under TYPE_CHECKING too (a lazy import hides a circle from Python, not from the reader)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_files(src: Path = SRC) -> dict[str, Path]:
    out = {}
    for path in sorted((src / "thawlab").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the thawlab modules it imports (`from pkg import name`: pkg.name when that is a module)."""
    files = module_files(src)

    def owner(name: str) -> str:  # the module a dotted name lives in
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "thawlab"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                if base.split(".")[0] != "thawlab":
                    continue
                for a in node.names:
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else owner(base))
        graph[mod] = deps - {mod, ""}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert {"thawlab.train", "thawlab.ranks", "thawlab.data.digits", "thawlab.report.cli"} <= graph.keys()
    assert "thawlab.build" in graph["thawlab.train"]  # the walk sees imports inside functions
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("files, cycle", [
    ({"a.py": "from thawlab import b\n", "b.py": "def f():\n    from thawlab.a import x\n"},
     ["thawlab.a", "thawlab.b", "thawlab.a"]),
    ({"a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import y\n",
      "b.py": "import thawlab.a\n"}, ["thawlab.a", "thawlab.b", "thawlab.a"]),
    ({"a.py": "from thawlab import b\n", "b.py": "import os\n"}, None),
])
def test_cycle_finder(tmp_path, files, cycle):
    """The check can fail: circles through a function-local or a TYPE_CHECKING relative import are found."""
    (tmp_path / "thawlab").mkdir()
    (tmp_path / "thawlab" / "__init__.py").write_text("")
    for name, text in files.items():
        (tmp_path / "thawlab" / name).write_text(text)
    assert find_cycle(import_graph(tmp_path)) == cycle
