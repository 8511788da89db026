"""Sections of the training stages before PPO: SFT warm start, reward-model pretraining, critic warmup."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from stages.config.models import OptimConfig
from stages.config.section import Section, non_semantic


class SFTConfig(Section):
    enabled: bool = Field(
        True, description="Run the SFT warm start (the tiny recipe needs it: its model starts random)."
    )
    steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(
        32, ge=1, description="Sequences per optimizer step over all ranks (the same on 1 or N ranks)."
    )
    save_every: int = non_semantic(
        100, ge=1, description="Commit a checkpoint every N steps (and at the end)."
    )
    keep_last: int = non_semantic(
        2, ge=1, description="Committed checkpoints kept (the newest is never removed)."
    )
    log_every: int = non_semantic(10, ge=1, description="Write metrics every N steps.")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20, micro_batch_size=32, weight_decay=0.0),
        description="Optimizer and DeepSpeed layout; micro_batch_size caps the sequences per forward on a device.",
    )


RM_DEFAULT_STEPS = (
    800  # tiny recipe after SFT: held-out pairwise accuracy ~0.93, ~75 s of training on 2 CPU cores
)


RM_OPTIM_DEFAULTS = {"lr": 1e-3, "warmup_steps": 10, "micro_batch_size": 32, "schedule": "cosine"}


class RewardModelConfig(Section):
    enabled: bool = Field(
        True,
        description="Run reward-model pretraining (needed when the RM scores or initialises the critic).",
    )
    init_from: str | None = Field(
        None,
        description="Model the RM starts from (backbone; fresh score head). Default: the run's starting policy.",
    )
    pairs_from: str = Field(
        "task",
        description="Preference pairs: `task` builds them offline from the task's worked solutions (correct vs. "
        "corrupted answer); otherwise an HF dataset id or local path with prompt/chosen/rejected columns.",
    )
    prompt_field: str | None = Field(
        "prompt", description="HF pairs: prompt column; null when chosen/rejected carry their own prompt."
    )
    chosen_field: str = Field("chosen", description="HF pairs: preferred response column.")
    rejected_field: str = Field("rejected", description="HF pairs: dispreferred response column.")
    margin_field: str | None = Field(
        None, description="HF pairs: optional margin column (Llama 2 margin loss)."
    )
    train_pairs: int = Field(4000, ge=1, description="Training pairs (at most).")
    heldout_pairs: int = Field(200, ge=1, description="Held-out pairs for pairwise accuracy.")
    center_rewards_coef: float = Field(
        0.0,
        ge=0,
        description="Reward centering: adds coef * mean((r_chosen + r_rejected)^2), keeping scores near 0.",
    )
    steps: int = Field(RM_DEFAULT_STEPS, ge=1, description="Optimizer steps.")
    batch_size: int = Field(
        32, ge=1, description="Preference pairs per optimizer step over all ranks (the same on 1 or N ranks)."
    )
    save_every: int = non_semantic(
        200, ge=1, description="Commit a checkpoint every N steps (and at the end)."
    )
    keep_last: int = non_semantic(
        2, ge=1, description="Committed checkpoints kept (the newest is never removed)."
    )
    log_every: int = non_semantic(10, ge=1, description="Write metrics every N steps.")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(**RM_OPTIM_DEFAULTS, total_steps=RM_DEFAULT_STEPS),
        description="Optimizer and DeepSpeed layout; micro_batch_size counts pairs. The cosine schedule "
        "decays over the stage's `steps`: total_steps is derived from them (a value given is replaced).",
    )

    @model_validator(mode="before")
    @classmethod
    def _cosine_spans_the_steps(cls, data: Any) -> Any:
        # Derived here, in one place: a stored or default total_steps must not outlive a change of `steps`.
        optim = data.get("optim", dict(RM_OPTIM_DEFAULTS)) if isinstance(data, dict) else None
        if isinstance(optim, dict) and optim.get("schedule", RM_OPTIM_DEFAULTS["schedule"]) == "cosine":
            return {**data, "optim": {**optim, "total_steps": data.get("steps", RM_DEFAULT_STEPS)}}
        return data


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
    minibatches: int = Field(
        4,
        ge=1,
        description="Optimizer steps per epoch: each step's rows (over all ranks) are split into this many "
        "shuffled mini-batches.",
    )
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
        description="The critic's optimizer and DeepSpeed layout; micro_batch_size caps the rows per forward on a device.",
    )
