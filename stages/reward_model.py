"""Reward-model pretraining: Bradley-Terry on chosen/rejected pairs -> `final/reward_model`."""

from __future__ import annotations

from pydantic import Field

from stages.config import Section, non_semantic
from stages.engine import OptimConfig


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
    prompt_field: str = Field("prompt", description="HF pairs: prompt column.")
    chosen_field: str = Field("chosen", description="HF pairs: preferred response column.")
    rejected_field: str = Field("rejected", description="HF pairs: dispreferred response column.")
    margin_field: str | None = Field(
        None, description="HF pairs: optional margin column (Llama 2 margin loss)."
    )
    train_pairs: int = Field(2000, ge=1, description="Training pairs (at most).")
    heldout_pairs: int = Field(200, ge=1, description="Held-out pairs for pairwise accuracy.")
    center_rewards_coef: float = Field(
        0.0,
        ge=0,
        description="Reward centering: adds coef * mean((r_chosen + r_rejected)^2), keeping scores near 0.",
    )
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    save_every: int = non_semantic(
        100, ge=1, description="Commit a checkpoint every N steps (and at the end)."
    )
    keep_last: int = non_semantic(
        2, ge=1, description="Committed checkpoints kept (the newest is never removed)."
    )
    log_every: int = non_semantic(10, ge=1, description="Write metrics every N steps.")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10, micro_batch_size=32),
        description="Optimizer and DeepSpeed layout; micro_batch_size counts pairs.",
    )
