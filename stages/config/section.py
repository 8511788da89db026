"""The base of every config section, and the config hash.

- Every section is a frozen pydantic model; unknown keys are rejected. Every field has a
  description: it is the help text of the CLI and of the Prefect UI form.
- `config_hash` is stable: independent of key order and of fields marked non-semantic
  (where things are stored, how they are logged), so moving a run to another bucket does not
  invalidate its completed stages.
- Nothing secret lives in a config: S3 and wandb credentials come from the environment /
  credential chain, and storage redacts anything secret-looking whenever a config is written.

This package imports pydantic and yaml only (no torch, no model library): validating a config
is what every `rlpipe` command does first.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticUndefined


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the key or file."""


def non_semantic(default: Any = PydanticUndefined, *, description: str, **kwargs: Any) -> Any:
    """A field that does not change what a stage computes: left out of `config_hash`."""
    return Field(default, description=description, json_schema_extra={"semantic": False}, **kwargs)


class Section(BaseModel):
    """Base of every config section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


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
