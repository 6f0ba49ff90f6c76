"""The folders show the architecture: data flows one way, and every run file is named in one place.

    cli.py -> {sweeps, evaluation, serving, audit} -> runs -> {lightning_modules, datamodules} -> errors

Checked statically over every import statement (including the ones inside functions, which would otherwise
hide a cycle until some code path runs): between packages, and between the modules of every package.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LAYER = {"errors": 0, "lightning_modules": 1, "datamodules": 1, "runs": 2, "cluster": 2,
         "evaluation": 3, "sweeps": 3, "serving": 3, "audit": 3, "export": 3, "cli": 4}
# Same-layer edges that are part of the design: the sweep report embeds the winner's evaluation report, the
# server draws the evaluation's heat maps, the audit report uses the evaluation's document writer, and every sweep
# folder gets the model card that `export` writes.
ALLOWED_SIDEWAYS = {("sweeps", "evaluation"), ("serving", "evaluation"), ("audit", "evaluation"),
                    ("sweeps", "audit"), ("serving", "datamodules"), ("lightning_modules", "datamodules"),
                    ("serving", "export"), ("sweeps", "export")}
PACKAGES = [p for p in LAYER if (REPO / p).is_dir() or (REPO / f"{p}.py").is_file()]


def project_files() -> list[Path]:
    files = [REPO / "cli.py", REPO / "errors.py"]
    for package in PACKAGES:
        if (REPO / package).is_dir():
            files += sorted((REPO / package).rglob("*.py"))
    return files


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(LAYER)


def owner(path: Path) -> str:
    rel = path.relative_to(REPO)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_imports_only_go_down_the_layers():
    wrong = []
    for path in project_files():
        me = owner(path)
        for other in imported_packages(path) - {me}:
            if LAYER[other] > LAYER[me] or (LAYER[other] == LAYER[me] and (me, other) not in ALLOWED_SIDEWAYS):
                wrong.append(f"{path.relative_to(REPO)} imports {other}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_package_graph_has_no_cycle():
    edges: dict[str, set[str]] = {p: set() for p in LAYER}
    for path in project_files():
        edges[owner(path)] |= imported_packages(path) - {owner(path)}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack, node, nxt]))
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [])


RUN_FILE_LITERALS = re.compile(r"""["'](checkpoints/best\.ckpt|best\.ckpt|model\.json|timing\.json|pruned\.json|"""
                               r"""test_metrics\.json|evaluation\.json|metrics\.csv|winner\.json|split\.json|"""
                               r"""split_counts\.csv|skipped_images\.csv|audit\.json)["']""")
NAMED_HERE = {REPO / "runs" / "files.py", REPO / "datamodules" / "run_record.py"}  # the one definition each


def test_run_file_names_live_in_the_run_module():
    offenders = []
    for path in project_files() + sorted((REPO / "benchmarks").glob("*.py")):
        if path in NAMED_HERE:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if RUN_FILE_LITERALS.search(line) or '"checkpoints" / "best.ckpt"' in line:
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "run-file names outside runs/files.py:\n" + "\n".join(offenders)


def test_every_package_says_what_it_owns():
    for package in PACKAGES:
        init = REPO / package / "__init__.py"
        if init.exists():
            doc = ast.get_docstring(ast.parse(init.read_text()))
            assert doc and len(doc) > 30, f"{package}/__init__.py has no docstring saying what it owns"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports: `from sweeps import grid` is sweeps.grid, `from sweeps.grid import
    Stage` is sweeps.grid too, relative imports resolved."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]

    def nearest(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {nearest(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else nearest(base) for a in node.names}
    return found - {None, me}


def module_cycles(files: list[Path]) -> list[list[str]]:
    """Every cycle of the module import graph, one per strongly connected component (Tarjan)."""
    modules = {module_name(f): f for f in files}
    edges = {m: imported_modules(f, set(modules)) for m, f in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return cycles


def test_no_import_cycle_between_modules():
    cycles = module_cycles(project_files())
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_module_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    """The check itself: a two-module circle through an import inside a function is found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import x\n")
    (pkg / "c.py").write_text("from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert module_cycles(sorted(pkg.glob("*.py"))) == [["pkg.a", "pkg.b"]]


def test_every_sweeps_module_says_what_it_owns():
    for path in sorted((REPO / "sweeps").glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert len(doc.split("\n")[0]) > 30, f"{path.relative_to(REPO)}: its docstring's first line says what it owns"


MAX_FUNCTION_LINES = 60
LONG_REASON = "# long:"  # on the line above a longer function's `def` (or its decorators): why it stays long


def long_functions(files: list[Path]) -> list[str]:
    """Functions longer than MAX_FUNCTION_LINES (from `def` to their last line) with no LONG_REASON comment."""
    found = []
    for path in files:
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if length > MAX_FUNCTION_LINES and not lines[first - 2].strip().startswith(LONG_REASON):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_long_function_without_a_reason():
    long = long_functions(project_files())
    assert not long, (f"functions over {MAX_FUNCTION_LINES} lines: split them, or say why above the def "
                      f"(`{LONG_REASON} ...`):\n" + "\n".join(long))
