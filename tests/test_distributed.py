"""A build lock left by a killed process must not hang every later stage."""

from __future__ import annotations

import os
import time

from stages.distributed import clear_stale_build_lock, shm_op_build_dir


def age(path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_stale_lock_of_a_finished_build_is_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    age(lock, 120)
    library = tmp_path / "deepspeed_shm_comm.so"
    library.write_bytes(b"\x7fELF")  # written after the lock was taken: that build finished
    age(library, 100)
    assert clear_stale_build_lock(tmp_path) and not lock.exists()


def test_lock_of_a_rebuild_over_an_older_library_is_kept(tmp_path):
    library = tmp_path / "deepspeed_shm_comm.so"
    library.write_bytes(b"\x7fELF")
    age(library, 3600)  # from an earlier build
    lock = tmp_path / "lock"
    lock.touch()
    age(lock, 120)  # a rebuild that is still running
    assert not clear_stale_build_lock(tmp_path) and lock.exists()


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
