"""The critic a run asks for (`model.critic_mode`), built from the directory its stage was given.

- separate: a sequence classifier with one label, its own backbone (possibly another, larger
  model than the policy): the trained reward model (backbone and score head), a warmed-up critic,
  or a causal LM (backbone, zero head).
- shared: `PolicyWithValueHead` on the policy module the caller passes (the live policy in PPO,
  the frozen one in critic warmup); the head comes from the directory's `value_head.safetensors`
  (a shared critic's export), else from its score head when it is not the policy itself, else zero.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from stages.config.models import ModelConfig
from stages.models.loading import load_options, load_value_model
from stages.models.value_head import VALUE_HEAD_WEIGHTS, PolicyWithValueHead


def build_critic(model: ModelConfig, critic_dir: str, policy: nn.Module, policy_dir: str) -> nn.Module:
    """The critic (see the module docstring); a separate critic is returned in train mode."""
    if model.critic_mode == "separate":
        return load_value_model(critic_dir, **load_options(model)).train()
    critic = PolicyWithValueHead(policy)
    head = Path(critic_dir) / VALUE_HEAD_WEIGHTS
    if head.is_file():
        from safetensors.torch import load_file

        with torch.no_grad():
            critic.value_head.weight.copy_(load_file(str(head))["weight"])
    elif critic_dir != policy_dir:
        critic.copy_head_from(load_value_model(critic_dir, **load_options(model)))
    return critic
