"""Start a stage as a subprocess, stream its output line by line, never leave ranks behind.

The GPU work runs in `python -m stages.<name>` (one process) or under the DeepSpeed launcher
(`deepspeed --num_gpus N --module stages.<name>`, N ranks; on a machine without CUDA the ranks
run on CPU with `DS_ACCELERATOR=cpu`). The child starts in its own session, so the whole
process group (launcher + every rank) can be killed at once on cancel, timeout or a crash of
the caller: no orphaned rank keeps holding GPU memory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from stages.pipeline_config import PipelineConfig
from storage.secrets import redact_text


class StageFailed(RuntimeError):
    """The stage process exited non-zero (message: its last error line)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def stage_command(stage: str, config_path: str, nproc: int, force: bool) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment that run `stage` with `nproc` ranks."""
    args = ["--config", config_path] + (["--force"] if force else [])
    env: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
    if not _cuda_available():
        env["DS_ACCELERATOR"] = "cpu"
    if nproc <= 1:
        return [sys.executable, "-m", f"stages.{stage}", *args], env
    launcher = str(Path(sys.executable).parent / "deepspeed")
    command = [
        launcher,
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(_free_port()),
        "--module",
        f"stages.{stage}",
    ]
    return [*command, *args], env


def kill_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the child's whole process group, then SIGKILL whatever is left after `grace_s`."""
    pgid = proc.pid  # the child leads its own session, so its pid is the group id (even once reaped)
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if proc.poll() is not None and not _group_alive(pgid):
                return
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the launching process dies, even by SIGKILL (Linux).

    The DeepSpeed launcher forwards that to its ranks; a single-rank stage just stops.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the process-group kill in `run_stage_process` still covers normal exits


class StageTerminated(Exception):
    """SIGTERM/SIGHUP received while a stage runs: unwinds so the stage's process group is killed."""

    def __init__(self, signum: int):
        super().__init__(
            f"stopped by signal {signal.Signals(signum).name}; the stage's processes were killed"
        )
        self.signum = signum


def _raise_terminated(signum, _frame):
    raise StageTerminated(signum)


def run_stage_process(
    stage: str,
    config: PipelineConfig,
    *,
    nproc: int = 1,
    force: bool = False,
    log_line: Callable[[str], None] = print,
    timeout_s: float | None = None,
    cwd: str | None = None,
) -> None:
    """Run one stage to completion; raise StageFailed (its last error line) if it fails.

    Lines are redacted before they reach `log_line`, so a secret printed by a library never lands
    in the orchestrator's logs.
    """
    with tempfile.TemporaryDirectory(prefix=f"rlpipe-{stage}-") as tmp:
        config_path = os.path.join(tmp, "config.json")
        with open(config_path, "w") as f:
            f.write(config.model_dump_json(indent=2))
        command, extra_env = stage_command(stage, config_path, nproc, force)
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,  # its own process group: killable as a whole
            env={**os.environ, **extra_env},
            cwd=cwd,
            preexec_fn=_die_with_parent,
        )
        # A plain SIGTERM would end this process without running `finally`, orphaning the stage.
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = {}
        if in_main_thread:
            for sig in (signal.SIGTERM, signal.SIGHUP):
                previous[sig] = signal.signal(sig, _raise_terminated)
        last_error = ""
        started = time.time()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = redact_text(raw.rstrip("\n"))
                if line.startswith("error:") or "Error" in line.split(":", 1)[0]:
                    last_error = line
                log_line(line)
                if timeout_s is not None and time.time() - started > timeout_s:
                    raise TimeoutError(f"stage {stage} exceeded its timeout of {timeout_s:.0f} s")
            code = proc.wait()
        finally:
            if proc.poll() is None or _group_alive(proc.pid):
                kill_process_group(proc)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if code != 0:
            reason = last_error.removeprefix("error: ") or f"exit code {code}"
            raise StageFailed(f"stage {stage} failed: {reason}")
