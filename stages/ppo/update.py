"""Step 6 of a PPO step: `epochs` x `minibatches` optimizer steps of the policy (clipped surrogate,
entropy bonus, KL loss, positive-example LM loss; plus the value loss in shared mode) and of the
separate critic (`stages.critic.update`).

Shape suffixes: B rollouts (rows of this rank), T response tokens (right-padded).
Each micro-batch loss is normalised by its mini-batch's global count and scaled by (accumulation
steps x ranks), which DeepSpeed divides back out: the gradient is that of one big batch
(`stages.models.minibatches`).
"""

from __future__ import annotations

import torch

from stages.algorithms import (
    aggregate_loss,
    kl_penalty,
    policy_loss,
    positive_example_lm_loss,
    truncated_importance_weights,
)
from stages.config.ppo import PPOConfig
from stages.critic.update import ValueTargets, critic_update_step, value_terms
from stages.models.engine import step_engine
from stages.models.forward import response_logprobs, response_logprobs_and_values, response_values
from stages.models.minibatches import accumulation_scale, global_counts, shuffled_minibatches
from stages.ppo.batch import Advantages, OldQuantities, RolloutBatch
from stages.ppo.engines import Models
from stages.runtime import distributed
from stages.runtime.numerics import require_finite

Tensor = torch.Tensor


def update(
    models: Models,
    rollout: RolloutBatch,
    old: OldQuantities,
    adv: Advantages,
    ppo: PPOConfig,
    temperature: float,
    train_policy: bool,
    seed: tuple[int, int],
) -> dict[str, float]:
    """`epochs` seeded shuffles of the rows, each split into `minibatches` optimizer steps.

    Returns the mean statistics over all ranks: losses per update, the rest per token, gradient
    norms (before clipping) per update.
    """
    targets = (
        ValueTargets(old.values_BT, adv.returns_BT, rollout.mask_BT) if old.values_BT is not None else None
    )
    totals: dict[str, Tensor] = {}
    norms: dict[str, list[float]] = {}  # global already (the same on every rank): not reduced again
    for part in shuffled_minibatches(len(rollout.rows), ppo.epochs, ppo.minibatches, seed):
        part = part.to(rollout.mask_BT.device)  # indexes the step's tensors where they live
        mask_BT = rollout.mask_BT[part]
        count, positive = global_counts(ppo.loss_agg, mask_BT, mask_BT & rollout.is_correct_B[part, None])
        stats: dict[str, Tensor] = {}
        if train_policy or models.shared:
            norm = _policy_step(
                models,
                rollout,
                old,
                adv,
                targets,
                part,
                ppo,
                temperature,
                train_policy,
                (count, positive),
                stats,
            )
            _record(norms, "grad_norm_policy", norm)
        if models.critic_engine is not None:
            critic_batches = models.batches["critic_optim"]
            critic_stats, norm = critic_update_step(
                models.critic_engine, models.critic_engine, rollout.rows, part, targets,
                micro_batch_size=critic_batches.micro_batch_size, grad_accum_steps=critic_batches.grad_accum_steps,
                clip_range=ppo.vf_clip, agg=ppo.loss_agg, count=count, coef=ppo.value_loss_coef,
            )  # fmt: skip
            _record(norms, "grad_norm_critic", norm)
            _add(stats, critic_stats)
        for name, value in stats.items():
            totals[name] = totals.get(name, 0.0) + value.detach().double()
    names = sorted(totals)
    if not names:  # grpo during policy warmup: nothing trains
        return {}
    mean_norms = {name: sum(values) / len(values) for name, values in norms.items() if values}
    summed = dict(
        zip(names, distributed.all_reduce(torch.stack([totals[n] for n in names])).tolist(), strict=True)
    )
    updates = ppo.epochs * ppo.minibatches
    tokens = {"policy": summed.pop("tokens", 0.0), "value": summed.pop("value_tokens", 0.0)}
    return {
        n: v / updates
        if n.endswith("_loss")
        else v / max(tokens["value" if n.startswith("value") else "policy"], 1.0)
        for n, v in summed.items()
    } | mean_norms


def _policy_step(
    models: Models,
    rollout: RolloutBatch,
    old: OldQuantities,
    adv: Advantages,
    targets: ValueTargets | None,
    part: Tensor,
    ppo: PPOConfig,
    temperature: float,
    train_policy: bool,
    counts: tuple[Tensor, Tensor],
    stats: dict[str, Tensor],
) -> float | None:
    """One optimizer step of the policy engine (+ the value loss in shared mode) over the rows
    `part`; adds the summed statistics to `stats`, returns the gradient norm before clipping."""
    engine, batches = models.policy_engine, models.batches["policy_optim"]
    norm = None
    for idx in part.split(batches.micro_batch_size):
        mb = rollout.rows.batch(idx)
        loss, values_BT = torch.zeros((), device=rollout.mask_BT.device), None
        if train_policy:
            if models.shared:  # one trunk forward for the logprobs and the values
                logprobs_BT, entropy_BT, values_BT = response_logprobs_and_values(
                    engine, mb, temperature, with_entropy=True
                )
            else:
                logprobs_BT, entropy_BT = response_logprobs(engine, mb, temperature, with_entropy=True)
            loss, policy_stats = _policy_terms(logprobs_BT, entropy_BT, idx, rollout, old, adv, ppo, counts)
            _add(stats, policy_stats)
        if models.shared:
            values_BT = response_values(engine, mb) if values_BT is None else values_BT
            value, value_stats = value_terms(values_BT, idx, targets, ppo.vf_clip, ppo.loss_agg, counts[0])
            loss = loss + ppo.value_loss_coef * value
            _add(stats, value_stats)
        require_finite(loss, "policy loss" if train_policy else "value loss")
        engine.backward(loss * accumulation_scale(batches.grad_accum_steps))
        step_norm = step_engine(engine)  # every micro-batch; a norm only at the accumulation boundary
        norm = norm if step_norm is None else step_norm
    return norm


def _policy_terms(
    logprobs_BT: Tensor,
    entropy_BT: Tensor,
    idx: Tensor,
    rollout: RolloutBatch,
    old: OldQuantities,
    adv: Advantages,
    ppo: PPOConfig,
    counts: tuple[Tensor, Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate - entropy_coef x entropy (+ kl_coef x KL) (+ positive-example LM loss).

    Stats are sums over this micro-batch's tokens (means are taken over all tokens in `update`).
    """
    T = logprobs_BT.shape[1]
    mask_BT = rollout.mask_BT[idx, :T]
    count, positive = counts
    weights_BT = None
    if ppo.tis_cap is not None:  # the sampler is not the trainer: truncated importance weights
        weights_BT = truncated_importance_weights(
            old.logprobs_BT[idx, :T], old.sampler_logprobs_BT[idx, :T], ppo.tis_cap
        )
    pg, pg_stats = policy_loss(
        logprobs_BT, old.logprobs_BT[idx, :T], adv.advantages_BT[idx, :T], mask_BT,
        ppo.clip_low, ppo.clip_high, ppo.loss_agg, global_count=count, weights_BT=weights_BT,
    )  # fmt: skip
    entropy = aggregate_loss(entropy_BT, mask_BT, ppo.loss_agg, global_count=count)
    loss = pg - ppo.entropy_coef * entropy
    tokens = mask_BT.sum().float()
    stats = {"policy_loss": pg, "entropy": (entropy_BT * mask_BT).sum(), "tokens": tokens}
    if weights_BT is not None:  # per token: the mean weight and the share the cap truncated
        stats["tis_weight"] = (weights_BT * mask_BT).sum()
        stats["tis_capped"] = ((weights_BT >= ppo.tis_cap) & mask_BT).sum().float()
    stats |= {"clipfrac": pg_stats["clipfrac"] * tokens, "approx_kl": pg_stats["approx_kl"] * tokens}
    if old.ref_logprobs_BT is not None:
        kl_BT = kl_penalty(logprobs_BT, old.ref_logprobs_BT[idx, :T], ppo.kl_estimator)
        stats["kl"] = (kl_BT * mask_BT).sum()
        if ppo.kl_placement == "loss":
            loss = loss + ppo.kl_coef * aggregate_loss(kl_BT, mask_BT, ppo.loss_agg, global_count=count)
    if ppo.positive_lm_coef > 0:
        lm, _ = positive_example_lm_loss(
            logprobs_BT, mask_BT, rollout.is_correct_B[idx], ppo.positive_lm_coef, ppo.loss_agg,
            global_count=positive,
        )  # fmt: skip
        loss, stats["positive_lm_loss"] = loss + lm, lm
    return loss, stats


def _record(norms: dict[str, list[float]], name: str, norm: float | None) -> None:
    if norm is not None:
        norms.setdefault(name, []).append(norm)


def _add(totals: dict[str, Tensor], stats: dict[str, Tensor]) -> None:
    for name, value in stats.items():
        totals[name] = totals.get(name, 0.0) + value.detach()
