"""The machine-local cache folder of rlpipe: fetched models, the tiny model, CPU-share leases."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$RLPIPE_CACHE`, else `~/.cache/rlpipe`."""
    return Path(os.environ.get("RLPIPE_CACHE") or Path.home() / ".cache" / "rlpipe")
