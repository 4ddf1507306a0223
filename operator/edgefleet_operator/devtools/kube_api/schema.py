"""Structural schemas the way the real API server applies them: prune, default, validate, CEL.

Order as in the apiextensions server: nulls of non-nullable fields are dropped, unknown fields are
pruned (reported for ``fieldValidation``), defaults filled in, then the object is validated against
the OpenAPI schema (jsonschema, with the Kubernetes extensions translated) and, when that passes,
against the CEL rules (``cel.py`` evaluates them; only create-style rules, no
``oldSelf``). Failures become ``Invalid`` causes worded like the real server's.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import yaml
from jsonschema import Draft4Validator, FormatChecker
from jsonschema.exceptions import ValidationError

from edgefleet_core.errors import FieldProblem
from edgefleet_core.resources.crds import field_path
from edgefleet_operator.devtools.kube_api.cel import cel_problems
from edgefleet_operator.devtools.kube_api.errors import Cause

JsonObject = dict[str, Any]
Schema = Mapping[str, Any]

_ROOT_KEYS = frozenset({"apiVersion", "kind", "metadata"})
_NOT_JSON_SCHEMA = frozenset({"default", "description", "example", "externalDocs", "nullable", "title"})
_PATH_STEP = re.compile(r"\.?([^.\[\]]+)|\[(\d+)\]")
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


# ---------------------------------------------------------------- prune and default


def prune(body: JsonObject, schema: Schema) -> list[str]:
    """Drop what the schema does not declare (and nulls where it is not nullable), in place.

    Returns the paths of the dropped unknown fields: the real server warns about them, or refuses
    them under ``fieldValidation=Strict``. ``apiVersion``, ``kind`` and ``metadata`` are the
    server's own at the root.
    """
    unknown: list[str] = []
    properties = schema.get("properties") or {}
    for key in list(body):
        if key in _ROOT_KEYS:
            continue
        _prune_member(body, key, properties.get(key), schema, key, unknown)
    return unknown


def _prune_member(
    parent: JsonObject, key: str, child: Schema | None, schema: Schema, where: str, unknown: list[str]
) -> None:
    extra = schema.get("additionalProperties")
    if child is None and isinstance(extra, Mapping):
        child = extra
    if child is not None:
        if parent[key] is None and not child.get("nullable"):
            del parent[key]
        else:
            _prune(parent[key], child, where, unknown)
        return
    embedded = schema.get("x-kubernetes-embedded-resource") and key in _ROOT_KEYS
    if not (schema.get("x-kubernetes-preserve-unknown-fields") or extra is True or embedded):
        del parent[key]
        unknown.append(where)


def _prune(value: object, schema: Schema, path: str, unknown: list[str]) -> None:
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key in list(value):
            _prune_member(value, key, properties.get(key), schema, f"{path}.{key}", unknown)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            _prune(item, schema["items"], f"{path}[{index}]", unknown)


def apply_defaults(value: object, schema: Schema, *, root: bool = True) -> None:
    """Fill in ``default`` where a field is absent and its parent exists, in place (defaults nest)."""
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key, child in properties.items():
            if root and key in _ROOT_KEYS:
                continue
            if key not in value and "default" in child:
                value[key] = copy.deepcopy(child["default"])
            if key in value:
                apply_defaults(value[key], child, root=False)
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for key in value:
                if key not in properties:
                    apply_defaults(value[key], extra, root=False)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for item in value:
            apply_defaults(item, schema["items"], root=False)


# ---------------------------------------------------------------- validate


def _to_json_schema(node: Schema) -> JsonObject:
    """An OpenAPI v3.0 structural schema node as JSON schema (draft 4 bounds), extensions translated."""
    out: JsonObject = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in _NOT_JSON_SCHEMA:
            continue
        if key == "properties":
            out[key] = {name: _to_json_schema(child) for name, child in value.items()}
        elif key in ("items", "not", "additionalProperties") and isinstance(value, Mapping):
            out[key] = _to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_to_json_schema(child) for child in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable"):
        kinds = out.get("type")
        if isinstance(kinds, str):
            out["type"] = [kinds, "null"]
        elif isinstance(kinds, list):
            out["type"] = [*kinds, "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


_formats = FormatChecker(formats=())


@_formats.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    # RFC 3339 with a zone, as Go's time.RFC3339 parses it (fractions and numeric offsets allowed).
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None or "T" not in value.upper():
            raise ValueError(f"{value!r} has no time zone")
    return True


@_formats.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or _INT32[0] <= value <= _INT32[1]


@_formats.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or _INT64[0] <= value <= _INT64[1]


@_formats.checks("byte", raises=(binascii.Error, ValueError))
def _byte(value: object) -> bool:
    if isinstance(value, str):
        base64.b64decode(value, validate=True)
    return True


@_formats.checks("uuid", raises=ValueError)
def _uuid(value: object) -> bool:
    if isinstance(value, str):
        uuid.UUID(value)
    return True


_validators: dict[int, tuple[Schema, Draft4Validator]] = {}


def _validator(schema: Schema) -> Draft4Validator:
    cached = _validators.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]
    converted = _to_json_schema(schema)
    converted.setdefault("properties", {})["metadata"] = {"type": "object"}  # the server checks metadata itself
    validator = Draft4Validator(converted, format_checker=_formats)
    _validators[id(schema)] = (schema, validator)
    return validator


def _quoted(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()


def _json_type(value: object) -> str:
    return (
        "null" if value is None else "boolean" if isinstance(value, bool) else "integer" if isinstance(value, int)
        else "number" if isinstance(value, float) else "string" if isinstance(value, str)
        else "array" if isinstance(value, list) else "object"
    )  # fmt: skip


def _bound(error: ValidationError, word: str, exclusive_key: str) -> str:
    exclusive = isinstance(error.schema, Mapping) and error.schema.get(exclusive_key) is True
    return f"{word} than{'' if exclusive else ' or equal to'} {error.validator_value}"


@dataclass(frozen=True)
class _Failed:
    """One failed keyword, with what the real server's messages are made of."""

    error: ValidationError
    where: str
    value: Any
    rule: Any

    @property
    def invalid(self) -> str:
        return f"Invalid value: {_quoted(self.value)}: {self.where} in body"

    @property
    def size(self) -> int:
        return len(self.value) if isinstance(self.value, list | dict | str) else 0


# keyword → (cause reason, message); worded as the real server's OpenAPI validation.
_MESSAGES: Mapping[str, tuple[str, Callable[[_Failed], str]]] = {
    "enum": (
        "FieldValueNotSupported",
        lambda f: f"Unsupported value: {_quoted(f.value)}: supported values: {', '.join(_quoted(v) for v in f.rule)}",
    ),
    "type": (
        "FieldValueTypeInvalid",
        lambda f: (
            f'Invalid value: "{_json_type(f.value)}": {f.where} in body must be of type '
            f"{f.rule if isinstance(f.rule, str) else '/'.join(f.rule)}: {_quoted(f.value)}"
        ),
    ),
    "pattern": ("FieldValueInvalid", lambda f: f"{f.invalid} should match '{f.rule}'"),
    "maxLength": ("FieldValueTooLong", lambda f: f"Too long: may not be more than {f.rule} bytes"),
    "maxItems": ("FieldValueTooMany", lambda f: f"Too many: {f.size}: must have at most {f.rule} items"),
    "maxProperties": ("FieldValueTooMany", lambda f: f"Too many: {f.size}: must have at most {f.rule} items"),
    "minLength": ("FieldValueInvalid", lambda f: f"{f.invalid} should be at least {f.rule} chars long"),
    "minItems": (
        "FieldValueInvalid",
        lambda f: f"Invalid value: {f.size}: {f.where} in body should have at least {f.rule} items",
    ),
    "minProperties": (
        "FieldValueInvalid",
        lambda f: f"Invalid value: {f.size}: {f.where} in body should have at least {f.rule} properties",
    ),
    "minimum": (
        "FieldValueInvalid",
        lambda f: f"{f.invalid} should be {_bound(f.error, 'greater', 'exclusiveMinimum')}",
    ),
    "maximum": ("FieldValueInvalid", lambda f: f"{f.invalid} should be {_bound(f.error, 'less', 'exclusiveMaximum')}"),
    "multipleOf": ("FieldValueInvalid", lambda f: f"{f.invalid} should be a multiple of {f.rule}"),
    "uniqueItems": ("FieldValueDuplicate", lambda f: f"Duplicate value: {_quoted(f.value)}"),
    "format": ("FieldValueInvalid", lambda f: f"{f.invalid} must be of type {f.rule}: {_quoted(f.value)}"),
}


def _causes(error: ValidationError) -> list[Cause]:
    parts = list(error.absolute_path)
    failed = _Failed(error, field_path(parts), cast("Any", error.instance), cast("Any", error.validator_value))
    if error.validator == "required":
        present = failed.value if isinstance(failed.value, Mapping) else {}
        missing = [name for name in failed.rule if name not in present]
        return [Cause(field_path([*parts, name]), "FieldValueRequired", "Required value") for name in missing]
    reason, message = _MESSAGES.get(
        str(error.validator), ("FieldValueInvalid", lambda f: f"{f.invalid}: {error.message}")
    )
    return [Cause(failed.where, reason, message(failed))]


def _list_type_causes(schema: Schema, value: object, path: list[str | int]) -> list[Cause]:
    """Uniqueness of ``x-kubernetes-list-type: set`` items and ``map`` keys, which JSON schema cannot say."""
    causes: list[Cause] = []
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            child_schema = properties.get(key) or (extra if isinstance(extra, Mapping) else None)
            if child_schema is not None:
                causes += _list_type_causes(child_schema, child, [*path, key])
        return causes
    if not isinstance(value, list):
        return causes
    list_type, keys = schema.get("x-kubernetes-list-type"), schema.get("x-kubernetes-list-map-keys") or []
    seen: set[str] = set()
    for index, item in enumerate(value):
        identity = None
        if list_type == "set":
            identity = json.dumps(item, sort_keys=True)
        elif list_type == "map" and isinstance(item, Mapping):
            identity = json.dumps({k: item.get(k) for k in keys}, sort_keys=True)
        if identity is not None and identity in seen:
            shown = _quoted(item) if list_type == "set" else _quoted({k: item.get(k) for k in keys})
            causes.append(Cause(field_path([*path, index]), "FieldValueDuplicate", f"Duplicate value: {shown}"))
        if identity is not None:
            seen.add(identity)
        if isinstance(schema.get("items"), Mapping):
            causes += _list_type_causes(schema["items"], item, [*path, index])
    return causes


def _at(body: object, where: str) -> object:
    """The value at a ``spec.a[1].b`` path, or None."""
    node = body
    for name, index in _PATH_STEP.findall(where):
        if index:
            node = node[int(index)] if isinstance(node, list) and int(index) < len(node) else None
        else:
            node = node.get(name) if isinstance(node, dict) else None
    return node


_ABSENT: Any = object()
"""No old value: the object is being created, or the field is new."""
_rule_free: dict[int, tuple[Schema, JsonObject]] = {}


def _without_rules(schema: Schema) -> JsonObject:
    """A copy of ``schema`` with no CEL rules anywhere: evaluates one node's rules, not its children's."""
    cached = _rule_free.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]

    def strip(node: object) -> object:
        if isinstance(node, Mapping):
            return {k: strip(v) for k, v in node.items() if k != "x-kubernetes-validations"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    stripped = cast("JsonObject", strip(schema))
    _rule_free[id(schema)] = (schema, stripped)
    return stripped


def _cel_causes(schema: Schema, value: object, old: object, path: list[str | int]) -> list[FieldProblem]:
    """The CEL rules' refusals, ratcheted as the real server does (1.30+): an unchanged value is not re-checked.

    Without ratcheting every status write would re-run every rule of the spec (and be slow here);
    lists are compared whole, so an item of a changed list is always checked.
    """
    if value is None or (old is not _ABSENT and value == old):
        return []
    problems: list[FieldProblem] = []
    rules = schema.get("x-kubernetes-validations")
    if rules:
        node = {**_without_rules(schema), "x-kubernetes-validations": rules}
        problems += cel_problems(node, value, path)
    properties: Mapping[str, Schema] = schema.get("properties") or {}
    extra, items = schema.get("additionalProperties"), schema.get("items")
    if isinstance(value, dict):
        for key, child in value.items():
            child_schema = properties.get(key) or (extra if isinstance(extra, Mapping) else None)
            if child_schema is not None:
                was = old.get(key, _ABSENT) if isinstance(old, dict) else _ABSENT
                problems += _cel_causes(child_schema, child, was, [*path, key])
    elif isinstance(value, list) and isinstance(items, Mapping):
        for index, item in enumerate(value):
            problems += _cel_causes(items, item, _ABSENT, [*path, index])
    return problems


def validation_causes(body: JsonObject, schema: Schema, old: JsonObject | None = None) -> list[Cause]:
    """Why the (pruned, defaulted) object breaks its schema: OpenAPI first, list types, then CEL rules.

    ``old`` is the stored object on updates: CEL rules are ratcheted against it.
    """
    errors = sorted(_validator(schema).iter_errors(body), key=lambda e: [str(p) for p in e.absolute_path])
    causes = [cause for error in errors for cause in _causes(error)]
    causes += _list_type_causes(schema, body, [])
    if causes:
        return causes  # CEL rules assume the types the schema guarantees
    return [
        Cause(p.field, "FieldValueInvalid", f'Invalid value: "{_json_type(_at(body, p.field))}": {p.message}')
        for p in _cel_causes(schema, body, _ABSENT if old is None else old, [])
    ]
