"""Opening a run: which config applies, where the run lives, and its pipeline record.

Rule (the stage contract): if the run already exists in storage, its stored config is the base
and `--set` overrides apply on top; otherwise the recipe (default: the offline `tiny` recipe)
creates it. `--storage` and `--run-id` only say where the run is.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from stages.config.overrides import apply_overrides, load_recipe, validate_config
from stages.config.pipeline import DEFAULT_RECIPE, PipelineConfig, upgrade_stored_config
from stages.config.section import ConfigError, config_hash
from storage.layout import RunLayout, validate_run_id
from storage.manifests import read_pipeline_record, write_pipeline_record


def new_run_id(recipe_name: str) -> str:
    return f"{recipe_name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def resolve_config(
    recipe: str | Path | None = None,
    overrides: list[str] | None = None,
    run_id: str | None = None,
    storage: str | None = None,
    check_storage: bool = True,
) -> tuple[PipelineConfig, bool]:
    """The config of the run named by the arguments, and whether that run already exists.

    `check_storage`: fail (one line) when the storage root is unusable, before anything starts;
    off for commands that only print the config."""
    location_overrides = [f"storage.root={storage}"] * bool(storage) + [f"run_id={run_id}"] * bool(run_id)
    overrides = list(overrides or []) + location_overrides
    recipe_path = Path(recipe) if recipe else DEFAULT_RECIPE
    recipe_data = load_recipe(recipe_path)
    recipe_data.setdefault("recipe", recipe_path.stem)
    config = validate_config(apply_overrides(recipe_data, overrides, PipelineConfig), PipelineConfig)
    if check_storage:
        config.storage.root_location().check_usable()  # before anything starts: one line, nothing written
    if config.run_id is None:
        return config.model_copy(update={"run_id": new_run_id(config.recipe)}), False
    try:
        validate_run_id(config.run_id)
    except ValueError as err:
        raise ConfigError(str(err)) from None

    record = read_pipeline_record(RunLayout(config.storage.root_location(), config.run_id))
    if record is None:
        return config, False
    # An existing run keeps its own config; only the overrides given now change it.
    stored = upgrade_stored_config(record["config"])
    stored["storage"] = config.storage.model_dump()  # where it was found now, not where it was made
    return validate_config(apply_overrides(stored, overrides, PipelineConfig), PipelineConfig), True


def open_run(config: PipelineConfig) -> RunLayout:
    """Create (or update) the run's pipeline record and return its layout."""
    layout = RunLayout(config.storage.root_location(), config.run_id)
    write_pipeline_record(layout, config.model_dump(mode="json"), config_hash=config_hash(config))
    return layout
