"""Rollout generation: sample responses (with their logprobs) from the current policy.

Two backends behind one `Generator` protocol (DESIGN section 4):
- `HFGenerator`: a batched decode loop with a KV cache over any Hugging Face causal LM, on CPU
  or GPU, including the live module of a DeepSpeed ZeRO-3 engine. The default.
- `VLLMGenerator`: a thin adapter on vLLM's documented offline API (GPU only), colocated with
  training (sleep/wake) or on dedicated GPUs; policy weights are pushed in after every update.

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

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from pydantic import Field

from stages.config import Section, non_semantic

Tensor = torch.Tensor
FinishReason = Literal["stop", "length"]

# vLLM weight pushes are sent in buckets of about this many bytes (one RPC each), so a large
# model is not serialised into one giant message.
_VLLM_PUSH_BUCKET_BYTES = 512 * 1024 * 1024


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
        description="vllm only: the engine shares GPUs with training; it is created with sleep mode and "
        "put to sleep (weights offloaded, KV cache freed) between rollout phases.",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="vllm only: GPUs one vLLM engine shards the model over."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="vllm only: weight/activation dtype of the engine (auto = the checkpoint's)."
    )


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


def _eos_set(eos_token_id: int | Sequence[int]) -> list[int]:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        raise ValueError("at least one EOS token id is needed")
    return ids


# ---------------------------------------------------------------------------------------------
# Hugging Face backend
# ---------------------------------------------------------------------------------------------
class HFGenerator:
    """Batched sampling from a Hugging Face causal LM with a KV cache (own decode loop).

    `model` is used live: when the trainer updates it in place (the usual case, also for the
    module of a DeepSpeed engine, which is unwrapped via `.module`), `update_weights(model, v)`
    only records the new policy version. A state dict can be loaded instead (unsharded models only).

    Under ZeRO-3 all parameters are gathered once for the whole rollout (each rank then holds the
    full model during generation; that is what decoding needs anyway) and re-partitioned after.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        eos_token_id: int | Sequence[int],
        pad_token_id: int,
        policy_version: int = 0,
    ):
        self.model = getattr(model, "module", model)  # a DeepSpeed engine / DDP wrapper -> its module
        self.eos_token_ids = _eos_set(eos_token_id)
        self.pad_token_id = pad_token_id
        self._policy_version = policy_version

    @property
    def policy_version(self) -> int:
        return self._policy_version

    def update_weights(self, weights: torch.nn.Module | Mapping[str, Tensor] | None, version: int) -> None:
        """Record `version`; load `weights` unless it is the live module itself (or None)."""
        module = getattr(weights, "module", weights)
        if module is not None and module is not self.model:
            state = module.state_dict() if isinstance(module, torch.nn.Module) else dict(module)
            self.model.load_state_dict(state)
        self._policy_version = version

    def sleep(self) -> None:
        """No-op: the HF backend holds no memory of its own between rollouts."""

    def wake(self) -> None:
        """No-op (see `sleep`)."""

    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, seed: int
    ) -> list[GeneratedSample]:
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("empty prompt: every prompt needs at least one token")
        batch_size = sampling.hf_batch_size or max(len(prompt_ids), 1)
        samples: list[GeneratedSample] = []
        with self._generation_mode():
            for start in range(0, len(prompt_ids), batch_size):
                chunk = prompt_ids[start : start + batch_size]
                seeds = [row_seed(seed, start + i) for i in range(len(chunk))]
                samples.extend(self._generate_batch(chunk, sampling, seeds))
        return samples

    @contextlib.contextmanager
    def _generation_mode(self) -> Iterator[None]:
        """eval mode + no_grad, ZeRO-3 parameters gathered; the training mode is restored after."""
        was_training = self.model.training
        with contextlib.ExitStack() as stack:
            params = list(self.model.parameters())
            if any(hasattr(p, "ds_id") for p in params):
                import deepspeed  # lazy: only for ZeRO-3 partitioned models

                # Gather once for the whole rollout instead of once per layer per decode step.
                stack.enter_context(deepspeed.zero.GatheredParameters(params, modifier_rank=None))
            stack.enter_context(torch.no_grad())
            self.model.eval()
            try:
                yield
            finally:
                self.model.train(was_training)

    def _generate_batch(
        self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int]
    ) -> list[GeneratedSample]:
        device = next(self.model.parameters()).device
        batch = len(prompts)
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        eos = torch.tensor(self.eos_token_ids, device=device)

        # step 1. prefill the LEFT-padded prompts; positions count real tokens only, so every
        # prompt sees the positions 0..len-1 it would see alone (and in the training forward).
        input_ids, attention_mask = _left_pad(prompts, self.pad_token_id, device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits: [B, 1, V], not [B, L, V]
        )
        next_position = position_ids[:, -1:] + 1

        # step 2. decode one token per step; a row that emitted EOS keeps running on padding.
        tokens, logprobs = [], []
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(sampling.max_new_tokens):
            token, logprob = sample_next_token(out.logits[:, -1], sampling, generators)
            token = torch.where(finished, self.pad_token_id, token)
            tokens.append(token)
            logprobs.append(logprob)
            finished |= torch.isin(token, eos)
            if bool(finished.all()) or step == sampling.max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            out = self.model(
                input_ids=token[:, None],
                attention_mask=attention_mask,
                position_ids=next_position,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            next_position = next_position + 1

        # step 3. cut each row after its first EOS.
        tokens_BT = torch.stack(tokens, dim=1).tolist()
        logprobs_BT = torch.stack(logprobs, dim=1).tolist()
        return [
            _to_sample(prompt, row_tokens, row_logprobs, self.eos_token_ids, self._policy_version)
            for prompt, row_tokens, row_logprobs in zip(prompts, tokens_BT, logprobs_BT, strict=True)
        ]


def _left_pad(prompts: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def sample_next_token(
    logits_BV: Tensor, sampling: SamplingConfig, generators: list[torch.Generator]
) -> tuple[Tensor, Tensor]:
    """(token_B, logprob_B) for one decode step; one generator per row (its own random stream).

    Sampling uses the exponential race (argmax of probs / Exp(1) noise, equivalent to drawing from
    probs; vLLM's sampler does the same), with one noise draw per row per step, so a row's stream
    does not depend on the other rows. The logprob is log_softmax(logits / T) of the token, before
    top-p truncation (module docstring); for T == 0 the argmax token's at T = 1.
    """
    logits_BV = logits_BV.float()
    if sampling.temperature == 0:
        logprobs_BV = torch.log_softmax(logits_BV, dim=-1)
        token_B = logits_BV.argmax(dim=-1)
        return token_B, logprobs_BV.gather(-1, token_B[:, None]).squeeze(-1)

    logprobs_BV = torch.log_softmax(logits_BV / sampling.temperature, dim=-1)
    probs_BV = logprobs_BV.exp()
    if sampling.top_p < 1.0:
        probs_BV = _top_p_filter(probs_BV, sampling.top_p)
    noise_BV = torch.empty_like(probs_BV)
    for row, generator in enumerate(generators):
        noise_BV[row].exponential_(generator=generator)
    token_B = (probs_BV / noise_BV).argmax(dim=-1)
    return token_B, logprobs_BV.gather(-1, token_B[:, None]).squeeze(-1)


def _top_p_filter(probs_BV: Tensor, top_p: float) -> Tensor:
    """Zero the tokens outside the nucleus: keep the most likely tokens until their mass reaches top_p.

    A token is dropped when the mass of the strictly more likely tokens already reaches top_p; the
    most likely token is always kept (as Holtzman et al. 2019, arXiv 1904.09751, and HF/vLLM).
    """
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    mass_before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
    drop_sorted_BV = mass_before_BV >= top_p
    drop_sorted_BV[:, 0] = False
    drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
    return probs_BV.masked_fill(drop_BV, 0.0)


def _to_sample(
    prompt: list[int], tokens: list[int], logprobs: list[float], eos_token_ids: list[int], version: int
) -> GeneratedSample:
    """Keep tokens up to and including the first EOS; "stop" if there was one, else "length"."""
    stop_at = next((i for i, tok in enumerate(tokens) if tok in eos_token_ids), None)
    if stop_at is None:
        return GeneratedSample(list(prompt), tokens, logprobs, "length", version)
    return GeneratedSample(list(prompt), tokens[: stop_at + 1], logprobs[: stop_at + 1], "stop", version)


# ---------------------------------------------------------------------------------------------
# vLLM backend (GPU only; vllm is imported lazily so this module imports without it)
# ---------------------------------------------------------------------------------------------
class VLLMWorkerExtension:
    """Methods mixed into every vLLM worker (`LLM(worker_extension_cls=...)`), called through
    `llm.collective_rpc(name, args=...)`. This is vLLM's documented RLHF pattern:
    https://github.com/vllm-project/vllm/blob/main/examples/offline_inference/rlhf_utils.py
    (`WorkerExtension.update_weight` calls `self.model_runner.model.load_weights(weights=...)`).
    Each tensor-parallel worker keeps its own shard: `load_weights` takes full HF-named tensors.
    """

    def rlpipe_load_weights(self, named_tensors: list[tuple[str, Tensor]]) -> None:
        self.model_runner.model.load_weights(weights=named_tensors)  # type: ignore[attr-defined]


class VLLMGenerator:
    """Adapter on `vllm.LLM` (offline inference). Weights come from `model_path` at start, then from
    `update_weights` after every policy update.

    Logprobs: the engine runs with `logprobs_mode="processed_logprobs"` (vLLM >= 0.10.2), i.e.
    log_softmax of the temperature-scaled logits, which matches the module's contract when
    top_p == 1. NOTE: with top_p < 1 vLLM reports the logprob under the truncated, renormalised
    distribution (its processed logits are taken after top-k/top-p), unlike the HF backend.
    """

    def __init__(
        self,
        model_path: str,
        sampling: SamplingConfig,
        eos_token_id: int | Sequence[int],
        seed: int = 0,
        policy_version: int = 0,
    ):
        from vllm import LLM

        self.eos_token_ids = _eos_set(eos_token_id)
        self.colocate = sampling.colocate
        self._asleep = False
        self._policy_version = policy_version
        self.llm = LLM(
            model=model_path,
            dtype=sampling.dtype,
            gpu_memory_utilization=sampling.gpu_memory_utilization,
            tensor_parallel_size=sampling.tensor_parallel_size,
            enable_sleep_mode=sampling.colocate,
            seed=seed,
            logprobs_mode="processed_logprobs",
            # Sampling is fully specified by us: do not inherit the checkpoint's generation_config
            # defaults (top_k, repetition penalty...).
            generation_config="vllm",
            worker_extension_cls=f"{__name__}.{VLLMWorkerExtension.__name__}",
        )

    @property
    def policy_version(self) -> int:
        return self._policy_version

    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, seed: int
    ) -> list[GeneratedSample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_awake("generate")
        params = [
            SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                logprobs=0,  # only the sampled token's logprob
                seed=row_seed(seed, i),  # one stream per prompt, as in the HF backend
                stop_token_ids=self.eos_token_ids,
                detokenize=False,
            )
            for i in range(len(prompt_ids))
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        return [
            self._to_sample(prompt, out.outputs[0]) for prompt, out in zip(prompt_ids, outputs, strict=True)
        ]

    def _to_sample(self, prompt: list[int], completion: Any) -> GeneratedSample:
        tokens = list(completion.token_ids)
        logprobs = [float(step[tok].logprob) for step, tok in zip(completion.logprobs, tokens, strict=True)]
        if completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request ended with finish_reason={completion.finish_reason!r}")
        return GeneratedSample(list(prompt), tokens, logprobs, completion.finish_reason, self._policy_version)

    def update_weights(
        self, weights: torch.nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], version: int
    ) -> None:
        """Push HF-named tensors (a module's state dict, a state dict or its items) into every
        worker, then reset the prefix cache (its KV entries were computed with the old weights).
        A ZeRO-3 module must be called inside `deepspeed.zero.GatheredParameters` (its parameters
        are partitioned otherwise)."""
        self._check_awake("update_weights")
        if isinstance(weights, torch.nn.Module):
            weights = getattr(weights, "module", weights).state_dict()
        items = weights.items() if isinstance(weights, Mapping) else weights
        for bucket in _buckets(items, _VLLM_PUSH_BUCKET_BYTES):
            self.llm.collective_rpc("rlpipe_load_weights", args=(bucket,))
        self.llm.reset_prefix_cache()
        self._policy_version = version

    def sleep(self) -> None:
        """Colocated: offload weights to CPU and free the KV cache (`llm.sleep(level=1)`)."""
        if self.colocate and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        if self.colocate and self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def _check_awake(self, what: str) -> None:
        if self._asleep:
            raise RuntimeError(f"VLLMGenerator.{what} called while the engine sleeps: call wake() first")


def _buckets(items: Iterable[tuple[str, Tensor]], max_bytes: int) -> Iterator[list[tuple[str, Tensor]]]:
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, tensor in items:
        tensor = tensor.detach().cpu().contiguous()
        if bucket and size + tensor.nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor.nbytes
    if bucket:
        yield bucket


# ---------------------------------------------------------------------------------------------
# factory
# ---------------------------------------------------------------------------------------------
def make_generator(
    sampling: SamplingConfig,
    model_or_path: torch.nn.Module | str,
    *,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    seed: int = 0,
) -> Generator:
    """The backend named by `sampling.backend`: hf takes a live module (or loads a path), vllm a path."""
    if sampling.backend == "vllm":
        if not isinstance(model_or_path, str):
            raise TypeError("the vllm backend starts from a model path (weights are pushed after updates)")
        return VLLMGenerator(model_or_path, sampling, eos_token_id=eos_token_id, seed=seed)
    if isinstance(model_or_path, str):
        from transformers import AutoModelForCausalLM

        model_or_path = AutoModelForCausalLM.from_pretrained(model_or_path)
    return HFGenerator(model_or_path, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
