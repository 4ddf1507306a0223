"""A small synchronous HTTP client for tests of the API server (the official client is not installed)."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class HttpReply:
    """A response: status code, decoded JSON body (text when not JSON), headers."""

    status: int
    body: Any
    headers: list[tuple[str, str]]

    @property
    def warnings(self) -> list[str]:
        """The ``Warning`` headers' texts (``299 - "text"``)."""
        return [json.loads(v.split(" - ", 1)[1]) for k, v in self.headers if k.lower() == "warning"]

    @property
    def reason(self) -> str:
        """A Status body's ``reason`` (empty for other bodies)."""
        return str(self.body.get("reason", "")) if isinstance(self.body, dict) else ""


class WatchStream:
    """The events of one watch response, read line by line."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.response = response
        self.status = response.status
        self._buffer = b""

    def next(self) -> dict[str, Any] | None:
        """The next event, or None when the server ended the stream.

        Raises TimeoutError when no event comes in time, and ``http.client.IncompleteRead`` when the
        connection drops mid-stream (``readline()`` would hide that: it reads a drop as the end).
        """
        while b"\n" not in self._buffer:
            data = self.response.read1(64 * 1024)
            if not data:
                return None
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        event: dict[str, Any] = json.loads(line)
        return event

    def take(self, count: int) -> list[dict[str, Any]]:
        events = []
        for _ in range(count):
            event = self.next()
            if event is None:
                break
            events.append(event)
        return events

    def rest(self) -> list[dict[str, Any]]:
        """Every event until the server ends the stream."""
        events = []
        while (event := self.next()) is not None:
            events.append(event)
        return events


class KubeClient:
    """Requests against a test API server by path, e.g. ``/api/v1/namespaces/default/configmaps``."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.timeout = timeout

    def _connection(self, timeout: float | None = None) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)

    @staticmethod
    def _target(path: str, params: Mapping[str, str] | None) -> str:
        return path + ("?" + urllib.parse.urlencode(params) if params else "")

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        raw: bytes | None = None,
    ) -> HttpReply:
        payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": content_type, "Accept": "application/json"} if payload is not None else {}
        connection = self._connection()
        try:
            connection.request(method, self._target(path, params), body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
            try:
                decoded: Any = json.loads(data) if data else None
            except ValueError:
                decoded = data.decode(errors="replace")
            return HttpReply(response.status, decoded, response.getheaders())
        finally:
            connection.close()

    def get(self, path: str, **params: str) -> HttpReply:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, body: object, **params: str) -> HttpReply:
        return self.request("POST", path, body, params=params or None)

    def put(self, path: str, body: object, **params: str) -> HttpReply:
        return self.request("PUT", path, body, params=params or None)

    def merge_patch(self, path: str, patch: object, **params: str) -> HttpReply:
        return self.request("PATCH", path, patch, params=params or None, content_type="application/merge-patch+json")

    def json_patch(self, path: str, ops: list[dict[str, Any]], **params: str) -> HttpReply:
        return self.request("PATCH", path, ops, params=params or None, content_type="application/json-patch+json")

    def delete(self, path: str, options: object = None, **params: str) -> HttpReply:
        return self.request("DELETE", path, options, params=params or None)

    @contextmanager
    def watch(self, path: str, *, timeout: float | None = None, **params: str) -> Iterator[WatchStream]:
        """Open ``path?watch=true&...``; each read waits at most ``timeout`` seconds."""
        connection = self._connection(timeout)
        try:
            connection.request("GET", self._target(path, {"watch": "true", **params}))
            yield WatchStream(connection.getresponse())
        finally:
            connection.close()
