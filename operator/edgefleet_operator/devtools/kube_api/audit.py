"""What a request is about, in the API server's own terms (its RequestInfo), for routing, audit and faults.

The RBAC test derives the operator's least-privilege rules from the audit log, so the verbs are
RBAC's: ``get``/``list``/``watch``/``create``/``update``/``patch``/``delete``/``deletecollection``
on resource requests, the HTTP method (lower case) on non-resource URLs such as ``/apis``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from edgefleet_operator.devtools.kube_api.errors import ApiError

NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}
_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    410: "Gone",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


@dataclass(frozen=True)
class RequestInfo:
    """One request as the API server classifies it."""

    method: str
    path: str
    verb: str
    group: str = ""
    version: str = ""
    resource: str = ""
    """The plural; empty for non-resource URLs (discovery, ``/version``)."""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    user_agent: str = ""

    @property
    def is_resource_request(self) -> bool:
        return bool(self.resource)


@dataclass(frozen=True)
class AuditRecord:
    """A request and the HTTP code it was answered with."""

    request: RequestInfo
    code: int

    def as_json(self) -> dict[str, object]:
        return {**self.request.__dict__, "code": self.code}


def classify(method: str, path: str, query: Mapping[str, str], user_agent: str = "") -> RequestInfo:
    """The RequestInfo of a request, by the same path rules as the real server's RequestInfoFactory."""
    parts = [p for p in path.split("/") if p]
    method = method.upper()
    plain = RequestInfo(method, path, method.lower(), user_agent=user_agent)
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return plain
    if not rest:
        return plain
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 2:
        namespace = rest[1]
        if len(rest) >= 3 and rest[2] not in NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource, name, subresource = [*rest, "", "", ""][:3]
    if len(rest) > 3:
        subresource = "/".join(rest[2:])  # no such route; answered 404 by the router
    if method == "GET":
        watching = query.get("watch", "").lower() in ("true", "1")
        verb = "get" if name else "watch" if watching else "list"
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = _VERBS.get(method, method.lower())
    return RequestInfo(method, path, verb, group, version, resource, subresource, namespace, name, user_agent)


Predicate = Callable[[RequestInfo], bool]


def matching(
    *,
    verb: str | None = None,
    resource: str | None = None,
    subresource: str | None = None,
    group: str | None = None,
    namespace: str | None = None,
    name: str | None = None,
) -> Predicate:
    """A predicate for :meth:`KubeApiServer.fail_next` from the fields that must match (None: any)."""
    wanted = {
        "verb": verb,
        "resource": resource,
        "subresource": subresource,
        "group": group,
        "namespace": namespace,
        "name": name,
    }

    def check(info: RequestInfo) -> bool:
        return all(value is None or getattr(info, key) == value for key, value in wanted.items())

    return check


@dataclass
class Fault:
    """Makes the next ``remaining`` requests that ``when`` matches fail with ``code``."""

    when: Predicate
    code: int
    remaining: int
    message: str = "injected by the test"
    retry_after: float | None = None
    in_stream: bool = False
    """For watches: answer 200 and send the error as the stream's one ERROR event, as the real server
    reports an expired resourceVersion (410) to a watch."""
    hits: list[RequestInfo] = field(default_factory=list)

    def error(self) -> ApiError:
        headers = {"Retry-After": str(int(self.retry_after))} if self.retry_after is not None else {}
        details = {"retryAfterSeconds": int(self.retry_after)} if self.retry_after is not None else {}
        return ApiError(self.code, _REASONS.get(self.code, "Unknown"), self.message, details, headers)


class Ledger:
    """The audit log and the armed faults; shared by the server thread and the tests' threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[AuditRecord] = []
        self._faults: list[Fault] = []

    def record(self, info: RequestInfo, code: int) -> None:
        with self._lock:
            self._records.append(AuditRecord(info, code))

    def records(self) -> list[AuditRecord]:
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def arm(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def take(self, info: RequestInfo) -> Fault | None:
        """The first armed fault that matches, after using one of its shots."""
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.when(info):
                    fault.remaining -= 1
                    fault.hits.append(info)
                    return fault
        return None
