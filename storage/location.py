"""Where a thing lives in object storage: a URI plus what is needed to reach it.

Every storage function takes a `Location`, so the S3 endpoint travels with the URI
instead of hiding in module state. Local paths, `file://`, `s3://` (AWS, MinIO, R2, a
local test server) and any other fsspec protocol work the same way.

S3 credentials are never part of a Location: they come from the AWS credential chain
(environment, profile, instance role), so nothing secret is ever serialised with a URI.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

DEFAULT_ROOT = "./runs"


class StorageError(RuntimeError):
    """A storage operation failed in a way the user must know about (message is one line)."""


def resolve_root(root: str | None = None) -> str:
    """The storage root: explicit value, else $RLPIPE_STORAGE, else ./runs (made absolute if local)."""
    uri = root or os.environ.get("RLPIPE_STORAGE") or DEFAULT_ROOT
    protocol, _ = split_protocol(uri)
    if protocol in (None, "file", "local"):
        uri = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    return uri.rstrip("/") or "/"


def _s3_endpoint(endpoint_url: str | None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@dataclass(frozen=True)
class Location:
    """A URI in storage. `loc / "a" / "b"` joins path parts; `str(loc)` is the URI."""

    uri: str
    endpoint_url: str | None = None

    def __truediv__(self, part: str) -> Location:
        return Location(f"{self.uri.rstrip('/')}/{part.strip('/')}", self.endpoint_url)

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._fs_and_path()[0]

    @property
    def path(self) -> str:
        return self._fs_and_path()[1]

    def _fs_and_path(self) -> tuple[fsspec.AbstractFileSystem, str]:
        protocol, _ = split_protocol(self.uri)
        options: dict = {}
        if protocol in ("s3", "s3a"):
            endpoint = _s3_endpoint(self.endpoint_url)
            if endpoint:
                options["endpoint_url"] = endpoint
            # Other processes write the same prefixes (ranks, resumed stages): never trust a cached listing.
            options["use_listings_cache"] = False
        return url_to_fs(self.uri, **options)

    # ---- reading ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def read_bytes(self) -> bytes:
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"not found in storage: {self.uri}") from err

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def list_names(self) -> list[str]:
        """Names of the direct children (files and folders); empty if the location does not exist."""
        fs, path = self.fs, self.path
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        parent = path.rstrip("/")
        # Some backends echo the folder itself in its own listing: keep children only.
        children = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != parent}
        return sorted(children)

    def walk_files(self) -> list[str]:
        """Paths (relative to this location, '/'-separated) of every file below it."""
        fs, path = self.fs, self.path.rstrip("/")
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return []
        return sorted(p[len(path) + 1 :] for p in fs.find(path) if p != path)

    # ---- writing ---------------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        """Write the whole object atomically: readers see the old content or the new, never a part.

        Local: write a temporary file beside it, fsync, rename. Object stores: a single PUT is atomic.
        """
        fs, path = self.fs, self.path
        if isinstance(fs, LocalFileSystem):
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            fs.pipe_file(path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def upload_file(self, local_path: str) -> None:
        """Copy a local file here (atomically on local storage; one PUT or a multipart upload on S3)."""
        fs, path = self.fs, self.path
        if isinstance(fs, LocalFileSystem):
            with open(local_path, "rb") as f:
                self.write_bytes(f.read())
        else:
            fs.put_file(local_path, path)

    def download_file(self, local_path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
        self.fs.get_file(self.path, local_path)

    def remove(self, recursive: bool = False) -> None:
        fs, path = self.fs, self.path
        if fs.exists(path):
            fs.rm(path, recursive=recursive)
