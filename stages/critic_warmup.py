"""Critic warmup: the frozen policy samples, the critic regresses onto returns -> `final/value`."""

from __future__ import annotations

from pydantic import Field

from stages.config import Section, non_semantic
from stages.engine import OptimConfig


class CriticWarmupConfig(Section):
    enabled: bool = Field(
        True, description="Warm the critic up before PPO (value pretraining, policy frozen)."
    )
    policy_from: str | None = Field(
        None, description="Policy that samples. Default: the run's starting policy."
    )
    rollouts_from: str | None = Field(
        None,
        description="Train from existing rollouts (a `{stage}/rollouts` URI) instead of generating; the critic "
        "regresses onto returns recomputed from their rewards.",
    )
    prompts_per_step: int = Field(32, ge=1, description="Prompts sampled per step (over all ranks).")
    samples_per_prompt: int = Field(4, ge=1, description="Responses per prompt.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount.")
    lam_critic: float = Field(
        1.0, ge=0, le=1, description="GAE lambda of the value targets (1.0: Monte-Carlo returns)."
    )
    epochs: int = Field(1, ge=1, description="Passes of critic updates over each step's rollouts.")
    steps: int = Field(30, ge=1, description="Steps (generate + score + critic updates).")
    save_every: int = non_semantic(
        10, ge=1, description="Commit a checkpoint every N steps (and at the end)."
    )
    keep_last: int = non_semantic(
        2, ge=1, description="Committed checkpoints kept (the newest is never removed)."
    )
    log_every: int = non_semantic(1, ge=1, description="Write metrics every N steps.")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=5, micro_batch_size=32),
        description="The critic's optimizer and DeepSpeed layout.",
    )
