"""Schemas for the rendered kinds kubernetes-validate has none for (it ships only built-in kinds).

- kopf's peering objects (``kopf.dev/v1``): the CRDs the chart ships, from ``crds/kopf/``.
- Prometheus Operator's ServiceMonitor and PodMonitor (``monitoring.coreos.com/v1``): their CRDs
  are not available offline, so here is a strict subset written from the Prometheus Operator API
  reference (https://prometheus-operator.dev/docs/api-reference/api/): the fields the chart
  renders, with their types; any other field is refused, so a typo fails rather than passes.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft4Validator, Draft7Validator
from jsonschema.protocols import Validator

from tests.unit.helm.rendering import REPO_ROOT

JsonObject = dict[str, Any]

_STRING: JsonObject = {"type": "string"}
_STRING_MAP: JsonObject = {"type": "object", "additionalProperties": _STRING}
_DURATION: JsonObject = {
    "type": "string",
    "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_METADATA: JsonObject = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STRING, "namespace": _STRING, "labels": _STRING_MAP, "annotations": _STRING_MAP},
    "additionalProperties": False,
}
_LABEL_SELECTOR: JsonObject = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "additionalProperties": False,
                "properties": {"key": _STRING, "operator": _STRING, "values": {"type": "array", "items": _STRING}},
            },
        },
    },
}
_NAMESPACE_SELECTOR: JsonObject = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": _STRING}},
}
_ENDPOINT: JsonObject = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "port": _STRING,
        "path": _STRING,
        "scheme": {"enum": ["http", "https"]},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "honorLabels": {"type": "boolean"},
    },
}


def _monitor(kind: str, endpoints: str) -> JsonObject:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", endpoints],
                "additionalProperties": False,
                "properties": {
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": _NAMESPACE_SELECTOR,
                    "jobLabel": _STRING,
                    endpoints: {"type": "array", "minItems": 1, "items": _ENDPOINT},
                },
            },
        },
    }


PROMETHEUS_OPERATOR = {
    "ServiceMonitor": _monitor("ServiceMonitor", "endpoints"),
    "PodMonitor": _monitor("PodMonitor", "podMetricsEndpoints"),
}


def _custom_resource_schema(crd_path: Path) -> JsonObject:
    """A CRD's openAPIV3Schema made strict at the root, as the API server prunes and checks it."""
    crd = yaml.safe_load(crd_path.read_text(encoding="utf-8"))
    version = next(v for v in crd["spec"]["versions"] if v["storage"])
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    schema["properties"] = {
        **schema.get("properties", {}),
        "apiVersion": {"const": f"{crd['spec']['group']}/{version['name']}"},
        "kind": {"const": crd["spec"]["names"]["kind"]},
        "metadata": _METADATA,
    }
    schema["required"] = ["apiVersion", "kind", "metadata"]
    schema["additionalProperties"] = False
    return dict(schema)


@functools.cache
def validator(api_version: str, kind: str) -> Validator | None:
    """The validator for a kind kubernetes-validate does not know; ``None`` when we have none either."""
    if api_version == "kopf.dev/v1":
        path = REPO_ROOT / "crds" / "kopf" / f"{kind.lower()}s.kopf.dev.yaml"
        return Draft4Validator(_custom_resource_schema(path)) if path.exists() else None
    if api_version == "monitoring.coreos.com/v1" and kind in PROMETHEUS_OPERATOR:
        return Draft7Validator(PROMETHEUS_OPERATOR[kind])
    return None
