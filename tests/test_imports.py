"""Imports point one way: flows -> stages -> storage. stages/ and storage/ never import prefect."""

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


def test_validating_a_config_loads_no_transformers():
    """Every `rlpipe` command validates a config first; that needs the config classes, not the
    model libraries (transformers is imported where a model is loaded: stages/models.py)."""
    code = (
        "import sys\n"
        "from stages.pipeline_config import load_config\n"
        "load_config()\n"
        "assert 'transformers' not in sys.modules\n"
        "assert 'deepspeed' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
