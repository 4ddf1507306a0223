"""Structural comparison of a CRD's OpenAPI schema with a pydantic model's JSON schema.

Both say what a valid resource is; this walks them side by side and lists every difference:
a field in one and not the other, a different type, enum, bound, pattern, default or required set.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

# Constraints compared one to one. minProperties is left out: the models say it with validators
# (tested through the invalid examples), JSON schema cannot express what pydantic's validator does.
_SCALAR_KEYS = ("minLength", "maxLength", "pattern", "minItems", "maxItems", "maxProperties")


def _resolve(node: Schema, defs: Schema) -> Schema:
    """Follow ``$ref`` and unwrap ``X | None`` so the node reads like a CRD node."""
    while True:
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            continue
        branches = node.get("anyOf")
        if branches is not None:
            real = [b for b in branches if b != {"type": "null"}]
            if len(real) != 1:
                raise AssertionError(f"a union the CRD cannot express: {branches}")
            node = {**{k: v for k, v in node.items() if k != "anyOf"}, **real[0]}
            continue
        return node


def _bounds(node: Schema) -> tuple[tuple[Any, bool] | None, tuple[Any, bool] | None]:
    """(value, exclusive) for the lower and upper bound, from OpenAPI v3.0 or JSON schema 2020-12 style."""
    low: tuple[Any, bool] | None = None
    high: tuple[Any, bool] | None = None
    if isinstance(node.get("exclusiveMinimum"), int | float) and not isinstance(node.get("exclusiveMinimum"), bool):
        low = (node["exclusiveMinimum"], True)
    elif "minimum" in node:
        low = (node["minimum"], node.get("exclusiveMinimum") is True)
    if isinstance(node.get("exclusiveMaximum"), int | float) and not isinstance(node.get("exclusiveMaximum"), bool):
        high = (node["exclusiveMaximum"], True)
    elif "maximum" in node:
        high = (node["maximum"], node.get("exclusiveMaximum") is True)
    return low, high


def _type(node: Schema) -> str | None:
    if "const" in node and "type" not in node:
        return type(node["const"]).__name__
    value = node.get("type")
    return str(value) if value is not None else None


def _enum(node: Schema) -> set[Any] | None:
    if "enum" in node:
        return set(node["enum"])
    if "const" in node:
        return {node["const"]}
    return None


def compare(crd: Schema, model: Schema, defs: Schema, path: str = "") -> list[str]:
    """Every difference between a CRD node and the model node for the same field."""
    model = _resolve(model, defs)
    where = path or "(root)"
    if _type(crd) != _type(model):
        return [f"{where}: type {_type(crd)!r} in the CRD, {_type(model)!r} in the model"]
    diffs = _leaf_diffs(crd, model, where)
    if _type(crd) == "object":
        diffs += _object_diffs(crd, model, defs, path)
    if _type(crd) == "array":
        diffs += compare(crd.get("items", {}), model.get("items", {}), defs, f"{path}[]")
    return diffs


def _leaf_diffs(crd: Schema, model: Schema, where: str) -> list[str]:
    diffs: list[str] = []
    if _enum(crd) != _enum(model):
        diffs.append(f"{where}: enum {_enum(crd)} in the CRD, {_enum(model)} in the model")
    if _bounds(crd) != _bounds(model):
        diffs.append(f"{where}: bounds {_bounds(crd)} in the CRD, {_bounds(model)} in the model")
    for key in _SCALAR_KEYS:
        if crd.get(key) != model.get(key):
            diffs.append(f"{where}: {key} {crd.get(key)!r} in the CRD, {model.get(key)!r} in the model")
    date_time = {crd.get("format"), model.get("format")} & {"date-time"}
    if date_time and crd.get("format") != model.get("format"):
        diffs.append(f"{where}: format {crd.get('format')!r} in the CRD, {model.get('format')!r} in the model")
    # pydantic leaves defaults made by a factory out of its schema; those are compared by
    # applying defaults to real documents (the test_defaults_agree* tests).
    if "default" in model and crd.get("default") != model["default"]:
        diffs.append(f"{where}: default {crd.get('default')!r} in the CRD, {model['default']!r} in the model")
    if "default" in crd and "default" not in model and crd["default"] not in ({}, []) and _type(crd) != "array":
        diffs.append(f"{where}: default {crd['default']!r} in the CRD only")
    return diffs


def _object_diffs(crd: Schema, model: Schema, defs: Schema, path: str) -> list[str]:
    where = path or "(root)"
    crd_props: Schema = crd.get("properties", {})
    model_props: Schema = model.get("properties", {})
    diffs = [f"{path}.{name}: in the CRD, not in the model" for name in sorted(set(crd_props) - set(model_props))]
    diffs += [f"{path}.{name}: in the model, not in the CRD" for name in sorted(set(model_props) - set(crd_props))]
    if set(crd.get("required", [])) != set(model.get("required", [])):
        diffs.append(
            f"{where}: required {sorted(crd.get('required', []))} in the CRD, "
            f"{sorted(model.get('required', []))} in the model"
        )
    for name in sorted(set(crd_props) & set(model_props)):
        diffs += compare(crd_props[name], model_props[name], defs, f"{path}.{name}" if path else name)
    crd_extra, model_extra = crd.get("additionalProperties"), model.get("additionalProperties")
    if isinstance(crd_extra, dict) != isinstance(model_extra, dict):
        diffs.append(f"{where}: a map in one schema and not the other")
    elif isinstance(crd_extra, dict) and isinstance(model_extra, dict):
        diffs += compare(crd_extra, model_extra, defs, f"{path}{{}}")
    return diffs
