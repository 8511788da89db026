"""One PPO step, steps 1-7 of `stages.ppo` after the prompts are picked (`run_step`, the same
code the stage and `rlpipe bench ppo-update` run), and its tensor work: old quantities, rewards
and advantages, the epochs x minibatches updates, the step's metrics and its rollout rows.

Shape suffixes: B rollouts (rows of this rank), T response tokens (right-padded).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from stages import distributed
from stages.algorithms import (
    aggregate_loss,
    compute_decoupled_gae,
    grpo_advantages,
    kl_penalty,
    length_adaptive_lambda,
    masked_moments_sums,
    masked_whiten,
    moments_from_sums,
    outcome_rewards_to_tokens,
    policy_loss,
    positive_example_lm_loss,
    value_loss,
)
from stages.diagnostics import scalar_metrics, value_diagnostics
from stages.engine import step_engine
from stages.forward import (
    TokenBatch,
    build_token_batch,
    response_logprobs,
    response_logprobs_and_values,
    response_values,
)
from stages.generation import HFGenerator, sampling_seed
from stages.numerics import NonFiniteError, at_step, describe, nonfinite_counts, require_finite
from stages.ppo_models import Models
from stages.rollouts import ScoredSample, rollout_columns, score_samples, training_batch

if TYPE_CHECKING:
    from stages.ppo import PPOConfig

STAGE = "ppo"
Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# the whole step
# ---------------------------------------------------------------------------------------------
class StepTimer:
    """Seconds spent per phase of PPO steps (the benchmark's breakdown). On a GPU each phase ends
    with a synchronize, so kernels are charged to the phase that launched them."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start


@dataclass
class StepOutcome:
    rollout: Rollout
    scored: list[ScoredSample]
    stats: dict[str, float]


def run_step(
    models: Models,
    generator,
    prompts: list,
    group_ids_B: Tensor,
    config,
    tokenizer,
    *,
    step: int,
    rank: int,
    train_policy: bool,
    timer: StepTimer | None = None,
) -> StepOutcome:
    """Steps 1-7 for the given prompts (one entry per sample): sample, score, old quantities,
    advantages, the updates, and the new weights pushed to the generator."""
    ppo = config.ppo
    timer = timer or StepTimer()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    temperature = config.generation.temperature or 1.0  # greedy rollouts: logprobs at temperature 1
    with timer("generate"):
        seed = sampling_seed(config.seed, step, rank)
        samples = generator.generate([p.prompt_ids for p in prompts], config.generation, seed)
        generator.sleep()  # colocated vLLM frees its GPU memory for the updates
    with timer("score"):
        scored = score_samples(samples, prompts, tokenizer, config.reward, rm=models.rm)
    with timer("old_forward"):  # old logprobs and values; reference logprobs only with KL
        rollout = old_quantities(models, scored, pad_id, temperature, ppo)
    with timer("advantages"):
        compute_advantages(rollout, group_ids_B, ppo)
    with timer("train"), at_step(STAGE, step):
        bad = nonfinite_inputs(rollout)
        if bad and ppo.on_nonfinite == "error":
            raise NonFiniteError(f"non-finite {describe(bad)}; the last committed checkpoint is kept")
        if bad:  # skip: this step leaves the weights as they were
            distributed.print0(f"{STAGE} step {step}: non-finite {describe(bad)}; step skipped (no update)")
            stats = {}
        else:
            stats = update(models, rollout, ppo, temperature, train_policy, (config.seed, step))
        stats["skipped_nonfinite"] = float(bool(bad))
    with timer("push_weights"):
        generator.wake()
        push_weights(generator, models, ppo.policy_optim, version=step)
    return StepOutcome(rollout, scored, stats)


def push_weights(generator, models: Models, policy_optim, version: int) -> None:
    """The policy's current weights to the generator (ZeRO-3: gathered from every rank's shards)."""
    if isinstance(generator, HFGenerator) or policy_optim.zero_stage != 3:
        generator.update_weights(models.policy, version=version)
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(models.policy.parameters())):
        generator.update_weights(models.policy, version=version)


# ---------------------------------------------------------------------------------------------
# steps 3-5: old quantities, rewards, advantages
# ---------------------------------------------------------------------------------------------
class Rollout:
    """The step's rows as tensors; filled in by steps 3-5."""

    def __init__(self, scored: list[ScoredSample], pad_id: int):
        self.prompt_ids, self.response_ids, self.rewards_B = training_batch(scored)
        self.batch: TokenBatch = build_token_batch(self.prompt_ids, self.response_ids, pad_id)
        self.mask_BT = self.batch.response_mask_BT
        self.is_correct_B = torch.tensor([s.is_correct for s in scored], dtype=torch.bool)
        self.pad_id = pad_id
        self.logprob_gen_diff = 0.0
        self.old_logprobs_BT = self.ref_logprobs_BT = self.old_values_BT = None
        self.advantages_BT = self.returns_BT = None


@torch.no_grad()
def old_quantities(models: Models, scored, pad_id: int, temperature: float, ppo: PPOConfig) -> Rollout:
    """Step 3: old logprobs recomputed by the policy (checked against the sampler's), reference
    logprobs (kl_coef > 0), old values (critic)."""
    rollout = Rollout(scored, pad_id)
    micro = ppo.policy_optim.micro_batch_size
    if models.shared:  # old logprobs and old values from one trunk forward per micro-batch
        rollout.old_logprobs_BT, _, rollout.old_values_BT = response_logprobs_and_values(
            models.critic, rollout.batch, temperature, micro
        )
    else:
        rollout.old_logprobs_BT, _ = response_logprobs(models.policy, rollout.batch, temperature, micro)
    sampler_BT = torch.zeros_like(rollout.old_logprobs_BT)
    for b, s in enumerate(scored):
        sampler_BT[b, : len(s.logprobs)] = torch.tensor(s.logprobs)
    diff = (rollout.old_logprobs_BT - sampler_BT).abs().masked_fill(~rollout.mask_BT, 0).max()
    rollout.logprob_gen_diff = float(distributed.all_reduce(diff, "max"))
    if models.reference is not None:
        rollout.ref_logprobs_BT, _ = response_logprobs(models.reference, rollout.batch, temperature, micro)
    if models.critic is not None and not models.shared:
        rollout.old_values_BT = response_values(models.critic, rollout.batch, micro)
    return rollout


def nonfinite_inputs(rollout: Rollout) -> dict[str, tuple[int, int]]:
    """What of the step's data is NaN/inf (over all ranks): checked before any update."""
    named = {
        "reward": rollout.rewards_B, "old_logprobs": rollout.old_logprobs_BT, "ref_logprobs": rollout.ref_logprobs_BT,
        "values": rollout.old_values_BT, "advantages": rollout.advantages_BT, "returns": rollout.returns_BT,
    }  # fmt: skip
    return nonfinite_counts(named, rollout.mask_BT)


def compute_advantages(rollout: Rollout, group_ids_B: Tensor, ppo: PPOConfig) -> None:
    """Steps 4-5: per-token rewards (outcome on the last token, KL in the reward) -> advantages (0 where masked)."""
    mask_BT = rollout.mask_BT
    kl_BT = None
    if rollout.ref_logprobs_BT is not None and ppo.kl_placement == "reward":
        kl_BT = kl_penalty(rollout.old_logprobs_BT, rollout.ref_logprobs_BT, ppo.kl_estimator) * mask_BT
    if ppo.advantage_estimator == "grpo":
        scores_B = rollout.rewards_B - (ppo.kl_coef * kl_BT.sum(1) if kl_BT is not None else 0.0)
        rollout.advantages_BT = grpo_advantages(scores_B, group_ids_B)[:, None] * mask_BT
        return
    rewards_BT = outcome_rewards_to_tokens(rollout.rewards_B, mask_BT)
    if kl_BT is not None:
        rewards_BT = rewards_BT - ppo.kl_coef * kl_BT
    lam_policy = ppo.lam_policy
    if ppo.length_adaptive_alpha is not None:
        lam_policy = length_adaptive_lambda(mask_BT.sum(1), ppo.length_adaptive_alpha)
    advantages_BT, rollout.returns_BT = compute_decoupled_gae(
        rewards_BT, rollout.old_values_BT, mask_BT, ppo.gamma, lam_policy, ppo.lam_critic
    )
    if ppo.whiten_advantages:  # over the global batch: moments all-reduced over ranks
        moments = moments_from_sums(
            distributed.all_reduce(masked_moments_sums(advantages_BT.double(), mask_BT))
        )
        advantages_BT = masked_whiten(advantages_BT, mask_BT, moments=tuple(x.float() for x in moments))
    rollout.advantages_BT = advantages_BT * mask_BT


# ---------------------------------------------------------------------------------------------
# step 6: updates
# ---------------------------------------------------------------------------------------------
def update(
    models: Models, rollout: Rollout, ppo: PPOConfig, temperature: float, train_policy: bool, seed
) -> dict:
    """`epochs` seeded shuffles of the rows, each split into `minibatches` optimizer steps. Mean stats."""
    rows = rollout.mask_BT.shape[0]
    shuffle = torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
    totals: dict[str, Tensor] = {}
    norms: dict[str, list[float]] = {}  # global already (the same on every rank): not reduced again
    for _ in range(ppo.epochs):
        order = torch.randperm(rows, generator=shuffle)
        for part in order.chunk(ppo.minibatches):
            stats = _minibatch_step(models, rollout, part, ppo, temperature, train_policy, norms)
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


def _global_counts(rollout: Rollout, part: Tensor, agg: str) -> tuple[Tensor, Tensor]:
    """Loss denominators of one optimizer batch over all ranks: (all, correct) tokens or sequences."""
    mask_BT = rollout.mask_BT[part]
    positive_BT = mask_BT & rollout.is_correct_B[part, None]
    if agg == "token_mean":
        counts = torch.stack([mask_BT.sum(), positive_BT.sum()]).float()
    else:
        counts = torch.stack([mask_BT.any(1).sum(), positive_BT.any(1).sum()]).float()
    count, positive = distributed.all_reduce(counts).unbind()
    return count.clamp(min=1), positive.clamp(min=1)


def _minibatch_step(
    models: Models, rollout: Rollout, part: Tensor, ppo: PPOConfig, temperature, train_policy, norms
) -> dict:
    """One optimizer step of the policy engine (+ the value loss in shared mode) and one of the critic engine.

    Appends each update's gradient norm (before clipping) to `norms["grad_norm_policy"/"_critic"]`.

    Each micro-batch loss is normalised by the optimizer batch's global count and scaled by
    (accumulation steps x ranks), which DeepSpeed divides back out: the gradient is that of one big
    batch (sft `_train_step`, `aggregate_loss`).
    """
    counts = _global_counts(rollout, part, ppo.loss_agg)
    stats: dict[str, Tensor] = {}
    world = distributed.world_size()
    if train_policy or models.shared:
        engine, optim = models.policy_engine, ppo.policy_optim
        for idx in part.split(optim.micro_batch_size):
            mb = build_token_batch(
                [rollout.prompt_ids[i] for i in idx], [rollout.response_ids[i] for i in idx], rollout.pad_id
            )
            loss, values_BT = torch.zeros(()), None
            if train_policy:
                if models.shared:  # one trunk forward for the logprobs and the values
                    logprobs_BT, entropy_BT, values_BT = response_logprobs_and_values(
                        engine, mb, temperature, with_entropy=True
                    )
                else:
                    logprobs_BT, entropy_BT = response_logprobs(
                        models.policy, mb, temperature, with_entropy=True
                    )
                loss, policy_stats = _policy_terms(logprobs_BT, entropy_BT, idx, rollout, ppo, counts)
                _add(stats, policy_stats)
            if models.shared:
                values_BT = response_values(engine, mb) if values_BT is None else values_BT
                value, value_stats = _value_terms(values_BT, idx, rollout, ppo, counts[0])
                loss = loss + ppo.value_loss_coef * value
                _add(stats, value_stats)
            require_finite(loss, "policy loss" if train_policy else "value loss")
            engine.backward(loss * optim.grad_accum_steps * world)
            _record(norms, "grad_norm_policy", step_engine(engine))
    if models.critic_engine is not None:
        engine, optim = models.critic_engine, ppo.critic_optim
        for idx in part.split(optim.micro_batch_size):
            mb = build_token_batch(
                [rollout.prompt_ids[i] for i in idx], [rollout.response_ids[i] for i in idx], rollout.pad_id
            )
            value, value_stats = _value_terms(response_values(engine, mb), idx, rollout, ppo, counts[0])
            require_finite(value, "value loss")
            engine.backward(ppo.value_loss_coef * value * optim.grad_accum_steps * world)
            _record(norms, "grad_norm_critic", step_engine(engine))
            _add(stats, value_stats)
    return stats


def _record(norms: dict[str, list[float]], name: str, norm: float | None) -> None:
    if norm is not None:
        norms.setdefault(name, []).append(norm)


def _add(totals: dict[str, Tensor], stats: dict[str, Tensor]) -> None:
    for name, value in stats.items():
        totals[name] = totals.get(name, 0.0) + value.detach()


def _policy_terms(
    logprobs_BT, entropy_BT, idx, rollout: Rollout, ppo: PPOConfig, counts
) -> tuple[Tensor, dict]:
    """Clipped surrogate - entropy_coef x entropy (+ kl_coef x KL) (+ positive-example LM loss).

    Stats are sums over this micro-batch's tokens (means are taken over all tokens in `update`).
    """
    T = logprobs_BT.shape[1]
    mask_BT = rollout.mask_BT[idx, :T]
    count, positive = counts
    pg, pg_stats = policy_loss(
        logprobs_BT, rollout.old_logprobs_BT[idx, :T], rollout.advantages_BT[idx, :T], mask_BT,
        ppo.clip_low, ppo.clip_high, ppo.loss_agg, global_count=count,
    )  # fmt: skip
    entropy = aggregate_loss(entropy_BT, mask_BT, ppo.loss_agg, global_count=count)
    loss = pg - ppo.entropy_coef * entropy
    tokens = mask_BT.sum().float()
    stats = {"policy_loss": pg, "entropy": (entropy_BT * mask_BT).sum(), "tokens": tokens}
    stats |= {"clipfrac": pg_stats["clipfrac"] * tokens, "approx_kl": pg_stats["approx_kl"] * tokens}
    if rollout.ref_logprobs_BT is not None:
        kl_BT = kl_penalty(logprobs_BT, rollout.ref_logprobs_BT[idx, :T], ppo.kl_estimator)
        stats["kl"] = (kl_BT * mask_BT).sum()
        if ppo.kl_placement == "loss":
            loss = loss + ppo.kl_coef * aggregate_loss(kl_BT, mask_BT, ppo.loss_agg, global_count=count)
    if ppo.positive_lm_coef > 0:
        lm, _ = positive_example_lm_loss(
            logprobs_BT,
            mask_BT,
            rollout.is_correct_B[idx],
            ppo.positive_lm_coef,
            ppo.loss_agg,
            global_count=positive,
        )
        loss, stats["positive_lm_loss"] = loss + lm, lm
    return loss, stats


def _value_terms(values_BT, idx, rollout: Rollout, ppo: PPOConfig, count) -> tuple[Tensor, dict]:
    T = values_BT.shape[1]
    mask_BT = rollout.mask_BT[idx, :T]
    loss, stats = value_loss(
        values_BT, rollout.old_values_BT[idx, :T], rollout.returns_BT[idx, :T], mask_BT, ppo.vf_clip,
        ppo.loss_agg, global_count=count,
    )  # fmt: skip
    tokens = mask_BT.sum().float()
    return loss, {"value_loss": loss, "value_clipfrac": stats["clipfrac"] * tokens, "value_tokens": tokens}


# ---------------------------------------------------------------------------------------------
# step 7: metrics, rollouts, export
# ---------------------------------------------------------------------------------------------
def step_metrics(
    rollout: Rollout, scored: list[ScoredSample], stats: dict, models: Models
) -> dict[str, float]:
    """The step's metrics over all ranks (value diagnostics: this rank's rows), namespaced `ppo/`."""
    mask_BT = rollout.mask_BT
    advantages = rollout.advantages_BT[mask_BT].double()
    sums = torch.stack([
        torch.tensor(float(len(scored))), rollout.rewards_B.sum(), torch.tensor([s.score for s in scored]).sum(),
        rollout.is_correct_B.sum(), mask_BT.sum(), advantages.sum(), (advantages**2).sum(),
        torch.tensor(float(sum(s.finish_reason == "length" for s in scored))),
    ]).double()  # fmt: skip
    n, reward, score, correct, tokens, adv_sum, adv_sq, truncated = distributed.all_reduce(sums).tolist()
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
        f"{STAGE}/logprob_gen_diff": rollout.logprob_gen_diff,
        f"{STAGE}/lr_policy": models.policy_engine.get_lr()[0],
    }
    if models.critic_engine is not None:
        metrics[f"{STAGE}/lr_critic"] = models.critic_engine.get_lr()[0]
    if rollout.old_values_BT is not None:
        metrics[f"{STAGE}/explained_var"] = _global_explained_var(
            rollout.old_values_BT, rollout.returns_BT, mask_BT
        )
        diagnostics = value_diagnostics(
            rollout.old_values_BT, rollout.returns_BT, rollout.advantages_BT, mask_BT, rollout.is_correct_B
        )
        metrics |= scalar_metrics(diagnostics, f"{STAGE}/value")
    return metrics


def _global_explained_var(values_BT: Tensor, returns_BT: Tensor, mask_BT: Tensor) -> float:
    """1 - Var[R - V] / Var[R] over the valid tokens of all ranks (values from before the update); NaN if R is constant."""
    sums = torch.stack(
        [masked_moments_sums(returns_BT, mask_BT), masked_moments_sums(returns_BT - values_BT, mask_BT)]
    )
    (_, var_returns), (_, var_residual) = map(
        moments_from_sums, distributed.all_reduce(sums.double()).unbind()
    )
    return float("nan") if var_returns <= 1e-12 else float(1 - var_residual / var_returns)


def rollout_table(rollout: Rollout, scored: list[ScoredSample], run_id: str, step: int) -> dict[str, list]:
    return rollout_columns(
        scored, run_id=run_id, stage=STAGE, step=step, values_BT=rollout.old_values_BT,
        advantages_BT=rollout.advantages_BT, returns_BT=rollout.returns_BT, ref_logprobs_BT=rollout.ref_logprobs_BT,
    )  # fmt: skip
