"""Which backend samples: `make_generator` builds the one `sampling.backend` names."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stages.config.models import ModelConfig
from stages.config.sampling import SamplingConfig
from stages.models.loading import load_options, load_reference
from stages.sampling.generation import Generator
from stages.sampling.hf_sampler import HFGenerator


def make_generator(
    sampling: SamplingConfig,
    model_or_path: torch.nn.Module | str,
    *,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    seed: int = 0,
    model: ModelConfig | None = None,
) -> Generator:
    """The backend named by `sampling.backend`: hf takes a live module (or loads a path: frozen, on
    this rank's device, with `model`'s dtype, attention and remote-code settings), vllm a path."""
    if sampling.backend == "vllm":
        if not isinstance(model_or_path, str):
            raise TypeError("the vllm backend starts from a model path (weights are pushed after updates)")
        from stages.sampling.vllm_sampler import VLLMGenerator

        return VLLMGenerator(
            model_or_path, sampling, eos_token_id=eos_token_id, seed=seed,
            trust_remote_code=bool(model and model.trust_remote_code),
        )  # fmt: skip
    if isinstance(model_or_path, str):
        model_or_path = load_reference(model_or_path, **(load_options(model) if model else {}))
    return HFGenerator(model_or_path, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
