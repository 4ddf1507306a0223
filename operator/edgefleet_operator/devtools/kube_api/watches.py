"""Watch streams: subscriptions to the store's changes, filtered and streamed as JSON lines.

A selector or namespace turns changes into what a client of that view sees: an object that starts
matching arrives as ADDED, one that stops matching leaves as DELETED (as on the real server).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from edgefleet_operator.devtools.kube_api.catalog import ResourceType
from edgefleet_operator.devtools.kube_api.errors import ApiError
from edgefleet_operator.devtools.kube_api.store import Key, WatchEvent

JsonObject = dict[str, Any]
Matcher = Callable[[Mapping[str, Any]], bool]


class Close(enum.Enum):
    """Why a stream ends early: the end of its chunked body, or a dropped connection."""

    GRACEFUL = enum.auto()
    ABORT = enum.auto()


@dataclass
class Subscription:
    key: Key
    queue: asyncio.Queue[WatchEvent | Close] = field(default_factory=asyncio.Queue)


class WatchHub:
    """Open watches by id; the store's change callback fans out to them. Loop thread only."""

    def __init__(self) -> None:
        self._subscriptions: dict[int, Subscription] = {}
        self._ids = itertools.count()

    def subscribe(self, key: Key) -> tuple[int, Subscription]:
        number = next(self._ids)
        self._subscriptions[number] = Subscription(key)
        return number, self._subscriptions[number]

    def unsubscribe(self, number: int) -> None:
        self._subscriptions.pop(number, None)

    def publish(self, event: WatchEvent) -> None:
        for subscription in self._subscriptions.values():
            if subscription.key == event.key:
                subscription.queue.put_nowait(event)

    def close_all(self, how: Close) -> int:
        for subscription in self._subscriptions.values():
            subscription.queue.put_nowait(how)
        return len(self._subscriptions)

    @property
    def open_count(self) -> int:
        return len(self._subscriptions)


def as_seen(event: WatchEvent, matches: Matcher) -> tuple[str, JsonObject] | None:
    """The event a watch with this filter sees, if any."""
    now_matches = matches(event.obj)
    was_matching = event.old is not None and matches(event.old)
    if event.type == "ADDED":
        return ("ADDED", event.obj) if now_matches else None
    if event.type == "DELETED":
        return ("DELETED", event.obj) if now_matches or was_matching else None
    if now_matches:
        return ("MODIFIED" if was_matching else "ADDED", event.obj)
    return ("DELETED", event.obj) if was_matching else None


def _line(kind: str, obj: Mapping[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode() + b"\n"


def _in_version(rtype: ResourceType, obj: JsonObject) -> JsonObject:
    return {**obj, "apiVersion": rtype.api_version, "kind": rtype.kind}


def bookmark(rtype: ResourceType, resource_version: str, *, initial_end: bool = False) -> JsonObject:
    metadata: JsonObject = {"resourceVersion": resource_version}
    if initial_end:
        metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
    return {"apiVersion": rtype.api_version, "kind": rtype.kind, "metadata": metadata}


@dataclass
class WatchPlan:
    """What one watch request streams: its filter, what to send first, when to stop."""

    rtype: ResourceType
    matches: Matcher
    first: list[tuple[str, JsonObject]]
    """Events to send before live changes: the initial state, or the history since a resourceVersion."""
    expired: ApiError | None = None
    """Set when the requested resourceVersion is forgotten: the stream sends one ERROR event and ends."""
    timeout: float | None = None


async def stream(request: web.Request, plan: WatchPlan, subscription: Subscription) -> web.StreamResponse:
    """Write the watch stream until its timeout, a close from the server, or the client leaving."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    if plan.expired is not None:
        await response.write(_line("ERROR", plan.expired.status()))
        await response.write_eof()
        return response
    for kind, obj in plan.first:
        await response.write(_line(kind, _in_version(plan.rtype, obj)))
    how = await _follow(response, plan, subscription)
    if how is Close.ABORT and request.transport is not None:
        request.transport.abort()  # a dropped connection, not the end of a chunked body
        return response
    await response.write_eof()
    return response


async def _follow(response: web.StreamResponse, plan: WatchPlan, subscription: Subscription) -> Close | None:
    loop = asyncio.get_running_loop()
    deadline = None if plan.timeout is None else loop.time() + plan.timeout
    while True:
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            return None
        try:
            item = await asyncio.wait_for(subscription.queue.get(), remaining)
        except TimeoutError:
            return None
        if isinstance(item, Close):
            return item
        seen = as_seen(item, plan.matches)
        if seen is not None:
            await response.write(_line(seen[0], _in_version(plan.rtype, seen[1])))
