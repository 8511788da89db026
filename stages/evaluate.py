"""Evaluation: sample on benchmarks, grade, write a report per checkpoint label.

The pipeline's `evaluate` stage evaluates the starting policy (label `initial`: what PPO started
from) and PPO's final policy (label `final`), plus any `evaluate.checkpoints` asked for, so the
report shows what training changed. With `--checkpoint URI --label L` the same entry evaluates one
checkpoint (local folder, storage URI, hub id, `tiny` or a packaged model) into the run under its label, writing no
manifest: what `rlpipe eval` and the scheduled evaluation of a run's newest PPO checkpoint run.
The metrics: `stages.evaluation.checkpoint`; the reports: `stages.evaluation.report_pages`.

    python -m stages.evaluate --config FILE [--force]      (or: rlpipe stage evaluate --run-id ID)
    python -m stages.evaluate --config FILE --checkpoint URI --label L     (or: rlpipe eval ...)
"""

from __future__ import annotations

import re
import sys

from stages.config.pipeline import PipelineConfig
from stages.config.sampling import sampling_plan
from stages.evaluation.checkpoint import benchmark_problems, evaluate_checkpoint, settings_from_config
from stages.evaluation.report_pages import publish_evaluation
from stages.lifecycle.contract import StageError, StagePlan, begin_stage, finish_stage, make_plan
from stages.lifecycle.entry import stage_main
from stages.lifecycle.inputs import layout_of, policy_uri
from stages.lifecycle.runs import open_run
from stages.models.sources import resolve_model_dir
from stages.runtime import distributed
from storage.layout import validate_run_id
from storage.manifests import read_manifest

STAGE = "evaluate"
OPTIONS = {
    "checkpoint": "Evaluate this one checkpoint (HF folder, storage URI, hub id, `tiny` or `smollm2-135m-instruct`) instead of the "
    "stage's; its report goes under --label and no manifest is written.",
    "label": "The checkpoint's label in the run's reports (with --checkpoint).",
}


def checkpoints_to_evaluate(config: PipelineConfig) -> dict[str, str]:
    """label -> URI: the starting policy, PPO's final policy (when PPO is enabled), then any extras."""
    checkpoints = {"initial": policy_uri(config, config.ppo.policy_from)}
    if config.ppo.enabled:
        layout = layout_of(config)
        if read_manifest(layout.manifest("ppo")) is None:
            raise StageError(
                f"{STAGE}: ppo has not completed in run {config.run_id}: run it first (or disable ppo)"
            )
        checkpoints["final"] = str(layout.final("ppo", "policy"))
    for label, uri in config.evaluate.checkpoints.items():
        if label in checkpoints:
            raise StageError(f"{STAGE}: checkpoint label {label!r} is reserved (initial, final)")
        checkpoints[label] = uri
    return checkpoints


def plan(config: PipelineConfig) -> StagePlan:
    """What the reports depend on: this section, sampling, task, seed; inputs: the checkpoints."""
    semantic = {
        "evaluate": config.evaluate,
        "generation": sampling_plan(config.generation),
        "task": config.task,
    }
    return make_plan(config, semantic | {"seed": config.seed}, checkpoints_to_evaluate(config))


def run(
    config: PipelineConfig, force: bool = False, checkpoint: str | None = None, label: str | None = None
) -> None:
    """The evaluation recipe, top to bottom (one process: vLLM's tensor parallelism spreads a big model)."""
    if distributed.world_size() > 1:
        raise StageError(
            f"{STAGE}: runs as one process (got {distributed.world_size()} ranks); use --nproc 1"
        )
    if checkpoint is not None or label is not None:
        _evaluate_one(config, checkpoint, label)
        return

    # 1. Skip if complete for this config and these checkpoints; otherwise claim the stage.
    checkpoints = checkpoints_to_evaluate(config)
    settings = settings_from_config(config)
    ctx = begin_stage(STAGE, config, plan(config), force=force)
    if ctx is None:
        print(f"{STAGE}: complete for this config and inputs, skipped (use --force to rerun)", flush=True)
        return
    for name in settings.benchmarks:  # missing data fails before any model is loaded
        benchmark_problems(name, settings.limits[name], settings.task)

    # 2. Evaluate each checkpoint; its report (which includes the labels evaluated before it) is
    #    written as soon as it is done, so a crash later loses only the labels not yet written.
    reports: dict[str, str] = {}
    summary: dict[str, float] = {}  # the headline numbers, for the manifest
    for name, uri in checkpoints.items():
        model_dir = resolve_model_dir(uri, config.tiny_model, ctx.endpoint_url)
        print(f"{STAGE}: {name} = {uri}", flush=True)
        result = evaluate_checkpoint(model_dir, uri, name, settings)
        reports[name] = str(
            publish_evaluation(ctx.layout, name, result, settings.as_dict(), config_hash=ctx.config_hash)
        )
        for benchmark, metrics in result.benchmarks.items():
            summary |= {f"{name}/{benchmark}/{m}": metrics[m] for m in ("greedy", "pass@1")}
            print(
                f"{STAGE}: {name} {benchmark}: greedy {metrics['greedy']:.3f} pass@1 {metrics['pass@1']:.3f}",
                flush=True,
            )

    # 3. The manifest (last): report locations and the headline numbers.
    # "report": the one to read, the last label's (it holds every label of the run).
    readable = str(ctx.layout.report(list(reports)[-1], "md"))
    finish_stage(ctx, outputs={**reports, "report": readable}, metrics=summary)
    print(f"{STAGE}: done; report at {readable}", flush=True)


def _evaluate_one(config: PipelineConfig, uri: str | None, label: str | None) -> None:
    """One checkpoint into the run under `label`; no manifest.

    Bad input (a label, a benchmark's data, the checkpoint) fails before anything is written."""
    if not uri or not label:
        raise StageError(f"{STAGE}: --checkpoint and --label go together")
    try:
        validate_run_id(label)
    except ValueError as err:
        raise StageError(f"{STAGE}: invalid label: {err}".replace("run id", "label")) from None
    settings = settings_from_config(config)
    for name in settings.benchmarks:
        benchmark_problems(name, settings.limits[name], settings.task)
    model_dir = resolve_model_dir(uri, config.tiny_model, config.storage.endpoint_url)
    print(f"{STAGE}: {label} = {uri}", flush=True)
    result = evaluate_checkpoint(model_dir, uri, label, settings)
    layout = open_run(config)  # only now: bad input above leaves storage untouched
    publish_evaluation(layout, label, result, settings.as_dict(), config_hash=None)
    print(f"{STAGE}: done; report at {layout.report(label, 'md')}", flush=True)


def default_label(uri: str) -> str:
    """A label from a checkpoint URI: its last three path parts, e.g. `ppo-final-policy`."""
    parts = [p for p in re.split(r"[/\\]+", uri.split("://")[-1]) if p][-3:]
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts)).strip("-._")
    return label[:128] or "checkpoint"


def main() -> None:
    sys.exit(stage_main(STAGE, run, options=OPTIONS))


if __name__ == "__main__":
    main()
