"""One metrics path for every stage: namespaced dicts -> metrics.jsonl, wandb, and a progress bar.

Stages call `tracker.log(step, {"sft/loss": ..., "sft/accuracy": ...})` on every rank; only
rank 0 writes (the values are expected to be already reduced over ranks). wandb runs offline
unless the config says otherwise (sync later with `wandb sync`); the run is named after the
run id and stage. The config sent to wandb is redacted like everything written to storage.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from tqdm import tqdm

from stages.config.run import WandbConfig
from storage.location import Location
from storage.metrics import append_metrics, truncate_metrics_after
from storage.secrets import redact

# Shown in the progress bar when present (first match per kind).
_HEADLINE_SUFFIXES = ("loss", "reward", "accuracy", "explained_var")


class MetricsTracker:
    """Writes metrics of one stage run; create it once per process, close it at the end."""

    def __init__(
        self,
        metrics: Location,
        *,
        rank: int,
        run_id: str,
        stage: str,
        total_steps: int,
        start_step: int,
        wandb_config: WandbConfig,
        config: dict[str, Any],
        wandb_dir: str | None = None,
    ) -> None:
        self.metrics = metrics
        self.is_writer = rank == 0
        self._wandb_run = None
        self._bar = None
        if not self.is_writer:
            return
        # Steps after the resumed checkpoint are replaced, never duplicated. A fresh start (no
        # checkpoint: start_step 0) drops everything, the step-0 records of a killed try included.
        truncate_metrics_after(metrics, start_step if start_step > 0 else -1)
        if wandb_config.mode != "disabled":
            self._wandb_run = _start_wandb(wandb_config, run_id, stage, config, wandb_dir)
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=stage,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.is_writer:
            return
        append_metrics(self.metrics, {"step": step, **values})
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in values.items() if _is_number(v)}, step=step)
        if self._bar is not None:
            self._bar.set_postfix(_headline(values), refresh=False)
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Close the progress bar and the wandb run (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _headline(values: dict[str, Any]) -> dict[str, str]:
    shown: dict[str, str] = {}
    for suffix in _HEADLINE_SUFFIXES:
        for key, value in values.items():
            if key.endswith(suffix) and _is_number(value) and suffix not in shown:
                shown[suffix] = f"{value:.4g}" if math.isfinite(value) else str(value)
    return shown


def _start_wandb(config: WandbConfig, run_id: str, stage: str, run_config: dict, wandb_dir: str | None):
    import wandb  # heavy import: only when tracking is on

    directory = wandb_dir or os.environ.get("WANDB_DIR") or os.path.join(os.getcwd(), "wandb")
    os.makedirs(directory, exist_ok=True)
    return wandb.init(
        project=config.project,
        entity=config.entity,
        name=f"{run_id}/{stage}",
        id=f"{run_id}-{stage}".replace("/", "-")[:128],
        group=run_id,
        job_type=stage,
        mode=config.mode,
        dir=directory,
        config=redact(run_config),
        resume="allow",
        settings=wandb.Settings(silent=True, console="off"),
    )
