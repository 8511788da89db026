"""The skeleton every training stage shares (SFT, reward model, critic warmup, PPO):

    ctx = claim_stage(STAGE, config, plan(config), force)      # None: complete, skipped
    ... build the engines ...
    training = resume_training(ctx, engines, total_steps)      # newest committed checkpoint, metrics
    for step in training.steps(total_steps):                  # resumed step .. total_steps - 1
        ... one step; training.tracker.log(...); every save_every: training.save(step, {...}) ...
    final = training.export_model("policy", module.save_pretrained, tokenizer)
    training.finish(outputs={...}, metrics={...})              # the manifest, written last

Checkpoints go through the engines' commit protocol (`stages.models.engine`): every rank writes
its shards into one staging folder of the node, rank 0 uploads and commits them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.config.pipeline import PipelineConfig
from stages.lifecycle.contract import (
    StageContext,
    StageError,
    StagePlan,
    begin_stage,
    check_resumable,
    finish_stage,
)
from stages.lifecycle.tracking import MetricsTracker
from stages.models.engine import checkpoint_world_size, load_training_state, save_training_state
from stages.models.sources import export_model_dir
from stages.runtime import distributed
from stages.runtime.threads import refresh_threads
from storage.checkpoints import latest_committed_step
from storage.location import Location


def claim_stage(stage: str, config: PipelineConfig, plan: StagePlan, force: bool) -> StageContext | None:
    """Join the process group and claim the stage; None (and a line saying so) when it is complete."""
    distributed.init_distributed()
    ctx = begin_stage(
        stage, config, plan, force=force, rank=distributed.rank(), world_size=distributed.world_size()
    )
    if ctx is None:
        distributed.print0(f"{stage}: complete for this config and inputs, skipped (use --force to rerun)")
        return None
    _check_checkpoint_ranks(ctx)
    return ctx


def _check_checkpoint_ranks(ctx: StageContext) -> None:
    """Refuse, in one line and before any model is loaded, to resume on another number of ranks.

    ZeRO partitions optimizer state by rank, and each rank's RNG is saved on its own: a checkpoint
    resumes on the world size that wrote it (re-sharding it is not supported yet)."""
    checkpoints = ctx.layout.checkpoints(ctx.stage)
    step = latest_committed_step(checkpoints)
    written_on = checkpoint_world_size(checkpoints, step) if step is not None else None
    if written_on is not None and written_on != ctx.world_size:
        raise StageError(
            f"{ctx.stage} of run {ctx.config.run_id} was checkpointed on {written_on} rank(s) (step {step}) and "
            f"resumes only on as many: rerun with --nproc {written_on}, or with --force to start it over"
        )


@dataclass
class TrainingRun:
    """One launch of a training stage: its engines, staging folder, resumed state and metrics."""

    ctx: StageContext
    engines: dict[str, Any]
    staging: Path
    state: dict[str, Any] | None  # the resumed checkpoint's trainer state; None on a fresh start
    tracker: MetricsTracker
    speed: dict[str, float] = field(default_factory=dict)  # set by `steps` when the loop ends

    @property
    def start(self) -> int:
        """Steps already done: the resumed checkpoint's step, 0 on a fresh start."""
        return self.state["step"] if self.state else 0

    def steps(self, total_steps: int) -> Iterator[int]:
        """The steps left to do; before each, the CPU threads follow the processes sharing the CPUs.
        The loop's speed (this launch's steps, checkpoints included) goes into the stage's metrics."""
        began = time.perf_counter()
        for step in range(self.start, total_steps):
            refresh_threads()
            yield step
        if total_steps > self.start:
            self.speed = {"steps_per_s": (total_steps - self.start) / (time.perf_counter() - began)}

    def save(
        self,
        step: int,
        trainer_state: dict[str, Any],
        keep_last: int,
        hf_export: Callable[[Path], Any] | None = None,
    ) -> None:
        """Commit a checkpoint of every engine at `step` (collective); the config hash travels with it."""
        save_training_state(
            self.engines,
            {"config_hash": self.ctx.config_hash, **trainer_state},
            self.ctx.layout.checkpoints(self.ctx.stage),
            step,
            keep_last,
            self.staging,
            hf_export=hf_export,
        )

    def export_model(self, name: str, save: Callable[[Path], Any], tokenizer) -> Location:
        """`final/{name}` in Hugging Face format: `save(folder)` and the tokenizer, uploaded by rank 0."""
        final = self.ctx.layout.final(self.ctx.stage, name)
        if self.ctx.is_main:
            folder = self.staging / "export" / name
            save(folder)
            tokenizer.save_pretrained(folder)
            export_model_dir(folder, final)
        distributed.barrier()
        return final

    def finish(self, outputs: dict[str, str], metrics: dict[str, Any]) -> None:
        """Close the metrics, release the staging folder, then write the manifest (the last write)."""
        self.tracker.close()
        release_staging_dir(self.staging)
        finish_stage(self.ctx, outputs=outputs, metrics={**metrics, **self.speed})


def resume_training(ctx: StageContext, engines: dict[str, Any], total_steps: int) -> TrainingRun:
    """Load the newest committed checkpoint of every engine (refusing another config's) and open
    the metrics, whose records after the resumed step are replaced, never duplicated."""
    staging = staging_dir(ctx)
    state = load_training_state(engines, ctx.layout.checkpoints(ctx.stage), staging)
    if state is not None:
        check_resumable(ctx, state)
    config = ctx.config
    tracker = MetricsTracker(
        ctx.layout.metrics(ctx.stage),
        rank=ctx.rank,
        run_id=config.run_id,
        stage=ctx.stage,
        total_steps=total_steps,
        start_step=state["step"] if state else 0,
        wandb_config=config.wandb,
        config=config.model_dump(mode="json"),
    )
    return TrainingRun(ctx, engines, staging, state, tracker)


def staging_dir(ctx: StageContext) -> Path:
    """The local folder where this launch stages checkpoints: the SAME path on every rank of a node.

    The engine's commit protocol has every rank write its shards there and rank 0 upload them, so
    a per-process temporary folder would silently drop the other ranks' optimizer shards and RNG.
    One folder per launch (run, stage, the launch's MASTER_PORT). Multi-node runs need it on a
    shared filesystem (see stages/models/engine.py).
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
