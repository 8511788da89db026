"""Where a thing lives in object storage: a URI plus what is needed to reach it.

Every storage function takes a `Location`, so the S3 endpoint travels with the URI
instead of hiding in module state. Local paths, `file://`, `s3://` (AWS, MinIO, R2, a
local test server) and any other fsspec protocol work the same way.

S3 credentials are never part of a Location: they come from the AWS credential chain
(environment, profile, instance role), so nothing secret is ever serialised with a URI.

Transient faults of a remote store (5xx answers such as S3's SlowDown, dropped connections,
timeouts) are retried with capped exponential backoff and jitter, by every operation here and
by `retry_transient` for callers that stream. botocore retries each HTTP request as well (its
`standard` mode, a few attempts), so a multipart upload resends a failed part, not the file.
Whatever is still failing after that is a `StorageError` naming the operation and the URI.
Missing credentials and refused access are not transient: they fail at once, in one line.
Local paths are never retried: a local I/O error does not heal by waiting.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

DEFAULT_ROOT = "./runs"
log = logging.getLogger(__name__)
T = TypeVar("T")

# Attempts of one storage operation on a remote store, and the backoff between them (seconds):
# base * 2**attempt, capped, with full jitter. Six attempts span about 15 s of waiting at most.
RETRY_ATTEMPTS = int(os.environ.get("RLPIPE_STORAGE_RETRIES", "6"))
RETRY_BASE_S, RETRY_CAP_S = 0.25, 8.0
# botocore's own per-request retries ("standard" mode) and timeouts, under the retries above.
_BOTO_CONFIG = {
    "retries": {"max_attempts": 3, "mode": "standard"},
    "connect_timeout": 10,
    "read_timeout": 60,
}


class StorageError(RuntimeError):
    """A storage operation failed in a way the user must know about (message is one line)."""


_NOT_TRANSIENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def _is_credentials_error(err: BaseException) -> bool:
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:  # no S3 support installed: cannot be a botocore error
        return False
    return isinstance(err, (NoCredentialsError, PartialCredentialsError))


def is_transient(err: BaseException) -> bool:
    """Whether waiting and trying again may help: 5xx answers (s3fs raises them as OSError),
    dropped connections and timeouts; not a missing object, refused access or missing credentials."""
    if isinstance(err, _NOT_TRANSIENT) or _is_credentials_error(err):
        return False
    if isinstance(err, (OSError, TimeoutError, ConnectionError)):
        return True
    # botocore's and aiohttp's connection-level errors (the request did not complete)
    return type(err).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp")


def retry_transient(what: str, uri: str, operation: Callable[[], T], attempts: int | None = None) -> T:
    """`operation()`, retried with backoff while it fails transiently; then a StorageError naming `what` and `uri`.

    Missing credentials become a StorageError at once (one line saying where credentials come from).
    """
    attempts = attempts or RETRY_ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except BaseException as err:
            if _is_credentials_error(err):
                raise StorageError(
                    f"storage: no credentials for {uri} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    "AWS_PROFILE, or use an instance role)"
                ) from None
            if not is_transient(err) or isinstance(err, StorageError):
                raise
            reason = _one_line(err)
            if attempt == attempts:
                raise StorageError(
                    f"storage: {what} {uri} failed after {attempts} attempts: {reason}"
                ) from err
            delay = random.uniform(0, min(RETRY_CAP_S, RETRY_BASE_S * 2**attempt))
            log.warning("storage: %s %s failed (%s); retry %d/%d in %.1fs", what, uri, reason, attempt,
                        attempts - 1, delay)  # fmt: skip
            time.sleep(delay)
    raise AssertionError("unreachable")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]


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
            options["config_kwargs"] = _BOTO_CONFIG
        try:
            fs, path = url_to_fs(self.uri, **options)
        except (ImportError, ValueError) as err:  # unknown protocol, or its package is not installed
            raise StorageError(f"storage: cannot open {self.uri}: {_one_line(err)}") from None
        if protocol in ("s3", "s3a"):
            # One attempt per s3fs call (a class attribute, not an init option): the retries are
            # `retry_transient`'s (logged, bounded) and botocore's per request.
            fs.retries = 1
        return fs, path

    def retrying(self, what: str, operation: Callable[[], T]) -> T:
        """Run a remote operation under `retry_transient`; local ones run once."""
        if self.is_local:
            return operation()
        return retry_transient(what, self.uri, operation)

    def check_usable(self) -> None:
        """Raise StorageError (one line) if nothing could be written here: a local path that runs
        through a file or an unwritable folder; a remote store without credentials or out of reach."""
        if not self.is_local:
            self.exists()  # credentials and endpoint: StorageError / PermissionError when missing
            return
        existing = os.path.abspath(self.path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise StorageError(f"storage: cannot use {self.uri}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"storage: cannot use {self.uri}: {existing} is not writable")

    # ---- reading ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.retrying("exists", lambda: self.fs.exists(self.path))

    def read_bytes(self) -> bytes:
        try:
            return self.retrying("read", lambda: self.fs.cat_file(self.path))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"not found in storage: {self.uri}") from err

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def list_names(self) -> list[str]:
        """Names of the direct children (files and folders); empty if the location does not exist."""
        fs, path = self.fs, self.path
        fs.invalidate_cache(path)
        try:
            entries = self.retrying("list", lambda: fs.ls(path, detail=False))
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
        found = self.retrying("list", lambda: fs.find(path) if fs.exists(path) else [])
        return sorted(p[len(path) + 1 :] for p in found if p != path)

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
            self.retrying("write", lambda: fs.pipe_file(path, data))

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def upload_file(self, local_path: str) -> None:
        """Copy a local file here (atomically on local storage; one PUT or a multipart upload on S3)."""
        fs, path = self.fs, self.path
        if isinstance(fs, LocalFileSystem):
            with open(local_path, "rb") as f:
                self.write_bytes(f.read())
        else:
            self.retrying("upload", lambda: fs.put_file(local_path, path))

    def download_file(self, local_path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
        self.retrying("download", lambda: self.fs.get_file(self.path, local_path))

    def remove(self, recursive: bool = False) -> None:
        fs, path = self.fs, self.path

        def remove() -> None:
            if fs.exists(path):
                fs.rm(path, recursive=recursive)

        self.retrying("remove", remove)
