"""The EdgeModel reconciler: from a spec to published variants, per-class rollouts and a status.

Level-triggered: :meth:`EdgeModelReconciler.reconcile` reads the spec, the DeviceClasses, the
signed repository and the fleet, and converges them, whatever happened before. Each step is
idempotent on its own: a class whose build inputs (its build key) are already published adopts that
version instead of building again, and the rollout controller never assigns what the fleet already
holds. A restart at any point therefore converges on the same artifacts and the same status.

Builds run in the reconciler's executor, or, with a :class:`~.dispatch.BuildDispatcher`, elsewhere
(one Kubernetes Job per class): then a class stays ``Reconciling`` (``BuildingInJob``) while its
build runs, and the reconciler publishes the variant the dispatcher hands back.

Per-class independence: a class whose build fails (a spec the pipeline cannot meet) or whose store
access fails keeps its previous variant and rollout untouched, and the other classes go on.

Transport-free: the kopf handlers and the embedded control plane turn a :class:`ReconcileResult`
into a status patch, Events and a requeue; nothing here knows kopf.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Literal, Protocol, TypeVar

from edgefleet_core.bundle.distribution import BundleRef, version_key
from edgefleet_core.bundle.publisher import PublishedVariant, Publisher
from edgefleet_core.errors import EdgeFleetError
from edgefleet_core.failpoints import failpoint
from edgefleet_core.optimize.data import Dataset
from edgefleet_core.optimize.lineage import VariantCache
from edgefleet_core.optimize.model_io import LoadedModel
from edgefleet_core.optimize.passes.base import Trainer
from edgefleet_core.resources.base import Condition
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import (
    ClassRollout,
    EdgeModel,
    EdgeModelStatus,
    RolloutPhase,
    RolloutPolicy,
    Variant,
)
from edgefleet_operator.fleet.records import model_key
from edgefleet_operator.fleet.state import FleetState, utc_now
from edgefleet_operator.metrics import BuildOutcome, OperatorMetrics, ReconcileOutcome
from edgefleet_operator.reconcile.build_key import build_key, pinned_data_sha256
from edgefleet_operator.reconcile.dispatch import BuildDispatcher, Built, DispatchState, Failed, Running
from edgefleet_operator.reconcile.errors import SpecError
from edgefleet_operator.reconcile.sources import SourceResolver
from edgefleet_operator.reconcile.status import (
    DEGRADED,
    OPTIMIZED,
    PUBLISHED,
    RECONCILING,
    ROLLED_OUT,
    STALLED,
    StatusReason,
    find_condition,
    set_condition,
    summarize,
)
from edgefleet_operator.reconcile.targets import resolve_targets
from edgefleet_operator.reconcile.variants import BUILD_SECONDS, BuiltVariant, build_variant, variant_status
from edgefleet_operator.rollout.controller import BundleSource, RolloutController, RolloutStep
from edgefleet_operator.rollout.decisions import (
    AdvanceWave,
    AssignWave,
    Complete,
    Halt,
    Hold,
    Resume,
    RollBack,
    RolloutDecision,
    RolloutTarget,
    StartRollout,
)

logger = logging.getLogger(__name__)

RETRY_BASE_S: Final = 5.0
"""First delay after a store or network failure; it doubles with each failed attempt in a row."""
RETRY_MAX_S: Final = 300.0
DEFAULT_POLL_S: Final = 30.0
"""How soon a rollout under way is stepped again when only device reports can move it on."""
DEFAULT_DISPATCH_POLL_S: Final = 10.0
"""How soon a model is looked at again while a class's build runs elsewhere (a Job)."""
DEFAULT_RESYNC_S: Final = 300.0
"""How soon a settled rollout is looked at again (devices that enrolled since get the version)."""
MEMO_LIMIT: Final = 4096
"""Builds remembered per reconciler (published, or refused by the pipeline), oldest forgotten first."""
IN_PROGRESS: Final[frozenset[RolloutPhase]] = frozenset({"Pending", "Progressing"})
DEGRADED_PHASES: Final[frozenset[RolloutPhase]] = frozenset({"RolledBack", "Failed"})
_PHASE_PRECEDENCE: Final[tuple[RolloutPhase, ...]] = (
    "Failed",
    "RolledBack",
    "Paused",
    "Progressing",
    "Pending",
    "Succeeded",
)
"""The model's ``rolloutPhase`` is its classes' first phase in this order (the one that needs attention)."""

BUILDING_ELSEWHERE: Final = "BuildingInJob"
"""Reason of ``Optimized`` (false) and ``Reconciling`` (true) while a dispatched build runs."""

EventType = Literal["Normal", "Warning"]
_DECISION_EVENTS: Final[dict[type, tuple[EventType, str | None]]] = {
    StartRollout: ("Normal", None),
    AssignWave: ("Normal", None),
    AdvanceWave: ("Normal", "WaveAdvanced"),
    Complete: ("Normal", "RolloutSucceeded"),
    RollBack: ("Warning", "RolledBack"),
    Halt: ("Warning", "RolloutFailed"),
    Hold: ("Normal", "RolloutPaused"),
    Resume: ("Normal", "RolloutResumed"),
}
"""Which rollout decisions become Events, and their reason (``None``: the decision's own)."""
_MemoKey = tuple[str, str, str, str]  # namespace, model, device class, build key
_V = TypeVar("_V")


@dataclass(frozen=True)
class Event:
    """Something a user must see, as a Kubernetes Event on the EdgeModel."""

    type: EventType
    reason: str
    """CamelCase (``VariantPublished``, ``RolloutStarted``, ``RolledBack``, ``Stalled``, ...)."""
    message: str


@dataclass(frozen=True)
class ReconcileResult:
    """What one reconcile decided: the status to write, the Events to post, and when to come back."""

    status: EdgeModelStatus
    """The whole status (``to_wire()`` gives the patch body)."""
    events: list[Event]
    requeue_after: float | None
    """Seconds until the model should be reconciled again even if nothing changes; ``None``: only on a change."""


class VariantBuilder(Protocol):
    """Builds one class's variant (:func:`~.variants.build_variant`, or a test's stand-in)."""

    def __call__(
        self,
        model: EdgeModel,
        device_class: DeviceClass,
        source: LoadedModel,
        data: tuple[Dataset, str] | None,
        *,
        cache: VariantCache | None,
        trainer: Trainer | None,
    ) -> BuiltVariant: ...


@dataclass
class _ClassWork:
    """One targeted class during one reconcile."""

    device_class: DeviceClass
    key: str
    """The build key of the class's variant under the current spec."""
    published: PublishedVariant | None = None
    """The variant of ``key`` once it is published (found, adopted or published now)."""
    built: BuiltVariant | None = None
    problem: SpecError | None = None
    """The spec cannot be met for this class: the user must act."""
    retry: EdgeFleetError | None = None
    """The store, network or repository failed: a later attempt may succeed."""
    building: str | None = None
    """The build runs elsewhere (a dispatched Job) and has not finished: where, for the status."""
    step: RolloutStep | None = None

    @property
    def name(self) -> str:
        return self.device_class.metadata.name

    def needs_build(self) -> bool:
        """Nothing published for the key yet, and nothing in the way of building it now."""
        return self.published is None and self.problem is None and self.retry is None


@dataclass(frozen=True)
class _TimedBuild:
    """A build's outcome and how long it ran (in the worker, queueing excluded)."""

    built: BuiltVariant | None
    error: Exception | None
    seconds: float


def _timed_build(
    builder: VariantBuilder,
    model: EdgeModel,
    device_class: DeviceClass,
    source: LoadedModel,
    data: tuple[Dataset, str] | None,
    *,
    cache: VariantCache | None,
    trainer: Trainer | None,
) -> _TimedBuild:
    """Run ``builder`` and time it; a module-level function, so a process pool can run it too."""
    started = time.perf_counter()
    try:
        built = builder(model, device_class, source, data, cache=cache, trainer=trainer)
    except Exception as exc:  # noqa: BLE001 - handed back with its time; the reconciler re-raises it
        return _TimedBuild(None, exc, time.perf_counter() - started)
    return _TimedBuild(built, None, time.perf_counter() - started)


@dataclass
class _Memo:
    """Bounded, thread-safe memory of build keys already settled, so a reconcile does not ask again."""

    published: OrderedDict[_MemoKey, PublishedVariant] = field(default_factory=OrderedDict)
    refused: OrderedDict[_MemoKey, SpecError] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def remember_published(self, key: _MemoKey, variant: PublishedVariant) -> None:
        with self.lock:
            _bounded_put(self.published, key, variant)

    def remember_refused(self, key: _MemoKey, error: SpecError) -> None:
        with self.lock:
            _bounded_put(self.refused, key, error)

    def lookup(self, key: _MemoKey) -> PublishedVariant | SpecError | None:
        with self.lock:
            return self.published.get(key) or self.refused.get(key)

    def forget(self, key: _MemoKey) -> None:
        with self.lock:
            self.published.pop(key, None)
            self.refused.pop(key, None)

    def forget_model(self, namespace: str, model: str) -> None:
        with self.lock:
            for memo in (self.published, self.refused):
                for key in [k for k in memo if k[:2] == (namespace, model)]:
                    del memo[key]


def _bounded_put(memo: OrderedDict[_MemoKey, _V], key: _MemoKey, value: _V) -> None:
    memo[key] = value
    memo.move_to_end(key)
    while len(memo) > MEMO_LIMIT:
        memo.popitem(last=False)


class EdgeModelReconciler:
    """Reconciles EdgeModels against one signed repository and one fleet.

    Thread-safe: reconciles of different models may run at once (kopf runs handlers concurrently).
    Publishing and assigning are serialized inside one reconciler, because the repository and the
    fleet's assignment revisions each take one writer at a time; the pipeline is not, and runs in
    ``executor`` when one is given (a thread pool; a process pool when builder and inputs pickle).
    """

    def __init__(
        self,
        *,
        publisher: Publisher,
        fleet: FleetState,
        sources: SourceResolver,
        bundles: BundleSource,
        cache: VariantCache | None = None,
        trainer: Trainer | None = None,
        builder: VariantBuilder = build_variant,
        clock: Callable[[], datetime] = utc_now,
        executor: Executor | None = None,
        poll_interval: float = DEFAULT_POLL_S,
        resync_interval: float | None = DEFAULT_RESYNC_S,
        dispatcher: BuildDispatcher | None = None,
        dispatch_poll_interval: float = DEFAULT_DISPATCH_POLL_S,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        """``bundles`` tells the rollout controller what an assignment of a version names
        (:class:`~edgefleet_operator.rollout.controller.PublishedBundles` over the publisher's store).
        ``executor``: where class builds run; ``None`` runs them one after another in the caller.
        ``dispatcher``: when given, builds run there instead (``builder`` and ``executor`` are unused,
        and the operator never reads the sources); a running build is looked at again after
        ``dispatch_poll_interval`` seconds. ``metrics``: where reconciles, builds and publishes are
        recorded (:attr:`metrics`); ``None``: a registry of this reconciler's own.
        """
        self.metrics = metrics or OperatorMetrics()
        self._publisher = publisher
        self._fleet = fleet
        self._sources = sources
        self._cache = cache
        self._trainer = trainer
        self._builder = builder
        self._clock = clock
        self._executor = executor
        self._poll_interval = poll_interval
        self._resync_interval = resync_interval
        self._dispatcher = dispatcher
        self._dispatch_poll_interval = dispatch_poll_interval
        self._controller = RolloutController(fleet, bundles, clock=clock)
        self._memo = _Memo()
        self._publish_lock = threading.Lock()
        self._fleet_lock = threading.Lock()
        self._failures: dict[tuple[str, str], int] = {}
        self._failures_lock = threading.Lock()
        self._builds: dict[tuple[str, str, str], Mapping[str, Any]] = {}
        """(namespace, model, class) → the summary of the newest build this reconciler made or received."""

    # ------------------------------------------------------------------------------ reconcile

    def reconcile(self, model: EdgeModel, classes: Sequence[DeviceClass]) -> ReconcileResult:
        """Converge ``model`` (its last status in ``model.status``) given every DeviceClass there is."""
        namespace, name = _identity(model)
        started = time.perf_counter()
        try:
            result, outcome = self._reconcile(model, classes)
        except BaseException:
            self.metrics.reconciled("error", time.perf_counter() - started)
            raise
        self.metrics.reconciled(outcome, time.perf_counter() - started)
        self.metrics.model_status(namespace, name, result.status)
        return result

    def _reconcile(self, model: EdgeModel, classes: Sequence[DeviceClass]) -> tuple[ReconcileResult, ReconcileOutcome]:
        namespace, name = _identity(model)
        now = self._clock()
        before = model.status or EdgeModelStatus()
        events: list[Event] = []
        try:
            targets = resolve_targets(model.spec.targets, classes)
        except SpecError as exc:
            # Nothing is built or assigned: what the fleet runs now stays as it is.
            logger.warning("[%s/%s] stalled: %s", namespace, name, exc)
            return self._stalled_on_targets(model, before, exc, now), "stalled"
        self._renew_signed_metadata()
        works = [self._plan(model, device_class) for device_class in targets]
        dropped = sorted({v.device_class for v in before.variants or []} - {w.name for w in works})
        if dropped:
            # Their devices keep what they run: leaving the targets is not a delete.
            logger.info("[%s/%s] no longer targets %s", namespace, name, ", ".join(dropped))
        self._build_missing(model, [w for w in works if w.needs_build()], events)
        if self._dispatcher is not None:
            self.metrics.jobs_running(namespace, name, {w.name for w in works if w.building is not None})
        for work in works:
            if work.published is not None:
                self._roll_out(model, work, before, events)
        status, stalled = self._status(model, before, works, now)
        if stalled is not None and _stalled_news(before, stalled):
            events.append(Event("Warning", "Stalled", stalled.message))
        retrying = [w for w in works if w.retry is not None]
        if retrying and not _was_retrying(before):
            events.append(Event("Warning", "Retrying", _retry_message(retrying)))
        outcome: ReconcileOutcome = "stalled" if stalled is not None else "requeued" if retrying else "ok"
        return ReconcileResult(status, events, self._requeue_after(model, works, now)), outcome

    def _renew_signed_metadata(self) -> None:
        """Keep the repository's timestamp, snapshot and targets from lapsing (devices refuse expired ones).

        Only a publish renews them otherwise, and a fleet may go weeks without one. Cheap: the
        publisher reads nothing until a renewal is due. A failure is logged and retried next time:
        the metadata still has hours left (see ``RENEW_WITHIN``).
        """
        try:
            with self._publish_lock:
                written = self._publisher.renew_if_due()
        except EdgeFleetError as exc:
            self.metrics.store_error("renew")
            logger.warning("cannot renew the signed metadata (retried at the next reconcile): %s", exc)
            return
        if written is not None:
            logger.info("renewed the signed metadata: timestamp %d, snapshot %d, targets %d",
                        written.timestamp, written.snapshot, written.targets)  # fmt: skip

    def _plan(self, model: EdgeModel, device_class: DeviceClass) -> _ClassWork:
        """The class's build key, and its published variant when that build is already there."""
        namespace, name = _identity(model)
        key = build_key(model, device_class, data_sha256=pinned_data_sha256(model.spec))
        work = _ClassWork(device_class, key)
        known = self._memo.lookup((namespace, name, work.name, key))
        if isinstance(known, SpecError):
            work.problem = known  # the pipeline refused these very inputs; only a change can help
            return work
        if known is not None:
            work.published = known
            return work
        try:
            found = self._publisher.find_build(BundleRef(namespace, name, work.name), key)
        except EdgeFleetError as exc:
            work.retry = exc
            self.metrics.store_error("find_build")
            logger.warning("[%s/%s] class %s: cannot read the repository: %s", namespace, name, work.name, exc)
            return work
        if found is not None:
            logger.info(
                "[%s/%s] class %s: adopting version %s (same build key)", namespace, name, work.name, found.ref.version
            )
            work.published = found
            self._memo.remember_published((namespace, name, work.name, key), found)
        return work

    def _build_missing(self, model: EdgeModel, pending: list[_ClassWork], events: list[Event]) -> None:
        """Build and publish every class in ``pending`` as one new version (the source is read once)."""
        if not pending:
            return
        if self._dispatcher is not None:
            self._dispatch_missing(self._dispatcher, model, pending, events)
            return
        namespace, name = _identity(model)
        try:
            version = self._publisher.next_version(namespace, name)
            source = self._sources.load_model(model.spec.source)
            data = self._sources.load_evaluation_data(model.spec.accuracy, source)
        except SpecError as exc:
            # Not remembered: a missing file may appear, or an object store may start granting access.
            for work in pending:
                work.problem = exc
            logger.warning("[%s/%s] stalled: %s", namespace, name, exc)
            return
        except EdgeFleetError as exc:
            for work in pending:
                work.retry = exc
            self.metrics.store_error("read_sources")
            logger.warning("[%s/%s] cannot read the sources, will retry: %s", namespace, name, exc)
            return
        logger.info("[%s/%s] building version %s for %s", namespace, name, version, ", ".join(w.name for w in pending))
        self._run_builds(model, pending, source, data)
        failpoint("operator.build.optimized")  # variants built, nothing of this version published yet
        for work in pending:
            if work.built is not None:
                self._publish(model, work, version, events)

    def _dispatch_missing(
        self, dispatcher: BuildDispatcher, model: EdgeModel, pending: list[_ClassWork], events: list[Event]
    ) -> None:
        """Hand each class in ``pending`` to the dispatcher; publish those whose builds have finished.

        Classes dispatched in one reconcile share one new version, as in-process builds do; a build
        finishing later is published under the version it was dispatched for.
        """
        namespace, name = _identity(model)
        try:
            version = self._publisher.next_version(namespace, name)
        except EdgeFleetError as exc:
            for work in pending:
                work.retry = exc
            self.metrics.store_error("next_version")
            logger.warning("[%s/%s] cannot read the repository, will retry: %s", namespace, name, exc)
            return
        for work in pending:
            try:
                state = dispatcher.dispatch(model, work.device_class, build_key=work.key, version=version)
            except EdgeFleetError as exc:
                work.retry = exc
                self.metrics.store_error("dispatch")
                logger.warning("[%s/%s] class %s: cannot dispatch the build: %s", namespace, name, work.name, exc)
                continue
            self._take_dispatched(model, work, state)
            if work.built is not None and isinstance(state, Built):
                self._publish(model, work, self._free_version(model, work, state.version, version), events)
                if work.published is not None:
                    self._release(dispatcher, model, work)

    def _take_dispatched(self, model: EdgeModel, work: _ClassWork, state: DispatchState) -> None:
        """One dispatched build's state onto ``work``; a failure stays with its class."""
        namespace, name = _identity(model)
        match state:
            case Running(message):
                work.building = message
            case Built(variant):
                work.built = variant
                # The Job timed its own build: the summary says how long it ran, and each pass.
                seconds = variant.summary.get(BUILD_SECONDS)
                if isinstance(seconds, int | float):
                    self.metrics.build_finished(namespace, name, work.name, "built", float(seconds))
                self.metrics.build_summary(variant.summary)
                self._builds[(namespace, name, work.name)] = variant.summary
            case Failed(SpecError() as refused):
                work.problem = refused
                self._memo.remember_refused((namespace, name, work.name, work.key), refused)
                logger.warning("[%s/%s] class %s: build refused: %s", namespace, name, work.name, refused)
            case Failed(error):
                work.retry = error
                logger.warning("[%s/%s] class %s: build failed, will retry: %s", namespace, name, work.name, error)

    def _free_version(self, model: EdgeModel, work: _ClassWork, dispatched: str, fresh: str) -> str:
        """The version the build was dispatched for, unless this class has it already (then ``fresh``).

        Versions are immutable: a class holds a version once. The dispatched one can be taken when a
        build of an older spec of this class was published under it meanwhile.
        """
        namespace, name = _identity(model)
        try:
            taken = self._publisher.versions(BundleRef(namespace, name, work.name))
        except EdgeFleetError:
            return dispatched  # the publish reads the repository too, and reports the failure
        return fresh if dispatched in taken else dispatched

    def _release(self, dispatcher: BuildDispatcher, model: EdgeModel, work: _ClassWork) -> None:
        namespace, name = _identity(model)
        try:
            dispatcher.release(model, work.device_class, build_key=work.key)
        except EdgeFleetError as exc:
            self.metrics.store_error("release")
            # Harmless: the version is published, and the staged output is only disk space.
            logger.warning("[%s/%s] class %s: cannot clean up the finished build: %s", namespace, name, work.name, exc)

    def _run_builds(
        self, model: EdgeModel, pending: list[_ClassWork], source: LoadedModel, data: tuple[Dataset, str] | None
    ) -> None:
        in_flight = self.metrics.builds_running.labels("pool")
        in_flight.inc(len(pending))
        collected = 0
        try:
            if self._executor is None:
                for work in pending:
                    self._collect(model, work, functools.partial(self._build, model, work, source, data))
                    collected += 1
                    in_flight.dec()
                return
            futures = [
                (
                    work,
                    self._executor.submit(
                        _timed_build,
                        self._builder,
                        model,
                        work.device_class,
                        source,
                        data,
                        cache=self._cache,
                        trainer=self._trainer,
                    ),
                )
                for work in pending
            ]
            for work, future in futures:
                self._collect(model, work, future.result)
                collected += 1
                in_flight.dec()
        finally:
            in_flight.dec(len(pending) - collected)  # those an unexpected error left uncollected

    def _build(
        self, model: EdgeModel, work: _ClassWork, source: LoadedModel, data: tuple[Dataset, str] | None
    ) -> _TimedBuild:
        return _timed_build(
            self._builder, model, work.device_class, source, data, cache=self._cache, trainer=self._trainer
        )

    def _collect(self, model: EdgeModel, work: _ClassWork, outcome: Callable[[], _TimedBuild]) -> None:
        """One class's build outcome onto ``work``; a failure stays with its class."""
        namespace, name = _identity(model)
        timed = outcome()
        result: BuildOutcome = (
            "built" if timed.error is None else "refused" if isinstance(timed.error, SpecError) else "failed"
        )
        self.metrics.build_finished(namespace, name, work.name, result, timed.seconds)
        try:
            if timed.error is not None:
                raise timed.error
            work.built = timed.built
            if timed.built is not None:
                self.metrics.build_summary(timed.built.summary)
                self._builds[(namespace, name, work.name)] = timed.built.summary
        except SpecError as exc:
            work.problem = exc
            # The pipeline is deterministic in its inputs: the same key would be refused again.
            self._memo.remember_refused((namespace, name, work.name, work.key), exc)
            logger.warning("[%s/%s] class %s: build refused: %s", namespace, name, work.name, exc)
        except EdgeFleetError as exc:
            work.retry = exc
            logger.warning("[%s/%s] class %s: build failed, will retry: %s", namespace, name, work.name, exc)

    def _publish(self, model: EdgeModel, work: _ClassWork, version: str, events: list[Event]) -> None:
        namespace, name = _identity(model)
        built = work.built
        assert built is not None  # only built classes are published
        started = time.perf_counter()
        try:
            with self._publish_lock:
                started = time.perf_counter()  # the publish itself, not the wait for the lock
                failpoint("operator.publish.signing")
                published = self._publisher.publish(
                    BundleRef(namespace, name, work.name, version),
                    built.files,
                    build_key=work.key,
                    variant_id=built.variant_id,
                    lineage=built.lineage,
                    recipe=built.recipe,
                    metrics=built.metrics,
                    partition_plan=built.partition_plan,
                    self_test=built.self_test,
                )
        except EdgeFleetError as exc:
            self.metrics.published("failed", time.perf_counter() - started)
            self.metrics.store_error("publish")
            # Also a version another writer took meanwhile: the next attempt asks for a new one.
            work.retry = exc
            logger.warning(
                "[%s/%s] class %s: publishing %s failed, will retry: %s", namespace, name, work.name, version, exc
            )
            return
        failpoint("operator.publish.signed")  # in the signed repository; the status does not say so yet
        self.metrics.published("adopted" if published.adopted else "published", time.perf_counter() - started)
        work.published = published
        self._memo.remember_published((namespace, name, work.name, work.key), published)
        if not published.adopted:
            entry = variant_status(published, built)
            events.append(Event("Normal", "VariantPublished", _published_message(entry)))
            logger.info("[%s/%s] %s", namespace, name, _published_message(entry))

    def _roll_out(self, model: EdgeModel, work: _ClassWork, before: EdgeModelStatus, events: list[Event]) -> None:
        """One rollout step of the class's current variant."""
        namespace, name = _identity(model)
        assert work.published is not None
        assert work.published.ref.version is not None
        target = RolloutTarget(
            model_namespace=namespace,
            model_name=name,
            device_class=work.name,
            version=work.published.ref.version,
            policy=model.spec.rollout or RolloutPolicy(),
            paused=model.spec.paused,
        )
        try:
            with self._fleet_lock:
                work.step = self._controller.step(_rollout_of(before, work.name), target)
        except EdgeFleetError as exc:
            work.retry = exc
            self.metrics.store_error("rollout")
            # The bundle may have gone (deleted by another replica's finalizer): look it up afresh next time.
            self._memo.forget((namespace, name, work.name, work.key))
            logger.warning("[%s/%s] class %s: rollout step failed, will retry: %s", namespace, name, work.name, exc)
            return
        for decision in work.step.decisions:
            event = _decision_event(work.name, decision)
            if event is not None:
                events.append(event)

    # ------------------------------------------------------------------------------ status

    def _status(
        self, model: EdgeModel, before: EdgeModelStatus, works: list[_ClassWork], now: datetime
    ) -> tuple[EdgeModelStatus, StatusReason | None]:
        """The status after this reconcile, and why it is stalled by the spec (``None``: it is not)."""
        generation = model.metadata.generation
        variants: list[Variant] = []
        rollouts: list[ClassRollout] = []
        for work in works:
            variant = variant_status(work.published) if work.published is not None else _variant_of(before, work.name)
            if variant is not None:
                variants.append(variant)
            rollout = work.step.status if work.step is not None else _rollout_of(before, work.name)
            if rollout is not None:
                rollouts.append(rollout)
        problems = [w for w in works if w.problem is not None]
        stalled = StatusReason("InvalidSpec", _problem_message(problems)) if problems else None
        conditions = _progress_conditions(before.conditions, works, rollouts, generation=generation, now=now)
        conditions = summarize(
            conditions,
            generation=generation,
            now=now,
            stalled=stalled,
            progressing=_progressing(works, rollouts),
        )
        newest = max((v.version for v in variants), key=version_key, default=None)
        status = EdgeModelStatus(
            observed_generation=generation,
            version=newest,
            classes=len(works),
            rollout_phase=_model_phase(rollouts),
            conditions=conditions,
            variants=variants or None,
            rollout=rollouts or None,
        )
        return status, stalled

    def _stalled_on_targets(
        self, model: EdgeModel, before: EdgeModelStatus, error: SpecError, now: datetime
    ) -> ReconcileResult:
        generation = model.metadata.generation
        stalled = StatusReason("InvalidSpec", str(error))
        conditions = set_condition(
            before.conditions, OPTIMIZED, False, "InvalidSpec", str(error), generation=generation, now=now
        )
        conditions = summarize(conditions, generation=generation, now=now, stalled=stalled)
        status = before.model_copy(update={"observed_generation": generation, "conditions": conditions})
        events = [Event("Warning", "Stalled", str(error))] if _stalled_news(before, stalled) else []
        # A DeviceClass change re-plans the model anyway; the resync is for a change that was missed.
        return ReconcileResult(status, events, self._resync_interval)

    def _requeue_after(self, model: EdgeModel, works: list[_ClassWork], now: datetime) -> float | None:
        """The earliest of: a rollout's own requeue, polling a rollout under way, a resync, a retry's backoff."""
        delays: list[float] = []
        for work in works:
            if work.problem is not None and self._resync_interval is not None:
                delays.append(self._resync_interval)  # a missing source file may yet appear
            if work.building is not None:
                delays.append(self._dispatch_poll_interval)
            if work.step is None:
                continue
            phase = work.step.status.phase
            if phase in IN_PROGRESS:
                delays.append(self._poll_interval)  # reports can move it on before any pause ends
            elif phase != "Paused" and self._resync_interval is not None:
                delays.append(self._resync_interval)
            if work.step.requeue_at is not None:
                delays.append(max(0.0, (work.step.requeue_at - now).total_seconds()))
        identity = _identity(model)
        with self._failures_lock:
            if any(w.retry is not None for w in works):
                attempts = self._failures.get(identity, 0) + 1
                self._failures[identity] = attempts
                delays.append(min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (attempts - 1)))
            else:
                self._failures.pop(identity, None)
        return min(delays) if delays else None

    # ------------------------------------------------------------------------------ finalize

    def build_summary(self, namespace: str, model: str, device_class: str) -> Mapping[str, Any] | None:
        """The newest build's summary (passes, candidates and their figures) for a class of a model.

        Only builds this reconciler ran or received from a Job; an adopted build has none here.
        """
        return self._builds.get((namespace, model, device_class))

    def finalize(self, model: EdgeModel) -> ReconcileResult:
        """Before the EdgeModel goes: every device holding it gets a ``remove`` assignment, and with
        ``artifactPolicy: Delete`` its bundles leave the repository.

        Idempotent (a device already told to remove it is not told again; unpublishing twice removes
        nothing). Store and fleet errors pass through: the finalizer stays until a call returns.
        """
        namespace, name = _identity(model)
        for key in [k for k in list(self._builds) if k[:2] == (namespace, name)]:
            self._builds.pop(key, None)
        now = self._clock()
        events: list[Event] = []
        holders: dict[str, list[str]] = {}
        with self._fleet_lock:
            for record in self._fleet.list_devices(namespace):
                held = self._fleet.assignments_for(namespace, record.name).assignments.get(model_key(namespace, name))
                if held is not None and held.action != "remove":
                    holders.setdefault(held.version, []).append(record.name)
            for version, devices in sorted(holders.items()):
                self._fleet.assign(
                    namespace,
                    devices,
                    model_namespace=namespace,
                    model_name=name,
                    version=version,
                    action="remove",
                    target_paths=[],
                    bundle_sha256="",
                    bundle_length=0,
                )
        failpoint("operator.finalize.unassigned")  # devices told to remove it; artifacts still published
        told = sum(len(d) for d in holders.values())
        if told:
            events.append(Event("Normal", "AssignmentsRemoved", f"{name} removed from {told} device(s)"))
        removed = 0
        if model.spec.artifact_policy == "Delete":
            with self._publish_lock:
                removed = self._publisher.unpublish(namespace, name)
            if removed:
                events.append(Event("Normal", "ArtifactsDeleted", f"{removed} signed target(s) of {name} deleted"))
        if self._dispatcher is not None:
            self._dispatcher.discard_model(model)
        self._memo.forget_model(namespace, name)
        self.metrics.model_deleted(namespace, name)
        with self._failures_lock:
            self._failures.pop((namespace, name), None)
        logger.info(
            "[%s/%s] finalized: removed from %d device(s), %d target(s) deleted", namespace, name, told, removed
        )
        before = model.status or EdgeModelStatus()
        message = f"deleting: removed from {told} device(s); artifact policy {model.spec.artifact_policy}"
        conditions = set_condition(
            before.conditions, RECONCILING, True, "Finalizing", message, generation=model.metadata.generation, now=now
        )
        return ReconcileResult(before.model_copy(update={"conditions": conditions}), events, None)


# ---------------------------------------------------------------------------------- helpers


def _identity(model: EdgeModel) -> tuple[str, str]:
    return model.metadata.namespace or "default", model.metadata.name


def _rollout_of(status: EdgeModelStatus, device_class: str) -> ClassRollout | None:
    return next((r for r in status.rollout or [] if r.device_class == device_class), None)


def _variant_of(status: EdgeModelStatus, device_class: str) -> Variant | None:
    return next((v for v in status.variants or [] if v.device_class == device_class), None)


def _model_phase(rollouts: list[ClassRollout]) -> RolloutPhase | None:
    phases = {r.phase for r in rollouts}
    return next((p for p in _PHASE_PRECEDENCE if p in phases), None)


def _published_message(variant: Variant) -> str:
    passes = ", ".join(variant.passes or []) or "no passes"
    delta = f", accuracy delta {variant.accuracy_delta:+.4f}" if variant.accuracy_delta is not None else ""
    return (
        f"class {variant.device_class}: version {variant.version} published "
        f"({variant.size_bytes} bytes; {passes}{delta})"
    )


def _decision_event(device_class: str, decision: RolloutDecision) -> Event | None:
    """The Event a rollout decision deserves (``None`` for waiting, which changes nothing)."""
    kind = _DECISION_EVENTS.get(type(decision.action))
    if kind is None:
        return None
    event_type, reason = kind
    # ``None``: the planner's own reason says it best (RolloutStarted/RolloutRestarted, WaveAssigned/DevicesCaughtUp).
    return Event(
        event_type, reason or decision.reason, f"class {device_class}: {decision.status.message or decision.reason}"
    )


def _problem_message(problems: list[_ClassWork]) -> str:
    return "; ".join(f"DeviceClass {w.name}: {w.problem}" for w in problems)


def _retry_message(retrying: list[_ClassWork]) -> str:
    return "; ".join(f"DeviceClass {w.name}: {w.retry}" for w in retrying)


def _building_message(building: list[_ClassWork]) -> str:
    return "; ".join(f"DeviceClass {w.name}: building in {w.building}" for w in building)


def _stalled_news(before: EdgeModelStatus, stalled: StatusReason) -> bool:
    """Whether the spec problem is new (not already reported by the status this reconcile started from)."""
    previous = find_condition(before.conditions, STALLED)
    return previous is None or previous.status != "True" or previous.message != stalled.message


def _was_retrying(before: EdgeModelStatus) -> bool:
    previous = find_condition(before.conditions, RECONCILING)
    return previous is not None and previous.status == "True" and previous.reason == "Retrying"


def _progressing(works: list[_ClassWork], rollouts: list[ClassRollout]) -> StatusReason | None:
    retrying = [w for w in works if w.retry is not None]
    if retrying:
        return StatusReason("Retrying", _retry_message(retrying))
    building = [w for w in works if w.building is not None]
    if building:
        return StatusReason(BUILDING_ELSEWHERE, _building_message(building))
    moving = [r for r in rollouts if r.phase in IN_PROGRESS]
    if moving:
        return StatusReason("RollingOut", "; ".join(f"{r.device_class}: {r.message or r.phase}" for r in moving))
    return None


def _progress_conditions(
    conditions: Sequence[Condition] | None,
    works: list[_ClassWork],
    rollouts: list[ClassRollout],
    *,
    generation: int | None,
    now: datetime,
) -> list[Condition]:
    """``Optimized``, ``Published``, ``RolledOut`` and ``Degraded`` from what each class reached."""
    current = list(conditions or [])

    def put(condition_type: str, status: bool, reason: str, message: str) -> None:
        nonlocal current
        current = set_condition(current, condition_type, status, reason, message, generation=generation, now=now)

    refused = [w for w in works if w.problem is not None]
    unbuilt = [w for w in works if w.published is None]
    if refused:
        put(OPTIMIZED, False, "InvalidSpec", _problem_message(refused))
    elif unbuilt and all(w.retry is None for w in unbuilt) and any(w.building is not None for w in unbuilt):
        put(OPTIMIZED, False, BUILDING_ELSEWHERE, _building_message([w for w in unbuilt if w.building is not None]))
    elif unbuilt:
        put(OPTIMIZED, False, "Retrying", _retry_message([w for w in unbuilt if w.retry is not None]))
    else:
        put(OPTIMIZED, True, "VariantsBuilt", f"a variant for each of {len(works)} DeviceClass(es)")

    if unbuilt:
        put(PUBLISHED, False, "NotPublished", "no current variant for " + ", ".join(w.name for w in unbuilt))
    else:
        versions = ", ".join(f"{w.name} {w.published.ref.version}" for w in works if w.published is not None)
        put(PUBLISHED, True, "VariantsPublished", f"signed and published: {versions}")

    current_rollouts = [w.step.status for w in works if w.step is not None]
    done = [r for r in current_rollouts if r.phase == "Succeeded"]
    if len(done) == len(works):
        put(ROLLED_OUT, True, "RolloutSucceeded", "; ".join(f"{r.device_class}: {r.message}" for r in done))
    else:
        phase = _model_phase([r for r in current_rollouts if r.phase != "Succeeded"]) or "Pending"
        waiting = [w.name for w in works if w.step is None]
        parts = [f"{r.device_class}: {r.phase}: {r.message}" for r in current_rollouts if r.phase != "Succeeded"]
        parts += [f"{c}: no rollout of its current variant" for c in waiting]
        put(ROLLED_OUT, False, phase, "; ".join(parts))

    degraded = [r for r in rollouts if r.phase in DEGRADED_PHASES]
    if degraded:
        reason = "RolledBack" if any(r.phase == "RolledBack" for r in degraded) else "RolloutFailed"
        put(DEGRADED, True, reason, "; ".join(f"{r.device_class}: {r.message}" for r in degraded))
    else:
        put(DEGRADED, False, "Healthy", "no rollout failed its health gate")
    return current
