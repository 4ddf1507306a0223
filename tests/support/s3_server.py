"""A real S3 API server on loopback for the store tests: ``moto_server`` in its own process.

moto is a declared dev dependency, so a missing executable is a broken environment and fails loudly
rather than skipping. The server does not check request signatures unless started with
``INITIAL_NO_AUTH_ACTION_COUNT`` (see :func:`running_moto_server`'s ``check_auth``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

START_DEADLINE_S = 30.0
STOP_DEADLINE_S = 10.0
ACCESS_KEY = "edgefleet-test"
SECRET_KEY = "edgefleet-test-secret"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """Where a running test S3 server listens and the credentials to use with it."""

    endpoint: str
    """``host:port`` as the minio client takes it."""
    url: str
    """``http://host:port``, as ``AWS_ENDPOINT_URL`` takes it."""
    access_key: str
    secret_key: str
    region: str
    process: subprocess.Popen[bytes]
    """The server process, for tests that stop it on purpose."""


def moto_server_executable() -> str:
    """Path of the ``moto_server`` console script next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "moto_server"
    if beside.exists():
        return str(beside)
    found = shutil.which("moto_server")
    if found is None:
        pytest.fail(
            "moto_server is not installed: it is a dev dependency (moto[server]); "
            "install the project with its dev extras",
            pytrace=False,
        )
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate the server and wait for it (kill if it does not go in time)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_DEADLINE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_DEADLINE_S)


@contextmanager
def running_moto_server(*, check_auth: bool = False) -> Iterator[S3Server]:
    """Start ``moto_server`` on a free loopback port, wait until it answers, stop it afterwards.

    ``check_auth`` makes moto authenticate every request against its (empty) IAM, so any
    credentials are refused: 403 ``InvalidAccessKeyId`` (a bare 403 for HEAD requests).
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    if check_auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    else:
        env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
    # A file, not a pipe: werkzeug logs every request to stderr and a full pipe would stall the server.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [moto_server_executable(), "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + START_DEADLINE_S
            while not _answers(url):
                if process.poll() is not None:
                    log.seek(0)
                    err = log.read()[-4000:].decode(errors="replace")
                    pytest.fail(f"moto_server exited with {process.returncode} before answering: {err}", pytrace=False)
                if time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not answer on {url} within {START_DEADLINE_S} s", pytrace=False)
                time.sleep(0.05)  # poll interval, not a wait for a condition
            yield S3Server(
                endpoint=f"127.0.0.1:{port}",
                url=url,
                access_key=ACCESS_KEY,
                secret_key=SECRET_KEY,
                region=REGION,
                process=process,
            )
        finally:
            stop(process)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One ``moto_server`` for the whole session; tests isolate themselves with fresh buckets."""
    with running_moto_server() as server:
        yield server
