"""The embedded API: what a Kubernetes API server keeps for EdgeFleet's resources, as files.

One JSON file per object under ``ROOT/<plural>/[<namespace>/]<name>.json``, written atomically,
holding the object as the API server would serve it: ``metadata`` with ``uid``, ``generation``
(bumped on every spec change, never on metadata or status changes), ``creationTimestamp``,
``finalizers`` and, once deletion is asked for, ``deletionTimestamp``; ``spec`` as applied (CRD
defaults filled in); ``status`` as the reconciler last wrote it. Applying a set of manifests works
like ``kubectl apply --prune``: objects that are no longer in the files are deleted, through their
finalizer when they have one, so the reconciler can clean up (assignments, artifacts) first.

Ours on purpose, not a library: the whole contract is this small, and it keeps ``edgefleet up``
free of any server process.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from edgefleet_core.atomic import fsync_dir, write_file_atomic
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import EdgeModel
from edgefleet_core.resources.loading import MODELS, Resource
from edgefleet_operator.local.errors import StateError
from edgefleet_operator.local.manifests import NAMESPACED, PLURALS, Manifest, ObjectKey

logger = logging.getLogger(__name__)

FINALIZER: Final = "edgefleet.io/cleanup"
"""Held by every EdgeModel until the reconciler removed its assignments (and, per policy, artifacts)."""
APPLIED_FROM: Final = "edgefleet.io/applied-from"
"""Annotation naming the file an object was last applied from."""
MAX_OBJECT_BYTES: Final = 4 * 1024 * 1024
"""Largest stored object read back (the API server's own limit is ~1.5 MiB)."""
_FINALIZING: Final = {"EdgeModel": (FINALIZER,)}
"""Finalizers each kind gets on creation."""


def _timestamp(now: datetime) -> str:
    return now.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class StoredObject:
    """One object as the embedded API holds it (the wire form, camelCase)."""

    key: ObjectKey
    body: Mapping[str, Any]

    @property
    def metadata(self) -> Mapping[str, Any]:
        meta = self.body.get("metadata")
        return meta if isinstance(meta, Mapping) else {}

    @property
    def generation(self) -> int:
        value = self.metadata.get("generation")
        return value if isinstance(value, int) else 0

    @property
    def deleting(self) -> bool:
        """Deletion was asked for; the object stays until its finalizers are removed."""
        return self.metadata.get("deletionTimestamp") is not None

    @property
    def finalizers(self) -> list[str]:
        value = self.metadata.get("finalizers")
        return [f for f in value if isinstance(f, str)] if isinstance(value, list) else []

    @property
    def applied_from(self) -> Path | None:
        annotations = self.metadata.get("annotations")
        found = annotations.get(APPLIED_FROM) if isinstance(annotations, Mapping) else None
        return Path(found) if isinstance(found, str) else None

    @property
    def status(self) -> Mapping[str, Any] | None:
        value = self.body.get("status")
        return value if isinstance(value, Mapping) else None

    def resource(self) -> Resource:
        """The typed resource, status included (the reconciler reads the status it wrote last time)."""
        return MODELS[self.key.kind].model_validate(self.body)

    def edge_model(self) -> EdgeModel:
        found = self.resource()
        assert isinstance(found, EdgeModel)  # the key's kind says so
        return found

    def device_class(self) -> DeviceClass:
        found = self.resource()
        assert isinstance(found, DeviceClass)
        return found


@dataclass
class ApplyOutcome:
    """What one :meth:`LocalApi.apply` changed, object by object."""

    created: list[ObjectKey] = field(default_factory=list)
    configured: list[ObjectKey] = field(default_factory=list)
    """Spec changed: the generation went up."""
    relabeled: list[ObjectKey] = field(default_factory=list)
    """Only metadata (labels, annotations, the file it came from) changed."""
    deleting: list[ObjectKey] = field(default_factory=list)
    """No longer in the files and held by a finalizer: deletion was asked for."""
    deleted: list[ObjectKey] = field(default_factory=list)
    """No longer in the files and without finalizers: gone."""
    waiting: list[ObjectKey] = field(default_factory=list)
    """In the files again while the old object is still being finalized: created once that is done."""

    @property
    def changed(self) -> bool:
        return bool(self.created or self.configured or self.relabeled or self.deleting or self.deleted)

    def kinds_changed(self) -> set[str]:
        keys = (*self.created, *self.configured, *self.relabeled, *self.deleting, *self.deleted)
        return {k.kind for k in keys}


class LocalApi:
    """The embedded API's objects under ``root``; one writer at a time (the state folder's lock)."""

    def __init__(self, root: Path, *, clock: Callable[[], datetime] | None = None) -> None:
        self.root = root
        self._clock = clock or (lambda: datetime.now(UTC))

    # ------------------------------------------------------------------ reading

    def _path(self, key: ObjectKey) -> Path:
        folder = self.root / PLURALS[key.kind]
        if key.namespace is not None:
            folder = folder / key.namespace
        return folder / f"{key.name}.json"

    def _read(self, path: Path, kind: str) -> StoredObject:
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_OBJECT_BYTES + 1)
            if len(raw) > MAX_OBJECT_BYTES:
                raise StateError(f"{path}: over {MAX_OBJECT_BYTES} bytes, not an object this API wrote")
            body = json.loads(raw)
        except OSError as exc:
            raise StateError(f"cannot read {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise StateError(f"{path} is not valid JSON ({exc}); remove it to start that object afresh") from None
        if not isinstance(body, dict) or body.get("kind") != kind:
            raise StateError(f"{path} does not hold a {kind}; remove it to start that object afresh")
        metadata = body.get("metadata")
        name = metadata.get("name") if isinstance(metadata, dict) else None
        namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
        if not isinstance(name, str) or (kind in NAMESPACED) != isinstance(namespace, str):
            raise StateError(f"{path} has no usable metadata; remove it to start that object afresh")
        key = ObjectKey(kind, namespace if kind in NAMESPACED else None, name)
        if self._path(key) != path:
            raise StateError(f"{path} holds {key}, which belongs elsewhere; remove it")
        stored = StoredObject(key, body)
        try:
            stored.resource()
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise StateError(
                f"{path} is not a valid {kind} ({where}: {first['msg']}); remove it to start that object afresh"
            ) from None
        return stored

    def get(self, key: ObjectKey) -> StoredObject | None:
        path = self._path(key)
        return self._read(path, key.kind) if path.is_file() else None

    def objects(self, kind: str) -> list[StoredObject]:
        """Every stored object of ``kind``, sorted by key."""
        folder = self.root / PLURALS[kind]
        if not folder.is_dir():
            return []
        pattern = "*/*.json" if kind in NAMESPACED else "*.json"
        # Temporary files of an interrupted atomic write start with a dot; they are not objects.
        found = [self._read(p, kind) for p in folder.glob(pattern) if not p.name.startswith(".")]
        return sorted(found, key=lambda o: o.key)

    def all(self) -> list[StoredObject]:
        return [o for kind in PLURALS for o in self.objects(kind)]

    # ------------------------------------------------------------------ writing

    def _write(self, key: ObjectKey, body: Mapping[str, Any]) -> StoredObject:
        data = json.dumps(body, indent=2, sort_keys=False).encode("utf-8") + b"\n"
        try:
            write_file_atomic(self._path(key), data)
        except OSError as exc:
            raise StateError(f"cannot write {self._path(key)}: {exc.strerror or exc}") from None
        return StoredObject(key, body)

    def _create(self, manifest: Manifest) -> StoredObject:
        wire = manifest.resource.to_wire()
        labels, annotations = _user_metadata(manifest)
        metadata: dict[str, Any] = {
            "name": manifest.key.name,
            **({"namespace": manifest.key.namespace} if manifest.key.namespace is not None else {}),
            "uid": str(uuid.uuid4()),
            "generation": 1,
            "creationTimestamp": _timestamp(self._clock()),
            "labels": labels,
            "annotations": annotations,
        }
        finalizers = _FINALIZING.get(manifest.key.kind)
        if finalizers:
            metadata["finalizers"] = list(finalizers)
        body = {"apiVersion": wire["apiVersion"], "kind": wire["kind"], "metadata": metadata, "spec": wire["spec"]}
        return self._write(manifest.key, body)

    def _update(self, stored: StoredObject, manifest: Manifest) -> tuple[StoredObject, bool, bool]:
        """The object with the manifest's spec and metadata; whether the spec and whether metadata changed."""
        wire = manifest.resource.to_wire()
        metadata = dict(stored.metadata)
        labels, annotations = _user_metadata(manifest)
        spec_changed = stored.body.get("spec") != wire["spec"]
        meta_changed = metadata.get("labels", {}) != labels or metadata.get("annotations", {}) != annotations
        if not spec_changed and not meta_changed:
            return stored, False, False
        metadata["labels"], metadata["annotations"] = labels, annotations
        if spec_changed:
            metadata["generation"] = stored.generation + 1
        body = {**stored.body, "metadata": metadata, "spec": wire["spec"]}
        return self._write(stored.key, body), spec_changed, meta_changed

    def apply(self, manifests: Sequence[Manifest]) -> ApplyOutcome:
        """Make the stored objects what ``manifests`` say; ask for deletion of the others."""
        outcome = ApplyOutcome()
        wanted = {m.key: m for m in manifests}
        for manifest in manifests:
            stored = self.get(manifest.key)
            if stored is None:
                self._create(manifest)
                outcome.created.append(manifest.key)
            elif stored.deleting:
                outcome.waiting.append(manifest.key)
            else:
                _, spec_changed, meta_changed = self._update(stored, manifest)
                if spec_changed:
                    outcome.configured.append(manifest.key)
                elif meta_changed:
                    outcome.relabeled.append(manifest.key)
        for stored in self.all():
            if stored.key in wanted or stored.deleting:
                continue
            if self.delete(stored):
                outcome.deleted.append(stored.key)
            else:
                outcome.deleting.append(stored.key)
        return outcome

    def delete(self, stored: StoredObject) -> bool:
        """Ask for deletion: gone at once without finalizers (True), else marked with ``deletionTimestamp``."""
        if not stored.finalizers:
            self._remove(stored.key)
            return True
        metadata = {**stored.metadata, "deletionTimestamp": _timestamp(self._clock())}
        self._write(stored.key, {**stored.body, "metadata": metadata})
        return False

    def remove_finalizer(self, stored: StoredObject, finalizer: str) -> bool:
        """Drop ``finalizer``; a deleting object without finalizers left is gone (True)."""
        left = [f for f in stored.finalizers if f != finalizer]
        if stored.deleting and not left:
            self._remove(stored.key)
            return True
        metadata = {**stored.metadata, "finalizers": left}
        if not left:
            metadata.pop("finalizers")
        self._write(stored.key, {**stored.body, "metadata": metadata})
        return False

    def write_status(self, key: ObjectKey, status: Mapping[str, Any]) -> bool:
        """Store ``status`` (the status subresource: spec and metadata untouched); False when it was already so."""
        stored = self.get(key)
        if stored is None:
            raise StateError(f"{key} is not stored; cannot write its status")
        if stored.status == status:
            return False
        self._write(key, {**stored.body, "status": dict(status)})
        return True

    def _remove(self, key: ObjectKey) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)
        except OSError as exc:
            raise StateError(f"cannot remove {path}: {exc.strerror or exc}") from None


def _user_metadata(manifest: Manifest) -> tuple[dict[str, str], dict[str, str]]:
    """The labels and annotations the file gives, plus the annotation naming the file."""
    meta = manifest.resource.metadata
    return dict(meta.labels), {**meta.annotations, APPLIED_FROM: str(manifest.path)}
