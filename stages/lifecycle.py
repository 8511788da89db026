"""The stage contract: what every stage does before and after its own loop.

    ctx = begin_stage("sft", config, plan(config), force=force)   # plan: what the result depends on
    if ctx is None: return            # complete for this config hash and these inputs: skipped
    ... resume from the latest committed checkpoint, train, checkpoint every save_every ...
    finish_stage(ctx, outputs={...}, metrics={...})   # the manifest, written last

- A stage is skipped when its manifest says it completed with the same config hash and the same
  inputs (URIs and the hashes of the manifests that produced them). `--force` clears the stage
  and recomputes it from scratch.
- Checkpoints record the stage's config hash; resuming from checkpoints written under another
  config is refused (with a line saying how to start over) instead of silently mixing the two.
- `stage_main` is the `python -m stages.<name> --config FILE [--force]` entry point: bad input
  ends in one line on stderr and exit code 3 (USER_ERROR_EXIT), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from stages import distributed
from stages.artifacts import TINY, input_ref_for
from stages.config import ConfigError, config_hash, load_recipe, validate_config
from stages.datasets import DataError
from stages.numerics import NonFiniteError
from storage.checkpoints import CheckpointError
from storage.layout import RunLayout
from storage.location import StorageError
from storage.manifests import (
    InputRef,
    ManifestError,
    StageManifest,
    is_stage_complete,
    package_versions,
    utc_now,
    write_manifest,
)
from storage.reports import ReportError

if TYPE_CHECKING:  # the composed config imports every stage module, which import this one
    from stages.pipeline_config import PipelineConfig


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

    Every stage module defines `plan(config) -> StagePlan`, so whether a stage would be skipped
    can be decided without starting it (the orchestrator does, before claiming a GPU).
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


def stage_is_complete(stage: str, config: PipelineConfig) -> bool:
    """Whether `stage` would be skipped: complete for this config hash and these inputs.

    Raises the stage's own one-line errors when its inputs cannot be resolved (e.g. PPO's critic
    asked for with the critic-warmup stage disabled), so bad input fails before any GPU work.
    """
    plan = importlib.import_module(f"stages.{stage}").plan(config)
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


def staging_dir(ctx: StageContext) -> Path:
    """The local folder where this launch stages checkpoints: the SAME path on every rank of a node.

    The engine's commit protocol has every rank write its shards there and rank 0 upload them, so
    a per-process temporary folder would silently drop the other ranks' optimizer shards and RNG.
    One folder per launch (run, stage, the launch's MASTER_PORT). Multi-node runs need it on a
    shared filesystem (see stages/engine.py).
    """
    launch = os.environ.get("MASTER_PORT", str(os.getpid()))
    path = Path(tempfile.gettempdir()) / "rlpipe-staging" / ctx.config.run_id / ctx.stage / launch
    path.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    return path


def release_staging_dir(path: Path) -> None:
    """Remove the staging folder once every rank is done with it (collective)."""
    distributed.barrier()
    if distributed.local_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


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
        metrics=metrics,
        versions=package_versions(),
        started_at=ctx.started_at,
        finished_at=utc_now(),
    )
    write_manifest(ctx.layout, manifest)
    return manifest


# Errors a user can cause or fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ConfigError,
    DataError,
    StageError,
    StorageError,
    ManifestError,
    ReportError,
    CheckpointError,  # e.g. every committed checkpoint corrupt: the message says what to do
    NonFiniteError,  # deterministic: a rerun from the same checkpoint meets the same NaN
    FileNotFoundError,
    PermissionError,
    NotADirectoryError,  # a storage root or input path that runs through a file
    IsADirectoryError,
)


# Exit code of a stage stopped by bad input: retrying it cannot help (a crash exits 1, a kill -signal).
USER_ERROR_EXIT = 3


def load_stage_config(path: str) -> PipelineConfig:
    from stages.pipeline_config import PipelineConfig

    config = validate_config(load_recipe(path), PipelineConfig)
    if config.run_id is None:
        raise ConfigError(f"config {path} has no run_id: stages run inside a run (use `rlpipe stage`)")
    return config


def stage_main(stage: str, run: Callable[[PipelineConfig, bool], Any], argv: list[str] | None = None) -> int:
    """`python -m stages.<stage> --config FILE [--force]` (also under the DeepSpeed launcher)."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=f"Run the {stage} stage.")
    parser.add_argument("--config", required=True, help="Resolved run config (YAML or JSON) with run_id.")
    parser.add_argument("--force", action="store_true", help="Recompute even if complete for this config.")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # DeepSpeed launcher
    args = parser.parse_args(argv)
    try:
        run(load_stage_config(args.config), args.force)
    except USER_ERRORS as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0


def dump_config(config: PipelineConfig) -> str:
    return json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True)
