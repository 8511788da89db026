"""infra/: what can be checked without GPUs or a cluster. The files parse, the Kubernetes job
template uses only variables it declares (a Prefect server accepting it is in test_flows), the
Compose file wires the services the README promises, and nothing in infra/ holds a secret."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parent.parent / "infra"


def placeholders(value) -> set[str]:
    if isinstance(value, str):
        return set(re.findall(r"\{\{\s*([\w.]+)\s*\}\}", value))
    if isinstance(value, dict):
        return set().union(*(placeholders(v) for v in value.values()), set())
    if isinstance(value, list):
        return set().union(*(placeholders(v) for v in value), set())
    return set()


def test_kubernetes_job_template_uses_only_declared_variables_and_asks_for_gpus():
    template = json.loads((INFRA / "k8s" / "base-job-template.json").read_text())
    declared = set(template["variables"]["properties"])
    used = placeholders(template["job_configuration"])
    assert used <= declared, f"undeclared: {used - declared}"
    assert {"image", "gpus", "node_selector", "tolerations"} <= used
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"] == "{{ tolerations }}"
    defaults = template["variables"]["properties"]
    assert defaults["tolerations"]["default"][0]["key"] == "nvidia.com/gpu"
    assert all("description" in spec or "title" in spec for spec in defaults.values())


def test_compose_file_wires_server_postgres_minio_and_a_gpu_worker():
    compose = yaml.safe_load((INFRA / "compose" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "minio", "create-bucket", "worker"} <= set(services)
    server_env = services["prefect-server"]["environment"]
    assert server_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    worker = services["worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["RLPIPE_STORAGE"].startswith("s3://")
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--pool gpu" in worker["command"]


def test_dockerfile_builds_the_gpu_extra_on_a_cuda_base():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", dockerfile, re.M)
    assert 'pip install ".[gpu]"' in dockerfile and "USER rlpipe" in dockerfile


def test_deepspeed_configs_parse_with_the_zero_stage_in_their_name():
    for stage in (0, 2, 3):
        config = json.loads((INFRA / "deepspeed" / f"zero{stage}.json").read_text())
        assert config["zero_optimization"]["stage"] == stage


def test_no_credentials_in_infra_files():
    secret_like = re.compile(
        r"(AKIA[0-9A-Z]{16}|(PASSWORD|SECRET|KEY|TOKEN)\w*\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,})"
    )
    for path in INFRA.rglob("*"):
        if path.is_file():
            text = path.read_text()
            hits = [m.group(0) for m in secret_like.finditer(text) if "${" not in m.group(0)]
            assert not hits, f"{path}: {hits}"
