"""The Kubernetes API test server, for tests: ``edgefleet_operator.devtools.kube_api`` plus the pytest fixture.

The server itself ships with the operator (``edgefleet bench operator`` runs it too); see that package's
docstring for what it models. This package keeps the tests' imports and ``python -m tests.support.kube_api``.
"""

from edgefleet_operator.devtools.kube_api import (
    CRDS_DIR,
    ApiError,
    AuditRecord,
    Fault,
    HttpReply,
    KubeApiServer,
    KubeClient,
    RequestInfo,
    ResourceType,
    kopf_peering_crds,
    matching,
    read_crds,
    running_kube_api,
)
from tests.support.kube_api.fixtures import SpawnedKubeApi, kube_api_server, spawned_kube_api

__all__ = [
    "CRDS_DIR",
    "ApiError",
    "AuditRecord",
    "Fault",
    "HttpReply",
    "KubeApiServer",
    "KubeClient",
    "RequestInfo",
    "ResourceType",
    "SpawnedKubeApi",
    "kopf_peering_crds",
    "kube_api_server",
    "matching",
    "read_crds",
    "running_kube_api",
    "spawned_kube_api",
]
