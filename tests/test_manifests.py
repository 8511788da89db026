"""Stage manifests and the pipeline record, against local storage and the S3 test server."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest

from storage.layout import RunLayout
from storage.manifests import (
    InputRef,
    ManifestError,
    StageManifest,
    input_ref,
    is_stage_complete,
    manifest_sha256,
    package_versions,
    read_manifest,
    read_pipeline_record,
    stage_status,
    write_manifest,
    write_pipeline_record,
)


def make_manifest(layout: RunLayout, stage: str, **overrides) -> StageManifest:
    fields = dict(
        run_id=layout.run_id,
        stage=stage,
        config_hash="cfg-1",
        inputs={},
        outputs={"policy": str(layout.final(stage, "policy"))},
        metrics={"loss": 0.25, "steps": 40, "note": "ok", "missing": None},
        versions={"python": "3.11.0"},
        started_at="2025-01-01T00:00:00+00:00",
        finished_at="2025-01-01T01:00:00+00:00",
    )
    fields.update(overrides)
    return StageManifest(**fields)


def test_round_trip_and_hash(storage_root):
    layout = RunLayout(storage_root, "run-1")
    manifest = make_manifest(
        layout, "ppo", inputs={"sft": InputRef(uri="s3://x/sft/final/policy", manifest_sha256="ab" * 32)}
    )
    location = write_manifest(layout, manifest)
    assert location == layout.manifest("ppo")
    assert read_manifest(location) == manifest
    # Stored as sorted, indented JSON; the hash is that of the stored bytes.
    stored = location.read_bytes()
    assert json.loads(stored)["metrics"] == {"loss": 0.25, "missing": None, "note": "ok", "steps": 40}
    assert stored.startswith(b'{\n  "config_hash": "cfg-1",\n')
    assert manifest_sha256(location) == hashlib.sha256(stored).hexdigest()
    assert manifest_sha256(layout.manifest("sft")) is None
    assert read_manifest(layout.manifest("sft")) is None


def test_write_into_wrong_run_rejected(local_root):
    with pytest.raises(ValueError, match="run-2"):
        write_manifest(RunLayout(local_root, "run-2"), make_manifest(RunLayout(local_root, "run-1"), "sft"))


def test_nonfinite_metrics_kept_visible():
    manifest = StageManifest(
        run_id="r",
        stage="sft",
        config_hash="h",
        metrics={"loss": float("nan"), "kl": float("-inf")},
        started_at="t0",
        finished_at="t1",
    )
    assert manifest.metrics == {"loss": "nan", "kl": "-inf"}


def test_is_stage_complete(storage_root):
    layout = RunLayout(storage_root, "run-1")
    write_manifest(layout, make_manifest(layout, "sft", config_hash="sft-cfg"))
    sft_uri = str(layout.final("sft", "policy"))
    ref = input_ref(sft_uri, layout.manifest("sft"))
    assert ref.manifest_sha256 == manifest_sha256(layout.manifest("sft"))
    inputs = {"policy": ref, "dataset": input_ref("hf://gsm8k", None)}
    ppo = layout.manifest("ppo")

    assert not is_stage_complete(ppo, "ppo-cfg", inputs)  # no manifest yet
    write_manifest(layout, make_manifest(layout, "ppo", config_hash="ppo-cfg", inputs=inputs))
    assert is_stage_complete(ppo, "ppo-cfg", dict(inputs))
    assert not is_stage_complete(ppo, "ppo-cfg-2", inputs)  # config changed
    other_uri = {**inputs, "policy": InputRef(uri=sft_uri + "-v2", manifest_sha256=ref.manifest_sha256)}
    assert not is_stage_complete(ppo, "ppo-cfg", other_uri)  # input moved
    assert not is_stage_complete(ppo, "ppo-cfg", {"policy": ref})  # an input dropped

    # SFT reruns with a different result: its manifest changes, so PPO is no longer complete.
    write_manifest(layout, make_manifest(layout, "sft", config_hash="sft-cfg", metrics={"loss": 0.5}))
    rerun_inputs = {**inputs, "policy": input_ref(sft_uri, layout.manifest("sft"))}
    assert rerun_inputs["policy"].manifest_sha256 != ref.manifest_sha256
    assert not is_stage_complete(ppo, "ppo-cfg", rerun_inputs)


def test_is_stage_complete_with_credentials_in_input_uri(local_root):
    layout = RunLayout(local_root, "run-1")
    inputs = {"data": InputRef(uri="https://u:pw12345@host/data.parquet")}
    write_manifest(layout, make_manifest(layout, "sft", inputs=inputs))
    assert read_manifest(layout.manifest("sft")).inputs["data"].uri == "https://u:***@host/data.parquet"
    assert is_stage_complete(layout.manifest("sft"), "cfg-1", inputs)


def test_input_ref_of_incomplete_stage_raises(storage_root):
    layout = RunLayout(storage_root, "run-1")
    with pytest.raises(ManifestError, match="sft/manifest.json"):
        input_ref("x", layout.manifest("sft"))


def test_planted_secrets_redacted_on_disk(storage_root, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "SENTINEL-wandb-0123456789")
    layout = RunLayout(storage_root, "run-1")
    manifest = make_manifest(
        layout,
        "sft",
        outputs={"policy": "s3://alice:hunter22@minio:9000/b/policy"},
        metrics={"error": "wandb init failed for key SENTINEL-wandb-0123456789", "api_key": "abcdef"},
    )
    write_manifest(layout, manifest)
    stored = layout.manifest("sft").read_text()
    assert "SENTINEL-wandb" not in stored and "hunter22" not in stored and "abcdef" not in stored
    back = read_manifest(layout.manifest("sft"))
    assert back.outputs == {"policy": "s3://alice:***@minio:9000/b/policy"}
    assert back.metrics == {"error": "wandb init failed for key ***", "api_key": "***"}


def test_stage_status(storage_root):
    layout = RunLayout(storage_root, "run-1")
    assert stage_status(layout, "sft") == "-"
    (layout.checkpoints("sft") / "step_000010" / "model.safetensors").write_bytes(b"w")
    assert stage_status(layout, "sft") == "partial"
    write_manifest(layout, make_manifest(layout, "sft"))
    assert stage_status(layout, "sft") == "complete"
    assert stage_status(layout, "ppo") == "-"


def test_corrupt_manifest_names_uri(storage_root):
    layout = RunLayout(storage_root, "run-1")
    location = layout.manifest("sft")
    location.write_text('{"run_id": "run-1", "stage": ')
    with pytest.raises(ManifestError, match=f"{location.uri} is not valid JSON") as err:
        read_manifest(location)
    assert "\n" not in str(err.value)
    with pytest.raises(ManifestError):
        is_stage_complete(location, "h", {})
    location.write_text(json.dumps({"run_id": "run-1", "stage": "sft", "surprise": 1}))
    with pytest.raises(ManifestError, match=f"{location.uri} is invalid") as err:
        read_manifest(location)
    assert "\n" not in str(err.value)


def test_pipeline_record(storage_root, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "SENTINEL-hf-abcdefgh")
    layout = RunLayout(storage_root, "run-1")
    assert read_pipeline_record(layout) is None
    config = {"sft": {"lr": 1e-5, "hf_token": "SENTINEL-hf-abcdefgh"}, "note": "uses SENTINEL-hf-abcdefgh"}
    write_pipeline_record(layout, config, stages=["sft", "ppo"], created_at="2025-01-01T00:00:00+00:00")
    assert "SENTINEL" not in layout.pipeline_config.read_text()
    record = read_pipeline_record(layout)
    assert record["run_id"] == "run-1"
    assert record["stages"] == ["sft", "ppo"]
    assert record["config"] == {"sft": {"lr": 1e-5, "hf_token": "***"}, "note": "uses ***"}
    # Rewriting (a resumed run) keeps the creation time.
    write_pipeline_record(layout, {"sft": {"lr": 2e-5}})
    record = read_pipeline_record(layout)
    assert record["created_at"] == "2025-01-01T00:00:00+00:00"
    assert record["config"] == {"sft": {"lr": 2e-5}}


def test_package_versions_metadata_only():
    versions = package_versions()
    assert versions["python"] == ".".join(str(v) for v in sys.version_info[:3])
    assert "pydantic" in versions and "pyarrow" in versions
    assert "not-a-package" not in versions
