"""Loading and initialising the models of the pipeline: policy, frozen reference, reward model, critic.

Every checkpoint is Hugging Face format (safetensors), loadable by `transformers` alone:
- policy / reference: `AutoModelForCausalLM`.
- reward model: `AutoModelForSequenceClassification` with `num_labels=1`; its score is the head
  applied to the final hidden state of the LAST NON-PAD token (`value_head.reward_model_scores`).
- critic, `separate` mode: also a sequence classifier with one label (own backbone, possibly a
  different, larger model than the policy), read per token: `values_BL = score(backbone(x))`.
  A critic initialised from a trained reward model is therefore just the RM directory.
- critic, `shared` mode: `value_head.PolicyWithValueHead`, a scalar head on the policy's final
  hidden state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from stages.config.models import DType, ModelConfig
from stages.runtime.devices import device

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# transformers is imported where a model is loaded, not at module level: importing it costs about
# 1.5 s, which a command that only validates a config or reads storage should not pay.

Tensor = torch.Tensor


def resolve_dtype(dtype: DType | torch.dtype) -> torch.dtype:
    """ "auto" -> bfloat16 on a CUDA machine, float32 on CPU; names -> torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_options(model: ModelConfig) -> dict:
    """The loaders' keyword arguments a run's `model` section asks for (dtype, attention, remote code)."""
    return {
        "dtype": model.dtype,
        "attn_implementation": model.attn_implementation,
        "trust_remote_code": model.trust_remote_code,
    }


def _load_kwargs(dtype, attn_implementation: str, trust_remote_code: bool) -> dict:
    return {
        "dtype": resolve_dtype(dtype),
        "attn_implementation": attn_implementation,
        "trust_remote_code": trust_remote_code,
        # transformers 5 swaps layers for kernels it downloads from the Hub at load time, by default:
        # a GPU node without network would differ from one with it, and the trainer from the sampler.
        "use_kernels": False,
    }


# ---------------------------------------------------------------------------------------------
# policy and reference
# ---------------------------------------------------------------------------------------------
def load_policy(
    path: str,
    dtype: DType | torch.dtype = "auto",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The trainable policy (AutoModelForCausalLM), in train mode, on this rank's device."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, **_load_kwargs(dtype, attn_implementation, trust_remote_code)
    )
    return model.to(device()).train()


def load_reference(
    path: str,
    dtype: DType | torch.dtype = "auto",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The frozen reference policy for the KL term: eval mode (no dropout), no gradients."""
    return frozen(load_policy(path, dtype, attn_implementation, trust_remote_code))


def frozen(model: nn.Module) -> nn.Module:
    """`model` in eval mode (no dropout) with no parameter requiring a gradient."""
    model.eval().requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# scalar heads on a backbone: reward model and separate critic
# ---------------------------------------------------------------------------------------------
def zero_head_(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.zero_()
        if linear.bias is not None:
            linear.bias.zero_()


def load_value_model(
    path: str,
    dtype: DType | torch.dtype = "auto",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    new_head: Literal["zero", "random"] = "zero",
) -> PreTrainedModel:
    """A sequence classifier with one output from any checkpoint, for use as RM or critic.

    A sequence-classifier checkpoint (a trained RM, a saved critic) keeps its score head. A causal
    LM checkpoint gives the backbone; its new score head is zero (`new_head="zero"`, the critic
    default) or transformers' random init (`"random"`, a fresh reward model).
    Why zero for a critic: a random head on hidden states of norm ~sqrt(H) gives per-token values
    of random sign and size O(1-10); GAE's `delta_t = r_t + V_{t+1} - V_t` is then mostly noise and
    the first policy updates follow it. With a zero head V = 0 at the start, so the first
    advantages are the plain (lambda-)returns; the head gets a gradient at once (dL/dw = h != 0),
    the backbone from the second step on.
    """
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=1,
        output_loading_info=True,
        **_load_kwargs(dtype, attn_implementation, trust_remote_code),
    )
    head_missing = any(key.split(".")[0] == "score" for key in info["missing_keys"])
    if head_missing and new_head == "zero":
        zero_head_(model.score)
    text_config = model.config.get_text_config()
    if text_config.pad_token_id is None:
        # transformers' classifier forward refuses a batch without a pad id (to pool its last-token
        # score); values are read at every position (`per_position_values`), so any id will do: EOS.
        eos = text_config.eos_token_id
        text_config.pad_token_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    return model.to(device())


def init_reward_model(
    policy_path_or_name: str,
    dtype: DType | torch.dtype = "auto",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A reward model to train: the policy's backbone and a fresh (randomly initialised) score head."""
    return load_value_model(
        policy_path_or_name, dtype, attn_implementation, trust_remote_code, new_head="random"
    )


def load_reward_model(
    path: str,
    dtype: DType | torch.dtype = "auto",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A trained reward model (HF sequence classifier, one label), frozen for scoring."""
    return frozen(load_value_model(path, dtype, attn_implementation, trust_remote_code))
