"""Rollout generation: sample responses (with their logprobs) from the current policy.

Two backends behind one `Generator` protocol (DESIGN section 4), picked by `backends.make_generator`:
- `hf_sampler.HFGenerator`: a batched decode loop with a KV cache over any Hugging Face causal LM,
  on CPU or GPU, including the live module of a DeepSpeed ZeRO-3 engine. The default.
- `vllm_sampler.VLLMGenerator`: a thin adapter on vLLM's offline API (GPU only), colocated with
  training (sleep/wake); policy weights are pushed in after every update.

What a logprob means here (both backends, the contract with the trainer):
    logprobs[t] = log_softmax(logits_t / temperature)[response_ids[t]]
i.e. the log-probability of the sampled token under the temperature-scaled distribution BEFORE
top-p truncation. That is exactly what the training forward computes at the same temperature
(`log_softmax(logits / T)` at position prompt_len + t - 1, see `stages/algorithms.py`), so the
PPO ratio starts at 1 when no update happened. With top_p < 1 the tokens are still sampled from
the truncated distribution; the renormalisation term is deliberately left out of the logprob.
With temperature == 0 decoding is greedy and the logprob is the argmax token's under
temperature 1.

Responses contain the EOS token when generation stopped on it (finish_reason "stop") and never
anything after it; "length" means max_new_tokens tokens were generated without an EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from stages.config.sampling import SamplingConfig

FinishReason = Literal["stop", "length"]


@dataclass
class GeneratedSample:
    """One rollout. `logprobs[t]` belongs to `response_ids[t]` (see the module docstring)."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    policy_version: int


class Generator(Protocol):
    """What the rollout stage needs from a generation backend."""

    @property
    def policy_version(self) -> int: ...

    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, seed: int
    ) -> list[GeneratedSample]: ...

    def update_weights(self, weights: Any, version: int) -> None: ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


def row_seed(seed: int, index: int) -> int:
    """Seed of the random stream of prompt `index` in a call with `seed` (63 bits).

    Each prompt has its own stream, so its sample does not depend on the other prompts of the
    batch (nor on micro-batching), yet repeated prompts (GRPO groups) still get different samples.
    """
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


def sampling_seed(seed: int, step: int, rank: int) -> int:
    """Seed of a stage's sampling call of (seed, step, rank): reproducible on resume, distinct per rank and step."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def eos_ids(eos_token_id: int | Sequence[int]) -> list[int]:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        raise ValueError("at least one EOS token id is needed")
    return ids
