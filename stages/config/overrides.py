"""Recipe YAML files and `--set a.b=value` overrides, laid over a config model's defaults and validated.

Unknown keys and bad values fail with one line naming the dotted key (`ConfigError`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from stages.config.section import ConfigError

_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


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
