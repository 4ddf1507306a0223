"""The agent's Prometheus metrics, in a registry of its own (never the global one).

One :class:`AgentMetrics` per agent: the runtime, the Updater and the daemon record into it, and
``edgefleet agent run --metrics-listen HOST:PORT`` serves it over HTTP. Labels stay bounded: a
device serves a handful of models; a request for a model the device does not hold is counted
without the name the client sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from threading import Thread
from typing import Final, Literal, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edgefleet_agent.assignments import InstallResult

INFERENCE_BUCKETS: Final = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
"""Seconds; fine at the low milliseconds, where a small optimized model on a device answers."""
UPDATE_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
"""Seconds from an assignment's start to its outcome (download, verify, decode, activate, self-test)."""
InferenceErrorKind = Literal["invalid_request", "failed", "not_ready", "unknown_model"]
INFERENCE_ERROR_KINDS: Final[tuple[InferenceErrorKind, ...]] = get_args(InferenceErrorKind)
GatewayCall = Literal["watch", "health_report", "install_report", "renewal"]
GATEWAY_CALLS: Final[tuple[GatewayCall, ...]] = get_args(GatewayCall)
UNKNOWN_MODEL: Final = ""
"""The ``model`` label of requests for a model this device does not hold (any name a client sends)."""


def parse_listen(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (``[v6]:PORT`` too; port 0 picks one); :class:`ValueError` otherwise."""
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r} is not HOST:PORT (port 0 to 65535)")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class ServedModel:
    """One model's active version, as the runtime serves it now."""

    model: str
    version: str
    slot: str
    """``a`` or ``b``; empty for a version not loaded from a slot."""
    mode: Literal["whole", "split"]
    """``split``: a head and a tail (a partitioned bundle); ``whole``: one model."""


class _Served(Collector):
    """``model_info`` and ``partition_mode`` read from the runtime at scrape time.

    Read rather than set in place: a swap, an unload or a model marked unavailable can never leave
    a stale version's series behind.
    """

    def __init__(self) -> None:
        self._source: Callable[[], Sequence[ServedModel]] = list

    def follow(self, source: Callable[[], Sequence[ServedModel]]) -> None:
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        served = sorted(self._source(), key=lambda m: m.model)
        info = GaugeMetricFamily(
            "edgefleet_agent_model_info",
            "1 for the version each model serves now, with the A/B slot it was loaded from.",
            labels=["model", "version", "slot"],
        )
        mode = GaugeMetricFamily(
            "edgefleet_agent_partition_mode",
            "1 for how each model's active version runs: whole (one model) or split (head and tail).",
            labels=["model", "mode"],
        )
        for model in served:
            info.add_metric([model.model, model.version, model.slot], 1.0)
            for name in ("whole", "split"):
                mode.add_metric([model.model, name], 1.0 if model.mode == name else 0.0)
        yield info
        yield mode


class AgentMetrics:
    """Every series the agent exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.inference_duration = Histogram(
            "edgefleet_agent_inference_duration_seconds",
            "Time the runtime took to serve one successful request (validation and every stage), by model.",
            ["model"],
            buckets=INFERENCE_BUCKETS,
            registry=self.registry,
        )
        self.inference_requests = Counter(
            "edgefleet_agent_inference_requests",
            "Inference requests, failed ones included, by model (empty: a model this device does not hold).",
            ["model"],
            registry=self.registry,
        )
        self.inference_errors = Counter(
            "edgefleet_agent_inference_errors",
            "Inference requests that failed, by model and kind (invalid_request, failed, not_ready, unknown_model).",
            ["model", "kind"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "edgefleet_agent_fallbacks",
            "Model versions loaded with a stage (model, head or tail) on a fallback execution provider instead "
            "of the one its partition plan or the configured providers name, or with a tail the accelerator "
            "server (--accel-server) did not take; and each later loss of that server. By the provider it got.",
            ["model", "stage", "provider"],
            registry=self.registry,
        )
        self.fallback_inferences = Counter(
            "edgefleet_agent_fallback_inferences",
            "Inference requests served by a version running a stage on a fallback provider (the health "
            "report's accelerator fallback count).",
            ["model"],
            registry=self.registry,
        )
        self.updates = Counter(
            "edgefleet_agent_updates",
            "Assignments applied, by outcome (succeeded, failed, rolled_back, refused_verification), reason "
            "(Installed, SelfTestOutputs, DownloadFailed, ...) and the stage a failure happened in.",
            ["outcome", "reason", "stage"],
            registry=self.registry,
        )
        self.update_duration = Histogram(
            "edgefleet_agent_update_duration_seconds",
            "Time applying one assignment took, by outcome.",
            ["outcome"],
            buckets=UPDATE_BUCKETS,
            registry=self.registry,
        )
        self.download_bytes = Counter(
            "edgefleet_agent_download_bytes",
            "Bundle bytes downloaded from the gateway, by encoding (delta or full).",
            ["encoding"],
            registry=self.registry,
        )
        self.gateway_failures = Counter(
            "edgefleet_agent_gateway_failures",
            "Failed calls to the gateway, by call (watch, health_report, install_report, renewal).",
            ["call"],
            registry=self.registry,
        )
        self._served = _Served()
        self.registry.register(self._served)
        for call in GATEWAY_CALLS:
            self.gateway_failures.labels(call)
        for encoding in ("delta", "full"):
            self.download_bytes.labels(encoding)

    # ------------------------------------------------------------------ recording

    def follow_models(self, source: Callable[[], Sequence[ServedModel]]) -> None:
        """Where ``model_info`` and ``partition_mode`` come from (the runtime's active versions)."""
        self._served.follow(source)

    def inference(self, model: str, seconds: float, *, fallback: bool) -> None:
        """One request served by ``model`` in ``seconds``."""
        self.inference_requests.labels(model).inc()
        self.inference_duration.labels(model).observe(seconds)
        if fallback:
            self.fallback_inferences.labels(model).inc()

    def inference_error(self, model: str, kind: InferenceErrorKind) -> None:
        """One request that failed (``model``: :data:`UNKNOWN_MODEL` when the device does not hold it)."""
        self.inference_requests.labels(model).inc()
        self.inference_errors.labels(model, kind).inc()

    def fallback(self, model: str, stage: str, provider: str) -> None:
        self.fallbacks.labels(model, stage, provider).inc()

    def update(self, result: InstallResult) -> None:
        """One assignment's outcome, as it is reported to the gateway."""
        stage = result.failed_phase or ""
        self.updates.labels(result.outcome, result.reason, stage).inc()
        self.update_duration.labels(result.outcome).observe(result.durations.get("total", 0.0))

    def downloaded(self, transferred_bytes: int, *, delta: bool) -> None:
        self.download_bytes.labels("delta" if delta else "full").inc(transferred_bytes)

    def gateway_failure(self, call: GatewayCall) -> None:
        self.gateway_failures.labels(call).inc()

    # ------------------------------------------------------------------ serving

    def serve(self, host: str, port: int) -> tuple[WSGIServer, Thread, int]:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0 picks a port) in a daemon thread; also the bound port."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return server, thread, int(server.server_address[1])
