"""The CRDs shipped in ``crds/``, and validation/defaulting of resources the way the API server does.

Without a cluster (the embedded control plane, ``edgefleet resources validate`` in a GitOps
pipeline, our tests) a resource must still be refused for exactly what the API server refuses:
its OpenAPI schema with strict field validation (unknown fields are errors, as with
``kubectl apply --validate=strict``), ``x-kubernetes-list-type`` uniqueness, and structural
defaulting. The CRDs' CEL rules are mirrored by the pydantic models' validators; the test suite
evaluates the CEL rules themselves.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, Literal

import yaml
from jsonschema import Draft4Validator, FormatChecker
from jsonschema.exceptions import ValidationError

from edgefleet_core.errors import ContractError, FieldProblem

JsonObject = dict[str, Any]

CRD_FILES = (
    "deviceclasses.edgefleet.io.yaml",
    "edgemodels.edgefleet.io.yaml",
    "edgedevices.edgefleet.io.yaml",
)
"""The CRD files, in the order to apply them."""


@dataclass(frozen=True)
class CustomResourceDefinition:
    """One of EdgeFleet's CRDs, reduced to what validation and routing need."""

    name: str
    group: str
    version: str
    kind: str
    plural: str
    scope: Literal["Namespaced", "Cluster"]
    schema: JsonObject
    """The ``openAPIV3Schema`` of the served, stored version."""
    manifest: JsonObject
    """The whole CRD document, as shipped."""

    @property
    def api_version(self) -> str:
        """``group/version`` as resources carry it."""
        return f"{self.group}/{self.version}"


def crd_text(filename: str) -> str:
    """The YAML text of one shipped CRD file."""
    try:
        return resources.files("edgefleet_core").joinpath("crds", filename).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ContractError(f"CRD file {filename} is missing from the installation") from exc


def _parse_crd(filename: str) -> CustomResourceDefinition:
    manifest = yaml.safe_load(crd_text(filename))
    try:
        spec = manifest["spec"]
        (served,) = [v for v in spec["versions"] if v["served"] and v["storage"]]
        return CustomResourceDefinition(
            name=manifest["metadata"]["name"],
            group=spec["group"],
            version=served["name"],
            kind=spec["names"]["kind"],
            plural=spec["names"]["plural"],
            scope=spec["scope"],
            schema=served["schema"]["openAPIV3Schema"],
            manifest=manifest,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ContractError(f"CRD file {filename} is malformed: {exc!r}") from exc


@functools.cache
def custom_resource_definitions() -> Mapping[str, CustomResourceDefinition]:
    """EdgeFleet's CRDs by kind, read once from the installed package."""
    crds = (_parse_crd(f) for f in CRD_FILES)
    return {crd.kind: crd for crd in crds}


def _strict(schema: JsonObject) -> JsonObject:
    """A copy of a structural schema in which objects refuse unknown fields, as the API server does."""
    out = copy.deepcopy(schema)

    def visit(node: JsonObject) -> None:
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for child in node.get("properties", {}).values():
            visit(child)
        if isinstance(node.get("items"), dict):
            visit(node["items"])
        if isinstance(node.get("additionalProperties"), dict):
            visit(node["additionalProperties"])

    visit(out)
    # The API server validates metadata itself; the CRD's schema leaves it open.
    out["properties"]["metadata"] = {"type": "object"}
    return out


_formats = FormatChecker(formats=())


@_formats.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    # RFC 3339 as Kubernetes writes it: a date, a time and a zone. Non-strings are the `type`
    # keyword's to report.
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value)  # ValueError names what is wrong
        if parsed.tzinfo is None or len(value) < len("2006-01-02T15:04:05Z"):
            raise ValueError(f"{value!r} is not an RFC 3339 date-time with a time zone")
    return True


@functools.cache
def _validator(kind: str) -> Draft4Validator:
    # OpenAPI v3.0 schemas use draft-4 style bounds (boolean exclusiveMinimum), hence Draft4.
    return Draft4Validator(_strict(custom_resource_definitions()[kind].schema), format_checker=_formats)


def field_path(parts: Iterator[str | int] | list[str | int] | tuple[str | int, ...]) -> str:
    """``("spec", "waves", 1, "percent")`` → ``spec.waves[1].percent``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(document)"


def _problem(error: ValidationError) -> FieldProblem:
    path = list(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties":
        known = set(schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in known) if isinstance(error.instance, dict) else []
        name = extra[0] if len(extra) == 1 else ", ".join(extra)
        return FieldProblem(field_path([*path, name]), "unknown field", "schema")
    if error.validator == "required":
        instance = error.instance if isinstance(error.instance, dict) else {}
        required = error.validator_value if isinstance(error.validator_value, list) else []
        missing = [name for name in required if name not in instance]
        return FieldProblem(field_path([*path, ", ".join(missing)]), "required field is missing", "schema")
    return FieldProblem(field_path(path), error.message, "schema")


def _list_type_problems(schema: JsonObject, value: object, path: list[str | int]) -> Iterator[FieldProblem]:
    """Uniqueness of ``x-kubernetes-list-type`` map keys and set items, which JSON schema cannot say."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, child in value.items():
            if key in props:
                yield from _list_type_problems(props[key], child, [*path, key])
        return
    if not isinstance(value, list):
        return
    list_type = schema.get("x-kubernetes-list-type")
    seen: set[object] = set()
    for index, item in enumerate(value):
        if list_type == "set":
            identity: object = yaml.safe_dump(item, sort_keys=True)
        elif list_type == "map" and isinstance(item, dict):
            identity = tuple(repr(item.get(k)) for k in schema.get("x-kubernetes-list-map-keys", []))
        else:
            identity = None
        if identity is not None:
            if identity in seen:
                yield FieldProblem(
                    field_path([*path, index]), f"duplicate entry in a list of type {list_type}", "schema"
                )
            seen.add(identity)
        if isinstance(schema.get("items"), dict):
            yield from _list_type_problems(schema["items"], item, [*path, index])


def schema_problems(kind: str, document: Mapping[str, Any]) -> list[FieldProblem]:
    """What the API server would refuse in ``document`` (a ``kind`` resource), by its CRD schema."""
    crd = custom_resource_definitions()[kind]
    errors = sorted(_validator(kind).iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
    problems = [_problem(e) for e in errors]
    if not problems:
        problems = list(_list_type_problems(crd.schema, document, []))
    return problems


def apply_defaults(kind: str, document: Mapping[str, Any]) -> JsonObject:
    """A copy of ``document`` with the CRD's defaults filled in, as the API server stores it.

    Like the API server, a default applies where a field is absent and its parent object exists,
    and defaults are applied inside defaulted values too.
    """
    out: JsonObject = copy.deepcopy(dict(document))
    _default_into(custom_resource_definitions()[kind].schema, out)
    return out


def _default_into(schema: JsonObject, value: object) -> None:
    if isinstance(value, dict):
        for key, child_schema in schema.get("properties", {}).items():
            if key not in value and "default" in child_schema:
                value[key] = copy.deepcopy(child_schema["default"])
            if key in value:
                _default_into(child_schema, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in schema.get("properties", {}):
                    _default_into(extra, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default_into(schema["items"], item)
