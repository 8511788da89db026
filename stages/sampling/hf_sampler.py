"""The Hugging Face sampler: a batched decode loop with a KV cache over the live training module.

Logprobs follow the contract of `stages.sampling.generation` (temperature-scaled, before top-p).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence

import torch

from stages.config.sampling import SamplingConfig
from stages.runtime.threads import refresh_threads
from stages.sampling.generation import GeneratedSample, eos_ids, row_seed

Tensor = torch.Tensor


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
        self.eos_token_ids = eos_ids(eos_token_id)
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

    def close(self) -> None:
        """Drop the model (evaluate builds one generator per checkpoint)."""
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

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
                refresh_threads()  # an evaluation generates for long: follow the CPUs' sharers
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
        cache = _cache_keyword(self.model)
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
                use_cache=True,
                **{cache: getattr(out, cache)},
            )
            next_position = next_position + 1

        # step 3. cut each row after its first EOS.
        tokens_BT = torch.stack(tokens, dim=1).tolist()
        logprobs_BT = torch.stack(logprobs, dim=1).tolist()
        return [
            _to_sample(prompt, row_tokens, row_logprobs, self.eos_token_ids, self._policy_version)
            for prompt, row_tokens, row_logprobs in zip(prompts, tokens_BT, logprobs_BT, strict=True)
        ]


def _cache_keyword(model: torch.nn.Module) -> str:
    """The name of the KV-cache argument (and output): transformers 5 renamed `past_key_values` to
    `cache` (the old name goes in 5.40); older models and remote code keep the old one."""
    forward = getattr(model, "module", model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


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
