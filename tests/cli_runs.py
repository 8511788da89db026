"""Running the `rlpipe` CLI as a user does, as a subprocess (the stage tests share these)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

RLPIPE = str(Path(sys.executable).parent / "rlpipe")


def rlpipe(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`rlpipe ARGS...` with `env` added to this process's environment; output captured."""
    return subprocess.run(
        [RLPIPE, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def sets(overrides: list[str]) -> list[str]:
    """`--set` options for each `key=value`."""
    return [arg for item in overrides for arg in ("--set", item)]


def stage(name: str, run_id: str, root, overrides: list[str]) -> subprocess.CompletedProcess:
    """`rlpipe stage NAME --run-id ID --storage ROOT --set ...`, which must succeed."""
    proc = rlpipe("stage", name, "--run-id", run_id, "--storage", str(root), *sets(overrides))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc
