"""How a step's rows become optimizer steps: seeded shuffles cut into mini-batches, and the global
denominators that make accumulated micro-batch losses exactly one big batch's loss.

Exactness (sft `_train_step`, `stages.algorithms.aggregate_loss`): each micro-batch loss is divided by
the mini-batch's GLOBAL count (all ranks) and scaled by (accumulation steps x ranks), which DeepSpeed
divides back out when it averages gradients; the accumulated gradient is then that of the whole
mini-batch, whatever the micro-batch size or the number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from stages.runtime import distributed

Tensor = torch.Tensor


def shuffled_minibatches(rows: int, epochs: int, minibatches: int, seed: tuple[int, ...]) -> Iterator[Tensor]:
    """Row indices of each optimizer step: `epochs` seeded permutations, each cut into `minibatches` parts.

    Deterministic in `seed` (e.g. (run seed, step)), so a resumed run shuffles as the uninterrupted one.
    """
    shuffle = torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
    for _ in range(epochs):
        yield from torch.randperm(rows, generator=shuffle).chunk(minibatches)


def global_counts(agg: str, *masks_BT: Tensor) -> Tensor:
    """Loss denominators over all ranks, one per mask (one all-reduce), each at least 1: the valid
    tokens (agg "token_mean") or the sequences with a valid token (the seq_mean aggregations)."""
    counts = torch.stack([m.sum() if agg == "token_mean" else m.any(1).sum() for m in masks_BT]).float()
    return distributed.all_reduce(counts).clamp(min=1)


def accumulation_scale(grad_accum_steps: int) -> int:
    """The factor a micro-batch loss normalised by a global count is multiplied by before backward."""
    return grad_accum_steps * distributed.world_size()
