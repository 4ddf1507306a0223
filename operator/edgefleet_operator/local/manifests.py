"""The resources ``edgefleet up -f PATH`` applies: read, validated and keyed, before anything is stored.

Like ``kubectl apply -f``: a file is read as it is; a folder contributes the resource files directly
in it (``.yaml``, ``.yml``, ``.json``), not those of its subfolders. Every document is checked
against its CRD and its model (:func:`edgefleet_core.resources.loading.parse_resource`), so a file
that applies here applies to a cluster. Problems are collected over all files, so one run shows
everything to fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edgefleet_core.errors import FieldProblem, ResourceError
from edgefleet_core.resources.loading import RESOURCE_SUFFIXES, Resource, parse_resource, read_documents
from edgefleet_operator.local.errors import InputError

DEFAULT_NAMESPACE: Final = "default"
"""The namespace of a namespaced resource that names none (as kubectl's default context does)."""
PLURALS: Final = {"DeviceClass": "deviceclasses", "EdgeModel": "edgemodels", "EdgeDevice": "edgedevices"}
"""The resource kinds and their plural (the API path segment and the state folder's subfolder)."""
NAMESPACED: Final = frozenset({"EdgeModel", "EdgeDevice"})


@dataclass(frozen=True, order=True)
class ObjectKey:
    """Which object: kind, namespace (``None`` for cluster-scoped kinds) and name."""

    kind: str
    namespace: str | None
    name: str

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace is not None else self.name
        return f"{self.kind} {where}"

    @property
    def short(self) -> str:
        """``namespace/name`` or ``name``."""
        return f"{self.namespace}/{self.name}" if self.namespace is not None else self.name


@dataclass(frozen=True)
class Manifest:
    """One resource as a file gives it, validated, defaulted, with where it came from."""

    key: ObjectKey
    resource: Resource
    source: str
    """The file, with ``#index`` for a document of a multi-document file (as errors name it)."""
    path: Path
    """The file, absolute: relative sources of an EdgeModel resolve against its folder."""

    @property
    def folder(self) -> Path:
        return self.path.parent


def key_of(resource: Resource) -> ObjectKey:
    """The object key of a parsed resource (namespaced kinds default to :data:`DEFAULT_NAMESPACE`)."""
    kind = resource.kind
    namespace = (resource.metadata.namespace or DEFAULT_NAMESPACE) if kind in NAMESPACED else None
    return ObjectKey(kind, namespace, resource.metadata.name)


def _files(path: Path) -> list[Path]:
    """The resource files ``path`` names: itself, or the resource files directly in a folder."""
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in RESOURCE_SUFFIXES and p.is_file())
        if not found:
            raise ResourceError(
                str(path),
                [FieldProblem("(folder)", f"holds no resource files ({', '.join(RESOURCE_SUFFIXES)})", "schema")],
            )
        return found
    if not path.exists():
        raise ResourceError(str(path), [FieldProblem("(file)", "no such file or folder", "schema")])
    return [path]


def read_manifests(paths: Sequence[Path]) -> list[Manifest]:
    """Every resource of ``paths``, in order; :class:`InputError` listing every problem of every file.

    Besides what the CRDs and models check: the same object twice (in one file or in two) is an
    error naming both places.
    """
    problems: list[ResourceError] = []
    manifests: list[Manifest] = []
    seen: dict[ObjectKey, str] = {}
    for path in paths:
        try:
            files = _files(path)
        except ResourceError as exc:
            problems.append(exc)
            continue
        for file in files:
            try:
                documents = read_documents(file)
            except ResourceError as exc:
                problems.append(exc)
                continue
            for document in documents:
                try:
                    resource = parse_resource(document.body, document.source)
                except ResourceError as exc:
                    problems.append(exc)
                    continue
                key = key_of(resource)
                earlier = seen.get(key)
                if earlier is not None:
                    problems.append(
                        ResourceError(
                            document.source, [FieldProblem("metadata.name", f"{key} is also in {earlier}", "schema")]
                        )
                    )
                    continue
                seen[key] = document.source
                manifests.append(Manifest(key, resource, document.source, file.absolute()))
    if problems:
        raise InputError(problems)
    return manifests
