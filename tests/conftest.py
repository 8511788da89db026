"""Shared fixtures: a real S3-compatible server (moto, over HTTP) and storage roots on both backends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from storage.location import Location


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start `moto.server` in its own process; tests reach it over HTTP through s3fs/botocore."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session", autouse=True)
def _fake_aws_credentials():
    # The test server accepts any credentials; these never reach a real account.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.pop("AWS_PROFILE", None)


@pytest.fixture
def s3_root(s3_endpoint) -> Location:
    """A fresh bucket on the test server."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    root = Location(f"s3://{bucket}", endpoint_url=s3_endpoint)
    root.fs.mkdir(bucket)
    return root / "runs"


@pytest.fixture
def local_root(tmp_path) -> Location:
    return Location(str(tmp_path / "runs"))


@pytest.fixture(params=["local", "s3"])
def storage_root(request) -> Location:
    """The same test against a local directory and against the S3 server."""
    if request.param == "local":
        return request.getfixturevalue("local_root")
    return request.getfixturevalue("s3_root")
