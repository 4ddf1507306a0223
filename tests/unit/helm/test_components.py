"""What the chart wires together: least-privilege RBAC per watch scope, peering, secrets, store, agents."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from tests.unit.helm.rendering import CI_VALUES, NAMESPACE, Rendered, args_of, ci_values, pod_spec, render

JsonObject = dict[str, Any]
CASES = {p.name.removesuffix("-values.yaml"): ci_values(p) for p in CI_VALUES}
OPERATOR = "ef-edgefleet-operator"
GATEWAY = "ef-edgefleet-gateway"

# A rule as (namespace or None for the ClusterRole, apiGroup, resource, verb, resourceNames).
Rule = tuple[str | None, str, str, str, tuple[str, ...]]


def rules(rendered: Rendered) -> set[Rule]:
    """Every permission the operator's ClusterRole and Roles grant, one verb at a time."""
    out: set[Rule] = set()
    for role in rendered.of_kind("ClusterRole") + rendered.of_kind("Role"):
        namespace = role["metadata"].get("namespace")
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        out.add((namespace, group, resource, verb, tuple(rule.get("resourceNames", ()))))
    return out


def grants(namespace: str | None, group: str, resource: str, *verbs: str, names: tuple[str, ...] = ()) -> set[Rule]:
    return {(namespace, group, resource, verb, names) for verb in verbs}


# What the operator calls, recorded from its requests to the test API server (kopf 1.45.2 against
# edgefleet_operator.devtools.kube_api, whose audit log has the real server's RequestInfo) and, for
# Jobs, read from edgefleet_operator/jobs/kube.py.
ALWAYS = grants(None, "apiextensions.k8s.io", "customresourcedefinitions", "list", "watch") | grants(
    None, "edgefleet.io", "deviceclasses", "list", "watch"
)


def served(namespace: str | None) -> set[Rule]:
    return (
        grants(namespace, "edgefleet.io", "edgemodels", "list", "watch", "patch")
        | grants(namespace, "edgefleet.io", "edgemodels/status", "patch")
        | grants(namespace, "", "events", "create")
    )


def peering(namespace: str | None, name: str) -> set[Rule]:
    plural = "clusterkopfpeerings" if namespace is None else "kopfpeerings"
    return grants(namespace, "kopf.dev", plural, "list", "watch") | grants(
        namespace, "kopf.dev", plural, "patch", names=(name,)
    )


def jobs(namespace: str | None, *, own_namespace: bool) -> set[Rule]:
    """get/create a model's Job, delete a failed one; list only where the Jobs live apart from their models."""
    listed = ("list",) if own_namespace else ()
    return grants(namespace, "batch", "jobs", "get", "create", "delete", *listed)


NAMESPACES = grants(None, "", "namespaces", "list", "watch")

EXPECTED_RULES: dict[str, tuple[JsonObject, set[Rule]]] = {
    "all namespaces, standalone": ({}, ALWAYS | served(None)),
    "all namespaces, peering": (CASES["ha-replicas"], ALWAYS | served(None) | peering(None, "edgefleet-prod")),
    "all namespaces, jobs in the models' namespaces": (
        {"operator": {"buildMode": "jobs"}},
        ALWAYS | served(None) | jobs(None, own_namespace=False),
    ),
    "all namespaces, jobs in one namespace": (
        {"operator": {"buildMode": "jobs", "jobs": {"namespace": "builds"}}},
        ALWAYS | served(None) | jobs("builds", own_namespace=True),
    ),
    "two namespaces, peering, jobs in one namespace": (
        CASES["jobs-mode"],
        ALWAYS
        | NAMESPACES
        | served("vision")
        | served("retail")
        | peering("vision", "edgefleet")
        | peering("retail", "edgefleet")
        | jobs("edgefleet-builds", own_namespace=True),
    ),
    "one namespace, standalone, jobs in the models' namespaces": (
        {"operator": {"buildMode": "jobs", "watch": {"allNamespaces": False, "namespaces": ["vision"]}}},
        ALWAYS | NAMESPACES | served("vision") | jobs("vision", own_namespace=False),
    ),
}


@pytest.mark.parametrize("case", sorted(EXPECTED_RULES), ids=str)
def test_rbac_grants_exactly_what_the_operator_calls(case: str) -> None:
    values, expected = EXPECTED_RULES[case]
    rendered = render(values)
    assert rules(rendered) == expected
    for role in rendered.of_kind("ClusterRole") + rendered.of_kind("Role"):
        for rule in role["rules"]:
            assert "*" not in [*rule["apiGroups"], *rule["resources"], *rule["verbs"]], role["metadata"]["name"]
    # Every role is bound to the operator's ServiceAccount, and to nothing else.
    bindings = rendered.of_kind("ClusterRoleBinding") + rendered.of_kind("RoleBinding")
    assert {(b["roleRef"]["kind"], b["metadata"].get("namespace"), b["roleRef"]["name"]) for b in bindings} == {
        (r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"])
        for r in rendered.of_kind("ClusterRole") + rendered.of_kind("Role")
    }
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": NAMESPACE}]


def test_without_rbac_create_no_roles_are_rendered() -> None:
    rendered = render({"operator": {"rbac": {"create": False}}})
    assert rules(rendered) == set()


def test_the_gateway_has_no_rules_and_no_token() -> None:
    rendered = render(CASES["ha-replicas"])
    account = rendered.one("ServiceAccount", GATEWAY)
    assert account["automountServiceAccountToken"] is False
    assert pod_spec(rendered.one("Deployment", GATEWAY))["automountServiceAccountToken"] is False
    subjects = [
        s for b in rendered.of_kind("ClusterRoleBinding") + rendered.of_kind("RoleBinding") for s in b["subjects"]
    ]
    assert all(s["name"] != GATEWAY for s in subjects)
    # Only the operator's pod mounts a token.
    for document in rendered.documents:
        if document["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            mounted = pod_spec(document).get("automountServiceAccountToken")
            assert mounted is (document["metadata"]["name"] == OPERATOR), document["metadata"]["name"]


# ---------------------------------------------------------------------------------- operator


def _operator_args(rendered: Rendered) -> dict[str, list[str]]:
    return args_of(rendered.container("Deployment", OPERATOR, "operator"))


def test_one_replica_runs_standalone_without_a_peering_object() -> None:
    rendered = render()
    args = _operator_args(rendered)
    assert "--standalone" in args
    assert "--peering" not in args
    assert args["--all-namespaces"] == [""]
    assert rendered.one("Deployment", OPERATOR)["spec"]["strategy"]["type"] == "Recreate"
    assert not rendered.of_kind("ClusterKopfPeering") + rendered.of_kind("KopfPeering")
    assert not rendered.of_kind("PodDisruptionBudget") or all(
        p["metadata"]["name"] != OPERATOR for p in rendered.of_kind("PodDisruptionBudget")
    )


def test_replicas_share_a_peering_object_matching_the_watch_scope() -> None:
    cluster = render(CASES["ha-replicas"])
    assert _operator_args(cluster)["--peering"] == ["edgefleet-prod"]
    assert [p["metadata"]["name"] for p in cluster.of_kind("ClusterKopfPeering")] == ["edgefleet-prod"]
    assert cluster.one("PodDisruptionBudget", OPERATOR)["spec"]["maxUnavailable"] == 1
    namespaced = render(CASES["jobs-mode"])
    args = _operator_args(namespaced)
    assert args["--namespace"] == ["vision", "retail"]
    assert "--all-namespaces" not in args
    assert {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in namespaced.of_kind("KopfPeering")} == {
        ("vision", "edgefleet"),
        ("retail", "edgefleet"),
    }
    assert not namespaced.of_kind("ClusterKopfPeering")


def test_jobs_mode_passes_the_job_settings_and_makes_their_account_and_credentials() -> None:
    rendered = render(CASES["jobs-mode"])
    args = _operator_args(rendered)
    assert args["--build-mode"] == ["jobs"]
    assert args["--job-image"] == ["ghcr.io/edgefleet/operator:0.1.0"]
    assert args["--job-namespace"] == ["edgefleet-builds"]
    assert args["--job-service-account"] == ["ef-edgefleet-pipeline"]
    assert args["--job-s3-secret"] == ["ef-edgefleet-s3-credentials"]
    account = rendered.one("ServiceAccount", "ef-edgefleet-pipeline", "edgefleet-builds")
    assert account["automountServiceAccountToken"] is False
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    # The Jobs read the credentials from their own namespace.
    rendered.one("Secret", "ef-edgefleet-s3-credentials", "edgefleet-builds")
    assert "--job-image" not in _operator_args(render())


def test_the_operator_probes_metrics_and_writable_paths() -> None:
    rendered = render()
    container = rendered.container("Deployment", OPERATOR, "operator")
    args = args_of(container)
    assert args["--liveness"] == ["http://0.0.0.0:8080/healthz"]
    assert args["--metrics-listen"] == ["0.0.0.0:9090"]
    assert args["--identity"] == ["$(POD_NAME)"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"healthz": 8080, "metrics": 9090}
    assert {m["mountPath"] for m in container["volumeMounts"]} == {
        "/etc/edgefleet/keys",
        "/tmp",
        "/var/cache/edgefleet",
    }


# ---------------------------------------------------------------------------------- gateway


def test_the_gateway_replica_id_is_the_pod_name_and_probes_avoid_grpc() -> None:
    container = render().container("Deployment", GATEWAY, "gateway")
    args = args_of(container)
    assert args["--replica-id"] == ["$(POD_NAME)"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert args["--metrics-listen"] == ["0.0.0.0:9091"]
    assert container["readinessProbe"]["tcpSocket"] == {"port": "fleet"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert all("grpc" not in container[p] for p in ("readinessProbe", "livenessProbe"))
    without_metrics = render({"gateway": {"metrics": {"enabled": False}}}).container("Deployment", GATEWAY, "gateway")
    assert without_metrics["livenessProbe"]["tcpSocket"] == {"port": "enroll"}


def test_the_gateway_service_exposes_fleet_and_enrollment_only() -> None:
    service = render(CASES["ha-replicas"]).one("Service", GATEWAY)
    assert service["spec"]["type"] == "NodePort"
    assert {p["name"]: (p["port"], p.get("nodePort")) for p in service["spec"]["ports"]} == {
        "tls-fleet": (7443, 30743),
        "tls-enroll": (7444, 30744),
    }
    balanced = render(CASES["agents-daemonset"]).one("Service", GATEWAY)
    assert balanced["spec"]["type"] == "LoadBalancer"
    assert balanced["spec"]["externalTrafficPolicy"] == "Local"


# ---------------------------------------------------------------------------------- secrets and store


def _env(container: Mapping[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_existing_secrets_are_referenced_and_none_is_created() -> None:
    rendered = render(CASES["external-minio"])
    assert rendered.of_kind("Secret") == []
    operator = rendered.container("Deployment", OPERATOR, "operator")
    volumes = {v["name"]: v for v in pod_spec(rendered.one("Deployment", OPERATOR))["volumes"]}
    assert volumes["signing-keys"]["secret"]["secretName"] == "edgefleet-signing-keys"
    gateway_volumes = {v["name"]: v for v in pod_spec(rendered.one("Deployment", GATEWAY))["volumes"]}
    assert gateway_volumes["pki"]["secret"]["secretName"] == "edgefleet-gateway-pki"
    env = _env(operator)
    assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"] == {"name": "minio-edgefleet", "key": "AWS_ACCESS_KEY_ID"}
    assert env["AWS_ENDPOINT_URL"] == "https://minio.storage.svc.cluster.local:9000"
    assert env["AWS_REGION"] == "us-east-1"
    args = args_of(operator)
    assert args["--store"] == ["s3://edgefleet-artifacts/fleet/prod"]
    assert args["--endpoint"] == ["https://minio.storage.svc.cluster.local:9000"]  # passed on to pipeline Jobs
    assert _env(rendered.container("Deployment", GATEWAY, "gateway"))["AWS_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"]


def test_created_secrets_have_the_cli_layouts() -> None:
    values = CASES["bundled-minio"]
    rendered = render(values)
    keys = rendered.one("Secret", "ef-edgefleet-signing-keys")
    assert keys["data"] == values["signingKeys"]["data"]  # what `edgefleet keys secret` prints as data
    pki = rendered.one("Secret", "ef-edgefleet-gateway-pki")
    assert set(pki["data"]) == {"ca.pem", "ca-key.pem", "server.pem", "server-key.pem"}
    credentials = rendered.one("Secret", "ef-edgefleet-s3-credentials")
    assert set(credentials["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_the_bundled_minio_is_wired_in_automatically() -> None:
    rendered = render(CASES["bundled-minio"])
    minio = rendered.one("StatefulSet", "ef-edgefleet-minio")
    assert minio["spec"]["replicas"] == 1
    image = pod_spec(minio)["containers"][0]["image"]
    assert image.startswith("quay.io/minio/minio:RELEASE.")
    assert not image.endswith(":latest")
    endpoint = f"http://ef-edgefleet-minio.{NAMESPACE}.svc:9000"
    for name, container in ((OPERATOR, "operator"), (GATEWAY, "gateway")):
        env = _env(rendered.container("Deployment", name, container))
        assert env["AWS_ENDPOINT_URL"] == endpoint
        assert env["AWS_SECRET_ACCESS_KEY"]["secretKeyRef"]["name"] == "ef-edgefleet-s3-credentials"
    root = _env(pod_spec(minio)["containers"][0])
    assert root["MINIO_ROOT_PASSWORD"]["secretKeyRef"]["name"] == "ef-edgefleet-s3-credentials"
    bucket = rendered.one("Job", "ef-edgefleet-minio-bucket-1")
    # Not a hook: hooks wait for every resource to be ready, and the operator waits for the bucket.
    assert not any(key.startswith("helm.sh/hook") for key in bucket["metadata"].get("annotations", {}))
    policy = rendered.one("NetworkPolicy", "ef-edgefleet-minio")
    assert [p["port"] for p in policy["spec"]["ingress"][0]["ports"]] == ["s3"]


def test_network_policies_admit_devices_and_restrict_egress() -> None:
    rendered = render(CASES["bundled-minio"])
    gateway = rendered.one("NetworkPolicy", GATEWAY)
    assert gateway["spec"]["policyTypes"] == ["Ingress", "Egress"]
    ports = {p["port"] for rule in gateway["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {"fleet", "enroll", "metrics"}
    operator = rendered.one("NetworkPolicy", OPERATOR)
    egress_ports = {p["port"] for rule in operator["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 9000, 443, 6443}
    assert {p["port"] for rule in operator["spec"]["ingress"] for p in rule["ports"]} == {"metrics"}

    # Sources outside the store (https:// model URIs) get a rule only when their peers are named.
    assert not any(r.get("to") == [{"ipBlock": {"cidr": "203.0.113.0/24"}}] for r in operator["spec"]["egress"])
    sources = {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}], "ports": [{"port": 8443, "protocol": "TCP"}]}
    values = {**CASES["bundled-minio"]}
    values["networkPolicy"] = {
        **values["networkPolicy"],
        "egress": {**values["networkPolicy"]["egress"], "sources": sources},
    }
    operator = render(values).one("NetworkPolicy", OPERATOR)
    assert {"ports": sources["ports"], "to": sources["to"]} in operator["spec"]["egress"]


# ---------------------------------------------------------------------------------- agents


def test_one_agent_daemonset_per_device_class_on_its_nodes() -> None:
    rendered = render(CASES["agents-daemonset"])
    sets = {d["metadata"]["name"]: d for d in rendered.of_kind("DaemonSet")}
    assert set(sets) == {"ef-edgefleet-agent-edge-cpu", "ef-edgefleet-agent-jetson-gpu"}
    cpu, jetson = pod_spec(sets["ef-edgefleet-agent-edge-cpu"]), pod_spec(sets["ef-edgefleet-agent-jetson-gpu"])
    assert all(d["metadata"]["namespace"] == "edgefleet-agents" for d in sets.values())
    assert cpu["nodeSelector"] == {"edgefleet.io/hardware": "edge-cpu"}
    assert "affinity" not in cpu
    terms = jetson["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "Exists"}]}]
    agent = next(c for c in cpu["containers"] if c["name"] == "agent")
    args = args_of(agent)
    assert args["--name"] == ["$(NODE_NAME)"]
    assert _env(agent)["NODE_NAME"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert args["--gateway"] == ["gateway.edgefleet.example.com:7443"]
    assert args["--enroll-gateway"] == ["gateway.edgefleet.example.com:7444"]
    assert args["--label"] == ["edgefleet.io/hardware=edge-cpu"]
    assert args["--metrics-listen"] == ["0.0.0.0:9092"]
    assert agent["image"] == "ghcr.io/edgefleet/agent:0.1.0"
    token = _env(agent)["EDGEFLEET_AGENT_TOKEN"]["secretKeyRef"]
    assert token == {"name": "ef-edgefleet-agent-token-edge-cpu", "key": "token", "optional": True}
    assert (
        _env(next(c for c in jetson["containers"] if c["name"] == "agent"))["EDGEFLEET_AGENT_TOKEN"]["secretKeyRef"][
            "name"
        ]
        == "jetson-bootstrap"
    )
    # Identity survives pod restarts: the state folder is on the node, one per class.
    volumes = {v["name"]: v for v in cpu["volumes"]}
    assert volumes["state"]["hostPath"] == {"path": "/var/lib/edgefleet/edge-cpu", "type": "DirectoryOrCreate"}
    trust = rendered.one("ConfigMap", "ef-edgefleet-agent-trust", "edgefleet-agents")
    assert set(trust["data"]) == {"root.json", "ca.pem"}
    assert volumes["trust"]["configMap"]["name"] == "ef-edgefleet-agent-trust"
    monitor = rendered.one("PodMonitor", "ef-edgefleet-agent", "edgefleet-agents")
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_agents_default_to_the_gateway_service_inside_the_cluster() -> None:
    values = {
        "agents": {
            "enabled": True,
            "trust": {"existingConfigMap": "fleet-trust"},
            "classes": [{"deviceClass": "edge-cpu", "selector": {"matchLabels": {"hw": "cpu"}}}],
        }
    }
    rendered = render(values)
    (daemonset,) = rendered.of_kind("DaemonSet")
    agent = next(c for c in pod_spec(daemonset)["containers"] if c["name"] == "agent")
    assert args_of(agent)["--gateway"] == [f"{GATEWAY}.{NAMESPACE}.svc:7443"]
    assert not rendered.of_kind("ConfigMap")
    assert {v["name"]: v for v in pod_spec(daemonset)["volumes"]}["trust"]["configMap"]["name"] == "fleet-trust"
