"""The PPO stage's section: PPO with the learned critic (VAPO refinements) or the GRPO baseline."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stages.config.models import OptimConfig
from stages.config.section import Section, non_semantic

# The same names as `stages.algorithms.Aggregation` / `KLEstimator` (a test keeps them equal): the
# config is validated without importing torch.
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]
KLEstimator = Literal["k1", "k2", "k3"]


class PPOConfig(Section):
    enabled: bool = Field(True, description="Run PPO (or its GRPO baseline).")
    policy_from: str | None = Field(
        None,
        description="Starting policy URI. Default: the run's starting policy (SFT's export, else model.policy).",
    )
    critic_from: str | None = Field(
        None,
        description="Starting critic URI. Default: critic_warmup's export, else model.critic_init. Unused by grpo.",
    )
    advantage_estimator: Literal["gae", "grpo"] = Field(
        "gae",
        description="gae: PPO with the learned critic (decoupled GAE). grpo: group-normalised outcome "
        "rewards over each prompt's samples, no critic (the baseline).",
    )
    prompts_per_step: int = Field(32, ge=1, description="Prompts sampled per step (over all ranks).")
    samples_per_prompt: int = Field(4, ge=1, description="Responses per prompt (the GRPO group size).")
    steps: int = Field(40, ge=1, description="PPO steps (generate + score + updates).")
    epochs: int = Field(1, ge=1, description="Passes of updates over each step's rollouts.")
    minibatches: int = Field(
        2,
        ge=1,
        description="Optimizer steps per epoch: each step's rows (over all ranks) are split into this many "
        "shuffled mini-batches; each engine's micro_batch_size only caps the rows per forward on a device.",
    )
    gamma: float = Field(1.0, gt=0, le=1, description="Discount.")
    lam_policy: float = Field(
        0.95, ge=0, le=1, description="GAE lambda of the policy advantages (VAPO decoupled GAE)."
    )
    lam_critic: float = Field(
        1.0, ge=0, le=1, description="GAE lambda of the value targets (1.0: Monte-Carlo returns)."
    )
    length_adaptive_alpha: float | None = Field(
        None,
        gt=0,
        description="VAPO length-adaptive lam_policy = 1 - 1/(alpha * length) per response; null: fixed lam_policy.",
    )
    whiten_advantages: bool = Field(
        True, description="gae: whiten advantages over the global batch (all ranks' valid tokens)."
    )
    clip_low: float = Field(0.2, ge=0, description="Policy ratio clip below: 1 - clip_low.")
    clip_high: float = Field(
        0.28, ge=0, description="Policy ratio clip above: 1 + clip_high (DAPO clip-higher)."
    )
    value_loss_coef: float = Field(
        0.5, ge=0, description="Weight of the value loss (in shared mode against the policy loss)."
    )
    vf_clip: float | None = Field(
        0.2, gt=0, description="Value clip range around the old values; null disables value clipping."
    )
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight (subtracted from the loss).")
    kl_coef: float = Field(
        0.0, ge=0, description="Weight of KL(policy || reference); 0 loads no reference model."
    )
    kl_estimator: KLEstimator = Field("k3", description="Per-token KL estimator: k1, k2 or k3.")
    kl_placement: Literal["reward", "loss"] = Field(
        "reward",
        description="reward: rewards -= kl_coef * kl per token (gae; grpo: summed per response); "
        "loss: + kl_coef * aggregated kl in the policy loss.",
    )
    tis_cap: float | None = Field(
        None,
        gt=0,
        description="Truncated importance sampling: weight each sampled token's policy loss by "
        "min(pi_train / pi_sampler, tis_cap), correcting for a sampler that is not the trainer (vLLM in "
        "bf16); ppo/logprob_gen_diff measures the mismatch. null: off (the weights are 1).",
    )
    positive_lm_coef: float = Field(
        0.5, ge=0, description="VAPO positive-example LM loss: weight of the NLL of correct responses."
    )
    loss_agg: Aggregation = Field(
        "token_mean", description="Loss aggregation: token_mean, seq_mean_token_mean or seq_mean_token_sum."
    )
    on_nonfinite: Literal["error", "skip"] = Field(
        "error",
        description="A NaN/inf in a step's rewards, logprobs, values or advantages: error stops the stage "
        "naming the step (the last checkpoint stays latest); skip leaves the weights as they were for "
        "that step (ppo/skipped_nonfinite = 1). A non-finite loss always stops: the weights diverged.",
    )
    policy_warmup_steps: int = Field(
        0, ge=0, description="The first N steps update only the critic (the policy stays as loaded)."
    )
    policy_optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=3e-4, micro_batch_size=64, grad_clip=1.0),
        description="The policy's optimizer and DeepSpeed layout (grad_clip = max_grad_norm).",
    )
    critic_optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-3, micro_batch_size=64, grad_clip=1.0),
        description="The separate critic's own optimizer and layout (unused in shared mode and by grpo).",
    )
    save_every: int = non_semantic(
        10, ge=1, description="Commit a checkpoint every N steps (and at the end)."
    )
    keep_last: int = non_semantic(
        2, ge=1, description="Committed checkpoints kept (the newest is never removed)."
    )
    hf_checkpoints: bool = non_semantic(
        True,
        description="Also commit a Hugging Face export of the policy (and critic) with each checkpoint "
        "(`checkpoints/step_N/hf/policy`), so it can be evaluated while training goes on.",
    )
    log_every: int = non_semantic(1, ge=1, description="Write metrics every N steps.")
    eval_every: int | None = non_semantic(
        10,
        ge=1,
        description="Held-out accuracy (greedy and sampled) every N steps and at the end; null: end only.",
    )
    eval_samples: int = non_semantic(
        4, ge=1, description="Samples per held-out problem for the sampled pass@1 (the mean over them)."
    )
