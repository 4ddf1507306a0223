"""Reading resource documents (YAML or JSON, one or many per file) into typed resources.

Every document is checked twice before it becomes a model: against its CRD the way the API server
would (so a file that passes here also applies to a cluster), then by the pydantic model (which
also enforces what the CRD says in CEL). Every problem names the field it is about.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from edgefleet_core.errors import FieldProblem, ResourceError
from edgefleet_core.resources.base import GROUP_VERSION
from edgefleet_core.resources.crds import apply_defaults, field_path, schema_problems
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_device import EdgeDevice
from edgefleet_core.resources.edge_model import EdgeModel

Resource = DeviceClass | EdgeModel | EdgeDevice
MODELS: Mapping[str, type[Resource]] = {"DeviceClass": DeviceClass, "EdgeModel": EdgeModel, "EdgeDevice": EdgeDevice}
"""The resource model of each kind."""

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024
"""Largest resource file read. The API server refuses objects over ~1.5 MiB; this leaves room for
comments and many documents while keeping a stray multi-gigabyte file from being read into memory."""

RESOURCE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class SourcedDocument:
    """A parsed document and where it came from."""

    source: str
    body: Mapping[str, Any]


def _kind_of(document: Mapping[str, Any], source: str) -> str:
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if api_version != GROUP_VERSION:
        raise ResourceError(
            source, [FieldProblem("apiVersion", f"must be {GROUP_VERSION}, got {api_version!r}", "schema")]
        )
    if kind not in MODELS:
        known = ", ".join(MODELS)
        raise ResourceError(source, [FieldProblem("kind", f"must be one of {known}, got {kind!r}", "schema")])
    return str(kind)


def _metadata_problems(document: Mapping[str, Any]) -> list[FieldProblem]:
    metadata = document.get("metadata")
    if not isinstance(metadata, Mapping):
        return [FieldProblem("metadata", "required object is missing", "schema")]
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        return [FieldProblem("metadata.name", "required field is missing", "schema")]
    return []


def _model_problems(exc: ValidationError) -> list[FieldProblem]:
    problems = []
    for err in exc.errors():
        # Our own validators' messages are written for users; drop pydantic's "Value error, " prefix.
        cause = err.get("ctx", {}).get("error")
        message = str(cause) if err["type"] == "value_error" and cause is not None else err["msg"]
        problems.append(FieldProblem(field_path(list(err["loc"])), message, "model"))
    return problems


def model_problems(kind: str, document: Mapping[str, Any]) -> list[FieldProblem]:
    """What the pydantic model of ``kind`` refuses in ``document`` (empty when it parses)."""
    try:
        MODELS[kind].model_validate(document)
    except ValidationError as exc:
        return _model_problems(exc)
    return []


def parse_resource(document: Mapping[str, Any], source: str = "<input>") -> Resource:
    """A typed resource from one document, checked against its CRD and its model, with defaults applied.

    Raises :class:`ResourceError` naming every field at fault.
    """
    kind = _kind_of(document, source)
    problems = _metadata_problems(document) or schema_problems(kind, document)
    if problems:
        raise ResourceError(source, problems)
    defaulted = apply_defaults(kind, document)
    try:
        return MODELS[kind].model_validate(defaulted)
    except ValidationError as exc:
        raise ResourceError(source, _model_problems(exc)) from None


def _documents_in_text(text: str, source: str) -> Iterator[SourcedDocument]:
    try:
        bodies = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ResourceError(source, [FieldProblem("(document)", f"not valid YAML: {exc}", "schema")]) from None
    for index, body in enumerate(bodies):
        where = f"{source}#{index}" if len(bodies) > 1 else source
        if body is None:  # an empty document between `---` separators
            continue
        if not isinstance(body, Mapping):
            raise ResourceError(where, [FieldProblem("(document)", "must be a mapping (an object)", "schema")])
        yield SourcedDocument(where, body)


def read_documents(path: Path) -> list[SourcedDocument]:
    """Every document in a file, or in the resource files of a folder (sorted, not recursive)."""
    files = sorted(p for p in path.iterdir() if p.suffix in RESOURCE_SUFFIXES) if path.is_dir() else [path]
    out: list[SourcedDocument] = []
    for file in files:
        try:
            size = file.stat().st_size
            if size > MAX_DOCUMENT_BYTES:
                raise ResourceError(
                    str(file),
                    [FieldProblem("(document)", f"file is {size} bytes, over {MAX_DOCUMENT_BYTES}", "schema")],
                )
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ResourceError(str(file), [FieldProblem("(document)", f"cannot read: {exc}", "schema")]) from None
        out.extend(_documents_in_text(text, str(file)))
    return out


def load_resources(paths: Iterable[Path]) -> list[Resource]:
    """Typed resources from files and folders; the first invalid document raises :class:`ResourceError`."""
    return [parse_resource(doc.body, doc.source) for path in paths for doc in read_documents(path)]
