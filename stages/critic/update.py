"""The critic's update, shared by critic warmup and PPO: the clipped value loss on a mini-batch of rows,
accumulated over micro-batches into one optimizer step of the critic's own engine.

Shape suffixes: B rows of this rank, T response tokens (right-padded). Value t is read where the
logprob of response token t is (`stages.models.forward`); the loss is normalised by the mini-batch's
global count (`stages.models.minibatches`), so the step is the same on 1 or N ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.algorithms import Aggregation, value_loss
from stages.models.engine import step_engine
from stages.models.forward import TokenRows, response_values
from stages.models.minibatches import accumulation_scale
from stages.runtime.numerics import require_finite

Tensor = torch.Tensor


@dataclass(frozen=True)
class ValueTargets:
    """What the critic regresses onto for a step's rows: returns, around the values it read before."""

    old_values_BT: Tensor
    returns_BT: Tensor
    mask_BT: Tensor


def value_terms(
    values_BT: Tensor, idx: Tensor, targets: ValueTargets, clip_range: float | None, agg: Aggregation, count
) -> tuple[Tensor, dict[str, Tensor]]:
    """The value loss of rows `idx` (normalised by the mini-batch's global `count`) and its stats,
    summed over this micro-batch's tokens: value_loss, value_clipfrac x tokens, value_tokens."""
    T = values_BT.shape[1]
    mask_BT = targets.mask_BT[idx, :T]
    loss, stats = value_loss(
        values_BT, targets.old_values_BT[idx, :T], targets.returns_BT[idx, :T], mask_BT, clip_range, agg,
        global_count=count,
    )  # fmt: skip
    tokens = mask_BT.sum().float()
    return loss, {"value_loss": loss, "value_clipfrac": stats["clipfrac"] * tokens, "value_tokens": tokens}


def critic_update_step(
    engine,
    critic,
    rows: TokenRows,
    part: Tensor,
    targets: ValueTargets,
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    clip_range: float | None,
    agg: Aggregation,
    count: Tensor,
    coef: float = 1.0,
) -> tuple[dict[str, Tensor], float | None]:
    """One optimizer step of the critic's engine over the rows `part` (this rank's share of the
    mini-batch; `count` is the mini-batch's global loss denominator). `critic` is what values are
    read from: the engine itself, or (critic warmup, shared mode) the policy with the value head
    whose head alone the engine trains.

    Returns the summed stats of `value_terms` and the gradient norm before clipping (None when the
    engine did not reach an accumulation boundary).
    """
    stats: dict[str, Tensor] = {}
    norm = None
    scale = accumulation_scale(grad_accum_steps)
    for idx in part.split(micro_batch_size):
        values_BT = response_values(critic, rows.batch(idx))
        loss, micro_stats = value_terms(values_BT, idx, targets, clip_range, agg, count)
        require_finite(loss, "value loss")
        engine.backward(coef * loss * scale)
        step_norm = step_engine(engine)  # every micro-batch; a norm only at the accumulation boundary
        norm = norm if step_norm is None else step_norm
        for name, value in micro_stats.items():
            stats[name] = stats.get(name, 0.0) + value.detach()
    return stats, norm
