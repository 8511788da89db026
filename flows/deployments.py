"""Deployments of the flows: the pipeline, each stage, and the scheduled checkpoint evaluation.

`rlpipe serve` serves them from this process (no work pool: the quickest way to get the UI's
"Run" button); `rlpipe deploy --work-pool NAME [--image IMAGE]` registers them with a work pool,
whose workers import the flows from the installed package (module-path entrypoints: no code
upload), inside IMAGE for Docker/Kubernetes pools. Both make sure the global concurrency limit
`gpu` exists with the number of GPU stages allowed at once.
"""

from __future__ import annotations

from uuid import UUID

from prefect import serve
from prefect.client.orchestration import get_client
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ObjectNotFound

from flows.pipeline import GPU_LIMIT, STAGE_FLOWS, evaluate_newest_checkpoint, rlhf_pipeline
from stages.config.section import ConfigError

NIGHTLY_CRON = "0 3 * * *"  # the scheduled evaluation: every night at 03:00 (UTC unless the server says)
TAGS = ["rlpipe"]


def build_deployments(
    eval_cron: str | None = NIGHTLY_CRON, eval_paused: bool = False
) -> list[RunnerDeployment]:
    """`rlhf-pipeline`, one deployment per stage (`sft`, `reward-model`, ...), and `nightly-evaluation`."""
    common = {"tags": TAGS, "entrypoint_type": EntrypointType.MODULE_PATH}
    deployments = [
        rlhf_pipeline.to_deployment(
            name="rlhf-pipeline", description="Run the whole pipeline (or a subset of stages).", **common
        )
    ]
    for flow in STAGE_FLOWS.values():
        deployments.append(
            flow.to_deployment(
                name=flow.name,
                description=f"{flow.description} Rerun, resume or recompute this stage of a run.",
                **common,
            )
        )
    deployments.append(
        evaluate_newest_checkpoint.to_deployment(
            name="nightly-evaluation",
            description="Evaluate the newest PPO checkpoint of a run (default: the newest run) on a schedule.",
            cron=eval_cron,
            paused=eval_paused,
            **common,
        )
    )
    return deployments


def ensure_gpu_limit(slots: int | None) -> None:
    """Create or resize the global concurrency limit `gpu` (GPU stages running at once).

    `slots=None` creates it with 1 slot only if it does not exist (what `rlpipe run` does).
    """
    if slots is not None and slots < 1:
        raise ValueError(f"gpu slots must be at least 1, got {slots}")
    with get_client(sync_client=True) as client:
        if slots is None:
            try:
                client.read_global_concurrency_limit_by_name(GPU_LIMIT)
                return
            except ObjectNotFound:
                slots = 1
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, slots)


def serve_deployments(gpu_slots: int, eval_cron: str | None = NIGHTLY_CRON) -> None:
    """Serve every deployment from this process until interrupted (flow runs start as subprocesses)."""
    require_reachable_api()
    ensure_gpu_limit(gpu_slots)
    serve(*build_deployments(eval_cron), print_starting_message=True)


def require_reachable_api(timeout_s: float = 5.0) -> str:
    """The Prefect API URL `serve` registers with; ConfigError when none is set or it does not answer.

    Without PREFECT_API_URL Prefect would start a temporary server inside this process: the
    deployments would exist there only, no UI would show them, and they would vanish with it.
    """
    import urllib.error
    import urllib.request

    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError(
            "rlpipe serve needs the Prefect server the UI shows: start one (prefect server start) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s) as response:
            response.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(
            f"no Prefect API answers at {url} ({reason}); is `prefect server start` running there?"
        ) from None
    return url


def deploy_to_work_pool(
    work_pool: str, gpu_slots: int, image: str | None = None, eval_cron: str | None = NIGHTLY_CRON
) -> list[UUID]:
    """Register every deployment with `work_pool`; with `image`, the pool's jobs run in that image.

    Registers each deployment itself (`RunnerDeployment.apply`) rather than through `prefect.deploy`:
    Prefect 3.8's `deploy` first lists the pool's workers with a request its own server rejects (422).
    """
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(work_pool)
        except ObjectNotFound:
            raise ConfigError(
                f"work pool '{work_pool}' not found: create it first (prefect work-pool create {work_pool} --type ...)"
            ) from None
    if image and "image" not in pool.base_job_template.get("variables", {}).get("properties", {}):
        raise ConfigError(
            f"work pool '{work_pool}' ({pool.type}) has no image variable: deploy without --image"
        )
    ensure_gpu_limit(gpu_slots)
    return [d.apply(work_pool_name=work_pool, image=image) for d in build_deployments(eval_cron)]
