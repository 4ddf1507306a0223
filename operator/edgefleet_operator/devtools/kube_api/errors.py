"""Kubernetes API errors as the API server reports them: a ``Status`` object with a code and a reason.

Clients branch on the code and reason (kopf on 404/409/410/422, the official clients on ``reason``),
so every refusal of the test server goes through :class:`ApiError` and keeps the real server's
wording where clients or people read it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

JsonObject = dict[str, Any]


@dataclass(frozen=True)
class Cause:
    """One field-level reason of an ``Invalid`` refusal (``details.causes[]``)."""

    field: str
    """Dotted path with list indices, e.g. ``spec.rollout.waves[1].percent``."""
    reason: str
    """``FieldValueInvalid``, ``FieldValueRequired``, ``FieldValueNotSupported``, ..."""
    message: str

    def as_json(self) -> JsonObject:
        return {"reason": self.reason, "message": self.message, "field": self.field}

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass(frozen=True)
class Subject:
    """What a refusal is about: fills ``details`` and the messages (``edgemodels.edgefleet.io "m"``)."""

    group: str
    resource: str
    """The plural, as the real server names it in NotFound/Conflict messages."""
    kind: str = ""
    name: str = ""

    @property
    def group_resource(self) -> str:
        return f"{self.resource}.{self.group}" if self.group else self.resource

    @property
    def group_kind(self) -> str:
        return f"{self.kind}.{self.group}" if self.group else self.kind


@dataclass
class ApiError(Exception):
    """A refused request; :meth:`status` is the body the server answers with."""

    code: int
    reason: str
    message: str
    details: JsonObject = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(f"{self.code} {self.reason}: {self.message}")

    def status(self) -> JsonObject:
        body: JsonObject = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _details(subject: Subject, *, kind: str | None = None) -> JsonObject:
    out: JsonObject = {"name": subject.name} if subject.name else {}
    if subject.group:
        out["group"] = subject.group
    out["kind"] = kind if kind is not None else subject.resource
    return out


def not_found(subject: Subject) -> ApiError:
    return ApiError(404, "NotFound", f'{subject.group_resource} "{subject.name}" not found', _details(subject))


def no_such_path() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def already_exists(subject: Subject) -> ApiError:
    message = f'{subject.group_resource} "{subject.name}" already exists'
    return ApiError(409, "AlreadyExists", message, _details(subject))


def conflict(subject: Subject, why: str = "") -> ApiError:
    why = why or "the object has been modified; please apply your changes to the latest version and try again"
    message = f'Operation cannot be fulfilled on {subject.group_resource} "{subject.name}": {why}'
    return ApiError(409, "Conflict", message, _details(subject))


def invalid(subject: Subject, causes: Sequence[Cause]) -> ApiError:
    listed = str(causes[0]) if len(causes) == 1 else "[" + ", ".join(str(c) for c in causes) + "]"
    message = f'{subject.group_kind} "{subject.name}" is invalid: {listed}'
    details = _details(subject, kind=subject.kind) | {"causes": [c.as_json() for c in causes]}
    return ApiError(422, "Invalid", message, details)


def unprocessable(message: str) -> ApiError:
    """A JSON patch that cannot be applied (a failed ``test`` op among them), as the real server says it."""
    return ApiError(422, "Invalid", message, {})


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message, {})


def forbidden(subject: Subject, why: str) -> ApiError:
    message = f'{subject.group_resource} "{subject.name}" is forbidden: {why}'
    return ApiError(403, "Forbidden", message, _details(subject))


def method_not_allowed() -> ApiError:
    return ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource", {})


def unsupported_media_type(content_type: str) -> ApiError:
    accepted = "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json"
    message = (
        f"the body of the request was in an unknown format ({content_type}) - accepted media types include: {accepted}"
    )
    return ApiError(415, "UnsupportedMediaType", message, {})


def expired(message: str) -> ApiError:
    """A resourceVersion older than the kept history: what watches and continue tokens get (410)."""
    return ApiError(410, "Expired", message, {})
