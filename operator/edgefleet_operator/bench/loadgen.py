"""A load-generator process: many simulated agents, each with its own key, certificate and mTLS channel.

The benchmark starts one or two of these with :mod:`multiprocessing` (spawn) and drives them over
a pipe, one command at a time, so the gateway's figures are not limited by one Python process's
event loop. A simulated agent is what a real one looks like on the wire (its own TLS session, a
WatchAssignments stream held open, ReportHealth calls, FetchTarget streams), without installing
anything. Everything here is ours on purpose: no load-testing tool speaks our mTLS identity scheme.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet_core.store.local import LocalStore
from edgefleet_operator.bench import churn
from edgefleet_operator.fleet import DeviceRecord, FleetState
from edgefleet_operator.gateway.pki import FleetCA
from edgefleet_proto.v1 import fleet_pb2, fleet_pb2_grpc

logger = logging.getLogger(__name__)

RPC_TIMEOUT_S = 10.0
"""Deadline of one unary call or one whole artifact stream: a stuck gateway fails the run, never hangs it."""
MAX_IN_FLIGHT = 2048
"""Health calls outstanding at once before the generator stops offering more (it counts them as skipped)."""
CHANNEL_OPTIONS = [
    # One subchannel (one TCP + TLS session) per simulated agent, as on a real fleet; by default gRPC
    # would share subchannels between channels with the same target and arguments.
    ("grpc.use_local_subchannel_pool", 1),
]


# ---------------------------------------------------------------- process set-up


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class GeneratorSpec:
    """What one load-generator process simulates and where the gateway is."""

    index: int
    names: tuple[str, ...]
    """Device names of this process's agents (the device ids are ``<namespace>.<name>``)."""
    namespace: str
    device_class: str
    pki_dir: Path
    store_root: Path
    fleet_target: str
    """``host:port`` of the gateway's mTLS listener."""
    enroll_target: str
    """``host:port`` of the gateway's enrollment listener (server-authenticated TLS only)."""
    cpus: frozenset[int] | None
    """CPUs this process is pinned to (the cores the gateway is not on), or ``None`` for no pinning."""


@dataclass(frozen=True)
class AgentIdentity:
    """A simulated agent's credentials: what Enroll would have given it."""

    name: str
    key_pem: bytes
    certificate_pem: bytes


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (children inherit it); the new limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def new_csr(name: str) -> tuple[bytes, bytes]:
    """A fresh EC P-256 key and a CSR for it, both PEM, as an agent makes them before Enroll."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def issue_identities(spec: GeneratorSpec) -> list[AgentIdentity]:
    """Certificates straight from the fleet CA plus device records in the store, as Enroll would leave them.

    Enrollment is not what the connection benchmarks measure (its rate is measured on its own), so
    the identities of the simulated fleet are made here, in parallel with the other generator.
    """
    ca = FleetCA.load(spec.pki_dir)
    state = FleetState(LocalStore(spec.store_root))
    identities = []
    for name in spec.names:
        key_pem, csr_pem = new_csr(name)
        issued = ca.sign_device_csr(csr_pem, namespace=spec.namespace, device_class=spec.device_class, name=name)
        state.put_device(
            DeviceRecord(
                device_id=f"{spec.namespace}.{name}",
                namespace=spec.namespace,
                name=name,
                device_class=spec.device_class,
                labels={"edgefleet.io/bench": "gateway"},
                hardware={},
                agent_version="0.0.0+bench",
                cert_serial=issued.serial,
                cert_not_after=issued.not_after,
                enrolled_at=datetime.now(UTC),
            )
        )
        identities.append(AgentIdentity(name, key_pem, issued.certificate_pem))
    return identities


# ---------------------------------------------------------------- commands and their results


@dataclass(frozen=True)
class Connect:
    """Open every agent's channel and WatchAssignments stream; wait for each one's initial assignment."""

    initial_revision: int
    timeout_s: float
    concurrency: int = 200
    """Handshakes in progress at once: a real fleet does not reconnect in one instant either."""


@dataclass(frozen=True)
class Connected:
    agents: int
    connected: int
    """Agents whose watch delivered the initial assignment."""
    failed: dict[str, int]
    """Why the others did not connect: status code name (or ``timeout``) → count."""
    seconds: float


@dataclass(frozen=True)
class Health:
    """ReportHealth at ``rate`` calls/s (open loop, spread over the agents) for ``duration_s``."""

    rate: float
    duration_s: float


@dataclass(frozen=True)
class Calibrate:
    """As :class:`Health`, over ``channels`` fresh channels to another server (the no-op baseline)."""

    target: str
    channels: int
    rate: float
    duration_s: float


@dataclass(frozen=True)
class HealthDone:
    offered: int
    succeeded: int
    failed: dict[str, int]
    skipped: int
    """Calls not offered because :data:`MAX_IN_FLIGHT` were outstanding (the gateway fell behind)."""
    latencies_ms: list[float]
    """Client-side latency of every successful call."""
    seconds: float
    """From the first call offered to the last one finished."""
    cpu_seconds: float
    """CPU time this generator process used meanwhile (all its threads)."""


@dataclass(frozen=True)
class Stream:
    """FetchTarget of one target, whole, ``rounds`` times on each of ``streams`` agents at once."""

    target_path: str
    length: int
    sha256: str
    streams: int
    rounds: int


@dataclass(frozen=True)
class StreamDone:
    bytes_received: int
    files_verified: int
    files_failed: dict[str, int]
    seconds: float


@dataclass(frozen=True)
class AwaitPush:
    """Wait until ``expected`` agents of this process received ``revision``; their arrival times."""

    revision: int
    expected: int
    timeout_s: float


@dataclass(frozen=True)
class PushArrivals:
    revision: int
    arrivals: list[float]
    """``time.monotonic()`` at each arrival (CLOCK_MONOTONIC is one clock for every process on Linux)."""


@dataclass(frozen=True)
class Enroll:
    """Enroll one new device per token, ``concurrency`` at a time, each over its own TLS channel."""

    tokens: tuple[tuple[str, str], ...]
    """(device name, bootstrap token)."""
    concurrency: int


@dataclass(frozen=True)
class Enrolled:
    succeeded: int
    failed: dict[str, int]
    latencies_ms: list[float]
    seconds: float


@dataclass(frozen=True)
class Census:
    """How many watches are still open, and this process's resource use."""


@dataclass(frozen=True)
class CensusDone:
    watches_open: int
    watch_endings: dict[str, int]
    open_fds: int
    fd_limit: int
    rss_bytes: int


@dataclass(frozen=True)
class Stop:
    """Close every channel and exit."""


@dataclass(frozen=True)
class Ready:
    """Sent once the identities are issued: the generator waits for commands."""

    agents: int
    seconds: float
    fd_limit: int


@dataclass(frozen=True)
class Failed:
    """A command failed in the generator; ``message`` says why."""

    message: str


Command = Connect | Health | Calibrate | Stream | AwaitPush | Enroll | Census | churn.SoakConnect | churn.Soak | Stop
Reply = Ready | Connected | HealthDone | StreamDone | PushArrivals | Enrolled | CensusDone | churn.SoakDone | Failed


def serve(spec: GeneratorSpec, conn: Connection) -> None:
    """Process entry point: pin, raise the fd limit, issue identities, then obey commands until Stop."""
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    _, limit = raise_fd_limit()
    started = time.perf_counter()
    try:
        identities = issue_identities(spec)
    except Exception as exc:  # noqa: BLE001 — any failure must reach the parent, not die silently here
        conn.send(Failed(f"issuing identities failed: {type(exc).__name__}: {exc}"))
        return
    conn.send(Ready(len(identities), time.perf_counter() - started, limit))
    asyncio.run(_Generator(spec, identities).serve(conn))


# ---------------------------------------------------------------- the simulated agents


@dataclass
class _Agent:
    identity: AgentIdentity
    credentials: grpc.ChannelCredentials
    channel: grpc.aio.Channel | None = None
    stub: fleet_pb2_grpc.FleetGatewayAsyncStub | None = None
    watch: asyncio.Task[None] | None = None
    initial: asyncio.Event = field(default_factory=asyncio.Event)
    ended: str | None = None
    """Why its watch stream ended (status code name), ``None`` while it is open."""


class _Generator:
    def __init__(self, spec: GeneratorSpec, identities: Sequence[AgentIdentity]) -> None:
        self._spec = spec
        self._ca_pem = (spec.pki_dir / "ca.pem").read_bytes()
        self._agents = [
            _Agent(
                identity,
                grpc.ssl_channel_credentials(
                    root_certificates=self._ca_pem,
                    private_key=identity.key_pem,
                    certificate_chain=identity.certificate_pem,
                ),
            )
            for identity in identities
        ]
        self._arrivals: dict[int, list[float]] = {}
        self._arrived: dict[int, asyncio.Event] = {}
        self._expected: dict[int, int] = {}
        self._churning: churn.ChurningFleet | None = None
        """The soak's agents (their own channels), once :class:`churn.SoakConnect` made them."""

    async def serve(self, conn: Connection) -> None:
        while True:
            command: Command = await asyncio.to_thread(conn.recv)
            if isinstance(command, Stop):
                await self._close()
                conn.send(CensusDone(0, {}, 0, 0, 0))
                return
            try:
                reply = await self._run(command)
            except Exception as exc:  # reported to the parent, which fails the run
                logger.exception("load generator %d: %s failed", self._spec.index, type(command).__name__)
                reply = Failed(f"{type(command).__name__} failed: {type(exc).__name__}: {exc}")
            conn.send(reply)

    async def _run(self, command: Command) -> Reply:
        reply: Reply
        match command:
            case Connect():
                reply = await self._connect(command)
            case Health():
                reply = await self._health(command)
            case Calibrate():
                reply = await self._calibrate(command)
            case Stream():
                reply = await self._stream(command)
            case AwaitPush():
                reply = await self._await_push(command)
            case Enroll():
                reply = await self._enroll(command)
            case Census():
                reply = self._census()
            case churn.SoakConnect():
                reply = await self._soak_connect(command)
            case churn.Soak():
                if self._churning is None:
                    raise RuntimeError("Soak before SoakConnect")
                reply = await self._churning.soak(command, _cpu_seconds)
            case _:
                reply = Failed(f"unknown command {command!r}")
        return reply

    # -- (a) connections

    async def _connect(self, command: Connect) -> Connected:
        started = time.perf_counter()
        gate = asyncio.Semaphore(command.concurrency)
        failed: dict[str, int] = {}
        deadline = time.monotonic() + command.timeout_s

        async def connect(agent: _Agent) -> bool:
            async with gate:
                agent.channel = grpc.aio.secure_channel(self._spec.fleet_target, agent.credentials, CHANNEL_OPTIONS)
                agent.stub = fleet_pb2_grpc.FleetGatewayStub(agent.channel)
                agent.watch = asyncio.create_task(self._watch(agent))
                left = max(0.1, deadline - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(agent.initial.wait(), left)
                if agent.initial.is_set():
                    return True
                reason = agent.ended or "timeout"
                failed[reason] = failed.get(reason, 0) + 1
                return False

        connected = sum(await asyncio.gather(*(connect(a) for a in self._agents)))
        return Connected(len(self._agents), connected, failed, time.perf_counter() - started)

    async def _watch(self, agent: _Agent) -> None:
        assert agent.stub is not None
        call = agent.stub.WatchAssignments(fleet_pb2.WatchAssignmentsRequest(last_revision=0))
        try:
            async for assignment in call:
                self._arrival(assignment.revision)
                agent.initial.set()
            agent.ended = "closed by the gateway"
        except grpc.aio.AioRpcError as exc:
            agent.ended = exc.code().name
        except asyncio.CancelledError:
            agent.ended = "cancelled"
            raise

    def _arrival(self, revision: int) -> None:
        now = time.monotonic()
        arrivals = self._arrivals.setdefault(revision, [])
        arrivals.append(now)
        expected = self._expected.get(revision)
        if expected is not None and len(arrivals) >= expected:
            self._arrived[revision].set()

    # -- (b) health intake

    def _report(self, sequence: int, interval_s: float) -> fleet_pb2.HealthReport:
        """A report as an agent serving one model sends it at the end of its window."""
        now = datetime.now(UTC)
        start, window = Timestamp(), Duration()
        start.FromDatetime(now - timedelta(seconds=interval_s))
        window.FromTimedelta(timedelta(seconds=interval_s))
        return fleet_pb2.HealthReport(
            window_start=start,
            window=window,
            cpu_percent=23.5,
            memory_used_bytes=612 << 20,
            memory_total_bytes=2 << 30,
            disk_used_bytes=3 << 30,
            disk_total_bytes=16 << 30,
            models=[
                fleet_pb2.ModelHealth(
                    model_namespace=self._spec.namespace,
                    model_name="payload",
                    version="1",
                    slot=fleet_pb2.SLOT_A,
                    inference_count=120 + sequence % 7,
                    error_count=sequence % 3 // 2,
                    latency_p50_ms=4.1,
                    latency_p95_ms=7.9,
                    latency_p99_ms=11.2,
                )
            ],
        )

    async def _health(self, command: Health) -> HealthDone:
        stubs = [a.stub for a in self._agents if a.stub is not None and a.ended is None]
        if not stubs:
            return HealthDone(0, 0, {"no connected agents": 1}, 0, [], 0.0, 0.0)
        return await self._open_loop(stubs, command.rate, command.duration_s)

    async def _calibrate(self, command: Calibrate) -> HealthDone:
        channels = [
            grpc.aio.secure_channel(command.target, agent.credentials, CHANNEL_OPTIONS)
            for agent in self._agents[: command.channels]
        ]
        try:
            stubs = [fleet_pb2_grpc.FleetGatewayStub(channel) for channel in channels]
            await asyncio.gather(*(channel.channel_ready() for channel in channels))
            return await self._open_loop(stubs, command.rate, command.duration_s)
        finally:
            await asyncio.gather(*(channel.close() for channel in channels))

    async def _open_loop(
        self, stubs: Sequence[fleet_pb2_grpc.FleetGatewayAsyncStub], rate: float, duration_s: float
    ) -> HealthDone:
        """ReportHealth at ``rate`` calls/s round-robin over ``stubs`` for ``duration_s``."""
        # Each agent reports every `interval` seconds, as a fleet of this size would at this rate.
        interval = len(stubs) / rate
        latencies: list[float] = []
        failed: dict[str, int] = {}
        in_flight: set[asyncio.Task[None]] = set()
        last_done = 0.0

        async def report(stub: fleet_pb2_grpc.FleetGatewayAsyncStub, sequence: int) -> None:
            nonlocal last_done
            message = self._report(sequence, interval)
            began = time.perf_counter()
            try:
                await stub.ReportHealth(message, timeout=RPC_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                failed[exc.code().name] = failed.get(exc.code().name, 0) + 1
                return
            last_done = time.perf_counter()
            latencies.append((last_done - began) * 1000)

        offered = skipped = 0
        cpu_before = _cpu_seconds()
        started = time.perf_counter()
        # Open loop: calls are offered on a schedule, whether or not earlier ones have returned, so
        # a slow gateway shows up as latency and skipped calls, not as a politely lower offer.
        while (elapsed := time.perf_counter() - started) < duration_s:
            due = int(elapsed * rate) - offered - skipped
            for _ in range(due):
                if len(in_flight) >= MAX_IN_FLIGHT:
                    skipped += 1
                    continue
                task = asyncio.create_task(report(stubs[offered % len(stubs)], offered))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                offered += 1
            await asyncio.sleep(0.002)
        if in_flight:
            await asyncio.wait(set(in_flight), timeout=RPC_TIMEOUT_S + 1)
        seconds = (last_done or time.perf_counter()) - started
        return HealthDone(offered, len(latencies), failed, skipped, latencies, seconds, _cpu_seconds() - cpu_before)

    # -- (c) artifact streaming

    async def _stream(self, command: Stream) -> StreamDone:
        agents = [a for a in self._agents if a.stub is not None and a.ended is None][: command.streams]
        failed: dict[str, int] = {}
        verified = 0
        received = 0

        async def fetch(agent: _Agent) -> None:
            nonlocal verified, received
            assert agent.stub is not None
            for _ in range(command.rounds):
                digest = hashlib.sha256()
                size = 0
                request = fleet_pb2.FetchTargetRequest(target_path=command.target_path, max_length=command.length)
                try:
                    async for chunk in agent.stub.FetchTarget(request, timeout=RPC_TIMEOUT_S * 6):
                        digest.update(chunk.data)
                        size += len(chunk.data)
                except grpc.aio.AioRpcError as exc:
                    failed[exc.code().name] = failed.get(exc.code().name, 0) + 1
                    continue
                received += size
                if size == command.length and digest.hexdigest() == command.sha256:
                    verified += 1
                else:
                    failed["digest mismatch"] = failed.get("digest mismatch", 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(fetch(a) for a in agents))
        return StreamDone(received, verified, failed, time.perf_counter() - started)

    # -- (d) push latency

    async def _await_push(self, command: AwaitPush) -> PushArrivals:
        event = self._arrived.setdefault(command.revision, asyncio.Event())
        self._expected[command.revision] = command.expected
        if len(self._arrivals.get(command.revision, [])) >= command.expected:
            event.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), command.timeout_s)
        return PushArrivals(command.revision, list(self._arrivals.get(command.revision, [])))

    # -- enrollment

    async def _enroll(self, command: Enroll) -> Enrolled:
        credentials = grpc.ssl_channel_credentials(root_certificates=self._ca_pem)
        requests = []
        for name, token in command.tokens:
            _, csr_pem = new_csr(name)
            requests.append(
                fleet_pb2.EnrollRequest(
                    bootstrap_token=token,
                    csr_pem=csr_pem.decode(),
                    device_name=name,
                    hardware=fleet_pb2.HardwareFacts(cpu_arch="x86_64", cpu_cores=2, memory_bytes=2 << 30),
                    agent_version="0.0.0+bench",
                )
            )
        gate = asyncio.Semaphore(command.concurrency)
        latencies: list[float] = []
        failed: dict[str, int] = {}

        async def enroll(request: fleet_pb2.EnrollRequest) -> None:
            async with gate:
                began = time.perf_counter()
                # A fresh channel per device: the TLS handshake is part of what enrolling costs.
                async with grpc.aio.secure_channel(self._spec.enroll_target, credentials, CHANNEL_OPTIONS) as channel:
                    try:
                        await fleet_pb2_grpc.FleetGatewayStub(channel).Enroll(request, timeout=RPC_TIMEOUT_S)
                    except grpc.aio.AioRpcError as exc:
                        failed[exc.code().name] = failed.get(exc.code().name, 0) + 1
                        return
                latencies.append((time.perf_counter() - began) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(enroll(r) for r in requests))
        return Enrolled(len(latencies), failed, latencies, time.perf_counter() - started)

    # -- soak (churn)

    async def _soak_connect(self, command: churn.SoakConnect) -> Connected:
        self._churning = churn.ChurningFleet(
            self._spec.fleet_target,
            [(a.identity.name, a.credentials) for a in self._agents],
            self._report,
            CHANNEL_OPTIONS,
            RPC_TIMEOUT_S,
        )
        connected, failed, seconds = await self._churning.connect_all(
            replace(command, seed=command.seed + self._spec.index)
        )
        return Connected(len(self._agents), connected, failed, seconds)

    # -- bookkeeping

    def _census(self) -> CensusDone:
        endings: dict[str, int] = {}
        for agent in self._agents:
            if agent.ended is not None:
                endings[agent.ended] = endings.get(agent.ended, 0) + 1
        open_watches = sum(1 for a in self._agents if a.watch is not None and a.ended is None)
        with open("/proc/self/statm", encoding="ascii") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return CensusDone(
            open_watches,
            endings,
            len(os.listdir("/proc/self/fd")),
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            rss,
        )

    async def _close(self) -> None:
        if self._churning is not None:
            await self._churning.close()
        for agent in self._agents:
            if agent.watch is not None:
                agent.watch.cancel()
        await asyncio.gather(*(a.watch for a in self._agents if a.watch is not None), return_exceptions=True)
        await asyncio.gather(*(a.channel.close() for a in self._agents if a.channel is not None))
