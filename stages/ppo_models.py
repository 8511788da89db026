"""The models of a PPO run: the policy engine (+ the value head in shared mode), the separate critic's
own engine, the frozen reference and the reward model; and their HF-format export."""

from __future__ import annotations

from pathlib import Path

import torch

from stages.artifacts import export_model_dir
from stages.engine import build_engine
from stages.models import (
    VALUE_HEAD_WEIGHTS,
    PolicyWithValueHead,
    load_policy,
    load_reference,
    load_reward_model,
    load_value_model,
)


class Models:
    """What trains and what scores. `policy` is the live causal LM (the generator samples from it);
    `critic` reads values (a sequence classifier, or the PolicyWithValueHead of shared mode; None for grpo)."""

    def __init__(self, policy_engine, critic_engine, critic, reference, rm, shared: bool):
        self.policy_engine, self.critic_engine = policy_engine, critic_engine
        self.critic, self.reference, self.rm, self.shared = critic, reference, rm, shared
        module = policy_engine.module
        self.policy = module.policy if shared else module

    @property
    def engines(self) -> dict:
        """Every engine to checkpoint, by name."""
        return {
            "policy": self.policy_engine,
            **({"critic": self.critic_engine} if self.critic_engine else {}),
        }


def build_models(config, dirs: dict[str, str]) -> Models:
    ppo, m = config.ppo, config.model
    kwargs = {
        "dtype": m.dtype,
        "attn_implementation": m.attn_implementation,
        "trust_remote_code": m.trust_remote_code,
    }
    policy = load_policy(dirs["policy"], **kwargs)
    reference = load_reference(dirs["policy"], **kwargs) if ppo.kl_coef > 0 else None
    rm = load_reward_model(dirs["reward_model"], **kwargs) if "reward_model" in dirs else None
    if "critic" not in dirs:  # grpo: no critic at all
        return Models(build_engine(policy, ppo.policy_optim), None, None, reference, rm, shared=False)
    if m.critic_mode == "shared":  # one engine: policy backbone + value head, both losses
        model = PolicyWithValueHead(policy)
        head = Path(dirs["critic"]) / VALUE_HEAD_WEIGHTS
        if head.is_file():
            from safetensors.torch import load_file

            with torch.no_grad():
                model.value_head.weight.copy_(load_file(str(head))["weight"])
        elif dirs["critic"] != dirs["policy"]:
            model.copy_head_from(load_value_model(dirs["critic"], **kwargs))
        engine = build_engine(model, ppo.policy_optim)
        return Models(engine, None, engine, reference, rm, shared=True)
    critic_engine = build_engine(load_value_model(dirs["critic"], **kwargs).train(), ppo.critic_optim)
    policy_engine = build_engine(policy, ppo.policy_optim)
    return Models(policy_engine, critic_engine, critic_engine, reference, rm, shared=False)


def save_hf_models(models: Models, tokenizer, folder: Path) -> list[str]:
    """`folder/policy` (HF causal LM) and, with a critic, `folder/value` (classifier, or policy +
    value head), safetensors and tokenizer in each. Returns the names written."""
    exports = {"policy": models.policy}
    if models.critic is not None:
        exports["value"] = models.critic.module
    for name, module in exports.items():
        if isinstance(module, PolicyWithValueHead):
            module.save_pretrained(folder / name)
        else:
            module.save_pretrained(folder / name, safe_serialization=True)
        tokenizer.save_pretrained(folder / name)
    return list(exports)


def export_models(models: Models, tokenizer, staging: Path, layout) -> None:
    """final/policy and, with a critic, final/value: HF exports in storage."""
    for name in save_hf_models(models, tokenizer, staging / "export"):
        export_model_dir(staging / "export" / name, layout.final("ppo", name))
