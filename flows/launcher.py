"""Start a stage as a subprocess, stream its output line by line, never leave ranks behind.

The GPU work runs in `python -m stages.<name>` (one process) or under the DeepSpeed launcher
(`deepspeed --num_gpus N --module stages.<name>`, N ranks; on a machine without CUDA the ranks
run on CPU with `DS_ACCELERATOR=cpu`). The child starts in its own session, so the whole
process group (launcher + every rank) can be killed at once on cancel, timeout or a crash of
the caller: no orphaned rank keeps holding GPU memory.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from stages.config.pipeline import PipelineConfig
from stages.lifecycle.entry import USER_ERROR_EXIT
from stages.runtime.distributed import free_port
from storage.secrets import redact_text

# A tqdm bar line: "ppo:  12%|##        | 96/800 [00:10<01:30, ...]" (universal newlines turn its \r into lines).
_PROGRESS = re.compile(r"^(?P<stage>[\w-]+):\s+\d+%\|.*\|\s*(?P<done>\d+)/(?P<total>\d+)")
# Any progress bar (tqdm, transformers' "Loading weights:  50%|#####     | 13/26 ...").
_ANY_BAR = re.compile(r"\d+%\|")
# Lines a non-zero rank prints with DeepSpeed's/torch's prefix: kept out of the orchestrator's log.
_OTHER_RANK = re.compile(r"^\[rank(?!0\])\d+\]")


def progress_of(line: str) -> tuple[str, int, int] | None:
    """(stage, done, total) when `line` is a stage's progress-bar line."""
    match = _PROGRESS.match(line)
    if match is None:
        return None
    return match["stage"], int(match["done"]), int(match["total"])


def is_error_line(line: str) -> bool:
    return line.startswith("error:") or "Error" in line.split(":", 1)[0]


class LineThrottle:
    """Decides which output lines reach a log sink that must not be flooded (the Prefect API).

    Progress-bar redraws pass at most once per `progress_every_s` (all bars together;
    a bar's 100% line always passes); other lines at most
    `burst` per `window_s` (the rest are counted and reported once lines flow again); error lines
    always pass; blank lines and lines of ranks other than 0 are dropped.
    """

    def __init__(self, progress_every_s: float = 10.0, burst: int = 200, window_s: float = 10.0):
        self.progress_every_s, self.burst, self.window_s = progress_every_s, burst, window_s
        self._last_progress = -float("inf")
        self._window_start = -float("inf")
        self._in_window = 0
        self.suppressed = 0

    def admit(self, line: str, now: float) -> list[str]:
        """The lines to log now for this output line (none, the line, or a note and the line)."""
        if is_error_line(line):
            return self._with_note(line)
        if not line.strip() or _OTHER_RANK.match(line):
            return []
        if _ANY_BAR.search(line):
            if now - self._last_progress < self.progress_every_s and "100%|" not in line:
                return []
            self._last_progress = now
            return self._with_note(line)
        if now - self._window_start >= self.window_s:
            self._window_start, self._in_window = now, 0
        self._in_window += 1
        if self._in_window > self.burst:
            self.suppressed += 1
            return []
        return self._with_note(line)

    def _with_note(self, line: str) -> list[str]:
        if not self.suppressed:
            return [line]
        note = f"({self.suppressed} lines not logged here: rate limit)"
        self.suppressed = 0
        return [note, line]


class StageFailed(RuntimeError):
    """The stage process exited non-zero (message: its last error line)."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode

    @property
    def retriable(self) -> bool:
        """A crash or a kill may pass on a rerun (which resumes); bad input will not."""
        return self.returncode != USER_ERROR_EXIT


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@dataclass(frozen=True)
class Nodes:
    """This node's place in a launch over several nodes: the same command runs on every node with
    its own `rank` (DeepSpeed's no-SSH mode), all meeting at `master_addr:master_port`."""

    count: int
    rank: int
    master_addr: str
    master_port: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.count:
            raise ValueError(
                f"node rank {self.rank} is not one of the {self.count} nodes (0..{self.count - 1})"
            )


@dataclass(frozen=True)
class StageLaunch:
    """How a stage is started: the command, its extra environment, and where several ranks meet."""

    command: list[str]
    env: dict[str, str]
    rendezvous: tuple[str, int] | None = None  # (master address, port) when ranks are launched


def stage_command(
    stage: str,
    config_path: str,
    nproc: int,
    force: bool,
    stage_args: list[str] | None = None,
    nodes: Nodes | None = None,
    workdir: str | None = None,
) -> StageLaunch:
    """How to run `stage` with `nproc` ranks (per node, with `nodes`); `stage_args` are the stage's
    own options (e.g. evaluate's `--checkpoint URI --label L`). Several nodes need `workdir`, where
    the launch's hostfile is written."""
    args = ["--config", config_path] + (["--force"] if force else []) + list(stage_args or [])
    env: dict[str, str] = {"PYTHONUNBUFFERED": "1"}
    if not _cuda_available():
        env["DS_ACCELERATOR"] = "cpu"
    if nproc <= 1 and nodes is None:
        return StageLaunch([sys.executable, "-m", f"stages.{stage}", *args], env)
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc)]
    if nodes is None:
        rendezvous = ("127.0.0.1", free_port())  # the DeepSpeed launcher's default address
        launcher += ["--master_port", str(rendezvous[1])]
    else:
        rendezvous = (nodes.master_addr, nodes.master_port)
        # One line per node: the names only count the nodes and their ranks (no SSH is used).
        hostfile = Path(workdir or tempfile.gettempdir()) / "hostfile"
        hostfile.write_text("".join(f"node-{i} slots={nproc}\n" for i in range(nodes.count)))
        launcher += ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(nodes.rank)]
        launcher += ["--master_addr", nodes.master_addr, "--master_port", str(nodes.master_port)]
    return StageLaunch([*launcher, "--module", f"stages.{stage}", *args], env, rendezvous)


SHM_DIR = Path("/dev/shm")


def shm_buffers(rendezvous: tuple[str, int]) -> list[Path]:
    """The shared-memory segments DeepSpeed's CPU all-reduce (its `shm` op) made for a launch.

    Each rank creates `deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}` (about 69 MB) and no
    DeepSpeed release unlinks it: every multi-rank CPU run would otherwise leave them in RAM (tmpfs)
    until the machine reboots - 15 GB after a day of tests here, until a stage was OOM-killed.
    """
    addr, port = rendezvous
    return sorted(SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*"))


def remove_shm_buffers(rendezvous: tuple[str, int]) -> None:
    """Unlink this launch's segments on this node, once none of its ranks is alive."""
    for path in shm_buffers(rendezvous):
        path.unlink(missing_ok=True)


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


def _output_lines(proc: subprocess.Popen, deadline: float | None) -> Iterator[str]:
    """The child's output lines until it closes its output or `deadline` (monotonic) passes."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw)
        lines.put(None)

    threading.Thread(target=pump, daemon=True, name="stage-output").start()
    while deadline is None or time.monotonic() <= deadline:
        try:
            raw = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if raw is None:
            return
        yield raw


def run_stage_process(
    stage: str,
    config: PipelineConfig,
    *,
    nproc: int = 1,
    force: bool = False,
    log_line: Callable[[str], None] = print,
    timeout_s: float | None = None,
    cwd: str | None = None,
    stage_args: list[str] | None = None,
    nodes: Nodes | None = None,
) -> None:
    """Run one stage to completion; raise StageFailed (its last error line) if it fails.

    `stage_args`: the stage's own options (`stage_command`). Lines are redacted before they reach `log_line`, so a secret printed by a library never
    lands in the orchestrator's logs. The temporary folder is named after the run, so the run's
    processes can be found (`ps`) while it runs.
    """
    with tempfile.TemporaryDirectory(prefix=f"rlpipe-{config.run_id}-{stage}-") as tmp:
        config_path = os.path.join(tmp, "config.json")
        with open(config_path, "w") as f:
            f.write(config.model_dump_json(indent=2))
        launch = stage_command(stage, config_path, nproc, force, stage_args, nodes, tmp)
        proc = subprocess.Popen(
            launch.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,  # its own process group: killable as a whole
            env={**os.environ, **launch.env},
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
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            # Lines arrive through a queue, so the timeout holds for a stage that prints nothing.
            for raw in _output_lines(proc, deadline):
                line = redact_text(raw.rstrip("\n"))
                if is_error_line(line):
                    last_error = line
                log_line(line)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"stage {stage} exceeded its timeout of {timeout_s:.0f} s")
            code = proc.wait()
        finally:
            if proc.poll() is None or _group_alive(proc.pid):
                kill_process_group(proc)
            if launch.rendezvous is not None:
                remove_shm_buffers(launch.rendezvous)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if code != 0:
            died = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            reason = last_error.removeprefix("error: ") or died
            raise StageFailed(f"stage {stage} failed: {reason}", code)
