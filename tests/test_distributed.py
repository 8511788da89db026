"""A build lock left by a killed process must not hang every later stage."""

from __future__ import annotations

import os
import time

from stages.distributed import clear_stale_build_lock, shm_op_build_dir


def age(path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_stale_lock_of_a_finished_build_is_removed(tmp_path):
    (tmp_path / "deepspeed_shm_comm.so").write_bytes(b"\x7fELF")
    lock = tmp_path / "lock"
    lock.touch()
    assert not clear_stale_build_lock(tmp_path)  # fresh: a build may be finishing right now
    age(lock, 120)
    assert clear_stale_build_lock(tmp_path) and not lock.exists()


def test_lock_of_an_unfinished_build_is_kept_until_far_too_old(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    age(lock, 300)
    assert not clear_stale_build_lock(tmp_path) and lock.exists()  # builds take ~1 min: maybe still running
    age(lock, 1000)
    assert clear_stale_build_lock(tmp_path) and not lock.exists()


def test_no_lock_is_fine(tmp_path):
    assert not clear_stale_build_lock(tmp_path)


def test_build_dir_honours_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert str(shm_op_build_dir()).startswith(str(tmp_path))
