"""The stage launcher leaves no process behind when the orchestrating process dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

RLPIPE = str(Path(sys.executable).parent / "rlpipe")
LONG_SFT = ["--set", "wandb.mode=disabled", "--set", "sft.steps=100000", "--set", "task.train_size=50"]


def start_stage(tmp_path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    proc = subprocess.Popen(
        [RLPIPE, "stage", "sft", "--run-id", "k", "--storage", str(tmp_path), *LONG_SFT],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while True:
        children = psutil.Process(proc.pid).children(recursive=True)
        if any("stages.sft" in " ".join(c.cmdline()) for c in children):
            return proc, children
        assert proc.poll() is None and time.time() < deadline, "the stage process never started"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_the_launcher_kills_the_stage(tmp_path, sig):
    proc, children = start_stage(tmp_path)
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"orphaned stage processes: {[p.pid for p in alive]}"
    if sig == signal.SIGTERM:  # a clean stop: one line, the conventional 128 + signal exit code
        assert proc.returncode == 128 + signal.SIGTERM
        assert stderr.strip().splitlines()[-1].startswith("error: stopped by signal SIGTERM"), stderr
        assert "Traceback" not in stderr
