"""`rlpipe`: run the pipeline, inspect runs, benchmark. Bad input: one line on stderr, exit code 1 or 2."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import click
import typer

from stages.config import ConfigError, config_hash
from storage.layout import STAGE_NAMES, RunLayout, list_run_ids
from storage.location import Location, StorageError, resolve_root
from storage.manifests import ManifestError, read_manifest, read_pipeline_record, stage_status
from storage.reports import ReportError

app = typer.Typer(
    help="PPO with a learned critic for reasoning LMs: a resumable pipeline over object storage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(
    help="Benchmarks (speed is measured here, never asserted in tests).", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")

RecipeOpt = Annotated[str | None, typer.Option("--recipe", help="Recipe YAML (default: configs/tiny.yaml).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a config key: --set a.b=value (repeatable).")
]
StorageOpt = Annotated[
    str | None, typer.Option("--storage", help="Storage root URI (default: $RLPIPE_STORAGE, else ./runs).")
]
GpuSlotsOpt = Annotated[
    int, typer.Option("--gpu-slots", min=1, help="GPU stages allowed at once (concurrency limit `gpu`).")
]
EvalCronOpt = Annotated[
    str, typer.Option("--eval-cron", help="Schedule of the newest-checkpoint evaluation (cron).")
]
EndpointOpt = Annotated[
    str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL).")
]


def _root(storage: str | None, endpoint_url: str | None) -> Location:
    return Location(resolve_root(storage), endpoint_url)


def _existing_layout(run_id: str, storage: str | None, endpoint_url: str | None) -> RunLayout:
    try:
        layout = RunLayout(_root(storage, endpoint_url), run_id)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if read_pipeline_record(layout) is None:
        raise ConfigError(f"unknown run '{run_id}' in {layout.root}")
    return layout


@app.command()
def run(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Run id (default: <recipe>-<timestamp>).")
    ] = None,
    storage: StorageOpt = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Ranks for the training stages.")] = 1,
    stages: Annotated[
        str | None,
        typer.Option(
            "--stages", help=f"Comma-separated subset of {', '.join(STAGE_NAMES)} (pipeline order)."
        ),
    ] = None,
    retries: Annotated[
        int, typer.Option("--retries", min=0, help="Reruns of a crashed stage (each resumes).")
    ] = 1,
) -> None:
    """Run the pipeline as a Prefect flow: create (or reopen) the run and run its stages in order.

    Completed stages (same config and inputs) are skipped; an interrupted one resumes. Prefect
    runs embedded unless PREFECT_API_URL names a server (then the run shows in its UI).
    """
    from flows.params import PipelineParams

    chosen = [s.strip() for s in stages.split(",") if s.strip()] if stages is not None else None
    unknown = [s for s in chosen or [] if s not in STAGE_NAMES]
    if unknown or chosen == []:
        raise ConfigError(
            f"unknown stage {', '.join(unknown) or repr(stages)} (known: {', '.join(STAGE_NAMES)})"
        )
    params = PipelineParams(
        run_id=run_id, recipe=recipe or "tiny", overrides=set_ or [], storage=storage, nproc=nproc,
        stages=chosen, retries=retries,
    )  # fmt: skip
    config, existed = params.resolve()  # bad input fails here, in one line, before Prefect starts
    typer.echo(
        f"{'reopening' if existed else 'creating'} run {config.run_id} (config hash {config_hash(config)[:16]})"
    )
    from flows.deployments import ensure_gpu_limit
    from flows.pipeline import rlhf_pipeline

    ensure_gpu_limit(None)  # stages hold a slot of `gpu` while they run (1 slot unless configured)
    result = rlhf_pipeline(params.model_copy(update={"run_id": config.run_id}))
    for stage_name, status in result["stages"].items():
        typer.echo(f"  {stage_name:<14} {status}")
    typer.echo(f"run {config.run_id}: {result['run']}")
    if result["report"]:
        typer.echo(f"report: {result['report']}")


@app.command()
def serve(
    gpu_slots: GpuSlotsOpt = 1,
    eval_cron: EvalCronOpt = "0 3 * * *",
) -> None:
    """Serve the pipeline, per-stage and scheduled-evaluation deployments from this process (no work pool)."""
    from flows.deployments import serve_deployments

    serve_deployments(gpu_slots, eval_cron)


@app.command()
def deploy(
    work_pool: Annotated[str, typer.Option("--work-pool", help="Work pool whose workers run the flows.")],
    image: Annotated[
        str | None,
        typer.Option("--image", help="Image for Docker/Kubernetes pools (built from infra/Dockerfile)."),
    ] = None,
    gpu_slots: GpuSlotsOpt = 1,
    eval_cron: EvalCronOpt = "0 3 * * *",
) -> None:
    """Register the deployments with a work pool on the Prefect server (PREFECT_API_URL)."""
    from flows.deployments import deploy_to_work_pool

    ids = deploy_to_work_pool(work_pool, gpu_slots, image, eval_cron)
    typer.echo(f"registered {len(ids)} deployments with work pool {work_pool}")


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"Stage to run: {', '.join(STAGE_NAMES)}.")],
    run_id: Annotated[str, typer.Option("--run-id", help="The run (created from the recipe if new).")],
    storage: StorageOpt = None,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Ranks (DeepSpeed launcher when > 1).")] = 1,
    force: Annotated[
        bool, typer.Option("--force", help="Recompute even if complete for this config.")
    ] = False,
) -> None:
    """Run or resume one stage of a run (resumes from its last committed checkpoint)."""
    from flows.launcher import run_stage_process
    from stages.runs import available_stages, open_run, resolve_config

    if name not in available_stages():
        known = ", ".join(available_stages()) or "none"
        raise ConfigError(f"unknown stage '{name}' (available: {known})")
    config, _ = resolve_config(recipe, set_, run_id=run_id, storage=storage)
    open_run(config)
    run_stage_process(name, config, nproc=nproc, force=force, log_line=typer.echo)


@app.command("config")
def show_config(recipe: RecipeOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved, validated config of a recipe plus overrides, and its hash."""
    from stages.runs import resolve_config

    config, _ = resolve_config(recipe, set_)
    typer.echo(json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True))
    typer.echo(f"config_hash: {config_hash(config)}")


@app.command()
def runs(storage: StorageOpt = None, endpoint_url: EndpointOpt = None) -> None:
    """List the runs under a storage root with each stage's status (complete, partial, -)."""
    root = _root(storage, endpoint_url)
    run_ids = list_run_ids(root)
    if not run_ids:
        typer.echo(f"no runs in {root}")
        return
    typer.echo(f"{'run_id':<32} {'created':<26} " + " ".join(f"{s:<14}" for s in STAGE_NAMES))
    for run_id in run_ids:
        layout = RunLayout(root, run_id)
        record = read_pipeline_record(layout) or {}
        statuses = " ".join(f"{stage_status(layout, s):<14}" for s in STAGE_NAMES)
        typer.echo(f"{run_id:<32} {record.get('created_at', '?'):<26} {statuses}")


@app.command()
def show(
    run_id: Annotated[str, typer.Argument(help="The run to show.")],
    storage: StorageOpt = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Print a run's config and the manifest of every completed stage."""
    layout = _existing_layout(run_id, storage, endpoint_url)
    record = read_pipeline_record(layout)
    typer.echo(f"run {run_id} at {layout.run} (created {record.get('created_at')})")
    typer.echo(json.dumps(record.get("config", {}), indent=2, sort_keys=True))
    for stage in STAGE_NAMES:
        manifest = read_manifest(layout.manifest(stage))
        if manifest is None:
            typer.echo(f"\n[{stage}] {stage_status(layout, stage)}")
            continue
        typer.echo(f"\n[{stage}] complete {manifest.finished_at}  config {manifest.config_hash[:16]}")
        for name, uri in sorted(manifest.outputs.items()):
            typer.echo(f"  output  {name}: {uri}")
        for name, value in sorted(manifest.metrics.items()):
            typer.echo(f"  metric  {name}: {value}")


@app.command("eval")
def eval_command(
    checkpoint: Annotated[
        str, typer.Option("--checkpoint", help="HF checkpoint: local folder, storage URI, hub id, or `tiny`.")
    ],
    benchmark: Annotated[
        str, typer.Option("--benchmark", help="Comma-separated: gsm8k, aime24, aime25, math500, arith.")
    ] = "arith",
    samples: Annotated[int | None, typer.Option(min=1, help="Sampled responses per problem.")] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="Sampling temperature.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Response budget in tokens.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="First N problems of each benchmark.")] = None,
    label: Annotated[
        str | None, typer.Option(help="Checkpoint label in the report (default: from the checkpoint URI).")
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id", help="Run to write into (default: the run holding the checkpoint, else new)."
        ),
    ] = None,
    storage: StorageOpt = None,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate any checkpoint on benchmarks; writes {run}/evaluate/{label}/report.{json,md,html} and samples."""
    from stages.evaluate import BENCHMARKS, default_label, evaluate_into_run
    from stages.runs import resolve_config

    names = [b.strip() for b in benchmark.split(",") if b.strip()]
    unknown = [b for b in names if b not in BENCHMARKS]
    if unknown or not names:
        raise ConfigError(
            f"unknown benchmark {', '.join(unknown) or repr(benchmark)} (known: {', '.join(BENCHMARKS)})"
        )
    overrides = list(set_ or []) + [f"evaluate.benchmarks=[{','.join(names)}]"]
    for key, value in (("samples", samples), ("temperature", temperature),
                       ("max_new_tokens", max_new_tokens), ("limit", limit)):  # fmt: skip
        if value is not None:
            overrides.append(f"evaluate.{key}={value}")
    if limit is not None:
        overrides.append("evaluate.limits={}")  # --limit applies to every benchmark
    root = _root(storage, None)
    run_id = run_id or _run_holding(root, checkpoint) or f"eval-{_timestamp()}"
    config, _ = resolve_config(recipe, overrides, run_id=run_id, storage=storage)
    report = evaluate_into_run(config, checkpoint, label or default_label(checkpoint))
    typer.echo(f"run {config.run_id}; report at {report}")


def _run_holding(root: Location, uri: str) -> str | None:
    """The run id when `uri` lies inside a run under `root` ({root}/{run_id}/...)."""
    prefix = root.uri.rstrip("/") + "/"
    candidate = uri if "://" in uri or not uri else Location(uri).uri
    if candidate.startswith(prefix):
        run_id = candidate[len(prefix) :].split("/", 1)[0]
        if read_pipeline_record(RunLayout(root, run_id)) is not None:
            return run_id
    return None


def _timestamp() -> str:
    from datetime import datetime, timezone

    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


@app.command()
def report(
    run_ids: Annotated[list[str], typer.Argument(help="Runs to compare (e.g. PPO and its GRPO baseline).")],
    storage: StorageOpt = None,
    endpoint_url: EndpointOpt = None,
) -> None:
    """Compare runs side by side: their evaluation reports and held-out accuracy vs. samples."""
    from stages.reports import compare_runs
    from storage.layout import comparison

    root = _root(storage, endpoint_url)
    for run_id in run_ids:
        _existing_layout(run_id, storage, endpoint_url)
    _, table = compare_runs(root, run_ids)
    typer.echo(table)
    typer.echo(f"written to {comparison(root, run_ids)}/report.md")


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
    from stages.benchmarks import bench_gae

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
    from stages.bench_io import bench_storage

    result = bench_storage(_root(storage, endpoint_url), rows, response_len, checkpoint_mb)
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
    model: Annotated[
        str, typer.Option(help="HF model directory, or `tiny` (the 3.4M-parameter bench model).")
    ] = "tiny",
    prompts: Annotated[int, typer.Option(min=1, help="Prompts sampled at once.")] = 64,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Response budget in tokens.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """rlpipe's KV-cache sampler vs. plain `model.generate`: response tokens per second."""
    from stages.bench_io import bench_generate
    from stages.bench_ppo import PPOBench, model_dir

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
    model: Annotated[
        str, typer.Option(help="HF model directory, or `tiny` (the 3.4M-parameter bench model).")
    ] = "tiny",
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
    from stages.bench_ppo import PPOBench, bench_config, bench_ppo_update

    bench = PPOBench(model=model, prompts=prompts, samples_per_prompt=samples_per_prompt,
                     response_length=response_length, epochs=epochs, minibatches=minibatches,
                     updates=updates, kl_coef=kl_coef, critic_mode=critic_mode,
                     zero_stage=zero_stage)  # fmt: skip
    try:
        bench_config(bench)  # a workload that does not fit fails here, in one line
    except ValueError as err:  # ConfigError (a bad option value) is one already
        raise ConfigError(str(err).splitlines()[0]) from None
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
    if as_json:
        typer.echo(json.dumps(result))


# typer >= 0.20 vendors its own click; older ones raise click's classes. Catch both.
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)
_USAGE_ERRORS = (click.ClickException, getattr(typer, "TyperException", click.ClickException))


class _LazyStageFailed(Exception):
    """Stands in until flows.launcher is imported (commands that start stages import it)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can cause or fix (one line, exit 1); anything else is a bug and keeps its traceback."""
    launcher = sys.modules.get("flows.launcher")
    stage_failed = launcher.StageFailed if launcher else _LazyStageFailed
    lifecycle = sys.modules.get("stages.lifecycle")
    in_process = lifecycle.USER_ERRORS if lifecycle else ()  # `rlpipe eval` runs stage code in-process
    return (
        ConfigError,
        StorageError,
        ManifestError,
        ReportError,
        stage_failed,
        FileNotFoundError,
        PermissionError,
        *in_process,
    )


def main(argv: list[str] | None = None) -> int:
    # The embedded Prefect server would phone home (and log a failure on machines without internet).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        app(args=argv, standalone_mode=False)
    except _EXIT as done:
        return done.exit_code
    except _ABORT:
        typer.echo("error: aborted", err=True)
        return 130
    except _USAGE_ERRORS as err:
        if type(err).__name__ == "NoArgsIsHelpError" and getattr(err, "ctx", None) is not None:
            typer.echo(err.ctx.get_help())  # bare `rlpipe` / `rlpipe bench`: show help
            return 2
        typer.echo(f"error: {err.format_message()}", err=True)
        return 2
    except Exception as err:
        launcher = sys.modules.get("flows.launcher")
        if launcher and isinstance(err, launcher.StageTerminated):
            typer.echo(f"error: {err}", err=True)
            return 128 + err.signum
        if not isinstance(err, _user_errors()):
            raise
        typer.echo(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", err=True)
        return 1
    return 0


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
