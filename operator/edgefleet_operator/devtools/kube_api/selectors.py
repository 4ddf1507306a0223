"""``labelSelector`` and ``fieldSelector`` query parameters, parsed and matched as the real server does."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edgefleet_operator.devtools.kube_api.errors import ApiError, bad_request

JsonObject = dict[str, Any]

_REQUIREMENT = re.compile(
    r"""^\s*(?:
        (?P<not_exists>!)\s*(?P<nkey>[^\s=!<>(),]+)
      | (?P<skey>[^\s=!<>(),]+)\s+(?P<setop>in|notin)\s*\((?P<values>[^()]*)\)
      | (?P<key>[^\s=!<>(),]+)\s*(?:(?P<op>==|=|!=|<|>)\s*(?P<value>[^\s=!<>(),]*))?
    )\s*$""",
    re.VERBOSE,
)
_FIELDS: Mapping[tuple[str, str], frozenset[str]] = {
    ("", "events"): frozenset(
        {
            *(
                f"involvedObject.{k}"
                for k in ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath")
            ),
            *("reason", "reportingComponent", "source", "type"),
        }
    ),
    ("", "secrets"): frozenset({"type"}),
    ("", "namespaces"): frozenset({"status.phase"}),
}


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    """``=``, ``!=``, ``in``, ``notin``, ``exists``, ``!exists``, ``<``, ``>``."""
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        match self.operator:
            case "exists":
                return present
            case "!exists":
                return not present
            case "=" | "in":
                return present and value in self.values
            case "!=" | "notin":
                return not present or value not in self.values
        # `<` and `>`: the label must be an integer, compared with the one value.
        try:
            number, bound = int(str(value)), int(self.values[0])
        except ValueError:
            return False
        return present and (number < bound if self.operator == "<" else number > bound)


def _split(text: str) -> list[str]:
    """Comma-separated requirements; commas inside ``in (a,b)`` belong to the set."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


def _requirement(text: str) -> Requirement:
    found = _REQUIREMENT.match(text)
    if found is None:
        raise bad_request(
            f"unable to parse requirement: found {text.strip()!r}, expected: key, !key, key=value, key in (...)"
        )
    groups = found.groupdict()
    if groups["nkey"]:
        return Requirement(groups["nkey"], "!exists")
    if groups["skey"]:
        values = tuple(v.strip() for v in groups["values"].split(",") if v.strip())
        return Requirement(groups["skey"], groups["setop"], values)
    op = groups["op"]
    if op is None:
        return Requirement(groups["key"], "exists")
    if op in ("<", ">") and not groups["value"].lstrip("-").isdigit():
        raise bad_request(f"unable to parse requirement: {groups['value']!r} is not an integer for {op}")
    return Requirement(groups["key"], "=" if op == "==" else op, (groups["value"],))


def parse_label_selector(text: str | None) -> Callable[[Mapping[str, Any]], bool]:
    """A predicate over objects for a ``labelSelector``; raises 400 BadRequest for bad syntax."""
    requirements = [_requirement(part) for part in _split(text or "")]

    def matches(obj: Mapping[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(r.matches(labels) for r in requirements)

    return matches


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if isinstance(node, Mapping) and path == "source":  # events: the reporting component
        node = node.get("component")
    return "" if node is None else str(node)


def parse_field_selector(text: str | None, group: str, plural: str) -> Callable[[Mapping[str, Any]], bool]:
    """A predicate for a ``fieldSelector``; only the fields the real server indexes for the resource."""
    allowed = {"metadata.name", "metadata.namespace"} | _FIELDS.get((group, plural), frozenset())
    terms: list[tuple[str, bool, str]] = []
    for part in _split(text or ""):
        found = re.fullmatch(r"\s*([^=!\s]+)\s*(==|=|!=)\s*(\S*)\s*", part)
        if found is None:
            raise bad_request(f"invalid selector: {part!r}; can't understand {part.strip()!r}")
        field, op, value = found.groups()
        if field not in allowed:
            raise ApiError(400, "BadRequest", f"field label not supported: {field}", {})
        terms.append((field, op != "!=", value))

    def matches(obj: Mapping[str, Any]) -> bool:
        return all((_field_value(obj, field) == value) == equal for field, equal, value in terms)

    return matches
