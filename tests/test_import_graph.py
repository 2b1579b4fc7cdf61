"""hf_freeze's import graph, built from the source with ``ast``: no cycle, and imports inside functions only where
they have a reason, written beside them.

Every ``import`` statement counts, at module level or inside a function (an import inside a function must not
hide a cycle either); ``if TYPE_CHECKING:`` blocks never run and do not. An import inside a function is allowed
for an optional package (a ``pyproject.toml`` extra), in a start-up module (read by ``import hf_freeze`` or while
``hf-freeze`` parses its arguments: torch, transformers and the commands' modules load only when used), and for
``torch.distributed.checkpoint`` (seconds to import; only a sharded model needs it). Each one carries a comment:
on its line, or on the line that opens its block of imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_freeze"

#: the optional packages (extras in pyproject.toml): imported inside the function that needs them
OPTIONAL = {"peft", "datasets", "optuna", "matplotlib", "timm", "evaluate", "sklearn", "PIL", "deepspeed",
            "bitsandbytes"}
#: modules read by ``import hf_freeze`` or while ``hf-freeze`` parses its arguments: they import torch,
#: transformers, huggingface_hub and the commands' modules inside the functions that need them
START_UP = {"hf_freeze", "hf_freeze.cli", "hf_freeze.checks", "hf_freeze.tiny"}
#: parts of torch that only a sharded model needs and that take seconds to import
SHARDED_ONLY = ("torch.distributed.checkpoint",)


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the module imported (a submodule when ``from package import submodule``)
    line: int
    in_function: bool
    commented: bool


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every importable module of the package at ``root`` (folders with ``__init__.py``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        folders = [root.parent.joinpath(*parts[:i]) for i in range(1, len(parts))]
        if not all((f / "__init__.py").is_file() for f in folders):
            continue  # data shipped with the package (evaluate's metric scripts), not a module
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _has_reason(lines: list[str], node: ast.stmt) -> bool:
    """A comment on the import's line, or on the line that opens its block of imports (blank lines between)."""
    if "#" in lines[node.lineno - 1]:
        return True
    i = node.lineno - 2
    while i >= 0:
        text = lines[i].strip()
        if text.startswith("#"):
            return True
        if text and not text.startswith(("import ", "from ")):
            return False
        i -= 1
    return False


def imports(name: str, path: Path, known: dict[str, Path]) -> list[Import]:
    """Every import statement of module ``name`` that runs, resolved to module names."""
    source = path.read_text()
    lines = source.splitlines()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            handle(child, in_function)

    def handle(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for other in node.orelse:  # the body never runs
                handle(other, in_function)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _targets(node, package, known):
                found.append(Import(name, target, node.lineno, in_function, _has_reason(lines, node)))
        visit(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source), False)
    return found


def _targets(node: ast.Import | ast.ImportFrom, package: str, known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
        base = ".".join(up + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[Import]]:
    """The package's modules -> the package modules each imports (parent packages included), and every import."""
    known = modules(root)
    every = [imp for name, path in known.items() for imp in imports(name, path, known)]
    graph: dict[str, set[str]] = {name: set() for name in known}
    for imp in every:
        if imp.target in known:
            parts = imp.target.split(".")
            graph[imp.source] |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} - {imp.source}
    return graph, every


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def depth(graph: dict[str, set[str]]) -> dict[str, int]:
    """Per module, the longest chain of imports below it (0: it imports no module of the package)."""
    memo: dict[str, int] = {}

    def d(node: str) -> int:
        if node not in memo:
            memo[node] = 1 + max((d(n) for n in graph[node]), default=-1)
        return memo[node]

    return {node: d(node) for node in graph}


def misplaced(every: list[Import]) -> list[str]:
    """Imports inside functions without a reason in the rules above, or without a comment saying it."""
    problems = []
    for imp in every:
        if not imp.in_function:
            continue
        allowed = (imp.target.split(".")[0] in OPTIONAL or imp.source in START_UP
                   or imp.target.startswith(SHARDED_ONLY))
        if not allowed:
            problems.append(f"{imp.source}:{imp.line} imports {imp.target} inside a function: import it at the top "
                            "(only optional packages and the start-up modules import inside functions)")
        elif not imp.commented:
            problems.append(f"{imp.source}:{imp.line} imports {imp.target} inside a function without a comment "
                            "saying why")
    return problems


# ----------------------------------------------------------------------------- the package
def test_hf_freeze_has_no_import_cycle():
    graph, _ = import_graph(PACKAGE)
    assert len(graph) > 30 and "hf_freeze.apply" in graph["hf_freeze.adapters"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert max(depth(graph).values()) >= 5  # policy -> plan -> state -> report -> apply: the layers are there


def test_imports_inside_functions_are_optional_packages_or_start_up_and_say_why():
    _, every = import_graph(PACKAGE)
    assert any(imp.in_function and imp.target == "peft" for imp in every)
    assert misplaced(every) == []


def test_start_up_modules_load_neither_torch_nor_transformers():
    """What lets the start-up modules import inside functions: importing them (and the policy they parse) stays light."""
    code = ("import sys, hf_freeze, hf_freeze.cli, hf_freeze.checks, hf_freeze.tiny, hf_freeze.policy\n"
            "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ----------------------------------------------------------------------------- the checks themselves
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    root = _package(tmp_path, {
        "a.py": "from . import b\n",
        "b.py": "def f():\n    from .c import g  # lazy\n    return g\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import b\nfrom .a import x\n",
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
    })
    graph, _ = import_graph(root)
    assert graph["pkg.d"] == set()  # a TYPE_CHECKING import never runs
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert find_cycle({**graph, "pkg.b": set()}) is None


def test_function_level_imports_need_a_reason_and_a_comment(tmp_path):
    root = _package(tmp_path, {
        "core.py": ("def f():\n    import peft\n    # optional: only adapters\n    import timm\n\n    from . import other\n"
                    "    import json  # why not at the top?\n"),
        "other.py": "",
    })
    problems = misplaced(import_graph(root)[1])
    assert [p.split(" inside")[0] for p in problems] == ["pkg.core:2 imports peft", "pkg.core:6 imports pkg.other",
                                                        "pkg.core:7 imports json"]
    assert "without a comment" in problems[0] and "import it at the top" in problems[1]
