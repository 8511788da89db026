"""Losses: the clipped policy surrogate, the clipped value loss, entropy, KL estimators, VAPO's
positive-example LM loss, Bradley-Terry, and how a per-token loss is aggregated.

Shape suffixes: B batch, T response tokens, V vocabulary. Each loss returns a tensor and a dict
of detached statistics; nothing here calls `.item()` or talks to other ranks.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from stages.algorithms.masked import masked_mean, masked_sum

Tensor = torch.Tensor
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]
KLEstimator = Literal["k1", "k2", "k3"]


def aggregate_loss(
    loss_BT: Tensor,
    mask_BT: Tensor,
    agg: Aggregation,
    *,
    global_count: float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar.

    - "token_mean": sum over all valid tokens / number of valid tokens (long answers weigh more).
    - "seq_mean_token_mean": mean over each sequence's tokens, then mean over sequences.
    - "seq_mean_token_sum": sum over each sequence's tokens, then mean over sequences.

    Gradient accumulation: averaging per-micro-batch means is NOT the mean over the whole batch
    when micro-batches hold different token counts. Pass `global_count` = the number of valid
    tokens (token_mean) or of non-empty sequences (seq_mean_*) in the whole optimizer batch,
    summed over micro-batches and all-reduced over ranks, and SUM the micro-batch losses
    (with DeepSpeed, whose backward divides by the accumulation steps, multiply the loss by
    them): the accumulated gradient then equals that of one big batch exactly.
    """
    mask_BT = mask_BT.bool()
    if agg == "token_mean":
        denominator = mask_BT.sum().clamp(min=1) if global_count is None else global_count
        return masked_sum(loss_BT, mask_BT) / denominator
    if agg in ("seq_mean_token_mean", "seq_mean_token_sum"):
        per_seq_B = masked_sum(loss_BT, mask_BT, dim=1)
        tokens_B = mask_BT.sum(dim=1)
        if agg == "seq_mean_token_mean":
            per_seq_B = per_seq_B / tokens_B.clamp(min=1)
        has_tokens_B = tokens_B > 0
        denominator = has_tokens_B.sum().clamp(min=1) if global_count is None else global_count
        return masked_sum(per_seq_B, has_tokens_B) / denominator
    raise ValueError(
        f"unknown loss aggregation {agg!r} (expected token_mean, seq_mean_token_mean or seq_mean_token_sum)"
    )


def policy_loss(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    clip_low: float,
    clip_high: float,
    agg: Aggregation = "token_mean",
    *,
    global_count: float | Tensor | None = None,
    weights_BT: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) with asymmetric clipping (DAPO clip-higher).

    Per token: max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high)), r = exp(logp - old_logp).
    Where the clipped term is the larger, the token's gradient is 0 (the update already moved
    far enough in the advantage's direction). `weights_BT` multiplies each token's term (no
    gradient through it): the truncated importance weights of `truncated_importance_weights`.
    Stats: clipfrac (share of valid tokens where the clipped branch is active), approx_kl (k3 of
    old vs. new, per token mean), ratio mean/max.
    """
    mask_BT = mask_BT.bool()
    log_ratio_BT = logprobs_BT - old_logprobs_BT
    ratio_BT = torch.exp(log_ratio_BT)
    unclipped_BT = -advantages_BT * ratio_BT
    clipped_BT = -advantages_BT * torch.clamp(ratio_BT, 1.0 - clip_low, 1.0 + clip_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    if weights_BT is not None:
        loss_BT = loss_BT * weights_BT.detach()
    loss = aggregate_loss(loss_BT, mask_BT, agg, global_count=global_count)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped_BT > unclipped_BT).to(loss_BT.dtype), mask_BT),
            "approx_kl": masked_mean(torch.expm1(-log_ratio_BT) + log_ratio_BT, mask_BT),
            "ratio_mean": masked_mean(ratio_BT, mask_BT),
            "ratio_max": torch.where(mask_BT, ratio_BT, torch.zeros_like(ratio_BT)).max(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def truncated_importance_weights(old_logprobs_BT: Tensor, sampler_logprobs_BT: Tensor, cap: float) -> Tensor:
    """min(pi_train / pi_sampler, cap) per sampled token: the correction for a sampler that is not the
    trainer (vLLM in bf16, another kernel) - truncated importance sampling (F. Yao et al. 2025, "Your
    Efficient RL Framework Secretly Brings You Off-Policy RL Training"). `old_logprobs_BT` are
    the trainer's log-probs of the sampled tokens before the update, `sampler_logprobs_BT` the
    sampler's. Detached: a weight, never a path for gradients.
    """
    return torch.exp(old_logprobs_BT - sampler_logprobs_BT).clamp(max=cap).detach()


def value_loss(
    values_BT: Tensor,
    old_values_BT: Tensor,
    returns_BT: Tensor,
    mask_BT: Tensor,
    clip_range: float | None,
    agg: Aggregation = "token_mean",
    *,
    global_count: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2).

    The clip keeps the critic near the values the advantages were computed with (as in
    OpenAI baselines' PPO2); `clip_range=None` gives the plain 0.5 * (V - R)^2.
    Stats: clipfrac (share of valid tokens where the clipped branch is the larger), mean value, mean return.
    """
    mask_BT = mask_BT.bool()
    unclipped_BT = (values_BT - returns_BT) ** 2
    if clip_range is None:
        loss_BT = 0.5 * unclipped_BT
        clipfrac = torch.zeros((), dtype=values_BT.dtype, device=values_BT.device)
    else:
        clipped_values_BT = torch.clamp(values_BT, old_values_BT - clip_range, old_values_BT + clip_range)
        clipped_BT = (clipped_values_BT - returns_BT) ** 2
        loss_BT = 0.5 * torch.maximum(unclipped_BT, clipped_BT)
        clipfrac = masked_mean((clipped_BT > unclipped_BT).to(values_BT.dtype), mask_BT)
    loss = aggregate_loss(loss_BT, mask_BT, agg, global_count=global_count)
    stats = {
        "clipfrac": clipfrac.detach(),
        "values_mean": masked_mean(values_BT, mask_BT).detach(),
        "returns_mean": masked_mean(returns_BT, mask_BT).detach(),
    }
    return loss, stats


def entropy_from_logits(logits_BTV: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position: logsumexp(z) - sum(softmax(z) * z), shape [B, T]."""
    probs_BTV = torch.softmax(logits_BTV, dim=-1)
    return torch.logsumexp(logits_BTV, dim=-1) - (probs_BTV * logits_BTV).sum(dim=-1)


def kl_penalty(logprobs_BT: Tensor, ref_logprobs_BT: Tensor, estimator: KLEstimator) -> Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's blog).

    - "k1": logp - ref (unbiased, high variance, can be negative);
    - "k2": 0.5 * (logp - ref)^2 (low variance; its gradient is k1 * d logp);
    - "k3": exp(ref - logp) - (ref - logp) - 1 (unbiased, always >= 0).
    Used either in the per-token reward or as a loss term: the caller decides and masks.
    """
    log_ratio_BT = logprobs_BT - ref_logprobs_BT
    if estimator == "k1":
        return log_ratio_BT
    if estimator == "k2":
        return 0.5 * log_ratio_BT**2
    if estimator == "k3":
        return torch.expm1(-log_ratio_BT) + log_ratio_BT
    raise ValueError(f"unknown KL estimator {estimator!r} (expected k1, k2 or k3)")


def positive_example_lm_loss(
    logprobs_BT: Tensor,
    mask_BT: Tensor,
    is_correct_B: Tensor,
    coef: float,
    agg: Aggregation = "token_mean",
    *,
    global_count: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """VAPO's positive-example LM loss (section 4.2): coef * NLL of the responses marked correct.

    Imitating the sampled correct answers makes better use of the rare positive samples.
    Only tokens of correct responses count (aggregated with `agg`); a batch without any
    correct response gives 0 with a zero gradient.
    """
    positive_mask_BT = mask_BT.bool() & is_correct_B.bool()[:, None]
    nll = aggregate_loss(-logprobs_BT, positive_mask_BT, agg, global_count=global_count)
    stats = {"n_positive": is_correct_B.bool().sum().to(logprobs_BT.dtype).detach(), "nll": nll.detach()}
    return coef * nll, stats


def bradley_terry_loss(
    chosen_B: Tensor, rejected_B: Tensor, margin_B: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reward-model pairwise loss, mean over pairs of -log sigmoid(chosen - rejected - margin).

    Bradley & Terry (1952); the margin term is Llama 2's (arXiv 2307.09288, eq. 2): pairs whose
    preference is stronger must be separated by more. Equal scores give log 2.
    Stats: accuracy (share of pairs with chosen > rejected) and the mean score gap.
    """
    gap_B = chosen_B - rejected_B
    shifted_B = gap_B if margin_B is None else gap_B - margin_B
    loss = -F.logsigmoid(shifted_B).mean()
    stats = {"accuracy": (gap_B > 0).to(chosen_B.dtype).mean().detach(), "gap_mean": gap_B.mean().detach()}
    return loss, stats
