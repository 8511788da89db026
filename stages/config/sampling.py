"""How rollouts are sampled (backend, temperature, budget) and how a sampled response is scored."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stages.config.section import Section, non_semantic, semantic_dict


class SamplingConfig(Section):
    """How rollouts are sampled, and by which backend."""

    temperature: float = Field(
        1.0,
        ge=0.0,
        description="Sampling temperature; logits are divided by it. 0 = greedy decoding. The trainer "
        "must compute logprobs at the same temperature.",
    )
    top_p: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling: sample among the smallest set of tokens whose probability reaches "
        "top_p. 1.0 = no truncation. Recorded logprobs stay those of the untruncated distribution.",
    )
    max_new_tokens: int = Field(
        256, ge=1, description="Maximum response length in tokens (the EOS token included)."
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="hf: batched decode loop with a KV cache on the training model (CPU or GPU). "
        "vllm: a vLLM engine (GPU only), weights pushed after every policy update.",
    )
    hf_batch_size: int | None = non_semantic(
        None,
        ge=1,
        description="hf only: prompts per decode batch (bounds memory). None = all prompts in one batch. "
        "Results do not depend on it beyond float rounding.",
    )
    gpu_memory_utilization: float = non_semantic(
        0.5,
        gt=0.0,
        le=1.0,
        description="vllm only: fraction of GPU memory vLLM may take for weights and KV cache. Leave room "
        "for the training engine when colocated.",
    )
    colocate: bool = non_semantic(
        True,
        description="vllm only: true puts the engine (on the training GPUs) to sleep between rollout phases "
        "(weights offloaded, KV cache freed) so the updates get the memory; false keeps it awake "
        "(faster, when the GPUs hold both). vLLM on GPUs of its own is not built yet.",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="vllm only: GPUs one vLLM engine shards the model over."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="vllm only: weight/activation dtype of the engine (auto = the checkpoint's)."
    )


class RewardConfig(Section):
    """How a sampled response is scored (critic warmup and PPO share it)."""

    verifier: bool = Field(True, description="Score 1 for a verified correct final answer, 0 otherwise.")
    rm_coef: float = Field(
        0.0,
        ge=0,
        description="Weight of the reward model's score; 0 uses no reward model (verifiable rewards only).",
    )
    missing_eos_penalty: float = Field(
        0.0, ge=0, description="Subtracted from the score of a response cut at max_new_tokens (no EOS)."
    )


# Settings only the vLLM backend reads: they do not change what the hf backend samples.
VLLM_ONLY = ("tensor_parallel_size", "dtype")


def sampling_plan(sampling: SamplingConfig) -> dict:
    """The sampling settings a stage's result depends on: the semantic ones its backend reads (so
    changing a vLLM-only setting does not rerun stages that sample with hf)."""
    data = semantic_dict(sampling)
    if sampling.backend != "vllm":
        for name in VLLM_ONLY:
            data.pop(name)
    return data
