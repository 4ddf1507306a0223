"""The objects of the test API server and the rules of every write, as the real server applies them.

One global, monotonically increasing resourceVersion orders all writes; each write that changes an
object is kept in a bounded history that watches resume from (older versions answer 410). A write
that changes nothing gets no new resourceVersion and no event, as with etcd behind the real server.
The store is not thread-safe: the server runs every call on its own event loop thread. Stored
objects are never changed in place; reads hand out copies (:meth:`Store.present`).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from edgefleet_operator.devtools.kube_api import errors, meta, schema
from edgefleet_operator.devtools.kube_api.catalog import (
    CRD_CLEANUP_FINALIZER,
    CRD_TYPE,
    NAMESPACE_TYPE,
    Catalog,
    ResourceType,
    crd_problems,
    crd_status,
)
from edgefleet_operator.devtools.kube_api.errors import ApiError, Cause
from edgefleet_operator.devtools.kube_api.patches import apply_patch

JsonObject = dict[str, Any]
T = TypeVar("T")
Key = tuple[str, str]
"""(group, plural): all versions of a resource share their objects."""
ObjectId = tuple[str, str]
"""(namespace or "", name)."""

FIELD_VALIDATION = ("Ignore", "Warn", "Strict")
PROPAGATION_POLICIES = ("Orphan", "Background", "Foreground")


@dataclass(frozen=True)
class WatchEvent:
    """One change, as watches stream it; ``old`` lets selector watches turn it into ADDED/DELETED."""

    resource_version: int
    key: Key
    type: str
    obj: JsonObject
    """The object after the change (for DELETED: its last state), as stored: read-only."""
    old: JsonObject | None


@dataclass(frozen=True)
class Written:
    """The outcome of a write: the object as served, warnings for the ``Warning`` header, the HTTP code."""

    obj: JsonObject
    warnings: tuple[str, ...] = ()
    code: int = 200


def _clone(value: T) -> T:
    # Objects are JSON: a JSON round trip copies them several times faster than copy.deepcopy.
    copied: T = json.loads(json.dumps(value))
    return copied


def _meta(obj: Mapping[str, Any]) -> JsonObject:
    found: JsonObject = obj["metadata"]
    return found


def _rv(obj: Mapping[str, Any]) -> str:
    return str(_meta(obj).get("resourceVersion", ""))


def _without(obj: Mapping[str, Any], *keys: str) -> JsonObject:
    return {k: v for k, v in obj.items() if k not in keys}


class Store:
    """Objects by type and (namespace, name), the write rules, and the change history."""

    def __init__(self, catalog: Catalog, *, history_limit: int, on_change: Callable[[WatchEvent], None]) -> None:
        self.catalog = catalog
        self.objects: dict[Key, dict[ObjectId, JsonObject]] = {}
        self.history: deque[WatchEvent] = deque(maxlen=history_limit)
        self.compacted = 0
        """Changes up to this resourceVersion are forgotten: watches from older versions get 410."""
        self._rv = 0
        self._on_change = on_change
        self._settling = False

    # ------------------------------------------------------------ reading

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    def present(self, rtype: ResourceType, stored: Mapping[str, Any]) -> JsonObject:
        """A copy of a stored object as served in ``rtype``'s version."""
        out = _clone(dict(stored))
        out["apiVersion"], out["kind"] = rtype.api_version, rtype.kind
        return out

    def _bucket(self, rtype: ResourceType) -> dict[ObjectId, JsonObject]:
        return self.objects.setdefault(rtype.key, {})

    def _find(self, rtype: ResourceType, namespace: str | None, name: str) -> JsonObject:
        found = self._bucket(rtype).get((namespace or "", name))
        if found is None:
            raise errors.not_found(rtype.subject(name))
        return found

    def get(self, rtype: ResourceType, namespace: str | None, name: str) -> JsonObject:
        return self.present(rtype, self._find(rtype, namespace, name))

    def select(
        self, rtype: ResourceType, namespace: str | None, matches: Callable[[Mapping[str, Any]], bool]
    ) -> list[JsonObject]:
        """Stored objects of a type (in one namespace, or all), sorted by (namespace, name)."""
        bucket = self._bucket(rtype)
        ids = sorted(i for i in bucket if namespace is None or i[0] == namespace)
        return [bucket[i] for i in ids if matches(bucket[i])]

    def events_since(self, key: Key, resource_version: int) -> list[WatchEvent]:
        """Changes of one resource after ``resource_version``; 410 Expired when they are forgotten."""
        if resource_version < self.compacted:
            raise errors.expired(f"too old resource version: {resource_version} ({self.compacted + 1})")
        if resource_version > self._rv:  # e.g. a client of a previous run of this server
            message = f"Too large resource version: {resource_version}, current: {self._rv}"
            raise ApiError(
                504, "Timeout", message, {"causes": [{"reason": "ResourceVersionTooLarge", "message": message}]}
            )
        return [e for e in self.history if e.key == key and e.resource_version > resource_version]

    def compact(self) -> None:
        self.compacted = self._rv
        self.history.clear()

    # ------------------------------------------------------------ committing

    def _commit(self, rtype: ResourceType, kind: str, obj: JsonObject, old: JsonObject | None) -> JsonObject:
        self._rv += 1
        _meta(obj)["resourceVersion"] = str(self._rv)
        object_id = (_meta(obj).get("namespace", ""), _meta(obj)["name"])
        bucket = self._bucket(rtype)
        if kind == "DELETED":
            bucket.pop(object_id, None)
        else:
            bucket[object_id] = obj
        if len(self.history) == self.history.maxlen and self.history:
            self.compacted = self.history[0].resource_version
        # No copies: a stored object is never changed in place (every write stores a new one), so
        # the history can share them with the store.
        event = WatchEvent(self._rv, rtype.key, kind, obj, old)
        self.history.append(event)
        self._on_change(event)
        return obj

    def _remove(self, rtype: ResourceType, obj: JsonObject, old: JsonObject | None = None) -> None:
        self._commit(rtype, "DELETED", _clone(obj), old or obj)
        if rtype.key == CRD_TYPE.key:
            self.catalog.uninstall(_meta(obj)["name"])
        self._settle()

    # ------------------------------------------------------------ admission (shared by every write)

    def _decode(self, rtype: ResourceType, body: object) -> JsonObject:
        if not isinstance(body, dict):
            raise errors.bad_request(f"the body of the request must be a JSON object, not {type(body).__name__}")
        obj = _clone(body)
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if api_version not in (None, "", rtype.api_version):
            why = f"the API version in the data ({api_version}) does not match the expected API version"
            raise errors.bad_request(f"{why} ({rtype.api_version})")
        if kind not in (None, "", rtype.kind):
            raise errors.bad_request(f"the kind in the data ({kind}) does not match the expected kind ({rtype.kind})")
        if not isinstance(obj.setdefault("metadata", {}), dict):
            raise errors.bad_request("metadata must be a JSON object")
        storage = self.catalog.storage_type(rtype.key) or rtype
        obj["apiVersion"], obj["kind"] = storage.api_version, storage.kind
        return obj

    def _admit(
        self, rtype: ResourceType, obj: JsonObject, field_validation: str, old: JsonObject | None = None
    ) -> list[str]:
        """Prune, default and validate ``obj`` in place; returns warnings, raises 400/422 refusals."""
        if field_validation not in FIELD_VALIDATION:
            raise errors.bad_request(f"fieldValidation parameter unsupported: {field_validation}")
        unknown = meta.prune_metadata(_meta(obj)) + schema.prune(obj, rtype.schema)
        if unknown and field_validation == "Strict":
            listed = ", ".join(f'unknown field "{u}"' for u in unknown)
            what = f'{rtype.kind} in version "{rtype.version}" cannot be handled as a {rtype.kind}'
            raise errors.bad_request(f"{what}: strict decoding error: {listed}")
        warnings = [f'unknown field "{u}"' for u in unknown] if field_validation == "Warn" else []
        schema.apply_defaults(obj, rtype.schema)
        causes, meta_warnings = meta.metadata_problems(_meta(obj), is_namespace=rtype.key == NAMESPACE_TYPE.key)
        causes += schema.validation_causes(obj, rtype.schema, old) + _type_causes(rtype, obj)
        if causes:
            raise errors.invalid(rtype.subject(str(_meta(obj).get("name", ""))), causes)
        return warnings + meta_warnings

    # ------------------------------------------------------------ create

    def create(
        self, rtype: ResourceType, namespace: str | None, body: object, *, field_validation: str = "Warn"
    ) -> Written:
        obj = self._decode(rtype, body)
        metadata = _meta(obj)
        if rtype.namespaced:
            namespace = self._target_namespace(rtype, namespace, metadata)
        else:
            metadata.pop("namespace", None)
        if metadata.get("resourceVersion"):
            raise errors.bad_request("resourceVersion should not be set on objects to be created")
        for name in meta.SYSTEM_FIELDS:
            metadata.pop(name, None)
        if rtype.status_subresource:
            obj.pop("status", None)
        if not metadata.get("name"):
            if not metadata.get("generateName"):
                cause = Cause("metadata.name", "FieldValueRequired", "Required value: name or generateName is required")
                raise errors.invalid(rtype.subject(), [cause])
            metadata["name"] = self._free_name(rtype, namespace, str(metadata["generateName"]))
        _prepare(rtype, obj, None)
        warnings = self._admit(rtype, obj, field_validation)
        if (namespace or "", metadata["name"]) in self._bucket(rtype):
            raise errors.already_exists(rtype.subject(metadata["name"]))
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = meta.now()
        if rtype.tracks_generation:
            metadata["generation"] = 1
        self._commit(rtype, "ADDED", obj, None)
        if rtype.key == CRD_TYPE.key:
            self.catalog.install(obj)
        return Written(self.present(rtype, obj), tuple(warnings), 201)

    def _target_namespace(self, rtype: ResourceType, namespace: str | None, metadata: JsonObject) -> str:
        in_body = metadata.get("namespace")
        if namespace is None:
            raise errors.no_such_path()
        if in_body not in (None, "", namespace):
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        metadata["namespace"] = namespace
        found = self._bucket(NAMESPACE_TYPE).get(("", namespace))
        if found is None:
            raise errors.not_found(NAMESPACE_TYPE.subject(namespace))
        if _meta(found).get("deletionTimestamp"):
            why = f"unable to create new content in namespace {namespace} because it is being terminated"
            raise errors.forbidden(rtype.subject(str(metadata.get("name") or "")), why)
        return namespace

    def _free_name(self, rtype: ResourceType, namespace: str | None, prefix: str) -> str:
        bucket = self._bucket(rtype)
        while True:
            name = meta.generated_name(prefix)
            if (namespace or "", name) not in bucket:
                return name

    # ------------------------------------------------------------ update and patch

    def update(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        body: object,
        *,
        subresource: str | None = None,
        field_validation: str = "Warn",
        conditional: bool = True,
    ) -> Written:
        """PUT: replace the object (or only its status, for ``subresource="status"``)."""
        new = self._decode(rtype, body)
        metadata = _meta(new)
        if metadata.get("name") not in (None, "", name):
            raise errors.bad_request(
                f"the name of the object ({metadata['name']}) does not match the name on the URL ({name})"
            )
        if rtype.namespaced and metadata.get("namespace") not in (None, "", namespace):
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        old = self._find(rtype, namespace, name)
        sent_rv = metadata.get("resourceVersion")
        if sent_rv and str(sent_rv) != _rv(old):
            raise errors.conflict(rtype.subject(name))
        if not sent_rv and conditional and not rtype.unconditional_update:
            cause = Cause(
                "metadata.resourceVersion", "FieldValueInvalid", "Invalid value: 0x0: must be specified for an update"
            )
            raise errors.invalid(rtype.subject(name), [cause])
        candidate = _only_writable(rtype, old, new, subresource)
        _prepare(rtype, candidate, old)
        warnings = self._admit(rtype, candidate, field_validation, old)
        _check_finalizers_while_deleting(rtype, old, candidate)
        if rtype.tracks_generation and _without(candidate, *_unversioned(rtype)) != _without(old, *_unversioned(rtype)):
            _meta(candidate)["generation"] = int(_meta(old).get("generation", 0)) + 1
        if candidate == old:
            return Written(self.present(rtype, old), tuple(warnings))
        if _meta(candidate).get("deletionTimestamp") and not _blocks_removal(rtype, candidate):
            self._remove(rtype, candidate, old)
        else:
            self._commit(rtype, "MODIFIED", candidate, old)
            if rtype.key == CRD_TYPE.key:
                self.catalog.install(candidate)
        return Written(self.present(rtype, candidate), tuple(warnings))

    def patch(
        self,
        rtype: ResourceType,
        namespace: str | None,
        name: str,
        content_type: str,
        patch: object,
        *,
        subresource: str | None = None,
        field_validation: str = "Warn",
    ) -> Written:
        """PATCH: apply to the current object, then the same rules as an update.

        A patch that names a resourceVersion is a conditional write (409 when stale); one that does
        not is unconditional, as on the real server.
        """
        current = self.get(rtype, namespace, name)
        patched = apply_patch(current, content_type, patch)
        if not isinstance(patched.get("metadata"), dict):
            patched["metadata"] = {}
        sent_rv = _meta(patched).get("resourceVersion")
        if sent_rv is not None and str(sent_rv) != _rv(current):
            raise errors.conflict(rtype.subject(name))
        _meta(patched)["resourceVersion"] = _rv(current)
        return self.update(
            rtype,
            namespace,
            name,
            patched,
            subresource=subresource,
            field_validation=field_validation,
            conditional=False,
        )

    # ------------------------------------------------------------ delete

    def delete(self, rtype: ResourceType, namespace: str | None, name: str, options: Mapping[str, Any]) -> Written:
        """DELETE: gone at once, or marked (deletionTimestamp) while finalizers remain."""
        obj = self._find(rtype, namespace, name)
        _check_delete_options(rtype, obj, options)
        if options.get("propagationPolicy") == "Orphan":
            self._orphan_dependents(_meta(obj)["uid"])
        reply = self._delete(rtype, obj)
        self._settle()
        return reply

    def _delete(self, rtype: ResourceType, obj: JsonObject) -> Written:
        if _meta(obj).get("deletionTimestamp"):
            return Written(self.present(rtype, obj))
        if not _blocks_removal(rtype, obj):
            self._remove(rtype, obj)
            return Written(self._deleted_reply(rtype, obj))
        marked = _clone(obj)
        metadata = _meta(marked)
        metadata["deletionTimestamp"] = meta.now()
        metadata["deletionGracePeriodSeconds"] = 0
        if rtype.tracks_generation:
            metadata["generation"] = int(metadata.get("generation", 0)) + 1
        if rtype.key == NAMESPACE_TYPE.key:
            marked["status"] = {"phase": "Terminating"}
        return Written(self.present(rtype, self._commit(rtype, "MODIFIED", marked, obj)))

    def _deleted_reply(self, rtype: ResourceType, obj: JsonObject) -> JsonObject:
        # Custom resources answer with the deleted object, most built-ins with a Success Status.
        if rtype.custom:
            return self.present(rtype, obj)
        details = {"name": _meta(obj)["name"], "group": rtype.group, "kind": rtype.plural, "uid": _meta(obj)["uid"]}
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}

    def _all(self) -> list[tuple[ResourceType, JsonObject]]:
        out: list[tuple[ResourceType, JsonObject]] = []
        for key, bucket in self.objects.items():
            rtype = self.catalog.storage_type(key)
            if rtype is not None:
                out += [(rtype, obj) for obj in bucket.values()]
        return out

    def _settle(self) -> None:
        """What the real cluster's controllers do after a deletion: namespace and CRD cleanup, owner GC."""
        if self._settling:
            return  # the outer loop sees what this write changed
        self._settling = True
        try:
            while self._settle_once():
                pass
        finally:
            self._settling = False

    def _settle_once(self) -> bool:
        everything = self._all()
        live_uids = {_meta(obj).get("uid") for _, obj in everything}
        doomed = [
            (t, o) for t, o in everything if not _meta(o).get("deletionTimestamp") and self._doomed(t, o, live_uids)
        ]
        for rtype, obj in doomed:
            self._delete(rtype, obj)
        released = [
            (t, o) for t, o in everything if _meta(o).get("deletionTimestamp") and self._release_system_finalizer(t, o)
        ]
        return bool(doomed or released)

    def _doomed(self, rtype: ResourceType, obj: JsonObject, live_uids: set[Any]) -> bool:
        """In a namespace being deleted, an instance of a CRD being deleted, or every owner gone."""
        metadata = _meta(obj)
        namespace = self._bucket(NAMESPACE_TYPE).get(("", metadata.get("namespace", "")))
        if rtype.namespaced and (namespace is None or _meta(namespace).get("deletionTimestamp")):
            return True
        crd = self._bucket(CRD_TYPE).get(("", rtype.crd_name)) if rtype.custom else None
        if crd is not None and _meta(crd).get("deletionTimestamp"):
            return True
        owners = [ref.get("uid") for ref in metadata.get("ownerReferences") or []]
        return bool(owners) and not any(uid in live_uids for uid in owners)

    def _release_system_finalizer(self, rtype: ResourceType, obj: JsonObject) -> bool:
        """Drop the namespace's or CRD's own finalizer once what it waits for is gone."""
        name = _meta(obj)["name"]
        if rtype.key == NAMESPACE_TYPE.key:
            if "kubernetes" not in obj.get("spec", {}).get("finalizers", []):
                return False
            if any(i[0] == name for bucket in self.objects.values() for i in bucket):
                return False
            spec = {"finalizers": [f for f in obj["spec"]["finalizers"] if f != "kubernetes"]}
            self.update(rtype, None, name, {**obj, "spec": spec}, conditional=False)
            return True
        if rtype.key == CRD_TYPE.key and CRD_CLEANUP_FINALIZER in (_meta(obj).get("finalizers") or []):
            served = self.catalog.storage_type((obj["spec"]["group"], obj["spec"]["names"]["plural"]))
            if served is not None and self._bucket(served):
                return False
            finalizers = [f for f in _meta(obj)["finalizers"] if f != CRD_CLEANUP_FINALIZER]
            self.update(
                rtype, None, name, {**obj, "metadata": {**_meta(obj), "finalizers": finalizers}}, conditional=False
            )
            return True
        return False

    def _orphan_dependents(self, uid: str) -> None:
        for rtype, obj in list(self._all()):
            refs = _meta(obj).get("ownerReferences") or []
            if any(ref.get("uid") == uid for ref in refs):
                kept = [ref for ref in refs if ref.get("uid") != uid]
                body = {**obj, "metadata": {**_meta(obj), "ownerReferences": kept}}
                self.update(rtype, _meta(obj).get("namespace"), _meta(obj)["name"], body, conditional=False)


# ---------------------------------------------------------------- rules of one write


def _unversioned(rtype: ResourceType) -> tuple[str, ...]:
    """Top-level fields whose changes do not bump ``metadata.generation``."""
    return ("metadata", "status") if rtype.status_subresource else ("metadata",)


def _only_writable(rtype: ResourceType, old: JsonObject, new: JsonObject, subresource: str | None) -> JsonObject:
    """What a write may change: ``/status`` only the status; the main resource all but the status
    (with the subresource) and all but the server-owned metadata."""
    if subresource == "status":
        candidate = _clone(old)
        candidate.pop("status", None)
        if "status" in new:
            candidate["status"] = new["status"]
        return candidate
    candidate = new
    if rtype.status_subresource:
        candidate.pop("status", None)
        if "status" in old:
            candidate["status"] = _clone(old["status"])
    metadata = _meta(candidate)
    for name in (*meta.SYSTEM_FIELDS, "name", "namespace"):
        metadata.pop(name, None)
        if name in _meta(old):
            metadata[name] = _clone(_meta(old)[name])
    return candidate


def _check_finalizers_while_deleting(rtype: ResourceType, old: JsonObject, new: JsonObject) -> None:
    if not _meta(old).get("deletionTimestamp"):
        return
    added = [f for f in _meta(new).get("finalizers") or [] if f not in (_meta(old).get("finalizers") or [])]
    if added:
        shown = ", ".join(f'"{f}"' for f in added)
        why = "Forbidden: no new finalizers can be added if the object is being deleted"
        message = f"{why}, found new finalizers []string{{{shown}}}"
        raise errors.invalid(
            rtype.subject(_meta(old)["name"]), [Cause("metadata.finalizers", "FieldValueForbidden", message)]
        )


def _blocks_removal(rtype: ResourceType, obj: JsonObject) -> bool:
    if _meta(obj).get("finalizers"):
        return True
    return rtype.key == NAMESPACE_TYPE.key and bool(obj.get("spec", {}).get("finalizers"))


def _check_delete_options(rtype: ResourceType, obj: JsonObject, options: Mapping[str, Any]) -> None:
    policy = options.get("propagationPolicy")
    if policy is not None and policy not in PROPAGATION_POLICIES:
        raise errors.bad_request(f'propagationPolicy: Unsupported value: "{policy}"')
    preconditions = options.get("preconditions") or {}
    name = _meta(obj)["name"]
    for field, actual in (("uid", _meta(obj).get("uid")), ("resourceVersion", _rv(obj))):
        wanted = preconditions.get(field)
        if wanted is not None and str(wanted) != actual:
            label = field.capitalize()
            why = f"Precondition failed: {label} in precondition: {wanted}, {label} in object meta: {actual}"
            raise errors.conflict(rtype.subject(name), why)


def _prepare(rtype: ResourceType, obj: JsonObject, old: JsonObject | None) -> None:
    """Server-side defaults of particular built-ins, before admission."""
    if rtype.key == NAMESPACE_TYPE.key and old is None:
        name = str(_meta(obj).get("name", ""))
        _meta(obj).setdefault("labels", {})["kubernetes.io/metadata.name"] = name
        obj["spec"] = {"finalizers": ["kubernetes"]}
        obj["status"] = {"phase": "Active"}
    elif rtype.key == ("", "secrets"):
        for key, value in (obj.pop("stringData", None) or {}).items():
            obj.setdefault("data", {})[key] = base64.b64encode(str(value).encode()).decode()
        obj.setdefault("type", "Opaque")
    elif rtype.key == CRD_TYPE.key:
        _prepare_crd(obj, old)


def _prepare_crd(obj: JsonObject, old: JsonObject | None) -> None:
    if old is None:
        finalizers = _meta(obj).setdefault("finalizers", [])
        if CRD_CLEANUP_FINALIZER not in finalizers:
            finalizers.append(CRD_CLEANUP_FINALIZER)
    elif isinstance(obj.get("spec"), dict):
        for field in ("group", "scope"):
            if obj["spec"].get(field) != old["spec"].get(field):
                cause = Cause(
                    f"spec.{field}",
                    "FieldValueInvalid",
                    f"Invalid value: {obj['spec'].get(field)!r}: field is immutable",
                )
                raise errors.invalid(CRD_TYPE.subject(_meta(obj).get("name", "")), [cause])
    if not crd_problems(obj):  # a refused CRD gets no status: admission reports why
        obj["status"] = crd_status(obj, old.get("status") if old else None)


def _type_causes(rtype: ResourceType, obj: JsonObject) -> list[Cause]:
    """Checks of particular built-ins that their schema cannot say."""
    if rtype.key == CRD_TYPE.key:
        return crd_problems(obj)
    if rtype.key == ("", "events"):
        involved = obj.get("involvedObject", {}).get("namespace")
        if involved not in (None, "", _meta(obj).get("namespace")):
            return [
                Cause(
                    "involvedObject.namespace",
                    "FieldValueInvalid",
                    f'Invalid value: "{involved}": does not match event.namespace',
                )
            ]
    return []


__all__ = ["ApiError", "Store", "WatchEvent", "Written"]
