"""Where models come from and where they go: any URI in, a local directory for transformers out.

A model input is one of:
- `tiny`: the offline tiny model, built (and cached) from the run's `tiny_model` section;
- a packaged pretrained model (`smollm2-135m-instruct`, `stages.models.packaged`): converted once
  from the file an installed Python package ships, cached;
- a local directory;
- an fsspec URI (s3://..., another run's `{stage}/final/policy`): downloaded once to a local cache;
- anything else: a Hugging Face hub id, handed to transformers as is.

Inputs are pinned in manifests by `input_ref_for`: the URI plus, when the URI is another stage's
output (`.../{stage}/final/{name}`), the sha256 of that stage's manifest, so that rerunning an
upstream stage invalidates what was built from it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from fsspec.core import split_protocol

from stages.models.packaged import is_packaged, packaged_model_path, packaged_ref
from stages.runtime.cache_dir import cache_root
from storage.location import Location
from storage.manifests import InputRef, input_ref

TINY = "tiny"


def is_remote(uri: str) -> bool:
    protocol, _ = split_protocol(uri)
    return protocol not in (None, "file", "local")


def producing_manifest(uri: str, endpoint_url: str | None) -> Location | None:
    """The manifest of the stage that produced `uri`: a stage's `final/...` export or its `rollouts`."""
    uri = uri.rstrip("/")
    head, sep, _ = uri.rpartition("/final/")
    if not sep and uri.endswith("/rollouts"):
        head, sep = uri[: -len("/rollouts")], "/rollouts"
    if not sep:
        return None
    manifest = Location(head, endpoint_url) / "manifest.json"
    return manifest if manifest.exists() else None


def input_ref_for(uri: str, endpoint_url: str | None = None, tiny_hash: str | None = None) -> InputRef:
    """Pin an input URI for a manifest (see the module docstring)."""
    if uri == TINY:
        return InputRef(uri=f"{TINY}:{tiny_hash}", manifest_sha256=None)
    if is_packaged(uri):
        return InputRef(uri=packaged_ref(uri), manifest_sha256=None)
    return input_ref(uri, producing_manifest(uri, endpoint_url))


def fetch_model_dir(uri: str, endpoint_url: str | None = None) -> str:
    """A path (or hub id) that `from_pretrained` can load: remote directories are downloaded once.

    The cache key includes the producing manifest's bytes, so a rerun upstream stage is fetched anew.
    """
    if not is_remote(uri):
        local = uri.removeprefix("file://")
        if Path(local).exists():
            return str(Path(local).resolve())
        if uri.startswith(("/", "./", "../", "~", "file://")):
            raise FileNotFoundError(f"model not found: {uri} (has the stage that writes it run?)")
        return uri  # a hub id
    source = Location(uri, endpoint_url)
    manifest = producing_manifest(uri, endpoint_url)
    key = hashlib.sha256((uri + (manifest.read_text() if manifest else "")).encode()).hexdigest()[:24]
    target = cache_root() / "models" / key
    if target.is_dir():
        return str(target)
    files = source.walk_files()
    if not files:
        raise FileNotFoundError(f"no model files at {uri}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        for relpath in files:
            (source / relpath).download_file(str(staging / relpath))
        os.replace(staging, target)  # atomic: a crash never leaves a half-fetched model in the cache
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(target)


def export_model_dir(local_dir: str | Path, destination: Location) -> None:
    """Upload a saved Hugging Face directory (safetensors, config, tokenizer) to `destination`.

    The destination is emptied first. It is not "committed" by this call: the stage's manifest,
    written last, is what makes a `final/` export count.
    """
    destination.remove(recursive=True)
    local_dir = Path(local_dir)
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        (destination / path.relative_to(local_dir).as_posix()).upload_file(str(path))


def resolve_model_dir(uri: str, tiny_config, endpoint_url: str | None = None) -> str:
    """Local directory (or hub id) of a model input; `tiny` builds the offline model (cached).

    A path that looks local and does not exist fails here, in one line, not deep in transformers.
    """
    if uri == TINY:
        from stages.models.tiny import tiny_model_path

        return str(tiny_model_path(tiny_config))
    if is_packaged(uri):
        return str(packaged_model_path(uri))
    local = fetch_model_dir(uri, endpoint_url)
    looks_local = uri.startswith(("/", ".", "file://")) or "/final/" in uri
    if not is_remote(uri) and looks_local and not Path(local).exists():
        raise FileNotFoundError(f"model not found: {uri} (has the stage that writes it run?)")
    return local
