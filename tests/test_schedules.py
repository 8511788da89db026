"""Schedules fire: against a real `prefect server` with its scheduler service on (a subprocess, not the
test harness), `rlpipe serve`'s nightly evaluation with a cron of every 5 seconds (Prefect's cron takes
a sixth field, the seconds) gets scheduled flow runs, and `rlpipe serve` runs one to completion. (With SQLAlchemy 2.1 the scheduler service failed
every loop with "Can't evaluate bulk DML statement" and no run was ever scheduled.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cli_runs import RLPIPE

from stages.runtime.distributed import free_port

PREFECT = str(Path(sys.executable).parent / "prefect")


def api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET",
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a fresh SQLite database, its scheduler looping every 2 s."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
    }
    log = open(home / "server.log", "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 180
    while True:
        try:
            api(url, "/health")
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, (home / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    yield url, env, home / "server.log"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    log.close()


def test_a_cron_schedule_gets_runs_and_serve_runs_one(prefect_server, tmp_path):
    url, env, server_log = prefect_server
    serve_env = env | {"PREFECT_API_URL": url, "RLPIPE_STORAGE": str(tmp_path / "runs")}
    serve = subprocess.Popen(
        [RLPIPE, "serve", "--eval-cron", "* * * * * */5"], env=serve_env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (
            found := api(
                url, "/deployments/filter", {"deployments": {"name": {"any_": ["nightly-evaluation"]}}}
            )
        ):
            assert serve.poll() is None and time.time() < deadline, "rlpipe serve registered no deployment"
            time.sleep(1)
        runs_of = {"deployments": {"id": {"any_": [found[0]["id"]]}}}
        # the scheduler service fills the schedule ...
        deadline = time.time() + 60
        while not api(
            url, "/flow_runs/filter", runs_of | {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}
        ):
            assert time.time() < deadline, f"no run scheduled; server log: {server_log.read_text()[-2000:]}"
            time.sleep(1)
        # ... and `rlpipe serve` runs the first one when its minute comes (nothing to evaluate: it completes)
        deadline = time.time() + 150
        while not api(
            url, "/flow_runs/filter", runs_of | {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
        ):
            assert serve.poll() is None and time.time() < deadline, "no scheduled run completed"
            time.sleep(2)
        assert "bulk DML" not in server_log.read_text()
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
