"""Nothing from storage is unpickled, and no secret reaches storage, logs or reports.

- The source never deserialises with code execution: every `torch.load` passes
  `weights_only=True`, YAML is read with `safe_load`, and pickle/marshal/dill/joblib, `eval` and
  `exec` are not used (an AST scan, so a new call site fails this test).
- End to end: a pipeline on S3 storage (the moto server, over HTTP) runs with sentinel secrets in
  the environment (AWS keys, wandb and HF tokens); afterwards no object in the bucket, no line the
  CLI printed and no wandb file holds any of them. (Secrets inside config values are redacted by
  storage.secrets on every write: test_secrets and test_manifests.)
"""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import pytest
from cli_runs import RLPIPE

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "stages", "storage")
UNSAFE_MODULES = {"pickle", "cPickle", "marshal", "dill", "joblib", "shelve"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            owner = (
                func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            )
            yield node, owner, name


def _unsafe_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"imports {m}" for m in modules if m.split(".")[0] in UNSAFE_MODULES]
    for node, owner, name in _calls(tree):
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        if owner == "torch" and name == "load":
            safe = any(
                k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords
            )
            found += [] if safe else [f"{where}: torch.load without weights_only=True"]
        elif owner == "yaml" and name in {"load", "load_all", "unsafe_load", "full_load"}:
            found.append(f"{where}: yaml.{name} (use yaml.safe_load)")
        elif isinstance(node.func, ast.Name) and name in {"eval", "exec"}:  # not model.eval()
            found.append(f"{where}: {name}()")
    return found


def test_source_never_deserialises_with_code_execution():
    files = [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    assert len(files) > 30  # the scan saw the code base
    unsafe = [use for path in files for use in _unsafe_uses(path)]
    assert unsafe == []


def test_the_scan_catches_each_unsafe_form(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch, yaml\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
        "yaml.load(s)\neval('1')\nmodel.eval()\ntorch.load('x', weights_only=True)\nyaml.safe_load(s)\n"
    )
    # relative_to(REPO) needs a path inside the repository: parse it from there.
    inside = REPO / "tests" / f".scan_probe_{os.getpid()}.py"
    inside.write_text(bad.read_text())
    try:
        found = _unsafe_uses(inside)
    finally:
        inside.unlink()
    assert len(found) == 5, found
    assert found[0] == "imports pickle"


SENTINELS = {
    "AWS_SECRET_ACCESS_KEY": "SENTINEL-aws-secret-4f1c",
    "AWS_ACCESS_KEY_ID": "SENTINELAWSKEYID7777",
    "WANDB_API_KEY": "SENTINEL-wandb-0123456789abcdef0123456789abcdef0123",
    "HF_TOKEN": "hf_SENTINELhftoken0123456789",
}


def test_no_secret_reaches_storage_logs_or_reports(s3_root, tmp_path):
    wandb_dir = tmp_path / "wandb"
    env = {**os.environ, **SENTINELS, "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    overrides = [
        "wandb.mode=offline", "task.train_size=64", "task.heldout_size=8", "generation.max_new_tokens=16",
        "sft.steps=2", "sft.save_every=1", "sft.batch_size=8", "sft.optim.micro_batch_size=8",
        "reward_model.enabled=false", "critic_warmup.enabled=false", "ppo.enabled=false",
        "evaluate.benchmarks=[arith]", "evaluate.limits={arith: 4}", "evaluate.samples=2",
        f"storage.endpoint_url={s3_root.endpoint_url}",
    ]  # fmt: skip
    args = [arg for item in overrides for arg in ("--set", item)]
    proc = subprocess.run(
        [RLPIPE, "run", "--storage", s3_root.uri, "--run-id", "leak", *args],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    fs, prefix = s3_root.fs, s3_root.path
    stored = {path: fs.cat_file(path) for path in fs.find(prefix)}
    assert any("/evaluate/" in p and p.endswith("report.md") for p in stored), sorted(stored)
    assert any(p.endswith("pipeline.json") for p in stored) and any("checkpoints" in p for p in stored)
    wandb_files = [p for p in wandb_dir.rglob("*") if p.is_file()]
    assert wandb_files  # the offline wandb run was scanned
    texts = {"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode()}
    texts |= {str(p): p.read_bytes() for p in wandb_files} | stored
    for secret in SENTINELS.values():
        leaks = [where for where, data in texts.items() if secret.encode() in data]
        assert leaks == [], f"{secret} found in {leaks}"


@pytest.fixture(autouse=True)
def _no_probe_left():
    yield
    assert not list((REPO / "tests").glob(".scan_probe_*.py"))
