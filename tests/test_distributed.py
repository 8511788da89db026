"""A build lock left by a killed process must not hang every later stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from stages.runtime.distributed import shm_op_build_dir

ROOT = Path(__file__).resolve().parents[1]
INIT = "from stages.runtime import distributed; distributed.init_distributed(); print('INITIALISED')"


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        proc.kill()  # a hung init must not outlive the test (it would hold the load lock)


def start_init() -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    return subprocess.Popen(
        [sys.executable, "-c", INIT],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_baton_left_by_a_killed_loader_does_not_hang_init():
    # What a process killed inside torch's JIT load leaves behind: the bare lock file. Before the
    # fix every later init waited on it forever (CI hung 20 minutes on one).
    build_dir = shm_op_build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "lock").touch()
    proc = start_init()
    out, err = finish(proc, timeout=240)  # a first build compiles the op (~1 min)
    assert proc.returncode == 0 and "INITIALISED" in out, err[-2000:]
    assert not (build_dir / "lock").exists()


def test_concurrent_starts_both_initialise():
    # Two stages starting together: the flock serialises their loads, neither waits on the other's baton.
    procs = [start_init(), start_init()]
    for proc in procs:
        out, err = finish(proc, timeout=240)
        assert proc.returncode == 0 and "INITIALISED" in out, err[-2000:]


def test_build_dir_honours_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert str(shm_op_build_dir()).startswith(str(tmp_path))


def test_the_one_off_op_build_is_announced_and_only_then(tmp_path, monkeypatch, capsys):
    """The first stage on a machine sits ~40 s building DeepSpeed's CPU comm op: it says so, once."""
    from deepspeed.accelerator import get_accelerator

    from stages.runtime.distributed import load_shm_op_exclusively

    builder_class = type(get_accelerator().create_op_builder("ShareMemCommBuilder"))
    monkeypatch.setattr(builder_class, "load", lambda self, verbose=False: None)  # no 40 s build here
    load_shm_op_exclusively(tmp_path)
    assert "building DeepSpeed's CPU communication op" in capsys.readouterr().out
    (tmp_path / "deepspeed_shm_comm.so").write_bytes(b"")  # what a finished build leaves
    load_shm_op_exclusively(tmp_path)
    assert capsys.readouterr().out == ""
