"""The pytest fixture, and the server in a process of its own (for tests that kill clients or the server)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.kube_api.server import CRDS_DIR, REPO_ROOT, KubeApiServer

READY_PREFIX = "kube-api ready: "
"""The line ``python -m tests.support.kube_api`` prints once it serves, followed by its URL."""
START_DEADLINE_S = 30.0
STOP_DEADLINE_S = 10.0


@pytest.fixture
def kube_api_server() -> Iterator[KubeApiServer]:
    """A fresh server with the repository's CRDs installed and the ``default`` namespace."""
    with KubeApiServer() as server:
        yield server


@dataclass(frozen=True)
class SpawnedKubeApi:
    url: str
    process: subprocess.Popen[str]


@contextmanager
def spawned_kube_api(*, crds_dir: Path = CRDS_DIR, kopf_peering: bool = False) -> Iterator[SpawnedKubeApi]:
    """``python -m tests.support.kube_api`` in its own process; terminated afterwards.

    Its audit log is at ``GET {url}/_kube_api/audit``; ``POST {url}/_kube_api/close-watches`` drops watches.
    """
    command = [sys.executable, "-m", "tests.support.kube_api", "--port", "0", "--crds", str(crds_dir)]
    if kopf_peering:
        command.append("--kopf-peering")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert process.stdout is not None
        # readline() blocks until the server prints its first line (or exits): the ready line or an error.
        line = process.stdout.readline()
        if not line.startswith(READY_PREFIX):
            rest = line + (process.stdout.read() if process.poll() is not None else "")
            pytest.fail(f"the test API server process did not start: {rest}", pytrace=False)
        yield SpawnedKubeApi(line.removeprefix(READY_PREFIX).strip(), process)
    finally:
        process.terminate()
        try:
            process.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_DEADLINE_S)
        if process.stdout is not None:
            process.stdout.close()
