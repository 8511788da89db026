"""Loading, initialising and saving the models of the pipeline: policy, frozen reference, reward model, critic.

Shape suffixes: B batch (sequences), L full sequence length (prompt + response + padding),
V vocabulary, H hidden size.

Every checkpoint is Hugging Face format (safetensors), loadable by `transformers` alone:
- policy / reference: `AutoModelForCausalLM`.
- reward model: `AutoModelForSequenceClassification` with `num_labels=1`; its score is the head
  applied to the final hidden state of the LAST NON-PAD token (from the attention mask).
- critic, `separate` mode: also a sequence classifier with one label (own backbone, possibly a
  different, larger model than the policy), read per token: `values_BL = score(backbone(x))`.
  A critic initialised from a trained reward model is therefore just the RM directory.
- critic, `shared` mode: `PolicyWithValueHead`, a scalar head on the policy's final hidden state.

Reward scores and critic values come out of the same function (`per_position_values`), so the
score of a sequence is by construction the value the critic reads at its last token.
Position ids are computed from the attention mask (`cumsum - 1`), so left- and right-padded
batches give the same numbers; pad tokens are never detected by `pad_token_id` (which may be
unset, or equal to the EOS that ends every response).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from stages.config import Section

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# transformers is imported where a model is loaded, not here: importing it costs about 1.5 s, and
# every `rlpipe` command imports this module for `ModelConfig` alone (to validate a config).

Tensor = torch.Tensor
DType = Literal["auto", "float32", "bfloat16", "float16"]
VALUE_HEAD_WEIGHTS = "value_head.safetensors"
VALUE_HEAD_CONFIG = "value_head.json"


class ModelConfig(Section):
    policy: str = Field(
        description="Policy to train: a Hugging Face model name or a local directory in HF format "
        "(the `tiny` recipe builds one offline). The frozen reference is loaded from the same place."
    )
    critic_mode: Literal["separate", "shared"] = Field(
        "separate",
        description="separate: the critic is its own model (own backbone, own optimizer; may be larger "
        "than the policy). shared: a scalar value head on the policy's backbone (one forward for both).",
    )
    critic_init: Literal["policy", "reward_model", "path"] = Field(
        "reward_model",
        description="Where the critic starts. reward_model: the trained RM's backbone AND score head "
        "(VAPO / Tulu 3 practice; needs the reward_model stage). policy: the policy's backbone with a "
        "zero value head. path: the model at `critic_path` (its score head if it has one, else zero).",
    )
    critic_path: str | None = Field(
        None,
        description="Critic source when critic_init=path: HF name or directory of a sequence classifier "
        "(its head is kept) or of a causal LM (backbone only, zero head). In shared mode only its "
        "score head is used and must match the policy's hidden size.",
    )
    dtype: DType = Field(
        "auto",
        description="Parameter dtype: auto = bfloat16 when a CUDA GPU is present, float32 on CPU.",
    )
    attn_implementation: str = Field(
        "sdpa",
        description="transformers attention backend: sdpa, eager, flash_attention_2, ... "
        "(packed training forwards use a block-diagonal mask on sdpa/eager, position ids on flash).",
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow model code from the checkpoint's repository to run (only for trusted models).",
    )


def resolve_dtype(dtype: DType | torch.dtype) -> torch.dtype:
    """ "auto" -> bfloat16 on a CUDA machine, float32 on CPU; names -> torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _load_kwargs(dtype, attn_implementation: str, trust_remote_code: bool) -> dict:
    return {
        "dtype": resolve_dtype(dtype),
        "attn_implementation": attn_implementation,
        "trust_remote_code": trust_remote_code,
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
    """The trainable policy (AutoModelForCausalLM), in train mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, **_load_kwargs(dtype, attn_implementation, trust_remote_code)
    )
    return model.train()


def load_reference(
    path: str,
    dtype: DType | torch.dtype = "auto",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The frozen reference policy for the KL term: eval mode (no dropout), no gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, **_load_kwargs(dtype, attn_implementation, trust_remote_code)
    )
    model.eval().requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# scalar heads on a backbone: reward model and separate critic
# ---------------------------------------------------------------------------------------------
def _zero_(linear: nn.Linear) -> None:
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
        _zero_(model.score)
    return model


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
    model = load_value_model(path, dtype, attn_implementation, trust_remote_code)
    model.eval().requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# shared critic: value head on the policy
# ---------------------------------------------------------------------------------------------
class PolicyWithValueHead(nn.Module):
    """A causal-LM policy plus a scalar value head on its final hidden state (critic_mode=shared).

    The head has no bias, like the score heads of HF sequence classifiers, so a reward model's
    head copies in exactly and a value head can be exported as one.
    Saved as the policy's HF files (loadable alone by transformers) plus `value_head.safetensors`
    and `value_head.json` beside them.
    """

    def __init__(self, policy: PreTrainedModel, value_head: nn.Linear | None = None):
        super().__init__()
        self.policy = policy
        hidden = policy.config.get_text_config().hidden_size
        if value_head is None:
            value_head = nn.Linear(hidden, 1, bias=False)
            _zero_(value_head)  # initial values 0: see `load_value_model`
        self.value_head = value_head.to(dtype=policy.dtype, device=policy.device)

    @property
    def config(self):
        return self.policy.config

    @property
    def dtype(self) -> torch.dtype:
        return self.policy.dtype

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """One forward: (logits [B, L, V], values [B, L]); the values read the final (normed) hidden state."""
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
        )
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)

    def values(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        """Values only [B, L]: the backbone without the LM head (no [B, L, V] logits)."""
        backbone = getattr(self.policy, self.policy.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return self.value_head(hidden).squeeze(-1)

    def copy_head_from(self, scorer: PreTrainedModel) -> None:
        """Initialise the value head from a sequence classifier's score head (e.g. the trained RM)."""
        weight = scorer.score.weight
        if weight.shape != self.value_head.weight.shape:
            raise ValueError(
                f"score head of shape {tuple(weight.shape)} does not fit a value head of shape "
                f"{tuple(self.value_head.weight.shape)}: the reward model must share the policy's hidden size"
            )
        with torch.no_grad():
            self.value_head.weight.copy_(weight)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.policy.save_pretrained(directory)  # safetensors by default in transformers >= 4.35
        head = {"weight": self.value_head.weight.detach().cpu().contiguous()}
        save_file(head, str(directory / VALUE_HEAD_WEIGHTS), metadata={"format": "pt"})
        spec = {"in_features": self.value_head.in_features, "out_features": 1, "bias": False}
        (directory / VALUE_HEAD_CONFIG).write_text(json.dumps(spec, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        directory: str,
        dtype: DType | torch.dtype = "auto",
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
    ) -> PolicyWithValueHead:
        """Policy from `directory`; value head from its `value_head.safetensors`, zero if there is none."""
        policy = load_policy(directory, dtype, attn_implementation, trust_remote_code)
        model = cls(policy)
        weights = Path(directory) / VALUE_HEAD_WEIGHTS
        if weights.is_file():
            with torch.no_grad():
                model.value_head.weight.copy_(load_file(str(weights))["weight"])
        return model


# ---------------------------------------------------------------------------------------------
# per-position values and reward scores
# ---------------------------------------------------------------------------------------------
def positions_from_mask(attention_mask_BL: Tensor) -> Tensor:
    """Position ids counting only attended tokens (0 at each sequence's first real token): padding-side agnostic."""
    return (attention_mask_BL.long().cumsum(-1) - 1).clamp(min=0)


def per_position_values(
    critic: nn.Module, input_ids_BL: Tensor, attention_mask_BL: Tensor, position_ids_BL: Tensor | None = None
) -> Tensor:
    """Scalar head on the final hidden state at EVERY position: values_BL (float32).

    `critic` is a sequence classifier with one label (separate critic, reward model) or a
    `PolicyWithValueHead` (shared critic), or a DeepSpeed engine wrapping either.
    `attention_mask_BL` is the usual 2-D padding mask, or a 4-D mask (packed sequences), in which
    case `position_ids_BL` is required. The value at position i sees tokens 0..i only.
    """
    if position_ids_BL is None:
        if attention_mask_BL.dim() != 2:
            raise ValueError("position_ids_BL is required with a 4-D attention mask")
        position_ids_BL = positions_from_mask(attention_mask_BL)
    module = getattr(critic, "module", critic)  # a DeepSpeed engine holds the model in `.module`
    if isinstance(module, PolicyWithValueHead):
        values_BL = module.values(input_ids_BL, attention_mask_BL, position_ids_BL)
    else:
        backbone = getattr(module, module.base_model_prefix)
        hidden_BLH = backbone(
            input_ids=input_ids_BL,
            attention_mask=attention_mask_BL,
            position_ids=position_ids_BL,
            use_cache=False,
        ).last_hidden_state
        values_BL = module.score(hidden_BLH).squeeze(-1)
    return values_BL.float()


def reward_model_scores(rm: nn.Module, input_ids_BL: Tensor, attention_mask_BL: Tensor) -> Tensor:
    """Score of each sequence: the per-position value at its LAST NON-PAD token (from the mask), shape [B].

    Works for right and left padding (and holes): the index is the last True of the mask, and the
    positions are counted over attended tokens only, so padding never changes a score.
    """
    values_BL = per_position_values(rm, input_ids_BL, attention_mask_BL)
    positions_BL = torch.arange(attention_mask_BL.shape[1], device=attention_mask_BL.device).expand_as(
        values_BL
    )
    last_B = torch.where(attention_mask_BL.bool(), positions_BL, -1).amax(dim=1)
    if (last_B < 0).any():
        raise ValueError("reward_model_scores: a sequence has no attended token")
    return values_BL.gather(1, last_B[:, None]).squeeze(1)


# ---------------------------------------------------------------------------------------------
# critic by config
# ---------------------------------------------------------------------------------------------
def load_critic(config: ModelConfig, reward_model_path: str | None = None) -> nn.Module:
    """The critic the config asks for, in train mode.

    separate: a sequence classifier (one label) from the RM directory, the policy (zero head) or
    `critic_path`. shared: `PolicyWithValueHead` over a freshly loaded policy (use its `.policy` as
    the policy), head zero (init policy) or copied from the RM's / `critic_path`'s score head.
    `reward_model_path` is where the reward_model stage wrote the RM (needed for init=reward_model).
    """
    source = {"policy": config.policy, "reward_model": reward_model_path, "path": config.critic_path}[
        config.critic_init
    ]
    if source is None:
        needed = "reward_model_path" if config.critic_init == "reward_model" else "model.critic_path"
        raise ValueError(f"critic_init={config.critic_init} needs {needed}")
    kwargs = _load_kwargs(config.dtype, config.attn_implementation, config.trust_remote_code)
    if config.critic_mode == "separate":
        return load_value_model(source, **kwargs).train()
    critic = PolicyWithValueHead(load_policy(config.policy, **kwargs))
    if config.critic_init != "policy":
        critic.copy_head_from(load_value_model(source, **kwargs))
    return critic.train()
