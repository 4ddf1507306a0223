"""Which resources the test API server serves: a fixed set of built-ins plus every installed CRD.

The built-ins are the ones an operator touches (namespaces, events, configmaps, secrets, leases,
jobs, CRDs themselves). Each type carries a structural schema, so built-ins are pruned and checked
by the same code as custom resources; the built-in schemas cover the fields clients write and keep
the rest (``x-kubernetes-preserve-unknown-fields``) where modelling them would add nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgefleet_operator.devtools.kube_api.cel import CelRuleError, compile_all_rules
from edgefleet_operator.devtools.kube_api.errors import Cause, Subject
from edgefleet_operator.devtools.kube_api.meta import now

JsonObject = dict[str, Any]

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
STATUS_VERBS = ("get", "patch", "update")
CRD_CLEANUP_FINALIZER = "customresourcecleanup.apiextensions.k8s.io"
"""The finalizer the real server puts on every CRD: its instances are deleted before the CRD goes."""

_PRESERVE: JsonObject = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
_STRING_MAP: JsonObject = {"type": "object", "additionalProperties": {"type": "string"}}
_BYTES_MAP: JsonObject = {"type": "object", "additionalProperties": {"type": "string", "format": "byte"}}
_DATE_TIME: JsonObject = {"type": "string", "format": "date-time"}


def _object(**properties: JsonObject) -> JsonObject:
    return {"type": "object", "properties": properties}


def _root(**properties: JsonObject) -> JsonObject:
    return _object(apiVersion={"type": "string"}, kind={"type": "string"}, metadata={"type": "object"}, **properties)


_OBJECT_REFERENCE = _object(
    **{
        k: {"type": "string"}
        for k in ("apiVersion", "kind", "namespace", "name", "uid", "resourceVersion", "fieldPath")
    }
)


@dataclass(frozen=True)
class ResourceType:
    """One served group/version/resource and how the server treats it."""

    group: str
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    schema: JsonObject
    """Structural ``openAPIV3Schema`` of this version; objects are pruned, defaulted and checked by it."""
    status_subresource: bool = False
    """Writes to the object keep its ``.status``; only ``/status`` writes change it (and only it)."""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    tracks_generation: bool = False
    """``metadata.generation`` counts changes outside metadata (and status, with the subresource)."""
    unconditional_update: bool = True
    """A PUT without ``metadata.resourceVersion`` is accepted (built-ins) or refused (custom resources)."""
    custom: bool = False
    storage_version: str = ""
    """The version objects are stored in; other served versions only relabel ``apiVersion``."""
    crd_name: str = ""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        """Storage identity: all versions of a resource share one set of objects."""
        return (self.group, self.plural)

    def path(self, namespace: str | None = None, name: str = "", subresource: str = "") -> str:
        """The URL path of the collection, or of one object (and its subresource)."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        where = f"/namespaces/{namespace}" if self.namespaced and namespace else ""
        tail = "".join(f"/{part}" for part in (name, subresource) if part)
        return f"{base}{where}/{self.plural}{tail}"

    def subject(self, name: str = "") -> Subject:
        return Subject(self.group, self.plural, self.kind, name)

    def discovery(self) -> list[JsonObject]:
        """The APIResource entries of this type (and its status subresource) in an APIResourceList."""
        main: JsonObject = {
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(ALL_VERBS),
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        entries = [main]
        if self.status_subresource:
            entries.append(
                {
                    "name": f"{self.plural}/status",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind,
                    "verbs": list(STATUS_VERBS),
                }
            )
        return entries


def _builtin(
    group: str, version: str, kind: str, plural: str, namespaced: bool, schema: JsonObject, **kw: Any
) -> ResourceType:
    return ResourceType(group, version, plural, kind.lower(), kind, namespaced, schema, storage_version=version, **kw)


CRD_TYPE = _builtin(
    "apiextensions.k8s.io",
    "v1",
    "CustomResourceDefinition",
    "customresourcedefinitions",
    False,
    _root(spec=_PRESERVE, status=_PRESERVE),
    status_subresource=True,
    short_names=("crd", "crds"),
    categories=("api-extensions",),
    tracks_generation=True,
    unconditional_update=False,
)
NAMESPACE_TYPE = _builtin(
    "",
    "v1",
    "Namespace",
    "namespaces",
    False,
    _root(spec=_object(finalizers={"type": "array", "items": {"type": "string"}}), status=_PRESERVE),
    status_subresource=True,
    short_names=("ns",),
)
_CORE_EVENT = _root(
    involvedObject=_OBJECT_REFERENCE,
    related=_OBJECT_REFERENCE,
    reason={"type": "string"},
    message={"type": "string"},
    type={"type": "string"},
    action={"type": "string"},
    count={"type": "integer", "format": "int32"},
    source=_object(component={"type": "string"}, host={"type": "string"}),
    firstTimestamp=_DATE_TIME,
    lastTimestamp=_DATE_TIME,
    eventTime=_DATE_TIME,
    series=_PRESERVE,
    reportingComponent={"type": "string"},
    reportingInstance={"type": "string"},
)
_LEASE_SPEC = _object(
    holderIdentity={"type": "string"},
    leaseDurationSeconds={"type": "integer", "format": "int32"},
    acquireTime=_DATE_TIME,
    renewTime=_DATE_TIME,
    leaseTransitions={"type": "integer", "format": "int32"},
    preferredHolder={"type": "string"},
    strategy={"type": "string"},
)
BUILTIN_TYPES = (
    NAMESPACE_TYPE,
    _builtin("", "v1", "Event", "events", True, _CORE_EVENT, short_names=("ev",)),
    _builtin(
        "",
        "v1",
        "ConfigMap",
        "configmaps",
        True,
        _root(data=_STRING_MAP, binaryData=_BYTES_MAP, immutable={"type": "boolean"}),
        short_names=("cm",),
    ),
    _builtin(
        "",
        "v1",
        "Secret",
        "secrets",
        True,
        _root(data=_BYTES_MAP, stringData=_STRING_MAP, type={"type": "string"}, immutable={"type": "boolean"}),
    ),
    _builtin("events.k8s.io", "v1", "Event", "events", True, {**_PRESERVE}, short_names=("ev",)),
    _builtin("coordination.k8s.io", "v1", "Lease", "leases", True, _root(spec=_LEASE_SPEC)),
    _builtin(
        "batch",
        "v1",
        "Job",
        "jobs",
        True,
        _root(spec=_PRESERVE, status=_PRESERVE),
        status_subresource=True,
        categories=("all",),
        tracks_generation=True,
    ),
    CRD_TYPE,
)

_VERSION = re.compile(r"^v(\d+)(?:(alpha|beta)(\d+))?$")


def version_priority(version: str) -> tuple[int, int, int, str]:
    """Sort key (ascending = preferred first) in Kubernetes order: v2 > v1 > v1beta2 > v1beta1 > v1alpha1 > other."""
    match = _VERSION.match(version)
    if match is None:
        return (3, 0, 0, version)
    major, stage, minor = match.groups()
    rank = {None: 0, "beta": 1, "alpha": 2}[stage]
    return (rank, -int(major), -int(minor or 0), version)


# ---------------------------------------------------------------- CRDs


def _crd_cause(where: str, message: str, reason: str = "FieldValueInvalid") -> Cause:
    return Cause(where, reason, message)


def crd_problems(crd: Mapping[str, Any]) -> list[Cause]:
    """What the real server refuses in a CRD that this server would otherwise serve wrongly."""
    spec = crd.get("spec")
    if not isinstance(spec, Mapping):
        return [_crd_cause("spec", "Required value", "FieldValueRequired")]
    names: Mapping[str, Any] = spec["names"] if isinstance(spec.get("names"), Mapping) else {}
    problems = [
        _crd_cause(f"spec.{where}", "Required value", "FieldValueRequired")
        for where, value in (
            ("names.plural", names.get("plural")),
            ("names.kind", names.get("kind")),
            ("group", spec.get("group")),
        )
        if not value
    ]
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        problems.append(_crd_cause("spec.scope", f'Unsupported value: "{spec.get("scope")}"', "FieldValueNotSupported"))
    expected = f"{names.get('plural')}.{spec.get('group')}"
    if crd.get("metadata", {}).get("name") != expected:
        why = f'Invalid value: must be spec.names.plural+"."+spec.group ({expected})'
        problems.append(_crd_cause("metadata.name", why))
    versions = spec.get("versions")
    if not isinstance(versions, list) or not all(isinstance(v, Mapping) and v.get("name") for v in versions):
        return [*problems, _crd_cause("spec.versions", "Required value: named versions", "FieldValueRequired")]
    if sum(1 for v in versions if v.get("storage")) != 1:
        why = "Invalid value: must have exactly one version marked as storage version"
        problems.append(_crd_cause("spec.versions", why))
    for index, version in enumerate(versions):
        problems += _version_problems(index, version)
    return problems


def _version_problems(index: int, version: Mapping[str, Any]) -> list[Cause]:
    where = f"spec.versions[{index}].schema.openAPIV3Schema"
    schema = (version.get("schema") or {}).get("openAPIV3Schema")
    if not isinstance(schema, Mapping):
        return [_crd_cause(where, "Required value: schemas are required", "FieldValueRequired")]
    if schema.get("type") != "object":
        return [_crd_cause(f"{where}.type", 'Required value: must be "object" at the root', "FieldValueRequired")]
    try:
        compile_all_rules(schema)
    except CelRuleError as exc:
        return [
            _crd_cause(f"{where}.{exc.path}.x-kubernetes-validations", f"Invalid value: {exc.rule!r}: {exc.reason}")
        ]
    return []


def types_from_crd(crd: Mapping[str, Any]) -> list[ResourceType]:
    """One :class:`ResourceType` per served version of a CRD already checked by :func:`crd_problems`."""
    spec = crd["spec"]
    names = spec["names"]
    storage = next(v["name"] for v in spec["versions"] if v.get("storage"))
    return [
        ResourceType(
            group=spec["group"],
            version=version["name"],
            plural=names["plural"],
            singular=names.get("singular") or names["kind"].lower(),
            kind=names["kind"],
            namespaced=spec["scope"] == "Namespaced",
            schema=version["schema"]["openAPIV3Schema"],
            status_subresource="status" in (version.get("subresources") or {}),
            short_names=tuple(names.get("shortNames") or ()),
            categories=tuple(names.get("categories") or ()),
            tracks_generation=True,
            unconditional_update=False,
            custom=True,
            storage_version=storage,
            crd_name=crd["metadata"]["name"],
        )
        for version in spec["versions"]
        if version.get("served", True)
    ]


@dataclass
class Catalog:
    """The served types: built-ins plus the types of established CRDs, by (group, version, plural)."""

    _types: dict[tuple[str, str, str], ResourceType] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for rtype in BUILTIN_TYPES:
            self._types[(rtype.group, rtype.version, rtype.plural)] = rtype

    def __iter__(self) -> Iterator[ResourceType]:
        return iter(list(self._types.values()))

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._types.get((group, version, plural))

    def install(self, crd: Mapping[str, Any]) -> None:
        """Serve (or re-serve, after an update) every served version of ``crd``."""
        self.uninstall(crd["metadata"]["name"])
        for rtype in types_from_crd(crd):
            self._types[(rtype.group, rtype.version, rtype.plural)] = rtype

    def uninstall(self, crd_name: str) -> None:
        for key in [k for k, t in self._types.items() if t.crd_name == crd_name]:
            del self._types[key]

    def groups(self) -> dict[str, list[str]]:
        """Served versions per group (``""`` is the core group), preferred version first."""
        out: dict[str, set[str]] = {}
        for rtype in self._types.values():
            out.setdefault(rtype.group, set()).add(rtype.version)
        return {group: sorted(versions, key=version_priority) for group, versions in sorted(out.items())}

    def in_version(self, group: str, version: str) -> list[ResourceType]:
        return sorted(
            (t for t in self._types.values() if (t.group, t.version) == (group, version)), key=lambda t: t.plural
        )

    def storage_type(self, key: tuple[str, str]) -> ResourceType | None:
        """The type whose version objects of ``key`` are stored in."""
        for rtype in self._types.values():
            if rtype.key == key and rtype.version == rtype.storage_version:
                return rtype
        return None

    def resolve(self, name: str) -> ResourceType:
        """A type by how ``kubectl`` names it: plural, ``plural.group``, singular, kind or short name.

        The preferred version of the matching group wins; raises KeyError when nothing matches.
        """
        wanted = name.lower()
        matches = [
            t
            for t in self._types.values()
            if wanted in {t.plural, f"{t.plural}.{t.group}", t.singular, t.kind.lower(), *t.short_names}
        ]
        if not matches:
            raise KeyError(name)
        # The core group first for bare names (as kubectl does: `events` are v1 events).
        matches.sort(key=lambda t: (t.group != "", t.group, version_priority(t.version)))
        return matches[0]

    def for_body(self, api_version: str, kind: str) -> ResourceType:
        """The type a document's ``apiVersion`` and ``kind`` name; KeyError when not served."""
        group, _, version = api_version.rpartition("/")
        for rtype in self._types.values():
            if (rtype.group, rtype.version, rtype.kind) == (group, version, kind):
                return rtype
        raise KeyError(f"{api_version} {kind}")


def crd_status(crd: Mapping[str, Any], old_status: Mapping[str, Any] | None) -> JsonObject:
    """The status the real server's controllers give an accepted CRD (at once, here)."""
    names = dict(crd["spec"]["names"])
    names.setdefault("singular", names["kind"].lower())
    names.setdefault("listKind", f"{names['kind']}List")
    since = {c.get("type"): c.get("lastTransitionTime") for c in (old_status or {}).get("conditions", [])}
    conditions = [
        ("NamesAccepted", "NoConflicts", "no conflicts found"),
        ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
    ]
    return {
        "acceptedNames": names,
        "conditions": [
            {
                "type": kind,
                "status": "True",
                "lastTransitionTime": since.get(kind) or now(),
                "reason": reason,
                "message": message,
            }
            for kind, reason, message in conditions
        ],
        "storedVersions": [v["name"] for v in crd["spec"]["versions"] if v.get("storage")],
    }


def kopf_peering_crds() -> list[JsonObject]:
    """kopf's peering CRDs (``kopf.dev/v1``), as kopf's documentation ships them, for HA tests."""
    return [_peering_crd("ClusterKopfPeering", "Cluster"), _peering_crd("KopfPeering", "Namespaced")]


def _peering_crd(kind: str, scope: str) -> JsonObject:
    plural = f"{kind.lower()}s"
    schema = _object(status={"type": "object", "x-kubernetes-preserve-unknown-fields": True})
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "scope": scope,
            "group": "kopf.dev",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}}],
        },
    }


def load_crd_documents(documents: Iterable[Any]) -> list[JsonObject]:
    """The CRDs among parsed YAML documents (others are skipped)."""
    return [d for d in documents if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition"]
