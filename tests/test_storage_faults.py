"""Storage faults: a flaky S3 (503s, dropped connections) costs retries, never data; a dead one fails in one line.

The faults come from `fault_proxy.FaultProxy`, a real HTTP proxy in front of the moto server:
s3fs/botocore talk HTTP to it exactly as to S3.
"""

from __future__ import annotations

import uuid

import pytest
from conftest import verify_committed
from fault_proxy import FaultProxy
from test_rollouts import make_columns

from storage.checkpoints import commit_checkpoint, latest_committed_step, restore_latest
from storage.location import Location, StorageError
from storage.rollouts import read_rollouts, write_rollouts


@pytest.fixture
def flaky_root(s3_endpoint):
    """A fresh bucket behind a proxy that fails 20% of requests with 503 and drops 10% of connections."""
    proxy = FaultProxy(s3_endpoint, fail_rate=0.2, drop_rate=0.1, seed=1).start()
    bucket = f"flaky-{uuid.uuid4().hex[:12]}"
    Location(f"s3://{bucket}", endpoint_url=s3_endpoint).fs.mkdir(bucket)
    yield proxy, Location(f"s3://{bucket}/runs", endpoint_url=proxy.url)
    proxy.stop()


def stage_files(folder, files: dict[str, bytes]):
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_every_operation_survives_a_flaky_store(flaky_root, tmp_path):
    proxy, root = flaky_root
    # objects: write, read, list, remove
    for i in range(10):
        (root / "objects" / f"o{i}.bin").write_bytes(bytes([i]) * 1000)
    assert [(root / "objects" / f"o{i}.bin").read_bytes() for i in range(10)] == [
        bytes([i]) * 1000 for i in range(10)
    ]
    assert (root / "objects").list_names() == [f"o{i}.bin" for i in range(10)]
    (root / "objects" / "o0.bin").remove()
    assert not (root / "objects" / "o0.bin").exists()
    # a checkpoint through the commit protocol, restored and verified
    files = {
        "model.safetensors": b"w" * 300_000,
        "optim/rank_0.pt": b"o" * 100_000,
        "trainer_state.json": b"{}",
    }
    commit_checkpoint(stage_files(tmp_path / "staged", files), root / "checkpoints", 5)
    step, folder = restore_latest(root / "checkpoints", tmp_path / "restored")
    assert step == 5 and {n: (folder / n).read_bytes() for n in files} == files
    # rollouts
    columns = make_columns(step=1, rank=0, n=8)
    write_rollouts(root / "rollouts" / "step=000001" / "part-00000.parquet", columns)
    assert read_rollouts(root / "rollouts").num_rows == 8
    # the faults did happen (seeded: the same every run)
    assert proxy.counts["failed"] >= 5 and proxy.counts["dropped"] >= 3, proxy.counts


def test_a_permanently_failing_upload_fails_in_one_line_and_keeps_the_last_commit(
    s3_endpoint, tmp_path, monkeypatch
):
    monkeypatch.setattr("storage.location.RETRY_ATTEMPTS", 3)
    proxy = FaultProxy(s3_endpoint).start()
    bucket = f"dead-{uuid.uuid4().hex[:12]}"
    Location(f"s3://{bucket}", endpoint_url=s3_endpoint).fs.mkdir(bucket)
    checkpoints = Location(f"s3://{bucket}/ckpt", endpoint_url=proxy.url)
    try:
        commit_checkpoint(stage_files(tmp_path / "one", {"w.bin": b"1" * 1000}), checkpoints, 1)
        proxy.fail_always(lambda method, path: method == "PUT" and "step_000002" in path)
        with pytest.raises(StorageError) as failure:
            commit_checkpoint(stage_files(tmp_path / "two", {"w.bin": b"2" * 1000}), checkpoints, 2)
    finally:
        proxy.stop()
    message = str(failure.value)
    assert "\n" not in message and "upload" in message and "step_000002" in message
    assert "failed after 3 attempts" in message and "reduce your request rate" in message, message
    direct = Location(f"s3://{bucket}/ckpt", endpoint_url=s3_endpoint)
    assert latest_committed_step(direct) == 1
    assert restore_latest(direct, tmp_path / "back")[0] == 1


def test_missing_credentials_fail_at_once_in_one_line(s3_endpoint, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import fsspec

    fsspec.config.conf.clear()
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()
    with pytest.raises(StorageError, match="no credentials for s3://"):
        Location("s3://nobody/x", endpoint_url=s3_endpoint).read_bytes()
    S3FileSystem.clear_instance_cache()


def test_a_stage_completes_on_a_flaky_store(flaky_root):
    """A whole SFT stage (checkpoints, metrics, export, manifest) through the faulty proxy, in its own process."""
    import subprocess
    import sys
    from pathlib import Path

    from storage.checkpoints import committed_steps
    from storage.layout import RunLayout
    from storage.manifests import read_manifest

    proxy, root = flaky_root
    before = dict(proxy.counts)
    overrides = [
        "wandb.mode=disabled", "task.train_size=64", "task.heldout_size=8", "generation.max_new_tokens=16",
        "sft.steps=4", "sft.save_every=2", "sft.batch_size=8", "sft.optim.micro_batch_size=8", f"storage.endpoint_url={proxy.url}",
    ]  # fmt: skip
    rlpipe = str(Path(sys.executable).parent / "rlpipe")
    proc = subprocess.run(
        [rlpipe, "stage", "sft", "--run-id", "flaky", "--storage", root.uri,
         *[arg for item in overrides for arg in ("--set", item)]],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    layout = RunLayout(root, "flaky")
    assert read_manifest(layout.manifest("sft")) is not None
    assert committed_steps(layout.checkpoints("sft")) == [2, 4]
    for step in (2, 4):
        verify_committed(layout.checkpoints("sft"), step)
    assert proxy.counts["failed"] - before.get("failed", 0) >= 5, proxy.counts  # the faults hit the stage
    assert proxy.counts["dropped"] - before.get("dropped", 0) >= 2, proxy.counts
