"""PPO with a learned critic (VAPO refinements), or GRPO as the critic-free baseline -> `final/policy`.

Shape suffixes: B rollouts (rows of this rank), T response tokens (right-padded).
One step (issue 7; the conventions of DESIGN section 3):

    1. take `prompts_per_step` prompts; the live policy samples `samples_per_prompt` responses each;
    2. score them (verifier and/or reward model, `config.reward`);
    3. old logprobs (the policy, no grad, at the generation temperature), reference logprobs
       (only when kl_coef > 0), old values (the critic; not for grpo);
    4. per-token rewards: the outcome on the last token; `rewards -= kl_coef * kl` per token when
       kl_placement = reward;
    5. advantages: decoupled GAE (lam_policy, optionally length-adaptive; returns with lam_critic),
       whitened over the global batch; or grpo: group-normalised outcome on every response token;
    6. `epochs` x `minibatches` updates: clipped policy loss - entropy bonus (+ KL loss) (+ positive-
       example LM loss) on the policy engine; clipped value loss x value_loss_coef on the critic's
       own engine (critic_mode=shared: one engine carries both); the first `policy_warmup_steps`
       steps update the critic only;
    7. the generator gets the new weights (it shares the live module: only the version moves);
       the step's rollouts (schema v1) and metrics; every save_every a checkpoint of all engines.

Step k is the k-th step done (1-based). Its rollouts were sampled by the policy after k - 1 updates
(`policy_version = k - 1`). A resumed run deletes the rollouts after its checkpoint and samples them
again with the same seeds (seeded by (seed, step, rank)), so every step is stored once.

    python -m stages.ppo --config FILE [--force]      (or: rlpipe stage ppo --run-id ID)
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Literal

import torch
from pydantic import Field

from stages import distributed
from stages.accuracy import heldout_accuracy
from stages.algorithms import Aggregation, KLEstimator
from stages.artifacts import resolve_model_dir
from stages.config import Section, non_semantic
from stages.engine import OptimConfig, load_training_state, save_training_state
from stages.generation import make_generator
from stages.inputs import critic_uri, policy_uri, reward_model_uri
from stages.lifecycle import (
    StageError,
    StagePlan,
    begin_stage,
    check_resumable,
    finish_stage,
    make_plan,
    release_staging_dir,
    stage_main,
    staging_dir,
)
from stages.ppo_models import build_models, export_models, save_hf_models
from stages.ppo_step import push_weights, rollout_table, run_step, step_metrics
from stages.tasks import batch_indices, check_fits, encode_problems, shard, task_problems
from stages.tracking import MetricsTracker
from storage.rollouts import delete_rollouts_after, write_rollouts

STAGE = "ppo"


class PPOConfig(Section):
    enabled: bool = Field(True, description="Run PPO (or its GRPO baseline).")
    policy_from: str | None = Field(
        None,
        description="Starting policy URI. Default: the run's starting policy (SFT's export, else model.policy).",
    )
    critic_from: str | None = Field(
        None,
        description="Starting critic URI. Default: critic_warmup's export, else model.critic_init. Unused by grpo.",
    )
    advantage_estimator: Literal["gae", "grpo"] = Field(
        "gae",
        description="gae: PPO with the learned critic (decoupled GAE). grpo: group-normalised outcome "
        "rewards over each prompt's samples, no critic (the baseline).",
    )
    prompts_per_step: int = Field(32, ge=1, description="Prompts sampled per step (over all ranks).")
    samples_per_prompt: int = Field(4, ge=1, description="Responses per prompt (the GRPO group size).")
    steps: int = Field(40, ge=1, description="PPO steps (generate + score + updates).")
    epochs: int = Field(1, ge=1, description="Passes of updates over each step's rollouts.")
    minibatches: int = Field(
        2,
        ge=1,
        description="Optimizer steps per epoch: the step's rows are split into this many shuffled parts; "
        "each part per rank must equal micro_batch_size x grad_accum_steps of every engine.",
    )
    gamma: float = Field(1.0, gt=0, le=1, description="Discount.")
    lam_policy: float = Field(
        0.95, ge=0, le=1, description="GAE lambda of the policy advantages (VAPO decoupled GAE)."
    )
    lam_critic: float = Field(
        1.0, ge=0, le=1, description="GAE lambda of the value targets (1.0: Monte-Carlo returns)."
    )
    length_adaptive_alpha: float | None = Field(
        None,
        gt=0,
        description="VAPO length-adaptive lam_policy = 1 - 1/(alpha * length) per response; null: fixed lam_policy.",
    )
    whiten_advantages: bool = Field(
        True, description="gae: whiten advantages over the global batch (all ranks' valid tokens)."
    )
    clip_low: float = Field(0.2, ge=0, description="Policy ratio clip below: 1 - clip_low.")
    clip_high: float = Field(
        0.28, ge=0, description="Policy ratio clip above: 1 + clip_high (DAPO clip-higher)."
    )
    value_loss_coef: float = Field(
        0.5, ge=0, description="Weight of the value loss (in shared mode against the policy loss)."
    )
    vf_clip: float | None = Field(
        0.2, gt=0, description="Value clip range around the old values; null disables value clipping."
    )
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight (subtracted from the loss).")
    kl_coef: float = Field(
        0.0, ge=0, description="Weight of KL(policy || reference); 0 loads no reference model."
    )
    kl_estimator: KLEstimator = Field("k3", description="Per-token KL estimator: k1, k2 or k3.")
    kl_placement: Literal["reward", "loss"] = Field(
        "reward",
        description="reward: rewards -= kl_coef * kl per token (gae; grpo: summed per response); "
        "loss: + kl_coef * aggregated kl in the policy loss.",
    )
    positive_lm_coef: float = Field(
        0.5, ge=0, description="VAPO positive-example LM loss: weight of the NLL of correct responses."
    )
    loss_agg: Aggregation = Field(
        "token_mean", description="Loss aggregation: token_mean, seq_mean_token_mean or seq_mean_token_sum."
    )
    on_nonfinite: Literal["error", "skip"] = Field(
        "error",
        description="A NaN/inf in a step's rewards, logprobs, values or advantages: error stops the stage "
        "naming the step (the last checkpoint stays latest); skip leaves the weights as they were for "
        "that step (ppo/skipped_nonfinite = 1). A non-finite loss always stops: the weights diverged.",
    )
    policy_warmup_steps: int = Field(
        0, ge=0, description="The first N steps update only the critic (the policy stays as loaded)."
    )
    policy_optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=3e-4, micro_batch_size=64, grad_clip=1.0),
        description="The policy's optimizer and DeepSpeed layout (grad_clip = max_grad_norm).",
    )
    critic_optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-3, micro_batch_size=64, grad_clip=1.0),
        description="The separate critic's own optimizer and layout (unused in shared mode and by grpo).",
    )
    save_every: int = non_semantic(
        10, ge=1, description="Commit a checkpoint every N steps (and at the end)."
    )
    keep_last: int = non_semantic(
        2, ge=1, description="Committed checkpoints kept (the newest is never removed)."
    )
    hf_checkpoints: bool = non_semantic(
        True,
        description="Also commit a Hugging Face export of the policy (and critic) with each checkpoint "
        "(`checkpoints/step_N/hf/policy`), so it can be evaluated while training goes on.",
    )
    log_every: int = non_semantic(1, ge=1, description="Write metrics every N steps.")
    eval_every: int | None = non_semantic(
        10,
        ge=1,
        description="Held-out accuracy (greedy and sampled) every N steps and at the end; null: end only.",
    )
    eval_samples: int = non_semantic(
        4, ge=1, description="Samples per held-out problem for the sampled pass@1 (the mean over them)."
    )


def plan(config) -> StagePlan:
    """What the result depends on: this section, task, model, sampling, reward, seed; and its inputs."""
    semantic = {"ppo": config.ppo, "task": config.task, "model": config.model}
    semantic |= {"generation": config.generation, "reward": config.reward, "seed": config.seed}
    return make_plan(config, semantic, _input_uris(config))


def run(config, force: bool = False) -> None:
    """The PPO recipe, top to bottom."""
    distributed.init_distributed()
    rank, world = distributed.rank(), distributed.world_size()
    ppo = config.ppo
    uses_critic = ppo.advantage_estimator == "gae"

    # 1. Skip if complete for this config and these inputs; otherwise claim the stage.
    inputs = _input_uris(config)
    ctx = begin_stage(STAGE, config, plan(config), force=force, rank=rank, world_size=world)
    if ctx is None:
        distributed.print0(f"{STAGE}: complete for this config and inputs, skipped (use --force to rerun)")
        return
    layout = ctx.layout
    _check_batch_layout(ppo, uses_critic and config.model.critic_mode == "separate", world)

    # 2. Models: policy (+ shared value head) engine, separate critic engine, reference, RM; generator.
    dirs = {name: resolve_model_dir(uri, config.tiny_model, ctx.endpoint_url) for name, uri in inputs.items()}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        dirs["policy"], trust_remote_code=config.model.trust_remote_code
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(config.seed)
    models = build_models(config, dirs)
    # hf samples from the live policy module; vllm starts from the policy's files, then gets every
    # update pushed (`push_weights`), and sleeps through the updates when colocated.
    generator = make_generator(
        config.generation, dirs["policy"] if config.generation.backend == "vllm" else models.policy,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id, seed=config.seed,
    )  # fmt: skip

    # 3. Data: training prompts (the split every stage uses) and the held-out prompts.
    train = encode_problems(task_problems(config.task, "train"), tokenizer)
    heldout = encode_problems(task_problems(config.task, "test"), tokenizer)
    check_fits(train, tokenizer, config.generation.max_new_tokens, f"{STAGE} train")
    check_fits(heldout, tokenizer, config.generation.max_new_tokens, f"{STAGE} held-out")

    def evaluate() -> dict[str, float]:
        return heldout_accuracy(
            models.policy, tokenizer, heldout, config.generation, config.seed, ppo.eval_samples
        )

    # 4. Resume from the newest committed checkpoint (all engines); later rollouts are replaced.
    staging = staging_dir(ctx)
    state = load_training_state(models.engines, layout.checkpoints(STAGE), staging)
    if state is not None:
        check_resumable(ctx, state)
    start = state["step"] if state else 0
    initial = state["initial_accuracy"] if state else evaluate()  # before step 1, kept for resumed runs
    push_weights(generator, models, ppo.policy_optim, version=start)
    if ctx.is_main:
        delete_rollouts_after(layout.rollouts(STAGE), start)
    distributed.barrier()
    tracker = MetricsTracker(
        layout.metrics(STAGE), rank=rank, run_id=config.run_id, stage=STAGE, total_steps=ppo.steps,
        start_step=start, wandb_config=config.wandb, config=config.model_dump(mode="json"),
    )  # fmt: skip
    if start == 0:
        tracker.log(0, {f"{STAGE}/heldout_{k}": v for k, v in initial.items()})

    # 5. Train: the 7 points of one step.
    accuracy: dict[str, float] = {}
    for step in range(start, ppo.steps):
        done = step + 1
        # step 1. prompts (group id = the prompt's index); steps 1-7: `run_step`
        picked = shard(batch_indices(len(train), ppo.prompts_per_step, step, config.seed), rank, world)
        prompts = [train[i] for i in picked for _ in range(ppo.samples_per_prompt)]
        group_ids_B = torch.tensor([i for i in picked for _ in range(ppo.samples_per_prompt)])
        train_policy = done > ppo.policy_warmup_steps
        outcome = run_step(models, generator, prompts, group_ids_B, config, tokenizer, step=done, rank=rank,
                           train_policy=train_policy)  # fmt: skip
        rollout, scored, stats = outcome.rollout, outcome.scored, outcome.stats
        if done % ppo.log_every == 0 or done == ppo.steps:
            tracker.log(done, step_metrics(rollout, scored, stats, models))
        if ppo.eval_every and done % ppo.eval_every == 0 or done == ppo.steps:
            accuracy = evaluate()
            tracker.log(done, {f"{STAGE}/heldout_{k}": v for k, v in accuracy.items()})
        write_rollouts(
            layout.rollout_part(STAGE, done, rank), rollout_table(rollout, scored, config.run_id, done)
        )
        if done % ppo.save_every == 0 or done == ppo.steps:
            trainer_state = {"config_hash": ctx.config_hash, "data_cursor": done * ppo.prompts_per_step}
            trainer_state["initial_accuracy"] = initial
            save_training_state(
                models.engines,
                trainer_state,
                layout.checkpoints(STAGE),
                done,
                ppo.keep_last,
                staging,
                hf_export=partial(save_hf_models, models, tokenizer) if ppo.hf_checkpoints else None,
            )
    tracker.close()
    if not accuracy:  # resumed at the last step: the run was complete but for its export
        accuracy = evaluate()

    # 6. Export the policy (and the critic) in HF format, then the manifest (last).
    outputs = {"policy": str(layout.final(STAGE, "policy")), "rollouts": str(layout.rollouts(STAGE))}
    if models.critic is not None:
        outputs["value"] = str(layout.final(STAGE, "value"))
    if ctx.is_main:
        export_models(models, tokenizer, staging, layout)
    distributed.barrier()
    metrics = {f"heldout_{k}": v for k, v in accuracy.items()}
    metrics |= {f"initial_heldout_{k}": v for k, v in initial.items()}
    release_staging_dir(staging)
    finish_stage(ctx, outputs=outputs, metrics=metrics)
    distributed.print0(
        f"{STAGE}: done; held-out sampled {initial['sampled']:.3f} -> {accuracy['sampled']:.3f}, greedy "
        f"{initial['greedy']:.3f} -> {accuracy['greedy']:.3f}; policy at {outputs['policy']}"
    )


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------
def _input_uris(config) -> dict[str, str]:
    """Inputs by name: policy (also the reference), critic (gae), reward model (rm_coef > 0)."""
    ppo = config.ppo
    try:
        inputs = {"policy": policy_uri(config, ppo.policy_from)}
        if ppo.advantage_estimator == "gae":
            inputs["critic"] = critic_uri(config, ppo.critic_from)
    except ValueError as err:  # e.g. critic_init=reward_model with the reward_model stage disabled
        raise StageError(f"{STAGE}: {err}") from None
    if config.reward.rm_coef > 0:
        rm = reward_model_uri(config)
        if rm is None:
            raise StageError(
                f"{STAGE}: reward.rm_coef > 0 but reward_model.enabled is false (no reward model)"
            )
        inputs["reward_model"] = rm
    return inputs


def _check_batch_layout(ppo: PPOConfig, separate_critic: bool, world: int) -> None:
    """A step's rows split evenly over ranks, then into `minibatches` optimizer batches of every engine."""
    if ppo.prompts_per_step % world:
        raise StageError(
            f"{STAGE}: prompts_per_step ({ppo.prompts_per_step}) must divide by the ranks ({world})"
        )
    rows = ppo.prompts_per_step // world * ppo.samples_per_prompt
    optims = {
        "policy_optim": ppo.policy_optim,
        **({"critic_optim": ppo.critic_optim} if separate_critic else {}),
    }
    for name, optim in optims.items():
        per_update = optim.micro_batch_size * optim.grad_accum_steps
        if rows != ppo.minibatches * per_update:
            raise StageError(
                f"{STAGE}: {rows} rows per rank per step (prompts_per_step / ranks x samples_per_prompt) must "
                f"equal minibatches ({ppo.minibatches}) x {name}.micro_batch_size x {name}.grad_accum_steps "
                f"({per_update})"
            )


def main() -> None:
    sys.exit(stage_main(STAGE, run))


if __name__ == "__main__":
    main()
