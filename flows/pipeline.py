"""Prefect flows: one per stage (each deployable, rerunnable and cancellable alone), the
`rlhf-pipeline` flow that chains them, and the evaluation of a run's newest PPO checkpoint.

Flows only orchestrate. A stage flow resolves and validates the run's config (bad parameters
fail here, before any GPU work), skips a stage already complete for this config and inputs,
holds a slot of the global concurrency limit `gpu` while the stage runs as a subprocess
(flows/launcher.py: its own process group, output streamed into the Prefect logger, killed
whole on cancel or timeout), retries a crash or a kill (the rerun resumes from the stage's last
committed checkpoint; bad input is not retried), and publishes artifacts.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.runtime import task_run

from flows.artifacts import (
    ProgressArtifact,
    publish_evaluation_report,
    publish_stage_outputs,
)
from flows.launcher import LineThrottle, StageFailed, progress_of, run_stage_process
from flows.params import CheckpointEvalParams, PipelineParams, StageParams
from stages.config.pipeline import PipelineConfig
from stages.config.run import StorageConfig
from stages.config.section import ConfigError
from stages.evaluate import checkpoints_to_evaluate
from stages.lifecycle.runs import open_run, resolve_config
from stages.registry import STAGES, pipeline_stages, stage_is_complete
from storage.checkpoints import committed_steps
from storage.layout import RunLayout, list_run_ids
from storage.manifests import read_manifest, read_pipeline_record
from storage.reports import read_report

GPU_LIMIT = "gpu"  # global concurrency limit: slots = GPU stages allowed at once (`rlpipe serve/deploy`)
RETRY_DELAY_S = 10


def _is_retriable(task, task_run, state) -> bool:
    """Retry crashes and kills of the stage process, never bad input (it would fail the same way)."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, StageFailed) and error.retriable


@task(name="launch-stage", cache_policy=NO_CACHE, retry_condition_fn=_is_retriable)
def launch_stage(
    stage: str,
    config: PipelineConfig,
    nproc: int = 1,
    force: bool = False,
    timeout_minutes: float | None = None,
    stage_args: list[str] | None = None,
) -> None:
    """Run the stage process under a `gpu` slot; its output goes to this task's log (throttled)."""
    logger = get_run_logger()
    attempt = task_run.run_count or 1
    if attempt > 1:
        logger.info(f"attempt {attempt}: {stage} resumes from its last committed checkpoint")
    sink = StageOutputSink(stage, config.run_id)
    with concurrency(GPU_LIMIT, occupy=1):
        run_stage_process(
            stage,
            config,
            nproc=nproc,
            force=force and attempt == 1,  # a retry resumes what the first attempt started over
            log_line=lambda line: sink.feed(line, logger.info),
            timeout_s=timeout_minutes * 60 if timeout_minutes else None,
            stage_args=stage_args,
        )
    sink.finish()


class StageOutputSink:
    """Feeds a stage's output to the logger without flooding it, and its progress bar to an artifact."""

    def __init__(self, stage: str, run_id: str):
        self.throttle = LineThrottle()
        self.stage, self.run_id = stage, run_id
        self.progress: ProgressArtifact | None = None
        self._last: tuple[int, int] | None = None

    def feed(self, line: str, log) -> None:
        for shown in self.throttle.admit(line, time.monotonic()):
            log(shown)
        bar = progress_of(line)
        if bar is None or bar[0] != self.stage:
            return
        if self.progress is None:
            self.progress = ProgressArtifact(self.stage, self.run_id)
        self._last = bar[1:]
        self.progress.update(*self._last)

    def finish(self) -> None:
        if self.progress is not None and self._last is not None:
            self.progress.update(self._last[1], self._last[1], force=True)


def run_stage_flow(stage: str, params: StageParams) -> str:
    """The body of every stage flow; returns `completed`, `skipped` or `disabled`."""
    logger = get_run_logger()
    config, _ = params.resolve([stage])
    layout = open_run(config)
    if not getattr(getattr(config, stage), "enabled", True):
        logger.info(f"{stage}: disabled in the config of run {config.run_id}, not run")
        return "disabled"
    if not params.force and stage_is_complete(stage, config):
        logger.info(f"{stage}: complete for this config and inputs, skipped (force=true reruns it)")
        status = "skipped"
    else:
        nproc = params.nproc if STAGES[stage].ranks else 1  # evaluate: one process; vLLM spreads a big model
        launch_stage.with_options(retries=params.retries, retry_delay_seconds=RETRY_DELAY_S)(
            stage, config, nproc=nproc, force=params.force, timeout_minutes=params.timeout_minutes
        )
        status = "completed"
    publish_stage_outputs(layout, stage)
    if stage == "evaluate":
        publish_evaluation_report(layout, list(checkpoints_to_evaluate(config))[-1])
    return status


@flow(name="sft", description="SFT warm start of the policy (completion-only NLL).")
def sft(params: StageParams = StageParams()) -> str:
    return run_stage_flow("sft", params)


@flow(name="reward-model", description="Reward-model pretraining (Bradley-Terry on preference pairs).")
def reward_model(params: StageParams = StageParams()) -> str:
    return run_stage_flow("reward_model", params)


@flow(name="critic-warmup", description="Value pretraining with the policy frozen.")
def critic_warmup(params: StageParams = StageParams()) -> str:
    return run_stage_flow("critic_warmup", params)


@flow(name="ppo", description="PPO with the learned critic (or the GRPO baseline).")
def ppo(params: StageParams = StageParams()) -> str:
    return run_stage_flow("ppo", params)


@flow(name="evaluate", description="Evaluation of the starting and final policy on benchmarks; reports.")
def evaluate(params: StageParams = StageParams()) -> str:
    return run_stage_flow("evaluate", params)


STAGE_FLOWS = {
    "sft": sft,
    "reward_model": reward_model,
    "critic_warmup": critic_warmup,
    "ppo": ppo,
    "evaluate": evaluate,
}


@flow(
    name="rlhf-pipeline",
    description="The configured stages in order: [sft] -> reward_model -> critic_warmup -> ppo -> evaluate.",
)
def rlhf_pipeline(params: PipelineParams = PipelineParams()) -> dict:
    """Create (or reopen) the run, then run each chosen stage as its own subflow."""
    logger = get_run_logger()
    config, existed = params.resolve()
    layout = open_run(config)
    logger.info(f"{'reopened' if existed else 'created'} run {config.run_id} at {layout.run}")
    chosen = [s for s in STAGES if s in params.stages] if params.stages else pipeline_stages(config)
    stage_params = params.model_dump(exclude={"stages", "run_id"}) | {"run_id": config.run_id}
    statuses = {stage: STAGE_FLOWS[stage](StageParams(**stage_params)) for stage in chosen}
    evaluation = read_manifest(layout.manifest("evaluate"))
    report = evaluation.outputs.get("report") if evaluation else None
    logger.info(f"run {config.run_id}: {layout.run}" + (f"; report: {report}" if report else ""))
    return {"run_id": config.run_id, "run": str(layout.run), "stages": statuses, "report": report}


# ---------------------------------------------------------------------------------------------
# the scheduled evaluation of a run's newest PPO checkpoint
# ---------------------------------------------------------------------------------------------
def newest_ppo_checkpoint(layout: RunLayout) -> tuple[int, str] | None:
    """(step, URI of its HF policy) of the newest committed PPO checkpoint that carries one."""
    for step in reversed(committed_steps(layout.checkpoints("ppo"))):
        policy = layout.checkpoint_model("ppo", step, "policy")
        if (policy / "config.json").exists():
            return step, str(policy)
    return None


def _runs_newest_first(storage: StorageConfig) -> list[RunLayout]:
    root = storage.root_location()
    layouts = [RunLayout(root, run_id) for run_id in list_run_ids(root)]
    created = {
        layout.run_id: (read_pipeline_record(layout) or {}).get("created_at", "") for layout in layouts
    }
    return sorted(layouts, key=lambda layout: created[layout.run_id], reverse=True)


@flow(
    name="evaluate-checkpoint",
    description="Evaluate a run's newest PPO checkpoint (e.g. nightly, while training runs); "
    "a checkpoint already evaluated is not evaluated again.",
)
def evaluate_newest_checkpoint(params: CheckpointEvalParams = CheckpointEvalParams()) -> dict:
    logger = get_run_logger()
    storage = StorageConfig(root=params.storage, endpoint_url=params.endpoint_url)
    runs = (
        [RunLayout(storage.root_location(), params.run_id)] if params.run_id else _runs_newest_first(storage)
    )
    if params.run_id and read_pipeline_record(runs[0]) is None:
        raise ConfigError(f"unknown run '{params.run_id}' in {storage.root_location()}")
    found = next(((layout, ckpt) for layout in runs if (ckpt := newest_ppo_checkpoint(layout))), None)
    if found is None:
        logger.info(f"no PPO checkpoint with an HF export in {storage.root_location()}: nothing to evaluate")
        return {"status": "nothing to evaluate"}
    layout, (step, uri) = found
    label = f"ppo-step-{step}"
    result = {"run_id": layout.run_id, "label": label, "checkpoint": uri}
    if read_report(layout.report(label, "json")) is not None:
        logger.info(f"run {layout.run_id}: {label} is already evaluated ({layout.report(label, 'md')})")
        return result | {"status": "already evaluated"}
    config, _ = resolve_config(None, params.eval_overrides(), run_id=layout.run_id, storage=params.storage)
    logger.info(f"run {layout.run_id}: evaluating {label} ({uri})")
    launch_stage.with_options(retries=1, retry_delay_seconds=RETRY_DELAY_S)(
        "evaluate",
        config,
        timeout_minutes=params.timeout_minutes,
        stage_args=["--checkpoint", uri, "--label", label],
    )
    publish_evaluation_report(layout, label, key="checkpoint-eval-report")
    return result | {"status": "evaluated", "report": str(layout.report(label, "md"))}
