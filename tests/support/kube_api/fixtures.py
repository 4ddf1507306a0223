"""The pytest fixture, and the server in a process of its own (for tests that kill clients or the server)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edgefleet_operator.devtools.kube_api import process
from edgefleet_operator.devtools.kube_api.process import READY_PREFIX, SpawnedKubeApi
from edgefleet_operator.devtools.kube_api.server import CRDS_DIR, KubeApiServer

__all__ = ["READY_PREFIX", "SpawnedKubeApi", "kube_api_server", "spawned_kube_api"]


@pytest.fixture
def kube_api_server() -> Iterator[KubeApiServer]:
    """A fresh server with the repository's CRDs installed and the ``default`` namespace."""
    with KubeApiServer() as server:
        yield server


@contextmanager
def spawned_kube_api(*, crds_dir: Path = CRDS_DIR, kopf_peering: bool = False) -> Iterator[SpawnedKubeApi]:
    """The server in its own process (``process.spawned_kube_api``); a start failure fails the test."""
    try:
        spawned = process.spawned_kube_api(crds_dir=crds_dir, kopf_peering=kopf_peering)
        with spawned as server:
            yield server
    except process.KubeApiStartError as exc:
        pytest.fail(str(exc), pytrace=False)
