"""SFT warm start: completion-only NLL on prompt -> worked solution (optional stage).

The offline `tiny` recipe needs it: its model starts random. SFT teaches it the `arith` format
and some arithmetic, leaving room for RL; the stage reports greedy and sampled held-out accuracy.

    python -m stages.sft --config FILE [--force]          (or: rlpipe stage sft --run-id ID)
"""

from __future__ import annotations

import sys

import torch
from pydantic import Field

from stages import distributed
from stages.accuracy import heldout_accuracy
from stages.algorithms import aggregate_loss
from stages.artifacts import export_model_dir, resolve_model_dir
from stages.config import Section, non_semantic
from stages.datasets import DataError
from stages.engine import OptimConfig, build_engine, load_training_state, save_training_state
from stages.forward import build_token_batch, response_logprobs
from stages.lifecycle import (
    StagePlan,
    begin_stage,
    check_resumable,
    finish_stage,
    make_plan,
    release_staging_dir,
    stage_main,
    staging_dir,
)
from stages.models import load_policy
from stages.numerics import at_step, require_finite
from stages.tasks import EncodedProblem, batch_indices, check_fits, encode_problems, shard, task_problems
from stages.tracking import MetricsTracker

STAGE = "sft"


class SFTConfig(Section):
    enabled: bool = Field(
        True, description="Run the SFT warm start (the tiny recipe needs it: its model starts random)."
    )
    steps: int = Field(300, ge=1, description="Optimizer steps.")
    save_every: int = non_semantic(
        100, ge=1, description="Commit a checkpoint every N steps (and at the end)."
    )
    keep_last: int = non_semantic(
        2, ge=1, description="Committed checkpoints kept (the newest is never removed)."
    )
    log_every: int = non_semantic(10, ge=1, description="Write metrics every N steps.")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20, micro_batch_size=32, weight_decay=0.0),
        description="Optimizer and DeepSpeed layout; global batch = micro_batch_size x grad_accum_steps x ranks.",
    )


def plan(config) -> StagePlan:
    """What the result depends on: the SFT section, the task, the model, the seed; input: the policy."""
    semantic = {"sft": config.sft, "task": config.task, "model": config.model, "seed": config.seed}
    return make_plan(config, semantic, {"policy": config.model.policy})


def run(config, force: bool = False) -> None:
    """The SFT recipe, top to bottom."""
    distributed.init_distributed()
    rank, world = distributed.rank(), distributed.world_size()
    sft = config.sft

    # 1. Skip if complete for this config and input; otherwise claim the stage.
    ctx = begin_stage(STAGE, config, plan(config), force=force, rank=rank, world_size=world)
    if ctx is None:
        distributed.print0(f"{STAGE}: complete for this config and inputs, skipped (use --force to rerun)")
        return
    layout = ctx.layout

    # 2. Model and tokenizer (the engine after the data).
    policy_dir = resolve_model_dir(config.model.policy, config.tiny_model, ctx.endpoint_url)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)

    # 3. Data (before the engine, so bad data fails in seconds): train problems with worked
    #    solutions; held-out problems for accuracy.
    train = [p for p in encode_problems(task_problems(config.task, "train"), tokenizer) if p.solution_ids]
    heldout = encode_problems(task_problems(config.task, "test"), tokenizer)
    if not train:
        raise DataError(f"{STAGE}: no training problem of {config.task.dataset!r} has a worked solution")
    check_fits(train, tokenizer, config.generation.max_new_tokens, f"{STAGE} train", with_solution=True)
    check_fits(heldout, tokenizer, config.generation.max_new_tokens, f"{STAGE} held-out")

    # 4. Engine.
    torch.manual_seed(config.seed)
    engine = build_engine(load_policy(policy_dir, config.model.dtype), sft.optim)
    global_batch = sft.optim.micro_batch_size * sft.optim.grad_accum_steps * world

    # 5. Resume from the newest committed checkpoint (same config only).
    staging = staging_dir(ctx)
    state = load_training_state({"policy": engine}, layout.checkpoints(STAGE), staging)
    if state is not None:
        check_resumable(ctx, state)
    start = state["step"] if state else 0
    last_loss = state.get("loss", float("nan")) if state else float("nan")
    tracker = MetricsTracker(
        layout.metrics(STAGE),
        rank=rank,
        run_id=config.run_id,
        stage=STAGE,
        total_steps=sft.steps,
        start_step=start,
        wandb_config=config.wandb,
        config=config.model_dump(mode="json"),
    )

    # 6. Train.
    for step in range(start, sft.steps):
        indices = shard(batch_indices(len(train), global_batch, step, config.seed), rank, world)
        done = step + 1
        with at_step(STAGE, done):
            loss = _train_step(engine, [train[i] for i in indices], sft.optim, tokenizer.pad_token_id)
        last_loss = distributed.all_reduce(loss.detach().clone(), "mean").item()
        if done % sft.log_every == 0 or done == sft.steps:
            tracker.log(done, {"sft/loss": last_loss, "sft/lr": engine.get_lr()[0]})
        if done % sft.save_every == 0 or done == sft.steps:
            # The last loss travels with the checkpoint: a rerun resumed at the end still reports it.
            trainer_state = {
                "config_hash": ctx.config_hash,
                "data_cursor": done * global_batch,
                "loss": last_loss,
            }
            save_training_state(
                {"policy": engine}, trainer_state, layout.checkpoints(STAGE), done, sft.keep_last, staging
            )

    # 7. Held-out accuracy, greedy and sampled.
    accuracy = heldout_accuracy(engine.module, tokenizer, heldout, config.generation, config.seed)
    tracker.log(sft.steps, {f"sft/heldout_{k}": v for k, v in accuracy.items()})
    tracker.close()

    # 8. Export the policy in HF format, then the manifest (last).
    final = layout.final(STAGE, "policy")
    if ctx.is_main:
        export_dir = staging / "export"
        engine.module.save_pretrained(export_dir, safe_serialization=True)
        tokenizer.save_pretrained(export_dir)
        export_model_dir(export_dir, final)
    distributed.barrier()
    metrics = {"loss": last_loss, **{f"heldout_{k}": v for k, v in accuracy.items()}}
    finish_stage(ctx, outputs={"policy": str(final)}, metrics=metrics)
    release_staging_dir(staging)
    distributed.print0(
        f"{STAGE}: done; held-out greedy {accuracy['greedy']:.3f}, sampled {accuracy['sampled']:.3f}; policy at {final}"
    )


def _train_step(engine, batch: list[EncodedProblem], optim: OptimConfig, pad_id: int) -> torch.Tensor:
    """One optimizer step of completion-only NLL, token-mean over the whole global batch.

    DeepSpeed divides each micro-batch loss by the accumulation steps and averages gradients over
    ranks; scaling by (accumulation steps x ranks) / global tokens makes the accumulated gradient
    exactly that of one big batch (see `aggregate_loss`).
    """
    micro = optim.micro_batch_size
    chunks = [batch[i : i + micro] for i in range(0, len(batch), micro)]
    local_tokens = torch.tensor(float(sum(len(p.solution_ids) for p in batch)))
    global_tokens = distributed.all_reduce(local_tokens)
    scale = len(chunks) * distributed.world_size()
    total = torch.zeros(())
    for chunk in chunks:
        tokens = build_token_batch([p.prompt_ids for p in chunk], [p.solution_ids for p in chunk], pad_id)
        logprobs, _ = response_logprobs(engine, tokens)
        loss = (
            aggregate_loss(-logprobs, tokens.response_mask_BT, "token_mean", global_count=global_tokens)
            * scale
        )
        require_finite(loss, "loss")
        engine.backward(loss)
        engine.step()
        total += loss.detach() / scale
    return total


def main() -> None:
    sys.exit(stage_main(STAGE, run))


if __name__ == "__main__":
    main()
