"""The test API server: real HTTP on loopback, served from its own thread and event loop.

Tests talk to it over HTTP like any client, or through the thread-safe helpers here, which run on
the server's loop and go through the same store rules as HTTP requests (but are not audited:
the audit log is what clients such as the operator asked for).
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import copy
import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from aiohttp import web

from edgefleet_operator.devtools.kube_api.audit import AuditRecord, Fault, Ledger, Predicate
from edgefleet_operator.devtools.kube_api.catalog import (
    CRD_TYPE,
    NAMESPACE_TYPE,
    Catalog,
    ResourceType,
    kopf_peering_crds,
    load_crd_documents,
)
from edgefleet_operator.devtools.kube_api.routes import Api
from edgefleet_operator.devtools.kube_api.selectors import parse_field_selector, parse_label_selector
from edgefleet_operator.devtools.kube_api.store import Store, WatchEvent
from edgefleet_operator.devtools.kube_api.watches import Close, WatchHub

JsonObject = dict[str, Any]
T = TypeVar("T")

CRDS_DIR = Path(str(resources.files("edgefleet_core").joinpath("crds")))
"""EdgeFleet's CRDs as installed with ``edgefleet_core`` (in a checkout, a link to the repository's ``crds/``)."""
DEFAULT_NAMESPACES = ("default", "kube-system")
START_DEADLINE_S = 10.0
CALL_DEADLINE_S = 10.0
SHUTDOWN_GRACE_S = 2.0
POLL_INTERVAL_S = 0.05
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_crds(directory: Path) -> list[JsonObject]:
    """The CRDs in every ``*.yaml`` file of a folder, in file-name order."""
    return copy.deepcopy(
        _parsed_crds(directory.resolve(), tuple(p.stat().st_mtime_ns for p in sorted(directory.glob("*.yaml"))))
    )


@functools.cache
def _parsed_crds(directory: Path, _mtimes: tuple[int, ...]) -> list[JsonObject]:
    # Parsing the CRDs is most of a server's start-up; every test starts one (keyed by mtimes: edits show).
    documents: list[Any] = []
    for path in sorted(directory.glob("*.yaml")):
        documents += yaml.load_all(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    return load_crd_documents(documents)


class KubeApiServer:
    """A strict, in-memory Kubernetes API server for tests (see the package docstring for what it models)."""

    def __init__(
        self,
        *,
        crds: Iterable[Mapping[str, Any]] = (),
        crds_dir: Path | None = CRDS_DIR,
        kopf_peering: bool = False,
        namespaces: Iterable[str] = DEFAULT_NAMESPACES,
        history_limit: int = 10_000,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._preload_crds: builtins.list[Mapping[str, Any]] = [*(read_crds(crds_dir) if crds_dir else []), *crds]
        if kopf_peering:
            self._preload_crds += kopf_peering_crds()
        self._preload_namespaces = tuple(namespaces)
        self._host, self._port = host, port
        self._changes = 0
        self._changed = threading.Condition()
        self.ledger = Ledger()
        self.hub = WatchHub()
        self.store = Store(Catalog(), history_limit=history_limit, on_change=self._on_change)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self.url = ""
        """``http://127.0.0.1:PORT`` once started."""

    # ------------------------------------------------------------ lifecycle

    def start(self) -> KubeApiServer:
        self._thread = threading.Thread(target=self._run, name="kube-api-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_DEADLINE_S):
            raise RuntimeError(f"the test API server did not start within {START_DEADLINE_S} s")
        if self._failure is not None:
            raise RuntimeError("the test API server failed to start") from self._failure
        return self

    def stop(self) -> None:
        """Close the watch streams cleanly, stop serving, and end the server's thread."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if thread is None:
            return
        if loop is not None and stopping is not None and thread.is_alive():
            loop.call_soon_threadsafe(stopping.set)
        thread.join(START_DEADLINE_S + SHUTDOWN_GRACE_S)
        self._thread = None

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except Exception as exc:  # noqa: BLE001  (reported to start(), which raises it in the test)
            self._failure = exc
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            self._loop = None  # helpers called after this say "not running"
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        self._preload()
        api = Api(self.store, self.hub, self.ledger)
        runner = web.AppRunner(
            api.application(),
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_GRACE_S,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            self._ready.set()
            await self._stopping.wait()
            self.hub.close_all(Close.GRACEFUL)
        finally:
            await runner.cleanup()

    def _preload(self) -> None:
        for name in self._preload_namespaces:
            self.store.create(NAMESPACE_TYPE, None, {"metadata": {"name": name}})
        for crd in self._preload_crds:
            self.store.create(CRD_TYPE, None, crd)

    def _on_change(self, event: WatchEvent) -> None:
        self.hub.publish(event)
        with self._changed:
            self._changes += 1
            self._changed.notify_all()

    # ------------------------------------------------------------ calls onto the server's loop

    def _call(self, function: Callable[[], T]) -> T:
        if self._loop is None:
            raise RuntimeError("the test API server is not running")
        if threading.current_thread() is self._thread:
            return function()

        async def invoke() -> T:
            return function()

        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(invoke(), self._loop)
        return future.result(CALL_DEADLINE_S)

    def resource(self, name: str) -> ResourceType:
        """A served type by plural, ``plural.group``, singular, kind or short name (KeyError if none)."""
        return self._call(lambda: self.store.catalog.resolve(name))

    def resource_of(self, body: Mapping[str, Any]) -> ResourceType:
        """The served type a document's ``apiVersion`` and ``kind`` name (KeyError if none)."""
        return self._call(
            lambda: self.store.catalog.for_body(str(body.get("apiVersion", "")), str(body.get("kind", "")))
        )

    # ------------------------------------------------------------ state helpers (thread-safe)

    def create(self, body: Mapping[str, Any]) -> JsonObject:
        """Create an object as a client would (all checks apply); raises :class:`ApiError` when refused."""
        rtype = self.resource_of(body)
        namespace = body.get("metadata", {}).get("namespace") or ("default" if rtype.namespaced else None)
        return self._call(lambda: self.store.create(rtype, namespace, dict(body)).obj)

    def apply_object(self, body: Mapping[str, Any]) -> JsonObject:
        """Create the object, or replace the existing one at its current resourceVersion (keeping status).

        Like ``kubectl apply`` of a whole manifest: what the manifest leaves out is removed.
        """
        rtype = self.resource_of(body)
        metadata = body.get("metadata", {})
        namespace = metadata.get("namespace") or ("default" if rtype.namespaced else None)

        def apply() -> JsonObject:
            found = self.store.select(rtype, namespace, lambda o: o["metadata"]["name"] == metadata.get("name"))
            if not found:
                return self.store.create(rtype, namespace, dict(body)).obj
            current = found[0]
            replacement: JsonObject = {
                **body,
                "metadata": {**metadata, "resourceVersion": current["metadata"]["resourceVersion"]},
            }
            if "status" in current and not rtype.status_subresource:
                replacement.setdefault("status", current["status"])
            return self.store.update(rtype, namespace, str(metadata["name"]), replacement).obj

        return self._call(apply)

    def get(self, resource: str, name: str, namespace: str | None = None) -> JsonObject | None:
        """The object as served, or None when it does not exist."""
        rtype = self.resource(resource)

        def read() -> JsonObject | None:
            found = self.store.select(
                rtype, namespace if rtype.namespaced else None, lambda o: o["metadata"]["name"] == name
            )
            return self.store.present(rtype, found[0]) if found else None

        return self._call(read)

    def versions(self, resource: str, name: str, namespace: str | None = None) -> builtins.list[JsonObject]:
        """Every stored version of an object still in the change history, oldest first, as served.

        For tests that check the order of writes (a status acknowledged before the work it describes).
        """
        rtype = self.resource(resource)
        where = (namespace or "") if rtype.namespaced else ""

        def read() -> builtins.list[JsonObject]:
            return [
                self.store.present(rtype, event.obj)
                for event in self.store.history
                if event.key == rtype.key
                and event.obj["metadata"]["name"] == name
                and event.obj["metadata"].get("namespace", "") == where
            ]

        return self._call(read)

    def list(
        self,
        resource: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> builtins.list[JsonObject]:
        """Objects of a type (one namespace or all), filtered like the HTTP list, sorted by namespace and name."""
        rtype = self.resource(resource)
        labels = parse_label_selector(label_selector)
        fields = parse_field_selector(field_selector, rtype.group, rtype.plural)

        def read() -> builtins.list[JsonObject]:
            found = self.store.select(rtype, namespace, lambda o: labels(o) and fields(o))
            return [self.store.present(rtype, o) for o in found]

        return self._call(read)

    def patch(
        self,
        resource: str,
        name: str,
        patch: Mapping[str, Any] | builtins.list[Any],
        *,
        namespace: str | None = None,
        subresource: str | None = None,
        content_type: str = "application/merge-patch+json",
    ) -> JsonObject:
        rtype = self.resource(resource)
        return self._call(
            lambda: self.store.patch(rtype, namespace, name, content_type, patch, subresource=subresource).obj
        )

    def delete(self, resource: str, name: str, namespace: str | None = None, **options: Any) -> JsonObject:
        """Delete like a client (finalizers hold the object); returns the server's answer body."""
        rtype = self.resource(resource)
        return self._call(lambda: self.store.delete(rtype, namespace, name, options).obj)

    def wait_until(self, condition: Callable[[], T | None], timeout: float = 10.0) -> T:
        """Re-evaluate ``condition`` until it returns something truthy; TimeoutError otherwise.

        It is re-evaluated at once after every change of an object, and every ``POLL_INTERVAL_S`` for
        conditions on anything else (open watches, the audit log).
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                seen = self._changes
            result = condition()
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout} s")
            with self._changed:
                if self._changes == seen:
                    self._changed.wait(min(remaining, POLL_INTERVAL_S))

    def wait_for(
        self,
        resource: str,
        name: str,
        predicate: Callable[[JsonObject], bool],
        namespace: str | None = None,
        timeout: float = 10.0,
    ) -> JsonObject:
        """The object once ``predicate`` holds for it."""

        def check() -> JsonObject | None:
            obj = self.get(resource, name, namespace)
            return obj if obj is not None and predicate(obj) else None

        return self.wait_until(check, timeout)

    def wait_gone(self, resource: str, name: str, namespace: str | None = None, timeout: float = 10.0) -> None:
        self.wait_until(lambda: self.get(resource, name, namespace) is None, timeout)

    @property
    def resource_version(self) -> str:
        return self._call(lambda: self.store.resource_version)

    # ------------------------------------------------------------ audit, faults, watches

    def audit_log(self) -> builtins.list[AuditRecord]:
        """Every HTTP request so far (verb, group, version, resource, subresource, namespace, name, code)."""
        return self.ledger.records()

    def clear_audit_log(self) -> None:
        self.ledger.clear()

    def fail_next(
        self,
        times: int,
        code: int,
        *,
        when: Predicate = lambda _: True,
        message: str = "injected by the test",
        retry_after: float | None = None,
        in_stream: bool = False,
    ) -> Fault:
        """Make the next ``times`` requests matching ``when`` (see ``audit.matching``) fail with ``code``.

        ``in_stream`` makes a matching watch answer 200 with the error as its only (ERROR) event,
        e.g. ``fail_next(1, 410, in_stream=True, ...)`` for a watch that must re-list.
        """
        return self.ledger.arm(Fault(when, code, times, message, retry_after, in_stream))

    def close_watches(self, *, abort: bool = False) -> int:
        """End every open watch stream (cleanly, or by dropping the connection); returns how many."""
        return self._call(lambda: self.hub.close_all(Close.ABORT if abort else Close.GRACEFUL))

    def open_watches(self) -> int:
        return self._call(lambda: self.hub.open_count)

    def compact(self) -> None:
        """Forget the change history: watches from any older resourceVersion now get 410 Expired."""
        self._call(self.store.compact)


@contextmanager
def running_kube_api(**options: Any) -> Iterator[KubeApiServer]:
    """A started :class:`KubeApiServer` (options as its constructor's), stopped afterwards."""
    with KubeApiServer(**options) as server:
        yield server
