"""Keep secrets out of everything a run writes to storage.

Why: resolved configs (`pipeline.json`), stage manifests and log lines are written to shared
storage (a team bucket, a Prefect server, wandb), where everyone with read access sees them and
where they outlive the credentials' rotation. A token pasted into a config, a database URI with
a password in it, or an environment secret echoed into an error message must not end up there.

Three rules, applied by `redact` (JSON-like objects) and `redact_text` (log lines):

(a) Secret-looking KEYS: the value of a dict entry whose key looks secret becomes "***".
    A key is split into lowercase segments on `_`, `-`, `.`, `/`, spaces and camelCase
    boundaries, and only whole segments count, so `tokenizer`, `max_new_tokens`, `keep_last`,
    `key_order` and `monkey` are harmless while `hf_token`, `WANDB_API_KEY`, `apiKey`,
    `db_password` and `AWS_SECRET_ACCESS_KEY` are secret. See `is_secret_name`.
(b) Credentials in URIs: `scheme://user:pass@host` becomes `scheme://user:***@host`, and a
    secret-looking query parameter (`?token=...`, presigned `X-Amz-Signature=...`) becomes `***`.
(c) Environment secrets: the current value of any secret-looking environment variable (same
    name rule: AWS_SECRET_ACCESS_KEY, HF_TOKEN, MY_PASSWORD, ...) of at least 8 characters is
    replaced by "***" wherever it appears inside a string. Read at call time, never cached.

Redaction is one-way and for records only: never feed a redacted config back into a stage.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "***"
MIN_ENV_SECRET_LEN = 8  # shorter values ("true", "1", "testing") would redact ordinary words

# A segment anywhere in the name makes it secret. Not "pwd": $PWD is the working directory.
_SECRET_ANYWHERE = frozenset(
    {
        "secret",
        "secrets",
        "password",
        "passwd",
        "passphrase",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "apikey",
        "signature",
    }
)
# Secret only as the LAST segment: `hf_token` yes, `token_budget` no; `api_key` yes, `key_order` no.
_SECRET_LAST = frozenset({"key", "token"})
# Adjacent pairs that are secret anywhere: `access_key_id`, `private_key_path`, `session_key`.
_SECRET_PAIRS = frozenset(
    {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("session", "key")}
)
# `<word>_token` that names a vocabulary token, not a credential (HF tokenizer configs).
_VOCAB_TOKEN_WORDS = frozenset(
    {
        "pad",
        "eos",
        "bos",
        "unk",
        "sep",
        "cls",
        "mask",
        "special",
        "start",
        "end",
        "stop",
        "additional",
        "chat",
    }
)
# `<word>_key` that names a data field or column, not a credential (`prompt_key: question`).
_DATA_KEY_WORDS = frozenset(
    {
        "prompt",
        "answer",
        "question",
        "response",
        "label",
        "labels",
        "text",
        "input",
        "output",
        "target",
        "column",
        "field",
        "sort",
        "group",
        "partition",
        "cache",
        "dict",
        "primary",
        "foreign",
        "lookup",
        "reward",
        "score",
        "metric",
        "message",
        "messages",
        "image",
        "dataset",
        "truth",
        "solution",
        "id",
    }
)

_CAMEL = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_SEPARATORS = re.compile(r"[_\-./\s]+")

# scheme://user:password@host -> keep scheme and user, hide the password (no '@', '/' or space inside).
_URI_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/:@]*:)(?P<password>[^\s/@]+)(?=@)")
# ?name=value / &name=value in a URI query; the name is checked with `is_secret_name`.
_QUERY_PARAM = re.compile(r"(?P<head>[?&](?P<name>[A-Za-z0-9_.\-]+)=)(?P<value>[^&#\s\"']+)")


def _segments(name: str) -> list[str]:
    words: list[str] = []
    for part in _SEPARATORS.split(name):
        words.extend(w.lower() for w in _CAMEL.findall(part))
    return words


def is_secret_name(name: str) -> bool:
    """Whether a dict key, query parameter or environment variable name looks like it holds a secret."""
    words = _segments(name)
    if not words:
        return False
    if any(w in _SECRET_ANYWHERE for w in words):
        return True
    if any(pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False)):
        return True
    last = words[-1]
    previous = words[-2] if len(words) > 1 else None
    if last == "token":
        return previous not in _VOCAB_TOKEN_WORDS
    if last == "key":
        return previous not in _DATA_KEY_WORDS
    return False


def _env_secrets() -> list[str]:
    """Values of secret-looking environment variables, longest first (so no secret is half-replaced)."""
    values = {v for k, v in os.environ.items() if len(v) >= MIN_ENV_SECRET_LEN and is_secret_name(k)}
    return sorted(values, key=len, reverse=True)


def _redact_string(text: str, env_secrets: list[str]) -> str:
    for value in env_secrets:
        text = text.replace(value, REDACTED)
    if "://" in text:
        text = _URI_USERINFO.sub(lambda m: m.group("head") + REDACTED, text)
    if "=" in text:
        text = _QUERY_PARAM.sub(
            lambda m: m.group("head") + REDACTED if is_secret_name(m.group("name")) else m.group(0), text
        )
    return text


def _redact(obj: Any, env_secrets: list[str]) -> Any:
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            # None and booleans say only whether something is set, not what it is.
            hide = (
                is_secret_name(str(key)) and value is not None and not isinstance(value, bool) and value != ""
            )
            out[key] = REDACTED if hide else _redact(value, env_secrets)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_redact(v, env_secrets) for v in obj)
    if isinstance(obj, str):
        return _redact_string(obj, env_secrets)
    return obj  # numbers, None, booleans: immutable, nothing to hide


def redact(obj: Any) -> Any:
    """A redacted deep copy of a JSON-like object (dicts, lists, tuples, strings, numbers); see module doc."""
    return _redact(obj, _env_secrets())


def redact_text(text: str) -> str:
    """A log line with URI passwords and environment secrets replaced by "***" (rules b and c)."""
    return _redact_string(text, _env_secrets())
