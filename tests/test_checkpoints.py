"""The checkpoint commit protocol on both backends: round trip, crash (SIGKILL), corruption, retention."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import verify_committed

from storage.checkpoints import (
    COMMITTED,
    LATEST,
    CheckpointError,
    CorruptCheckpointError,
    commit_checkpoint,
    committed_steps,
    download_checkpoint,
    latest_committed_step,
    read_commit_record,
    restore_latest,
)
from storage.location import Location

REPO = Path(__file__).resolve().parents[1]


def stage(local_dir: Path, seed: int, files: dict[str, int] | None = None) -> dict[str, bytes]:
    """Write seeded random files (relpath -> size) under `local_dir`; return their bytes."""
    rng = random.Random(seed)
    files = files or {
        "model.safetensors": 3000,
        "rank_0/optim.pt": 1500,
        "rank_1/optim.pt": 1500,
        "trainer_state.json": 0,
    }
    contents = {}
    for relpath, size in files.items():
        data = rng.randbytes(size) if size else json.dumps({"seed": seed}).encode()
        (local_dir / relpath).parent.mkdir(parents=True, exist_ok=True)
        (local_dir / relpath).write_bytes(data)
        contents[relpath] = data
    return contents


def commit(tmp_path: Path, checkpoints, step: int, seed: int | None = None, **kwargs) -> dict[str, bytes]:
    local = tmp_path / f"staged-{step}-{seed}"
    contents = stage(local, seed if seed is not None else step)
    commit_checkpoint(local, checkpoints, step, **kwargs)
    return contents


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def ckpts(storage_root):
    return storage_root / "run-1" / "ppo" / "checkpoints"


def test_commit_list_latest_download_round_trip(ckpts, tmp_path):
    assert committed_steps(ckpts) == [] and latest_committed_step(ckpts) is None
    first = commit(tmp_path, ckpts, 20)
    second = commit(tmp_path, ckpts, 40)
    assert first != second

    assert committed_steps(ckpts) == [20, 40]
    assert (ckpts / LATEST).read_text() == "step_000040"
    assert latest_committed_step(ckpts) == 40
    assert sorted(ckpts.list_names()) == [LATEST, "step_000020", "step_000040"]
    assert (ckpts / "step_000040").walk_files() == sorted([*second, COMMITTED])

    record = read_commit_record(ckpts, 40)
    assert record["step"] == 40 and record["created"].endswith("+00:00")
    assert record["files"]["rank_0/optim.pt"]["size"] == 1500
    assert set(record["files"]) == set(second)
    verify_committed(ckpts, 40)

    out = download_checkpoint(ckpts, 20, tmp_path / "restored")
    assert out == tmp_path / "restored"
    assert read_tree(out) == first  # byte-identical, nested paths included, no COMMITTED copied


def test_folder_without_committed_is_ignored(ckpts, tmp_path):
    commit(tmp_path, ckpts, 1)
    (ckpts / "step_000002" / "model.safetensors").write_bytes(b"half an upload")
    (ckpts / "not_a_step").write_text("x")
    assert committed_steps(ckpts) == [1]
    assert latest_committed_step(ckpts) == 1
    with pytest.raises(CheckpointError, match="step_000002 is not committed"):
        read_commit_record(ckpts, 2)
    assert restore_latest(ckpts, tmp_path / "resume")[0] == 1


def test_latest_pointer_missing_or_stale_falls_back_to_listing(ckpts, tmp_path, caplog):
    commit(tmp_path, ckpts, 1)
    commit(tmp_path, ckpts, 2)
    (ckpts / LATEST).remove()
    assert latest_committed_step(ckpts) == 2

    (ckpts / LATEST).write_text("step_000009")  # names a folder that does not exist
    assert latest_committed_step(ckpts) == 2
    (ckpts / LATEST).write_bytes(b"\xff\xfe garbage")
    assert latest_committed_step(ckpts) == 2

    (ckpts / LATEST).write_text("step_000001")  # an older committed step: the pointer wins
    assert latest_committed_step(ckpts) == 1

    (ckpts / "step_000003" / "model.safetensors").write_bytes(b"partial")
    (ckpts / LATEST).write_text("step_000003")  # names an uncommitted folder
    with caplog.at_level(logging.WARNING, logger="storage.checkpoints"):
        assert latest_committed_step(ckpts) == 2
    assert "step_000002" in caplog.text

    (ckpts / "step_000002" / COMMITTED).remove()  # the step it names was de-committed
    (ckpts / LATEST).write_text("step_000002")
    assert latest_committed_step(ckpts) == 1


def test_retention_keeps_newest_and_recommit_is_consistent(ckpts, tmp_path):
    for step in (1, 2, 3, 4):
        commit(tmp_path, ckpts, step, keep_last=2)
    assert committed_steps(ckpts) == [3, 4]
    assert sorted(ckpts.list_names()) == [LATEST, "step_000003", "step_000004"]

    # Re-commit step 4 with different files: old files go, the record matches the new ones.
    local = tmp_path / "recommit"
    new = stage(local, seed=99, files={"model.safetensors": 700, "rank_0/optim.pt": 300})
    commit_checkpoint(local, ckpts, 4, keep_last=2)
    assert committed_steps(ckpts) == [3, 4] and latest_committed_step(ckpts) == 4
    assert (ckpts / "step_000004").walk_files() == sorted([*new, COMMITTED])
    assert set(read_commit_record(ckpts, 4)["files"]) == set(new)
    verify_committed(ckpts, 4)
    assert read_tree(download_checkpoint(ckpts, 4, tmp_path / "dl")) == new

    # keep_last=1 never removes the one just committed.
    commit(tmp_path, ckpts, 5, keep_last=1)
    assert committed_steps(ckpts) == [5] and latest_committed_step(ckpts) == 5
    with pytest.raises(ValueError):
        commit(tmp_path, ckpts, 6, keep_last=0)


def test_recommit_older_step_moves_latest_and_leaves_newer_alone(ckpts, tmp_path):
    # A run resumed from step 2 after step 3 was committed: `latest` names what was committed last.
    for step in (1, 2, 3):
        commit(tmp_path, ckpts, step)
    commit(tmp_path, ckpts, 2, seed=7, keep_last=1)
    assert latest_committed_step(ckpts) == 2
    assert committed_steps(ckpts) == [2, 3]  # step 1 pruned; step 3 is the caller's to judge


def test_uncommitted_leftovers_older_than_newest_are_removed(ckpts, tmp_path):
    commit(tmp_path, ckpts, 1)
    (ckpts / "step_000002" / "rank_0" / "optim.pt").write_bytes(b"crashed upload")
    (ckpts / "step_000009" / "model.safetensors").write_bytes(b"newer: not ours to judge")
    commit(tmp_path, ckpts, 3)
    assert sorted(ckpts.list_names()) == [LATEST, "step_000001", "step_000003", "step_000009"]
    assert committed_steps(ckpts) == [1, 3]


# A child process commits step 2 of many files, slowly (one upload at a time), until killed.
_CHILD = """
import sys
from storage.checkpoints import commit_checkpoint
from storage.location import Location
uri, endpoint, local_dir = sys.argv[1:]
commit_checkpoint(local_dir, Location(uri, endpoint or None), 2, max_workers=1)
"""


def test_sigkill_during_upload_leaves_previous_checkpoint_committed(ckpts, tmp_path):
    commit(tmp_path, ckpts, 1)
    big = tmp_path / "big"
    stage(big, seed=2, files={f"rank_{i % 4}/shard_{i:03d}.safetensors": 1_500_000 for i in range(40)})
    step2 = ckpts / "step_000002"

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", _CHILD, ckpts.uri, ckpts.endpoint_url or "", str(big)]
    child = subprocess.Popen(args, env=env, cwd=REPO, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any(f.endswith(".safetensors") for f in step2.walk_files()):  # one whole shard
            if child.poll() is not None:
                pytest.fail(
                    f"child exited ({child.returncode}) before any shard of step 2 appeared: "
                    f"{child.stderr.read().decode()[-2000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail("no shard of step 2 appeared within 60 s")
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL, (
        "the child finished before it was killed: stage more or larger files"
    )

    uploaded = step2.walk_files()
    assert uploaded and COMMITTED not in uploaded
    assert len([f for f in uploaded if f.endswith(".safetensors")]) < 40
    assert committed_steps(ckpts) == [1]
    assert (ckpts / LATEST).read_text() == "step_000001"
    assert latest_committed_step(ckpts) == 1
    verify_committed(ckpts, 1)

    # The next commit removes the crashed upload.
    commit(tmp_path, ckpts, 3)
    assert committed_steps(ckpts) == [1, 3] and not step2.exists()


def fail_on(monkeypatch, method: str, suffix: str, after: int = 0) -> None:
    """Make `Location.<method>` raise for URIs ending in `suffix`, after `after` successful calls: a crash."""
    original, calls = getattr(Location, method), []

    def crashing(self, *args):
        if self.uri.endswith(suffix):
            calls.append(self.uri)
            if len(calls) > after:
                raise OSError(f"simulated crash writing {self.uri}")
        return original(self, *args)

    monkeypatch.setattr(Location, method, crashing)


def test_crash_while_recommitting_never_leaves_old_marker_over_new_files(ckpts, tmp_path, monkeypatch):
    commit(tmp_path, ckpts, 1)
    commit(tmp_path, ckpts, 2)
    with monkeypatch.context() as m:
        fail_on(m, "upload_file", ".pt", after=1)  # rank_0 uploaded, rank_1 crashes
        with pytest.raises(OSError, match="simulated crash"):
            commit(tmp_path, ckpts, 2, seed=5)
    assert committed_steps(ckpts) == [1]
    assert (ckpts / LATEST).read_text() == "step_000002"  # stale pointer, detected by readers
    assert latest_committed_step(ckpts) == 1
    commit(tmp_path, ckpts, 2, seed=5)  # the retry succeeds
    assert committed_steps(ckpts) == [1, 2] and latest_committed_step(ckpts) == 2
    verify_committed(ckpts, 2)


def test_crash_before_marker_leaves_latest_untouched(ckpts, tmp_path, monkeypatch):
    commit(tmp_path, ckpts, 1)
    fail_on(monkeypatch, "write_text", COMMITTED)
    with pytest.raises(OSError, match="simulated crash"):
        commit(tmp_path, ckpts, 2)
    assert (ckpts / "step_000002").walk_files()  # every file uploaded...
    assert committed_steps(ckpts) == [1]  # ...but without the marker it does not exist
    assert (ckpts / LATEST).read_text() == "step_000001"


def corrupt(ckpts, step: int, relpath: str, how: str) -> None:
    loc = ckpts / f"step_{step:06d}" / relpath
    data = loc.read_bytes()
    if how == "flip":  # same size, different bytes: only the hash can tell
        loc.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    elif how == "truncate":
        loc.write_bytes(data[:-1])
    else:
        loc.remove()


@pytest.mark.parametrize(
    "how, message",
    [
        ("flip", "rank_0/optim.pt sha256"),
        ("truncate", "rank_0/optim.pt has 1499 bytes"),
        ("delete", "rank_0/optim.pt is missing"),
    ],
)
def test_corrupt_shard_is_detected_and_resume_falls_back(ckpts, tmp_path, caplog, how, message):
    first = commit(tmp_path, ckpts, 1)
    commit(tmp_path, ckpts, 2)
    corrupt(ckpts, 2, "rank_0/optim.pt", how)

    with pytest.raises(CorruptCheckpointError, match=f"step_000002: file {message}"):
        verify_committed(ckpts, 2)
    with pytest.raises(CorruptCheckpointError, match=f"step_000002: file {message}"):
        download_checkpoint(ckpts, 2, tmp_path / "dl")
    assert not (tmp_path / "dl" / "rank_0" / "optim.pt").exists()  # bad local copy removed
    verify_committed(ckpts, 1)

    with caplog.at_level(logging.WARNING, logger="storage.checkpoints"):
        step, path = restore_latest(ckpts, tmp_path / "resume")
    assert step == 1 and path == tmp_path / "resume" / "step_000001"
    assert read_tree(path) == first
    assert not (tmp_path / "resume" / "step_000002").exists()
    assert "step_000002 is corrupt" in caplog.text and "rank_0/optim.pt" in caplog.text

    corrupt(ckpts, 1, "model.safetensors", "flip")
    with pytest.raises(CorruptCheckpointError, match=r"no intact committed checkpoint .* \[2, 1\]"):
        restore_latest(ckpts, tmp_path / "resume2")


def test_restore_with_nothing_committed_returns_none(ckpts, tmp_path):
    assert restore_latest(ckpts, tmp_path / "resume") is None


def test_unreadable_marker_and_bad_paths_are_corrupt(ckpts, tmp_path):
    commit(tmp_path, ckpts, 1)
    marker = ckpts / "step_000001" / COMMITTED
    record = json.loads(marker.read_text())

    marker.write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="COMMITTED"):
        verify_committed(ckpts, 1)

    record["files"]["../../escape"] = {"sha256": "0" * 64, "size": 1}
    marker.write_text(json.dumps(record))
    with pytest.raises(CorruptCheckpointError, match="leaves the folder"):
        download_checkpoint(ckpts, 1, tmp_path / "dl")
    assert not (tmp_path / "escape").exists()


def test_commit_refuses_empty_dir_and_reserved_name(local_root, tmp_path):
    ckpts = local_root / "checkpoints"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no files"):
        commit_checkpoint(tmp_path / "empty", ckpts, 1)
    stage(tmp_path / "bad", seed=0, files={COMMITTED: 10})
    with pytest.raises(CheckpointError, match="reserved"):
        commit_checkpoint(tmp_path / "bad", ckpts, 1)
    assert committed_steps(ckpts) == []
