"""Scalar heads read per token: the shared critic's value head on the policy, and the per-position
values / sequence scores of every scalar-head model (separate critic, reward model, shared critic).

Shape suffixes: B batch (sequences), L full sequence length (prompt + response + padding),
V vocabulary, H hidden size.

Reward scores and critic values come out of the same function (`per_position_values`), so the
score of a sequence is by construction the value the critic reads at its last token.
Position ids are computed from the attention mask (`cumsum - 1`), so left- and right-padded
batches give the same numbers; pad tokens are never detected by `pad_token_id` (which may be
unset, or equal to the EOS that ends every response).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stages.config.models import DType
from stages.models.loading import load_policy, zero_head_
from stages.runtime.devices import model_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Tensor = torch.Tensor
VALUE_HEAD_WEIGHTS = "value_head.safetensors"
VALUE_HEAD_CONFIG = "value_head.json"


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
            zero_head_(value_head)  # initial values 0: see `load_value_model`
        self.value_head = value_head.to(dtype=policy.dtype, device=policy.device)

    @property
    def config(self):
        return self.policy.config

    @property
    def dtype(self) -> torch.dtype:
        return self.policy.dtype

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
        values_only: bool = False,
    ) -> tuple[Tensor | None, Tensor]:
        """One trunk forward: (logits, values [B, L]); the values read the final (normed) hidden state.

        `logits_to_keep`: as transformers' causal LMs (0: every position; a tensor: those positions).
        `values_only`: the backbone without the LM head, no logits at all (None). Everything runs
        inside this forward, so a DeepSpeed engine wrapping the module (ZeRO-3 gathers parameters
        only inside the engine's forward) computes both heads.
        """
        if values_only:
            backbone = getattr(self.policy, self.policy.base_model_prefix)
            hidden = backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
            return None, self.value_head(hidden).squeeze(-1)
        keep = {"logits_to_keep": logits_to_keep} if supports_logits_to_keep(self.policy) else {}
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
            **keep,
        )
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)

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
        model = cls(load_policy(directory, dtype, attn_implementation, trust_remote_code))
        model.load_head_from(directory)
        return model

    def load_head_from(self, directory: str | Path) -> bool:
        """Copy a shared critic export's `value_head.safetensors` into the head; False if it has none."""
        weights = Path(directory) / VALUE_HEAD_WEIGHTS
        if not weights.is_file():
            return False
        with torch.no_grad():
            self.value_head.weight.copy_(load_file(str(weights))["weight"])
        return True


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
    `PolicyWithValueHead` (shared critic), or a DeepSpeed engine wrapping either. The forward goes
    through `critic` itself, never around it: under ZeRO-3 an engine gathers its parameters (tied
    ones included) only inside its own forward, and a submodule called directly trains wrongly on
    several ranks (tests/test_equal_updates.py). A classifier's per-position scores are read with a
    hook on its score head (its forward returns only the pooled last-token score).
    `attention_mask_BL` is the 2-D padding mask; the value at position i sees tokens 0..i only.
    """
    if position_ids_BL is None:
        position_ids_BL = positions_from_mask(attention_mask_BL)
    on = model_device(critic)
    input_ids_BL, attention_mask_BL, position_ids_BL = (
        x.to(on) for x in (input_ids_BL, attention_mask_BL, position_ids_BL)
    )
    module = getattr(critic, "module", critic)  # a DeepSpeed engine holds the model in `.module`
    if isinstance(module, PolicyWithValueHead):
        _, values_BL = critic(input_ids_BL, attention_mask_BL, position_ids_BL, values_only=True)
        return values_BL.float()
    scores: list[Tensor] = []
    hook = module.score.register_forward_hook(lambda _module, _inputs, output: scores.append(output))
    try:
        critic(
            input_ids=input_ids_BL,
            attention_mask=attention_mask_BL,
            position_ids=position_ids_BL,
            use_cache=False,
        )
    finally:
        hook.remove()
    return scores[-1].squeeze(-1).float()


def supports_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM's forward takes `logits_to_keep` (the LM head on a few positions only)."""
    module = getattr(model, "module", model)  # unwrap a DeepSpeed engine
    return "logits_to_keep" in inspect.signature(module.forward).parameters


def reward_model_scores(rm: nn.Module, input_ids_BL: Tensor, attention_mask_BL: Tensor) -> Tensor:
    """Score of each sequence: the per-position value at its LAST NON-PAD token (from the mask), shape [B].

    Works for right and left padding (and holes): the index is the last True of the mask, and the
    positions are counted over attended tokens only, so padding never changes a score.
    """
    values_BL = per_position_values(rm, input_ids_BL, attention_mask_BL)
    attention_mask_BL = attention_mask_BL.to(values_BL.device)
    positions_BL = torch.arange(attention_mask_BL.shape[1], device=attention_mask_BL.device).expand_as(
        values_BL
    )
    last_B = torch.where(attention_mask_BL.bool(), positions_BL, -1).amax(dim=1)
    if (last_B < 0).any():
        raise ValueError("reward_model_scores: a sequence has no attended token")
    return values_BL.gather(1, last_B[:, None]).squeeze(1)
