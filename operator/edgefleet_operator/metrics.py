"""The operator's Prometheus metrics, in a registry of its own (never the global one).

One :class:`OperatorMetrics` per reconciler: two operators in one process (tests, ``edgefleet up``
next to a test's own) never share or clash over series. The reconciler records into it; the
operator serves it over HTTP when ``edgefleet operator run --metrics-listen HOST:PORT`` asks.

Label cardinality stays bounded: EdgeModels by namespace and name, DeviceClasses by name, pass
types, outcomes. Never a device name: a fleet has thousands, and the gateway and agents report
per-device figures.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from threading import Thread
from typing import Final, Literal, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edgefleet_core.errors import EdgeFleetError
from edgefleet_core.resources.edge_model import EdgeModelStatus, RolloutPhase

ReconcileOutcome = Literal["ok", "requeued", "stalled", "error"]
"""``ok``: converged or progressing as planned; ``requeued``: a store, network or build failure
is retried with backoff; ``stalled``: the spec cannot be met (the user must act); ``error``: the
reconcile raised (the edge retries it)."""
RECONCILE_OUTCOMES: Final[tuple[ReconcileOutcome, ...]] = get_args(ReconcileOutcome)
BuildMode = Literal["pool", "jobs"]
BUILD_MODES: Final[tuple[BuildMode, ...]] = get_args(BuildMode)
BuildOutcome = Literal["built", "refused", "failed"]
PublishOutcome = Literal["published", "adopted", "failed"]
PUBLISH_OUTCOMES: Final[tuple[PublishOutcome, ...]] = get_args(PublishOutcome)
ROLLOUT_PHASES: Final[tuple[RolloutPhase, ...]] = get_args(RolloutPhase)
"""Every phase the rollout controller gives a class (and so the model's ``rolloutPhase``)."""
CONDITION_STATUSES: Final = ("True", "False", "Unknown")

RECONCILE_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
"""Seconds. A reconcile that adopts everything takes milliseconds; one that builds takes the pipeline's time."""
BUILD_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
"""Seconds; a variant build runs the optimization pipeline (minutes on a real model, up to the Job deadline)."""
PASS_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
PUBLISH_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
"""Seconds; signing and uploading a bundle and the TUF metadata."""


class MetricsListenError(EdgeFleetError):
    """``--metrics-listen`` is not ``HOST:PORT``, or that address cannot be bound."""


def parse_listen(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (``[v6]:PORT`` too; port 0 picks a free one)."""
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise MetricsListenError(f"--metrics-listen {address!r} is not HOST:PORT (port 0 to 65535)")
    return host.strip("[]"), int(port)


class _ModelStates(Collector):
    """Rollout state and conditions of every EdgeModel this operator reconciled, read at scrape time.

    Kept as the last status per model rather than as gauges set in place, so that a model leaving
    (finalized) takes all of its series with it and a state never lingers next to its successor.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], RolloutPhase | None] = {}
        self._conditions: dict[tuple[str, str], dict[str, str]] = {}

    def update(self, namespace: str, name: str, status: EdgeModelStatus) -> None:
        conditions: dict[str, str] = {c.type: c.status for c in status.conditions or []}
        with self._lock:
            self._phases[(namespace, name)] = status.rollout_phase
            self._conditions[(namespace, name)] = conditions

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)
            self._conditions.pop((namespace, name), None)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        with self._lock:
            phases = dict(self._phases)
            conditions = [dict(c) for c in self._conditions.values()]
        state = GaugeMetricFamily(
            "edgefleet_operator_rollout_state",
            "1 for the EdgeModel's current rollout phase (status.rolloutPhase), 0 for the others; "
            "all 0 while nothing is rolled out.",
            labels=["namespace", "edgemodel", "state"],
        )
        for (namespace, name), current in sorted(phases.items()):
            for phase in ROLLOUT_PHASES:
                state.add_metric([namespace, name, phase], 1.0 if phase == current else 0.0)
        yield state
        models = GaugeMetricFamily(
            "edgefleet_operator_edgemodels",
            "EdgeModels this operator reconciled, by condition type and its status.",
            labels=["condition", "status"],
        )
        types = sorted({kind for c in conditions for kind in c})
        for kind in types:
            for value in CONDITION_STATUSES:
                models.add_metric([kind, value], float(sum(1 for c in conditions if c.get(kind) == value)))
        yield models


class OperatorMetrics:
    """Every series the operator exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reconcile_duration = Histogram(
            "edgefleet_operator_reconcile_duration_seconds",
            "Time one EdgeModel reconcile took (builds in the worker pool included), by outcome.",
            ["outcome"],
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.reconciles = Counter(
            "edgefleet_operator_reconciles",
            "EdgeModel reconciles, by outcome (ok, requeued, stalled, error).",
            ["outcome"],
            registry=self.registry,
        )
        self.build_duration = Histogram(
            "edgefleet_operator_build_duration_seconds",
            "Time one variant build (optimization pipeline, partitioning, self-test) took, by EdgeModel, "
            "DeviceClass and outcome.",
            ["namespace", "edgemodel", "device_class", "outcome"],
            buckets=BUILD_BUCKETS,
            registry=self.registry,
        )
        self.pass_duration = Histogram(
            "edgefleet_operator_pass_duration_seconds",
            "Time one optimization pass took in one candidate of a build (cached candidates not counted), "
            "by pass type and status (applied, skipped, failed).",
            ["pass", "status"],
            buckets=PASS_BUCKETS,
            registry=self.registry,
        )
        self.builds_running = Gauge(
            "edgefleet_operator_builds_running",
            "Variant builds started and not finished: in the worker pool, or as Kubernetes Jobs.",
            ["mode"],
            registry=self.registry,
        )
        self.publish_duration = Histogram(
            "edgefleet_operator_publish_duration_seconds",
            "Time signing and publishing one variant took, by outcome (published, adopted: the same "
            "build was there already, failed).",
            ["outcome"],
            buckets=PUBLISH_BUCKETS,
            registry=self.registry,
        )
        self.store_errors = Counter(
            "edgefleet_operator_store_errors",
            "Failed calls to the artifact store, the repository or the build dispatcher, by operation.",
            ["operation"],
            registry=self.registry,
        )
        self._models = _ModelStates()
        self.registry.register(self._models)
        self._jobs_lock = threading.Lock()
        self._jobs: set[tuple[str, str, str]] = set()
        # Every series a dashboard sums over exists from the start (at 0), not only after its first event.
        for outcome in RECONCILE_OUTCOMES:
            self.reconcile_duration.labels(outcome)
            self.reconciles.labels(outcome)
        for mode in BUILD_MODES:
            self.builds_running.labels(mode)
        for published in PUBLISH_OUTCOMES:
            self.publish_duration.labels(published)

    # ------------------------------------------------------------------ recording

    def reconciled(self, outcome: ReconcileOutcome, seconds: float) -> None:
        self.reconciles.labels(outcome).inc()
        self.reconcile_duration.labels(outcome).observe(seconds)

    def model_status(self, namespace: str, name: str, status: EdgeModelStatus) -> None:
        """The status a reconcile wrote: the model's rollout state and conditions from now on."""
        self._models.update(namespace, name, status)

    def model_deleted(self, namespace: str, name: str) -> None:
        """The model was finalized: its series go, and so do its builds running as Jobs."""
        self._models.forget(namespace, name)
        with self._jobs_lock:
            self._jobs = {key for key in self._jobs if key[:2] != (namespace, name)}
            self.builds_running.labels("jobs").set(len(self._jobs))

    def build_finished(
        self, namespace: str, name: str, device_class: str, outcome: BuildOutcome, seconds: float
    ) -> None:
        self.build_duration.labels(namespace, name, device_class, outcome).observe(seconds)

    def build_summary(self, summary: Mapping[str, object]) -> None:
        """Per-pass durations from a build's summary (``BuiltVariant.summary``: ``candidates[].passes``)."""
        for candidate in _dicts(summary.get("candidates")):
            if candidate.get("cacheHit") is True:
                continue  # its passes ran in an earlier build, and were counted then
            for record in _dicts(candidate.get("passes")):
                kind, status, seconds = record.get("type"), record.get("status"), record.get("seconds")
                if isinstance(kind, str) and isinstance(status, str) and isinstance(seconds, int | float):
                    self.pass_duration.labels(kind, status).observe(float(seconds))

    def jobs_running(self, namespace: str, name: str, device_classes: Iterable[str]) -> None:
        """The model's classes whose builds run as Jobs now (as the dispatcher said at this reconcile)."""
        with self._jobs_lock:
            self._jobs = {key for key in self._jobs if key[:2] != (namespace, name)}
            self._jobs.update((namespace, name, device_class) for device_class in device_classes)
            self.builds_running.labels("jobs").set(len(self._jobs))

    def published(self, outcome: PublishOutcome, seconds: float) -> None:
        self.publish_duration.labels(outcome).observe(seconds)

    def store_error(self, operation: str) -> None:
        self.store_errors.labels(operation).inc()

    # ------------------------------------------------------------------ serving

    def serve(self, host: str, port: int) -> tuple[WSGIServer, Thread, int]:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0 picks a port) in a daemon thread; also the bound port."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return server, thread, int(server.server_address[1])


def _dicts(value: object) -> Iterator[Mapping[str, object]]:
    """The mappings in ``value`` when it is a list (a summary read back from a Job's report is plain JSON)."""
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                yield item
