"""``edgefleet bench gateway``: one gateway process under a simulated fleet, on this machine.

What runs: ``edgefleet gateway serve`` as a subprocess (a LocalStore in a temporary folder, a real
PKI from :func:`~edgefleet_operator.gateway.pki.init_pki`), pinned to one core when ``taskset`` and a
second core exist, so that the load generators (:mod:`.loadgen`, one or two processes on the other
cores) do not take its CPU. A TUF repository in the same store holds a signed bundle of a few MB,
so FetchTarget streams real targets. Every simulated agent has its own key, certificate and mTLS
channel. What is measured, each against the issue's target where it sets one:

(a) agents connected at once with WatchAssignments open (each received its initial assignment);
(b) ReportHealth calls per second, offered open-loop at a fixed rate for ``duration`` seconds while
    every watch stays open, with client-side p99 latency per call;
(c) FetchTarget MB/s of several concurrent streams of the bundle payload, each one sha256-checked;
(d) push latency: from :meth:`FleetState.assign` (written by this process into the shared store, as
    the control plane does) to the last of 100 connected agents holding the new assignment;
(e) the gateway's RSS when ready, with every agent connected, and at the end; Enroll rate on the side.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from importlib.metadata import version as package_version
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psutil

from edgefleet_core.bench.bundles import big_model
from edgefleet_core.bench.measure import machine
from edgefleet_core.bench.pipeline import Target, noisy_machine_note, write_results
from edgefleet_core.bundle.distribution import BundleRef, build_bundles, publish_bundles
from edgefleet_core.errors import EdgeFleetError
from edgefleet_core.signing.keys import KeySet
from edgefleet_core.signing.layout import TARGETS_DIR, target_path
from edgefleet_core.signing.repository import TufRepository
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.bench import calibration, loadgen
from edgefleet_operator.fleet import FleetState, resolve_bundle
from edgefleet_operator.gateway.pki import init_pki

MARK = "gateway"
NAMESPACE = "bench"
DEVICE_CLASS = "bench-cpu"
MODEL = "payload"
VERSION = "1"

ISSUE_AGENTS = 5_000
HEALTH_TARGET_PER_S = 2_000.0
HEALTH_P99_TARGET_MS = 50.0
ARTIFACT_TARGET_MB_PER_S = 300.0

READY_TIMEOUT_S = 120.0
"""Longest the gateway may take to print its ready line (imports plus key loading; seconds normally)."""
REPLY_MARGIN_S = 120.0
"""How much longer than a command's own bound the parent waits for a generator's reply."""
FD_HEADROOM = 256
"""Descriptors a process needs beyond one per connection: store files, pipes, epoll, logs."""

_READY = re.compile(r"gateway listening fleet=(\S+) enroll=(\S+)")
_METRICS = re.compile(r"metrics on (http://\S+/metrics)")
_T = TypeVar("_T")


class GatewayBenchError(EdgeFleetError):
    """The benchmark could not run (not a missed target): the gateway did not start, limits too low."""


@dataclass(frozen=True)
class GatewayBenchConfig:
    """Sizes of one benchmark run; :meth:`full` and :meth:`quick` are the two the CLI offers."""

    agents: int
    """Simulated agents, each with its own certificate, channel and WatchAssignments stream."""
    duration_s: float
    """How long ReportHealth load is held."""
    quick: bool
    health_rate: float = HEALTH_TARGET_PER_S * 1.05
    """Offered ReportHealth calls/s: 5 % over the target so that meeting it does not hang on timer rounding.

    Far above what the server sustains, an open-loop offer only measures the collapse (calls pile up
    in flight); the no-op baseline shows where that ceiling is on this machine.
    """
    generators: int = 0
    """Load-generator processes; 0 picks one per CPU the gateway is not on, at most two.

    Two generators on one CPU only add context switches: one event loop drives 2,000 calls/s.
    """
    push_agents: int = 100
    """Connected agents every push assignment goes to."""
    push_rounds: int = 20
    streams: int = 4
    """Concurrent FetchTarget streams, each on its own agent's channel."""
    stream_rounds: int = 5
    """Whole-file fetches per stream."""
    payload_mb: float = 16.0
    """Size of the synthetic model in the bundle; its encoded payload is the streamed target."""
    enroll_devices: int = 100
    """New devices enrolled through the real Enroll call to measure its rate."""
    poll_interval_s: float = 0.2
    """The gateway's HEAD poll interval (its default); push latency cannot be much below it."""

    @classmethod
    def full(cls, agents: int | None = None, duration_s: float | None = None) -> GatewayBenchConfig:
        """The issue's sizes: 5,000 agents, 30 s of health load."""
        return cls(agents=agents or ISSUE_AGENTS, duration_s=duration_s or 30.0, quick=False)

    @classmethod
    def quick_run(cls, agents: int | None = None, duration_s: float | None = None) -> GatewayBenchConfig:
        """A smaller run for CI (well under two minutes on two cores): the figures are indicative only."""
        return cls(
            agents=agents or 500,
            duration_s=duration_s or 8.0,
            quick=True,
            push_rounds=8,
            stream_rounds=4,
            payload_mb=8.0,
            enroll_devices=20,
        )

    def __post_init__(self) -> None:
        if self.agents < 1 or self.duration_s <= 0 or self.health_rate <= 0 or self.generators < 0:
            raise GatewayBenchError("agents, duration and health rate must be positive, generators not negative")


@dataclass(frozen=True)
class Placement:
    """Which CPUs the gateway and the load run on."""

    gateway: frozenset[int] | None
    load: frozenset[int] | None

    @classmethod
    def choose(cls) -> Placement:
        """Gateway alone on the first allowed CPU, everything else on the rest (needs taskset and 2+ CPUs)."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2 or shutil.which("taskset") is None:
            return cls(None, None)
        return cls(frozenset(cpus[:1]), frozenset(cpus[1:]))

    def describe(self) -> dict[str, Any]:
        pinned = self.gateway is not None
        return {
            "gateway_pinned": pinned,
            "gateway_cpus": sorted(self.gateway or []),
            "load_cpus": sorted(self.load or []),
            "note": "gateway alone on its CPU (taskset); load generators and this process on the others"
            if pinned
            else "not pinned (taskset or a second CPU missing): gateway and load share the CPUs",
        }


# ---------------------------------------------------------------- the environment


@dataclass(frozen=True)
class Published:
    """The signed bundle in the store: what assignments name and what FetchTarget streams."""

    target_paths: list[str]
    bundle_sha256: str
    bundle_length: int
    payload_fetch_path: str
    """The payload's path as a TUF client asks for it (``<sha256>.`` file-name prefix)."""
    payload_sha256: str
    payload_length: int


def publish_payload(store: LocalStore, megabytes: float) -> Published:
    """A TUF repository with one bundle for the benchmark's class, resolved as ``gateway assign`` does."""
    repository = TufRepository(store, KeySet.generate())
    repository.initialize()
    ref = BundleRef(NAMESPACE, MODEL, DEVICE_CLASS)
    built = build_bundles(
        {"model.onnx": big_model(megabytes)},
        ref,
        VERSION,
        variant_id="0" * 64,
        lineage={},
        recipe=[],
        metrics={},
    )
    publish_bundles(repository, built)
    resolved = resolve_bundle(store, device_class=DEVICE_CLASS, namespace=NAMESPACE, model=MODEL, version=VERSION)
    (name, payload) = next(iter(built[0].payloads.items()))
    digest = hashlib.sha256(payload).hexdigest()
    return Published(
        target_paths=list(resolved.target_paths),
        bundle_sha256=resolved.bundle_sha256,
        bundle_length=resolved.bundle_length,
        payload_fetch_path=target_path(f"{built[0].prefix}/{name}", digest).removeprefix(TARGETS_DIR),
        payload_sha256=digest,
        payload_length=len(payload),
    )


def check_fd_limits(config: GatewayBenchConfig) -> dict[str, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (the gateway and generators inherit it) and check it.

    The gateway holds one socket per agent, each generator one per agent it simulates.
    """
    soft, hard = loadgen.raise_fd_limit()
    gateway_needs = config.agents + config.enroll_devices + FD_HEADROOM
    generator_needs = math.ceil(config.agents / max(config.generators, 1)) + config.enroll_devices + FD_HEADROOM
    if soft < gateway_needs:
        raise GatewayBenchError(
            f"open-file limit too low: {config.agents} agents need about {gateway_needs} descriptors in the gateway "
            f"and {generator_needs} per load generator, but RLIMIT_NOFILE allows {soft} (hard limit {hard}). "
            "Raise the hard limit (`ulimit -Hn`, LimitNOFILE= in systemd, nofile in limits.conf) "
            "or pass fewer --agents."
        )
    return {"soft": soft, "hard": hard, "gateway_needs": gateway_needs, "generator_needs": generator_needs}


class Gateway:
    """``edgefleet gateway serve`` in a subprocess, its output in a log file."""

    def __init__(
        self,
        workdir: Path,
        store: Path,
        pki: Path,
        placement: Placement,
        poll_interval_s: float,
        *,
        metrics: bool = False,
    ) -> None:
        self.log = workdir / "gateway.log"
        command = [
            sys.executable, "-m", "edgefleet_core.cli", "gateway", "serve",
            "--store", store.resolve().as_uri(), "--pki", str(pki),
            "--listen", "127.0.0.1:0", "--enroll-listen", "127.0.0.1:0",
            "--poll-interval", str(poll_interval_s),
        ]  # fmt: skip
        if metrics:
            command += ["--metrics-listen", "127.0.0.1:0"]
        if placement.gateway is not None:
            command = ["taskset", "-c", ",".join(str(c) for c in sorted(placement.gateway)), *command]
        with open(self.log, "wb") as log:
            self.popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # noqa: S603
        self.process = psutil.Process(self.popen.pid)
        self.fleet_target, self.enroll_target = self._wait_ready()
        found = _METRICS.search(self.output(tail=1 << 16)) if metrics else None
        self.metrics_url: str | None = found.group(1) if found else None
        """The gateway's Prometheus endpoint, when started with ``metrics``."""

    def output(self, tail: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-tail:] if self.log.exists() else ""

    def _wait_ready(self) -> tuple[str, str]:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            found = _READY.search(self.output(tail=1 << 16))
            if found:
                return found.group(1), found.group(2)
            if self.popen.poll() is not None:
                raise GatewayBenchError(f"the gateway exited with {self.popen.returncode}:\n{self.output()}")
            time.sleep(0.05)
        self.stop()
        raise GatewayBenchError(f"the gateway printed no ready line in {READY_TIMEOUT_S:.0f} s:\n{self.output()}")

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def fd_limit(self) -> int:
        return int(self.process.rlimit(psutil.RLIMIT_NOFILE)[0])

    def peak_rss(self) -> int:
        """VmHWM: the most resident memory the gateway has had."""
        with open(f"/proc/{self.popen.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> tuple[int | None, float]:
        """SIGTERM (graceful shutdown), SIGKILL after 30 s; the exit code and how long it took."""
        began = time.perf_counter()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=30)
                return None, time.perf_counter() - began
        return self.popen.returncode, time.perf_counter() - began


class Generators:
    """The load-generator processes and their pipes; commands go to all of them or to one."""

    def __init__(self, specs: Sequence[loadgen.GeneratorSpec]) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process that may hold gRPC threads
        self.specs = list(specs)
        self.pipes: list[Connection] = []
        self.processes: list[BaseProcess] = []
        for spec in self.specs:
            ours, theirs = context.Pipe()
            process = context.Process(target=loadgen.serve, args=(spec, theirs), name=f"loadgen-{spec.index}")
            process.daemon = True
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)

    def receive(self, index: int, expected: type[_T], timeout_s: float) -> _T:
        pipe = self.pipes[index]
        if not pipe.poll(timeout_s):
            raise GatewayBenchError(f"load generator {index} did not answer in {timeout_s:.0f} s")
        try:
            reply = pipe.recv()
        except EOFError as e:
            raise GatewayBenchError(
                f"load generator {index} exited (exit code {self.processes[index].exitcode})"
            ) from e
        if isinstance(reply, loadgen.Failed):
            raise GatewayBenchError(f"load generator {index}: {reply.message}")
        if not isinstance(reply, expected):
            raise GatewayBenchError(f"load generator {index} answered {type(reply).__name__}, not {expected.__name__}")
        return reply

    def ask_all(self, command: loadgen.Command, expected: type[_T], timeout_s: float) -> list[_T]:
        """The same command to every generator at once; their replies in order."""
        return self.ask_each([command] * len(self.pipes), expected, timeout_s)

    def ask_each(self, commands: Sequence[loadgen.Command | None], expected: type[_T], timeout_s: float) -> list[_T]:
        """One command per generator (``None`` skips one), run at once; the replies of those asked."""
        asked = [i for i, command in enumerate(commands) if command is not None]
        for i in asked:
            self.pipes[i].send(commands[i])
        return [self.receive(i, expected, timeout_s) for i in asked]

    def stop(self) -> None:
        for pipe, process in zip(self.pipes, self.processes, strict=True):
            if process.is_alive():
                with contextlib.suppress(OSError, EOFError):
                    pipe.send(loadgen.Stop())
                    pipe.poll(30)
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
            pipe.close()


@contextlib.contextmanager
def _pinned(cpus: frozenset[int] | None) -> Iterator[None]:
    """Run this process on the load CPUs for the duration (it writes the push assignments)."""
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# ---------------------------------------------------------------- measurement


def _machine() -> dict[str, Any]:
    """The core benchmarks' machine facts, plus the gRPC version."""
    return {**machine(), "grpcio": package_version("grpcio")}


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else math.nan


def _merge(counts: Sequence[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in counts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total


def _health_figures(replies: Sequence[loadgen.HealthDone]) -> dict[str, Any]:
    latencies = [latency for h in replies for latency in h.latencies_ms]
    succeeded = sum(h.succeeded for h in replies)
    seconds = max(h.seconds for h in replies)
    return {
        "per_s": succeeded / seconds if seconds else 0.0,
        "p50_ms": _percentile(latencies, 50),
        "p99_ms": _percentile(latencies, 99),
        "max_ms": max(latencies, default=math.nan),
        "offered": sum(h.offered for h in replies),
        "succeeded": succeeded,
        "failed": _merge([h.failed for h in replies]),
        "skipped": sum(h.skipped for h in replies),
        "seconds": seconds,
        "generator_cpu_percent": sum(h.cpu_seconds for h in replies) / seconds * 100 if seconds else 0.0,
    }


def _device_names(count: int) -> list[str]:
    return [f"agent-{i:05d}" for i in range(count)]


def _split(names: Sequence[str], parts: int) -> list[tuple[str, ...]]:
    return [tuple(names[i::parts]) for i in range(parts)]


@dataclass
class _Session:
    """A running gateway, its load generators and the control plane's view of the store."""

    config: GatewayBenchConfig
    gateway: Gateway
    generators: Generators
    state: FleetState
    published: Published
    progress: Callable[[str], object]
    pki: Path
    placement: Placement

    @property
    def first_only(self) -> list[None]:
        """Padding for :meth:`Generators.ask_each` when only the first generator is asked."""
        return [None] * (self.config.generators - 1)

    def connect(self, initial: int) -> dict[str, Any]:
        """(a) every agent opens its channel and watch; count those that received their initial assignment."""
        self.progress("(a) connecting agents ...")
        timeout = 60 + self.config.agents * 0.03
        replies = self.generators.ask_all(
            loadgen.Connect(initial, timeout), loadgen.Connected, timeout + REPLY_MARGIN_S
        )
        connected = sum(c.connected for c in replies)
        seconds = max(c.seconds for c in replies)
        self.progress(f"    {connected}/{self.config.agents} connected in {seconds:.1f} s")
        return {"connected_agents": connected, "seconds": seconds, "failed": _merge([c.failed for c in replies])}

    def calibrate(self) -> dict[str, Any]:
        """The same health load against a no-op gRPC server on the gateway's core: the ceiling here."""
        config = self.config
        duration = min(config.duration_s, 10.0)
        self.progress(f"(b0) baseline: no-op gRPC server, {config.health_rate:g}/s offered for {duration:g} s ...")
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(target=calibration.serve, args=(self.pki, self.placement.gateway, theirs))
        process.daemon = True
        process.start()
        theirs.close()
        try:
            if not ours.poll(READY_TIMEOUT_S):
                raise GatewayBenchError("the no-op baseline server did not start")
            target = ours.recv()
            channels = min(math.ceil(config.agents / config.generators), 500)
            replies = self.generators.ask_all(
                loadgen.Calibrate(target, channels, config.health_rate / config.generators, duration),
                loadgen.HealthDone,
                duration + loadgen.RPC_TIMEOUT_S + REPLY_MARGIN_S,
            )
        finally:
            with contextlib.suppress(OSError):
                ours.send("stop")
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
            ours.close()
        figures = _health_figures(replies)
        self.progress(f"    {figures['per_s']:.0f}/s, p99 {figures['p99_ms']:.1f} ms")
        return {**figures, "channels": channels * config.generators, "duration_s": duration}

    def health(self) -> dict[str, Any]:
        """(b) ReportHealth at the offered rate while every watch stays open."""
        config = self.config
        self.progress(f"(b) health reports at {config.health_rate:g}/s offered for {config.duration_s:g} s ...")
        cpu_before, wall_before = self.gateway.cpu_seconds(), time.perf_counter()
        replies = self.generators.ask_all(
            loadgen.Health(config.health_rate / config.generators, config.duration_s),
            loadgen.HealthDone,
            config.duration_s + loadgen.RPC_TIMEOUT_S + REPLY_MARGIN_S,
        )
        gateway_cpu = (self.gateway.cpu_seconds() - cpu_before) / (time.perf_counter() - wall_before)
        census = self.generators.ask_all(loadgen.Census(), loadgen.CensusDone, REPLY_MARGIN_S)
        figures = _health_figures(replies)
        self.progress(f"    {figures['per_s']:.0f}/s, p99 {figures['p99_ms']:.1f} ms")
        return {
            **figures,
            "offered_per_s": config.health_rate,
            "gateway_cpu_percent": gateway_cpu * 100,
            "watches_open_after": sum(c.watches_open for c in census),
        }

    def stream(self) -> dict[str, Any]:
        """(c) concurrent FetchTarget streams of the bundle payload, each one sha256-checked."""
        config, published = self.config, self.published
        self.progress(f"(c) {config.streams} FetchTarget streams of {published.payload_length / 1e6:.1f} MB ...")
        command = loadgen.Stream(
            published.payload_fetch_path, published.payload_length, published.payload_sha256,
            config.streams, config.stream_rounds,
        )  # fmt: skip
        (done,) = self.generators.ask_each(
            [command, *self.first_only],
            loadgen.StreamDone,
            loadgen.RPC_TIMEOUT_S * 6 * config.stream_rounds + REPLY_MARGIN_S,
        )
        rate = done.bytes_received / done.seconds / 1e6 if done.seconds else 0.0
        self.progress(f"    {rate:.0f} MB/s")
        return {
            "mb_per_s": rate,
            "streams": config.streams,
            "rounds": config.stream_rounds,
            "target_bytes": published.payload_length,
            "bytes_received": done.bytes_received,
            "files_verified": done.files_verified,
            "files_failed": done.files_failed,
            "seconds": done.seconds,
        }

    def push(self) -> dict[str, Any]:
        """(d) assignments to ``push_agents`` connected agents; time until the last one has each."""
        config = self.config
        self.progress(f"(d) push latency to {config.push_agents} agents, {config.push_rounds} assignments ...")
        names = _device_names(config.agents)[: config.push_agents]
        per_generator = [_split(names, config.generators)[g] for g in range(config.generators)]
        rng = random.Random(7)  # noqa: S311 — scheduling jitter, not a secret
        rounds: list[dict[str, float]] = []
        every_arrival: list[float] = []
        timeout = max(10.0, config.poll_interval_s * 20)
        for _ in range(config.push_rounds):
            # A random phase against the gateway's HEAD poll, as a real change would have.
            time.sleep(rng.uniform(0, config.poll_interval_s))
            began = time.monotonic()
            revision = self._assign(names)
            written = time.monotonic()
            commands = [loadgen.AwaitPush(revision, len(part), timeout) if part else None for part in per_generator]
            replies = self.generators.ask_each(commands, loadgen.PushArrivals, timeout + REPLY_MARGIN_S)
            arrivals = [(t - began) * 1000 for reply in replies for t in reply.arrivals]
            every_arrival += arrivals
            rounds.append({
                "revision": revision,
                "received": len(arrivals),
                "assign_write_ms": (written - began) * 1000,
                "all_received_ms": max(arrivals) if len(arrivals) >= len(names) else math.inf,
                "first_received_ms": min(arrivals, default=math.inf),
            })  # fmt: skip
        complete = [r["all_received_ms"] for r in rounds]
        result = {
            "agents": len(names),
            "rounds": len(rounds),
            "rounds_incomplete": sum(1 for r in rounds if r["received"] < len(names)),
            "p50_ms": _percentile(complete, 50),
            "p99_ms": _percentile(complete, 99),
            "max_ms": max(complete, default=math.nan),
            "per_agent_p50_ms": _percentile(every_arrival, 50),
            "per_agent_p99_ms": _percentile(every_arrival, 99),
            "assign_write_p50_ms": _percentile([r["assign_write_ms"] for r in rounds], 50),
            "poll_interval_s": config.poll_interval_s,
            "per_round": rounds,
        }
        self.progress(f"    p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms")
        return result

    def enroll(self) -> dict[str, Any]:
        """Enroll rate of new devices through the real Enroll call (TLS handshake included)."""
        count = self.config.enroll_devices
        if not count:
            return {"devices": 0, "per_s": 0.0}
        self.progress(f"enrolling {count} new devices ...")
        names = [f"enrolled-{i:04d}" for i in range(count)]
        tokens = tuple(
            (name, self.state.create_token(NAMESPACE, DEVICE_CLASS, ttl=timedelta(hours=1), device_name=name))
            for name in names
        )
        concurrency = 16
        (done,) = self.generators.ask_each(
            [loadgen.Enroll(tokens, concurrency), *self.first_only],
            loadgen.Enrolled,
            loadgen.RPC_TIMEOUT_S * count + REPLY_MARGIN_S,
        )
        return {
            "devices": count,
            "succeeded": done.succeeded,
            "failed": done.failed,
            "per_s": done.succeeded / done.seconds if done.seconds else 0.0,
            "p50_ms": _percentile(done.latencies_ms, 50),
            "p99_ms": _percentile(done.latencies_ms, 99),
            "concurrency": concurrency,
        }

    def _assign(self, names: Sequence[str]) -> int:
        published = self.published
        return self.state.assign(
            NAMESPACE, names, model_namespace=NAMESPACE, model_name=MODEL, version=VERSION, action="install",
            target_paths=published.target_paths, bundle_sha256=published.bundle_sha256,
            bundle_length=published.bundle_length,
        )  # fmt: skip


def _measure(session: _Session, names: Sequence[str]) -> dict[str, Any]:
    """Every phase in order, on a started gateway and generators; the figures."""
    gateway, generators = session.gateway, session.generators
    rss_ready = gateway.rss()
    ready = [generators.receive(i, loadgen.Ready, 60 + len(names) * 0.05) for i in range(len(generators.pipes))]
    baseline = session.calibrate()
    connect = session.connect(session._assign(names))
    rss_connected = gateway.rss()
    health = session.health()
    stream = session.stream()
    push = session.push()
    enroll = session.enroll()
    census = generators.ask_all(loadgen.Census(), loadgen.CensusDone, REPLY_MARGIN_S)
    connected = connect.pop("connected_agents")
    return {
        "identities_issued_s": max(r.seconds for r in ready),
        "connected_agents": connected,
        "connect": {
            **connect,
            "watches_open_after_health": health.pop("watches_open_after"),
            "watches_open_at_end": sum(c.watches_open for c in census),
            "watch_endings": _merge([c.watch_endings for c in census]),
        },
        "health_reports_per_s": health["per_s"],
        "health_p50_ms": health["p50_ms"],
        "health_p99_ms": health["p99_ms"],
        "health": health,
        "health_baseline_noop": baseline,
        "artifact_mb_per_s": stream["mb_per_s"],
        "artifact": stream,
        "push_p50_ms": push["p50_ms"],
        "push_p99_ms": push["p99_ms"],
        "push": push,
        "enroll_per_s": enroll["per_s"],
        "enroll": enroll,
        "gateway_rss_bytes": {
            "ready": rss_ready,
            "connected": rss_connected,
            "end": gateway.rss(),
            "peak": gateway.peak_rss(),
        },
        "gateway_rss_per_agent_kib": (rss_connected - rss_ready) / max(connected, 1) / 1024,
        "gateway_fds": {"soft_limit": gateway.fd_limit(), "open_at_end": gateway.process.num_fds()},
        "load_generators": [asdict(c) for c in census],
    }


def run(config: GatewayBenchConfig, progress: Callable[[str], object] = print) -> dict[str, Any]:
    """Set up, measure (a)–(e), tear down; the results document (targets included)."""
    started = time.perf_counter()
    # Other work on the machine takes the gateway's core too (taskset pins, it does not reserve).
    load_before = os.getloadavg()[0]
    placement = Placement.choose()
    processes = config.generators or min(2, len(placement.load or os.sched_getaffinity(0)))
    config = replace(
        config,
        generators=min(processes, config.agents),
        push_agents=min(config.push_agents, config.agents),
        streams=min(config.streams, config.agents),
    )
    limits = check_fd_limits(config)
    names = _device_names(config.agents)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-gateway-") as tmp, _pinned(placement.load):
        workdir = Path(tmp)
        store_root, pki = workdir / "store", workdir / "pki"
        store = LocalStore(store_root)
        init_pki(pki, ["localhost", "127.0.0.1"])
        progress(f"publishing a {config.payload_mb:g} MB bundle ...")
        published = publish_payload(store, config.payload_mb)
        progress(f"starting the gateway and {config.generators} load generator(s) for {config.agents} agents ...")
        gateway = Gateway(workdir, store_root, pki, placement, config.poll_interval_s)
        generators: Generators | None = None
        try:
            generators = Generators([
                loadgen.GeneratorSpec(i, part, NAMESPACE, DEVICE_CLASS, pki, store_root, gateway.fleet_target,
                                      gateway.enroll_target, placement.load)
                for i, part in enumerate(_split(names, config.generators))
            ])  # fmt: skip
            session = _Session(config, gateway, generators, FleetState(store), published, progress, pki, placement)
            figures = _measure(session, names)
        except BaseException:
            progress(f"gateway output (tail):\n{gateway.output()}")
            raise
        finally:
            if generators is not None:
                generators.stop()
            exit_code, shutdown_s = gateway.stop()
        if exit_code != 0:
            progress(f"gateway exited with {exit_code} after SIGTERM:\n{gateway.output()}")
    document: dict[str, Any] = {
        "benchmark": MARK,
        "quick": config.quick,
        "machine": _machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "setup": {
            **asdict(config),
            "placement": placement.describe(),
            "fd_limits": limits,
            "identities_issued_s": figures.pop("identities_issued_s"),
            "payload_bytes": published.payload_length,
            "store": "LocalStore (temporary folder)",
            "load_average_1min_at_start": load_before,
        },
        **figures,
        "gateway_shutdown": {"exit_code": exit_code, "seconds": shutdown_s},
    }
    document["targets"] = [t.as_dict() for t in targets(document, config)]
    return document


def targets(document: dict[str, Any], config: GatewayBenchConfig) -> list[Target]:
    """The issue's targets; the connection target is every requested agent (5,000 in a full run)."""
    artifact = document["artifact"]
    connect = document["connect"]
    return [
        Target(f"agents connected with a watch open (of {config.agents})", document["connected_agents"],
               config.agents, True),
        Target("watches still open after the health load", connect["watches_open_after_health"], config.agents, True),
        Target("health reports/s sustained", document["health_reports_per_s"], HEALTH_TARGET_PER_S, True),
        Target("health report p99 ms (client side)", document["health_p99_ms"], HEALTH_P99_TARGET_MS, False),
        Target("baseline: no-op gRPC server on the same core, reports/s (reported)",
               document["health_baseline_noop"]["per_s"], 0.0, True),
        Target("baseline: no-op gRPC server, p99 ms (reported)", document["health_baseline_noop"]["p99_ms"],
               math.inf, False),
        Target("artifact streaming MB/s over mTLS", document["artifact_mb_per_s"], ARTIFACT_TARGET_MB_PER_S, True),
        Target("streamed files that failed sha256", float(artifact["rounds"] * artifact["streams"]
                                                          - artifact["files_verified"]), 0.0, False),
        Target(f"push to {document['push']['agents']} agents, p99 ms (reported)", document["push_p99_ms"],
               math.inf, False),
    ]  # fmt: skip


def missed(document: dict[str, Any]) -> list[str]:
    """Names of the targets the run missed."""
    return [t["name"] for t in document["targets"] if not t["met"]]


def markdown(document: dict[str, Any]) -> str:
    """The BENCHMARKS.md table."""
    m, setup = document["machine"], document["setup"]
    placement = setup["placement"]
    rss = document["gateway_rss_bytes"]
    lines = [
        f"Measured on {m['cpu']} ({m['cores']} cores), grpcio {m['grpcio']}, {setup['agents']} simulated agents in "
        f"{setup['generators']} load-generator process(es); {placement['note']}"
        f"{' — quick run' if document['quick'] else ''}.",
        *noisy_machine_note(setup["load_average_1min_at_start"]),
        "",
        "| figure | value | target | met |",
        "|---|---|---|---|",
    ]
    for t in document["targets"]:
        bound = "reported" if "(reported)" in t["name"] else f"{t['rule']} {t['bound']:g}"
        lines.append(f"| {t['name']} | {t['value']:.1f} | {bound} | {'yes' if t['met'] else '**no**'} |")
    push, enroll, health = document["push"], document["enroll"], document["health"]
    lines += [
        "",
        f"Health: {health['offered_per_s']:.0f}/s offered open-loop for {setup['duration_s']:g} s, p50 "
        f"{document['health_p50_ms']:.1f} ms, {sum(health['failed'].values())} failed, {health['skipped']} skipped; "
        f"gateway CPU {health['gateway_cpu_percent']:.0f} % of one core, load generators "
        f"{health['generator_cpu_percent']:.0f} % of a core. "
        f"Push: per-agent p50 {push['per_agent_p50_ms']:.0f} ms, all {push['agents']} agents p50 "
        f"{push['p50_ms']:.0f} ms (HEAD poll every {setup['poll_interval_s']:g} s). "
        f"Enroll: {document['enroll_per_s']:.0f}/s, p99 {enroll.get('p99_ms', math.nan):.0f} ms. "
        f"Gateway RSS {rss['ready'] / 2**20:.0f} MiB ready, {rss['connected'] / 2**20:.0f} MiB connected "
        f"({document['gateway_rss_per_agent_kib']:.0f} KiB per agent), {rss['peak'] / 2**20:.0f} MiB peak.",
    ]
    return "\n".join(lines)


def benchmark(
    config: GatewayBenchConfig, out: Path, markdown_file: Path | None, progress: Callable[[str], object] = print
) -> dict[str, Any]:
    """Run, then write the JSON results and the ``bench:gateway`` section of ``markdown_file``."""
    document = run(config, progress)
    write_results(document, out, markdown_file, mark=MARK, table=markdown(document))
    return document
