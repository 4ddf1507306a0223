"""A small synchronous client for the Job calls the dispatcher makes, over the operator's own credentials.

Ours on purpose: the official Kubernetes client is not a dependency, and the reconciler runs in
worker threads where kopf's aiohttp session (bound to kopf's event loop) cannot be used. The
credentials are the ones kopf logged in with (server URL, CA, token or client certificate), read
afresh for every request so that a re-login (a rotated service-account token) is picked up.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from edgefleet_operator.jobs.errors import KubeApiRefused, KubeApiUnavailable

DEFAULT_TIMEOUT_S: Final = 15.0
_RETRYABLE: Final = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class ApiEndpoint:
    """Where the API server is and how to authenticate to it."""

    server: str
    """``https://host:port`` (or ``http://`` for a test server)."""
    ssl_context: ssl.SSLContext | None = None
    """Verifies the server (its CA) and carries a client certificate when one is used."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """``Authorization`` (bearer token or basic), ``User-Agent``."""


class KubeApi:
    """``get``/``create``/``delete``/``list`` of batch/v1 Jobs."""

    def __init__(self, endpoint: Callable[[], ApiEndpoint], *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """``endpoint`` is asked before every request (it raises :class:`KubeApiUnavailable` before login)."""
        self._endpoint = endpoint
        self._timeout = timeout

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        status, body = self._request("GET", _jobs_path(namespace, name))
        if status == 404:
            return None
        return self._ok(status, body)

    def create_job(self, namespace: str, job: Mapping[str, Any]) -> dict[str, Any] | None:
        """The created Job, or ``None`` when one of that name exists already."""
        status, body = self._request("POST", _jobs_path(namespace), job)
        if status == 409:
            return None
        return self._ok(status, body)

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete the Job and (in the background) its pods; a Job already gone is fine."""
        options = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        status, body = self._request("DELETE", _jobs_path(namespace, name), options)
        if status != 404:
            self._ok(status, body)

    def list_jobs(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        status, body = self._request("GET", _jobs_path(namespace), params={"labelSelector": label_selector})
        items = self._ok(status, body).get("items") or []
        return [item for item in items if isinstance(item, dict)]

    def _ok(self, status: int, body: Any) -> dict[str, Any]:
        if 200 <= status < 300 and isinstance(body, dict):
            return body
        reason = str(body.get("reason", "")) if isinstance(body, dict) else ""
        message = str(body.get("message", "")) if isinstance(body, dict) else str(body)[:500]
        if status in _RETRYABLE:
            raise KubeApiUnavailable(f"the API server answered {status} {reason}: {message}")
        raise KubeApiRefused(status, reason or "Unexpected", message)

    def _request(
        self, method: str, path: str, body: object = None, *, params: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        endpoint = self._endpoint()
        url = endpoint.server.rstrip("/") + path + ("?" + urllib.parse.urlencode(params) if params else "")
        data = None if body is None else json.dumps(body).encode()
        headers = {**endpoint.headers, "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310  (our server URL)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout, context=endpoint.ssl_context) as response:  # noqa: S310
                return response.status, _decode(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, _decode(exc.read())
        except (urllib.error.URLError, OSError) as exc:  # refused, reset, TLS, timeouts
            raise KubeApiUnavailable(f"cannot reach the API server at {endpoint.server}: {exc}") from exc


def _jobs_path(namespace: str, name: str | None = None) -> str:
    path = f"/apis/batch/v1/namespaces/{urllib.parse.quote(namespace, safe='')}/jobs"
    return path if name is None else f"{path}/{urllib.parse.quote(name, safe='')}"


def _decode(data: bytes) -> Any:
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return data.decode(errors="replace")
