"""Builds, starts and stops one gateway process: a grpc.aio server with two TLS listeners.

* the **fleet port**: mutual TLS; a client certificate is required and verified against the fleet
  CA during the handshake, so a certificate from any other CA never gets a call through (the client
  sees UNAVAILABLE: the connection fails before gRPC has a status to send);
* the **enrollment port**: server-authenticated TLS only, for Enroll (and health checks); every other
  method is refused there with UNAUTHENTICATED by the interceptor, as no certificate is presented.

Both listeners serve every service, so one server, one interceptor and one set of metrics cover
both. Also served: ``grpc.health.v1`` and, when asked, Prometheus metrics over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from threading import Thread
from typing import Final
from wsgiref.simple_server import WSGIServer

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from edgefleet_core.errors import EdgeFleetError, StoreError
from edgefleet_core.store.base import ArtifactStore
from edgefleet_operator.fleet.errors import FleetError
from edgefleet_operator.fleet.state import FleetState
from edgefleet_operator.gateway.collector import run_collector_policy
from edgefleet_operator.gateway.hub import AssignmentHub
from edgefleet_operator.gateway.interceptor import GatewayInterceptor
from edgefleet_operator.gateway.journal import HealthJournal
from edgefleet_operator.gateway.metrics import GatewayMetrics
from edgefleet_operator.gateway.pki import FleetCA, load_pki
from edgefleet_operator.gateway.service import GatewayService, ServicePolicy, utc_now
from edgefleet_operator.gateway.servicer import FleetGatewayServicer
from edgefleet_proto.v1 import fleet_pb2, fleet_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME: Final = fleet_pb2.DESCRIPTOR.services_by_name["FleetGateway"].full_name
_REPLICA_ID: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
HEARTBEAT_S: Final = 1.0
"""How often the event loop proves it still runs tasks (for ``/healthz``)."""
LOOP_STALL_S: Final = 15.0
"""A loop that has not run the heartbeat for this long is stuck: ``/healthz`` fails and the kubelet restarts it.
Well above a full garbage collection of a gateway with thousands of connections (under a second)."""


class GatewayConfigError(EdgeFleetError):
    """The gateway's configuration cannot be used (a bad address, a non-positive interval)."""


@dataclass(frozen=True)
class GatewayConfig:
    """How one gateway process runs. Built once (from the CLI's options) and passed in."""

    listen: str = "0.0.0.0:7443"
    """``HOST:PORT`` of the fleet port (mTLS; port 0 picks a free one)."""
    enroll_listen: str = "0.0.0.0:7444"
    """``HOST:PORT`` of the enrollment port (server TLS only)."""
    metrics_listen: str | None = None
    """``HOST:PORT`` for Prometheus metrics over HTTP; ``None`` serves none."""
    poll_interval: float = 0.2
    """Seconds between two looks at the assignment head: the bound on push latency."""
    status_interval: float = 10.0
    """Seconds between two health-record writes of one device (the store write rate bound)."""
    heartbeat_interval: float = 30.0
    """Seconds between health reports that enrolled agents are asked for (at least 1)."""
    certificate_validity: timedelta = timedelta(days=30)
    """Lifetime of the device certificates Enroll issues."""
    identity_cache_ttl: float = 30.0
    """Seconds a device record read for authentication is trusted: a revocation (or a certificate
    superseded through another replica) bites within this time, open watch streams included."""
    replica_id: str | None = None
    """Names this replica's health shards; ``None``: a random one per process (see ServicePolicy)."""
    gc_freeze_interval: float | None = 10.0
    """Seconds between moving long-lived objects out of the collector's way (gateway/collector.py);
    ``None`` leaves garbage collection as CPython does it."""
    gc_full_interval: float = 600.0
    """Seconds between full collections that reclaim what freezing kept (bounds memory)."""
    grace_period: float = 5.0
    """Seconds in-flight calls get to finish on shutdown before they are cancelled."""
    loop_stall_seconds: float = LOOP_STALL_S
    """``/healthz`` on the metrics port fails once the event loop has not run its heartbeat for this long."""
    tuf_prefix: str = "tuf/"
    """Store prefix of the TUF repository (what ``edgefleet publish --store`` writes)."""
    fleet_prefix: str = "fleet/"
    """Store prefix of the shared fleet state."""
    health_journal: Path | None = None
    """Folder of the health journal (acknowledged reports kept on disk until they are in the store,
    see gateway/journal.py); needs ``replica_id``. ``None``: a killed gateway loses the reports it
    acknowledged since its last health write."""

    def __post_init__(self) -> None:
        for name in ("poll_interval", "status_interval", "identity_cache_ttl"):
            if not getattr(self, name) > 0:
                raise GatewayConfigError(f"{name} must be positive, not {getattr(self, name)}")
        if self.heartbeat_interval < 1:
            raise GatewayConfigError(f"heartbeat_interval must be at least 1 s, not {self.heartbeat_interval}")
        if self.replica_id is not None and not _REPLICA_ID.fullmatch(self.replica_id):
            raise GatewayConfigError(f"replica_id {self.replica_id!r} is not 1-63 of [a-z0-9-], starting alphanumeric")
        if self.gc_freeze_interval is not None and not 0 < self.gc_freeze_interval <= self.gc_full_interval:
            raise GatewayConfigError(
                f"need 0 < gc_freeze_interval ({self.gc_freeze_interval}) <= gc_full_interval ({self.gc_full_interval})"
            )
        if self.grace_period < 0:
            raise GatewayConfigError(f"grace_period must not be negative, not {self.grace_period}")
        if self.health_journal is not None and self.replica_id is None:
            raise GatewayConfigError(
                "a health journal needs a replica id (a restart must find its own journal): set --replica-id"
            )
        for name in ("listen", "enroll_listen", "metrics_listen"):
            value = getattr(self, name)
            if value is not None:
                split_address(value, name)

    def policy(self) -> ServicePolicy:
        """The service's settings."""
        return ServicePolicy(
            certificate_validity=self.certificate_validity,
            heartbeat_interval=timedelta(seconds=self.heartbeat_interval),
            status_interval=timedelta(seconds=self.status_interval),
            identity_cache_ttl=timedelta(seconds=self.identity_cache_ttl),
            replica_id=self.replica_id,
            tuf_prefix=self.tuf_prefix,
        )


def split_address(address: str, what: str = "address") -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (``[v6]:PORT`` too); :class:`GatewayConfigError` otherwise."""
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise GatewayConfigError(f"{what} {address!r} is not HOST:PORT (port 0 to 65535)")
    return host, int(port)


class GatewayServer:
    """One gateway: service, hub, servicer, interceptor, metrics and the grpc.aio server around them."""

    def __init__(
        self, config: GatewayConfig, store: ArtifactStore, pki: Path, *, clock: Callable[[], datetime] = utc_now
    ) -> None:
        self.config = config
        self._files = load_pki(pki)
        self.fleet = FleetState(store, config.fleet_prefix, clock=clock)
        journal = None
        if config.health_journal is not None and config.replica_id is not None:
            journal = HealthJournal(config.health_journal, config.replica_id)
        self.service = GatewayService(
            self.fleet, store, FleetCA.load(pki), config.policy(), clock=clock, journal=journal
        )
        self.hub = AssignmentHub(self.fleet, poll_interval=config.poll_interval)
        self.metrics = GatewayMetrics(connected_devices=self.hub.connected_devices)
        self._health = health.aio.HealthServicer()
        self._server: aio.Server | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._metrics_http: tuple[WSGIServer, Thread] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._last_beat = time.monotonic()
        self._stopping = False
        self.fleet_address = ""
        """``HOST:PORT`` the fleet port is bound to (the real port), once started."""
        self.enroll_address = ""
        """``HOST:PORT`` the enrollment port is bound to, once started."""
        self.metrics_address: str | None = None
        """``HOST:PORT`` of the metrics endpoint, once started, if any."""

    async def start(self) -> None:
        """Bind both ports, start serving, polling and flushing; raises if a port cannot be bound."""
        # Before any report is taken: what a killed process acknowledged goes back into the counts.
        await asyncio.to_thread(self.service.recover_journal)
        server = aio.server(
            interceptors=[GatewayInterceptor(self.metrics)],
            options=[
                ("grpc.so_reuseport", 0),  # a second gateway on a taken port must fail, not share it
                ("grpc.keepalive_time_ms", 60_000),  # find dead watch streams (devices that lost power)
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        fleet_pb2_grpc.add_FleetGatewayServicer_to_server(
            FleetGatewayServicer(self.service, self.hub, self.metrics), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        key_pair = [(self._files.server_key_pem, self._files.server_cert_pem)]
        fleet_host, _ = split_address(self.config.listen, "listen")
        enroll_host, _ = split_address(self.config.enroll_listen, "enroll_listen")
        try:
            fleet_port = server.add_secure_port(
                self.config.listen,
                grpc.ssl_server_credentials(key_pair, root_certificates=self._files.ca_pem, require_client_auth=True),
            )
            enroll_port = server.add_secure_port(
                self.config.enroll_listen, grpc.ssl_server_credentials(key_pair, require_client_auth=False)
            )
        except RuntimeError as e:  # grpc's way of saying a port cannot be bound
            raise GatewayConfigError(f"cannot listen on {self.config.listen} / {self.config.enroll_listen}: {e}") from e
        self.fleet_address = f"{fleet_host}:{fleet_port}"
        self.enroll_address = f"{enroll_host}:{enroll_port}"
        await server.start()
        self._server = server
        await self.hub.start()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._flusher = asyncio.create_task(self._flush_forever(), name="health-flusher")
        self._heartbeat = asyncio.create_task(self._beat_forever(), name="loop-heartbeat")
        if self.config.gc_freeze_interval is not None:
            self._collector = asyncio.create_task(
                run_collector_policy(self.config.gc_freeze_interval, self.config.gc_full_interval), name="gc-policy"
            )
        if self.config.metrics_listen is not None:
            host, port = split_address(self.config.metrics_listen, "metrics_listen")
            try:
                http, thread, bound = self.metrics.serve(host, port, health=self.liveness_problem)
            except OSError as e:
                await self.stop(0)
                raise GatewayConfigError(f"cannot serve metrics on {self.config.metrics_listen}: {e}") from e
            self._metrics_http = (http, thread)
            self.metrics_address = f"{host}:{bound}"
        logger.info("gateway listening fleet=%s enroll=%s", self.fleet_address, self.enroll_address)

    async def _beat_forever(self) -> None:
        while True:
            self._last_beat = time.monotonic()
            await asyncio.sleep(HEARTBEAT_S)

    def liveness_problem(self) -> str | None:
        """Why the gateway should be restarted, or ``None``: its event loop has stopped running tasks.

        Called from the metrics thread: a gRPC port that still accepts connections (the kubelet's
        TCP probe) says nothing about a loop blocked by a stuck call.
        """
        if self._stopping:
            return None  # shutting down on purpose: let the grace period run out, not the kubelet
        stalled = time.monotonic() - self._last_beat
        if stalled > self.config.loop_stall_seconds:
            return f"the event loop has not run for {stalled:.0f} s"
        return None

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval)
            try:
                await asyncio.to_thread(self.service.flush_health)
            except (FleetError, StoreError) as e:
                logger.warning("cannot write health records (kept for the next try): %s", e)
            except OSError as e:  # the health journal's disk; the flusher must keep going all the same
                logger.error("health journal: %s (the records are kept for the next try)", e)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new calls, let calls finish for ``grace`` s, flush health."""
        grace = self.config.grace_period if grace is None else grace
        self._stopping = True
        await self._health.enter_graceful_shutdown()
        stopping = None
        if self._server is not None:
            # stop() refuses new calls at once; watch streams never end by themselves, so the hub
            # ends them meanwhile, and the agents reconnect to another replica.
            stopping = asyncio.create_task(self._server.stop(grace))
        await self.hub.stop()
        if stopping is not None:
            await stopping
            self._server = None
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
            self._collector = None
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        try:
            written = await asyncio.to_thread(self.service.flush_health)
            logger.info("gateway stopped; wrote %d health shard(s) (replica %s)", written, self.service.replica_id)
        except (FleetError, StoreError, OSError) as e:
            logger.warning("cannot write health records on shutdown (the journal keeps them, if any): %s", e)
        try:
            self.service.close_journal()
        except OSError as e:
            logger.error("health journal: cannot close it cleanly: %s", e)
        if self._metrics_http is not None:
            http, thread = self._metrics_http
            http.shutdown()
            http.server_close()
            thread.join(timeout=5)
            self._metrics_http = None

    async def wait_for_termination(self) -> None:
        """Until the server stops."""
        if self._server is not None:
            await self._server.wait_for_termination()
