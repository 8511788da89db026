"""Where a stage's inputs come from: the previous stages' outputs in the same run, unless overridden.

Every stage input is a URI. By default it is the output of the stage before it in the chain
`[sft] -> reward_model -> critic_warmup -> ppo -> evaluate` of the same run; any URI (another run's
`final/...`, an HF directory, a hub id) set in the config overrides it: that is how stages are swapped.
"""

from __future__ import annotations

from stages.config.pipeline import PipelineConfig
from storage.layout import RunLayout


def layout_of(config: PipelineConfig) -> RunLayout:
    return RunLayout(config.storage.root_location(), config.run_id)


def policy_uri(config: PipelineConfig, override: str | None = None) -> str:
    """The starting policy: `override`, else SFT's export when SFT is enabled, else `model.policy`."""
    if override:
        return override
    if config.sft.enabled:
        return str(layout_of(config).final("sft", "policy"))
    return config.model.policy


def reward_model_uri(config: PipelineConfig, override: str | None = None) -> str | None:
    """The trained reward model: `override`, else the reward_model stage's export when it is enabled."""
    if override:
        return override
    if config.reward_model.enabled:
        return str(layout_of(config).final("reward_model", "reward_model"))
    return None


def scoring_reward_model_uri(config: PipelineConfig) -> str | None:
    """The reward model that scores rollouts: None unless `reward.rm_coef > 0`, which needs one."""
    if config.reward.rm_coef <= 0:
        return None
    uri = reward_model_uri(config)
    if uri is None:
        raise ValueError("reward.rm_coef > 0 but reward_model.enabled is false (no reward model)")
    return uri


def critic_init_uri(config: PipelineConfig) -> str:
    """What the critic starts from, by `model.critic_init`: the trained RM, the policy, or `critic_path`."""
    init = config.model.critic_init
    if init == "path":
        if not config.model.critic_path:
            raise ValueError("model.critic_init is 'path' but model.critic_path is not set")
        return config.model.critic_path
    if init == "reward_model":
        uri = reward_model_uri(config)
        if uri is None:
            raise ValueError("model.critic_init is 'reward_model' but reward_model.enabled is false")
        return uri
    return policy_uri(config, config.critic_warmup.policy_from)


def critic_uri(config: PipelineConfig, override: str | None = None) -> str:
    """The warmed-up critic for PPO: `override`, else critic_warmup's export when enabled, else its init."""
    if override:
        return override
    if config.critic_warmup.enabled:
        return str(layout_of(config).final("critic_warmup", "value"))
    return critic_init_uri(config)
