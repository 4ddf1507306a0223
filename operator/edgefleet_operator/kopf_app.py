"""The kopf edge of the operator: a routing table from Kubernetes events to the EdgeModel reconciler.

Each handler parses the object once, makes one call into :class:`EdgeModelDriver` (which runs the
reconciler in a worker pool) and turns the outcome into a status patch, Kubernetes Events and, for
failures we did not plan for, a ``kopf.TemporaryError`` with backoff. Spec errors are not failures
here: the reconciler already reports them in the status (``Stalled``), so they cause no retry storm.

Level-triggered requeueing: after each reconcile the driver schedules the next one for the object
(the reconciler's ``requeue_after`` for a rollout wave, else ``resync_seconds``); a per-object kopf
timer ticks every ``tick_seconds`` and reconciles when that time has come. A DeviceClass event makes
every EdgeModel that targets the class due at once (re-plan) — in memory rather than through an
annotation patch: kopf has no public call to patch other objects, and a restarted operator re-plans
everything anyway when it resumes. Reconciling a model whose builds are all published is cheap
(the builds are adopted), so resyncing costs little.

kopf's own state lives in annotations: the status schema is structural and the API server prunes
``status.kopf``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, cast
from wsgiref.simple_server import WSGIServer

import aiohttp
import kopf
from pydantic import ValidationError

from edgefleet_core import __version__
from edgefleet_core.errors import EdgeFleetError, FieldProblem, ResourceError
from edgefleet_core.failpoints import failpoint
from edgefleet_core.resources.base import API_GROUP, API_VERSION
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import EdgeModel, EdgeModelStatus, Targets
from edgefleet_core.resources.loading import parse_resource
from edgefleet_operator.jobs.errors import KubeApiUnavailable
from edgefleet_operator.jobs.kube import ApiEndpoint
from edgefleet_operator.metrics import MetricsListenError, OperatorMetrics, parse_listen
from edgefleet_operator.reconcile.edge_model import EdgeModelReconciler, ReconcileResult
from edgefleet_operator.reconcile.status import (
    AS_EXPECTED,
    READY,
    RECONCILING,
    STALLED,
    StatusReason,
    set_condition,
    summarize,
)
from edgefleet_operator.reconcile.targets import targets_class
from edgefleet_operator.runtime import OperatorSettings, RuntimeSetupError, build_reconciler, is_store_outage

logger = logging.getLogger(__name__)

EDGEMODELS: Final = "edgemodels"
DEVICECLASSES: Final = "deviceclasses"
FINALIZER: Final = "edgefleet.io/finalizer"
"""Held on every EdgeModel the operator has seen, so deleting one runs the finalizer first."""
TICK_HANDLER: Final = "requeue"
INVALID_SPEC: Final = "InvalidSpec"
PROGRESSING: Final = "Progressing"
"""Ready/Reconciling reason between a new spec generation and its first reconcile's status."""


def default_identity() -> str:
    """``host@pid``: in a cluster the host name is the pod's name."""
    return f"{socket.gethostname()}@{os.getpid()}"


def identity_priority(identity: str) -> int:
    """A peering priority from a replica's name: distinct for distinct names (but for 1 in 2**31).

    kopf pauses every replica when the highest priority is shared, and the replicas of one
    Deployment cannot be given different flags: their pod names (the identity) differ, though.
    """
    return int.from_bytes(hashlib.sha256(identity.encode()).digest()[:4], "big") >> 1


@dataclass(frozen=True)
class KopfSettings:
    """How the operator meets the cluster; built once from the command line."""

    server: str | None = None
    """The API server URL (plain, no credentials); ``None``: in-cluster service account, else kubeconfig."""
    namespaces: tuple[str, ...] = ()
    """Namespaces whose EdgeModels are served; empty: every namespace (``clusterwide``)."""
    peering: str | None = None
    """Name of the kopf peering object shared by the replicas (it must exist); ``None``: standalone."""
    priority: int = 0
    """This replica's peering priority: the highest live one acts, the others wait (equal ones all pause)."""
    identity: str = field(default_factory=default_identity)
    """This replica's name among its peers; also in the User-Agent of every request it makes."""
    resync_seconds: float = 300.0
    """Reconcile every model at least this often, even if nothing changed (level-triggered)."""
    tick_seconds: float = 1.0
    """How often each model's timer checks whether its next reconcile is due."""
    retry_seconds: float = 5.0
    """First delay after an unexpected failure; doubled on each further attempt."""
    retry_max_seconds: float = 300.0
    """The longest delay between attempts."""
    liveness: str | None = None
    """kopf's liveness endpoint, e.g. ``http://0.0.0.0:8080/healthz``."""
    metrics_listen: str | None = None
    """``HOST:PORT`` to serve Prometheus metrics on (``/metrics``; port 0 picks one); ``None``: none."""

    def __post_init__(self) -> None:
        if min(self.resync_seconds, self.tick_seconds, self.retry_seconds, self.retry_max_seconds) <= 0:
            raise RuntimeSetupError("resync, tick and retry times must be positive")
        if self.metrics_listen is not None:
            parse_listen(self.metrics_listen)

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    def user_agent(self) -> str:
        return f"edgefleet-operator/{__version__} ({self.identity})"

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` 0 is the first retry)."""
        return min(self.retry_seconds * 2.0 ** min(attempt, 30), self.retry_max_seconds)


class RequeueSchedule:
    """When each EdgeModel (by uid) is next due for a reconcile; monotonic seconds, in memory.

    A model that is not scheduled is not due: its create, update or resume handler has not finished
    yet, and that handler schedules it. A wake that arrives while a reconcile runs (which may have
    read the DeviceClasses before the change) makes the model due again as soon as it ends.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._due: dict[str, float] = {}
        self._woken: dict[str, float] = {}

    def now(self) -> float:
        return self._clock()

    def after(self, uid: str, seconds: float, *, started: float | None = None) -> None:
        """Due ``seconds`` from now, or at once when woken since ``started`` (when the reconcile began)."""
        now = self._clock()
        woken = self._woken.pop(uid, None)
        missed = woken is not None and started is not None and woken >= started
        self._due[uid] = now if missed else now + seconds

    def wake(self, uid: str) -> None:
        """Due now (a DeviceClass the model targets changed)."""
        now = self._clock()
        self._woken[uid] = now
        if uid in self._due:
            self._due[uid] = now

    def is_due(self, uid: str) -> bool:
        due = self._due.get(uid)
        return due is not None and due <= self._clock()

    def forget(self, uid: str) -> None:
        self._due.pop(uid, None)
        self._woken.pop(uid, None)

    def next_in(self, uid: str) -> float | None:
        """Seconds until the model is due (negative: overdue); ``None`` when not scheduled."""
        due = self._due.get(uid)
        return None if due is None else due - self._clock()


@dataclass(frozen=True)
class _Written:
    """The status last written for a model, and the one it replaced (to spot a body older than our write)."""

    before: dict[str, Any]
    after: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """What one reconcile asks the edge to do."""

    status_patch: dict[str, Any]
    """A merge patch of ``status``: the new status, with what it no longer has set to ``null``."""
    result: ReconcileResult | None
    """The reconciler's result; ``None`` when the spec did not parse (then ``problem`` says why)."""
    problem: str | None = None
    """Why the spec is invalid, when it is newly so (an event is due); ``None`` otherwise."""


class EdgeModelDriver:
    """Runs the reconciler for kopf: one reconcile per model at a time, in a worker pool, with its schedule."""

    def __init__(
        self,
        settings: OperatorSettings,
        kopf_settings: KopfSettings,
        *,
        build: Callable[[OperatorSettings, ThreadPoolExecutor], EdgeModelReconciler] | None = None,
    ) -> None:
        self.settings = settings
        self.kopf_settings = kopf_settings
        self.schedule = RequeueSchedule()
        self._build = build or self._build_reconciler
        self._reconciler: EdgeModelReconciler | None = None
        self._api: ApiEndpoint | None = None
        # Reconcile calls and the per-class builds they fan out to get separate pools: a reconcile
        # waiting on its builds must never hold the thread a build needs.
        self._calls = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="edgefleet-reconcile")
        self._builds = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="edgefleet-build")
        self._locks: dict[str, asyncio.Lock] = {}
        self._written: dict[str, _Written] = {}
        self.metrics = OperatorMetrics()
        """What the reconciler records; served over HTTP when ``kopf_settings.metrics_listen`` is set."""
        self.metrics_address: str | None = None
        """``HOST:PORT`` the metrics are served on, once :func:`serve` started them."""
        self.setup_error: RuntimeSetupError | None = None
        """Why the operator could not start, when a person must act (kopf only says that start-up failed)."""

    # ------------------------------------------------------------------ life cycle

    def logged_in(self, endpoint: ApiEndpoint) -> None:
        """kopf logged in (again): the credentials pipeline Jobs are created with from now on."""
        self._api = endpoint

    def api_endpoint(self) -> ApiEndpoint:
        """The API server and credentials kopf logged in with last."""
        if self._api is None:
            raise KubeApiUnavailable("not logged in to the Kubernetes API yet")
        return self._api

    def _build_reconciler(self, settings: OperatorSettings, pool: ThreadPoolExecutor) -> EdgeModelReconciler:
        return build_reconciler(settings, executor=pool, api=self.api_endpoint, metrics=self.metrics)

    async def start(self) -> None:
        """Build the reconciler (opens the store, checks keys and repository) off the event loop."""
        loop = asyncio.get_running_loop()
        self._reconciler = await loop.run_in_executor(self._calls, self._build, self.settings, self._builds)

    def close(self) -> None:
        self._calls.shutdown(wait=False, cancel_futures=True)
        self._builds.shutdown(wait=False, cancel_futures=True)

    @property
    def reconciler(self) -> EdgeModelReconciler:
        if self._reconciler is None:
            raise RuntimeError("the operator has not started")  # kopf runs no handler before startup
        return self._reconciler

    def busy(self, uid: str) -> bool:
        """Whether a reconcile of the model runs now."""
        lock = self._locks.get(uid)
        return lock is not None and lock.locked()

    def forget(self, uid: str) -> None:
        self.schedule.forget(uid)
        self._locks.pop(uid, None)
        self._written.pop(uid, None)

    # ------------------------------------------------------------------ reconciling

    async def reconcile(self, body: kopf.Body, classes: list[DeviceClass]) -> Outcome:
        """Reconcile the model in ``body`` against ``classes`` and schedule its next reconcile."""
        uid = str(body.metadata.uid)
        async with self._locks.setdefault(uid, asyncio.Lock()):
            started = self.schedule.now()
            current = self._current_status(uid, body)
            try:
                model = _parse_model(body, current)
            except ResourceError as exc:
                self.schedule.after(uid, self.kopf_settings.resync_seconds, started=started)
                status = _invalid_spec_status(body, current, str(exc))
                newly = _stalled_message(current) != _stalled_message(status)
                # The reconciler never sees a spec that does not parse: recorded here, as a stalled reconcile.
                self.metrics.reconciled("stalled", self.schedule.now() - started)
                self.metrics.model_status(
                    str(body.metadata.namespace), str(body.metadata.name), EdgeModelStatus.model_validate(status)
                )
                return Outcome(self._remember(uid, current, status), None, str(exc) if newly else None)
            loop = asyncio.get_running_loop()
            try:
                result = await loop.run_in_executor(self._calls, self.reconciler.reconcile, model, classes)
            except BaseException:
                # Try again even if kopf's own retry is lost (a timer tick cannot retry): the timer catches it.
                self.schedule.after(uid, self.kopf_settings.retry_seconds, started=started)
                raise
            resync = self.kopf_settings.resync_seconds
            requeue = resync if result.requeue_after is None else min(max(result.requeue_after, 0.0), resync)
            self.schedule.after(uid, requeue, started=started)
            status = result.status.model_dump(mode="json", by_alias=True, exclude_none=True)
            return Outcome(self._remember(uid, current, status), result)

    def acknowledge(self, body: kopf.Body) -> dict[str, Any] | None:
        """A status patch saying a new spec generation is being worked on; ``None`` when the status is current.

        A build runs inside the reconcile handler and kopf writes a handler's status only when it
        returns: without this, a new model would show no status for the minutes a build takes, and
        GitOps tools read a resource with no status as done (kstatus: Current).
        """
        uid = str(body.metadata.uid)
        generation = body.metadata.get("generation")
        current = self._current_status(uid, body)
        if generation is None or current.get("observedGeneration") == generation:
            return None
        status = _acknowledged_status(current, generation)
        return self._remember(uid, current, status)

    async def finalize(self, body: kopf.Body) -> ReconcileResult:
        """Run the model's finalizer (assignments removed, artifacts per ``artifactPolicy``) and forget it."""
        uid = str(body.metadata.uid)
        async with self._locks.setdefault(uid, asyncio.Lock()):
            model = _parse_model(body, None, check=False)
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._calls, self.reconciler.finalize, model)
        self.metrics.model_deleted(model.metadata.namespace or "default", model.metadata.name)
        self.forget(uid)
        return result

    def _current_status(self, uid: str, body: kopf.Body) -> dict[str, Any]:
        """The model's status as last written: the body's, unless the body predates our last write.

        kopf applies a handler's status patch after the handler returns, so a handler that waited
        for the lock may hold a body from before the previous reconcile's write.
        """
        seen: dict[str, Any] = _plain(body.get("status") or {})
        written = self._written.get(uid)
        if written is not None and seen == written.before:
            return written.after
        return seen

    def _remember(self, uid: str, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        self._written[uid] = _Written(before, after)
        # A merge patch only adds and replaces: what the new status leaves out must be nulled.
        patch: dict[str, Any] = dict.fromkeys(key for key in before if key not in after)
        patch.update(after)
        return patch

    def replan(self, device_class: DeviceClass, targets: Mapping[str, Targets]) -> list[str]:
        """Make every model (uid → its targets) that targets ``device_class`` due now; their uids."""
        woken = sorted(uid for uid, wanted in targets.items() if targets_class(wanted, device_class))
        for uid in woken:
            self.schedule.wake(uid)
        return woken


# ---------------------------------------------------------------------------------- parsing


def _plain(value: Any) -> Any:
    """A JSON copy of kopf's body views (nested mappings become plain dicts)."""
    return json.loads(json.dumps(value))


def _parse_model(body: kopf.Body, status: Mapping[str, Any] | None, *, check: bool = True) -> EdgeModel:
    """The typed EdgeModel (spec checked against the CRD and the model), with ``status`` when it still parses.

    :class:`~edgefleet_core.errors.ResourceError` names each field at fault. ``check=False`` (deleting)
    parses only what the finalizer needs if the spec is invalid: name, namespace and artifact policy.
    """
    document = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": _plain(body.get("metadata", {})),
        "spec": _plain(body.get("spec", {})),
    }
    source = f"EdgeModel {body.metadata.namespace}/{body.metadata.name}"
    try:
        parsed = parse_resource(document, source)
    except ResourceError:
        if check:
            raise
        # An object the API server accepted but our model refuses can still be cleaned up: the
        # finalizer reads the model's identity and artifactPolicy only.
        document["spec"] = {
            "source": {"uri": "file:///invalid", "sha256": "0" * 64},
            "targets": {"deviceClasses": ["invalid"]},
            "artifactPolicy": document["spec"].get("artifactPolicy", "Retain"),
        }
        parsed = parse_resource(document, source)
    if not isinstance(parsed, EdgeModel):
        raise ResourceError(source, [FieldProblem("kind", "not an EdgeModel", "schema")])
    try:
        previous = EdgeModelStatus.model_validate(status) if status else None
    except ValidationError:
        previous = None  # written by an older operator: start over rather than trust half of it
    return parsed.model_copy(update={"status": previous})


def _stalled_message(status: Mapping[str, Any]) -> str | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == STALLED and condition.get("status") == "True":
            return str(condition.get("message", ""))
    return None


def _invalid_spec_status(body: kopf.Body, current: Mapping[str, Any], message: str) -> dict[str, Any]:
    """The status of a model whose spec does not parse: ``Stalled`` with the problems, the rest kept."""
    generation = body.metadata.get("generation")
    try:
        previous = EdgeModelStatus.model_validate(current) if current else EdgeModelStatus()
    except ValidationError:
        previous = EdgeModelStatus()
    conditions = summarize(
        previous.conditions, generation=generation, now=datetime.now(UTC), stalled=StatusReason(INVALID_SPEC, message)
    )
    stalled = previous.model_copy(update={"conditions": conditions, "observed_generation": generation})
    wire: dict[str, Any] = stalled.model_dump(mode="json", by_alias=True, exclude_none=True)
    return wire


def _acknowledged_status(current: Mapping[str, Any], generation: int) -> dict[str, Any]:
    """``current`` with ``Reconciling`` true and ``Ready`` false for ``generation``, the rest kept."""
    try:
        previous = EdgeModelStatus.model_validate(current) if current else EdgeModelStatus()
    except ValidationError:
        previous = EdgeModelStatus()
    why = StatusReason(PROGRESSING, f"the operator is working on generation {generation}")
    conditions = previous.conditions
    now = datetime.now(UTC)
    for condition_type, status, reason in (
        (READY, False, why),
        (RECONCILING, True, why),
        (STALLED, False, StatusReason(AS_EXPECTED, "")),
    ):
        conditions = set_condition(
            conditions, condition_type, status, reason.reason, reason.message, generation=generation, now=now
        )
    acknowledged = previous.model_copy(update={"conditions": conditions, "observed_generation": generation})
    wire: dict[str, Any] = acknowledged.model_dump(mode="json", by_alias=True, exclude_none=True)
    return wire


def _device_class(body: kopf.Body) -> DeviceClass | None:
    try:
        return DeviceClass.model_validate(_plain(dict(body)))
    except ValidationError:
        return None


def _classes(index: kopf.Index[str, DeviceClass]) -> list[DeviceClass]:
    """Every DeviceClass in the ``deviceclasses`` index (kopf passes indices by name, as keyword arguments)."""
    return sorted((c for name in index for c in index[name]), key=lambda c: c.metadata.name)


def _targets(index: kopf.Index[str, Targets]) -> dict[str, Targets]:
    """EdgeModel uid → its targets, from the ``edgemodel_targets`` index."""
    return {uid: t for uid in index for t in index[uid]}


# ---------------------------------------------------------------------------------- the edge


Log = logging.Logger | logging.LoggerAdapter[Any]


@contextlib.contextmanager
def _retry_later(driver: EdgeModelDriver, retry: int, log: Log) -> Iterator[None]:
    """Failures the reconciler did not turn into status become kopf retries with backoff."""
    delay = driver.kopf_settings.retry_delay(retry)
    try:
        yield
    except EdgeFleetError as exc:  # store outages, signing trouble: a later attempt may work
        log.warning("reconcile failed, retrying in %.0f s: %s", delay, exc)
        raise kopf.TemporaryError(str(exc), delay=delay) from exc
    except Exception as exc:  # the edge: a bug must not stop the operator, nor silence the model
        log.exception("reconcile failed unexpectedly, retrying in %.0f s", delay)
        raise kopf.TemporaryError(f"{type(exc).__name__}: {exc}", delay=delay) from exc


def _post(body: kopf.Body, result: ReconcileResult) -> None:
    for event in result.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


async def _reconcile(
    driver: EdgeModelDriver, body: kopf.Body, patch: kopf.Patch, retry: int, log: Log, classes: list[DeviceClass]
) -> None:
    with _retry_later(driver, retry, log):
        outcome = await driver.reconcile(body, classes)
    patch.status.update(outcome.status_patch)
    if outcome.result is not None:
        _post(body, outcome.result)
    elif outcome.problem is not None:
        kopf.warn(body, reason=INVALID_SPEC, message=outcome.problem)


def build_registry(driver: EdgeModelDriver) -> kopf.OperatorRegistry:
    """The handlers, bound to ``driver``, in a registry of their own (nothing global)."""
    registry = kopf.OperatorRegistry()
    ks = driver.kopf_settings
    group, version = API_GROUP, API_VERSION

    @kopf.on.login(id="login", registry=registry)
    async def login(settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.AiohttpSession | None:
        return await _login(ks, settings, on_login=driver.logged_in, **kwargs)

    @kopf.on.startup(id="open-store", registry=registry)
    async def start(retry: int, **_: Any) -> None:
        try:
            await driver.start()
        except EdgeFleetError as exc:
            if not is_store_outage(exc):  # keys, settings, a damaged repository: a person must act
                driver.setup_error = exc if isinstance(exc, RuntimeSetupError) else RuntimeSetupError(str(exc))
                raise kopf.PermanentError(str(exc)) from exc
            delay = ks.retry_delay(retry)
            logger.warning("cannot reach the store (%s); retrying in %.0f s", exc, delay)
            raise kopf.TemporaryError(f"cannot reach the store: {exc}", delay=delay) from exc

    @kopf.on.cleanup(id="close", registry=registry)
    def stop(**_: Any) -> None:
        driver.close()

    @kopf.index(group, version, DEVICECLASSES, id="deviceclasses", registry=registry)
    def deviceclasses(body: kopf.Body, name: str, logger: kopf.Logger, **_: Any) -> dict[str, DeviceClass]:
        parsed = _device_class(body)
        if parsed is None:
            logger.warning("DeviceClass %s does not parse; models cannot target it", name)
            return {}
        return {name: parsed}

    @kopf.index(group, version, EDGEMODELS, id="edgemodel_targets", registry=registry)
    def edgemodel_targets(spec: kopf.Spec, uid: str, **_: Any) -> dict[str, Targets]:
        try:
            return {uid: Targets.model_validate(_plain(spec.get("targets") or {}))}
        except ValidationError:
            return {}  # stalled on its spec: a DeviceClass change cannot help it

    @kopf.on.event(group, version, DEVICECLASSES, id="replan", registry=registry)
    def deviceclass_changed(event: kopf.RawEvent, body: kopf.Body, logger: kopf.Logger, **kwargs: Any) -> None:
        kind = event.get("type")
        if kind is None:  # the initial listing: models reconcile against it when they resume
            return
        changed = _device_class(body)
        if changed is None:
            return
        woken = driver.replan(changed, _targets(kwargs["edgemodel_targets"]))
        if woken:
            logger.info("DeviceClass %s: %s, re-planning %d model(s)", changed.metadata.name, kind.lower(), len(woken))

    # Registered first: kopf runs one handler per pass and writes its patch before the next, so a
    # new generation shows Reconciling before the (possibly minutes-long) reconcile starts.
    @kopf.on.resume(group, version, EDGEMODELS, id="acknowledge", registry=registry)
    @kopf.on.create(group, version, EDGEMODELS, id="acknowledge", registry=registry)
    @kopf.on.update(group, version, EDGEMODELS, field="spec", id="acknowledge", registry=registry)
    async def acknowledge(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        status = driver.acknowledge(body)
        if status is not None:
            patch.status.update(status)

    @kopf.on.resume(group, version, EDGEMODELS, id="reconcile", registry=registry)
    @kopf.on.create(group, version, EDGEMODELS, id="reconcile", registry=registry)
    @kopf.on.update(group, version, EDGEMODELS, field="spec", id="reconcile", registry=registry)
    async def changed(body: kopf.Body, patch: kopf.Patch, retry: int, logger: kopf.Logger, **kwargs: Any) -> None:
        failpoint("operator.reconcile.acknowledged")  # the acknowledgement is written; nothing else yet
        await _reconcile(driver, body, patch, retry, logger, _classes(kwargs["deviceclasses"]))

    @kopf.timer(group, version, EDGEMODELS, id=TICK_HANDLER, interval=ks.tick_seconds, registry=registry)
    async def requeue(body: kopf.Body, uid: str, patch: kopf.Patch, logger: kopf.Logger, **kwargs: Any) -> None:
        # A reconcile running now schedules the next one itself.
        if driver.busy(uid) or not driver.schedule.is_due(uid):
            return
        await _reconcile(driver, body, patch, kwargs.get("retry", 0), logger, _classes(kwargs["deviceclasses"]))

    @kopf.on.delete(group, version, EDGEMODELS, id="finalize", registry=registry)
    async def deleted(body: kopf.Body, retry: int, logger: kopf.Logger, **_: Any) -> None:
        with _retry_later(driver, retry, logger):
            result = await driver.finalize(body)
        _post(body, result)

    return registry


def operator_settings(ks: KopfSettings) -> kopf.OperatorSettings:
    """kopf's settings for our resources: its state in annotations, our finalizer, peering."""
    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage()
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage()
    settings.persistence.finalizer = FINALIZER
    settings.posting.loggers = False  # we post our own events, with our reasons
    settings.peering.standalone = ks.peering is None
    if ks.peering is not None:
        settings.peering.name = ks.peering
        settings.peering.mandatory = True
        settings.peering.priority = ks.priority
    return settings


class _QuietTicks(logging.Filter):
    """Drops kopf's "Timer 'requeue' succeeded." line: the timer ticks every second for every model."""

    _line = f"Timer {TICK_HANDLER!r} succeeded."

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self._line


async def _login(
    ks: KopfSettings,
    settings: kopf.OperatorSettings,
    *,
    on_login: Callable[[ApiEndpoint], None] | None = None,
    **kwargs: Any,
) -> kopf.AiohttpSession | None:
    """Credentials as kopf finds them (a server URL, the service account, kubeconfig), sent with our User-Agent.

    ``on_login`` gets the same credentials for our own synchronous calls (pipeline Jobs).
    """
    info: kopf.ConnectionInfo | None
    if ks.server is not None:
        info = kopf.ConnectionInfo(server=ks.server, default_namespace="default")
    else:
        info = kopf.login_with_service_account(settings=settings, **kwargs) or kopf.login_with_kubeconfig(
            settings=settings, **kwargs
        )
    if info is None:
        return None  # kopf then reports that no credentials were found
    # The session kopf would build from `info`, with the replica named in the User-Agent: the API
    # server's audit log then shows which replica wrote what.
    headers = {**info.as_http_headers(), "User-Agent": ks.user_agent()}
    if on_login is not None:
        on_login(ApiEndpoint(info.server, ssl_context=info.as_ssl_context(), headers=headers))
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ssl=info.as_ssl_context()),
        headers=headers,
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    return kopf.AiohttpSession(
        server=info.server,
        default_namespace=info.default_namespace,
        priority=info.priority,
        expiration=info.expiration,
        aiohttp_session=session,
    )


async def serve(
    settings: OperatorSettings,
    kopf_settings: KopfSettings,
    *,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    driver: EdgeModelDriver | None = None,
) -> None:
    """Run the operator until ``stop_flag`` is set (or SIGTERM/SIGINT when in the main thread)."""
    driver = driver or EdgeModelDriver(settings, kopf_settings)
    ks = kopf_settings
    http = _serve_metrics(driver, ks.metrics_listen) if ks.metrics_listen is not None else None
    quiet = _QuietTicks()
    objects_log = logging.getLogger("kopf.objects")
    objects_log.addFilter(quiet)
    try:
        await kopf.operator(
            registry=build_registry(driver),
            settings=operator_settings(ks),
            clusterwide=ks.clusterwide,
            namespaces=list(ks.namespaces),
            identity=cast("Any", ks.identity),  # kopf's Identity is a NewType of str it does not export
            liveness_endpoint=ks.liveness,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    except Exception:
        if driver.setup_error is not None:  # kopf wraps it in an error of its own: say what to fix
            raise driver.setup_error from None
        raise
    finally:
        objects_log.removeFilter(quiet)
        driver.close()
        if http is not None:
            http.shutdown()
            http.server_close()
            driver.metrics_address = None


def _serve_metrics(driver: EdgeModelDriver, listen: str) -> WSGIServer:
    """The driver's metrics over HTTP on ``listen`` (a daemon thread); sets ``driver.metrics_address``."""
    host, port = parse_listen(listen)
    try:
        http, _, bound = driver.metrics.serve(host, port)
    except OSError as exc:
        raise MetricsListenError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
    driver.metrics_address = f"{host}:{bound}"
    logger.info("serving metrics on http://%s/metrics", driver.metrics_address)
    return http
