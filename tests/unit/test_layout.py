"""The code's layout: the modules of trainer/ and loaders/ import one another in one direction only (no
cycle, and no import inside a function to dodge one), loaders never imports trainer, every module
imports on its own, and the command line and `compare` start without torch or DALI."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGES = ("trainer", "loaders")
# Imports inside functions on purpose, for start-up time: the command line imports each command's
# module when that command is chosen, and the package loads the launcher when a recipe asks for `run`.
LAZY_ON_PURPOSE = {"trainer", "trainer.__main__"}


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def project_imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import statement of the file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                # `from trainer import inference` imports the submodule; `from trainer import Recipe` the package.
                names = [f"{child.module}.{alias.name}" if f"{child.module}.{alias.name}" in modules else child.module for alias in child.names]
            found.extend((name, child.lineno, in_function) for name in names if name in modules)
            visit(child, inside)

    visit(tree, False)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {target for target, _, lazy in project_imports(path, modules) if not lazy and target != name}
            for name, path in modules.items()}


def test_module_level_imports_have_no_cycle():
    graph = import_graph()
    state: dict[str, str] = {}
    cycles = []

    def walk(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                walk(target, trail + [target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_project_import_inside_a_function():
    modules = project_modules()
    lazy = [f"{name} (line {line}) imports {target}" for name, path in modules.items() if name not in LAZY_ON_PURPOSE
            for target, line, inside in project_imports(path, modules) if inside]
    assert not lazy, "imports inside functions: " + "; ".join(lazy)


def test_loaders_never_import_trainer():
    graph = import_graph()
    wrong = [f"{name} -> {target}" for name, targets in graph.items() if name.startswith("loaders") for target in targets
             if target.startswith("trainer")]
    assert not wrong, wrong


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(project_modules())
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok')"
    done = subprocess.run([sys.executable, "-c", code, *names], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_command_line_and_compare_load_without_torch_or_dali():
    code = (
        "import contextlib, io, json, sys\n"
        "import trainer.__main__, trainer.compare\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    trainer.__main__.main(['--help'])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('nvidia.dali'))\n"
        "print(json.dumps({'help': out.getvalue(), 'loaded': loaded}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert "compare" in result["help"] and "check-data" in result["help"]
    assert result["loaded"] == []
