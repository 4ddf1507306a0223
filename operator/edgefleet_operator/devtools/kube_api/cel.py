"""The CRDs' CEL rules (``x-kubernetes-validations``), evaluated the way the API server does.

No API server runs in unit tests, and ``edgefleet_core.resources.crds.schema_problems`` leaves CEL
out on purpose. celpy evaluates CEL; the Kubernetes side of it is ours, on purpose, because no
library does it in Python: where rules sit in a schema and what ``self`` is at each node, the
escaping of property names, the Kubernetes list library (celpy lacks it), the static checks the
API server does when a CRD is created (undeclared fields and functions), and how a failed rule is
reported. Only create is modelled: ``oldSelf`` is never bound, so transition rules are skipped, as
the API server skips them on create.
"""

from __future__ import annotations

import functools
import itertools
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import celpy
import lark
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError, Result

from edgefleet_core.errors import FieldProblem
from edgefleet_core.resources.crds import apply_defaults, custom_resource_definitions, field_path

Schema = Mapping[str, Any]
PathPart = str | int

_CEL_KEYWORDS = frozenset(
    {
        *("true", "false", "null", "in", "as", "break", "const", "continue", "else", "for", "function", "if"),
        *("import", "let", "loop", "package", "namespace", "return", "var", "void", "while"),
    }
)
_IDENTIFIER = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*")
_FIELD_PATH_STEP = re.compile(r"\.([_a-zA-Z][-_a-zA-Z0-9]*)|\['([^']*)'\]|\[(\d+)\]")
# Tree nodes that only wrap their one child; looked through when resolving `self.a.b` chains.
_WRAPPERS = frozenset(
    {"expr", "conditionalor", "conditionaland", "relation", "addition", "multiplication", "unary", "member", "primary"}
)
_CALLS = {"member_dot_arg": 1, "ident_arg": 0, "dot_ident_arg": 0}  # tree node → index of the function name


class CelRuleError(Exception):
    """A CRD's rule that the API server would refuse when the CRD is created."""

    def __init__(self, path: str, rule: str, reason: str) -> None:
        self.path = path
        """Schema node that holds the rule; ``[*]`` stands for array items and map values."""
        self.rule = rule
        self.reason = reason
        super().__init__(f"{path}: rule {rule!r}: {reason}")


# ---------------------------------------------------------------- the Kubernetes list library


def _as_list(target: Result, name: str) -> celtypes.ListType:
    if not isinstance(target, celtypes.ListType):
        raise TypeError(f"{name}() applies to lists, not {type(target).__name__}")  # celpy: "no such overload"
    return target


def _is_sorted(target: Result) -> Result:
    items = _as_list(target, "isSorted")
    return celtypes.BoolType(all(a <= b for a, b in itertools.pairwise(items)))  # type: ignore[operator]


def _sum(target: Result) -> Result:
    items = _as_list(target, "sum")
    return cast("Result", functools.reduce(operator.add, items)) if items else celtypes.IntType(0)


def _extreme(name: str, pick: Callable[[celtypes.ListType], Result]) -> Callable[[Result], Result]:
    def extreme(target: Result) -> Result:
        items = _as_list(target, name)
        if not items:
            raise ValueError(f"{name}() of an empty list")  # celpy turns ValueError into an error value
        return pick(items)

    return extreme


def _index_of(last: bool) -> Callable[..., Result]:
    def index_of(target: Result, wanted: Result, *offset: Result) -> Result:
        if isinstance(target, celtypes.StringType):  # the Kubernetes strings library's overload
            if not isinstance(wanted, celtypes.StringType):
                raise TypeError("indexOf() of a string takes a string")
            start = int(cast("int", offset[0])) if offset else None
            found = target.rfind(wanted, 0, start) if last else target.find(wanted, start or 0)
            return celtypes.IntType(found)
        items = _as_list(target, "lastIndexOf" if last else "indexOf")
        matches = [i for i, item in enumerate(items) if item == wanted]
        return celtypes.IntType((matches[-1] if last else matches[0]) if matches else -1)

    return index_of


K8S_FUNCTIONS: Mapping[str, Callable[..., Result]] = {
    "isSorted": _is_sorted,
    "sum": _sum,
    "min": _extreme("min", lambda items: cast("Result", min(items))),  # type: ignore[type-var]
    "max": _extreme("max", lambda items: cast("Result", max(items))),  # type: ignore[type-var]
    "indexOf": _index_of(last=False),
    "lastIndexOf": _index_of(last=True),
}
"""Kubernetes CEL library functions that celpy lacks. Add one here before a rule uses it."""

AVAILABLE_FUNCTIONS = frozenset(
    {
        *("has", "all", "exists", "exists_one", "map", "filter"),  # macros
        *("size", "contains", "startsWith", "endsWith", "matches", "type", "dyn"),
        *("int", "uint", "double", "string", "bytes", "bool", "duration", "timestamp"),
        *("getDate", "getDayOfMonth", "getDayOfWeek", "getDayOfYear", "getFullYear", "getMonth"),
        *("getHours", "getMilliseconds", "getMinutes", "getSeconds"),
        *K8S_FUNCTIONS,
    }
)
"""Functions both the API server and this evaluator know. celpy's own extensions (``reduce``) are
not among them: a rule using one would pass here and be refused by the API server."""


# ---------------------------------------------------------------- compiling


@dataclass(frozen=True)
class _Program:
    runner: celpy.Runner
    tree: lark.Tree[Any]
    transition: bool
    """Refers to ``oldSelf``: evaluated on update only."""


@functools.cache
def _program(text: str) -> _Program:
    environment = celpy.Environment()
    tree = environment.compile(text)
    runner = environment.program(tree, functions=dict(K8S_FUNCTIONS))
    names = {token.value for token in tree.scan_values(lambda v: isinstance(v, lark.Token))}
    return _Program(runner, tree, transition="oldSelf" in names)


def cel_property_name(name: str) -> str | None:
    """How a property is named in CEL (``namespace`` → ``__namespace__``); None when not accessible."""
    if name in _CEL_KEYWORDS:
        return f"__{name}__"
    for raw, escaped in (("__", "__underscores__"), (".", "__dot__"), ("-", "__dash__"), ("/", "__slash__")):
        name = name.replace(raw, escaped)
    return name if _IDENTIFIER.fullmatch(name) else None


def _unwrap(tree: lark.Tree[Any] | lark.Token) -> lark.Tree[Any] | lark.Token:
    while isinstance(tree, lark.Tree) and tree.data in _WRAPPERS and len(tree.children) == 1:
        tree = cast("lark.Tree[Any] | lark.Token", tree.children[0])
    return tree


def _schema_of(tree: lark.Tree[Any] | lark.Token, schema: Schema) -> Schema | None:
    """The schema of a ``self.a.b`` chain; raises KeyError for a field the schema does not declare."""
    tree = _unwrap(tree)
    if not isinstance(tree, lark.Tree):
        return None
    if tree.data == "ident":
        return schema if str(tree.children[0]) == "self" else None
    if tree.data != "member_dot":
        return None
    parent = _schema_of(cast("lark.Tree[Any]", tree.children[0]), schema)
    name = str(tree.children[1])
    if parent is None or parent.get("x-kubernetes-preserve-unknown-fields"):
        return None
    properties: Mapping[str, Schema] = parent.get("properties", {})
    if properties:
        declared = {cel_property_name(p): s for p, s in properties.items()}
        if name not in declared:
            raise KeyError(name)
        return declared[name]
    extra = parent.get("additionalProperties")
    return extra if isinstance(extra, Mapping) else None


def _field_path_steps(text: str) -> list[PathPart]:
    steps: list[PathPart] = []
    position = 0
    while position < len(text):
        step = _FIELD_PATH_STEP.match(text, position)
        if step is None:
            raise ValueError(f"fieldPath {text!r} is not a relative JSON path")
        name, key, index = step.groups()
        steps.append(int(index) if index is not None else (name if name is not None else key))
        position = step.end()
    return steps


def _check_rule(path: str, spec: Mapping[str, Any], schema: Schema) -> None:
    text = str(spec.get("rule", ""))
    try:
        program = _program(text)
        if "messageExpression" in spec:
            _program(str(spec["messageExpression"]))
    except CELParseError as exc:
        raise CelRuleError(path, text, f"does not parse: {exc}") from exc
    for node in program.tree.iter_subtrees():
        if node.data in _CALLS:
            function = str(node.children[_CALLS[node.data]])
            if function not in AVAILABLE_FUNCTIONS:
                raise CelRuleError(path, text, f"function {function}() is unknown to Kubernetes CEL or this evaluator")
        if node.data == "member_dot":
            try:
                _schema_of(node, schema)
            except KeyError as exc:
                raise CelRuleError(path, text, f"undefined field {exc.args[0]!r}") from exc
    if "fieldPath" in spec:
        node_schema: Schema | None = schema
        try:
            for step in _field_path_steps(str(spec["fieldPath"])):
                node_schema = _child_schema(node_schema or {}, step)
        except ValueError as exc:
            raise CelRuleError(path, text, str(exc)) from exc
        if node_schema is None:
            raise CelRuleError(path, text, f"fieldPath {spec['fieldPath']!r} names no field of the schema")


def _child_schema(schema: Schema, step: PathPart) -> Schema | None:
    if isinstance(step, int):
        return cast("Schema | None", schema.get("items"))
    properties: Mapping[str, Schema] = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    return properties.get(step) or (extra if isinstance(extra, Mapping) else None)


def _schema_nodes(schema: Schema, path: str) -> Iterator[tuple[str, Schema]]:
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from _schema_nodes(child, f"{path}.{name}" if path else name)
    for key, suffix in (("items", "[*]"), ("additionalProperties", "[*]")):
        if isinstance(schema.get(key), Mapping):
            yield from _schema_nodes(schema[key], f"{path}{suffix}")


def compile_all_rules(schema: Schema) -> list[tuple[str, str]]:
    """Every rule under ``schema`` as (schema path, rule text), each compiled and checked against the schema.

    Raises :class:`CelRuleError` (naming path and rule) for a rule the API server would refuse: one
    that does not parse, calls an unknown function, selects an undeclared field or has a bad fieldPath.
    """
    out: list[tuple[str, str]] = []
    for path, node in _schema_nodes(schema, ""):
        for spec in node.get("x-kubernetes-validations", ()):
            _check_rule(path or "(document)", spec, node)
            out.append((path or "(document)", str(spec["rule"])))
    return out


# ---------------------------------------------------------------- evaluating


def to_cel(schema: Schema, value: object) -> celtypes.Value:
    """``value`` as the API server shows it to CEL: escaped property names, typed by the schema."""
    if isinstance(value, Mapping):
        properties: Mapping[str, Schema] = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out: dict[celtypes.Value, celtypes.Value] = {}
        for key, child in value.items():
            name = cel_property_name(key) if properties else key
            if name is not None:
                child_schema = properties.get(key) or (extra if isinstance(extra, Mapping) else {})
                out[celtypes.StringType(name)] = to_cel(child_schema, child)
        return celtypes.MapType(out)
    if isinstance(value, list):
        items = schema.get("items")
        return celtypes.ListType([to_cel(items if isinstance(items, Mapping) else {}, v) for v in value])
    if isinstance(value, str) and schema.get("format") == "date-time":
        return celtypes.TimestampType(value)
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return celtypes.DoubleType(value)
    return json_to_cel(cast("Any", value))


def _evaluate(text: str, activation: Mapping[str, celtypes.Value]) -> Result:
    try:
        return _program(text).runner.evaluate(activation)
    except CELEvalError as exc:  # celpy raises the error value a rule evaluates to
        return exc


def _message(spec: Mapping[str, Any], activation: Mapping[str, celtypes.Value]) -> str:
    if "messageExpression" in spec:
        message = _evaluate(str(spec["messageExpression"]), activation)
        if isinstance(message, str) and message.strip():  # celpy's `+` gives a plain str
            return str(message)
    return str(spec.get("message") or f"failed rule: {spec['rule']}")


def _rule_problems(spec: Mapping[str, Any], schema: Schema, value: object, path: list[PathPart]) -> list[FieldProblem]:
    text = str(spec["rule"])
    try:
        if _program(text).transition:
            return []
    except CELParseError as exc:
        raise CelRuleError(field_path(path), text, f"does not parse: {exc}") from exc
    activation = {"self": to_cel(schema, value)}
    outcome = _evaluate(text, activation)
    if isinstance(outcome, celtypes.BoolType) and outcome:
        return []
    message = _message(spec, activation)
    if isinstance(outcome, CELEvalError):
        message = f"{message} (the rule could not be evaluated: {outcome.args[0]})"
    elif not isinstance(outcome, celtypes.BoolType):
        message = f"{message} (the rule gave {outcome!r}, not a bool)"
    where = [*path, *_field_path_steps(str(spec["fieldPath"]))] if "fieldPath" in spec else path
    return [FieldProblem(field_path(where), message, "cel")]


def cel_problems(schema: Schema, value: object, path: Sequence[PathPart] = ()) -> list[FieldProblem]:
    """What the CEL rules in ``schema`` and below it refuse in ``value`` (already defaulted), found at ``path``."""
    if value is None:
        return []
    problems: list[FieldProblem] = []
    for spec in schema.get("x-kubernetes-validations", ()):
        problems += _rule_problems(spec, schema, value, list(path))
    properties: Mapping[str, Schema] = schema.get("properties", {})
    extra, items = schema.get("additionalProperties"), schema.get("items")
    if isinstance(value, Mapping):
        for key, child in value.items():
            child_schema = properties.get(key) or (extra if isinstance(extra, Mapping) else None)
            if child_schema is not None:
                problems += cel_problems(child_schema, child, [*path, key])
    elif isinstance(value, list) and isinstance(items, Mapping):
        for index, item in enumerate(value):
            problems += cel_problems(items, item, [*path, index])
    return problems


def resource_cel_problems(kind: str, document: Mapping[str, Any]) -> list[FieldProblem]:
    """What the CEL rules refuse in ``document`` (a ``kind`` resource) on create, after defaulting it."""
    return cel_problems(custom_resource_definitions()[kind].schema, apply_defaults(kind, document))


def rule_holds(rule: str, value: object, schema: Schema | None = None) -> bool:
    """Whether one rule evaluates to true with ``self`` bound to ``value``; an error counts as false."""
    spec = {"rule": rule, "message": "failed"}
    return not _rule_problems(spec, schema or {}, value, [])
