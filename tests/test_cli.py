"""The `rlpipe` CLI: commands against local and S3 storage, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from cli_runs import RLPIPE

from flows.cli import main

# `rlpipe run` with every stage switched off: these tests are about the CLI, the stage tests run stages.
NO_STAGES = [
    arg
    for s in ("sft", "reward_model", "critic_warmup", "ppo", "evaluate")
    for arg in ("--set", f"{s}.enabled=false")
]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_creates_a_run_and_runs_lists_it(storage_root, capsys, prefect_api):
    uri, endpoint = storage_root.uri, storage_root.endpoint_url
    env_endpoint = ["--set", f"storage.endpoint_url={endpoint}"] if endpoint else []
    code, out, _ = run_cli(
        capsys, "run", "--storage", uri, "--run-id", "exp1", "--set", "seed=4", *env_endpoint, *NO_STAGES
    )
    assert code == 0 and "creating run exp1" in out and "run exp1: " in out
    code, out, _ = run_cli(
        capsys, "runs", "--storage", uri, *(["--endpoint-url", endpoint] if endpoint else [])
    )
    assert code == 0
    assert any(line.startswith("exp1 ") for line in out.splitlines())
    code, out, _ = run_cli(
        capsys, "show", "exp1", "--storage", uri, *(["--endpoint-url", endpoint] if endpoint else [])
    )
    assert code == 0 and '"seed": 4' in out


def test_runs_on_an_empty_root(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "runs", "--storage", str(tmp_path / "empty"))
    assert code == 0 and "no runs in" in out


def test_config_prints_resolved_config_and_hash(capsys):
    code, out, _ = run_cli(capsys, "config", "--set", "seed=9")
    assert code == 0 and '"seed": 9' in out and "config_hash: " in out


@pytest.mark.parametrize(
    "args,message,expected_code",
    [
        (["run", "--set", "nope.key=1"], "error: unknown config key 'nope'", 1),
        (["run", "--set", "seed=x"], "error: config key 'seed'", 1),
        (["run", "--recipe", "/does/not/exist.yaml"], "error: recipe file not found", 1),
        (["show", "no-such-run"], "error: unknown run 'no-such-run'", 1),
        (["run", "--run-id", "../escape"], "error: invalid run id", 1),
        (["run", "--stages", "ppo,bogus"], "error: unknown stage bogus", 1),
        (["deploy", "--work-pool", "p", "--gpu-slots", "0"], "error: Invalid value for '--gpu-slots'", 2),
        (["frobnicate"], "error: No such command 'frobnicate'", 2),
        (["run", "--bogus-flag"], "error: No such option: --bogus-flag", 2),
        (["bench", "gae", "--batch", "0"], "error: Invalid value for '--batch'", 2),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(args, message, expected_code, tmp_path):
    # A real process: what a user sees, with nothing written to storage.
    storage = tmp_path / "runs"
    env = {**os.environ, "RLPIPE_STORAGE": str(storage)}
    proc = subprocess.run([RLPIPE, *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == expected_code
    assert proc.stderr.strip().startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not storage.exists() or not any(storage.iterdir())


def test_bench_gae_json_reports_both_timings_and_agreement(capsys):
    code, out, _ = run_cli(
        capsys, "bench", "gae", "--batch", "8", "--length", "300", "--repeats", "1", "--json"
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0
    assert result["loop_s"] > 0 and result["vectorised_s"] > 0
    assert result["speedup"] == pytest.approx(result["loop_s"] / result["vectorised_s"])
    assert result["max_rel_error"] < 1e-4


def test_bench_gae_length_adaptive(capsys):
    code, out, _ = run_cli(
        capsys, "bench", "gae", "--batch", "4", "--length", "130", "--alpha", "0.05", "--repeats", "1"
    )
    assert code == 0 and "lambda=length-adaptive" in out and "speedup" in out


def test_serve_refuses_without_a_prefect_server_the_ui_can_see(tmp_path):
    """Without PREFECT_API_URL, Prefect would serve into a temporary in-process server no UI shows
    (before: `rlpipe serve` ran there silently until killed); with an API that does not answer,
    likewise. Both are one line and exit 1, in seconds."""
    from conftest import free_port

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile that could set an API URL
    proc = subprocess.run([RLPIPE, "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: rlpipe serve needs the Prefect server the UI shows: start one (prefect server start) and set "
        "PREFECT_API_URL=http://127.0.0.1:4200/api"
    ]
    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    proc = subprocess.run(
        [RLPIPE, "serve"], env={**env, "PREFECT_API_URL": url}, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"error: no Prefect API answers at {url} (")
