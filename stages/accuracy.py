"""Held-out accuracy of a policy: sample, grade, reduce over ranks. Used inside training stages.

Greedy accuracy and sampled accuracy (pass@1 with one sample at the sampling temperature).
A response cut at `max_new_tokens` counts as wrong. (The evaluation stage does the full report.)
"""

from __future__ import annotations

import torch

from stages import distributed
from stages.generation import HFGenerator, SamplingConfig
from stages.rewards import grade
from stages.tasks import EncodedProblem, shard


def heldout_accuracy(
    model,
    tokenizer,
    problems: list[EncodedProblem],
    sampling: SamplingConfig,
    seed: int,
) -> dict[str, float]:
    """{"greedy": ..., "sampled": ..., "truncated": ...} over `problems`; collective across ranks."""
    generator = HFGenerator(model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    mine = shard(problems, distributed.rank(), distributed.world_size())
    counts = torch.zeros(4, dtype=torch.float64)  # greedy correct, sampled correct, truncated, n
    for temperature, slot in ((0.0, 0), (sampling.temperature, 1)):
        settings = sampling.model_copy(update={"temperature": temperature})
        samples = generator.generate([p.prompt_ids for p in mine], settings, seed)
        for encoded, sample in zip(mine, samples, strict=True):
            text = tokenizer.decode(sample.response_ids, skip_special_tokens=True)
            correct = sample.finish_reason == "stop" and grade(
                encoded.problem.dataset, text, encoded.problem.answer
            )
            counts[slot] += float(correct)
            if slot == 1:
                counts[2] += float(sample.finish_reason == "length")
    counts[3] = len(mine)
    counts = distributed.all_reduce(counts)
    n = max(counts[3].item(), 1.0)
    return {
        "greedy": counts[0].item() / n,
        "sampled": counts[1].item() / n,
        "truncated": counts[2].item() / n,
    }
