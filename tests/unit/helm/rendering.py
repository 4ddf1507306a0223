"""Rendering the chart offline (helm-python-sdk, no helm binary) and reading what it rendered."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
CHART_DIR = REPO_ROOT / "helm" / "edgefleet"
CI_VALUES = sorted((CHART_DIR / "ci").glob("*-values.yaml"))
DASHBOARD = CHART_DIR / "dashboards" / "edgefleet.json"
RELEASE = "ef"
NAMESPACE = "edgefleet-system"
NOTES = "edgefleet/templates/NOTES.txt"
POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}

JsonObject = dict[str, Any]


@functools.cache
def chart() -> helm_python.Chart:
    helm_python.disable_logging()  # the Go logger's INFO lines (it follows the crds link) are noise here
    return helm_python.Chart.load(CHART_DIR)


def ci_values(path: Path) -> JsonObject:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    assert isinstance(loaded, dict), path
    return loaded


def without_dashboard(values: JsonObject) -> JsonObject:
    """``values`` with the Grafana dashboard off while dashboards/edgefleet.json does not exist yet."""
    if DASHBOARD.exists():
        return values
    monitoring = dict(values.get("monitoring", {}))
    monitoring["grafanaDashboard"] = {**monitoring.get("grafanaDashboard", {}), "enabled": False}
    return {**values, "monitoring": monitoring}


@dataclass(frozen=True)
class Rendered:
    """One render: the manifests (every YAML document of every template) and NOTES.txt."""

    documents: tuple[JsonObject, ...]
    notes: str

    def of_kind(self, kind: str) -> list[JsonObject]:
        return [d for d in self.documents if d["kind"] == kind]

    def one(self, kind: str, name: str, namespace: str | None = NAMESPACE) -> JsonObject:
        found = [
            d
            for d in self.of_kind(kind)
            if d["metadata"]["name"] == name and d["metadata"].get("namespace") == namespace
        ]
        assert len(found) == 1, f"{kind} {namespace}/{name}: {len(found)} rendered"
        return found[0]

    def container(self, kind: str, name: str, container: str, namespace: str = NAMESPACE) -> JsonObject:
        spec = pod_spec(self.one(kind, name, namespace))
        (found,) = [c for c in spec["containers"] if c["name"] == container]
        return dict(found)


def render(values: Mapping[str, Any] | None = None, *, namespace: str = NAMESPACE) -> Rendered:
    """Render like ``helm template`` (helm splits templates into documents the same way)."""
    manifests = chart().render(dict(values or {}), name=RELEASE, namespace=namespace)
    documents: list[JsonObject] = []
    for filename, text in sorted(manifests.items()):
        if filename.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document is None:  # an empty template, or a `---` between nothing
                continue
            assert isinstance(document, dict), f"{filename}: not a mapping"
            documents.append(document)
    return Rendered(tuple(documents), manifests.get(NOTES, ""))


def pod_spec(workload: Mapping[str, Any]) -> JsonObject:
    return dict(workload["spec"]["template"]["spec"])


def pod_specs(rendered: Rendered) -> Iterator[tuple[str, JsonObject]]:
    """Every pod template rendered, as ("Kind namespace/name", spec)."""
    for document in rendered.documents:
        if document["kind"] in POD_OWNERS:
            meta = document["metadata"]
            yield f"{document['kind']} {meta.get('namespace')}/{meta['name']}", pod_spec(document)


def args_of(container: Mapping[str, Any]) -> dict[str, list[str]]:
    """``--flag=value`` arguments by flag (a flag without ``=`` maps to ``[""]``)."""
    out: dict[str, list[str]] = {}
    for arg in container.get("args", []):
        if arg.startswith("--"):
            flag, _, value = arg.partition("=")
            out.setdefault(flag, []).append(value)
    return out
