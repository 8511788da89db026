"""`rlpipe bench ...`: speed is measured here, and printed; tests never assert a timing."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from flows.cli_options import EndpointOpt, StorageOpt, storage_root
from stages.config.section import ConfigError

bench_app = typer.Typer(
    help="Benchmarks (speed is measured here, never asserted in tests).", no_args_is_help=True
)
ModelOpt = Annotated[
    str, typer.Option(help="HF model directory, or `tiny` (the 3.4M-parameter bench model).")
]


def _compute_here() -> None:
    """A bench that computes in this process takes its fair share of the CPUs, as a stage does."""
    from stages.runtime.threads import start_thread_budget

    # for the rest of this process; its line on stderr, so that `--json` output stays pure JSON
    start_thread_budget("auto", name="bench", log_to_stderr=True)


@bench_app.command("gae")
def bench_gae_command(
    batch: Annotated[int, typer.Option(min=1, help="Sequences.")] = 512,
    length: Annotated[int, typer.Option(min=1, help="Response tokens per sequence.")] = 16384,
    gamma: Annotated[float, typer.Option(help="Discount.")] = 1.0,
    lam: Annotated[float, typer.Option(help="GAE lambda (ignored with --alpha).")] = 0.95,
    alpha: Annotated[
        float | None, typer.Option(help="Length-adaptive lambda with this alpha (VAPO).")
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs of each; the best counts.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Vectorised compute_gae vs. the per-timestep loop (vectorised over the batch), float32."""
    from stages.benchmarks.gae import bench_gae

    _compute_here()
    result = bench_gae(batch, length, gamma, lam, alpha, repeats)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"GAE  B={batch} T={length} lambda={result['lambda']} float32, {result['threads']} threads")
    typer.echo(f"  per-timestep loop  {result['loop_s'] * 1000:9.1f} ms")
    typer.echo(f"  compute_gae        {result['vectorised_s'] * 1000:9.1f} ms")
    typer.echo(f"  speedup            {result['speedup']:9.1f} x")
    typer.echo(f"  max rel. error     {result['max_rel_error']:9.2e}")


@bench_app.command("storage")
def bench_storage_command(
    storage: StorageOpt = None,
    endpoint_url: EndpointOpt = None,
    rows: Annotated[int, typer.Option(min=1, help="Rollout rows written and read.")] = 4096,
    response_len: Annotated[int, typer.Option(min=1, help="Tokens per rollout (per-token columns).")] = 256,
    checkpoint_mb: Annotated[
        int, typer.Option(min=1, help="Size of the checkpoint saved and loaded (MiB).")
    ] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Rollout Parquet and checkpoint throughput (rlpipe vs. pandas / torch.save) under a storage root."""
    from stages.benchmarks.storage_io import bench_storage

    _compute_here()
    result = bench_storage(storage_root(storage, endpoint_url), rows, response_len, checkpoint_mb)
    if as_json:
        typer.echo(json.dumps(result))
        return
    r, c = result["rollouts"], result["checkpoint"]
    typer.echo(f"storage {result['root']}: {rows} rollouts x {response_len} tokens ({r['file_mb']:.1f} MB)")
    typer.echo(f"  rollouts write  rlpipe {r['rlpipe_write_rows_per_s']:9.0f} rows/s ({r['rlpipe_write_mb_per_s']:.1f} MB/s)"
               f"   pandas {r['pandas_write_rows_per_s']:9.0f} rows/s")  # fmt: skip
    typer.echo(f"  rollouts read   rlpipe {r['rlpipe_read_rows_per_s']:9.0f} rows/s ({r['rlpipe_read_mb_per_s']:.1f} MB/s)"
               f"   pandas {r['pandas_read_rows_per_s']:9.0f} rows/s")  # fmt: skip
    typer.echo(f"  checkpoint {c['mb']:.0f} MB  save rlpipe {c['rlpipe_save_mb_per_s']:.0f} MB/s (sha256, commit)  "
               f"torch.save {c['torch_save_mb_per_s']:.0f} MB/s;  load rlpipe {c['rlpipe_load_mb_per_s']:.0f} MB/s "
               f"(verified)  torch.load {c['torch_load_mb_per_s']:.0f} MB/s")  # fmt: skip


@bench_app.command("generate")
def bench_generate_command(
    model: ModelOpt = "tiny",
    prompts: Annotated[int, typer.Option(min=1, help="Prompts sampled at once.")] = 64,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Response budget in tokens.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """rlpipe's KV-cache sampler vs. plain `model.generate`: response tokens per second."""
    from stages.benchmarks.generate import bench_generate
    from stages.benchmarks.ppo_update import PPOBench, model_dir

    _compute_here()
    result = bench_generate(model_dir(PPOBench(model=model)), prompts, max_new_tokens, temperature)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(
        f"generate {prompts} prompts, <= {max_new_tokens} tokens, T={temperature}, {result['threads']} threads"
    )
    typer.echo(
        f"  rlpipe HFGenerator  {result['rlpipe_tokens_per_s']:9.1f} tok/s ({result['rlpipe_tokens']} tokens)"
    )
    typer.echo(
        f"  model.generate      {result['hf_generate_tokens_per_s']:9.1f} tok/s ({result['hf_generate_tokens']} tokens)"
    )
    typer.echo(f"  speedup             {result['speedup']:9.2f} x")


@bench_app.command("ppo-update")
def bench_ppo_update_command(
    model: ModelOpt = "tiny",
    prompts: Annotated[int, typer.Option(min=1, help="Prompts per update.")] = 16,
    samples_per_prompt: Annotated[int, typer.Option(min=1, help="Responses per prompt.")] = 1,
    response_length: Annotated[int, typer.Option(min=1, help="Response tokens at most (EOS ends one).")] = 64,
    epochs: Annotated[int, typer.Option(min=1, help="PPO epochs per update.")] = 4,
    minibatches: Annotated[int, typer.Option(min=1, help="Optimizer steps per epoch.")] = 2,
    updates: Annotated[
        int, typer.Option(min=1, help="Timed updates (after one untimed warm-up update).")
    ] = 3,
    kl_coef: Annotated[
        float, typer.Option(min=0.0, help="KL to the reference (0: no reference pass).")
    ] = 0.05,
    critic_mode: Annotated[
        str, typer.Option(help="separate (a critic model, as TRL) or shared (a value head on the policy).")
    ] = "separate",
    zero_stage: Annotated[int, typer.Option(help="DeepSpeed ZeRO stage of both engines (0, 2, 3).")] = 2,
    baseline: Annotated[bool, typer.Option(help="Also run TRL's PPOTrainer on the same workload.")] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="End with one JSON object on the last line.")
    ] = False,
) -> None:
    """Full PPO updates through the ppo stage's own step, and the same workload through TRL's PPOTrainer."""
    from stages.benchmarks.ppo_update import PPOBench, bench_config, bench_ppo_update

    bench = PPOBench(model=model, prompts=prompts, samples_per_prompt=samples_per_prompt,
                     response_length=response_length, epochs=epochs, minibatches=minibatches,
                     updates=updates, kl_coef=kl_coef, critic_mode=critic_mode,
                     zero_stage=zero_stage)  # fmt: skip
    try:
        bench_config(bench)  # a workload that does not fit fails here, in one line
    except ValueError as err:  # ConfigError (a bad option value) is one already
        raise ConfigError(str(err).splitlines()[0]) from None
    _compute_here()
    result = bench_ppo_update(bench, baseline=baseline)
    typer.echo(f"PPO update  {bench.prompts}x{bench.samples_per_prompt} rows, <= {bench.response_length} tokens, "
               f"{bench.epochs} epochs x {bench.minibatches} minibatches, kl {bench.kl_coef}, {bench.critic_mode} "
               f"critic, ZeRO-{bench.zero_stage}, {result['device']}, {result['threads']} threads")  # fmt: skip
    typer.echo(
        f"  rlpipe  {result['sec_per_update']:8.3f} s/update  {result['resp_tokens_per_s']:9.1f} resp tok/s"
    )
    for phase, seconds in result["phases_s_per_update"].items():
        typer.echo(f"    {phase:<13} {seconds:8.3f} s  ({seconds / result['sec_per_update']:5.1%})")
    typer.echo(f"  train phase {result['train_flop_per_s'] / 1e9:.2f} GFLOP/s = "
               f"{result['train_flop_fraction_of_peak']:.1%} of measured matmul peak "
               f"({result['matmul_peak_flop_per_s'] / 1e9:.1f} GFLOP/s)")  # fmt: skip
    if "trl" in result:
        trl = result["trl"]
        typer.echo(
            f"  TRL     {trl['sec_per_update']:8.3f} s/update  {trl['resp_tokens_per_s']:9.1f} resp tok/s"
        )
        typer.echo(f"  speedup {result['speedup_vs_trl']:.2f}x (response tokens per second)")
    typer.echo(f"  floor   {result['update_floor_s']:8.3f} s/update: the update's matrix products alone, padding-free, "
               f"at the measured peak ({result['update_flop_floor'] / 1e9:.0f} GFLOP)")  # fmt: skip
    if "trl" in result:
        typer.echo(
            f"  ceiling {result['speedup_ceiling_vs_trl']:.2f}x vs TRL for any exact implementation on this machine"
        )
    if as_json:
        typer.echo(json.dumps(result))


@bench_app.command("contention")
def bench_contention_command(
    steps: Annotated[int, typer.Option(min=10, help="SFT steps of each launch (tiny recipe).")] = 300,
    mode: Annotated[
        str, typer.Option(help="both, auto (the thread budget) or torch (torch's default threads: before).")
    ] = "both",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """SFT steps/s alone, two independent processes at once, and --nproc 2, per threads mode."""
    from flows.bench_contention import MODES, bench_contention

    if mode not in ("both", *MODES):
        raise ConfigError(f"unknown mode '{mode}' (use both, auto or torch)")
    result = bench_contention(steps, MODES if mode == "both" else (mode,))
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"SFT, tiny recipe, {steps} steps per launch; steps/s of each process (threads)")
    for name in MODES:
        if name not in result:
            continue
        r = result[name]

        def cell(x: dict) -> str:
            fewest, last = x["cpu_threads_fewest"], x["cpu_threads"]
            return f"{x['steps_per_s']:6.1f} ({fewest if fewest == last else f'{fewest}..{last}'} thr)"

        typer.echo(f"  threads={name:5}  alone {cell(r['alone'][0])}   two at once "
                   f"{cell(r['two_at_once'][0])} {cell(r['two_at_once'][1])}   --nproc 2 {cell(r['nproc_2'][0])}")  # fmt: skip
        typer.echo(f"                 two at once / alone {r['two_at_once_vs_alone']:.2f}   "
                   f"--nproc 2 / alone {r['nproc_2_vs_alone']:.2f}")  # fmt: skip
    if "alone_auto_vs_torch" in result:
        typer.echo(f"  alone, auto / torch {result['alone_auto_vs_torch']:.2f}")
