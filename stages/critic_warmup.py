"""Critic warmup: the frozen policy samples, the critic regresses onto returns -> `final/value`.

Value pretraining before PPO (VAPO, arXiv 2504.05118, section 3.1: without it the first PPO
updates follow a critic that knows nothing). Each step:

    1. sample `samples_per_prompt` responses to `prompts_per_step` training prompts with the
       FROZEN policy (or read that step's rows from `rollouts_from`);
    2. score them (verifier and/or reward model, `config.reward`);
    3. outcome reward on the last response token; old values from the critic (no grad);
       returns = GAE(gamma, lam_critic)[1] (lam_critic = 1: Monte-Carlo returns);
    4. `epochs` passes of value-loss updates over the step's rows, in mini-batches of
       micro_batch_size x grad_accum_steps rows per rank (one optimizer step each);
    5. metrics; 6. the step's rollouts (schema v1) and, every save_every, a checkpoint.

The policy never trains here: it is loaded frozen (eval mode, no gradients) and is not wrapped in
a DeepSpeed engine. Only what trains gets an engine:
- critic_mode=separate: the whole value model (own backbone + score head);
- critic_mode=shared: ONLY the value head. The backbone IS the policy's, and PPO starts from the
  policy this stage was given, so training the backbone here would silently change the policy;
  the warmup therefore fits the head on the frozen policy features (a linear probe), and the
  backbone starts adapting in PPO, together with the policy loss.

Step numbering (metrics, checkpoints, rollouts): step k is the k-th step done (1-based), so after
resuming from checkpoint k the rollouts of steps > k are deleted and sampled again: every step
is stored exactly once. Sampling is seeded by (seed, step, rank), so a resumed run draws the
same responses as an uninterrupted one.

    python -m stages.critic_warmup --config FILE [--force]      (or: rlpipe stage critic_warmup --run-id ID)
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from pydantic import Field

from stages import distributed
from stages.algorithms import (
    compute_gae,
    masked_moments_sums,
    moments_from_sums,
    outcome_rewards_to_tokens,
    value_loss,
)
from stages.artifacts import export_model_dir, resolve_model_dir
from stages.config import Section, non_semantic
from stages.engine import OptimConfig, build_engine, load_training_state, save_training_state
from stages.forward import TokenBatch, build_token_batch, response_values
from stages.generation import HFGenerator, sampling_seed
from stages.inputs import critic_init_uri, policy_uri, reward_model_uri
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
from stages.models import PolicyWithValueHead, load_reference, load_reward_model, load_value_model
from stages.numerics import at_step, require_finite
from stages.rollouts import ScoredSample, batch_from_rollouts, rollout_columns, score_samples, training_batch
from stages.tasks import batch_indices, check_fits, encode_problems, shard, task_problems
from stages.tracking import MetricsTracker
from storage.location import Location
from storage.rollouts import delete_rollouts_after, read_rollouts, write_rollouts

STAGE = "critic_warmup"
Tensor = torch.Tensor


class CriticWarmupConfig(Section):
    enabled: bool = Field(
        True, description="Warm the critic up before PPO (value pretraining, policy frozen)."
    )
    policy_from: str | None = Field(
        None, description="Policy that samples. Default: the run's starting policy."
    )
    rollouts_from: str | None = Field(
        None,
        description="Train from existing rollouts (a `{stage}/rollouts` URI) instead of generating; the critic "
        "regresses onto returns recomputed from their rewards.",
    )
    prompts_per_step: int = Field(32, ge=1, description="Prompts sampled per step (over all ranks).")
    samples_per_prompt: int = Field(4, ge=1, description="Responses per prompt.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount.")
    lam_critic: float = Field(
        1.0, ge=0, le=1, description="GAE lambda of the value targets (1.0: Monte-Carlo returns)."
    )
    epochs: int = Field(1, ge=1, description="Passes of critic updates over each step's rollouts.")
    steps: int = Field(30, ge=1, description="Steps (generate + score + critic updates).")
    save_every: int = non_semantic(
        10, ge=1, description="Commit a checkpoint every N steps (and at the end)."
    )
    keep_last: int = non_semantic(
        2, ge=1, description="Committed checkpoints kept (the newest is never removed)."
    )
    log_every: int = non_semantic(1, ge=1, description="Write metrics every N steps.")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=5, micro_batch_size=32),
        description="The critic's optimizer and DeepSpeed layout.",
    )


def plan(config) -> StagePlan:
    """What the result depends on: this section, task, model, sampling, reward, seed; and its inputs."""
    semantic = {"critic_warmup": config.critic_warmup, "task": config.task, "model": config.model}
    semantic |= {"generation": config.generation, "reward": config.reward, "seed": config.seed}
    return make_plan(config, semantic, _input_uris(config))


def run(config, force: bool = False) -> None:
    """The critic-warmup recipe, top to bottom."""
    distributed.init_distributed()
    rank, world = distributed.rank(), distributed.world_size()
    cw = config.critic_warmup
    dtype, attn, trust = config.model.dtype, config.model.attn_implementation, config.model.trust_remote_code
    shared = config.model.critic_mode == "shared"

    # 1. Skip if complete for this config and these inputs; otherwise claim the stage.
    inputs = _input_uris(config)
    ctx = begin_stage(STAGE, config, plan(config), force=force, rank=rank, world_size=world)
    if ctx is None:
        distributed.print0(f"{STAGE}: complete for this config and inputs, skipped (use --force to rerun)")
        return
    layout = ctx.layout
    _check_batch_layout(cw, world)

    # 2. Models: the frozen policy (sampler; backbone of a shared critic), the critic, the RM.
    policy_dir = resolve_model_dir(inputs["policy"], config.tiny_model, ctx.endpoint_url)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir, trust_remote_code=trust)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy = load_reference(policy_dir, dtype, attn, trust) if shared or not cw.rollouts_from else None
    torch.manual_seed(config.seed)
    critic_dir = resolve_model_dir(inputs["critic_init"], config.tiny_model, ctx.endpoint_url)
    critic, trainable = _build_critic(config, critic_dir, policy)
    engine = build_engine(trainable, cw.optim)
    rm = None
    if "reward_model" in inputs:
        rm = load_reward_model(
            resolve_model_dir(inputs["reward_model"], config.tiny_model, ctx.endpoint_url), dtype, attn, trust
        )
    generator = None
    if not cw.rollouts_from:
        generator = HFGenerator(policy, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)

    # 3. Data: training prompts (the same split as every stage), or the source run's rollouts.
    train = encode_problems(task_problems(config.task, "train"), tokenizer)
    if not cw.rollouts_from:
        check_fits(train, tokenizer, config.generation.max_new_tokens, f"{STAGE} train")
    source = Location(cw.rollouts_from, ctx.endpoint_url) if cw.rollouts_from else None

    # 4. Resume from the newest committed checkpoint; later rollouts are replaced, never duplicated.
    staging = staging_dir(ctx)
    state = load_training_state({"critic": engine}, layout.checkpoints(STAGE), staging)
    if state is not None:
        check_resumable(ctx, state)
    start = state["step"] if state else 0
    if ctx.is_main:
        delete_rollouts_after(layout.rollouts(STAGE), start)
    distributed.barrier()
    tracker = MetricsTracker(
        layout.metrics(STAGE),
        rank=rank,
        run_id=config.run_id,
        stage=STAGE,
        total_steps=cw.steps,
        start_step=start,
        wandb_config=config.wandb,
        config=config.model_dump(mode="json"),
    )

    # 5. Train.
    metrics: dict[str, float] = {}
    for step in range(start, cw.steps):
        done = step + 1
        # step 5.1 rollouts: sample with the frozen policy, or read this step's rows
        if source is None:
            picked = batch_indices(len(train), cw.prompts_per_step, step, config.seed)
            prompts = [train[i] for i in shard(picked, rank, world) for _ in range(cw.samples_per_prompt)]
            samples = generator.generate(
                [p.prompt_ids for p in prompts], config.generation, sampling_seed(config.seed, done, rank)
            )
            # step 5.2 score: verifier and/or reward model
            scored = score_samples(
                samples,
                prompts,
                tokenizer,
                config.reward,
                rm=rm,
                rm_micro_batch_size=cw.optim.micro_batch_size,
            )
        else:
            scored = _source_rows(source, done, rank, world)
        if len(scored) % (cw.optim.micro_batch_size * cw.optim.grad_accum_steps):
            raise StageError(
                f"{STAGE}: step {done} has {len(scored)} rows on rank {rank}, not a multiple of "
                f"optim.micro_batch_size x optim.grad_accum_steps"
            )

        # step 5.3 outcome reward on the last token; old values; returns = GAE(lam_critic) targets
        prompt_ids, response_ids, rewards_B = training_batch(scored)
        batch = build_token_batch(prompt_ids, response_ids, pad_id)
        mask_BT = batch.response_mask_BT
        with torch.no_grad():
            old_values_BT = response_values(critic, batch, cw.optim.micro_batch_size)
        rewards_BT = outcome_rewards_to_tokens(rewards_B, mask_BT)
        advantages_BT, returns_BT = compute_gae(rewards_BT, old_values_BT, mask_BT, cw.gamma, cw.lam_critic)

        # step 5.4 critic updates
        with at_step(STAGE, done):
            loss = _update_critic(
                engine,
                critic,
                prompt_ids,
                response_ids,
                pad_id,
                old_values_BT,
                returns_BT,
                cw,
                (config.seed, done),
            )

        # step 5.5 metrics, reduced over ranks
        if done % cw.log_every == 0 or done == cw.steps:
            with torch.no_grad():
                new_values_BT = response_values(critic, batch, cw.optim.micro_batch_size)
            metrics = _step_metrics(scored, batch, old_values_BT, new_values_BT, returns_BT, loss)
            metrics["critic_warmup/generated"] = float(
                distributed.all_reduce(torch.tensor(0.0 if source is not None else float(len(scored))))
            )
            metrics["critic_warmup/lr"] = engine.get_lr()[0]
            tracker.log(done, metrics)

        # step 5.6 this step's rollouts (one part per rank), then the checkpoint
        columns = rollout_columns(
            scored,
            run_id=config.run_id,
            stage=STAGE,
            step=done,
            values_BT=old_values_BT,
            advantages_BT=advantages_BT,
            returns_BT=returns_BT,
        )
        write_rollouts(layout.rollout_part(STAGE, done, rank), columns)
        if done % cw.save_every == 0 or done == cw.steps:
            trainer_state = {"config_hash": ctx.config_hash, "data_cursor": done * cw.prompts_per_step}
            save_training_state(
                {"critic": engine}, trainer_state, layout.checkpoints(STAGE), done, cw.keep_last, staging
            )
    tracker.close()
    if not metrics:  # resumed at the last step: the run was complete but for its export
        metrics = _last_logged(layout)

    # 6. Export the critic in HF format, then the manifest (last).
    final = layout.final(STAGE, "value")
    if ctx.is_main:
        export_dir = staging / "export"
        if shared:
            critic.save_pretrained(export_dir)  # policy files + value_head.safetensors
        else:
            engine.module.save_pretrained(export_dir, safe_serialization=True)
        tokenizer.save_pretrained(export_dir)
        export_model_dir(export_dir, final)
    distributed.barrier()
    summary = {
        "explained_var": metrics.get("critic_warmup/explained_var"),
        "explained_var_post_update": metrics.get("critic_warmup/explained_var_post_update"),
        "value_loss": metrics.get("critic_warmup/value_loss"),
        "accuracy": metrics.get("critic_warmup/accuracy"),
    }
    outputs = {"value": str(final), "rollouts": str(layout.rollouts(STAGE))}
    finish_stage(ctx, outputs=outputs, metrics=summary)
    release_staging_dir(staging)
    distributed.print0(
        f"{STAGE}: done; explained variance {summary['explained_var']}, value loss "
        f"{summary['value_loss']}; critic at {final}"
    )


def _input_uris(config) -> dict[str, str]:
    """The stage's inputs by name: policy (tokenizer, sampler), critic init, RM (rm_coef > 0), rollouts."""
    cw = config.critic_warmup
    try:
        inputs = {"policy": policy_uri(config, cw.policy_from), "critic_init": critic_init_uri(config)}
    except ValueError as err:  # e.g. critic_init=reward_model with the reward_model stage disabled
        raise StageError(f"{STAGE}: {err}") from None
    if config.reward.rm_coef > 0 and not cw.rollouts_from:
        rm = reward_model_uri(config)
        if rm is None:
            raise StageError(
                f"{STAGE}: reward.rm_coef > 0 but reward_model.enabled is false (no reward model)"
            )
        inputs["reward_model"] = rm
    if cw.rollouts_from:
        inputs["rollouts"] = cw.rollouts_from
    return inputs


def _check_batch_layout(cw: CriticWarmupConfig, world: int) -> None:
    """Each step's rows must split evenly over ranks and into optimizer mini-batches."""
    if cw.rollouts_from:
        return  # checked per step against the rows read
    if cw.prompts_per_step % world:
        raise StageError(
            f"{STAGE}: prompts_per_step ({cw.prompts_per_step}) must divide by the ranks ({world})"
        )
    rows = cw.prompts_per_step // world * cw.samples_per_prompt
    minibatch = cw.optim.micro_batch_size * cw.optim.grad_accum_steps
    if rows % minibatch:
        raise StageError(
            f"{STAGE}: {rows} rows per rank per step (prompts_per_step / ranks x samples_per_prompt) do not "
            f"split into mini-batches of optim.micro_batch_size x optim.grad_accum_steps = {minibatch}"
        )


def _build_critic(config, critic_dir: str, policy) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(critic to read values from, module to train). See the module docstring for the shared case."""
    kwargs = {
        "dtype": config.model.dtype,
        "attn_implementation": config.model.attn_implementation,
        "trust_remote_code": config.model.trust_remote_code,
    }
    if config.model.critic_mode == "separate":
        critic = load_value_model(critic_dir, **kwargs).train()  # RM: backbone + head; LM: zero head
        return critic, critic
    critic = PolicyWithValueHead(policy)  # policy: frozen, eval mode (load_reference)
    if config.model.critic_init != "policy":
        critic.copy_head_from(load_value_model(critic_dir, **kwargs))
    critic.value_head.requires_grad_(True)
    return critic, critic.value_head


def _source_rows(source: Location, step: int, rank: int, world: int) -> list[ScoredSample]:
    """This rank's share of step `step` of the source rollouts (rows read in part order)."""
    rows = batch_from_rollouts(read_rollouts(source, steps=[step]))
    if not rows:
        raise StageError(f"{STAGE}: rollouts_from {source.uri} has no rows for step {step}")
    if len(rows) % world:
        raise StageError(
            f"{STAGE}: step {step} of {source.uri} has {len(rows)} rows, not divisible by {world} ranks"
        )
    return shard(rows, rank, world)


def _update_critic(
    engine,
    critic,
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    pad_id: int,
    old_values_BT: Tensor,
    returns_BT: Tensor,
    cw: CriticWarmupConfig,
    seed: tuple[int, int],
) -> Tensor:
    """`epochs` shuffled passes; one optimizer step per mini-batch of micro x accum rows. Mean loss.

    Each mini-batch's loss is the token mean over ALL its valid tokens on all ranks: micro-batch
    losses are divided by that global count and scaled by (accumulation steps x ranks), which
    DeepSpeed divides back out, so the gradient is exactly that of one big batch (sft `_train_step`).
    """
    optim = cw.optim
    rows = len(prompt_ids)
    lengths_B = torch.tensor([len(r) for r in response_ids], dtype=torch.float32)
    minibatch = optim.micro_batch_size * optim.grad_accum_steps
    scale = optim.grad_accum_steps * distributed.world_size()
    shuffle = torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
    total, updates = torch.zeros(()), 0
    for _ in range(cw.epochs):
        order = torch.randperm(rows, generator=shuffle)
        for start in range(0, rows, minibatch):
            picked = order[start : start + minibatch]
            tokens = distributed.all_reduce(lengths_B[picked].sum())
            for micro in picked.split(optim.micro_batch_size):
                mb = build_token_batch(
                    [prompt_ids[i] for i in micro], [response_ids[i] for i in micro], pad_id
                )
                T = mb.response_mask_BT.shape[1]
                values_BT = response_values(critic, mb)
                loss, _ = value_loss(
                    values_BT,
                    old_values_BT[micro, :T],
                    returns_BT[micro, :T],
                    mb.response_mask_BT,
                    clip_range=None,
                    agg="token_mean",
                    global_count=tokens,
                )
                require_finite(loss, "value loss")
                engine.backward(loss * scale)
                engine.step()
                total += loss.detach()
            updates += 1
    return distributed.all_reduce(total) / max(updates, 1)


def _global_ev(values_BT: Tensor, returns_BT: Tensor, mask_BT: Tensor) -> float:
    """Explained variance 1 - Var[R - V] / Var[R] over the valid tokens of all ranks.

    NaN when the returns do not vary (every response got the same reward): there is nothing to
    explain, and `1 - residual / eps` would read as a great or a terrible critic at random.
    """
    sums = torch.stack(
        [masked_moments_sums(returns_BT, mask_BT), masked_moments_sums(returns_BT - values_BT, mask_BT)]
    ).double()
    (_, var_returns), (_, var_residual) = map(moments_from_sums, distributed.all_reduce(sums).unbind())
    if var_returns <= 1e-12:
        return float("nan")
    return float(1 - var_residual / var_returns)


def _step_metrics(
    scored: list[ScoredSample],
    batch: TokenBatch,
    old_values_BT: Tensor,
    new_values_BT: Tensor,
    returns_BT: Tensor,
    loss: Tensor,
) -> dict[str, float]:
    """Metrics of one step over all ranks. `explained_var` uses the values from BEFORE this step's
    updates (the critic has not fitted these rollouts yet: a held-out measure); `_post_update` is in-sample."""
    mask_BT = batch.response_mask_BT
    correct_B = torch.tensor([s.is_correct for s in scored])
    value_sum_B = (old_values_BT * mask_BT).sum(1).double()
    tokens_B = mask_BT.sum(1).double()
    sums = distributed.all_reduce(
        torch.stack(
            [
                torch.tensor(float(len(scored)), dtype=torch.float64),
                torch.tensor(sum(s.reward for s in scored), dtype=torch.float64),
                correct_B.double().sum(),
                tokens_B.sum(),
                value_sum_B[correct_B].sum(),
                tokens_B[correct_B].sum(),
                value_sum_B[~correct_B].sum(),
                tokens_B[~correct_B].sum(),
            ]
        )
    ).tolist()
    n, reward, correct, tokens, v_correct, t_correct, v_incorrect, t_incorrect = sums
    return {
        "critic_warmup/value_loss": float(loss),
        "critic_warmup/explained_var": _global_ev(old_values_BT, returns_BT, mask_BT),
        "critic_warmup/explained_var_post_update": _global_ev(new_values_BT, returns_BT, mask_BT),
        "critic_warmup/value_correct": v_correct / t_correct if t_correct else float("nan"),
        "critic_warmup/value_incorrect": v_incorrect / t_incorrect if t_incorrect else float("nan"),
        "critic_warmup/score": reward / n,  # mean total reward (what the returns are made of)
        "critic_warmup/accuracy": correct / n,
        "critic_warmup/response_len": tokens / n,
    }


def _last_logged(layout) -> dict[str, float]:
    from storage.metrics import read_metrics

    records = [r for r in read_metrics(layout.metrics(STAGE)) if "critic_warmup/explained_var" in r]
    return records[-1] if records else {}


def main() -> None:
    sys.exit(stage_main(STAGE, run))


if __name__ == "__main__":
    main()
