"""The gateway's Prometheus metrics, in a registry of its own per server (never the global one).

Two gateways in one process (tests, the benchmark) thus never share or clash over series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from threading import Thread
from typing import TYPE_CHECKING, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

HEALTH_PATH: Final = "/healthz"

RPC_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0)
"""Seconds; fine at the low end, where health reports live (p99 target 50 ms)."""


class GatewayMetrics:
    """Every series the gateway exports."""

    def __init__(self, connected_devices: Callable[[], float] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.connected_devices = Gauge(
            "edgefleet_gateway_connected_devices",
            "Devices with an assignment watch open on this gateway.",
            registry=self.registry,
        )
        if connected_devices is not None:
            self.connected_devices.set_function(connected_devices)
        self.rpc_latency = Histogram(
            "edgefleet_gateway_rpc_duration_seconds",
            "Time from the start of a call to its end (streams: to the last message), by method and status code.",
            ["method", "code"],
            buckets=RPC_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.bytes_served = Counter(
            "edgefleet_gateway_served_bytes",
            "Bytes of TUF metadata and targets sent to devices, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.health_reports = Counter(
            "edgefleet_gateway_health_reports",
            "Health reports accepted.",
            registry=self.registry,
        )
        self.install_reports = Counter(
            "edgefleet_gateway_install_reports",
            "Install reports accepted, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.assignments_pushed = Counter(
            "edgefleet_gateway_assignments_pushed",
            "Assignments (removals included) sent on watch streams.",
            registry=self.registry,
        )
        self.enrollments = Counter(
            "edgefleet_gateway_enrollments",
            "Devices enrolled.",
            registry=self.registry,
        )
        self.renewals = Counter(
            "edgefleet_gateway_renewals",
            "Device certificates renewed.",
            registry=self.registry,
        )

    def serve(
        self, host: str, port: int, health: Callable[[], str | None] | None = None
    ) -> tuple[WSGIServer, Thread, int]:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0 picks a port) in a daemon thread; also the bound port.

        With ``health``, ``/healthz`` answers 200 when it returns ``None`` and 503 with its message
        otherwise: the liveness probe. The HTTP thread answers even when the gateway's event loop is
        stuck, so ``health`` must look at the loop itself (see ``GatewayServer``).
        """
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
            if health is None or environ.get("PATH_INFO") != HEALTH_PATH:
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            problem = health()
            start_response("200 OK" if problem is None else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [(problem or "ok").encode() + b"\n"]

        server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        thread = Thread(target=server.serve_forever, name="gateway-metrics", daemon=True)
        thread.start()
        return server, thread, int(server.server_address[1])


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape or probe."""

    def log_message(self, format: str, *args: object) -> None:
        pass
