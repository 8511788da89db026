"""Prefect orchestration on a real Prefect server (`prefect_test_harness`): the pipeline flow and
its artifacts, skipping, a killed stage retried and resumed, cancellation through a served
deployment, the scheduled checkpoint evaluation, and deployments registered with a work pool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
from cli_runs import RLPIPE

from flows.params import CheckpointEvalParams, PipelineParams, StageParams
from stages.config.section import ConfigError
from storage.checkpoints import committed_steps
from storage.layout import RunLayout
from storage.location import Location
from storage.manifests import read_manifest
from storage.metrics import read_metrics
from storage.rollouts import rollout_steps

# Every stage but SFT, each a few steps on the tiny model: the orchestration is under test here.
FAST = [
    "wandb.mode=disabled",
    "sft.enabled=false",
    "task.train_size=200",
    "task.heldout_size=8",
    "generation.max_new_tokens=12",
    "reward_model.train_pairs=64",
    "reward_model.heldout_pairs=16",
    "reward_model.steps=4",
    "reward_model.save_every=4",
    "reward_model.batch_size=16",
    "reward_model.optim.micro_batch_size=16",
    "reward_model.optim.warmup_steps=1",
    "critic_warmup.steps=2",
    "critic_warmup.save_every=2",
    "critic_warmup.prompts_per_step=8",
    "critic_warmup.samples_per_prompt=2",
    "critic_warmup.minibatches=1",
    "critic_warmup.optim.micro_batch_size=16",
    "critic_warmup.optim.warmup_steps=1",
    "ppo.steps=4",
    "ppo.save_every=2",
    "ppo.eval_every=2",
    "ppo.prompts_per_step=4",
    "ppo.samples_per_prompt=2",
    "ppo.minibatches=1",
    "ppo.epochs=1",
    "ppo.policy_optim.micro_batch_size=8",
    "ppo.critic_optim.micro_batch_size=8",
    "evaluate.benchmarks=[arith]",
    "evaluate.limit=3",
    "evaluate.limits={}",
    "evaluate.samples=2",
]
# PPO alone (the policy is also the critic's init): for the retry and cancellation tests.
PPO_ONLY = [*FAST, "reward_model.enabled=false", "critic_warmup.enabled=false", "model.critic_init=policy"]


def stage_processes(run_id: str, stage: str) -> list[psutil.Process]:
    """The processes of a running stage: the launcher names its config folder rlpipe-<run>-<stage>-."""
    marker = f"rlpipe-{run_id}-{stage}-"
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def api_filter(what: str, body: dict) -> list[dict]:
    """POST /{what}/filter on the test server. (Prefect 3.8's sync client sends nulls for unset
    limit/sort, which its own server rejects with 422, so the tests speak REST.)"""
    import httpx
    from prefect.settings import PREFECT_API_URL

    response = httpx.post(f"{PREFECT_API_URL.value()}/{what}/filter", json={"limit": 200, **body}, timeout=30)
    response.raise_for_status()
    return response.json()


def artifacts_by_key(keys: list[str]) -> dict[str, list[dict]]:
    """Artifacts with these keys, newest first."""
    by_key: dict[str, list[dict]] = {}
    for artifact in api_filter("artifacts", {"artifacts": {"key": {"any_": keys}}, "sort": "CREATED_DESC"}):
        by_key.setdefault(artifact["key"], []).append(artifact)
    return by_key


def flow_run_logs(flow_run_id) -> list[str]:
    """Every log line of a flow run (its tasks' included), oldest first."""
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    messages: list[str] = []
    while True:
        body = {"logs": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "sort": "TIMESTAMP_ASC"}
        page = [log["message"] for log in api_filter("logs", {**body, "offset": len(messages)})]
        messages += page
        if len(page) < 200:
            return messages


@pytest.fixture(scope="module")
def pipeline_run(prefect_api, s3_endpoint):
    """The whole pipeline flow once, on the S3 test server; reused by the tests that inspect it."""
    from flows.pipeline import rlhf_pipeline

    bucket = f"flows-{uuid.uuid4().hex[:10]}"
    root = Location(f"s3://{bucket}", endpoint_url=s3_endpoint)
    root.fs.mkdir(bucket)
    params = PipelineParams(
        run_id="flow", storage=f"s3://{bucket}/runs", overrides=[*FAST, f"storage.endpoint_url={s3_endpoint}"]
    )
    started = time.time()
    result = rlhf_pipeline(params)
    return params, result, RunLayout(root / "runs", "flow"), time.time() - started


def test_pipeline_flow_runs_every_stage_and_publishes_artifacts(pipeline_run):
    _, result, layout, _ = pipeline_run
    assert result["stages"] == dict.fromkeys(
        ["reward_model", "critic_warmup", "ppo", "evaluate"], "completed"
    )
    assert result["run"] == str(layout.run)
    assert result["report"] == str(layout.report("final", "md"))
    for stage in result["stages"]:
        assert read_manifest(layout.manifest(stage)) is not None, stage

    artifacts = artifacts_by_key(
        ["eval-report", "eval-report-table", "eval-report-html", "ppo-policy", "ppo-value", "ppo-progress",
         "critic-warmup-value", "reward-model-reward-model"]
    )  # fmt: skip
    assert set(artifacts) == {"eval-report", "eval-report-table", "eval-report-html", "ppo-policy",
                              "ppo-value", "ppo-progress", "critic-warmup-value", "reward-model-reward-model"}  # fmt: skip
    markdown = artifacts["eval-report"][0]["data"]
    assert "arith" in markdown and "initial" in markdown and "final" in markdown
    rows = artifacts["eval-report-table"][0]["data"]
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert [(r["benchmark"], r["checkpoint"]) for r in rows] == [("arith", "initial"), ("arith", "final")]
    assert rows[0]["problems"] == "3"
    assert artifacts["ppo-policy"][0]["data"] == f"[flow: ppo policy]({layout.final('ppo', 'policy')})"
    assert artifacts["ppo-progress"][0]["data"] == 100.0  # updated to the end from the stage's progress bar


def test_second_pipeline_run_skips_completed_stages(pipeline_run):
    from flows.pipeline import rlhf_pipeline

    params, _, layout, first_s = pipeline_run
    manifests = {
        s: layout.manifest(s).read_bytes() for s in ("reward_model", "critic_warmup", "ppo", "evaluate")
    }
    state = rlhf_pipeline(params, return_state=True)
    result = state.result()
    assert result["stages"] == dict.fromkeys(manifests, "skipped")
    assert {s: layout.manifest(s).read_bytes() for s in manifests} == manifests  # nothing rewritten
    # no stage process was started: the subflows ran no launch-stage task at all
    parent = str(state.state_details.flow_run_id)
    subflows = [
        f["id"] for f in api_filter("flow_runs", {"flow_runs": {"parent_flow_run_id": {"any_": [parent]}}})
    ]
    launched = api_filter("task_runs", {"flow_runs": {"id": {"any_": subflows}}})
    assert len(subflows) == 4 and launched == []


def test_scheduled_evaluation_evaluates_the_newest_ppo_checkpoint_once(pipeline_run):
    from flows.pipeline import evaluate_newest_checkpoint

    params, _, layout, _ = pipeline_run
    assert committed_steps(layout.checkpoints("ppo"))[-1] == 4
    eval_params = CheckpointEvalParams(
        run_id="flow", storage=params.storage, benchmarks=["arith"], samples=1, limit=2,
        endpoint_url=layout.root.endpoint_url,
    )  # fmt: skip
    first = evaluate_newest_checkpoint(eval_params)
    assert first["status"] == "evaluated" and first["label"] == "ppo-step-4"
    assert first["checkpoint"] == str(layout.checkpoint_model("ppo", 4, "policy"))
    report = json.loads(layout.report("ppo-step-4", "json").read_bytes())
    assert report["checkpoints"]["ppo-step-4"]["benchmarks"]["arith"]["n_problems"] == 2
    assert evaluate_newest_checkpoint(eval_params)["status"] == "already evaluated"
    assert "checkpoint-eval-report" in artifacts_by_key(["checkpoint-eval-report"])


def test_invalid_parameters_fail_before_any_stage_starts(prefect_api, tmp_path):
    from flows.pipeline import rlhf_pipeline
    from stages.config.section import ConfigError

    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        rlhf_pipeline(PipelineParams(run_id="bad", storage=str(tmp_path), overrides=["nope.key=1"]))
    state = rlhf_pipeline(params={"nproc": 0, "storage": str(tmp_path)}, return_state=True)
    assert state.is_failed() and "nproc" in str(state.message)
    assert not any(tmp_path.iterdir())  # nothing written to storage


def test_a_killed_stage_is_retried_and_resumes_from_its_last_checkpoint(prefect_api, tmp_path):
    from flows import pipeline

    run_id, storage = "retry", str(tmp_path / "runs")
    layout = RunLayout(Location(storage), run_id)
    killed: dict[str, int] = {}

    def kill_after_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline:
            if committed_steps(layout.checkpoints("ppo")):
                for proc in stage_processes(run_id, "ppo"):
                    killed["step"] = committed_steps(layout.checkpoints("ppo"))[-1]
                    proc.send_signal(signal.SIGKILL)
                    killed["pid"] = proc.pid
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    watcher.start()
    params = StageParams(run_id=run_id, storage=storage, overrides=[*PPO_ONLY, "ppo.steps=6"], retries=1)
    state = pipeline.ppo(params, return_state=True)
    watcher.join(timeout=5)
    assert state.is_completed() and state.result() == "completed"
    assert "pid" in killed, "the stage was never killed"
    logs = "\n".join(flow_run_logs(state.state_details.flow_run_id))
    assert "attempt 2: ppo resumes from its last committed checkpoint" in logs
    assert f"resuming from the committed checkpoint of step {killed['step']}" in logs
    # nothing lost, nothing duplicated
    assert rollout_steps(layout.rollouts("ppo")) == [1, 2, 3, 4, 5, 6]
    steps = [row["step"] for row in read_metrics(layout.metrics("ppo")) if "ppo/policy_loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert read_manifest(layout.manifest("ppo")) is not None


def test_bad_input_in_a_stage_is_not_retried(prefect_api, tmp_path, monkeypatch):
    from flows import pipeline
    from flows.launcher import StageFailed

    launches = []  # every start of the stage process (a retry would start it again)

    def counted(*args, **kwargs):
        launches.append(args[0])
        return run_stage_process(*args, **kwargs)

    run_stage_process = pipeline.run_stage_process
    monkeypatch.setattr(pipeline, "run_stage_process", counted)
    params = StageParams(
        run_id="badstage", storage=str(tmp_path), retries=3,
        overrides=[*PPO_ONLY, "ppo.policy_from=/nonexistent/policy"],  # found missing inside the stage
    )  # fmt: skip
    with pytest.raises(StageFailed, match="model not found: /nonexistent/policy"):
        pipeline.ppo(params)
    assert launches == ["ppo"]  # launched once: bad input is never retried (retries=3 would relaunch)


def test_a_batch_layout_that_does_not_fit_the_ranks_fails_in_the_flows_first_step(prefect_api, tmp_path):
    from flows import pipeline

    params = StageParams(
        run_id="layout", storage=str(tmp_path), nproc=2, overrides=[*PPO_ONLY, "ppo.minibatches=5"]
    )
    with pytest.raises(
        ConfigError,
        match=r"are 4 rows per rank, which ppo.minibatches 5 does not divide; values that work: 4$",
    ):
        pipeline.ppo(params)
    assert not (tmp_path / "layout").exists()  # refused before the run was opened or a stage launched


@pytest.fixture
def served(prefect_api, tmp_path):
    """`rlpipe serve` in its own process, against the test server."""
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    proc = subprocess.Popen(
        [RLPIPE, "serve", "--gpu-slots", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    yield proc
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_cancelling_a_served_stage_run_leaves_no_process_alive(served, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    run_id = f"cancel-{uuid.uuid4().hex[:6]}"
    parameters = {"params": {"run_id": run_id, "storage": str(tmp_path / "runs"),
                             "overrides": [*PPO_ONLY, "ppo.steps=100000", "ppo.eval_every=100000"]}}  # fmt: skip
    deadline = time.time() + 120
    while True:  # the deployment exists once `rlpipe serve` has registered it
        try:
            flow_run = run_deployment("ppo/ppo", parameters=parameters, timeout=0)
            break
        except Exception:
            assert served.poll() is None and time.time() < deadline, "rlpipe serve did not come up"
            time.sleep(1)
    deadline = time.time() + 240
    while not (running := stage_processes(run_id, "ppo")):
        assert time.time() < deadline, "the served flow run never started its stage"
        time.sleep(0.5)
    time.sleep(3)  # well into the stage
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
        deadline = time.time() + 120
        while client.read_flow_run(flow_run.id).state.type != StateType.CANCELLED:
            assert time.time() < deadline, "the flow run was not cancelled"
            time.sleep(1)
    gone, alive = psutil.wait_procs(running, timeout=60)
    assert not alive, f"stage processes left running: {[p.pid for p in alive]}"
    assert stage_processes(run_id, "ppo") == []


def test_deploy_registers_every_deployment_with_a_kubernetes_work_pool(prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.deployments import deploy_to_work_pool
    from flows.pipeline import GPU_LIMIT

    template = json.loads(
        (Path(__file__).parent.parent / "infra" / "k8s" / "base-job-template.json").read_text()
    )
    pool = f"gpu-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="kubernetes", base_job_template=template))
    from stages.config.section import ConfigError

    with pytest.raises(ConfigError, match="work pool 'no-such-pool' not found"):
        deploy_to_work_pool("no-such-pool", gpu_slots=1)
    ids = deploy_to_work_pool(pool, gpu_slots=3, image="ghcr.io/example/rlpipe:0.1.0")
    assert len(ids) == 7
    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in (client.read_deployment(i) for i in ids)}
        limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
    assert set(deployments) == {"rlhf-pipeline", "sft", "reward-model", "critic-warmup", "ppo", "evaluate",
                                "nightly-evaluation"}  # fmt: skip
    assert limit.limit == 3
    for deployment in deployments.values():
        assert deployment.work_pool_name == pool
        assert deployment.job_variables["image"] == "ghcr.io/example/rlpipe:0.1.0"
        assert deployment.entrypoint.startswith("flows.pipeline.")
    nightly = deployments["nightly-evaluation"]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 3 * * *"]
    # the UI's form: the pipeline's parameters carry the pydantic field descriptions
    schema = deployments["rlhf-pipeline"].parameter_openapi_schema
    fields = schema["definitions"]["PipelineParams"]["properties"]
    assert "Stages to run" in fields["stages"]["description"] and fields["nproc"]["minimum"] == 1
