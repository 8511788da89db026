"""PPO with a learned critic (VAPO refinements), or GRPO as the critic-free baseline -> `final/policy`.

Shape suffixes: B rollouts (rows of this rank), T response tokens (right-padded).
One step (the conventions of DESIGN section 3; `stages.ppo.step.run_step` does points 1-7):

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

from functools import partial

import torch

from stages.config.batches import stage_layouts
from stages.config.pipeline import PipelineConfig
from stages.config.sampling import sampling_plan
from stages.data.prompt_rendering import stop_token_ids
from stages.data.tasks import batch_indices, check_fits, encode_problems, shard, task_problems
from stages.evaluation.heldout import heldout_accuracy
from stages.lifecycle.contract import StageError, StagePlan, make_plan
from stages.lifecycle.inputs import critic_uri, policy_uri, scoring_reward_model_uri
from stages.lifecycle.training_run import claim_stage, resume_training
from stages.models.sources import resolve_model_dir
from stages.models.tokenizer import load_tokenizer, pad_token_id
from stages.ppo.engines import build_models, save_hf_models
from stages.ppo.metrics import rollout_table, step_metrics
from stages.ppo.step import push_weights, run_step
from stages.runtime import distributed
from stages.sampling.backends import make_generator
from storage.rollouts import delete_rollouts_after, write_rollouts

STAGE = "ppo"


def plan(config: PipelineConfig) -> StagePlan:
    """What the result depends on: this section, task, model, sampling, reward, seed; and its inputs."""
    semantic = {"ppo": config.ppo, "task": config.task, "model": config.model}
    semantic |= {"generation": sampling_plan(config.generation), "reward": config.reward, "seed": config.seed}
    return make_plan(config, semantic, _input_uris(config))


def run(config: PipelineConfig, force: bool = False) -> None:
    """The PPO recipe, top to bottom."""
    ppo = config.ppo

    # 1. Skip if complete for this config and these inputs; otherwise claim the stage.
    inputs = _input_uris(config)
    ctx = claim_stage(STAGE, config, plan(config), force)
    if ctx is None:
        return
    layout, rank, world = ctx.layout, ctx.rank, ctx.world_size
    batches = stage_layouts(config, STAGE, world)  # each engine's micro-batches per optimizer step

    # 2. Models: policy (+ shared value head) engine, separate critic engine, reference, RM; generator.
    dirs = {name: resolve_model_dir(uri, config.tiny_model, ctx.endpoint_url) for name, uri in inputs.items()}
    tokenizer = load_tokenizer(dirs["policy"], config.model.trust_remote_code)
    torch.manual_seed(config.seed)
    models = build_models(ppo, config.model, dirs, batches)
    # hf samples from the live policy module; vllm starts from the policy's files, then gets every
    # update pushed (`push_weights`), and sleeps through the updates when colocated.
    generator = make_generator(
        config.generation, dirs["policy"] if config.generation.backend == "vllm" else models.policy,
        eos_token_id=stop_token_ids(tokenizer, config.task.prompt_format), pad_token_id=pad_token_id(tokenizer), seed=config.seed,
    )  # fmt: skip

    # 3. Data: training prompts (the split every stage uses) and the held-out prompts.
    train = encode_problems(task_problems(config.task, "train"), tokenizer, config.task.prompt_format)
    heldout = encode_problems(task_problems(config.task, "test"), tokenizer, config.task.prompt_format)
    check_fits(train, tokenizer, config.generation.max_new_tokens, f"{STAGE} train")
    check_fits(heldout, tokenizer, config.generation.max_new_tokens, f"{STAGE} held-out")

    def evaluate() -> dict[str, float]:
        return heldout_accuracy(
            generator, tokenizer, heldout, config.generation, config.seed, ppo.eval_samples
        )

    # 4. Resume from the newest committed checkpoint (all engines); later rollouts are replaced.
    training = resume_training(ctx, models.engines, ppo.steps)
    start = training.start
    initial = training.state["initial_accuracy"] if training.state else evaluate()  # before step 1
    push_weights(generator, models, ppo.policy_optim, version=start)
    if ctx.is_main:
        delete_rollouts_after(layout.rollouts(STAGE), start)
    distributed.barrier()
    if start == 0:
        training.tracker.log(0, {f"{STAGE}/heldout_{k}": v for k, v in initial.items()})

    # 5. Train: the 7 points of one step.
    accuracy: dict[str, float] = {}
    for step in training.steps(ppo.steps):
        done = step + 1
        # step 1. prompts (group id = the prompt's index); steps 1-7: `run_step`
        picked = shard(batch_indices(len(train), ppo.prompts_per_step, step, config.seed), rank, world)
        prompts = [train[i] for i in picked for _ in range(ppo.samples_per_prompt)]
        group_ids_B = torch.tensor([i for i in picked for _ in range(ppo.samples_per_prompt)])
        outcome = run_step(
            models, generator, prompts, group_ids_B, tokenizer, ppo=ppo, sampling=config.generation,
            reward=config.reward, seed=config.seed, step=done, rank=rank,
            train_policy=done > ppo.policy_warmup_steps,
        )  # fmt: skip
        if done % ppo.log_every == 0 or done == ppo.steps:
            training.tracker.log(
                done,
                step_metrics(
                    outcome.rollout, outcome.old, outcome.adv, outcome.scored, outcome.stats, models
                ),
            )
        if ppo.eval_every and done % ppo.eval_every == 0 or done == ppo.steps:
            accuracy = evaluate()
            training.tracker.log(done, {f"{STAGE}/heldout_{k}": v for k, v in accuracy.items()})
        columns = rollout_table(outcome.old, outcome.adv, outcome.scored, config.run_id, done)
        write_rollouts(layout.rollout_part(STAGE, done, rank), columns)
        if done % ppo.save_every == 0 or done == ppo.steps:
            training.save(
                done,
                {"data_cursor": done * ppo.prompts_per_step, "initial_accuracy": initial},
                ppo.keep_last,
                hf_export=partial(save_hf_models, models, tokenizer) if ppo.hf_checkpoints else None,
            )
    if not accuracy:  # resumed at the last step: the run was complete but for its export
        accuracy = evaluate()

    # 6. Export the policy (and the critic) in HF format, then the manifest (last).
    outputs = {
        "policy": str(training.export_model("policy", models.policy.save_pretrained, tokenizer)),
        "rollouts": str(layout.rollouts(STAGE)),
    }
    if models.critic is not None:
        outputs["value"] = str(
            training.export_model("value", models.critic.module.save_pretrained, tokenizer)
        )
    metrics = {f"heldout_{k}": v for k, v in accuracy.items()}
    metrics |= {f"initial_heldout_{k}": v for k, v in initial.items()}
    training.finish(outputs=outputs, metrics=metrics)
    distributed.print0(
        f"{STAGE}: done; held-out sampled {initial['sampled']:.3f} -> {accuracy['sampled']:.3f}, greedy "
        f"{initial['greedy']:.3f} -> {accuracy['greedy']:.3f}; policy at {outputs['policy']}"
    )


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------
def _input_uris(config: PipelineConfig) -> dict[str, str]:
    """Inputs by name: policy (also the reference), critic (gae), reward model (rm_coef > 0)."""
    ppo = config.ppo
    try:
        inputs = {"policy": policy_uri(config, ppo.policy_from)}
        if ppo.advantage_estimator == "gae":
            inputs["critic"] = critic_uri(config, ppo.critic_from)
        rm = scoring_reward_model_uri(config)
    except ValueError as err:  # e.g. critic_init=reward_model with the reward_model stage disabled
        raise StageError(f"{STAGE}: {err}") from None
    if rm is not None:
        inputs["reward_model"] = rm
    return inputs
