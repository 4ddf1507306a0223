"""A strict Kubernetes API server for tests: real HTTP on loopback, in memory, no cluster needed.

No kube-apiserver, kind, k3s or Docker can run on our machines, and the ``kmock`` package answers
kopf wrongly (see DESIGN.md), so this one is ours on purpose. It models what an operator depends
on and what the real server refuses:

* discovery (``/api``, ``/apis``, group and version documents) including installed CRDs;
* built-ins (namespaces, events, configmaps, secrets, leases, jobs, CRDs) and custom resources;
* list and watch with label and field selectors, one global resourceVersion, watch resumption
  with 410 Expired for forgotten versions, ``sendInitialEvents`` and ``timeoutSeconds``;
* create (``generateName``, 409 AlreadyExists, 404 for a missing namespace), replace (409 on a
  stale resourceVersion), merge and JSON patches, delete with finalizers and ``deletionTimestamp``;
* ``metadata.generation``, the status subresource, structural schemas (pruning, defaults,
  validation, CEL rules) with 422 ``Invalid`` naming the field, ``fieldValidation``;
* namespace and CRD deletion that removes their contents, and owner-reference garbage collection;
* an audit log of every request, injected faults, and dropping every open watch on demand.

It does not model authentication, admission webhooks, server-side apply, dry runs, conversion
between CRD versions, or consistent snapshots for paged lists.

In process: ``with KubeApiServer() as server`` (or ``running_kube_api``); as a process of its own:
``python -m edgefleet_operator.devtools.kube_api --port 0 --crds crds/`` (``spawned_kube_api``).
The pytest fixture lives with the tests (``tests/support/kube_api``), so importing this package
never imports pytest.
"""

from edgefleet_operator.devtools.kube_api.audit import AuditRecord, Fault, RequestInfo, matching
from edgefleet_operator.devtools.kube_api.catalog import ResourceType, kopf_peering_crds
from edgefleet_operator.devtools.kube_api.client import HttpReply, KubeClient
from edgefleet_operator.devtools.kube_api.errors import ApiError
from edgefleet_operator.devtools.kube_api.process import (
    READY_PREFIX,
    KubeApiStartError,
    SpawnedKubeApi,
    spawned_kube_api,
)
from edgefleet_operator.devtools.kube_api.server import CRDS_DIR, KubeApiServer, read_crds, running_kube_api

__all__ = [
    "CRDS_DIR",
    "READY_PREFIX",
    "ApiError",
    "AuditRecord",
    "Fault",
    "HttpReply",
    "KubeApiServer",
    "KubeApiStartError",
    "KubeClient",
    "RequestInfo",
    "ResourceType",
    "SpawnedKubeApi",
    "kopf_peering_crds",
    "matching",
    "read_crds",
    "running_kube_api",
    "spawned_kube_api",
]
