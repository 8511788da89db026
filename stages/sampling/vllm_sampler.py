"""The vLLM sampler (GPU only; vllm is imported lazily so this module imports without it).

Logprobs follow the contract of `stages.sampling.generation`; see `VLLMGenerator` for top-p.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from stages.config.sampling import SamplingConfig
from stages.sampling.generation import GeneratedSample, eos_ids, row_seed

Tensor = torch.Tensor

# vLLM weight pushes are sent in buckets of about this many bytes (one RPC each), so a large
# model is not serialised into one giant message.
_VLLM_PUSH_BUCKET_BYTES = 512 * 1024 * 1024


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
    `update_weights` after every policy update. Checked against vLLM 0.34.0's source (the `gpu`
    extra's range); never run on a GPU by this project's tests yet (README, "Running on GPUs").

    Placement: inside a stage (torch.distributed initialised by the launcher) the engine runs
    in-process with vLLM's external-launcher executor: each rank's engine lives on that rank's GPU
    (`cuda:LOCAL_RANK`, selected by `init_distributed`), as a replica of its own when
    tensor_parallel_size is 1, and weights reach it as the GPU tensors they are (no CPU round trip).
    Alone (rlpipe eval), vLLM runs its own executor on the visible GPUs.

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
        trust_remote_code: bool = False,
    ):
        from vllm import LLM

        self.eos_token_ids = eos_ids(eos_token_id)
        self.colocate = sampling.colocate
        self._asleep = False
        self._policy_version = policy_version
        self.in_process = torch.distributed.is_available() and torch.distributed.is_initialized()
        launcher = {"distributed_executor_backend": "external_launcher"} if self.in_process else {}
        self.llm = LLM(
            model=model_path,
            dtype=sampling.dtype,
            gpu_memory_utilization=sampling.gpu_memory_utilization,
            tensor_parallel_size=sampling.tensor_parallel_size,
            enable_sleep_mode=sampling.colocate,
            seed=seed,
            trust_remote_code=trust_remote_code,
            logprobs_mode="processed_logprobs",
            # Sampling is fully specified by us: do not inherit the checkpoint's generation_config
            # defaults (top_k, repetition penalty...).
            generation_config="vllm",
            worker_extension_cls=f"{__name__}.{VLLMWorkerExtension.__name__}",
            **launcher,
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
        for bucket in _buckets(items, _VLLM_PUSH_BUCKET_BYTES, to_host=not self.in_process):
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

    def close(self) -> None:
        """Shut the engine down and free its GPU memory (evaluate builds one engine per checkpoint)."""
        if self.llm is None:
            return
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
        torch.cuda.empty_cache()

    def _check_awake(self, what: str) -> None:
        if self._asleep:
            raise RuntimeError(f"VLLMGenerator.{what} called while the engine sleeps: call wake() first")


def _buckets(
    items: Iterable[tuple[str, Tensor]], max_bytes: int, to_host: bool
) -> Iterator[list[tuple[str, Tensor]]]:
    """Named tensors in groups of about `max_bytes`; `to_host`: copied to the CPU (for an engine in
    another process), else passed on where they are (an in-process engine on the same GPU)."""
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, tensor in items:
        tensor = tensor.detach().contiguous()
        tensor = tensor.cpu() if to_host else tensor
        if bucket and size + tensor.nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor.nbytes
    if bucket:
        yield bucket
