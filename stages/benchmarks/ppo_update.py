"""`rlpipe bench ppo-update`: full PPO updates through the `ppo` stage's own step (`run_step`),
and the same workload through TRL's `PPOTrainer` (trl 1.0.0, `trl.experimental.ppo`).

Both sides: the same model files (policy, reference, critic initialised from the policy), the same
prompts (the arith task), `prompts x samples_per_prompt` responses of at most `response_length`
tokens ending at EOS, `epochs` x `minibatches` optimizer steps of policy and critic, KL to the
reference in the reward (TRL always has one; `kl_coef=0` lets rlpipe skip the reference pass).
The reward: rlpipe grades the response (the verifier); TRL's trainer only takes a reward model,
so it runs one (a sequence classifier on the same backbone): part of what TRL costs.
Speed is printed, never asserted.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from stages.config.models import TinyModelConfig

# The reference workload of BENCHMARKS.md: a 3.4M-parameter Qwen2 (hidden 256, 4 layers, 4 heads, 2 KV
# heads, vocab 1024: the arith tokenizer's 466 ids plus rows it never produces).
BENCH_TINY = TinyModelConfig(
    vocab_size=1024, embedding_rows=1024, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768,
    max_position_embeddings=512, corpus_size=20000,
)  # fmt: skip


@dataclass(frozen=True)
class PPOBench:
    model: str = "tiny"  # an HF directory, or `tiny` (BENCH_TINY, built offline)
    prompts: int = 16
    samples_per_prompt: int = 1
    response_length: int = 64
    epochs: int = 4
    minibatches: int = 2
    updates: int = 3
    warmup: int = 1  # untimed updates first (allocations, DeepSpeed's first step)
    kl_coef: float = 0.05
    critic_mode: str = "separate"  # or shared: one trunk with a value head
    zero_stage: int = 2  # the stages' default; 0 skips ZeRO's partitioning bookkeeping
    lr: float = 3e-6
    seed: int = 0

    @property
    def rows(self) -> int:
        return self.prompts * self.samples_per_prompt


def bench_config(bench: PPOBench):
    """The run config of the rlpipe side: the `ppo` stage's settings for this workload."""
    from stages.config.pipeline import load_config
    from stages.models.sources import TINY

    rows = bench.rows
    if rows % bench.minibatches:
        raise ValueError(
            f"prompts x samples_per_prompt ({rows}) must divide by minibatches ({bench.minibatches})"
        )
    micro = rows // bench.minibatches  # one micro-batch per optimizer step, as TRL's side
    optim = (
        f"{{lr: {bench.lr}, micro_batch_size: {micro}, warmup_steps: 0, schedule: constant, "
        f"zero_stage: {bench.zero_stage}}}"
    )
    tiny = BENCH_TINY.model_dump()
    overrides = [
        "run_id=bench", "wandb.mode=disabled", f"seed={bench.seed}",
        f"model.policy={TINY if bench.model == 'tiny' else bench.model}", "model.critic_init=policy", f"model.critic_mode={bench.critic_mode}",
        f"tiny_model={json.dumps(tiny)}", "generation.temperature=1.0", f"generation.max_new_tokens={bench.response_length}",
        f"ppo.prompts_per_step={bench.prompts}", f"ppo.samples_per_prompt={bench.samples_per_prompt}",
        f"ppo.epochs={bench.epochs}", f"ppo.minibatches={bench.minibatches}", f"ppo.kl_coef={bench.kl_coef}",
        f"ppo.policy_optim={optim}", f"ppo.critic_optim={optim}", "reward.missing_eos_penalty=0.0",
    ]  # fmt: skip
    return load_config(None, overrides)


def model_dir(bench: PPOBench) -> str:
    from stages.models.sources import resolve_model_dir

    config = bench_config(bench)
    return resolve_model_dir(config.model.policy, config.tiny_model)


def bench_prompts(bench: PPOBench, tokenizer) -> list[list]:
    """The prompts of every update (warm-up included), one entry per sample: the same on both sides."""
    from stages.config.task import TaskConfig
    from stages.data.tasks import batch_indices, encode_problems, task_problems

    train = encode_problems(task_problems(TaskConfig(train_size=max(256, bench.prompts)), "train"), tokenizer)
    updates = []
    for update in range(bench.warmup + bench.updates):
        picked = batch_indices(len(train), bench.prompts, update, bench.seed)
        updates.append([train[i] for i in picked for _ in range(bench.samples_per_prompt)])
    return updates


def run_rlpipe(bench: PPOBench) -> dict[str, Any]:
    """`warmup + updates` steps of the ppo stage's code on this workload; timings of the last `updates`."""
    from stages.config.batches import stage_layouts
    from stages.models.tokenizer import load_tokenizer, pad_token_id
    from stages.ppo.engines import build_models
    from stages.ppo.step import StepTimer, run_step
    from stages.runtime import distributed
    from stages.sampling.backends import make_generator

    distributed.init_distributed()
    config = bench_config(bench)
    directory = model_dir(bench)
    tokenizer = load_tokenizer(directory)
    torch.manual_seed(bench.seed)
    batches = stage_layouts(config, "ppo", distributed.world_size())
    models = build_models(config.ppo, config.model, {"policy": directory, "critic": directory}, batches)
    generator = make_generator(
        config.generation, directory if config.generation.backend == "vllm" else models.policy,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_token_id(tokenizer), seed=bench.seed,
    )  # fmt: skip
    timer, tokens, started, train_flops, floor_flops = StepTimer(), 0, 0.0, 0.0, 0.0
    for update, prompts in enumerate(bench_prompts(bench, tokenizer)):
        if update == bench.warmup:
            timer, tokens, started = StepTimer(), 0, time.perf_counter()
            train_flops = floor_flops = 0.0
        group_ids_B = torch.arange(bench.prompts).repeat_interleave(bench.samples_per_prompt)
        outcome = run_step(
            models, generator, prompts, group_ids_B, tokenizer, ppo=config.ppo, sampling=config.generation,
            reward=config.reward, seed=config.seed, step=update + 1, rank=0, train_policy=True, timer=timer,
        )  # fmt: skip
        tokens += int(outcome.rollout.mask_BT.sum())
        batch = outcome.rollout.batch
        response_tokens = batch.response_mask_BT.sum()
        train_flops += training_flops(
            models, bench, bench.rows * batch.input_ids_BL.shape[1], response_tokens
        )
        floor_flops += update_flops_floor(models, bench, batch.attention_mask_BL.sum(), response_tokens)
    elapsed = time.perf_counter() - started
    seconds = dict(timer.seconds)
    train_flops, floor_flops = train_flops / bench.updates, floor_flops / bench.updates
    return {
        "impl": "rlpipe",
        "sec_per_update": elapsed / bench.updates,
        "resp_tokens_per_s": tokens / elapsed,
        "resp_tokens_per_update": tokens / bench.updates,
        "phases_s_per_update": {name: s / bench.updates for name, s in seconds.items()},
        "train_flop_per_update": train_flops,
        "update_flop_floor": floor_flops,
        "train_flop_per_s": train_flops * bench.updates / seconds["train"],
    }


def matmul_params(module: torch.nn.Module) -> int:
    """Parameters that take part in matrix products (all but embedding tables, norms and biases)."""
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() for p in module.parameters() if p.dim() == 2 and id(p) not in embeddings)


def lm_head_params(model: torch.nn.Module) -> int:
    """The output projection's size (hidden x vocabulary), tied to the embedding table or not."""
    return model.get_output_embeddings().weight.numel()


def matmul_sizes(models) -> tuple[int, int, int]:
    """(policy trunk, separate critic, LM head) parameters that take part in matrix products.

    Shared mode: the value head rides on the policy (0 for the critic). The LM head is counted on
    its own: the policy's forwards keep only the logits at the response positions.
    """
    policy = matmul_params(models.policy)
    head = lm_head_params(models.policy)
    if models.policy.get_output_embeddings().weight is not models.policy.get_input_embeddings().weight:
        policy -= head  # untied: `matmul_params` counted the head; tied, it skipped it with the embedding
    separate = models.critic is not None and not models.shared
    return policy, (matmul_params(models.critic.module) if separate else 0), head


def training_flops(models, bench: PPOBench, tokens, response_tokens) -> float:
    """FLOPs of one update's training phase: 6 x matmul params x tokens per epoch, policy and critic,
    plus the LM head at the response positions.

    `tokens` per epoch: `rows x the batch's padded length` for the work done (an upper bound: each
    micro-batch is trimmed to its own longest row), or the sum of the real sequence lengths for the
    floor (padding-free, one forward and backward per row and epoch). The attention term, small at
    these lengths, is left out.
    """
    policy, critic, head = matmul_sizes(models)
    return 6.0 * ((policy + critic) * float(tokens) + head * float(response_tokens)) * bench.epochs


def update_flops_floor(models, bench: PPOBench, tokens, response_tokens) -> float:
    """The matrix-product FLOPs no exact implementation of this update goes below, for `tokens` real
    (unpadded) prompt + response tokens, each passing each model once per pass: generation (prefill
    and decode, logits at the response positions), the rollout's reference (with KL) and critic
    forwards (the old logprobs come free with generation, as TRL takes them), and training."""
    policy, critic, head = matmul_sizes(models)
    generate = 2.0 * (policy * float(tokens) + head * float(response_tokens))
    reference = generate if models.reference is not None else 0.0  # the same architecture
    forwards = reference + 2.0 * critic * float(tokens)
    return generate + forwards + training_flops(models, bench, tokens, response_tokens)


def matmul_peak_flops(size: int = 1024, seconds: float = 2.0) -> float:
    """The machine's measured fp32 matmul rate (FLOP/s) with torch's current thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2.0 * size**3 * runs / (time.perf_counter() - start)


def run_trl(bench: PPOBench) -> dict[str, Any]:
    """The same workload through TRL's PPOTrainer (always a separate critic, plain PyTorch
    optimizers under accelerate); timings of its last `updates` updates."""
    try:
        from trl.experimental.ppo import PPOConfig as TRLPPOConfig
        from trl.experimental.ppo import PPOTrainer
    except ImportError as err:
        raise RuntimeError(f"the TRL baseline needs trl 1.0.0 (`pip install -e '.[bench]'`): {err}") from None
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )

    directory = model_dir(bench)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    total = bench.warmup + bench.updates
    queries = [p.prompt_ids for prompts in bench_prompts(bench, tokenizer) for p in prompts]
    dataset = Dataset.from_dict({"input_ids": queries})

    class UpdateClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    clock = UpdateClock()
    torch.manual_seed(bench.seed)
    with tempfile.TemporaryDirectory(prefix="rlpipe-bench-trl-") as out:
        args = TRLPPOConfig(
            output_dir=out, per_device_train_batch_size=bench.rows, gradient_accumulation_steps=1,
            num_mini_batches=bench.minibatches, num_ppo_epochs=bench.epochs, total_episodes=total * bench.rows,
            response_length=bench.response_length, stop_token="eos", temperature=1.0, kl_coef=bench.kl_coef,
            learning_rate=bench.lr, lr_scheduler_type="constant", local_rollout_forward_batch_size=bench.rows,
            num_sample_generations=0, report_to=[], save_strategy="no", logging_strategy="no", seed=bench.seed,
            use_cpu=not torch.cuda.is_available(), bf16=False, dataloader_num_workers=0,
        )  # fmt: skip
        trainer = PPOTrainer(
            args=args, processing_class=tokenizer,
            model=AutoModelForCausalLM.from_pretrained(directory),
            ref_model=AutoModelForCausalLM.from_pretrained(directory),
            reward_model=AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1),
            value_model=AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1),
            train_dataset=dataset, callbacks=[clock],
        )  # fmt: skip
        started = time.perf_counter()
        trainer.train()
    if len(clock.ends) != total:
        raise RuntimeError(f"TRL ran {len(clock.ends)} updates, expected {total}")
    elapsed = clock.ends[-1] - (clock.ends[bench.warmup - 1] if bench.warmup else started)
    # TRL always decodes `response_length` tokens (what follows EOS becomes padding): it is credited
    # with all of them, which can only flatter it (rlpipe counts tokens up to EOS).
    tokens = bench.updates * bench.rows * bench.response_length
    return {
        "impl": "trl",
        "sec_per_update": elapsed / bench.updates,
        "resp_tokens_per_s": tokens / elapsed,
        "resp_tokens_per_update": tokens / bench.updates,
    }


def bench_ppo_update(bench: PPOBench, baseline: bool = True) -> dict[str, Any]:
    """Both implementations on the same workload, in this process, one after the other."""
    result: dict[str, Any] = {"settings": asdict(bench), "threads": torch.get_num_threads()}
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    ours = run_rlpipe(bench)
    result |= {k: v for k, v in ours.items() if k != "impl"}
    result["matmul_peak_flop_per_s"] = matmul_peak_flops()
    result["train_flop_fraction_of_peak"] = ours["train_flop_per_s"] / result["matmul_peak_flop_per_s"]
    # The least time ANY exact implementation of this update needs: its matrix products at their
    # floor, run at the measured peak, and everything else free.
    result["update_floor_s"] = ours["update_flop_floor"] / result["matmul_peak_flop_per_s"]
    if baseline:
        trl = run_trl(bench)
        result["trl"] = {k: v for k, v in trl.items() if k != "impl"}
        result["speedup_vs_trl"] = ours["resp_tokens_per_s"] / trl["resp_tokens_per_s"]
        # the most any implementation could reach against TRL on this machine (same tokens per update)
        result["speedup_ceiling_vs_trl"] = (
            trl["sec_per_update"] / result["update_floor_s"]
            * ours["resp_tokens_per_update"] / trl["resp_tokens_per_update"]
        )  # fmt: skip
    return result
