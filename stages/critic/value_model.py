"""The critic a run asks for (`model.critic_mode`), built from the directory its stage was given.

- separate: a sequence classifier with one label, its own backbone (possibly another, larger
  model than the policy): the trained reward model (backbone and score head), a warmed-up critic,
  or a causal LM (backbone, zero head).
- shared: `PolicyWithValueHead` on the policy module the caller passes (the live policy in PPO,
  the frozen one in critic warmup); the head comes from the directory's `value_head.safetensors`
  (a shared critic's export), else from its score head when it is not the policy itself, else zero.
"""

from __future__ import annotations

from torch import nn

from stages.config.models import ModelConfig
from stages.models.loading import load_options, load_value_model
from stages.models.value_head import PolicyWithValueHead


def build_critic(model: ModelConfig, critic_dir: str, policy: nn.Module, policy_dir: str) -> nn.Module:
    """The critic (see the module docstring); a separate critic is returned in train mode."""
    if model.critic_mode == "separate":
        return load_value_model(critic_dir, **load_options(model)).train()
    critic = PolicyWithValueHead(policy)
    if not critic.load_head_from(critic_dir) and critic_dir != policy_dir:
        critic.copy_head_from(load_value_model(critic_dir, **load_options(model)))
    return critic
