"""Recipe + overrides, validation errors that name the key, the stable config hash, run reopening."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from stages.config.overrides import parse_override
from stages.config.pipeline import PipelineConfig, load_config
from stages.config.section import ConfigError, config_hash
from stages.lifecycle.runs import open_run, resolve_config


def write_recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_default_recipe_is_the_offline_tiny_recipe():
    config = load_config()
    assert config.recipe == "tiny" and config.wandb.mode == "offline"


@pytest.mark.parametrize(
    "text,key,value",
    [
        ("seed=3", "seed", 3),
        ("wandb.mode=disabled", "wandb.mode", "disabled"),
        ("storage.root=s3://bucket/runs", "storage.root", "s3://bucket/runs"),
        ("storage.endpoint_url=null", "storage.endpoint_url", None),
        ("a.b=[1, 2]", "a.b", [1, 2]),
        ("lr=1e-5", "lr", 1e-5),
        ("flag=true", "flag", True),
        ("name=x=y", "name", "x=y"),  # only the first '=' splits
    ],
)
def test_parse_override_types_values(text, key, value):
    assert parse_override(text) == (key, value)


def test_overrides_are_typed_and_repeatable(tmp_path):
    recipe = write_recipe(tmp_path, "seed: 1\nwandb: {project: p}\n")
    config = load_config(recipe, ["seed=7", "wandb.mode=disabled", "seed=8"])
    assert config.seed == 8 and config.wandb.mode == "disabled" and config.wandb.project == "p"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["sed=3"], "unknown config key 'sed'"),
        (["wandb.moed=offline"], "unknown config key 'wandb.moed'"),
        (["seed=abc"], "config key 'seed': Input should be a valid integer"),
        (["seed=-1"], "config key 'seed': Input should be greater than or equal to 0"),
        (["wandb.mode=loud"], "config key 'wandb.mode'"),
        (["seed"], "bad override 'seed': expected KEY=VALUE"),
    ],
)
def test_bad_overrides_fail_with_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_recipe_is_named(tmp_path):
    recipe = write_recipe(tmp_path, "seed: 1\nwandb:\n  projcet: x\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'wandb.projcet'"):
        load_config(recipe)


def test_missing_and_malformed_recipes(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line 2\)"):
        load_config(write_recipe(tmp_path, "seed: 1\n  bad: [\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write_recipe(tmp_path, "- 1\n- 2\n"))


def test_recipe_yaml_cannot_execute_code(tmp_path):
    recipe = write_recipe(tmp_path, "seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(recipe)


def test_config_hash_ignores_key_order_and_non_semantic_fields():
    a = PipelineConfig.model_validate({"seed": 1, "wandb": {"mode": "offline", "project": "x"}})
    b = PipelineConfig.model_validate({"wandb": {"project": "y", "mode": "disabled"}, "seed": 1})
    c = PipelineConfig.model_validate({"seed": 1, "run_id": "other", "storage": {"root": "s3://b/r"}})
    assert config_hash(a) == config_hash(b) == config_hash(c)
    assert len(config_hash(a)) == 64
    assert config_hash(PipelineConfig.model_validate({"seed": 2})) != config_hash(a)


def test_config_is_frozen():
    config = load_config()
    with pytest.raises(ValidationError, match="frozen"):
        config.seed = 5


def test_existing_run_keeps_its_stored_config_and_applies_new_overrides(tmp_path):
    storage = str(tmp_path / "runs")
    first, existed = resolve_config(None, ["seed=5"], run_id="r1", storage=storage)
    assert not existed
    open_run(first)
    # The recipe now says seed 0, but the stored run says 5: the run's own config wins.
    again, existed = resolve_config(None, ["wandb.mode=disabled"], run_id="r1", storage=storage)
    assert existed and again.seed == 5 and again.wandb.mode == "disabled"
    record = json.loads((tmp_path / "runs" / "r1" / "pipeline.json").read_text())
    assert record["config"]["seed"] == 5 and record["config_hash"] == config_hash(first)


def test_new_runs_get_a_recipe_named_id():
    config, existed = resolve_config(None, [])
    assert not existed and config.run_id.startswith("tiny-")


def test_secret_looking_values_are_redacted_when_the_config_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SENTINEL-secret-value-123")
    storage = str(tmp_path / "runs")
    # Someone pastes a secret into a free-text field: it must not reach storage.
    config, _ = resolve_config(
        None, ["wandb.project=SENTINEL-secret-value-123"], run_id="r2", storage=storage
    )
    open_run(config)
    stored = (tmp_path / "runs" / "r2" / "pipeline.json").read_text()
    assert "SENTINEL-secret-value-123" not in stored


def test_partial_nested_sections_keep_the_enclosing_defaults(tmp_path):
    # SFT's optimizer defaults (lr 1e-3, micro batch 32) differ from OptimConfig's own (lr 1e-6, 1).
    via_set = load_config(write_recipe(tmp_path, "seed: 0\n"), ["sft.optim.warmup_steps=3"])
    assert via_set.sft.optim.warmup_steps == 3
    assert via_set.sft.optim.lr == PipelineConfig().sft.optim.lr != 1e-6
    recipe = write_recipe(tmp_path, "sft:\n  optim:\n    warmup_steps: 4\n")
    via_recipe = load_config(recipe)
    assert via_recipe.sft.optim.warmup_steps == 4
    assert via_recipe.sft.optim.micro_batch_size == PipelineConfig().sft.optim.micro_batch_size
