"""The stage contract: what every stage does before and after its own work.

    ctx = begin_stage("sft", config, plan(config), force=force)   # plan: what the result depends on
    if ctx is None: return            # complete for this config hash and these inputs: skipped
    ... resume from the latest committed checkpoint, train, checkpoint every save_every ...
    finish_stage(ctx, outputs={...}, metrics={...})   # the manifest, written last

- A stage is skipped when its manifest says it completed with the same config hash and the same
  inputs (URIs and the hashes of the manifests that produced them). `--force` clears the stage
  and recomputes it from scratch.
- Checkpoints record the stage's config hash; resuming from checkpoints written under another
  config is refused (with a line saying how to start over) instead of silently mixing the two.
- The training stages wrap this in `stages.lifecycle.training_run`; every stage's entry point is
  `stages.lifecycle.entry.stage_main`; the table of stages is `stages.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from stages.config.pipeline import PipelineConfig
from stages.config.section import config_hash
from stages.models.sources import TINY, input_ref_for
from stages.runtime.threads import thread_metrics
from storage.layout import RunLayout
from storage.manifests import (
    InputRef,
    StageManifest,
    is_stage_complete,
    package_versions,
    utc_now,
    write_manifest,
)


class StageError(RuntimeError):
    """A stage cannot run as asked (message is one line)."""


@dataclass(frozen=True)
class StageContext:
    """One run of one stage: where it writes and what it was computed from."""

    stage: str
    config: PipelineConfig
    layout: RunLayout
    config_hash: str
    inputs: dict[str, InputRef]
    started_at: str
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def endpoint_url(self) -> str | None:
        return self.config.storage.endpoint_url


@dataclass(frozen=True)
class StagePlan:
    """What a stage's result depends on: config parts (hashed) and input URIs (with their lineage).

    Every stage defines `plan(config) -> StagePlan` (`stages.registry`), so whether a stage would be
    skipped can be decided without starting it (the orchestrator does, before claiming a GPU).
    """

    semantic: dict[str, Any]
    inputs: dict[str, str]

    @property
    def tiny_hash(self) -> str | None:
        """The tiny model's config hash when an input is the offline tiny model (it has no manifest)."""
        return self.semantic.get("tiny")


def make_plan(
    config: PipelineConfig, semantic: dict[str, BaseModel | Any], inputs: dict[str, str]
) -> StagePlan:
    """A plan whose hash also covers the tiny model's size when an input is `tiny`."""
    tiny = config_hash(config.tiny_model) if TINY in inputs.values() else None
    return StagePlan(semantic={**semantic, "tiny": tiny}, inputs=dict(inputs))


def stage_hash(semantic: dict[str, BaseModel | Any]) -> str:
    """Hash of the config parts a stage's result depends on (sections and plain values)."""
    parts = {
        name: config_hash(part) if isinstance(part, BaseModel) else part for name, part in semantic.items()
    }
    return config_hash(_HashParts(parts=parts))


class _HashParts(BaseModel):
    parts: dict[str, Any]


def clear_stage(layout: RunLayout, stage: str) -> None:
    """Forget a stage's results: manifest first (so a crash here never leaves a false 'complete')."""
    layout.manifest(stage).remove()
    layout.stage(stage).remove(recursive=True)


def _completion_check(stage: str, config: PipelineConfig, plan: StagePlan):
    layout = RunLayout(config.storage.root_location(), config.run_id)
    endpoint = config.storage.endpoint_url
    refs = {name: input_ref_for(uri, endpoint, plan.tiny_hash) for name, uri in plan.inputs.items()}
    digest = stage_hash(plan.semantic)
    return layout, refs, digest, is_stage_complete(layout.manifest(stage), digest, refs)


def plan_is_complete(stage: str, config: PipelineConfig, plan: StagePlan) -> bool:
    """Whether `stage` would be skipped: its manifest is complete for this plan's hash and inputs."""
    return _completion_check(stage, config, plan)[3]


def begin_stage(
    stage: str,
    config: PipelineConfig,
    plan: StagePlan,
    *,
    force: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> StageContext | None:
    """Decide whether the stage runs; None means it is already complete for this config and inputs."""
    layout, refs, digest, complete = _completion_check(stage, config, plan)
    if not force and complete:
        return None
    if force and rank == 0:
        clear_stage(layout, stage)
    return StageContext(stage, config, layout, digest, refs, utc_now(), rank, world_size)


def check_resumable(ctx: StageContext, trainer_state: dict) -> None:
    """Refuse to continue checkpoints written under another config."""
    stored = trainer_state.get("config_hash")
    if stored != ctx.config_hash:
        raise StageError(
            f"stage {ctx.stage} of run {ctx.config.run_id} has checkpoints from a different config "
            f"({str(stored)[:12]} != {ctx.config_hash[:12]}): rerun with --force to start it over"
        )


def finish_stage(ctx: StageContext, outputs: dict[str, str], metrics: dict[str, Any]) -> StageManifest | None:
    """Write the manifest (rank 0), the last write of the stage."""
    if not ctx.is_main:
        return None
    manifest = StageManifest(
        run_id=ctx.config.run_id,
        stage=ctx.stage,
        config_hash=ctx.config_hash,
        inputs=ctx.inputs,
        outputs=outputs,
        metrics={**metrics, **thread_metrics()},  # what it computed with: speed is read against it
        versions=package_versions(),
        started_at=ctx.started_at,
        finished_at=utc_now(),
    )
    write_manifest(ctx.layout, manifest)
    return manifest
