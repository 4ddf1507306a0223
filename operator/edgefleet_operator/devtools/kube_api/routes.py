"""The HTTP face of the test API server: discovery, the resource verbs, audit and injected faults."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml
from aiohttp import web

from edgefleet_operator.devtools.kube_api import errors
from edgefleet_operator.devtools.kube_api.audit import Ledger, RequestInfo, classify
from edgefleet_operator.devtools.kube_api.catalog import ResourceType
from edgefleet_operator.devtools.kube_api.errors import ApiError
from edgefleet_operator.devtools.kube_api.selectors import parse_field_selector, parse_label_selector
from edgefleet_operator.devtools.kube_api.store import Store, Written
from edgefleet_operator.devtools.kube_api.watches import Close, Matcher, WatchHub, WatchPlan, as_seen, bookmark, stream

JsonObject = dict[str, Any]
N = TypeVar("N", int, float)
logger = logging.getLogger(__name__)

VERSION_INFO = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0+edgefleet-test",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}
"""What ``/version`` reports: the API level whose behaviour this server mimics."""
CONTROL_PREFIX = "/_kube_api/"
"""Test-only endpoints (audit log, dropping watches) for a server in another process; never audited."""
_JSON_TYPES = frozenset({"application/json", "application/octet-stream", ""})
_YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml"})


@dataclass(frozen=True)
class _Hooks:
    """What the request's handling tells a watch: how to record itself, and an injected in-stream error."""

    open_watch: Callable[[], None]
    in_stream_error: ApiError | None


@dataclass(frozen=True)
class _Call:
    """One resource request, routed: the type, where, and the options every verb may read."""

    request: web.Request
    rtype: ResourceType
    namespace: str | None
    name: str
    subresource: str | None
    hooks: _Hooks

    @property
    def field_validation(self) -> str:
        return self.request.query.get("fieldValidation", "Warn")


def _json(body: object, status: int = 200, warnings: tuple[str, ...] = ()) -> web.Response:
    response = web.json_response(body, status=status)
    for warning in warnings:  # one header per warning, as the real server sends them
        response.headers.add("Warning", "299 - " + json.dumps(warning))
    return response


def _error(exc: ApiError) -> web.Response:
    return web.json_response(exc.status(), status=exc.code, headers=dict(exc.headers))


def _written(written: Written) -> web.Response:
    return _json(written.obj, written.code, written.warnings)


async def _read_body(request: web.Request) -> object:
    raw = await request.read()
    if not raw:
        raise errors.bad_request("the request body is empty")
    media = request.content_type.lower()
    try:
        if media in _YAML_TYPES:
            return yaml.safe_load(raw)
        if media in _JSON_TYPES or media.endswith("+json"):
            return json.loads(raw)
    except (ValueError, yaml.YAMLError) as exc:
        raise errors.bad_request(f"error decoding the request body: {exc}") from exc
    raise errors.unsupported_media_type(media)


class Api:
    """Routes every request; runs on the server's event loop, where the store lives."""

    def __init__(self, store: Store, hub: WatchHub, ledger: Ledger) -> None:
        self.store = store
        self.hub = hub
        self.ledger = ledger

    def application(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith(CONTROL_PREFIX):
            return await self._control(request)
        info = classify(request.method, request.path, request.query, request.headers.get("User-Agent", ""))
        code = 500
        opened = False

        def open_watch() -> None:
            # Watches are recorded when they start streaming, not when they end (maybe much later).
            nonlocal opened
            opened = True
            self.ledger.record(info, 200)

        try:
            fault = self.ledger.take(info)
            if fault is not None and not (fault.in_stream and info.verb == "watch"):
                raise fault.error()
            in_stream = fault.error() if fault is not None else None
            response = await self._dispatch(request, info, _Hooks(open_watch, in_stream))
            code = response.status
            return response
        except ApiError as exc:
            code = exc.code
            return _error(exc)
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client left: nothing to answer
        except Exception as exc:  # a bug of this server: a 500 Status (as the real one answers), and logged
            logger.exception("the test API server failed on %s %s", request.method, request.path_qs)
            code = 500
            return _error(ApiError(500, "InternalError", f"the test API server failed: {exc!r}"))
        finally:
            if not opened:
                self.ledger.record(info, code)

    async def _dispatch(self, request: web.Request, info: RequestInfo, hooks: _Hooks) -> web.StreamResponse:
        if not info.is_resource_request:
            return self._non_resource(request, info)
        rtype = self._resource_type(info)
        namespace = info.namespace or None if rtype.namespaced else None
        if rtype.namespaced and info.name and namespace is None:
            raise errors.no_such_path()
        if request.query.get("dryRun"):
            raise errors.bad_request("dryRun is not supported by the test API server")
        if info.subresource and info.verb not in ("get", "update", "patch"):
            raise errors.method_not_allowed()
        if info.verb == "create" and info.name:
            raise errors.method_not_allowed()
        call = _Call(request, rtype, namespace, info.name, info.subresource or None, hooks)
        handler = self._verbs().get(info.verb)
        if handler is None:
            raise errors.method_not_allowed()
        return await handler(call)

    def _verbs(self) -> Mapping[str, Callable[[_Call], Awaitable[web.StreamResponse]]]:
        return {
            "get": self._get,
            "list": self._list_response,
            "watch": self._watch,
            "create": self._create,
            "update": self._update,
            "patch": self._patch,
            "delete": self._delete,
            "deletecollection": self._delete_collection,
        }

    async def _get(self, call: _Call) -> web.StreamResponse:
        return _json(self.store.get(call.rtype, call.namespace, call.name))

    async def _list_response(self, call: _Call) -> web.StreamResponse:
        return _json(self._list(call.rtype, call.namespace, call.request.query))

    async def _create(self, call: _Call) -> web.StreamResponse:
        body = await _read_body(call.request)
        return _written(self.store.create(call.rtype, call.namespace, body, field_validation=call.field_validation))

    async def _update(self, call: _Call) -> web.StreamResponse:
        body = await _read_body(call.request)
        written = self.store.update(
            call.rtype,
            call.namespace,
            call.name,
            body,
            subresource=call.subresource,
            field_validation=call.field_validation,
        )
        return _written(written)

    async def _patch(self, call: _Call) -> web.StreamResponse:
        body = await _read_body(call.request)
        written = self.store.patch(
            call.rtype,
            call.namespace,
            call.name,
            call.request.content_type,
            body,
            subresource=call.subresource,
            field_validation=call.field_validation,
        )
        return _written(written)

    async def _delete(self, call: _Call) -> web.StreamResponse:
        options = await self._delete_options(call.request)
        return _written(self.store.delete(call.rtype, call.namespace, call.name, options))

    def _resource_type(self, info: RequestInfo) -> ResourceType:
        rtype = self.store.catalog.lookup(info.group, info.version, info.resource)
        if rtype is None:
            raise errors.no_such_path()
        if info.subresource and not (info.subresource == "status" and rtype.status_subresource):
            raise errors.no_such_path()
        if info.namespace and not rtype.namespaced and rtype.plural != "namespaces":
            raise errors.no_such_path()  # a cluster-scoped resource under /namespaces/{ns}/
        return rtype

    # ------------------------------------------------------------ list and watch

    def _matcher(self, rtype: ResourceType, namespace: str | None, query: Mapping[str, str]) -> Matcher:
        labels = parse_label_selector(query.get("labelSelector"))
        fields = parse_field_selector(query.get("fieldSelector"), rtype.group, rtype.plural)

        def matches(obj: Mapping[str, Any]) -> bool:
            in_namespace = namespace is None or obj.get("metadata", {}).get("namespace") == namespace
            return in_namespace and labels(obj) and fields(obj)

        return matches

    def _list(self, rtype: ResourceType, namespace: str | None, query: Mapping[str, str]) -> JsonObject:
        if query.get("resourceVersionMatch") == "Exact" and query.get("resourceVersion") != self.store.resource_version:
            raise errors.expired(
                "the test API server keeps no snapshots: an exact resourceVersion must be the current one"
            )
        items = self.store.select(rtype, namespace, self._matcher(rtype, namespace, query))
        metadata: JsonObject = {"resourceVersion": self.store.resource_version}
        after = self._continue_after(query.get("continue"))
        if after is not None:
            items = [i for i in items if (i["metadata"].get("namespace", ""), i["metadata"]["name"]) > after]
        limit = _number(query, "limit", int) or 0
        if 0 < limit < len(items):
            last = items[limit - 1]["metadata"]
            token = {"rv": int(self.store.resource_version), "after": [last.get("namespace", ""), last["name"]]}
            metadata["continue"] = base64.urlsafe_b64encode(json.dumps(token).encode()).decode()
            metadata["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        served = [self.store.present(rtype, item) for item in items]
        if not rtype.custom:  # built-in lists leave kind and apiVersion to the list, as the real server does
            served = [{k: v for k, v in item.items() if k not in ("apiVersion", "kind")} for item in served]
        return {"apiVersion": rtype.api_version, "kind": f"{rtype.kind}List", "metadata": metadata, "items": served}

    def _continue_after(self, token: str | None) -> tuple[str, str] | None:
        if not token:
            return None
        try:
            decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
            resource_version, (namespace, name) = int(decoded["rv"]), decoded["after"]
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise errors.bad_request(f"continue key is not valid: {exc}") from exc
        if resource_version < self.store.compacted:
            raise errors.expired(
                "The provided continue parameter is too old to display a consistent list result. "
                "You can start a new list without the continue parameter."
            )
        return (str(namespace), str(name))

    async def _watch(self, call: _Call) -> web.StreamResponse:
        request, rtype, namespace = call.request, call.rtype, call.namespace
        query = request.query
        plan = WatchPlan(rtype, self._matcher(rtype, namespace, query), [])
        plan.timeout = _number(query, "timeoutSeconds", float)
        since = query.get("resourceVersion") or ""
        initial = query.get("sendInitialEvents", "").lower() == "true"
        if initial and (
            query.get("resourceVersionMatch") != "NotOlderThan" or query.get("allowWatchBookmarks") != "true"
        ):
            raise errors.bad_request(
                "sendInitialEvents requires resourceVersionMatch=NotOlderThan and allowWatchBookmarks=true"
            )
        if since and not since.isdigit():
            raise errors.bad_request(f'resourceVersion: Invalid value: "{since}": invalid resource version')
        number, subscription = self.hub.subscribe(rtype.key)  # before reading the state: nothing falls between
        try:
            if since in ("", "0") or initial:
                objects = self.store.select(rtype, namespace, plan.matches)
                plan.first = [("ADDED", self.store.present(rtype, obj)) for obj in objects]
                if initial:
                    plan.first.append(("BOOKMARK", bookmark(rtype, self.store.resource_version, initial_end=True)))
            else:
                try:
                    events = self.store.events_since(rtype.key, int(since))
                except ApiError as exc:  # forgotten (410) or not yet reached (504): the stream's ERROR event
                    plan.expired = exc
                else:
                    plan.first = [seen for seen in (as_seen(e, plan.matches) for e in events) if seen is not None]
            if call.hooks.in_stream_error is not None:
                plan.expired, plan.first = call.hooks.in_stream_error, []
            call.hooks.open_watch()
            return await stream(request, plan, subscription)
        except ConnectionResetError:
            return web.Response(status=200)  # the client left; nothing to answer
        finally:
            self.hub.unsubscribe(number)

    # ------------------------------------------------------------ delete

    async def _delete_options(self, request: web.Request) -> JsonObject:
        options: JsonObject = {}
        if request.can_read_body:
            body = await _read_body(request)
            if not isinstance(body, dict):
                raise errors.bad_request("DeleteOptions must be a JSON object")
            options = body
        if "propagationPolicy" in request.query:
            options["propagationPolicy"] = request.query["propagationPolicy"]
        return options

    async def _delete_collection(self, call: _Call) -> web.StreamResponse:
        rtype, namespace, query = call.rtype, call.namespace, call.request.query
        for obj in self.store.select(rtype, namespace, self._matcher(rtype, namespace, query)):
            self.store.delete(rtype, obj["metadata"].get("namespace"), obj["metadata"]["name"], {})
        return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})

    # ------------------------------------------------------------ discovery

    def _non_resource(self, request: web.Request, info: RequestInfo) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if parts in (["healthz"], ["livez"], ["readyz"]):
            return web.Response(text="ok")
        document = self._discovery(parts, request.host)
        if document is None:
            raise errors.no_such_path()
        if info.method != "GET":
            raise errors.method_not_allowed()
        return _json(document)

    def _discovery(self, parts: list[str], host: str) -> JsonObject | None:
        catalog = self.store.catalog
        groups = catalog.groups()
        address = {"clientCIDR": "0.0.0.0/0", "serverAddress": host}
        fixed: Mapping[tuple[str, ...], Callable[[], JsonObject]] = {
            ("version",): lambda: dict(VERSION_INFO),
            ("api",): lambda: {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [address]},
            ("api", "v1"): lambda: _resource_list("v1", catalog.in_version("", "v1")),
            ("apis",): lambda: {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [_group(name, versions) for name, versions in groups.items() if name],
            },
        }
        if tuple(parts) in fixed:
            return fixed[tuple(parts)]()
        group, version = [*parts[1:], "", ""][:2] if parts[:1] == ["apis"] and len(parts) <= 3 else ("", "")
        if not group or group not in groups:
            return None
        if not version:
            return {"kind": "APIGroup", "apiVersion": "v1", **_group(group, groups[group])}
        if version in groups[group]:
            return _resource_list(f"{group}/{version}", catalog.in_version(group, version))
        return None

    # ------------------------------------------------------------ test control (other processes)

    async def _control(self, request: web.Request) -> web.Response:
        action = request.path.removeprefix(CONTROL_PREFIX)
        if action == "audit" and request.method == "GET":
            return web.json_response([r.as_json() for r in self.ledger.records()])
        if action == "close-watches" and request.method == "POST":
            how = Close.ABORT if request.query.get("abort") == "true" else Close.GRACEFUL
            return web.json_response({"closed": self.hub.close_all(how)})
        if action == "compact" and request.method == "POST":
            self.store.compact()
            return web.json_response({"compacted": self.store.compacted})
        return _error(errors.no_such_path())


def _number(query: Mapping[str, str], name: str, kind: Callable[[str], N]) -> N | None:
    text = query.get(name)
    if not text:
        return None
    try:
        return kind(text)
    except ValueError as exc:
        raise errors.bad_request(f'{name}: Invalid value: "{text}": must be a number') from exc


def _group(name: str, versions: list[str]) -> JsonObject:
    listed = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": listed, "preferredVersion": listed[0]}


def _resource_list(group_version: str, types: list[ResourceType]) -> JsonObject:
    resources = [entry for rtype in types for entry in rtype.discovery()]
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}
