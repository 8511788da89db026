"""Flow parameters: pydantic models whose field descriptions the Prefect UI renders as forms.

Prefect validates a run's parameters against these models before the flow starts (a wrong type
or `nproc: 0` never reaches a GPU); the flow then resolves the run's config (recipe + overrides,
validated by `PipelineConfig`) before it launches anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from stages.config.batches import check_batch_layouts
from stages.config.evaluation import Benchmark
from stages.config.pipeline import DEFAULT_RECIPE
from stages.lifecycle.runs import resolve_config
from storage.layout import STAGE_NAMES

RECIPES = DEFAULT_RECIPE.parent
StageName = Literal[STAGE_NAMES]  # type: ignore[valid-type]


class RunParams(BaseModel):
    """Which run, made from which recipe, stored where."""

    model_config = ConfigDict(extra="forbid")

    run_id: str | None = Field(
        None,
        description="Run id. An existing run is reopened with its stored config; "
        "empty: a new run named <recipe>-<UTC timestamp>.",
    )
    recipe: str = Field(
        "tiny",
        description="A recipe of the project's configs/ by name (`tiny`: the offline tiny recipe), "
        "or the path of a recipe YAML on the machine that runs the flow.",
    )
    overrides: list[str] = Field(
        default_factory=list,
        description="Config overrides, one `key.path=value` each (as `rlpipe --set`), e.g. `ppo.steps=200`.",
    )
    storage: str | None = Field(
        None,
        description="Storage root URI (local folder or s3://bucket/prefix). Default: $RLPIPE_STORAGE, else ./runs.",
    )
    nproc: int = Field(1, ge=1, description="Ranks for the training stages (GPUs, or CPU processes).")
    timeout_minutes: float | None = Field(
        None, gt=0, description="Kill a stage (its whole process group) that runs longer than this."
    )
    retries: int = Field(
        1,
        ge=0,
        description="Reruns of a stage that crashed or was killed (each resumes from its last "
        "committed checkpoint). Bad input is never retried.",
    )

    def resolve(self, stages: list[str] | None = None):
        """The validated run config and whether the run exists (ConfigError, one line, when invalid).

        The batch sizes of `stages` (default: every stage the config enables) must lay out on
        `nproc` ranks: a config that would stop a later stage fails here, before the first starts."""
        config, existed = resolve_config(
            recipe_path(self.recipe), self.overrides, run_id=self.run_id, storage=self.storage
        )
        check_batch_layouts(config, self.nproc, stages)
        return config, existed


def recipe_path(recipe: str) -> Path:
    """`tiny` -> configs/tiny.yaml of this installation; anything with a suffix or a slash is a path."""
    if "/" in recipe or Path(recipe).suffix:
        return Path(recipe)
    return RECIPES / f"{recipe}.yaml"


class PipelineParams(RunParams):
    """A pipeline run: the configured stages in order, or a subset."""

    stages: list[StageName] | None = Field(
        None,
        description="Stages to run, in pipeline order (default: every stage the recipe enables: "
        "[sft] -> reward_model -> critic_warmup -> ppo -> evaluate).",
    )

    def resolve(self, stages: list[str] | None = None):
        return super().resolve(stages if stages is not None else self.stages)


class StageParams(RunParams):
    """One stage of a run: rerun, resume, or recompute it alone."""

    force: bool = Field(False, description="Recompute even if the stage is complete for this config.")


class CheckpointEvalParams(BaseModel):
    """Evaluate a run's newest PPO checkpoint (the scheduled, e.g. nightly, evaluation)."""

    model_config = ConfigDict(extra="forbid")

    run_id: str | None = Field(
        None,
        description="Run whose newest PPO checkpoint is evaluated (default: the newest run that has one).",
    )
    storage: str | None = Field(None, description="Storage root URI (default: $RLPIPE_STORAGE, else ./runs).")
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint of the storage (default: $AWS_ENDPOINT_URL)."
    )
    benchmarks: list[Benchmark] | None = Field(
        None, description="Benchmarks (default: the run's evaluate.benchmarks)."
    )
    samples: int | None = Field(None, ge=1, description="Sampled responses per problem (default: the run's).")
    limit: int | None = Field(
        None, ge=1, description="First N problems of each benchmark (default: the run's)."
    )
    overrides: list[str] = Field(
        default_factory=list, description="More config overrides (`key.path=value`) for the evaluation."
    )
    timeout_minutes: float | None = Field(None, gt=0, description="Kill the evaluation after this long.")

    def eval_overrides(self) -> list[str]:
        endpoint = [f"storage.endpoint_url={self.endpoint_url}"] if self.endpoint_url else []
        return [
            *self.overrides,
            *endpoint,
            *evaluation_overrides(self.benchmarks, self.samples, limit=self.limit),
        ]


def evaluation_overrides(
    benchmarks: list[str] | None = None,
    samples: int | None = None,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    limit: int | None = None,
) -> list[str]:
    """The `evaluate.*` overrides that typed evaluation options stand for (None: the run's setting).

    A limit applies to every benchmark, so it also clears the per-benchmark `evaluate.limits`."""
    overrides = [f"evaluate.benchmarks=[{','.join(benchmarks)}]"] if benchmarks else []
    for key, value in (("samples", samples), ("temperature", temperature),
                       ("max_new_tokens", max_new_tokens), ("limit", limit)):  # fmt: skip
        if value is not None:
            overrides.append(f"evaluate.{key}={value}")
    if limit is not None:
        overrides.append("evaluate.limits={}")
    return overrides
