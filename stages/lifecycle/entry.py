"""`python -m stages.<name> --config FILE [--force]`: every stage's entry point (also under the
DeepSpeed launcher). Bad input ends in one line on stderr and exit code 3 (USER_ERROR_EXIT), never
a traceback; the orchestrator never retries that exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from stages.config.overrides import load_recipe, validate_config
from stages.config.pipeline import PipelineConfig
from stages.config.section import ConfigError
from stages.data.records import DataError
from stages.lifecycle.contract import StageError
from stages.models.packaged import PackagedModelError
from stages.runtime.numerics import NonFiniteError
from stages.runtime.threads import thread_budget
from storage.checkpoints import CheckpointError
from storage.location import StorageError
from storage.manifests import ManifestError
from storage.reports import ReportError

# Errors a user can cause or fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ConfigError,
    DataError,
    StageError,
    StorageError,
    ManifestError,
    ReportError,
    PackagedModelError,  # a packaged model's package not installed, or its file corrupt
    CheckpointError,  # e.g. every committed checkpoint corrupt: the message says what to do
    NonFiniteError,  # deterministic: a rerun from the same checkpoint meets the same NaN
    FileNotFoundError,
    PermissionError,
    NotADirectoryError,  # a storage root or input path that runs through a file
    IsADirectoryError,
)


# Exit code of a stage stopped by bad input: retrying it cannot help (a crash exits 1, a kill -signal).
USER_ERROR_EXIT = 3


def load_stage_config(path: str) -> PipelineConfig:
    config = validate_config(load_recipe(path), PipelineConfig)
    if config.run_id is None:
        raise ConfigError(f"config {path} has no run_id: stages run inside a run (use `rlpipe stage`)")
    return config


def stage_main(
    stage: str,
    run: Callable[..., Any],
    argv: list[str] | None = None,
    options: dict[str, str] | None = None,
) -> int:
    """Parse the stage's command line and call `run(config, force, **options)`.

    `options`: the stage's own string options, name -> help (e.g. evaluate's `--checkpoint`); each
    reaches `run` as a keyword argument (None when not given).
    """
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=f"Run the {stage} stage.")
    parser.add_argument("--config", required=True, help="Resolved run config (YAML or JSON) with run_id.")
    parser.add_argument("--force", action="store_true", help="Recompute even if complete for this config.")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # DeepSpeed launcher
    for name, help_text in (options or {}).items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=help_text)
    args = parser.parse_args(argv)
    extra = {name: getattr(args, name) for name in options or {}}
    try:
        config = load_stage_config(args.config)
        with thread_budget(config.runtime.threads, name=stage):  # before the stage computes anything
            run(config, args.force, **extra)
    except USER_ERRORS as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0
