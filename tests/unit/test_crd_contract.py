"""The CRDs in crds/ are what the API server accepts, and enforce what they promise.

No API server runs here, so these tests do its work: the CRD documents against the upstream
CustomResourceDefinition schema (kubernetes-validate), the structural-schema rules, the names and
printer columns kubectl shows, the bounds the CEL cost estimator needs, and the CEL rules
themselves (tests/support/cel.py) on the examples and on minimal hand-built resources.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft4Validator

from edgefleet_core.errors import FieldProblem
from edgefleet_core.resources.crds import custom_resource_definitions, schema_problems
from edgefleet_core.resources.loading import read_documents
from tests.support.cel import CelRuleError, cel_problems, compile_all_rules, resource_cel_problems, rule_holds

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_FILES = sorted((REPO_ROOT / "crds").glob("*.yaml"))
VALID = sorted((REPO_ROOT / "examples" / "valid").glob("*.yaml"))
INVALID = sorted((REPO_ROOT / "examples" / "invalid").glob("*.yaml"))
# Invalid examples that pass the OpenAPI schema: only the CEL rules refuse them.
CEL_ONLY_INVALID = {
    f"edgemodel-{n}.yaml" for n in ("waves-not-increasing", "pass-options-mismatch", "manual-partition-without-cut")
}
KINDS = ("DeviceClass", "EdgeModel", "EdgeDevice")
Schema = Mapping[str, Any]

SCALAR_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,)}
# Only these ObjectMeta fields are reachable by printer columns; the CRD schema leaves metadata open.
OBJECT_META: Schema = {
    "type": "object",
    "properties": {
        **{name: {"type": "string"} for name in ("name", "namespace", "generateName", "uid", "resourceVersion")},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": "string", "format": "date-time"},
    },
}


def _crd(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def _nodes(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every schema node below and including ``schema``, with its path (``[*]`` for items and map values)."""
    yield path or "(root)", schema
    for name, child in schema.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), Mapping):
            yield from _nodes(schema[key], f"{path}[*]")


def _names(problems: list[FieldProblem], field: str) -> bool:
    return any(p.field == field or p.field.startswith((f"{field}.", f"{field}[")) for p in problems)


# ---------------------------------------------------------------- the CRD documents


def test_crd_files_are_the_shipped_crds() -> None:
    assert {_crd(p)["spec"]["names"]["kind"] for p in CRD_FILES} == set(KINDS) == set(custom_resource_definitions())


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda p: p.name)
def test_crd_is_a_valid_customresourcedefinition(path: Path) -> None:
    version = kubernetes_validate.latest_version()
    validated = kubernetes_validate.validate(_crd(path), version, strict=True)
    # validate() returns the version whose schema it used; a fallback to an older one would show here.
    assert validated == ".".join(version.split(".")[:2])


def test_upstream_crd_validation_is_not_a_no_op() -> None:
    crd = _crd(CRD_FILES[0])
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["bogusKeyword"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(crd, kubernetes_validate.latest_version(), strict=True)


def structural_problems(root: Schema) -> list[str]:
    """Where ``root`` breaks the Kubernetes structural-schema rules (and the v1 CRD restrictions)."""
    out: list[str] = []
    if root.get("type") != "object":
        out.append("(root): type must be object")
    metadata = root.get("properties", {}).get("metadata")
    if metadata is not None:
        if set(metadata) - {"type", "properties", "description"} or metadata.get("type") != "object":
            out.append(".metadata: may only be an object restricting name and generateName")
        if set(metadata.get("properties", {})) - {"name", "generateName"}:
            out.append(".metadata: only name and generateName may be restricted")
    for path, node in _nodes(root):
        out += [f"{path}: {p}" for p in _node_problems(node)]
    return out


def _node_problems(node: Schema) -> Iterator[str]:
    yield from _type_problems(node)
    yield from _list_type_problems(node)
    for keyword in ("$ref", "allOf", "anyOf", "oneOf", "not"):
        if keyword in node:
            yield f"{keyword}: not allowed, or not covered by these checks"
    if "properties" in node and "additionalProperties" in node:
        yield "properties and additionalProperties are mutually exclusive"
    if isinstance(node.get("additionalProperties"), bool):
        yield "additionalProperties must be a schema, not a boolean"
    if node.get("uniqueItems"):
        yield "uniqueItems: true is not allowed"
    if "default" in node:
        for error in Draft4Validator(_closed(node)).iter_errors(node["default"]):
            yield f"default does not validate: {error.message}"
        for problem in cel_problems(node, node["default"]):
            yield f"default breaks a CEL rule: {problem}"


def _type_problems(node: Schema) -> Iterator[str]:
    kind = node.get("type")
    if not kind and not (node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")):
        yield "must specify a non-empty type"
    if kind and kind not in {*SCALAR_TYPES, "object", "array"}:
        yield f"unknown type {kind!r}"
    if "nullable" in node and not kind:
        yield "nullable needs a type"
    if kind == "array" and not isinstance(node.get("items"), Mapping):
        yield "an array must specify one items schema"
    if node.get("x-kubernetes-map-type", "atomic") not in {"atomic", "granular"} or (
        "x-kubernetes-map-type" in node and kind != "object"
    ):
        yield "x-kubernetes-map-type must be atomic or granular, on an object"
    for value in node.get("enum", ()):
        if kind in SCALAR_TYPES and (
            not isinstance(value, SCALAR_TYPES[kind]) or (kind != "boolean" and isinstance(value, bool))
        ):
            yield f"enum value {value!r} is not a {kind}"


def _list_type_problems(node: Schema) -> Iterator[str]:
    list_type, keys = node.get("x-kubernetes-list-type"), node.get("x-kubernetes-list-map-keys")
    items: Schema = node.get("items") or {}
    if list_type is not None and (node.get("type") != "array" or list_type not in {"atomic", "set", "map"}):
        yield "x-kubernetes-list-type must be atomic, set or map, on an array"
    if keys is not None and list_type != "map":
        yield "x-kubernetes-list-map-keys needs x-kubernetes-list-type: map"
    if list_type == "set" and items.get("type") not in SCALAR_TYPES and items.get("x-kubernetes-map-type") != "atomic":
        yield "a set's items must be scalars or atomic"
    if list_type == "map":
        if items.get("type") != "object" or not keys:
            yield "a map list needs object items and x-kubernetes-list-map-keys"
        for key in keys or ():
            prop = items.get("properties", {}).get(key, {})
            if prop.get("type") not in SCALAR_TYPES:
                yield f"map key {key!r} must be a scalar property of the items"
            if key not in items.get("required", ()) and "default" not in prop:
                yield f"map key {key!r} must be required or defaulted"


def _closed(node: Schema) -> dict[str, Any]:
    """A copy of ``node`` in which objects refuse unknown fields, as pruning would drop them from a default."""
    out = copy.deepcopy(dict(node))
    for _, child in _nodes(out):
        if "properties" in child and not child.get("x-kubernetes-preserve-unknown-fields"):
            child["additionalProperties"] = False  # type: ignore[index]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_crd_schema_is_structural(kind: str) -> None:
    assert structural_problems(custom_resource_definitions()[kind].schema) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s: s["properties"]["spec"].pop("type"), ".spec: must specify a non-empty type"),
        (lambda s: s["properties"]["spec"].update(additionalProperties={"type": "string"}), "mutually exclusive"),
        (lambda s: s["properties"]["metadata"].update(properties={"labels": {"type": "object"}}), "name and gen"),
        (lambda s: s["properties"]["status"]["properties"]["conditions"].update(uniqueItems=True), "uniqueItems"),
        (lambda s: s["properties"]["status"]["properties"]["observedGeneration"].update(default="x"), "default does"),
        (lambda s: s["properties"]["spec"]["properties"]["revoked"].update(enum=["true"]), "is not a boolean"),
    ],
)
def test_structural_checker_finds_what_it_should(mutate: Any, expected: str) -> None:
    schema = copy.deepcopy(custom_resource_definitions()["EdgeDevice"].schema)
    mutate(schema)
    assert any(expected in p for p in structural_problems(schema)), structural_problems(schema)


# ---------------------------------------------------------------- names, scope, printer columns

META = {"DeviceClass": ("dc", "Cluster"), "EdgeModel": ("em", "Namespaced"), "EdgeDevice": ("ed", "Namespaced")}


@pytest.mark.parametrize("kind", KINDS)
def test_crd_names_scope_and_versions(kind: str) -> None:
    crd = custom_resource_definitions()[kind]
    spec = crd.manifest["spec"]
    names = spec["names"]
    assert spec["group"] == "edgefleet.io"
    assert crd.manifest["metadata"]["name"] == f"{names['plural']}.edgefleet.io"
    assert (names["singular"], names["listKind"]) == (kind.lower(), f"{kind}List")
    assert (names["shortNames"], names["categories"]) == ([META[kind][0]], ["edgefleet"])
    assert spec["scope"] == crd.scope == META[kind][1]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def test_edgemodel_printer_columns() -> None:
    (version,) = custom_resource_definitions()["EdgeModel"].manifest["spec"]["versions"]
    shown = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert shown == ["Ready", "Version", "Classes", "Rollout", "Age"]


_JSON_PATH_STEP = re.compile(r"\.([A-Za-z_][\w-]*)|\[\?\(@\.([A-Za-z_]\w*)==\"[^\"]*\"\)\]|\[(?:\d+|\*)\]")
_COLUMN_TYPES = {"string": {"string"}, "integer": {"integer"}, "number": {"number", "integer"}, "boolean": {"boolean"}}


def _schema_at(root: Schema, json_path: str) -> Schema:
    node, position = root, 0
    while position < len(json_path):
        step = _JSON_PATH_STEP.match(json_path, position)
        assert step is not None, f"cannot read {json_path!r} from position {position}"
        name, filter_field = step.group(1), step.group(2)
        if name is not None:
            node = OBJECT_META if node is root and name == "metadata" else node.get("properties", {}).get(name)
            assert node is not None, f"{json_path}: no field {name!r}"
        else:
            assert node.get("type") == "array", f"{json_path}: {step.group(0)} applied to a non-array"
            node = node["items"]
            assert filter_field is None or filter_field in node.get("properties", {}), f"{json_path}: filter field"
        position = step.end()
    return node


@pytest.mark.parametrize("kind", KINDS)
def test_printer_columns_resolve_to_fields_of_their_type(kind: str) -> None:
    crd = custom_resource_definitions()[kind]
    (version,) = crd.manifest["spec"]["versions"]
    columns = version["additionalPrinterColumns"]
    assert [c["name"] for c in columns if not c.get("priority")][-1] == "Age"
    for column in columns:
        field = _schema_at(crd.schema, column["jsonPath"])
        if column["type"] == "date":
            assert (field.get("type"), field.get("format")) == ("string", "date-time"), column
        else:
            assert field.get("type") in _COLUMN_TYPES[column["type"]], column


# ---------------------------------------------------------------- CEL


def _bounded_string(node: Schema) -> bool:
    # What the API server's cost estimator reads (apiextensions-apiserver schema/cel/model): maxLength,
    # else the longest enum value, else the format's size. A pattern, however tight, is not read.
    return "maxLength" in node or "enum" in node or node.get("format") in {"date", "date-time", "duration"}


@pytest.mark.parametrize("kind", KINDS)
def test_arrays_and_cel_validated_strings_are_bounded(kind: str) -> None:
    schema = custom_resource_definitions()[kind].schema
    unbounded = [path for path, node in _nodes(schema) if node.get("type") == "array" and "maxItems" not in node]
    for path, node in _nodes(schema):
        if node.get("x-kubernetes-validations"):
            for sub_path, sub in _nodes(node, path):
                if sub.get("type") == "string" and not _bounded_string(sub):
                    unbounded.append(sub_path)
                if sub.get("type") == "object" and "additionalProperties" in sub and "maxProperties" not in sub:
                    unbounded.append(sub_path)
    assert unbounded == []


@pytest.mark.parametrize("kind", KINDS)
def test_every_cel_rule_compiles(kind: str) -> None:
    rules = compile_all_rules(custom_resource_definitions()[kind].schema)
    assert all(rule for _, rule in rules)
    if kind != "EdgeDevice":
        assert rules, f"{kind} is expected to carry CEL rules"


@pytest.mark.parametrize(
    ("rule", "reason"),
    [("self.a ==", "does not parse"), ("self.b == 'x'", "undefined field 'b'"), ("[1].reduce(x, 1)", "reduce()")],
)
def test_compile_refuses_what_the_api_server_would(rule: str, reason: str) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-validations": [{"rule": rule}]}
    with pytest.raises(CelRuleError, match=re.escape(reason)) as caught:
        compile_all_rules(schema)
    assert (caught.value.path, caught.value.rule) == ("(document)", rule)


@pytest.mark.parametrize(
    ("rule", "value"),
    [
        ("self.isSorted()", [1, 2, 2]),
        ("!self.isSorted()", [2, 1]),
        ("self.sum() == 6 && [].sum() == 0", [1, 2, 3]),
        ("self.min() == 1 && self.max() == 3", [3, 1, 2]),
        ("self.indexOf(2) == 1 && self.lastIndexOf(2) == 2 && self.indexOf(9) == -1", [1, 2, 2]),
        ("'abcb'.indexOf('b') == 1 && 'abcb'.lastIndexOf('b') == 3", []),
    ],
)
def test_kubernetes_list_library(rule: str, value: list[int]) -> None:
    assert rule_holds(rule, value, {"type": "array", "items": {"type": "integer"}})


@pytest.mark.parametrize("rule", ["self.max() > 0", "self[3] == 1", "size(self) / 0 == 1", "1"])
def test_a_rule_that_errors_or_is_not_a_bool_fails(rule: str) -> None:
    assert not rule_holds(rule, [], {"type": "array", "items": {"type": "integer"}})


def test_failure_is_reported_like_the_api_server() -> None:
    rules = [
        {"rule": "self.a > 1", "messageExpression": "'a is ' + string(self.a)", "fieldPath": ".a"},
        {"rule": "self.a > 2"},
        {"rule": "self.a == oldSelf.a", "message": "transition rules do not run on create"},
    ]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "x-kubernetes-validations": rules}
    assert cel_problems(schema, {"a": 1}, ["spec"]) == [
        FieldProblem("spec.a", "a is 1", "cel"),
        FieldProblem("spec", "failed rule: self.a > 2", "cel"),
    ]


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_cel_rules_hold_on_valid_examples(path: Path) -> None:
    for document in read_documents(path):
        assert resource_cel_problems(document.body["kind"], document.body) == []


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_example_is_refused_naming_its_field(path: Path) -> None:
    expected = path.read_text(encoding="utf-8").splitlines()[0].removeprefix("# expect-invalid: ").strip()
    (document,) = read_documents(path)
    kind = document.body["kind"]
    from_schema, from_cel = schema_problems(kind, document.body), resource_cel_problems(kind, document.body)
    # The CEL-only examples pass the OpenAPI schema, so only the rules can refuse them.
    assert (not from_schema) == (path.name in CEL_ONLY_INVALID), from_schema
    assert _names(from_schema or from_cel, expected), from_schema or from_cel
    assert all(p.validator == "cel" for p in from_cel)


def _edge_model(**spec: Any) -> dict[str, Any]:
    source = {"uri": "s3://models/m.onnx", "sha256": "a" * 64}
    body = {"source": source, "targets": {"deviceClasses": ["x86-cpu"]}, **spec}
    return {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel", "metadata": {"name": "m"}, "spec": body}


def _device_class(**spec: Any) -> dict[str, Any]:
    body = {"cpu": {"arch": "arm64", "cores": 4}, "memory": "4Gi", "selector": {"matchLabels": {"a": "b"}}, **spec}
    return {"apiVersion": "edgefleet.io/v1alpha1", "kind": "DeviceClass", "metadata": {"name": "c"}, "spec": body}


def _cel_only(document: dict[str, Any]) -> list[FieldProblem]:
    """CEL problems of a document the OpenAPI schema accepts, so that only the rules are under test."""
    assert schema_problems(document["kind"], document) == []
    return resource_cel_problems(document["kind"], document)


@pytest.mark.parametrize(
    ("percents", "refusal"),
    [([10, 10, 100], "strictly increasing"), ([50, 10, 100], "strictly increasing"), ([10, 50], "100"), ([100], None)],
)
def test_waves_rules(percents: list[int], refusal: str | None) -> None:
    problems = _cel_only(_edge_model(rollout={"waves": [{"percent": p} for p in percents]}))
    assert [p.field for p in problems] == ([] if refusal is None else ["spec.rollout.waves"])
    assert all(refusal in p.message for p in problems if refusal)


@pytest.mark.parametrize(
    ("partition", "refused"),
    [
        ({"policy": "manual", "cut": ["conv3"]}, False),
        ({}, False),
        ({"policy": "manual"}, True),
        ({"policy": "auto", "cut": ["conv3"]}, True),  # auto is also the default
        ({"cut": ["conv3"]}, True),
        ({"policy": "off", "cut": ["conv3"]}, True),
    ],
)
def test_partition_rules(partition: dict[str, Any], refused: bool) -> None:
    problems = _cel_only(_edge_model(partition=partition))
    assert [p.field for p in problems] == (["spec.partition"] if refused else [])


PASS_LOCATIONS: dict[str, Callable[[list[dict[str, Any]]], dict[str, Any]]] = {
    "DeviceClass.defaultRecipe": lambda passes: _device_class(defaultRecipe={"passes": passes}),
    "EdgeModel.recipe": lambda passes: _edge_model(optimization={"recipe": {"passes": passes}}),
    "EdgeModel.overrides": lambda passes: _edge_model(
        optimization={"overrides": [{"deviceClass": "x86-cpu", "recipe": {"passes": passes}}]}
    ),
}


def _pass_unions() -> list[Schema]:
    return [
        node
        for crd in custom_resource_definitions().values()
        for path, node in _nodes(crd.schema)
        if path.endswith(".passes[*]") and node.get("type") == "object"
    ]


def _pass_members() -> list[tuple[str, str]]:
    """(pass type, the property holding its options), from the CRD's union: one member per enum value."""
    item = _pass_unions()[0]["properties"]
    by_lower = {name.lower(): name for name in item if name != "type"}
    return [(kind, by_lower.get(kind.lower(), "(none)")) for kind in item["type"]["enum"]]


def test_pass_union_is_one_definition() -> None:
    unions = _pass_unions()
    assert len(unions) == len(PASS_LOCATIONS)
    assert all(other == unions[0] for other in unions), "the copies of the pass union have drifted apart"
    members = _pass_members()
    assert len(members) == len(unions[0]["properties"]) - 1 == 10
    assert "(none)" not in dict(members).values()


@pytest.mark.parametrize(("pass_type", "member"), _pass_members())
@pytest.mark.parametrize("location", PASS_LOCATIONS)
def test_pass_options_only_on_their_own_pass(pass_type: str, member: str, location: str) -> None:
    types = [t for t, _ in _pass_members()]
    other = types[(types.index(pass_type) + 1) % len(types)]
    build = PASS_LOCATIONS[location]
    assert _cel_only(build([{"type": "GraphOptimization"}, {"type": pass_type, member: {}}])) == []
    problems = _cel_only(build([{"type": "GraphOptimization"}, {"type": other, member: {}}]))
    assert len(problems) == 1, problems
    assert problems[0].field.endswith("passes[1]")
    assert member in problems[0].message


SELECTOR_LOCATIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "DeviceClass.selector": lambda selector: _device_class(selector=selector),
    "EdgeModel.targets.selector": lambda selector: _edge_model(targets={"selector": selector}),
}


@pytest.mark.parametrize("location", SELECTOR_LOCATIONS)
@pytest.mark.parametrize(
    ("expression", "refused"),
    [
        ({"key": "zone", "operator": "In"}, True),
        ({"key": "zone", "operator": "NotIn", "values": []}, True),
        ({"key": "zone", "operator": "In", "values": ["a"]}, False),
        ({"key": "zone", "operator": "Exists", "values": ["a"]}, True),
        ({"key": "zone", "operator": "DoesNotExist"}, False),
    ],
)
def test_match_expression_rules(location: str, expression: dict[str, Any], refused: bool) -> None:
    problems = _cel_only(SELECTOR_LOCATIONS[location]({"matchExpressions": [expression]}))
    assert [p.field.rsplit(".", 1)[-1] for p in problems] == (["matchExpressions[0]"] if refused else [])
