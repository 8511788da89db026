"""Run-level sections: where a run is stored and how it is tracked (neither changes results)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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
