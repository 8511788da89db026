"""`rlpipe`: run the pipeline, inspect runs, benchmark. Bad input: one line on stderr, exit code 1 or 2."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import click
import typer

from flows.bench_cli import bench_app
from flows.cli_options import (
    EndpointOpt,
    EvalCronOpt,
    GpuSlotsOpt,
    RecipeOpt,
    SetOpt,
    StorageOpt,
    storage_root,
)
from stages.config.section import ConfigError, config_hash
from storage.layout import STAGE_NAMES, RunLayout, list_run_ids
from storage.location import Location, StorageError
from storage.manifests import ManifestError, read_manifest, read_pipeline_record, stage_status
from storage.reports import ReportError

app = typer.Typer(
    help="PPO with a learned critic for reasoning LMs: a resumable pipeline over object storage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(bench_app, name="bench")


def _existing_layout(run_id: str, storage: str | None, endpoint_url: str | None) -> RunLayout:
    try:
        layout = RunLayout(storage_root(storage, endpoint_url), run_id)
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
    nproc: Annotated[
        int,
        typer.Option("--nproc", min=1, help="Ranks (per node with --nodes; DeepSpeed launcher when > 1)."),
    ] = 1,
    force: Annotated[
        bool, typer.Option("--force", help="Recompute even if complete for this config.")
    ] = False,
    nodes: Annotated[
        int, typer.Option("--nodes", min=1, help="Nodes of the launch: run this same command on each.")
    ] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", min=0, help="This node's rank (0..nodes-1).")] = 0,
    master_addr: Annotated[
        str, typer.Option("--master-addr", help="Address of node 0 (with --nodes > 1).")
    ] = "127.0.0.1",
    master_port: Annotated[
        int, typer.Option("--master-port", min=1, max=65535, help="A free port on node 0 (with --nodes > 1).")
    ] = 29500,
) -> None:
    """Run or resume one stage of a run (resumes from its last committed checkpoint).

    Several nodes: the same command on every node, each with its --node-rank; storage must be
    shared (S3) and the staging folder (TMPDIR) a filesystem every node sees (infra/README.md).
    """
    from flows.launcher import Nodes, run_stage_process
    from stages.config.batches import check_batch_layouts
    from stages.lifecycle.runs import open_run, resolve_config

    if name not in STAGE_NAMES:
        raise ConfigError(f"unknown stage '{name}' (available: {', '.join(STAGE_NAMES)})")
    try:
        launch = Nodes(nodes, node_rank, master_addr, master_port) if nodes > 1 else None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    config, _ = resolve_config(recipe, set_, run_id=run_id, storage=storage)
    check_batch_layouts(config, nproc * nodes, [name])  # before anything is written or launched
    open_run(config)
    run_stage_process(name, config, nproc=nproc, force=force, log_line=typer.echo, nodes=launch)


@app.command("config")
def show_config(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    nproc: Annotated[
        int, typer.Option("--nproc", min=1, help="Check that every stage's batch sizes lay out on N ranks.")
    ] = 1,
) -> None:
    """Print the resolved, validated config of a recipe plus overrides, and its hash."""
    from stages.config.batches import check_batch_layouts
    from stages.lifecycle.runs import resolve_config

    config, _ = resolve_config(
        recipe, set_, check_storage=False
    )  # prints only: storage need not be reachable
    check_batch_layouts(config, nproc)
    typer.echo(json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True))
    typer.echo(f"config_hash: {config_hash(config)}")


@app.command()
def runs(storage: StorageOpt = None, endpoint_url: EndpointOpt = None) -> None:
    """List the runs under a storage root with each stage's status (complete, partial, -)."""
    root = storage_root(storage, endpoint_url)
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
        str,
        typer.Option(
            "--checkpoint",
            help="HF checkpoint: local folder, storage URI, hub id, `tiny` or `smollm2-135m-instruct`.",
        ),
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
    from flows.params import evaluation_overrides
    from stages import evaluate
    from stages.config.evaluation import BENCHMARKS
    from stages.lifecycle.runs import resolve_config
    from stages.runtime.threads import thread_budget

    names = [b.strip() for b in benchmark.split(",") if b.strip()]
    unknown = [b for b in names if b not in BENCHMARKS]
    if unknown or not names:
        raise ConfigError(
            f"unknown benchmark {', '.join(unknown) or repr(benchmark)} (known: {', '.join(BENCHMARKS)})"
        )
    overrides = list(set_ or []) + evaluation_overrides(names, samples, temperature, max_new_tokens, limit)
    root = storage_root(storage, None)
    run_id = run_id or _run_holding(root, checkpoint) or f"eval-{_timestamp()}"
    config, _ = resolve_config(recipe, overrides, run_id=run_id, storage=storage)
    label = label or evaluate.default_label(checkpoint)
    # The evaluate stage's own entry, in this process (`python -m stages.evaluate --checkpoint ...`).
    with thread_budget(config.runtime.threads, name="eval"):
        evaluate.run(config, checkpoint=checkpoint, label=label)
    typer.echo(
        f"run {config.run_id}; report at {RunLayout(config.storage.root_location(), config.run_id).report(label, 'md')}"
    )


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
    from stages.evaluation.comparison import compare_runs
    from storage.layout import comparison

    root = storage_root(storage, endpoint_url)
    for run_id in run_ids:
        _existing_layout(run_id, storage, endpoint_url)
    _, table = compare_runs(root, run_ids)
    typer.echo(table)
    typer.echo(f"written to {comparison(root, run_ids)}/report.md")


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
    entry = sys.modules.get("stages.lifecycle.entry")
    in_process = entry.USER_ERRORS if entry else ()  # `rlpipe eval` runs stage code in-process
    return (
        ConfigError,
        StorageError,
        ManifestError,
        ReportError,
        stage_failed,
        FileNotFoundError,
        PermissionError,
        NotADirectoryError,  # a storage root or input path that runs through a file
        IsADirectoryError,
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
