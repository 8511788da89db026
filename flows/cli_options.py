"""Options shared by the `rlpipe` commands (flows/cli.py) and `rlpipe bench` (flows/bench_cli.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from storage.location import Location, resolve_root

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


def storage_root(storage: str | None, endpoint_url: str | None) -> Location:
    return Location(resolve_root(storage), endpoint_url)
