"""The one path convention of a run (DESIGN section 5). Nothing else builds storage paths.

{root}/{run_id}/pipeline.json
{root}/{run_id}/{stage}/manifest.json           written last, when the stage completes
{root}/{run_id}/{stage}/metrics.jsonl
{root}/{run_id}/{stage}/checkpoints/step_000040/...   + COMMITTED, written last
{root}/{run_id}/{stage}/checkpoints/latest      name of the newest committed step
{root}/{run_id}/{stage}/final/{policy,value,reward_model}/
{root}/{run_id}/{stage}/rollouts/step=000040/part-00000.parquet
{root}/{run_id}/evaluate/{label}/report.{json,md,html}, samples.parquet, plots/
{root}/comparisons/{run_id}+{run_id}.../report.{json,md}     `rlpipe report` of several runs
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from storage.location import Location

# Pipeline order; `rlpipe runs` shows statuses in this order.
STAGE_NAMES = ("sft", "reward_model", "critic_warmup", "ppo", "evaluate")

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def validate_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id or ""):
        raise ValueError(
            f"invalid run id {run_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return run_id


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def parse_step_dir_name(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def rollout_step_dir_name(step: int) -> str:
    return f"step={step:06d}"


@dataclass(frozen=True)
class RunLayout:
    """Every location of one run, given the storage root."""

    root: Location
    run_id: str

    def __post_init__(self) -> None:
        validate_run_id(self.run_id)

    @property
    def run(self) -> Location:
        return self.root / self.run_id

    @property
    def pipeline_config(self) -> Location:
        return self.run / "pipeline.json"

    def stage(self, stage: str) -> Location:
        return self.run / stage

    def manifest(self, stage: str) -> Location:
        return self.stage(stage) / "manifest.json"

    def metrics(self, stage: str) -> Location:
        return self.stage(stage) / "metrics.jsonl"

    def checkpoints(self, stage: str) -> Location:
        return self.stage(stage) / "checkpoints"

    def checkpoint(self, stage: str, step: int) -> Location:
        return self.checkpoints(stage) / step_dir_name(step)

    def checkpoint_model(self, stage: str, step: int, model: str) -> Location:
        """HF-format export of `model` committed with a checkpoint (PPO's `hf_checkpoints`)."""
        return self.checkpoint(stage, step) / "hf" / model

    def final(self, stage: str, model: str) -> Location:
        """HF-format export of a trained model: `model` is policy, value or reward_model."""
        return self.stage(stage) / "final" / model

    def rollouts(self, stage: str) -> Location:
        return self.stage(stage) / "rollouts"

    def rollout_part(self, stage: str, step: int, rank: int) -> Location:
        return self.rollouts(stage) / rollout_step_dir_name(step) / f"part-{rank:05d}.parquet"

    def evaluation(self, label: str) -> Location:
        return self.stage("evaluate") / label

    def report(self, label: str, ext: str) -> Location:
        return self.evaluation(label) / f"report.{ext}"

    def samples(self, label: str) -> Location:
        return self.evaluation(label) / "samples.parquet"

    def plots(self, label: str) -> Location:
        return self.evaluation(label) / "plots"


def comparison(root: Location, run_ids: list[str]) -> Location:
    """Where `rlpipe report RUN_ID ...` writes its side-by-side comparison (ids in the given order)."""
    if not run_ids:
        raise ValueError("a comparison needs at least one run id")
    return root / "comparisons" / "+".join(validate_run_id(r) for r in run_ids)


def list_run_ids(root: Location) -> list[str]:
    """Runs under a storage root: folders holding a pipeline.json."""
    return [
        name for name in root.list_names() if _RUN_ID.match(name) and (root / name / "pipeline.json").exists()
    ]
