"""The test API server in a process of its own (for tests that kill clients or the server)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgefleet_operator.devtools.kube_api.server import CRDS_DIR

READY_PREFIX = "kube-api ready: "
"""The line ``python -m edgefleet_operator.devtools.kube_api`` prints once it serves, followed by its URL."""
MODULE = "edgefleet_operator.devtools.kube_api"
STOP_DEADLINE_S = 10.0


class KubeApiStartError(RuntimeError):
    """The server process exited or printed something else before its ready line."""


@dataclass(frozen=True)
class SpawnedKubeApi:
    url: str
    process: subprocess.Popen[str]


@contextmanager
def spawned_kube_api(
    *,
    crds_dir: Path = CRDS_DIR,
    kopf_peering: bool = False,
    module: str = MODULE,
    cwd: Path | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[SpawnedKubeApi]:
    """``python -m edgefleet_operator.devtools.kube_api`` in its own process; terminated afterwards.

    Its audit log is at ``GET {url}/_kube_api/audit``; ``POST {url}/_kube_api/close-watches`` drops watches.
    Raises KubeApiStartError with the process's output when it does not come up.
    """
    command = [sys.executable, "-m", module, "--port", "0", "--crds", str(crds_dir), *extra_args]
    if kopf_peering:
        command.append("--kopf-peering")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The command is this interpreter running our own module; nothing in it comes from outside.
    process = subprocess.Popen(  # noqa: S603
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert process.stdout is not None
        # readline() blocks until the server prints its first line (or exits): the ready line or an error.
        line = process.stdout.readline()
        if not line.startswith(READY_PREFIX):
            rest = line + (process.stdout.read() if process.poll() is not None else "")
            raise KubeApiStartError(f"the test API server process did not start: {rest}")
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
