"""The table of stages, in pipeline order: each one's name, what its result depends on (`plan`)
and how it runs (`run`). The orchestrator and the CLI find stages here, nowhere else."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from stages import critic_warmup, evaluate, reward_model, sft
from stages.config.pipeline import PipelineConfig
from stages.lifecycle.contract import StagePlan, plan_is_complete
from stages.ppo import recipe as ppo


@dataclass(frozen=True)
class Stage:
    name: str
    plan: Callable[[PipelineConfig], StagePlan]
    run: Callable[..., None]  # run(config, force=False): `python -m stages.<name>` calls it
    ranks: bool  # runs on every rank of `--nproc N`; False: one process (evaluate)


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("sft", sft.plan, sft.run, ranks=True),
        Stage("reward_model", reward_model.plan, reward_model.run, ranks=True),
        Stage("critic_warmup", critic_warmup.plan, critic_warmup.run, ranks=True),
        Stage("ppo", ppo.plan, ppo.run, ranks=True),
        Stage("evaluate", evaluate.plan, evaluate.run, ranks=False),
    )
}


def stage_is_complete(name: str, config: PipelineConfig) -> bool:
    """Whether stage `name` would be skipped: complete for this config hash and these inputs.

    Raises the stage's own one-line errors when its inputs cannot be resolved (e.g. PPO's critic
    asked for with the critic-warmup stage disabled), so bad input fails before any GPU work.
    """
    return plan_is_complete(name, config, STAGES[name].plan(config))


def pipeline_stages(config: PipelineConfig) -> list[str]:
    """The stages `rlpipe run` executes, in order: those the config enables."""
    return [name for name in STAGES if getattr(config, name).enabled]
