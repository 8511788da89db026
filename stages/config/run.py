"""Run-level sections: where a run is stored, how it is tracked, what it computes with (none changes results)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from stages.config.section import Section
from storage.location import Location, resolve_root


class StorageConfig(Section):
    root: str | None = Field(
        None,
        description="Storage root URI (local path, s3://bucket/prefix, any fsspec URI). "
        "Default: $RLPIPE_STORAGE, else ./runs. Credentials never go here: they come from the "
        "AWS credential chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profile, instance role).",
    )
    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, R2, a local test server). Default: $AWS_ENDPOINT_URL.",
    )

    def root_location(self) -> Location:
        """The storage root as a Location (explicit root, else $RLPIPE_STORAGE, else ./runs)."""
        return Location(resolve_root(self.root), self.endpoint_url)


class WandbConfig(Section):
    project: str = Field("rlpipe", description="wandb project name.")
    entity: str | None = Field(
        None, description="wandb entity (team); default: the API key's default entity."
    )
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline",
        description="offline writes runs locally (sync later with `wandb sync`); online needs WANDB_API_KEY "
        "in the environment; disabled logs to metrics.jsonl only.",
    )


class RuntimeConfig(Section):
    threads: Literal["auto", "torch"] | int = Field(
        "auto",
        description="CPU threads of each stage process and rank. auto: the CPUs the process may use "
        "(affinity mask, cgroup CPU quota) divided by the processes sharing them (the ranks of its "
        "launch, every other rlpipe process on the machine), followed as they start and end. A "
        "number fixes it (CPU results are bit-identical only at the same count). torch: torch's "
        "own default, every process takes all the machine's cores (the behaviour before the "
        "budget, kept to measure it: `rlpipe bench contention`).",
    )

    @field_validator("threads", mode="before")
    @classmethod
    def _auto_or_count(cls, value: object) -> object:
        if value in ("auto", "torch") or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            return value
        raise ValueError("must be auto, torch or a number of threads >= 1")
