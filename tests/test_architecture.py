"""The folders show the architecture: data flows one way, and every run file is named in one place.

    cli.py -> {sweeps, evaluation, serving, audit} -> runs -> {lightning_modules, datamodules} -> errors

Checked statically over every import statement (including the ones inside functions, which would otherwise
hide a cycle until some code path runs).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

LAYER = {"errors": 0, "lightning_modules": 1, "datamodules": 1, "runs": 2,
         "evaluation": 3, "sweeps": 3, "serving": 3, "audit": 3, "export": 3, "cli": 4}
# Same-layer edges that are part of the design: the sweep report embeds the winner's evaluation report, the
# server draws the evaluation's heat maps, the audit report uses the evaluation's document writer.
ALLOWED_SIDEWAYS = {("sweeps", "evaluation"), ("serving", "evaluation"), ("audit", "evaluation"),
                    ("sweeps", "audit"), ("serving", "datamodules"), ("lightning_modules", "datamodules"),
                    ("serving", "export")}
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
