"""The pydantic models and the CRDs say the same thing, and both refuse the invalid examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from edgefleet_core.errors import FieldProblem, ResourceError
from edgefleet_core.resources import (
    MODELS,
    DeviceClass,
    EdgeModel,
    apply_defaults,
    custom_resource_definitions,
    model_problems,
    parse_resource,
    read_documents,
    schema_problems,
)
from tests.support.cel import cel_problems
from tests.support.schema_compare import compare

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
VALID = sorted((EXAMPLES / "valid").glob("*.yaml"))
INVALID = sorted((EXAMPLES / "invalid").glob("*.yaml"))


def _expected_field(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect-invalid: "), f"{path.name} must start with '# expect-invalid: FIELD'"
    return first.removeprefix("# expect-invalid: ").strip()


def _names(problems: list[FieldProblem], field: str) -> bool:
    """A problem names ``field`` when it is about that field or something inside it."""
    return any(p.field == field or p.field.startswith((f"{field}.", f"{field}[")) for p in problems)


def _api_server_problems(kind: str, body: dict[str, Any]) -> list[FieldProblem]:
    """What the API server refuses: the OpenAPI schema first, then CEL on the defaulted object."""
    return schema_problems(kind, body) or cel_problems(
        custom_resource_definitions()[kind].schema, apply_defaults(kind, body)
    )


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_model_and_crd_schema_agree(kind: str) -> None:
    crd_schema = custom_resource_definitions()[kind].schema
    model_schema = MODELS[kind].model_json_schema(by_alias=True, mode="validation")
    defs = model_schema.get("$defs", {})
    diffs: list[str] = []
    for part in ("spec", "status"):
        diffs += compare(crd_schema["properties"][part], model_schema["properties"][part], defs, part)
    assert set(crd_schema["properties"]) == set(model_schema["properties"])
    assert diffs == [], "\n".join(diffs)


def test_comparison_catches_a_field_missing_from_the_model() -> None:
    # The agreement test is only worth something if a drift makes it fail.
    crd_schema = custom_resource_definitions()["DeviceClass"].schema["properties"]["spec"]
    drifted = {**crd_schema, "properties": {**crd_schema["properties"], "firmware": {"type": "string"}}}
    model_schema = DeviceClass.model_json_schema(by_alias=True, mode="validation")
    diffs = compare(drifted, model_schema["properties"]["spec"], model_schema["$defs"], "spec")
    assert diffs == ["spec.firmware: in the CRD, not in the model"]


def test_comparison_catches_a_changed_bound() -> None:
    crd_schema = custom_resource_definitions()["EdgeModel"].schema["properties"]["spec"]
    waves = crd_schema["properties"]["rollout"]["properties"]["waves"]
    percent = {**waves["items"]["properties"]["percent"], "maximum": 99}
    drifted_waves = {
        **waves,
        "items": {**waves["items"], "properties": {**waves["items"]["properties"], "percent": percent}},
    }
    rollout = {**crd_schema["properties"]["rollout"]}
    rollout["properties"] = {**rollout["properties"], "waves": drifted_waves}
    drifted = {**crd_schema, "properties": {**crd_schema["properties"], "rollout": rollout}}
    model_schema = EdgeModel.model_json_schema(by_alias=True, mode="validation")
    diffs = compare(drifted, model_schema["properties"]["spec"], model_schema["$defs"], "spec")
    assert len(diffs) == 1
    assert diffs[0].startswith("spec.rollout.waves[].percent: bounds")


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_example_passes_the_api_server_checks_and_the_model(path: Path) -> None:
    for doc in read_documents(path):
        body = dict(doc.body)
        kind = body["kind"]
        assert _api_server_problems(kind, body) == []
        assert model_problems(kind, body) == []
        resource = parse_resource(body, doc.source)
        assert resource.metadata.name == body["metadata"]["name"]


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_defaults_agree(path: Path) -> None:
    # The API server stores the CRD's defaults; the model fills in its own. They must be the same.
    for doc in read_documents(path):
        body = dict(doc.body)
        resource = MODELS[body["kind"]].model_validate(body)
        wire = resource.to_wire()
        defaulted = apply_defaults(body["kind"], body)
        for part in ("spec", "status"):
            assert _json_ready(wire.get(part)) == _json_ready(defaulted.get(part)), f"{part} defaults differ"


def _json_ready(value: Any) -> Any:
    # JSON has one number type; YAML's 4 and the model's 4.0 are the same value on the wire.
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def test_defaults_agree_when_every_optional_object_is_present() -> None:
    # Nested defaults only apply inside objects that exist; open every optional object so each
    # nested default is compared.
    body: dict[str, Any] = {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": "all-parents", "namespace": "default"},
        "spec": {
            "source": {"uri": "file:///m.onnx", "sha256": "a" * 64},
            "targets": {"deviceClasses": ["x"]},
            "optimization": {
                "recipe": {"passes": [{"type": t, member: {}} for t, member in _pass_members()]},
            },
            "accuracy": {"evaluationData": {"uri": "file:///e.npz", "sha256": "b" * 64}},
            "partition": {},
            "rollout": {"healthGates": {}},
        },
    }
    assert _api_server_problems("EdgeModel", body) == []
    wire = EdgeModel.model_validate(body).to_wire()
    assert _json_ready(wire["spec"]) == _json_ready(apply_defaults("EdgeModel", body)["spec"])


def _pass_members() -> list[tuple[str, str]]:
    item = custom_resource_definitions()["DeviceClass"].schema["properties"]["spec"]["properties"]["defaultRecipe"]
    props = item["properties"]["passes"]["items"]["properties"]
    members = [m for m in props if m != "type"]
    by_lower = {m.lower(): m for m in members}
    return [(t, by_lower[t.lower()]) for t in props["type"]["enum"]]


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_example_is_refused_by_both_naming_the_field(path: Path) -> None:
    expected = _expected_field(path)
    (doc,) = read_documents(path)
    body = dict(doc.body)
    kind = body["kind"]
    server = _api_server_problems(kind, body)
    model = model_problems(kind, body)
    assert _names(server, expected), f"API server checks did not name {expected}: {server}"
    assert _names(model, expected), f"model did not name {expected}: {model}"
    with pytest.raises(ResourceError) as caught:
        parse_resource(body, doc.source)
    assert any(f == expected or f.startswith((f"{expected}.", f"{expected}[")) for f in caught.value.fields)
    assert expected in str(caught.value)


def test_examples_cover_a_mixed_fleet() -> None:
    resources = [parse_resource(d.body, d.source) for p in VALID for d in read_documents(p)]
    classes = [r for r in resources if isinstance(r, DeviceClass)]
    models = [r for r in resources if isinstance(r, EdgeModel)]
    cpu_only = {c.metadata.name for c in classes if c.spec.accelerator is None}
    accelerated = {c.metadata.name for c in classes if c.spec.accelerator is not None}
    assert cpu_only
    assert accelerated
    # At least one EdgeModel targets a CPU-only class and an accelerated one by name.
    assert any(
        set(m.spec.targets.device_classes or []) & cpu_only and set(m.spec.targets.device_classes or []) & accelerated
        for m in models
    )
    assert len(INVALID) >= 5


def test_unknown_kind_and_api_version_are_named() -> None:
    with pytest.raises(ResourceError) as caught:
        parse_resource({"apiVersion": "edgefleet.io/v1", "kind": "EdgeModel", "metadata": {"name": "x"}})
    assert caught.value.fields == ["apiVersion"]
    with pytest.raises(ResourceError) as caught:
        parse_resource({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeRouter", "metadata": {"name": "x"}})
    assert caught.value.fields == ["kind"]


def test_missing_name_is_named() -> None:
    with pytest.raises(ResourceError) as caught:
        parse_resource({"apiVersion": "edgefleet.io/v1alpha1", "kind": "DeviceClass", "metadata": {}, "spec": {}})
    assert caught.value.fields == ["metadata.name"]


def test_bad_timestamp_is_refused_by_both() -> None:
    (doc,) = read_documents(EXAMPLES / "valid" / "edgedevice-gateway-07.yaml")
    body = yaml.safe_load(yaml.safe_dump(dict(doc.body)))
    body["status"]["lastSeen"] = "yesterday"
    assert _names(schema_problems("EdgeDevice", body), "status.lastSeen")
    assert _names(model_problems("EdgeDevice", body), "status.lastSeen")
    body["status"]["lastSeen"] = "2026-11-22T09:15:00"  # no zone: ambiguous
    assert _names(schema_problems("EdgeDevice", body), "status.lastSeen")
    assert _names(model_problems("EdgeDevice", body), "status.lastSeen")


def test_duplicate_condition_types_are_refused_by_both() -> None:
    (doc,) = read_documents(EXAMPLES / "valid" / "edgedevice-gateway-07.yaml")
    body = yaml.safe_load(yaml.safe_dump(dict(doc.body)))
    body["status"]["conditions"].append(dict(body["status"]["conditions"][0]))
    assert _names(schema_problems("EdgeDevice", body), "status.conditions")
    assert _names(model_problems("EdgeDevice", body), "status.conditions")


MINIMAL: dict[str, dict[str, Any]] = {
    "DeviceClass": {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "DeviceClass",
        "metadata": {"name": "minimal"},
        "spec": {
            "cpu": {"arch": "arm64", "cores": 4},
            "memory": "1Gi",
            "accelerator": {"type": "npu", "executionProvider": "QNNExecutionProvider", "link": {"bandwidthMBps": 100}},
            "selector": {"matchLabels": {"a": "b"}},
            "defaultRecipe": {"passes": [{"type": t, member: {}} for t, member in _pass_members()]},
        },
    },
    "EdgeDevice": {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgeDevice",
        "metadata": {"name": "minimal", "namespace": "default"},
        "spec": {"deviceClass": "x", "identity": {"deviceId": "d-1", "certificateSha256": "c" * 64}},
    },
}


@pytest.mark.parametrize("kind", sorted(MINIMAL))
def test_defaults_agree_on_minimal_documents(kind: str) -> None:
    # Leaves every defaulted field out, so defaults made by factories (lists) are compared too.
    body = MINIMAL[kind]
    assert _api_server_problems(kind, body) == []
    wire = MODELS[kind].model_validate(body).to_wire()
    assert _json_ready(wire["spec"]) == _json_ready(apply_defaults(kind, body)["spec"])
