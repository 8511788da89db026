"""Held-out accuracy of a policy: sample, grade, reduce over ranks. Used inside training stages.

Greedy accuracy and sampled accuracy (pass@1: the mean over `samples` samples per problem at the
sampling temperature; more samples shrink the noise of a 200-problem estimate by sqrt(samples)).
A response cut at `max_new_tokens` counts as wrong. (The evaluation stage does the full report.)
"""

from __future__ import annotations

import torch

from stages.config.sampling import SamplingConfig
from stages.data.grading import grade
from stages.data.tasks import EncodedProblem, shard
from stages.runtime import distributed
from stages.sampling.generation import Generator


def heldout_accuracy(
    generator: Generator,
    tokenizer,
    problems: list[EncodedProblem],
    sampling: SamplingConfig,
    seed: int,
    samples: int = 1,
) -> dict[str, float]:
    """{"greedy": ..., "sampled": ..., "truncated": ...} over `problems`, sampled by `generator` (the
    stage's own: the live policy's HF sampler, or the vLLM engine holding its pushed weights);
    collective across ranks.

    "truncated" is the fraction of sampled responses cut at max_new_tokens.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    mine = shard(problems, distributed.rank(), distributed.world_size())
    counts = torch.zeros(4, dtype=torch.float64)  # greedy correct, sampled correct, truncated, n
    for temperature, slot, repeats in ((0.0, 0, 1), (sampling.temperature, 1, samples)):
        settings = sampling.model_copy(update={"temperature": temperature})
        batch = [p for p in mine for _ in range(repeats)]
        generated = generator.generate([p.prompt_ids for p in batch], settings, seed)
        for encoded, sample in zip(batch, generated, strict=True):
            text = tokenizer.decode(sample.response_ids, skip_special_tokens=True)
            correct = sample.finish_reason == "stop" and grade(
                encoded.problem.dataset, text, encoded.problem.answer
            )
            counts[slot] += float(correct) / repeats
            if slot == 1:
                counts[2] += float(sample.finish_reason == "length") / repeats
    counts[3] = len(mine)
    counts = distributed.all_reduce(counts)
    n = max(counts[3].item(), 1.0)
    return {
        "greedy": counts[0].item() / n,
        "sampled": counts[1].item() / n,
        "truncated": counts[2].item() / n,
    }
