"""Stage manifests and the pipeline record: what makes a run resumable and auditable.

`{root}/{run_id}/{stage}/manifest.json` is written LAST, once everything else of the stage is
in storage, so its presence means "this stage completed". It pins the config hash, the input
URIs together with the sha256 of the manifest of the stage that produced each input, the
output URIs, a metrics summary and package versions. `is_stage_complete` compares all of that,
so re-running an upstream stage with a different result invalidates everything downstream.

`{root}/{run_id}/pipeline.json` holds the resolved config of the run (redacted), when it was
created and its stage list. Everything written here goes through `storage.secrets.redact`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from storage.layout import STAGE_NAMES, RunLayout
from storage.location import Location
from storage.metrics import json_value
from storage.secrets import redact

# Distributions whose versions go into every manifest (metadata only: nothing is imported).
VERSIONED_PACKAGES = (
    "rlpipe",
    "torch",
    "transformers",
    "deepspeed",
    "vllm",
    "prefect",
    "pyarrow",
    "datasets",
    "tokenizers",
    "safetensors",
    "numpy",
    "pydantic",
    "fsspec",
    "s3fs",
    "math-verify",
)


class ManifestError(ValueError):
    """A manifest or pipeline record exists but cannot be used (message is one line, names the URI)."""


def utc_now() -> str:
    """An ISO-8601 UTC timestamp, second precision: `2025-01-31T12:00:00+00:00`."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


class InputRef(BaseModel):
    """One input of a stage: its URI and the sha256 of the manifest of the stage that produced it
    (None for an external input such as a Hub model or dataset)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    manifest_sha256: str | None = None


class StageManifest(BaseModel):
    """The record of one completed stage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str
    stage: str
    # A manifest is written only when the stage completed; the field leaves room for other states.
    status: Literal["complete"] = "complete"
    config_hash: str
    inputs: dict[str, InputRef] = {}
    outputs: dict[str, str] = {}  # name -> URI
    metrics: dict[str, float | int | str | None] = {}  # summary; non-finite floats as "nan"/"inf"
    versions: dict[str, str] = {}  # package -> version, see `package_versions`
    started_at: str
    finished_at: str

    @field_validator("metrics", mode="before")
    @classmethod
    def _json_metrics(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): json_value(v, str(k)) for k, v in value.items()}
        return value


def package_versions() -> dict[str, str]:
    """Python and the installed versions of `VERSIONED_PACKAGES`; missing packages are left out."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _dump_json(obj: Any) -> bytes:
    """Redacted, sorted, indented JSON: stable bytes, so equal content hashes equally."""
    return (json.dumps(redact(obj), sort_keys=True, indent=2, allow_nan=False) + "\n").encode("utf-8")


def _load_json(location: Location, what: str) -> Any | None:
    try:
        data = location.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{what} at {location.uri} is not valid JSON: {err}") from None


def write_manifest(target: RunLayout | Location, manifest: StageManifest) -> Location:
    """Write a stage's manifest (redacted, atomically) and return where it went.

    This must be the LAST write of a stage: its presence is what marks the stage complete.
    `target` is the run layout (the path comes from `manifest.stage`) or an explicit location.
    """
    if isinstance(target, RunLayout):
        if target.run_id != manifest.run_id:
            raise ValueError(
                f"manifest of run {manifest.run_id!r} cannot be written into run {target.run_id!r}"
            )
        location = target.manifest(manifest.stage)
    else:
        location = target
    location.write_bytes(_dump_json(manifest.model_dump(mode="json")))
    return location


def read_manifest(location: Location) -> StageManifest | None:
    """The manifest at `location`, None if there is none; ManifestError if it is unreadable."""
    data = _load_json(location, "manifest")
    if data is None:
        return None
    try:
        return StageManifest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ManifestError(
            f"manifest at {location.uri} is invalid ({err.error_count()} errors; first: {where}: {first['msg']})"
        ) from None


def manifest_sha256(location: Location) -> str | None:
    """sha256 (hex) of the manifest's stored bytes, None if there is no manifest."""
    try:
        return hashlib.sha256(location.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def input_ref(uri: str, manifest_location: Location | None) -> InputRef:
    """Reference to an input, pinned to the manifest of the stage that produced it.

    `manifest_location=None` for external inputs (Hub models, datasets). Given a location with
    no manifest, raise: consuming the output of a stage that did not complete is a bug.
    """
    if manifest_location is None:
        return InputRef(uri=uri)
    digest = manifest_sha256(manifest_location)
    if digest is None:
        raise ManifestError(
            f"input {uri} has no manifest at {manifest_location.uri}: its stage has not completed"
        )
    return InputRef(uri=uri, manifest_sha256=digest)


def is_stage_complete(manifest_location: Location, config_hash: str, inputs: dict[str, InputRef]) -> bool:
    """True only if the stage completed with this config hash and exactly these inputs (URIs and
    upstream manifest hashes). A missing manifest is False; an unreadable one raises ManifestError."""
    manifest = read_manifest(manifest_location)
    # The stored inputs went through `redact` (a URI with a password in it): compare like with like.
    expected = {name: InputRef.model_validate(redact(ref.model_dump())) for name, ref in inputs.items()}
    return (
        manifest is not None
        and manifest.status == "complete"
        and manifest.config_hash == config_hash
        and manifest.inputs == expected
    )


def stage_status(layout: RunLayout, stage: str) -> str:
    """One of "complete" (manifest present), "partial" (files, no manifest: crashed or running), "-"."""
    if layout.manifest(stage).exists():
        return "complete"
    return "partial" if layout.stage(stage).list_names() else "-"


def write_pipeline_record(
    layout: RunLayout,
    config: dict,
    stages: Sequence[str] = STAGE_NAMES,
    created_at: str | None = None,
    config_hash: str | None = None,
) -> Location:
    """Write `{run_id}/pipeline.json` (redacted, atomically): run id, resolved config, stage list,
    creation time (kept from an existing record unless given) and package versions."""
    if created_at is None:
        existing = read_pipeline_record(layout)
        created_at = existing.get("created_at") if existing else None
    record = {
        "run_id": layout.run_id,
        "created_at": created_at or utc_now(),
        "updated_at": utc_now(),
        "stages": list(stages),
        "config": config,
        "config_hash": config_hash,
        "versions": package_versions(),
    }
    layout.pipeline_config.write_bytes(_dump_json(record))
    return layout.pipeline_config


def read_pipeline_record(layout: RunLayout) -> dict | None:
    """The pipeline record of a run, None if there is none; ManifestError if it is not a JSON object."""
    record = _load_json(layout.pipeline_config, "pipeline record")
    if record is not None and not isinstance(record, dict):
        raise ManifestError(f"pipeline record at {layout.pipeline_config.uri} is not a JSON object")
    return record
