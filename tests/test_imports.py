"""Imports point one way: flows -> stages -> storage, with no circle anywhere; stages/ and storage/
never import prefect; validating a config loads neither torch nor the model libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"storage": {"stages", "flows", "prefect"}, "stages": {"flows", "prefect"}}


def imported_top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction_in_source(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_top_level_names(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_stages_and_storage_loads_no_prefect():
    code = (
        "import importlib, pkgutil, sys\n"
        "import stages, storage\n"
        "for pkg in (stages, storage):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('prefect', 'flows'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)


def test_validating_a_config_loads_no_torch_and_no_model_library():
    """Every `rlpipe` command validates a config first; that needs the config classes (stages/config/,
    pydantic only), not torch or the model libraries (imported where a model is loaded)."""
    code = (
        "import sys\n"
        "from stages.config.pipeline import load_config\n"
        "load_config()\n"
        "for heavy in ('torch', 'transformers', 'deepspeed'):\n"
        "    assert heavy not in sys.modules, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in ("flows", "stages", "storage"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at module level or inside functions."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` imports pkg and, when mod is a module, pkg.mod
                targets |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle():
    graph = import_graph()
    assert {"stages.registry", "stages.ppo.recipe", "stages.config.pipeline"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_circle_check_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_stage_table_is_the_pipeline_order_of_the_storage_layout():
    from stages.registry import STAGES
    from storage.layout import STAGE_NAMES

    assert tuple(STAGES) == tuple(STAGE_NAMES)


def test_config_literals_match_the_algorithms():
    """The PPO section spells the aggregations and KL estimators itself (no torch import)."""
    from typing import get_args

    from stages import algorithms
    from stages.config import ppo

    assert get_args(ppo.Aggregation) == get_args(algorithms.Aggregation)
    assert get_args(ppo.KLEstimator) == get_args(algorithms.KLEstimator)


def test_no_module_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in project_modules().values()
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert long == {}
