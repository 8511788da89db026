"""Steps 3-5 of a PPO step: the step's rows as tensors, the old quantities read before any update,
the per-token rewards and the advantages. Each is an immutable value, built once.

Shape suffixes: B rollouts (rows of this rank), T response tokens (right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.algorithms import (
    compute_decoupled_gae,
    grpo_advantages,
    kl_penalty,
    length_adaptive_lambda,
    masked_moments_sums,
    masked_whiten,
    moments_from_sums,
    outcome_rewards_to_tokens,
)
from stages.config.ppo import PPOConfig
from stages.models.forward import (
    TokenBatch,
    TokenRows,
    response_logprobs,
    response_logprobs_and_values,
    response_values,
)
from stages.ppo.engines import Models
from stages.runtime import distributed
from stages.runtime.numerics import nonfinite_counts
from stages.sampling.rollout_rows import ScoredSample, training_batch

Tensor = torch.Tensor


@dataclass(frozen=True)
class RolloutBatch:
    """The step's rows: their token ids, the padded batch, the scalar rewards and the verdicts."""

    rows: TokenRows
    batch: TokenBatch
    rewards_B: Tensor
    is_correct_B: Tensor

    @property
    def mask_BT(self) -> Tensor:
        return self.batch.response_mask_BT


def rollout_batch(scored: list[ScoredSample], pad_id: int, device: torch.device) -> RolloutBatch:
    """The rows as tensors on `device` (the policy's): every quantity of the step is computed there."""
    prompt_ids, response_ids, rewards_B = training_batch(scored)
    rows = TokenRows(prompt_ids, response_ids, pad_id)
    is_correct_B = torch.tensor([s.is_correct for s in scored], dtype=torch.bool)
    return RolloutBatch(rows, rows.batch().to(device), rewards_B.to(device), is_correct_B.to(device))


@dataclass(frozen=True)
class OldQuantities:
    """What the models said about the rows before this step's updates."""

    logprobs_BT: Tensor  # the policy's, recomputed by the training forward
    sampler_logprobs_BT: Tensor  # the sampler's, of the same tokens (0 where masked)
    ref_logprobs_BT: Tensor | None  # the frozen reference's (only with kl_coef > 0)
    values_BT: Tensor | None  # the critic's (None for grpo)
    logprob_gen_diff: float  # max |training - sampler| logprob over the valid tokens of all ranks


@torch.no_grad()
def old_quantities(
    models: Models,
    rollout: RolloutBatch,
    scored: list[ScoredSample],
    temperature: float,
    micro_batch_size: int,
) -> OldQuantities:
    """Step 3: old logprobs recomputed by the policy (checked against the sampler's), reference
    logprobs (kl_coef > 0), old values (critic)."""
    batch, values_BT = rollout.batch, None
    if models.shared:  # old logprobs and old values from one trunk forward per micro-batch
        logprobs_BT, _, values_BT = response_logprobs_and_values(
            models.critic, batch, temperature, micro_batch_size
        )
    else:
        logprobs_BT, _ = response_logprobs(models.policy_engine, batch, temperature, micro_batch_size)
    sampler_BT = torch.zeros(logprobs_BT.shape, dtype=logprobs_BT.dtype)
    for b, s in enumerate(scored):
        sampler_BT[b, : len(s.logprobs)] = torch.tensor(s.logprobs)
    sampler_BT = sampler_BT.to(logprobs_BT.device)
    diff = (logprobs_BT - sampler_BT).abs().masked_fill(~rollout.mask_BT, 0).max()
    ref_logprobs_BT = None
    if models.reference is not None:
        ref_logprobs_BT, _ = response_logprobs(models.reference, batch, temperature, micro_batch_size)
    if models.critic is not None and not models.shared:
        values_BT = response_values(models.critic, batch, micro_batch_size)
    gen_diff = float(distributed.all_reduce(diff, "max"))
    return OldQuantities(logprobs_BT, sampler_BT, ref_logprobs_BT, values_BT, gen_diff)


@dataclass(frozen=True)
class Advantages:
    """The policy's advantages (0 where masked) and, with a critic, the value targets."""

    advantages_BT: Tensor
    returns_BT: Tensor | None


def compute_advantages(
    rollout: RolloutBatch, old: OldQuantities, group_ids_B: Tensor, ppo: PPOConfig
) -> Advantages:
    """Steps 4-5: per-token rewards (outcome on the last token, KL in the reward) -> advantages."""
    mask_BT = rollout.mask_BT
    kl_BT = None
    if old.ref_logprobs_BT is not None and ppo.kl_placement == "reward":
        kl_BT = kl_penalty(old.logprobs_BT, old.ref_logprobs_BT, ppo.kl_estimator) * mask_BT
    if ppo.advantage_estimator == "grpo":
        scores_B = rollout.rewards_B - (ppo.kl_coef * kl_BT.sum(1) if kl_BT is not None else 0.0)
        advantages_B = grpo_advantages(scores_B, group_ids_B.to(scores_B.device))
        return Advantages(advantages_B[:, None] * mask_BT, None)
    rewards_BT = outcome_rewards_to_tokens(rollout.rewards_B, mask_BT)
    if kl_BT is not None:
        rewards_BT = rewards_BT - ppo.kl_coef * kl_BT
    lam_policy = ppo.lam_policy
    if ppo.length_adaptive_alpha is not None:
        lam_policy = length_adaptive_lambda(mask_BT.sum(1), ppo.length_adaptive_alpha)
    advantages_BT, returns_BT = compute_decoupled_gae(
        rewards_BT, old.values_BT, mask_BT, ppo.gamma, lam_policy, ppo.lam_critic
    )
    if ppo.whiten_advantages:  # over the global batch: moments all-reduced over ranks
        moments = moments_from_sums(
            distributed.all_reduce(masked_moments_sums(advantages_BT.double(), mask_BT))
        )
        advantages_BT = masked_whiten(advantages_BT, mask_BT, moments=tuple(x.float() for x in moments))
    return Advantages(advantages_BT * mask_BT, returns_BT)


def nonfinite_inputs(
    rollout: RolloutBatch, old: OldQuantities, adv: Advantages
) -> dict[str, tuple[int, int]]:
    """What of the step's data is NaN/inf (over all ranks): checked before any update."""
    named = {
        "reward": rollout.rewards_B, "old_logprobs": old.logprobs_BT, "ref_logprobs": old.ref_logprobs_BT,
        "values": old.values_BT, "advantages": adv.advantages_BT, "returns": adv.returns_BT,
    }  # fmt: skip
    return nonfinite_counts(named, rollout.mask_BT)
