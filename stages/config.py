"""Configuration machinery: frozen documented sections, recipe YAML, `--set a.b=value` overrides, hashing.

The whole run's model, composed of the stage sections, is `stages.pipeline_config.PipelineConfig`.

- Every field has a description: it is the help text of the CLI and of the Prefect UI form.
- Unknown keys and bad values fail with one line naming the dotted key (`ConfigError`).
- `config_hash` is stable: independent of key order and of fields marked non-semantic
  (where things are stored, how they are logged), so moving a run to another bucket does not
  invalidate its completed stages.
- Nothing secret lives in a config: S3 and wandb credentials come from the environment /
  credential chain, and storage redacts anything secret-looking whenever a config is written.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticUndefined

from storage.location import Location, resolve_root

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the key or file."""


def non_semantic(default: Any = PydanticUndefined, *, description: str, **kwargs: Any) -> Any:
    """A field that does not change what a stage computes: left out of `config_hash`."""
    return Field(default, description=description, json_schema_extra={"semantic": False}, **kwargs)


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class StorageConfig(Section):
    root: str | None = Field(
        None,
        description="Storage root URI (local path, s3://bucket/prefix, any fsspec URI). "
        "Default: $RLPIPE_STORAGE, else ./runs. Credentials never go here: they come from the "
        "AWS credential chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profile, instance role).",
    )
    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, R2, a local test server). Default: $AWS_ENDPOINT_URL.",
    )

    def root_location(self) -> Location:
        """The storage root as a Location (explicit root, else $RLPIPE_STORAGE, else ./runs)."""
        return Location(resolve_root(self.root), self.endpoint_url)


class WandbConfig(Section):
    project: str = Field("rlpipe", description="wandb project name.")
    entity: str | None = Field(
        None, description="wandb entity (team); default: the API key's default entity."
    )
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline",
        description="offline writes runs locally (sync later with `wandb sync`); online needs WANDB_API_KEY "
        "in the environment; disabled logs to metrics.jsonl only.",
    )


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML as plain data (`yaml.safe_load`: a config never executes code)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"recipe {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of config keys, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value typed by YAML rules (1, 0.5, true, null, [1, 2])."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"bad override {text!r}: expected KEY=VALUE, e.g. seed=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string; a learning rate is a number
    return key, value


def _field_at(model: type[BaseModel], dotted: str) -> None:
    """Raise ConfigError unless `dotted` names a field (or a key inside a dict field) of `model`."""
    current: Any = model
    walked = []
    for part in dotted.split("."):
        walked.append(part)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            if field is None:
                raise ConfigError(f"unknown config key '{'.'.join(walked)}'")
            current = field.annotation
        else:
            return  # inside a free-form value (dict): the model validates it later


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def with_defaults(data: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """`data` laid over the model's full default config.

    Why: a partial nested section (`sft: {optim: {lr: 0.002}}`, or `--set sft.optim.lr=0.002`)
    must keep the OTHER defaults of that section as the enclosing config defines them (SFT's
    optimizer defaults), not fall back to the generic defaults of the section's class.
    """
    try:
        defaults = model().model_dump(mode="json")
    except ValidationError:  # a model with required fields has no full default config
        return data
    return _deep_merge(defaults, data)


def apply_overrides(data: dict[str, Any], overrides: list[str], model: type[BaseModel]) -> dict:
    """Lay `data` over the model's defaults, then set each `a.b=value`, rejecting unknown keys."""
    data = with_defaults(json.loads(json.dumps(data)), model)
    for text in overrides:
        key, value = parse_override(text)
        _field_at(model, key)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return data


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}'"
    got = first.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict) else ""
    more = f" [+{err.error_count() - 1} more]" if err.error_count() > 1 else ""
    return f"config key '{key}': {first['msg']}{shown}{more}"


def validate_config(data: dict[str, Any], model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


# ---------------------------------------------------------------------------------------------
# hashing
# ---------------------------------------------------------------------------------------------
def semantic_dict(config: BaseModel) -> dict[str, Any]:
    """The fields that change what is computed, recursively (non-semantic fields dropped)."""
    out: dict[str, Any] = {}
    for name, field in type(config).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("semantic") is False:
            continue
        value = getattr(config, name)
        out[name] = semantic_dict(value) if isinstance(value, BaseModel) else _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return semantic_dict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_hash(config: BaseModel) -> str:
    """sha256 of the canonical JSON of the semantic fields: key order and storage/logging settings don't matter."""
    canonical = json.dumps(semantic_dict(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
