"""The models of a PPO run: the policy engine (+ the value head in shared mode), the separate critic's
own engine, the frozen reference and the reward model; and their HF-format export."""

from __future__ import annotations

from pathlib import Path

from stages.config.batches import BatchLayout
from stages.config.models import ModelConfig
from stages.config.ppo import PPOConfig
from stages.critic.value_model import build_critic
from stages.models.engine import build_engine
from stages.models.loading import load_options, load_policy, load_reference, load_reward_model


class Models:
    """What trains and what scores. `policy` is the live causal LM (the generator samples from it);
    `critic` reads values (a sequence classifier, or the PolicyWithValueHead of shared mode; None for grpo).
    `batches`: each engine's micro-batches per optimizer step on this rank (`stages.config.batches`)."""

    def __init__(self, policy_engine, critic_engine, critic, reference, rm, shared: bool, batches: dict):
        self.policy_engine, self.critic_engine = policy_engine, critic_engine
        self.critic, self.reference, self.rm, self.shared = critic, reference, rm, shared
        self.batches: dict[str, BatchLayout] = batches
        module = policy_engine.module
        self.policy = module.policy if shared else module

    @property
    def engines(self) -> dict:
        """Every engine to checkpoint, by name."""
        return {
            "policy": self.policy_engine,
            **({"critic": self.critic_engine} if self.critic_engine else {}),
        }


def build_models(
    ppo: PPOConfig, model: ModelConfig, dirs: dict[str, str], batches: dict[str, BatchLayout]
) -> Models:
    """The engines and frozen models from their local directories (`policy`, `critic` unless grpo,
    `reward_model` when it scores); the reference is the policy's files, loaded only with KL.
    `batches`: the layouts of `policy_optim` (and `critic_optim`) on this rank."""
    options = load_options(model)
    policy = load_policy(dirs["policy"], **options)
    reference = load_reference(dirs["policy"], **options) if ppo.kl_coef > 0 else None
    rm = load_reward_model(dirs["reward_model"], **options) if "reward_model" in dirs else None
    if "critic" not in dirs:  # grpo: no critic at all
        engine = build_engine(policy, ppo.policy_optim, batches["policy_optim"])
        return Models(engine, None, None, reference, rm, shared=False, batches=batches)
    critic = build_critic(model, dirs["critic"], policy, dirs["policy"])
    if model.critic_mode == "shared":  # one engine: policy backbone + value head, both losses
        engine = build_engine(critic, ppo.policy_optim, batches["policy_optim"])
        return Models(engine, None, engine, reference, rm, shared=True, batches=batches)
    critic_engine = build_engine(critic, ppo.critic_optim, batches["critic_optim"])
    policy_engine = build_engine(policy, ppo.policy_optim, batches["policy_optim"])
    return Models(policy_engine, critic_engine, critic_engine, reference, rm, shared=False, batches=batches)


def save_hf_models(models: Models, tokenizer, folder: Path) -> list[str]:
    """`folder/policy` (HF causal LM) and, with a critic, `folder/value` (classifier, or policy +
    value head), safetensors and tokenizer in each. Returns the names written."""
    exports = {"policy": models.policy}
    if models.critic is not None:
        exports["value"] = models.critic.module
    for name, module in exports.items():
        module.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    return list(exports)
