"""``metadata`` as the real API server checks it: names, labels, annotations, finalizers, owner references.

A CRD's schema says nothing about ``metadata`` (the server validates it itself), so this module is
the one place those rules live, for built-ins and custom resources alike.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from edgefleet_operator.devtools.kube_api.errors import Cause

JsonObject = dict[str, Any]

OBJECT_META_FIELDS = frozenset(
    {
        *("name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation"),
        *("creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations"),
        *("ownerReferences", "finalizers", "managedFields"),
    }
)
SYSTEM_FIELDS = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "resourceVersion",
)
"""Set by the server only: what a client sends for them is replaced by the server's values."""
STANDARD_FINALIZERS = frozenset({"kubernetes", "orphan", "foregroundDeletion"})

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_GENERATED_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the real server's: no vowels, no look-alikes
_MAX_ANNOTATIONS_BYTES = 256 * 1024


def now() -> str:
    """The current time as the server writes timestamps (RFC 3339, seconds, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def generated_name(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_GENERATED_ALPHABET) for _ in range(5))


def prune_metadata(metadata: JsonObject) -> list[str]:
    """Drop fields ObjectMeta does not have; returns their paths (for field-validation warnings)."""
    unknown = sorted(k for k in metadata if k not in OBJECT_META_FIELDS)
    for key in unknown:
        del metadata[key]
    return [f"metadata.{k}" for k in unknown]


def _invalid(field: str, value: object, why: str) -> Cause:
    return Cause(field, "FieldValueInvalid", f"Invalid value: {_quote(value)}: {why}")


def _quote(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def name_problems(name: str, *, field: str = "metadata.name", label: bool = False) -> list[Cause]:
    """A DNS-1123 subdomain (most objects) or label (namespaces), as the real server requires."""
    limit = 63 if label else 253
    pattern = re.compile(_DNS_LABEL) if label else _DNS_SUBDOMAIN
    what = "RFC 1123 label" if label else "RFC 1123 subdomain"
    if len(name) > limit:
        return [_invalid(field, name, f"must be no more than {limit} characters")]
    if not pattern.fullmatch(name):
        characters = "'-'" if label else "'-' or '.'"
        why = (
            f"a lowercase {what} must consist of lower case alphanumeric characters, {characters}, "
            "and must start and end with an alphanumeric character"
        )
        return [_invalid(field, name, why)]
    return []


def qualified_name_problems(key: str, field: str) -> list[Cause]:
    prefix, slash, name = key.rpartition("/")
    problems: list[Cause] = []
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        problems.append(_invalid(field, key, "prefix part must be a lowercase RFC 1123 subdomain"))
    if not name or len(name) > 63 or not _QUALIFIED_NAME.fullmatch(name):
        why = (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
            "with an alphanumeric character, at most 63 characters"
        )
        problems.append(_invalid(field, key, why))
    return problems


def _map_problems(value: object, field: str) -> tuple[dict[str, Any], list[Cause]]:
    if value is None:
        return {}, []
    if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
        return {}, [Cause(field, "FieldValueTypeInvalid", "Invalid value: must be a map of strings")]
    return dict(value), []


def labels_problems(labels: object) -> list[Cause]:
    found, problems = _map_problems(labels, "metadata.labels")
    for key, value in found.items():
        problems += qualified_name_problems(key, "metadata.labels")
        if len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
            problems.append(_invalid("metadata.labels", value, "a valid label must be 63 characters or less"))
    return problems


def annotations_problems(annotations: object) -> list[Cause]:
    found, problems = _map_problems(annotations, "metadata.annotations")
    for key in found:
        problems += qualified_name_problems(key.lower(), "metadata.annotations")
    size = sum(len(k) + len(v) for k, v in found.items())
    if size > _MAX_ANNOTATIONS_BYTES:
        problems.append(
            Cause(
                "metadata.annotations",
                "FieldValueTooLong",
                f"Too long: must have at most {_MAX_ANNOTATIONS_BYTES} bytes",
            )
        )
    return problems


def finalizers_problems(finalizers: object) -> tuple[list[Cause], list[str]]:
    """Refusals and warnings: the real server warns about finalizers that are not domain-qualified."""
    if finalizers is None:
        return [], []
    if not isinstance(finalizers, list) or not all(isinstance(f, str) for f in finalizers):
        return [Cause("metadata.finalizers", "FieldValueTypeInvalid", "Invalid value: must be a list of strings")], []
    problems: list[Cause] = []
    warnings: list[str] = []
    for index, name in enumerate(finalizers):
        problems += qualified_name_problems(name, f"metadata.finalizers[{index}]")
        if "/" not in name and name not in STANDARD_FINALIZERS:
            warnings.append(
                f'metadata.finalizers: "{name}": prefer a domain-qualified finalizer name to avoid accidental '
                "conflicts with other finalizer writers"
            )
    return problems, warnings


def owner_references_problems(references: object) -> list[Cause]:
    if references is None:
        return []
    if not isinstance(references, list):
        return [Cause("metadata.ownerReferences", "FieldValueTypeInvalid", "Invalid value: must be a list")]
    problems: list[Cause] = []
    for index, ref in enumerate(references):
        for key in ("apiVersion", "kind", "name", "uid"):
            if not isinstance(ref, Mapping) or not ref.get(key):
                problems.append(
                    Cause(f"metadata.ownerReferences[{index}].{key}", "FieldValueRequired", "Required value")
                )
    return problems


def metadata_problems(metadata: Mapping[str, Any], *, is_namespace: bool) -> tuple[list[Cause], list[str]]:
    """Refusals and warnings for the client-settable parts of ``metadata``."""
    problems = name_problems(str(metadata.get("name", "")), label=is_namespace)
    problems += labels_problems(metadata.get("labels"))
    problems += annotations_problems(metadata.get("annotations"))
    problems += owner_references_problems(metadata.get("ownerReferences"))
    finalizer_problems, warnings = finalizers_problems(metadata.get("finalizers"))
    return problems + finalizer_problems, warnings
