"""The whole run's configuration: one section per concern, each documented and frozen.

Every section lives in this package (below the recipes, which import it); `PipelineConfig`
composes them, and `load_config` reads a recipe with overrides into one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from stages.config.evaluation import EvaluateConfig
from stages.config.models import ModelConfig, TinyModelConfig
from stages.config.overrides import apply_overrides, load_recipe, validate_config
from stages.config.ppo import PPOConfig
from stages.config.run import StorageConfig, WandbConfig
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
