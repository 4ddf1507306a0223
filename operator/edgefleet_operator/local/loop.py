"""The embedded control plane: the operator's reconciler over resource files, without a cluster.

:class:`ControlPlane` applies the manifests to the embedded API (:mod:`.api`), then runs the very
:class:`~edgefleet_operator.reconcile.edge_model.EdgeModelReconciler` the kopf operator runs (built
by :func:`edgefleet_operator.runtime.build_reconciler`), level-triggered: every EdgeModel is
reconciled when it is new, when its spec changed, when a DeviceClass changed, when its requeue time
came, and (watching) every ``resync_s``. An EdgeModel that left the files is finalized (assignments
removed, artifacts per its ``artifactPolicy``) before it disappears.

A model is **settled** (:func:`is_settled`) when its last reconcile covered its current generation
and nothing but a change or a device can move it on: it is ready, stalled (the user must act), or
its rollouts are paused or wait for the class's first device. Without ``watch`` the loop ends when
every model is settled, or at the timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from edgefleet_core.bundle.publisher import Publisher
from edgefleet_core.errors import EdgeFleetError
from edgefleet_core.resources.base import Condition
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import EdgeModelStatus
from edgefleet_operator.local.api import FINALIZER, ApplyOutcome, LocalApi, StoredObject
from edgefleet_operator.local.errors import InputError
from edgefleet_operator.local.manifests import Manifest, ObjectKey, read_manifests
from edgefleet_operator.local.state import StateDir
from edgefleet_operator.reconcile.status import PUBLISHED, READY, RECONCILING, STALLED, find_condition, is_true
from edgefleet_operator.runtime import (
    DEFAULT_WORKERS,
    OperatorSettings,
    S3Options,
    build_reconciler,
    load_keys,
    open_artifact_store,
    prepare_repository,
)

if TYPE_CHECKING:
    from edgefleet_operator.reconcile.edge_model import EdgeModelReconciler, ReconcileResult

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S: Final = 600.0
MAX_EVENTS: Final = 1000
"""Events kept for the report (a long watch must not grow without bound)."""
_BACKOFF_S: Final = (1.0, 2.0, 5.0, 10.0, 30.0)
RETRYING: Final = "Retrying"
"""Reason of ``Reconciling`` while the reconciler backs off after a store or network failure."""
_RESTING_PHASES: Final = frozenset({"Paused", "Succeeded"})
"""Rollout phases nothing but a spec change moves on."""
"""Waits before retrying a model whose reconcile raised (the store down, say)."""


@dataclass(frozen=True)
class LocalSettings:
    """What ``edgefleet up`` runs with; built once from the command line."""

    paths: tuple[Path, ...]
    """Resource files and folders (a folder: the resource files directly in it)."""
    state: StateDir
    store_url: str | None = None
    """The artifact store; ``None``: ``store/`` in the state folder."""
    watch: bool = False
    """Keep running, re-reading the files, until stopped (or ``timeout_s``)."""
    timeout_s: float | None = DEFAULT_TIMEOUT_S
    """How long to wait for every model to settle (watching: how long to run); ``None``: no limit."""
    poll_interval_s: float = 1.0
    """Watching: how often the files are read again."""
    resync_s: float = 30.0
    """Watching: how often a settled model is reconciled again (device reports arrive without events here)."""
    rollout_poll_s: float = 2.0
    """How often a model whose rollout is under way (devices installing, a wave pause) is stepped again."""
    workers: int = DEFAULT_WORKERS
    s3: S3Options = field(default_factory=S3Options)

    def operator_settings(self, base_dir: Path | None) -> OperatorSettings:
        return OperatorSettings(
            store_url=self.store_url or self.state.store_url,
            keys_dir=self.state.keys_dir,
            cache_dir=self.state.cache_dir,
            workers=self.workers,
            base_dir=base_dir,
            s3=self.s3,
        )


@dataclass(frozen=True)
class ModelEvent:
    """An event the reconciler emitted for an object (what ``kubectl get events`` would show)."""

    key: ObjectKey
    type: str
    """``Normal`` or ``Warning``."""
    reason: str
    message: str
    time: datetime


@dataclass
class ModelReport:
    """Where one EdgeModel stands at the end of the run."""

    key: ObjectKey
    file: Path | None
    generation: int
    status: EdgeModelStatus | None
    settled: bool
    error: str | None = None
    """The last reconcile raised this (it is retried); ``None`` when it returned."""

    @property
    def stalled(self) -> Condition | None:
        """The ``Stalled`` condition when it is true: the user must change something."""
        found = find_condition(self.status.conditions if self.status else None, STALLED)
        return found if found is not None and found.status == "True" else None


@dataclass
class RunReport:
    """What a run did and where everything stands."""

    state: StateDir
    store_url: str
    keys_created: bool = False
    models: list[ModelReport] = field(default_factory=list)
    device_classes: list[ObjectKey] = field(default_factory=list)
    edge_devices: list[ObjectKey] = field(default_factory=list)
    applied: ApplyOutcome = field(default_factory=ApplyOutcome)
    """Every change applied to the embedded API during the run."""
    events: deque[ModelEvent] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    settled: bool = False
    timed_out: bool = False
    stopped: bool = False
    """Ended by :meth:`ControlPlane.stop` (Ctrl-C, SIGTERM)."""
    input_problem: InputError | None = None
    """Watching: the files became invalid and the last valid ones stayed applied."""

    @property
    def stalled(self) -> list[ModelReport]:
        return [m for m in self.models if m.stalled is not None]


@dataclass
class _Tracking:
    """The loop's memory of one model (not stored: a restart reconciles everything once)."""

    due_at: float = 0.0
    generation: int = 0
    """Generation the last completed reconcile covered."""
    settled: bool = False
    failures: int = 0
    error: str | None = None


class ControlPlane:
    """Applies manifests and reconciles until settled (or, watching, until stopped)."""

    def __init__(
        self,
        settings: LocalSettings,
        *,
        on_start: Callable[[RunReport], None] | None = None,
        on_apply: Callable[[ApplyOutcome], None] | None = None,
        on_event: Callable[[ModelEvent], None] | None = None,
        on_settled: Callable[[RunReport], None] | None = None,
        on_input_problem: Callable[[InputError], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._on_start = on_start
        self._on_apply = on_apply
        self._on_event = on_event
        self._on_settled = on_settled
        self._on_input_problem = on_input_problem
        self._monotonic = monotonic
        self._stop = threading.Event()
        self._api = LocalApi(settings.state.api_dir)
        self._tracking: dict[ObjectKey, _Tracking] = {}
        self._events: deque[ModelEvent] = deque(maxlen=MAX_EVENTS)
        self._reconcilers: dict[Path | None, EdgeModelReconciler] = {}

    def stop(self) -> None:
        """End the run after the reconcile under way (thread- and signal-safe)."""
        self._stop.set()

    # ------------------------------------------------------------------ the run

    def run(self) -> RunReport:
        """Validate the files, then apply and reconcile; :class:`InputError` before anything is stored."""
        settings = self.settings
        manifests = read_manifests(settings.paths)
        report = RunReport(settings.state, settings.store_url or settings.state.store_url, events=self._events)
        with settings.state.locked():
            report.keys_created = settings.state.ensure_keys()
            self._prepare_repository()
            if self._on_start is not None:
                self._on_start(report)
            pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="edgefleet-build")
            try:
                self._loop(manifests, report, pool)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
                self._reconcilers.clear()
        return report

    def _prepare_repository(self) -> None:
        """Create the signed repository on the first run and keep ``trusted-root.json`` equal to its root."""
        operator = self.settings.operator_settings(None)
        keys = load_keys(operator.keys_dir)
        publisher = Publisher(open_artifact_store(operator), keys)
        self.settings.state.write_trusted_root(prepare_repository(publisher, keys, initialize=True))

    def _loop(self, manifests: list[Manifest], report: RunReport, pool: ThreadPoolExecutor) -> None:
        settings = self.settings
        start = self._monotonic()
        deadline = start + settings.timeout_s if settings.timeout_s is not None else None
        next_read = start + settings.poll_interval_s
        was_settled = False
        while True:
            now = self._monotonic()
            if settings.watch and now >= next_read:
                manifests = self._reread(manifests, report)
                next_read = now + settings.poll_interval_s
            outcome = self._api.apply(manifests)
            self._note_applied(outcome, report)
            pending = self._finalize_deleting(pool)
            changed_status = self._reconcile_due(pool)
            settled = not pending and not outcome.waiting and all(t.settled for t in self._tracking.values())
            if settled and (changed_status or outcome.changed or not was_settled):
                self._fill(report)
                report.settled = True
                if self._on_settled is not None:
                    self._on_settled(report)
            was_settled = settled
            if settled and not settings.watch:
                break
            if self._stop.is_set():
                report.stopped = True
                break
            now = self._monotonic()
            if deadline is not None and now >= deadline:
                report.timed_out = not settled
                break
            wake = min([t.due_at for t in self._tracking.values()], default=now + settings.resync_s)
            if settings.watch:
                wake = min(wake, next_read)
            if pending or outcome.waiting:
                wake = min(wake, now + settings.poll_interval_s)
            if deadline is not None:
                wake = min(wake, deadline)
            self._stop.wait(max(wake - now, 0.0))
        self._fill(report)
        report.settled = all(m.settled for m in report.models) and not report.timed_out

    def _reread(self, manifests: list[Manifest], report: RunReport) -> list[Manifest]:
        """The files as they are now; the last valid manifests while they do not validate."""
        try:
            fresh = read_manifests(self.settings.paths)
        except InputError as exc:
            if report.input_problem is None or str(report.input_problem) != str(exc):
                report.input_problem = exc
                if self._on_input_problem is not None:
                    self._on_input_problem(exc)
            return manifests
        report.input_problem = None
        return fresh

    def _note_applied(self, outcome: ApplyOutcome, report: RunReport) -> None:
        if not outcome.changed:
            return
        for mine, theirs in (
            (report.applied.created, outcome.created),
            (report.applied.configured, outcome.configured),
            (report.applied.relabeled, outcome.relabeled),
            (report.applied.deleting, outcome.deleting),
            (report.applied.deleted, outcome.deleted),
        ):
            mine.extend(theirs)
        now = self._monotonic()
        # A DeviceClass change re-plans every model (targets by name or selector may have moved).
        replan = "DeviceClass" in outcome.kinds_changed()
        for key in (*outcome.created, *outcome.configured):
            if key.kind == "EdgeModel":
                self._tracking.setdefault(key, _Tracking()).due_at = now
        for key in (*outcome.deleted, *outcome.deleting):
            self._tracking.pop(key, None)
        if replan:
            for tracking in self._tracking.values():
                tracking.due_at = now
        if self._on_apply is not None:
            self._on_apply(outcome)

    # ------------------------------------------------------------------ reconciling

    def build_summary(self, namespace: str, model: str, device_class: str) -> Mapping[str, Any] | None:
        """The newest build's summary for a class of a model (see ``EdgeModelReconciler.build_summary``)."""
        for reconciler in list(self._reconcilers.values()):
            found = reconciler.build_summary(namespace, model, device_class)
            if found is not None:
                return found
        return None

    def _reconciler(self, folder: Path | None, pool: ThreadPoolExecutor) -> EdgeModelReconciler:
        """The reconciler whose relative sources resolve in ``folder`` (one per folder, sharing the pool)."""
        found = self._reconcilers.get(folder)
        if found is None:
            found = build_reconciler(self.settings.operator_settings(folder), executor=pool)
            self._reconcilers[folder] = found
        return found

    def _classes(self) -> list[DeviceClass]:
        return [o.device_class() for o in self._api.objects("DeviceClass") if not o.deleting]

    def _reconcile_due(self, pool: ThreadPoolExecutor) -> bool:
        """Reconcile every model whose time has come; whether any stored status changed."""
        changed = False
        classes: list[DeviceClass] | None = None
        for stored in self._api.objects("EdgeModel"):
            if stored.deleting or self._stop.is_set():
                continue
            tracking = self._tracking.setdefault(stored.key, _Tracking())
            if stored.generation != tracking.generation:
                tracking.settled = False
            if self._monotonic() < tracking.due_at:
                continue
            classes = self._classes() if classes is None else classes
            changed |= self._reconcile(stored, classes, tracking, pool)
        return changed

    def _reconcile(
        self, stored: StoredObject, classes: Sequence[DeviceClass], tracking: _Tracking, pool: ThreadPoolExecutor
    ) -> bool:
        model = stored.edge_model()
        folder = stored.applied_from.parent if stored.applied_from is not None else None
        try:
            result = self._reconciler(folder, pool).reconcile(model, classes)
        except EdgeFleetError as exc:
            # Our errors out of the reconciler (the store unreachable while it set up, say): retried.
            self._failed(stored.key, tracking, exc)
            return False
        self._emit(stored.key, result)
        changed = self._api.write_status(
            stored.key, result.status.model_dump(mode="json", by_alias=True, exclude_none=True)
        )
        now = self._monotonic()
        tracking.generation = stored.generation
        tracking.failures, tracking.error = 0, None
        tracking.settled = is_settled(result.status, stored.generation)
        if tracking.settled:
            # Nothing moves it on but a change (or, watching, device reports seen at the next resync).
            tracking.due_at = now + self.settings.resync_s if self.settings.watch else float("inf")
        elif _retrying(result.status) or result.requeue_after is None:
            tracking.due_at = now + (result.requeue_after or _BACKOFF_S[0])
        else:
            # A rollout under way: its requeue is sized for a cluster; here reports come in quickly.
            tracking.due_at = now + min(result.requeue_after, self.settings.rollout_poll_s)
        return changed

    def _failed(self, key: ObjectKey, tracking: _Tracking, exc: EdgeFleetError) -> None:
        delay = _BACKOFF_S[min(tracking.failures, len(_BACKOFF_S) - 1)]
        tracking.failures += 1
        tracking.settled = False
        tracking.error = str(exc)
        tracking.due_at = self._monotonic() + delay
        logger.warning("[%s] reconcile failed, retrying in %.0f s: %s", key.short, delay, exc)
        self._record(ModelEvent(key, "Warning", "ReconcileFailed", f"{exc} (retrying in {delay:.0f} s)", _now()))

    def _finalize_deleting(self, pool: ThreadPoolExecutor) -> bool:
        """Finalize the EdgeModels whose deletion was asked for; whether any is still pending."""
        pending = False
        for stored in self._api.objects("EdgeModel"):
            if not stored.deleting:
                continue
            if FINALIZER not in stored.finalizers:
                pending |= not self._api.remove_finalizer(stored, FINALIZER)
                continue
            tracking = self._tracking.setdefault(stored.key, _Tracking())
            if self._monotonic() < tracking.due_at:
                pending = True
                continue
            folder = stored.applied_from.parent if stored.applied_from is not None else None
            try:
                result = self._reconciler(folder, pool).finalize(stored.edge_model())
            except EdgeFleetError as exc:
                self._failed(stored.key, tracking, exc)
                pending = True
                continue
            self._emit(stored.key, result)
            if result.requeue_after is not None:
                tracking.due_at = self._monotonic() + result.requeue_after
                pending = True
                continue
            self._api.remove_finalizer(stored, FINALIZER)
            self._tracking.pop(stored.key, None)
            self._record(ModelEvent(stored.key, "Normal", "Deleted", "finalized and removed", _now()))
        return pending

    def _emit(self, key: ObjectKey, result: ReconcileResult) -> None:
        for event in result.events:
            self._record(ModelEvent(key, event.type, event.reason, event.message, _now()))

    def _record(self, event: ModelEvent) -> None:
        self._events.append(event)
        if self._on_event is not None:
            self._on_event(event)

    # ------------------------------------------------------------------ the report

    def _fill(self, report: RunReport) -> None:
        report.device_classes = [o.key for o in self._api.objects("DeviceClass")]
        report.edge_devices = [o.key for o in self._api.objects("EdgeDevice")]
        report.models = []
        for stored in self._api.objects("EdgeModel"):
            tracking = self._tracking.get(stored.key, _Tracking())
            status = stored.edge_model().status
            report.models.append(
                ModelReport(
                    key=stored.key,
                    file=stored.applied_from,
                    generation=stored.generation,
                    status=status,
                    settled=tracking.settled and tracking.generation == stored.generation and not stored.deleting,
                    error=tracking.error,
                )
            )


def _now() -> datetime:
    return datetime.now(UTC)


def _retrying(status: EdgeModelStatus) -> bool:
    """The store, network or repository failed and the reconciler backs off (``Reconciling``, ``Retrying``)."""
    found = find_condition(status.conditions, RECONCILING)
    return found is not None and found.status == "True" and found.reason == RETRYING


def is_settled(status: EdgeModelStatus | None, generation: int) -> bool:
    """Whether nothing moves the model on but a change of the files or reports from devices.

    Settled: the status covers ``generation`` and the model is ready, or stalled (the user must
    act), or published with every class's rollout paused, done, or waiting for the class's first
    device. A rollout with devices under way is not settled (their reports move it on), nor is a
    model retrying after a store failure.
    """
    if status is None or status.observed_generation != generation:
        return False
    if is_true(status.conditions, STALLED):
        return True
    if _retrying(status):
        return False
    if is_true(status.conditions, READY):
        return True
    rollouts = status.rollout or []
    return (
        is_true(status.conditions, PUBLISHED)
        and bool(rollouts)
        and all(r.phase in _RESTING_PHASES or (r.phase == "Pending" and not r.devices) for r in rollouts)
    )
