"""Building blocks shared by the resource models: the base model, metadata, conditions, selectors.

The models mirror the CRD schemas in ``crds/`` field for field (a test walks both and fails on any
difference), so the operator, the gateway and the CLI read a resource once, at the boundary, into
typed objects.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from datetime import datetime
from typing import Annotated, Final, Literal, Self, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel

API_GROUP: Final = "edgefleet.io"
API_VERSION: Final = "v1alpha1"
GROUP_VERSION: Final = "edgefleet.io/v1alpha1"
"""``apiVersion`` of every EdgeFleet resource (spelled out so type checkers read it as a literal)."""


class ResourceModel(BaseModel):
    """Base of every resource model: camelCase on the wire, snake_case in Python, unknown fields refused.

    Refusing unknown fields mirrors the API server's strict field validation, so a typo in a spec
    is an error and not a silently ignored option.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, object]:
        """The JSON-ready dict with the CRD's field names, leaving out what is unset."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# Patterns shared with the CRD schemas (Kubernetes' own where one exists).
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"
DURATION_PATTERN = r"^([0-9]+(ms|s|m|h))+$"
SHA256_HEX_PATTERN = r"^[a-f0-9]{64}$"
URI_PATTERN = r"^(s3|https?|file)://[^\s]+$"

_QUANTITY_FACTORS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h)")
_DURATION_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

ResourceName = Annotated[str, StringConstraints(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
"""A reference to a resource by name (DNS-1123 subdomain)."""
Quantity = Annotated[str, StringConstraints(max_length=32, pattern=QUANTITY_PATTERN)]
"""A Kubernetes quantity such as ``512Mi`` or ``4Gi``; see :func:`quantity_bytes`."""
Duration = Annotated[str, StringConstraints(max_length=32, pattern=DURATION_PATTERN)]
"""A Go-style duration such as ``30s`` or ``1h30m``; see :func:`duration_seconds`."""
Sha256Hex = Annotated[str, StringConstraints(pattern=SHA256_HEX_PATTERN)]
SourceUri = Annotated[str, StringConstraints(max_length=2048, pattern=URI_PATTERN)]


def quantity_bytes(quantity: str) -> int:
    """Bytes in a Kubernetes quantity (``4Gi`` → 4294967296); fractions round down."""
    match = re.fullmatch(QUANTITY_PATTERN, quantity)
    if match is None:
        raise ValueError(f"not a quantity: {quantity!r}")
    suffix = match.group(2) or ""
    number = quantity[: len(quantity) - len(suffix)]
    whole, _, fraction = number.partition(".")
    factor = _QUANTITY_FACTORS[suffix]
    # Integer arithmetic: float would lose bytes on large quantities.
    scaled = int(whole) * factor
    if fraction:
        scaled += int(fraction) * factor // 10 ** len(fraction)
    return scaled


def duration_seconds(duration: str) -> float:
    """Seconds in a duration such as ``1h30m`` or ``250ms``."""
    if re.fullmatch(DURATION_PATTERN, duration) is None:
        raise ValueError(f"not a duration: {duration!r}")
    return sum(int(n) * _DURATION_SECONDS[unit] for n, unit in _DURATION_PART.findall(duration))


def _is_rfc3339_with_zone(value: datetime) -> datetime:
    # Kubernetes timestamps are RFC 3339 with a zone; a naive time would be read differently by
    # every reader.
    if value.tzinfo is None:
        raise ValueError("timestamp must carry a time zone (RFC 3339, e.g. 2026-01-01T00:00:00Z)")
    return value


Timestamp = Annotated[datetime, AfterValidator(_is_rfc3339_with_zone)]


class ObjectMeta(BaseModel):
    """The parts of Kubernetes object metadata EdgeFleet reads; the rest is kept as-is."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow", frozen=True)

    name: Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
    namespace: Annotated[str, StringConstraints(max_length=63)] | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    resource_version: str | None = None
    uid: str | None = None


class LabelSelectorRequirement(ResourceModel):
    """One requirement of a label selector (Kubernetes semantics)."""

    key: Annotated[str, StringConstraints(min_length=1, max_length=317)]
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: Annotated[list[Annotated[str, StringConstraints(max_length=63)]], Field(max_length=64)] | None = None

    @model_validator(mode="after")
    def _values_fit_operator(self) -> Self:
        # Mirrors the CRD's CEL rule on matchExpressions items.
        has_values = bool(self.values)
        if self.operator in ("In", "NotIn") and not has_values:
            raise ValueError(f"values must be non-empty for operator {self.operator}")
        if self.operator in ("Exists", "DoesNotExist") and has_values:
            raise ValueError(f"values must be empty for operator {self.operator}")
        return self

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether ``labels`` satisfy this requirement."""
        present = self.key in labels
        if self.operator == "Exists":
            return present
        if self.operator == "DoesNotExist":
            return not present
        inside = present and labels[self.key] in (self.values or [])
        return inside if self.operator == "In" else not inside


class LabelSelector(ResourceModel):
    """A Kubernetes label selector; all of its terms must hold."""

    match_labels: (
        Annotated[dict[str, Annotated[str, StringConstraints(max_length=63)]], Field(max_length=64)] | None
    ) = None
    match_expressions: Annotated[list[LabelSelectorRequirement], Field(max_length=32)] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        # The CRD says minProperties: 1 — an empty selector would silently select everything.
        if self.match_labels is None and self.match_expressions is None:
            raise ValueError("selector must set matchLabels or matchExpressions")
        return self

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether an object with ``labels`` is selected."""
        wanted = self.match_labels or {}
        if any(labels.get(key) != value for key, value in wanted.items()):
            return False
        return all(req.matches(labels) for req in self.match_expressions or [])


_Item = TypeVar("_Item")


def unique_by(key: Callable[[_Item], Hashable], what: str) -> AfterValidator:
    """A list validator that refuses duplicate keys.

    Mirrors ``x-kubernetes-list-type: map`` (unique map keys) and ``set`` (unique items), which the
    API server enforces and a JSON-schema validator does not.
    """

    def check(items: Sequence[_Item]) -> Sequence[_Item]:
        seen: set[Hashable] = set()
        for item in items:
            k = key(item)
            if k in seen:
                raise ValueError(f"duplicate {what} {k!r}")
            seen.add(k)
        return items

    return AfterValidator(check)


def _self(item: _Item) -> _Item:
    return item


UNIQUE_ITEMS = unique_by(_self, "entry")
"""For ``x-kubernetes-list-type: set`` lists of scalars."""

ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ResourceModel):
    """A status condition in the shape of Kubernetes' ``metav1.Condition``."""

    type: Annotated[
        str,
        StringConstraints(
            max_length=316,
            pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
        ),
    ]
    status: ConditionStatus
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    last_transition_time: Timestamp
    reason: Annotated[
        str, StringConstraints(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    ]
    message: Annotated[str, StringConstraints(max_length=32768)]


Conditions = Annotated[list[Condition], Field(max_length=16), unique_by(lambda c: c.type, "condition type")]
