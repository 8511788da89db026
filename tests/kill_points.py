"""kill -9 a stage at a named point of its run, and check what the kill left (the stage tests share it).

Points: `after_commit` kills the process group from outside as soon as the first checkpoint is
committed; any `point:N` of tests/faultpoints/sitecustomize.py (generate, train, upload, manifest)
kills the stage from inside, the N-th time it reaches the point.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import verify_committed

from storage.checkpoints import committed_steps, latest_committed_step
from storage.layout import RunLayout
from storage.manifests import read_manifest

FAULTPOINTS = str(Path(__file__).resolve().parent / "faultpoints")


def with_fault(variable: str, spec: str) -> dict[str, str]:
    """The environment of a process with the test-only fault `variable=spec` installed."""
    env = dict(os.environ, **{variable: spec})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [FAULTPOINTS, env.get("PYTHONPATH")]))
    return env


def kill_during(command: list[str], layout: RunLayout, stage: str, point: str) -> None:
    """Run `command` (an `rlpipe stage ...`) and kill -9 it at `point`; it must not finish."""
    if point == "after_commit":
        proc = subprocess.Popen(
            command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 300
        while not committed_steps(layout.checkpoints(stage)):
            assert proc.poll() is None, "the stage finished before it could be killed"
            assert time.time() < deadline, "no checkpoint committed in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return
    killed = subprocess.run(
        command, env=with_fault("RLPIPE_TEST_KILL", point), capture_output=True, text=True, timeout=600
    )
    assert killed.returncode != 0 and "killed by SIGKILL" in killed.stderr, killed.stderr[-2000:]


def assert_committed_state_intact(layout: RunLayout, stage: str) -> list[int]:
    """What a kill may leave: no manifest; every committed checkpoint verifies; latest is the newest."""
    assert read_manifest(layout.manifest(stage)) is None
    committed = committed_steps(layout.checkpoints(stage))
    for step in committed:
        verify_committed(layout.checkpoints(stage), step)
    assert latest_committed_step(layout.checkpoints(stage)) == (committed[-1] if committed else None)
    return committed


def kill_in_turn(
    first_command: list[str], command: list[str], layout: RunLayout, stage: str, points: list[str]
) -> list[list[int]]:
    """Kill the stage at each point in turn: the first try runs `first_command`, every later try
    resumes from what the previous kill left (`command`). Each kill must leave the committed state
    intact. Returns the committed steps after each kill; the caller reruns to completion and
    compares with an uninterrupted run."""
    committed = []
    for i, point in enumerate(points):
        kill_during(first_command if i == 0 else command, layout, stage, point)
        committed.append(assert_committed_state_intact(layout, stage))
    return committed
