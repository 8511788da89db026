"""The whole run's configuration: one section per concern, each documented and frozen.

Every section lives in this package (below the recipes, which import it); `PipelineConfig`
composes them, and `load_config` reads a recipe with overrides into one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from stages.config.evaluation import EvaluateConfig
from stages.config.models import ModelConfig, TinyModelConfig
from stages.config.overrides import apply_overrides, load_recipe, validate_config
from stages.config.ppo import PPOConfig
from stages.config.run import RuntimeConfig, StorageConfig, WandbConfig
from stages.config.sampling import RewardConfig, SamplingConfig
from stages.config.section import Section, non_semantic
from stages.config.task import TaskConfig
from stages.config.training import CriticWarmupConfig, RewardModelConfig, SFTConfig

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


class PipelineConfig(Section):
    """The whole run: one section per concern; stage sections join as the stages land."""

    run_id: str | None = non_semantic(
        None, description="Run id (folder under the storage root). Default: <recipe>-<UTC timestamp>."
    )
    recipe: str = non_semantic(
        "custom", description="Name of the recipe this config came from (informational)."
    )
    seed: int = Field(0, ge=0, description="Global seed: data order, sampling, initialisation.")
    storage: StorageConfig = non_semantic(
        default_factory=StorageConfig, description="Where runs are stored (not part of the config hash)."
    )
    wandb: WandbConfig = non_semantic(
        default_factory=WandbConfig, description="Experiment tracking (not part of the config hash)."
    )
    runtime: RuntimeConfig = non_semantic(
        default_factory=RuntimeConfig, description="CPU threads per process (not part of the config hash)."
    )
    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(policy="tiny"),
        description="The policy (`tiny` = the offline tiny model; else an HF id, a path or a storage URI) and the critic.",
    )
    tiny_model: TinyModelConfig = Field(
        default_factory=TinyModelConfig,
        description="Size of the offline tiny model (used when model.policy is `tiny`).",
    )
    task: TaskConfig = Field(
        default_factory=TaskConfig, description="Training problems and the held-out split."
    )
    generation: SamplingConfig = Field(
        default_factory=SamplingConfig,
        description="Sampling of rollouts and in-stage accuracy (backend, temperature...).",
    )
    reward: RewardConfig = Field(
        default_factory=RewardConfig, description="How sampled responses are scored."
    )
    sft: SFTConfig = Field(default_factory=SFTConfig, description="SFT warm start (optional stage).")
    reward_model: RewardModelConfig = Field(
        default_factory=RewardModelConfig, description="Reward-model pretraining (Bradley-Terry)."
    )
    critic_warmup: CriticWarmupConfig = Field(
        default_factory=CriticWarmupConfig, description="Value pretraining with the policy frozen."
    )
    ppo: PPOConfig = Field(
        default_factory=PPOConfig, description="PPO with the learned critic (or the GRPO baseline)."
    )
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig,
        description="Evaluation of the starting and final policy on benchmarks, with reports.",
    )


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Recipe (default: the offline `tiny` recipe) + overrides -> validated PipelineConfig."""
    data: dict[str, Any] = load_recipe(recipe or DEFAULT_RECIPE)
    return validate_config(apply_overrides(data, overrides or [], PipelineConfig), PipelineConfig)


def upgrade_stored_config(data: dict[str, Any]) -> dict[str, Any]:
    """A run's stored config in today's keys, so a run made by an earlier version still opens.

    Before global batch sizes, each engine's `optim.grad_accum_steps` set the per-rank batch
    (micro_batch_size x grad_accum_steps). On one rank, the layout those recipes ran on, that is:
    `sft.batch_size` / `reward_model.batch_size` = micro x accumulation, and critic warmup's
    `minibatches` = its rows per step / (micro x accumulation); PPO's `minibatches` was global already.
    """
    data = json.loads(json.dumps(data))
    for stage, optims in (("sft", ["optim"]), ("reward_model", ["optim"]), ("critic_warmup", ["optim"]),
                          ("ppo", ["policy_optim", "critic_optim"])):  # fmt: skip
        section = data.get(stage)
        if not isinstance(section, dict):
            continue
        for name in optims:
            optim = section.get(name)
            if not isinstance(optim, dict) or "grad_accum_steps" not in optim:
                continue
            rows = optim.get("micro_batch_size", 1) * optim.pop("grad_accum_steps")
            if stage in ("sft", "reward_model"):
                section.setdefault("batch_size", rows)
            elif stage == "critic_warmup":
                per_step = section.get("prompts_per_step", 32) * section.get("samples_per_prompt", 4)
                section.setdefault("minibatches", max(per_step // rows, 1))
    return data
