"""Step 7 of a PPO step: its metrics over all ranks (namespaced `ppo/`) and its rollout rows."""

from __future__ import annotations

import torch

from stages.critic.diagnostics import global_explained_variance, scalar_metrics, value_diagnostics
from stages.ppo.batch import Advantages, OldQuantities, RolloutBatch
from stages.ppo.engines import Models
from stages.runtime import distributed
from stages.sampling.rollout_rows import ScoredSample, rollout_columns

STAGE = "ppo"


def step_metrics(
    rollout: RolloutBatch,
    old: OldQuantities,
    adv: Advantages,
    scored: list[ScoredSample],
    stats: dict[str, float],
    models: Models,
) -> dict[str, float]:
    """The step's metrics over all ranks (value diagnostics: this rank's rows), namespaced `ppo/`."""
    mask_BT = rollout.mask_BT
    advantages = adv.advantages_BT[mask_BT].double()
    on_device = torch.stack([
        rollout.rewards_B.sum().double(), rollout.is_correct_B.sum().double(), mask_BT.sum().double(),
        advantages.sum(), (advantages**2).sum(),
    ]).cpu()  # fmt: skip
    from_rows = [len(scored), sum(s.score for s in scored), sum(s.finish_reason == "length" for s in scored)]
    sums = torch.cat([torch.tensor(from_rows, dtype=torch.float64), on_device])
    n, score, truncated, reward, correct, tokens, adv_sum, adv_sq = distributed.all_reduce(sums).tolist()
    adv_mean = adv_sum / max(tokens, 1)
    metrics = {f"{STAGE}/{name}": value for name, value in stats.items()}
    metrics |= {
        f"{STAGE}/reward": reward / n,
        f"{STAGE}/score": score / n,
        f"{STAGE}/accuracy": correct / n,
        f"{STAGE}/truncated": truncated / n,
        f"{STAGE}/response_len": tokens / n,
        f"{STAGE}/advantages_mean": adv_mean,
        f"{STAGE}/advantages_std": max(adv_sq / max(tokens, 1) - adv_mean**2, 0.0) ** 0.5,
        f"{STAGE}/logprob_gen_diff": old.logprob_gen_diff,
        f"{STAGE}/lr_policy": models.policy_engine.get_lr()[0],
    }
    if models.critic_engine is not None:
        metrics[f"{STAGE}/lr_critic"] = models.critic_engine.get_lr()[0]
    if old.values_BT is not None:
        metrics[f"{STAGE}/explained_var"] = global_explained_variance(old.values_BT, adv.returns_BT, mask_BT)
        on_host = (old.values_BT, adv.returns_BT, adv.advantages_BT, mask_BT, rollout.is_correct_B)
        diagnostics = value_diagnostics(*(x.cpu() for x in on_host))  # this rank's rows, for the logs
        metrics |= scalar_metrics(diagnostics, f"{STAGE}/value")
    return metrics


def rollout_table(
    old: OldQuantities, adv: Advantages, scored: list[ScoredSample], run_id: str, step: int
) -> dict[str, list]:
    """The step's rows in the rollout schema (per-token values, advantages, returns, reference logprobs)."""
    return rollout_columns(
        scored, run_id=run_id, stage=STAGE, step=step, values_BT=old.values_BT,
        advantages_BT=adv.advantages_BT, returns_BT=adv.returns_BT, ref_logprobs_BT=old.ref_logprobs_BT,
    )  # fmt: skip
