"""Simulated agents that come and go, for ``edgefleet bench gateway --soak``; runs in a load generator.

Each agent holds one mTLS channel with a WatchAssignments stream open and sends ReportHealth at its
share of a steady rate. Meanwhile agents are picked at random, at a fixed rate, disconnected in one
of three ways and reconnected, as a real fleet does through restarts, network changes and crashes:

- ``close``: the channel is closed with its watch open (RST_STREAM, GOAWAY, TLS close_notify), and
  the agent reconnects on a new channel;
- ``stream``: only the watch stream is cancelled mid-stream; a new one opens on the same channel;
- ``reset``: the TCP connection is reset with no goodbye of any kind, as when a device loses power:
  the agent's channel goes through a :class:`_Relay` on loopback that sends RST both ways. Then a
  new channel.

A quarter of the reconnecting agents also fetch ``timestamp.json`` and the tail of a target, as an
agent resuming a download does. Every answer is classified: a non-OK status to a well-formed call
on a connection we did not end is an *error*; a call that fails because we ended its connection on
purpose is counted apart, under *cut*, and is not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from edgefleet_proto.v1 import fleet_pb2, fleet_pb2_grpc

MODES = ("close", "stream", "reset")
MODE_WEIGHTS = (0.4, 0.3, 0.3)
"""How connections end: most churn in a real fleet is a clean reconnect, but resets are the risky kind."""
FETCH_FRACTION = 0.25
"""Share of reconnections that also fetch metadata and a target tail."""
TARGET_TAIL_BYTES = 64 << 10
MAX_IN_FLIGHT = 2048
"""Health calls outstanding at once before the soak stops offering more (counted as skipped)."""
CONNECT_ATTEMPTS = 3
"""Tries per reconnection before the agent is left for the final sweep (each failure is counted)."""

ReportFactory = Callable[[int, float], fleet_pb2.HealthReport]


@dataclass(frozen=True)
class SoakConnect:
    """Connect every agent of this generator (each on its own channel, watch open, initial assignment)."""

    timeout_s: float
    seed: int
    concurrency: int = 200


@dataclass(frozen=True)
class Soak:
    """Health load and churn for ``duration_s``; at the end every agent is connected again."""

    duration_s: float
    health_rate: float
    """ReportHealth calls/s this generator offers, open loop."""
    churn_rate: float
    """Disconnections (then reconnections) per second this generator makes."""
    target_path: str
    """A target of the agents' class; reconnecting agents that fetch ask for its tail."""
    target_length: int
    connect_timeout_s: float


@dataclass(frozen=True)
class SoakDone:
    seconds: float
    health_offered: int
    health_succeeded: int
    health_skipped: int
    latencies_ms: list[float]
    errors: dict[str, int]
    """``"<method> <status code>"`` → count of non-OK answers on connections we did not end."""
    cut: dict[str, int]
    """Calls and streams that ended because we cut their connection on purpose (not errors)."""
    connect_failures: dict[str, int]
    """Reconnections that did not get their initial assignment in time, by reason."""
    disconnects: dict[str, int]
    """Disconnections made, by mode."""
    reconnect_ms: list[float]
    """From the end of one connection to the initial assignment on the next."""
    fetches: int
    fetch_bytes: int
    pushes_received: int
    """Assignments received on watches after their initial one (the parent assigns now and then)."""
    churn_skipped: int
    """Scheduled disconnections not made because no connected, idle agent was found."""
    connected_at_end: int
    cpu_seconds: float


class _Relay:
    """A TCP relay on loopback for one agent's connection, so that the connection can be reset."""

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self._server: asyncio.Server | None = None
        self._transports: list[asyncio.WriteTransport] = []
        self._pumps: set[asyncio.Task[None]] = set()
        self._cut = False

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self._transports += [writer.transport, up_writer.transport]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            pump = asyncio.create_task(self._pump(source, sink))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while (data := await source.read(1 << 16)) and not self._cut:
                sink.write(data)
                await sink.drain()
            if not self._cut:
                sink.close()

    def cut(self) -> None:
        """Reset every connection through the relay (RST both ways, nothing flushed) and stop accepting."""
        self._cut = True
        linger = struct.pack("ii", 1, 0)  # SO_LINGER on with 0 s: close() sends RST instead of FIN
        for transport in self._transports:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            transport.abort()
        self._transports.clear()
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop the relay: after :meth:`cut`, or after the channel closed politely (its goodbye relayed first)."""
        if not self._cut and self._pumps:
            await asyncio.wait(set(self._pumps), timeout=5)
        if not self._cut:
            self.cut()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


@dataclass
class _Link:
    """One connection of an agent: its channel, watch stream, and how it is going to end."""

    channel: grpc.aio.Channel
    stub: fleet_pb2_grpc.FleetGatewayAsyncStub
    mode: str
    relay: _Relay | None
    ended_at: float
    """When the agent's previous connection ended (reconnect time is measured from it)."""
    watch: asyncio.Task[None] | None = None
    initial: asyncio.Event = field(default_factory=asyncio.Event)
    cut: bool = False
    """Set before we end the connection on purpose: failures after it are ours, not the gateway's."""


@dataclass
class _Agent:
    name: str
    credentials: grpc.ChannelCredentials
    link: _Link | None = None
    busy: bool = False
    """Being disconnected or reconnected: neither churned again nor sent health reports meanwhile."""


@dataclass
class _Tally:
    errors: dict[str, int] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)
    connect_failures: dict[str, int] = field(default_factory=dict)
    disconnects: dict[str, int] = field(default_factory=dict)
    reconnect_ms: list[float] = field(default_factory=list)
    fetches: int = 0
    fetch_bytes: int = 0
    pushes: int = 0

    @staticmethod
    def add(counts: dict[str, int], key: str) -> None:
        counts[key] = counts.get(key, 0) + 1


class ChurningFleet:
    """This generator's agents under churn; the parent drives it with :class:`SoakConnect` and :class:`Soak`."""

    def __init__(
        self,
        target: str,
        agents: Sequence[tuple[str, grpc.ChannelCredentials]],
        report: ReportFactory,
        channel_options: Sequence[tuple[str, int]],
        rpc_timeout_s: float,
    ) -> None:
        host, _, port = target.rpartition(":")
        self._target = target
        self._upstream = (host, int(port))
        self._agents = [_Agent(name, credentials) for name, credentials in agents]
        self._report = report
        self._options = list(channel_options)
        self._rpc_timeout_s = rpc_timeout_s
        self._rng = random.Random(0)  # noqa: S311 — load scheduling, not a secret
        self._tally = _Tally()

    # -- connections

    def _mode(self, *, reset_possible: bool = True) -> str:
        modes, weights = (MODES, MODE_WEIGHTS) if reset_possible else (MODES[:2], MODE_WEIGHTS[:2])
        return self._rng.choices(modes, weights)[0]

    async def _open(self, agent: _Agent, ended_at: float) -> _Link:
        mode = self._mode()
        relay = _Relay(*self._upstream) if mode == "reset" else None
        target = await relay.start() if relay is not None else self._target
        channel = grpc.aio.secure_channel(target, agent.credentials, self._options)
        link = _Link(channel, fleet_pb2_grpc.FleetGatewayStub(channel), mode, relay, ended_at)
        link.watch = asyncio.create_task(self._watch(link))
        return link

    async def _connect(self, agent: _Agent, timeout_s: float, ended_at: float) -> bool:
        """A new channel and watch for ``agent``; True once its initial assignment arrived."""
        link = await self._open(agent, ended_at)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(link.initial.wait(), timeout_s)
        if link.initial.is_set():
            agent.link = link
            self._tally.reconnect_ms.append((time.monotonic() - ended_at) * 1000)
            return True
        self._tally.add(self._tally.connect_failures, f"no initial assignment in {timeout_s:g} s")
        link.cut = True  # what the watch says next is our doing
        await self._end(link)
        return False

    async def _watch(self, link: _Link) -> None:
        call = link.stub.WatchAssignments(fleet_pb2.WatchAssignmentsRequest(last_revision=0))
        try:
            async for _ in call:
                if link.initial.is_set():
                    self._tally.pushes += 1
                link.initial.set()
            ended = "closed by the gateway"
        except grpc.aio.AioRpcError as exc:
            ended = exc.code().name
        finally:
            call.cancel()  # a no-op once it ended; ends it when this task is cancelled
        counts = self._tally.cut if link.cut else self._tally.errors
        self._tally.add(counts, f"WatchAssignments {ended}")

    async def _end(self, link: _Link) -> None:
        """End a connection we marked ``cut``: reset through its relay, or close the channel politely."""
        if link.relay is not None and link.mode == "reset":
            link.relay.cut()
        await link.channel.close()
        await self._forget_watch(link)
        if link.relay is not None:
            await link.relay.close()

    @staticmethod
    async def _forget_watch(link: _Link) -> None:
        """Wait for the watch task to end, then drop it.

        An ended watch's exception holds its frame, which holds the link, which holds the task: a
        cycle that keeps the gRPC call, and with it the closed channel's TCP connection, alive until
        the garbage collector runs. Breaking it lets the connection go when the channel closes, as
        a real agent's does.
        """
        if link.watch is not None:
            await asyncio.gather(link.watch, return_exceptions=True)
            link.watch = None

    async def connect_all(self, command: SoakConnect) -> tuple[int, dict[str, int], float]:
        """Every agent connected at once (``concurrency`` handshakes at a time); connected, failures, seconds."""
        self._rng.seed(command.seed)
        gate = asyncio.Semaphore(command.concurrency)
        started = time.perf_counter()

        async def connect(agent: _Agent) -> bool:
            async with gate:
                return await self._connect(agent, command.timeout_s, time.monotonic())

        connected = sum(await asyncio.gather(*(connect(a) for a in self._agents)))
        failures = dict(self._tally.connect_failures)
        self._tally = _Tally()  # the soak's counts start with the soak
        return connected, failures, time.perf_counter() - started

    # -- churn

    async def _cycle(self, agent: _Agent, command: Soak) -> None:
        """Disconnect one agent in its link's mode, then reconnect it (and sometimes fetch)."""
        link = agent.link
        assert link is not None
        agent.link = None  # no new calls on the old connection
        self._tally.add(self._tally.disconnects, link.mode)
        ended_at = time.monotonic()
        try:
            if link.mode == "stream":
                await self._rewatch(agent, link, command.connect_timeout_s, ended_at)
                return
            link.cut = True
            await self._end(link)
            for attempt in range(CONNECT_ATTEMPTS):
                if await self._connect(agent, command.connect_timeout_s, ended_at):
                    if self._rng.random() < FETCH_FRACTION:
                        await self._fetch(agent, command)
                    break
                await asyncio.sleep(0.5 * (attempt + 1))
        finally:
            agent.busy = False

    async def _rewatch(self, agent: _Agent, link: _Link, timeout_s: float, ended_at: float) -> None:
        """Cancel the watch mid-stream and open a new one on the same channel."""
        if link.watch is not None:
            link.watch.cancel()
        await self._forget_watch(link)
        link.initial = asyncio.Event()
        link.watch = asyncio.create_task(self._watch(link))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(link.initial.wait(), timeout_s)
        if not link.initial.is_set():
            self._tally.add(self._tally.connect_failures, f"no initial assignment on a new watch in {timeout_s:g} s")
            link.cut = True
            await self._end(link)
            return
        self._tally.reconnect_ms.append((time.monotonic() - ended_at) * 1000)
        link.mode = self._mode(reset_possible=link.relay is not None)
        agent.link = link

    async def _fetch(self, agent: _Agent, command: Soak) -> None:
        """``timestamp.json`` and the last 64 KiB of a target, as an agent resuming a download asks for them."""
        link = agent.link
        if link is None:
            return
        offset = max(0, command.target_length - TARGET_TAIL_BYTES)
        calls = (
            ("FetchMetadata", link.stub.FetchMetadata(
                fleet_pb2.FetchMetadataRequest(role="timestamp", max_length=1 << 20), timeout=self._rpc_timeout_s)),
            ("FetchTarget", link.stub.FetchTarget(
                fleet_pb2.FetchTargetRequest(target_path=command.target_path, offset=offset,
                                             max_length=command.target_length), timeout=self._rpc_timeout_s)),
        )  # fmt: skip
        for method, call in calls:
            try:
                async for chunk in call:
                    self._tally.fetch_bytes += len(chunk.data)
            except grpc.aio.AioRpcError as exc:
                self._tally.add(self._tally.errors, f"{method} {exc.code().name}")
                continue
            self._tally.fetches += 1

    def _pick(self) -> _Agent | None:
        """A random connected agent that is not already being churned."""
        for _ in range(32):
            agent = self._rng.choice(self._agents)
            if agent.link is not None and not agent.busy:
                return agent
        return None

    async def _churn(self, command: Soak, cycles: set[asyncio.Task[None]]) -> int:
        """Start ``churn_rate`` cycles a second for the duration; how many could not start."""
        if command.churn_rate <= 0:
            return 0
        started, started_cycles, skipped = time.monotonic(), 0, 0
        while (elapsed := time.monotonic() - started) < command.duration_s:
            for _ in range(int(elapsed * command.churn_rate) - started_cycles):
                started_cycles += 1
                agent = self._pick()
                if agent is None:
                    skipped += 1
                    continue
                agent.busy = True
                cycle = asyncio.create_task(self._cycle(agent, command))
                cycles.add(cycle)
                cycle.add_done_callback(cycles.discard)
            await asyncio.sleep(0.01)
        return skipped

    # -- health

    async def _health(self, command: Soak) -> tuple[int, int, int, list[float]]:
        """ReportHealth at the offered rate round-robin over connected agents; offered, ok, skipped, latencies."""
        interval = len(self._agents) / command.health_rate
        latencies: list[float] = []
        in_flight: set[asyncio.Task[None]] = set()
        tally = self._tally

        async def report(link: _Link, sequence: int) -> None:
            began = time.perf_counter()
            try:
                await link.stub.ReportHealth(self._report(sequence, interval), timeout=self._rpc_timeout_s)
            except grpc.aio.AioRpcError as exc:
                tally.add(tally.cut if link.cut else tally.errors, f"ReportHealth {exc.code().name}")
                return
            except (asyncio.CancelledError, grpc.aio.UsageError) as exc:
                # The channel was closed under the call, or before it started: only ever one we ended.
                what = "cancelled" if isinstance(exc, asyncio.CancelledError) else "channel closed"
                tally.add(tally.cut if link.cut else tally.errors, f"ReportHealth {what}")
                return
            latencies.append((time.perf_counter() - began) * 1000)

        offered = skipped = 0
        cursor = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < command.duration_s:
            for _ in range(int(elapsed * command.health_rate) - offered - skipped):
                link = None
                for _ in range(len(self._agents)):  # the next agent that is connected right now
                    cursor = (cursor + 1) % len(self._agents)
                    link = self._agents[cursor].link
                    if link is not None:
                        break
                if link is None or len(in_flight) >= MAX_IN_FLIGHT:
                    skipped += 1
                    continue
                task = asyncio.create_task(report(link, offered))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                offered += 1
            await asyncio.sleep(0.002)
        if in_flight:
            await asyncio.wait(set(in_flight), timeout=self._rpc_timeout_s + 1)
        return offered, len(latencies), skipped, latencies

    async def soak(self, command: Soak, cpu_seconds: Callable[[], float]) -> SoakDone:
        """Health load and churn together for the duration; then every agent connected again."""
        cpu_before, started = cpu_seconds(), time.perf_counter()
        cycles: set[asyncio.Task[None]] = set()
        health = asyncio.create_task(self._health(command))
        churn_skipped = await self._churn(command, cycles)
        offered, succeeded, skipped, latencies = await health
        if cycles:
            await asyncio.wait(set(cycles), timeout=command.connect_timeout_s * (CONNECT_ATTEMPTS + 1) + 10)
        # Agents whose reconnection failed every attempt get one more try, so the end state compares.
        for agent in self._agents:
            if agent.link is None and not agent.busy:
                await self._connect(agent, command.connect_timeout_s, time.monotonic())
        tally = self._tally
        return SoakDone(
            seconds=time.perf_counter() - started,
            health_offered=offered,
            health_succeeded=succeeded,
            health_skipped=skipped,
            latencies_ms=latencies,
            errors=dict(tally.errors),
            cut=dict(tally.cut),
            connect_failures=dict(tally.connect_failures),
            disconnects=dict(tally.disconnects),
            reconnect_ms=list(tally.reconnect_ms),
            fetches=tally.fetches,
            fetch_bytes=tally.fetch_bytes,
            pushes_received=tally.pushes,
            churn_skipped=churn_skipped,
            connected_at_end=sum(1 for a in self._agents if a.link is not None),
            cpu_seconds=cpu_seconds() - cpu_before,
        )

    async def close(self) -> None:
        """Every connection closed (a goodbye for each: the parent stops the gateway next)."""
        links = [a.link for a in self._agents if a.link is not None]
        for link in links:
            link.cut = True
        await asyncio.gather(*(self._end(link) for link in links), return_exceptions=True)
