"""The Helm chart renders valid, restricted manifests for every values file, and its schema refuses bad values.

No helm binary and no cluster: helm-python-sdk renders and lints (Helm's own Go code through its
C ABI), kubernetes-validate checks each manifest against the upstream OpenAPI schemas in strict
mode, and kinds it has no schema for are checked against tests/unit/helm/custom_schemas.py.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import typer
import yaml

from edgefleet_core.cli.main import build_app
from tests.support.pod_security import restricted_violations
from tests.unit.helm.custom_schemas import validator
from tests.unit.helm.rendering import (
    CHART_DIR,
    CI_VALUES,
    DASHBOARD,
    NAMESPACE,
    REPO_ROOT,
    Rendered,
    args_of,
    chart,
    ci_values,
    pod_specs,
    render,
    without_dashboard,
)

JsonObject = dict[str, Any]
CASES = {"defaults": {}, **{p.name.removesuffix("-values.yaml"): ci_values(p) for p in CI_VALUES}}
KUBE_VERSION = kubernetes_validate.latest_version()


@pytest.fixture(scope="module", params=sorted(CASES), ids=str)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return render(without_dashboard(CASES[request.param]))


def test_the_ci_values_files_cover_what_the_issue_asks_for() -> None:
    assert {
        "external-minio",
        "bundled-minio",
        "monitoring-on",
        "agents-daemonset",
        "jobs-mode",
        "ha-replicas",
    } <= set(CASES)


def test_app_version_is_the_package_version() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert chart().metadata["appVersion"] == pyproject["project"]["version"]
    assert chart().metadata["apiVersion"] == "v2"


# ---------------------------------------------------------------------------------- validity


def validation_problems(document: Mapping[str, Any]) -> list[str]:
    """Why the API server would refuse ``document`` (strict: unknown fields are errors)."""
    custom = validator(document["apiVersion"], document["kind"])
    if custom is not None:
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in custom.iter_errors(document)]
    try:
        kubernetes_validate.validate(dict(document), KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.absolute_path))}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {document['apiVersion']} {document['kind']}: add one to custom_schemas.py"]
    return []


def test_every_manifest_passes_strict_validation(rendered: Rendered) -> None:
    assert rendered.documents
    problems = {
        f"{d['kind']} {d['metadata'].get('namespace')}/{d['metadata']['name']}": validation_problems(d)
        for d in rendered.documents
    }
    assert {k: v for k, v in problems.items() if v} == {}


@pytest.mark.parametrize(
    ("kind", "api_version"),
    [
        ("Deployment", "apps/v1"),
        ("ServiceMonitor", "monitoring.coreos.com/v1"),
        ("ClusterKopfPeering", "kopf.dev/v1"),
    ],
)
def test_validation_refuses_an_unknown_field(kind: str, api_version: str) -> None:
    values = {**CASES["ha-replicas"], **CASES["monitoring-on"]}
    document = copy.deepcopy(next(d for d in render(without_dashboard(values)).documents if d["kind"] == kind))
    assert document["apiVersion"] == api_version
    assert validation_problems(document) == []
    document["spec" if "spec" in document else "metadata"]["bogusField"] = 1
    assert validation_problems(document)


def test_an_unknown_kind_is_a_problem_not_a_pass() -> None:
    document = {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g"}}
    assert validation_problems(document) == ["no schema for example.com/v1 Gadget: add one to custom_schemas.py"]


def test_names_are_unique(rendered: Rendered) -> None:
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in rendered.documents]
    assert len(keys) == len(set(keys))


def test_lint_is_clean() -> None:
    for values in CASES.values():
        report = helm_python.lint(CHART_DIR, without_dashboard(values), strict=True, namespace=NAMESPACE)
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == []


# ---------------------------------------------------------------------------------- pod security


# The agent keeps its device identity on a hostPath (see templates/agents.yaml), and a root init
# container with CAP_CHOWN hands the folder to the agent user: the only exceptions, and only there.
AGENT_EXCEPTIONS = [
    "volume state: ['hostPath']",
    "container prepare-state: adds capabilities",
    "container prepare-state: runs as root",
]


def test_every_pod_is_restricted(rendered: Rendered) -> None:
    checked = 0
    for where, spec in pod_specs(rendered):
        agent = spec["containers"][0]["name"] == "agent"
        assert restricted_violations(spec) == (AGENT_EXCEPTIONS if agent else []), where
        assert all("/tmp" in [m["mountPath"] for m in c.get("volumeMounts", [])] for c in spec["containers"]), where
        checked += 1
    assert checked >= 2


def test_the_restricted_check_finds_violations() -> None:
    (_, spec), *_ = pod_specs(render())
    assert restricted_violations(spec) == []
    broken = copy.deepcopy(spec)
    broken["hostNetwork"] = True
    broken["containers"][0]["securityContext"]["privileged"] = True
    broken["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    del broken["securityContext"]["seccompProfile"]
    assert restricted_violations(broken) == [
        "pod: hostNetwork",
        "pod: seccompProfile is not RuntimeDefault",
        f"container {spec['containers'][0]['name']}: privileged",
        f"container {spec['containers'][0]['name']}: root filesystem is writable",
    ]


# ---------------------------------------------------------------------------------- CRDs


def test_the_chart_crds_are_the_repository_crds() -> None:
    link = CHART_DIR / "crds"
    assert link.is_symlink()
    assert link.resolve() == (REPO_ROOT / "crds").resolve()
    shipped = {c["name"].removeprefix("crds/"): c["data"] for c in chart().crds}
    on_disk = {
        str(p.relative_to(REPO_ROOT / "crds")): p.read_text(encoding="utf-8")
        for p in sorted((REPO_ROOT / "crds").rglob("*.yaml"))
    }
    assert shipped == on_disk
    assert {"kopf/clusterkopfpeerings.kopf.dev.yaml", "kopf/kopfpeerings.kopf.dev.yaml"} <= set(shipped)


def test_the_peering_crds_are_what_operator_crds_prints() -> None:
    from typer.testing import CliRunner

    from edgefleet_operator.operator_cli import app

    printed = list(yaml.safe_load_all(CliRunner().invoke(app, ["crds", "--peering"]).stdout))
    peering = {d["metadata"]["name"]: d for d in printed if d["spec"]["group"] == "kopf.dev"}
    for name, crd in peering.items():
        assert yaml.safe_load((REPO_ROOT / "crds" / "kopf" / f"{name}.yaml").read_text(encoding="utf-8")) == crd
    assert len(peering) == 2


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "crds").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_crds_are_valid(path: Path) -> None:
    assert validation_problems(yaml.safe_load(path.read_text(encoding="utf-8"))) == []


# ---------------------------------------------------------------------------------- the commands


def _edgefleet_options(*command: str) -> set[str]:
    group = typer.main.get_command(build_app())
    for name in command:
        group = group.commands[name]  # type: ignore[attr-defined]
    return {opt for param in group.params for opt in param.opts}


def test_every_flag_the_chart_passes_exists(rendered: Rendered) -> None:
    for where, spec in pod_specs(rendered):
        for container in spec["containers"]:
            if container.get("command") != ["edgefleet"]:
                continue
            command = [a for a in container["args"][:2] if not a.startswith("-")]
            unknown = set(args_of(container)) - _edgefleet_options(*command)
            assert unknown == set(), f"{where}: edgefleet {' '.join(command)} has no {sorted(unknown)}"


# ---------------------------------------------------------------------------------- values schema

BAD_VALUES: dict[str, tuple[JsonObject, str]] = {
    "unknown top-level key": ({"operatr": {}}, "additional properties 'operatr' not allowed"),
    "unknown nested key": ({"gateway": {"replica": 2}}, "additional properties 'replica' not allowed"),
    "build mode": ({"operator": {"buildMode": "threads"}}, "/operator/buildMode"),
    "job memory unit": (
        {"operator": {"jobs": {"resources": {"cpu": "1", "memory": "4GB"}}}},
        "/operator/jobs/resources/memory",
    ),
    "zero replicas": ({"operator": {"replicas": 0}}, "/operator/replicas"),
    "replicas as text": ({"gateway": {"replicas": "2"}}, "/gateway/replicas"),
    "service type": ({"gateway": {"service": {"type": "Ingress"}}}, "/gateway/service/type"),
    "root user": ({"podSecurity": {"runAsUser": 0}}, "/podSecurity/runAsUser"),
    "keys twice": ({"signingKeys": {"data": {"keys.json": "e30="}}}, "/signingKeys/existingSecret"),
    "no keys": ({"signingKeys": {"existingSecret": ""}}, "/signingKeys/existingSecret"),
    "pki twice": ({"gateway": {"pki": {"files": {"caPem": "x"}}}}, "/gateway/pki/files/caPem"),
    "pki half created": (
        {"gateway": {"pki": {"existingSecret": "", "files": {"caPem": "x"}}}},
        "/gateway/pki/files/serverPem",
    ),
    "s3 credentials twice": ({"store": {"credentials": {"accessKeyId": "a"}}}, "/store/credentials/accessKeyId"),
    "no namespaces": ({"operator": {"watch": {"allNamespaces": False}}}, "/operator/watch/namespaces"),
    "namespaces with all": ({"operator": {"watch": {"namespaces": ["a"]}}}, "/operator/watch/namespaces"),
    "bad namespace": (
        {"operator": {"watch": {"allNamespaces": False, "namespaces": ["Vision_1"]}}},
        "/operator/watch/namespaces/0",
    ),
    "endpoint with bundled minio": (
        {"minio": {"enabled": True}, "store": {"endpoint": "https://s3.example.com"}},
        "/store/endpoint",
    ),
    "endpoint with a path": ({"store": {"endpoint": "https://s3.example.com/bucket"}}, "/store/endpoint"),
    "agents without classes": (
        {"agents": {"enabled": True, "trust": {"existingConfigMap": "t"}}},
        "/agents/classes",
    ),
    "agents without trust": (
        {"agents": {"enabled": True, "classes": [{"deviceClass": "c", "selector": {"matchLabels": {"a": "b"}}}]}},
        "/agents/trust/rootJson",
    ),
    "agent class without selector": (
        {"agents": {"classes": [{"deviceClass": "c", "selector": {}}]}},
        "/agents/classes/0/selector",
    ),
    "bad selector operator": (
        {
            "agents": {
                "classes": [{"deviceClass": "c", "selector": {"matchExpressions": [{"key": "k", "operator": "Gt"}]}}]
            }
        },
        "/agents/classes/0/selector/matchExpressions/0/operator",
    ),
    "bad scrape interval": (
        {"monitoring": {"serviceMonitor": {"interval": "often"}}},
        "/monitoring/serviceMonitor/interval",
    ),
    "bad image digest": ({"operator": {"image": {"digest": "latest"}}}, "/operator/image/digest"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES), ids=str)
def test_the_schema_refuses_bad_values_naming_them(case: str) -> None:
    values, named = BAD_VALUES[case]
    with pytest.raises(helm_python.HelmValuesError) as refused:
        chart().validate_schema(chart().merge_values(values))
    assert named in str(refused.value)
    with pytest.raises(helm_python.HelmValuesError):  # and so does rendering
        render(values)


def test_every_ci_values_file_passes_the_schema() -> None:
    for _name, values in CASES.items():
        chart().validate_schema(chart().merge_values(values))  # raises naming the value at fault


def test_the_schema_is_draft_07_and_closed() -> None:
    schema = chart().schema
    assert schema is not None
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) - {"global"} == set(chart().values)


def test_the_readme_lists_every_value() -> None:
    readme = (CHART_DIR / "README.md").read_text(encoding="utf-8")

    def leaves(values: Mapping[str, Any], prefix: str = "") -> list[str]:
        out: list[str] = []
        for key, value in values.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and value and key not in {"requests", "limits", "nodePorts", "files", "to"}:
                out += leaves(value, f"{path}.")
            else:
                out.append(path)
        return out

    missing = [path for path in leaves(chart().values) if f"`{path}`" not in readme]
    assert missing == []


# ---------------------------------------------------------------------------------- NOTES


def test_notes_tell_what_to_apply_next() -> None:
    notes = render().notes
    for step in (
        "edgefleet keys secret",
        "edgefleet gateway pki secret",
        "edgefleet keys root",
        "kubectl apply -f examples/deviceclass-edge-cpu.yaml",
        "11. First model",  # where an EdgeModel with a source in the store comes from
        "edgefleet gateway token create",
        "pod-security.kubernetes.io/enforce=restricted",
        "agents.enabled=true",
    ):
        assert step in notes, step


def test_notes_for_agents_name_each_token_secret() -> None:
    notes = render(CASES["agents-daemonset"]).notes
    assert "create secret generic ef-edgefleet-agent-token-edge-cpu" in notes
    assert "create secret generic jetson-bootstrap" in notes
    assert "pod-security.kubernetes.io/enforce=privileged" in notes


# ---------------------------------------------------------------------------------- dashboard


def test_the_dashboard_ships_in_a_configmap_for_grafana() -> None:
    if not DASHBOARD.exists():
        pytest.skip("helm/edgefleet/dashboards/edgefleet.json is not there yet (another change adds it)")
    rendered = render(CASES["monitoring-on"])
    configmap = rendered.one("ConfigMap", "ef-edgefleet-dashboard", "monitoring")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"]["edgefleet.json"] == DASHBOARD.read_text(encoding="utf-8")


def test_jobs_everywhere_with_chart_made_credentials_is_refused_naming_the_fix() -> None:
    made = {"store": {"credentials": {"existingSecret": "", "accessKeyId": "a", "secretAccessKey": "b"}}}
    with pytest.raises(helm_python.HelmRenderError, match=r"operator\.jobs\.namespace: set it"):
        render({**made, "operator": {"buildMode": "jobs"}})
    # With the Jobs in one namespace the chart puts the credentials there too.
    rendered = render({**made, "operator": {"buildMode": "jobs", "jobs": {"namespace": "builds"}}})
    secrets = [d for d in rendered.documents if d["kind"] == "Secret" and "s3" in d["metadata"]["name"]]
    assert {s["metadata"]["namespace"] for s in secrets} == {NAMESPACE, "builds"}
