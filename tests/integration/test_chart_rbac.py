"""The Helm chart's operator RBAC against what the operator really calls: enough, and nothing more.

For two chart configurations (every namespace with HA peering and pipeline Jobs in the models'
namespaces; a list of namespaces with Jobs in a namespace of their own), the test renders the
chart, runs ``edgefleet operator run`` as a process with the arguments the chart's Deployment
gives it, installs the chart's CRDs and peering object into the strict test API server, and drives
a model through build, spec change, DeviceClass change, a refused build and deletion. Every request
in the server's audit log must be allowed by the rendered Roles/ClusterRoles bound to the
operator's ServiceAccount (as RBAC would evaluate it), and every granted verb must have been used.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgefleet_core.optimize.model_io import serialize
from edgefleet_core.signing import KeySet
from edgefleet_operator.devtools.kube_api import AuditRecord
from tests.support.kube_api import KubeApiServer
from tests.support.kubelet import Kubelet
from tests.support.operator_process import device_class, edge_model, running_operator
from tests.support.tiny_models import tiny_cnn

helm_python = pytest.importorskip("helm_python")  # a dev dependency; skipped only outside `make test`

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "edgefleet"
RELEASE, RELEASE_NAMESPACE = "edgefleet", "edgefleet-system"
MODELS = "vision"
JsonObject = dict[str, Any]
DISCOVERY_PREFIXES = ("/api", "/apis", "/version", "/openapi")
"""Non-resource URLs every authenticated user may GET (the built-in system:discovery ClusterRole)."""


# ------------------------------------------------------------------------------- the chart's RBAC


@dataclass(frozen=True)
class Rule:
    """One PolicyRule, with the namespace it applies in (``None``: a ClusterRole, every namespace)."""

    namespace: str | None
    groups: frozenset[str]
    resources: frozenset[str]
    verbs: frozenset[str]
    names: frozenset[str]

    def allows(self, record: AuditRecord) -> bool:
        request = record.request
        resource = f"{request.resource}/{request.subresource}" if request.subresource else request.resource
        return (
            (self.namespace is None or self.namespace == request.namespace)
            and request.group in self.groups
            and resource in self.resources
            and request.verb in self.verbs
            and (not self.names or request.name in self.names)
        )


def render(values: JsonObject) -> list[JsonObject]:
    with helm_python.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=RELEASE_NAMESPACE)
    return [
        doc
        for file, text in manifests.items()
        if file.endswith((".yaml", ".yml"))  # not NOTES.txt
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def operator_rules(docs: list[JsonObject]) -> list[Rule]:
    """The rules RBAC grants the operator's ServiceAccount through the rendered bindings."""
    (deployment,) = [d for d in docs if d["kind"] == "Deployment" and "operator" in d["metadata"]["name"]]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs}
    rules: list[Rule] = []
    for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        subjects = binding.get("subjects", [])
        if not any(s["kind"] == "ServiceAccount" and s["name"] == account for s in subjects):
            continue
        namespace = binding["metadata"].get("namespace")  # None for a ClusterRoleBinding
        ref = binding["roleRef"]
        role = roles[(ref["kind"], None if ref["kind"] == "ClusterRole" else namespace, ref["name"])]
        rules += [
            Rule(
                namespace,
                frozenset(rule["apiGroups"]),
                frozenset(rule["resources"]),
                frozenset(rule["verbs"]),
                frozenset(rule.get("resourceNames", [])),
            )
            for rule in role["rules"]
        ]
    return rules


def operator_args(docs: list[JsonObject]) -> list[str]:
    """``edgefleet operator run``'s arguments as the chart's Deployment gives them."""
    (deployment,) = [d for d in docs if d["kind"] == "Deployment" and "operator" in d["metadata"]["name"]]
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "operator"]
    command = [*container.get("command", []), *container.get("args", [])]
    assert command[:3] == ["edgefleet", "operator", "run"], command
    return command[3:]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def local_args(chart_args: list[str], *, store: Path, keys: Path, server: str) -> list[str]:
    """The chart's arguments with this machine's store, keys, API server and free loopback ports.

    ``$(POD_NAME)`` is expanded as the kubelet would (from the downward API).
    """
    replaced = {
        "--store": store.as_uri(),
        "--keys": str(keys),
        "--liveness": f"http://127.0.0.1:{_free_port()}/healthz",
        "--metrics-listen": f"127.0.0.1:{_free_port()}",
        "--cache-dir": str(keys.parent / "cache"),
        "--job-poll-seconds": "0.5",  # the chart's 10 s is a cluster's pace, not a test's
        "--endpoint": None,
        "--region": None,
        "--job-s3-secret": None,  # a file store here: no S3 credentials to hand the Jobs
    }
    pairs: list[tuple[str, str | None]] = []
    for arg in chart_args:
        if arg.startswith("--") and "=" in arg:
            flag, value = arg.split("=", 1)
            pairs.append((flag, value))
        elif arg.startswith("--"):
            pairs.append((arg, None))
        else:
            flag, _ = pairs.pop()
            pairs.append((flag, arg))
    flags = {flag for flag, _ in pairs}
    assert {"--store", "--keys"} <= flags, f"the chart passes neither --store nor --keys: {chart_args}"
    args: list[str] = []
    for flag, given in pairs:
        if flag in replaced and replaced[flag] is None:
            continue
        local = replaced.get(flag, given)
        args += [flag] if local is None else [flag, local.replace("$(POD_NAME)", "edgefleet-operator-0")]
    return [*args, "--server", server]


# --------------------------------------------------------------------------------- the scenario


def condition(obj: JsonObject, kind: str) -> str:
    found: JsonObject = next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})
    return str(found.get("status", ""))


def chart_crds() -> list[JsonObject]:
    """Every CRD the chart installs (its crds/ folder, peering CRDs included)."""
    return [
        doc for path in sorted((CHART / "crds").rglob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc
    ]


def run_scenario(docs: list[JsonObject], tmp_path: Path, jobs_namespace: str) -> list[AuditRecord]:
    """Drive the operator the chart describes through a model's life; its audit records."""
    keys, store = tmp_path / "keys", tmp_path / "store"
    KeySet.generate().save(keys)
    data = serialize(tiny_cnn(seed=3))
    (tmp_path / "cnn.onnx").write_bytes(data)
    uri, digest = (tmp_path / "cnn.onnx").as_uri(), hashlib.sha256(data).hexdigest()
    logs = tmp_path / "logs"
    logs.mkdir()
    with KubeApiServer(crds=chart_crds(), crds_dir=None) as server:
        for namespace in {MODELS, jobs_namespace}:
            server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        for peering in (d for d in docs if d["kind"] in ("ClusterKopfPeering", "KopfPeering")):
            server.create(peering)  # the chart creates it; kopf only patches its own record in
        args = local_args(operator_args(docs), store=store, keys=keys, server=server.url)
        for name in ("cpu-a", "cpu-b"):
            server.create(device_class(name))
        server.clear_audit_log()
        # The digits model's first Job never starts, as with an image that does not pull: the
        # operator deletes the failed Job and builds again.
        kubelet = Kubelet(server, logs, jobs_namespace, never_start_once={"digits"})
        with running_operator(args, logs / "operator.log"), kubelet:
            server.create(edge_model("digits", MODELS, uri, digest, ["cpu-a"]))
            server.create(edge_model("wrong-digest", MODELS, uri, "0" * 64, ["cpu-a"]))  # its Job fails: deleted
            server.wait_for("edgemodels", "digits", lambda o: condition(o, "Published") == "True", MODELS, timeout=90)
            server.wait_for("edgemodels", "wrong-digest", lambda o: condition(o, "Stalled") == "True", MODELS, 90)
            model = server.get("edgemodels", "digits", MODELS)
            assert model is not None
            server.patch(
                "edgemodels", "digits", {"spec": {"targets": {"deviceClasses": ["cpu-a", "cpu-b"]}}}, namespace=MODELS
            )
            server.wait_for(
                "edgemodels", "digits",
                lambda o: {v["deviceClass"] for v in o.get("status", {}).get("variants", [])} == {"cpu-a", "cpu-b"},
                MODELS, timeout=90,
            )  # fmt: skip
            server.patch("deviceclasses", "cpu-b", {"spec": {"cpu": {"cores": 2}}})  # a re-plan: version 2
            server.wait_for(
                "edgemodels", "digits",
                lambda o: {v["deviceClass"]: v["version"] for v in o["status"]["variants"]}.get("cpu-b") == "2",
                MODELS, timeout=90,
            )  # fmt: skip
            server.delete("edgemodels", "digits", MODELS)
            server.wait_gone("edgemodels", "digits", MODELS, timeout=60)
        return server.audit_log()


def check(records: list[AuditRecord], rules: list[Rule]) -> None:
    resource_requests = [r for r in records if r.request.is_resource_request]
    others = [r.request for r in records if not r.request.is_resource_request]
    assert all(r.method == "GET" and r.path.startswith(DISCOVERY_PREFIXES) for r in others), others
    denied = sorted(
        {
            (r.request.verb, r.request.group, r.request.resource, r.request.subresource, r.request.namespace)
            for r in resource_requests
            if not any(rule.allows(r) for rule in rules)
        }
    )
    assert not denied, f"the chart's RBAC would refuse: {denied}"
    unused = sorted(
        (rule.namespace or "*", group, resource, verb)
        for rule in rules
        for group in rule.groups
        for resource in rule.resources
        for verb in rule.verbs
        if not any(
            Rule(rule.namespace, frozenset({group}), frozenset({resource}), frozenset({verb}), rule.names).allows(r)
            for r in resource_requests
        )
    )
    assert not unused, f"the chart grants what the operator never used: {unused}"


@pytest.mark.parametrize(
    ("values", "jobs_namespace"),
    [
        pytest.param(
            {"operator": {"replicas": 2, "buildMode": "jobs", "watch": {"allNamespaces": True}}},
            MODELS,
            id="all-namespaces-ha-jobs-in-model-namespaces",
        ),
        pytest.param(
            {
                "operator": {
                    "replicas": 2,
                    "buildMode": "jobs",
                    "watch": {"allNamespaces": False, "namespaces": [MODELS]},
                    "jobs": {"namespace": "edgefleet-jobs"},
                }
            },
            "edgefleet-jobs",
            id="listed-namespaces-ha-jobs-namespace",
        ),
    ],
)
def test_the_chart_grants_exactly_what_the_operator_calls(
    values: JsonObject, jobs_namespace: str, tmp_path: Path
) -> None:
    docs = render(values)
    rules = operator_rules(docs)
    assert rules, "the chart binds no rules to the operator"
    check(run_scenario(docs, tmp_path, jobs_namespace), rules)


def test_the_gateway_is_bound_to_nothing_and_gets_no_token() -> None:
    docs = render({})
    (gateway,) = [d for d in docs if d["kind"] == "Deployment" and "gateway" in d["metadata"]["name"]]
    pod = gateway["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert pod.get("automountServiceAccountToken") is False
    bound = [
        b for b in docs
        if b["kind"] in ("RoleBinding", "ClusterRoleBinding")
        and any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b.get("subjects", []))
    ]  # fmt: skip
    assert not bound, "the gateway never calls the Kubernetes API, so it is bound to no role"
