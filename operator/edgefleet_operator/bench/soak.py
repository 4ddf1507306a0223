"""``edgefleet bench gateway --soak``: one gateway process held under load while agents churn.

What it shows: that connections coming and going (channels closed, watch streams cancelled
mid-stream, TCP connections reset with no goodbye; see :mod:`.churn`) leave nothing behind in the
gateway, and that under a steady load it answers every well-formed call OK. The gateway runs as in
the benchmark (``edgefleet gateway serve`` in a subprocess, on its own core when there is a second
one), with its Prometheus endpoint on, so its own count of answers by status code and of watched
devices is read too. Every few seconds this process samples the gateway's RSS, open descriptors
and threads.

The stated bound, checked at the end (the command fails when it does not hold):

- RSS growth from the end of the warm-up to the end of the soak at most
  max(:data:`GROWTH_BOUND_MIB`, :data:`GROWTH_BOUND_FRACTION` of the post-warm-up RSS). The warm-up
  (caches, gRPC's arenas, the allocator reaching its steady state) is excluded; 32 MiB is a few
  allocator arenas of slack, far below what a per-connection leak reaches over thousands of
  reconnections (1 KiB each at 20/s is 12 MiB in 10 minutes, and that still shows in the slope);
- the slope of a linear fit of RSS over the second half at most :data:`SLOPE_BOUND_MIB_PER_MIN`,
  judged when the second half spans :data:`SLOPE_MIN_SPAN_S` or more (shorter, allocator steps
  dominate it). At the default churn this bounds a leak at well under 1 KiB per reconnection;
- descriptors after the churn (every agent connected again) no more than before it (all
  connected) plus a small slack, threads likewise: a socket or thread left per closed connection
  would show as hundreds;
- zero error responses: no non-OK status to a well-formed call on a connection the agent did not
  end itself, no failed reconnection, and on the gateway's side no status other than OK and
  CANCELLED (a call we cut ends CANCELLED there). Calls cut by our own disconnections are counted
  apart.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from edgefleet_core.bench.pipeline import Target, noisy_machine_note, write_results
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.bench import churn, loadgen
from edgefleet_operator.bench.gateway import (
    DEVICE_CLASS,
    FD_HEADROOM,
    MODEL,
    NAMESPACE,
    REPLY_MARGIN_S,
    VERSION,
    Gateway,
    GatewayBenchError,
    Generators,
    Placement,
    Published,
    _device_names,
    _machine,
    _percentile,
    _pinned,
    _split,
    publish_payload,
)
from edgefleet_operator.fleet import FleetState
from edgefleet_operator.gateway.pki import init_pki

MARK = "gateway-soak"
MIB = 1 << 20

GROWTH_BOUND_MIB = 32.0
GROWTH_BOUND_FRACTION = 0.10
SLOPE_BOUND_MIB_PER_MIN = 1.0
SLOPE_MIN_SPAN_S = 120.0
FD_SLACK = 16
"""Descriptors the gateway may legitimately hold more at the end: store files, a log rotation, epoll."""
THREAD_SLACK = 8
"""Threads a pool may have started meanwhile (asyncio's default executor grows on demand, to a cap)."""
SETTLE_S = 30.0
"""Longest wait after the churn for the gateway's descriptors and watched-device count to settle."""
SERVER_BENIGN_CODES = frozenset({"OK", "CANCELLED"})


@dataclass(frozen=True)
class SoakConfig:
    """Sizes of one soak run."""

    duration_s: float
    agents: int = 1_000
    health_rate: float = 500.0
    """Reports/s offered: steady and below saturation, so that errors mean a fault, not a queue."""
    churn_rate: float = 20.0
    """Agents disconnected and reconnected per second (each a new TLS handshake unless its mode is stream)."""
    warmup_s: float | None = None
    """Excluded from the memory bound; default a fifth of the duration, at most 60 s."""
    sample_interval_s: float | None = None
    """Default: the duration / 30, between 0.5 and 5 s."""
    assign_interval_s: float = 15.0
    """A new assignment for every agent this often, so that watches carry pushes while they churn."""
    payload_mb: float = 2.0
    generators: int = 0
    connect_timeout_s: float = 30.0
    poll_interval_s: float = 0.2

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.agents < 1 or self.health_rate <= 0 or self.churn_rate < 0:
            raise GatewayBenchError("soak duration, agents and health rate must be positive, churn not negative")
        if self.warmup_s is not None and not 0 <= self.warmup_s < self.duration_s:
            raise GatewayBenchError(f"the warm-up ({self.warmup_s:g} s) must be shorter than the soak")

    @property
    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(60.0, self.duration_s / 5)

    @property
    def interval(self) -> float:
        if self.sample_interval_s is not None:
            return self.sample_interval_s
        return min(5.0, max(0.5, self.duration_s / 30))


@dataclass(frozen=True)
class Sample:
    """The gateway process at one moment of the soak."""

    t_s: float
    """Seconds since the soak began (negative: before it)."""
    rss_bytes: int
    fds: int
    threads: int
    watched_devices: int | None
    """The gateway's ``edgefleet_gateway_connected_devices`` gauge, when its endpoint answered."""


def _scrape(url: str | None) -> str | None:
    if url is None:
        return None
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 — our own loopback endpoint
            text: str = response.read().decode()
    except OSError:
        return None
    return text


def watched_devices(metrics: str | None) -> int | None:
    """The connected-devices gauge from a metrics page."""
    for family in text_string_to_metric_families(metrics or ""):
        if family.name == "edgefleet_gateway_connected_devices":
            return int(family.samples[0].value)
    return None


def server_codes(metrics: str | None) -> dict[str, dict[str, int]]:
    """Calls the gateway ended, by method and status code (its RPC duration histogram's counts)."""
    codes: dict[str, dict[str, int]] = {}
    for family in text_string_to_metric_families(metrics or ""):
        if family.name != "edgefleet_gateway_rpc_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                method = sample.labels["method"].rsplit("/", 1)[-1]
                codes.setdefault(method, {})[sample.labels["code"]] = int(sample.value)
    return codes


def _sample(gateway: Gateway, t_s: float) -> Sample:
    process = gateway.process
    return Sample(
        t_s=round(t_s, 2),
        rss_bytes=int(process.memory_info().rss),
        fds=process.num_fds(),
        threads=process.num_threads(),
        watched_devices=watched_devices(_scrape(gateway.metrics_url)),
    )


def memory_figures(samples: Sequence[Sample], warmup_s: float, duration_s: float) -> dict[str, Any]:
    """Start (first sample after the warm-up), peak, end, growth and the slope over the second half."""
    during = [s for s in samples if 0 <= s.t_s <= duration_s + 1]
    after_warmup = [s for s in during if s.t_s >= warmup_s] or during[-1:]
    if not after_warmup:
        raise GatewayBenchError("no memory sample was taken during the soak")
    start, end = after_warmup[0].rss_bytes, after_warmup[-1].rss_bytes
    second_half = [s for s in during if s.t_s >= duration_s / 2]
    span = second_half[-1].t_s - second_half[0].t_s if len(second_half) > 1 else 0.0
    slope = math.nan
    if len(second_half) >= 3 and span > 0:
        minutes = np.array([s.t_s / 60 for s in second_half])
        mib = np.array([s.rss_bytes / MIB for s in second_half])
        slope = float(np.polyfit(minutes, mib, 1)[0])
    return {
        "start_bytes": start,
        "peak_bytes": max(s.rss_bytes for s in during),
        "end_bytes": end,
        "growth_mib": (end - start) / MIB,
        "growth_bound_mib": max(GROWTH_BOUND_MIB, GROWTH_BOUND_FRACTION * start / MIB),
        "slope_mib_per_min": slope,
        "slope_span_s": span,
        "slope_judged": span >= SLOPE_MIN_SPAN_S and len(second_half) >= 10,
        "slope_bound_mib_per_min": SLOPE_BOUND_MIB_PER_MIN,
    }


def _merge_counts(parts: Sequence[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items()))


def _assign(state: FleetState, names: Sequence[str], published: Published) -> int:
    return state.assign(
        NAMESPACE, names, model_namespace=NAMESPACE, model_name=MODEL, version=VERSION, action="install",
        target_paths=published.target_paths, bundle_sha256=published.bundle_sha256,
        bundle_length=published.bundle_length,
    )  # fmt: skip


def check_fd_limits(config: SoakConfig, generators: int) -> dict[str, int]:
    """As the benchmark's check; a generator's agents that may be reset hold two more descriptors (their relay)."""
    soft, hard = loadgen.raise_fd_limit()
    gateway_needs = config.agents + FD_HEADROOM * 2
    generator_needs = math.ceil(config.agents / max(generators, 1)) * 3 + FD_HEADROOM
    if soft < max(gateway_needs, generator_needs):
        raise GatewayBenchError(
            f"open-file limit too low: {config.agents} churning agents need about {gateway_needs} descriptors in "
            f"the gateway and {generator_needs} per load generator, but RLIMIT_NOFILE allows {soft} (hard limit "
            f"{hard}). Raise the hard limit (`ulimit -Hn`) or pass fewer --agents."
        )
    return {"soft": soft, "hard": hard, "gateway_needs": gateway_needs, "generator_needs": generator_needs}


@dataclass
class _Soak:
    config: SoakConfig
    gateway: Gateway
    generators: Generators
    state: FleetState
    published: Published
    names: list[str]
    progress: Callable[[str], object]

    def connect(self) -> dict[str, Any]:
        timeout = self.config.connect_timeout_s + self.config.agents * 0.03
        replies = self.generators.ask_all(
            churn.SoakConnect(timeout, seed=1), loadgen.Connected, timeout * 2 + REPLY_MARGIN_S
        )
        connected = sum(r.connected for r in replies)
        self.progress(f"    {connected}/{self.config.agents} connected in {max(r.seconds for r in replies):.1f} s")
        return {
            "connected": connected,
            "seconds": max(r.seconds for r in replies),
            "failed": _merge_counts([r.failed for r in replies]),
        }

    def settle(self, connected: int, began: float) -> Sample:
        """Sample until the watched-device gauge matches ``connected`` and descriptors stop moving."""
        deadline = time.monotonic() + SETTLE_S
        previous = _sample(self.gateway, time.monotonic() - began)
        while time.monotonic() < deadline:
            time.sleep(0.5)
            current = _sample(self.gateway, time.monotonic() - began)
            if current.watched_devices == connected and current.fds == previous.fds:
                return current
            previous = current
        return previous

    def soak(self, began: float, samples: list[Sample]) -> list[churn.SoakDone]:
        """Send the Soak command, sample and assign until every generator answered."""
        config = self.config
        parts = len(self.generators.pipes)
        target_path = self.published.payload_fetch_path
        command = churn.Soak(
            duration_s=config.duration_s,
            health_rate=config.health_rate / parts,
            churn_rate=config.churn_rate / parts,
            target_path=target_path,
            target_length=self.published.payload_length,
            connect_timeout_s=config.connect_timeout_s,
        )
        for pipe in self.generators.pipes:
            pipe.send(command)
        deadline = began + config.duration_s + config.connect_timeout_s * (churn.CONNECT_ATTEMPTS + 2) + REPLY_MARGIN_S
        replies: dict[int, churn.SoakDone] = {}
        next_sample, next_assign, next_note = began, began + config.assign_interval_s, began + 60
        while len(replies) < parts:
            now = time.monotonic()
            if now > deadline:
                raise GatewayBenchError(f"the load generators did not finish the soak by {deadline - began:.0f} s")
            if now >= next_sample:
                samples.append(_sample(self.gateway, now - began))
                next_sample += config.interval
            if now >= next_assign and now - began < config.duration_s:
                _assign(self.state, self.names, self.published)
                next_assign += config.assign_interval_s
            if now >= next_note and now - began < config.duration_s:
                last = samples[-1]
                self.progress(
                    f"    {now - began:.0f} s: RSS {last.rss_bytes / MIB:.0f} MiB, {last.fds} fds, "
                    f"{last.threads} threads, {last.watched_devices} devices watching"
                )
                next_note += 60
            for i in range(parts):
                if i not in replies and self.generators.pipes[i].poll(0):
                    replies[i] = self.generators.receive(i, churn.SoakDone, 1)
            time.sleep(max(0.0, min(0.2, next_sample - time.monotonic())))
        return [replies[i] for i in range(parts)]


def run(config: SoakConfig, progress: Callable[[str], object] = print) -> dict[str, Any]:
    """Set up, connect, soak, settle, tear down; the results document with its checks."""
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    placement = Placement.choose()
    parts = min(config.generators or min(2, len(placement.load or os.sched_getaffinity(0))), config.agents)
    config = replace(config, generators=parts)
    limits = check_fd_limits(config, parts)
    names = _device_names(config.agents)
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-soak-") as tmp, _pinned(placement.load):
        workdir = Path(tmp)
        store_root, pki = workdir / "store", workdir / "pki"
        store = LocalStore(store_root)
        init_pki(pki, ["localhost", "127.0.0.1"])
        published = publish_payload(store, config.payload_mb)
        progress(f"starting the gateway and {parts} load generator(s) for {config.agents} agents ...")
        gateway = Gateway(workdir, store_root, pki, placement, config.poll_interval_s, metrics=True)
        generators: Generators | None = None
        try:
            generators = Generators([
                loadgen.GeneratorSpec(i, part, NAMESPACE, DEVICE_CLASS, pki, store_root, gateway.fleet_target,
                                      gateway.enroll_target, placement.load)
                for i, part in enumerate(_split(names, parts))
            ])  # fmt: skip
            for i in range(parts):
                generators.receive(i, loadgen.Ready, 60 + len(names) * 0.05)
            state = FleetState(store)
            _assign(state, names, published)
            session = _Soak(config, gateway, generators, state, published, names, progress)
            progress(f"connecting {config.agents} agents ...")
            connect = session.connect()
            before = session.settle(connect["connected"], time.monotonic())
            progress(
                f"soak: {config.duration_s:g} s, {config.health_rate:g} health reports/s, "
                f"{config.churn_rate:g} reconnections/s ..."
            )
            began = time.monotonic()
            before = replace(before, t_s=-0.0)
            replies = session.soak(began, samples)
            connected_at_end = sum(r.connected_at_end for r in replies)
            after = session.settle(connected_at_end, began)
            metrics_text = _scrape(gateway.metrics_url)
            peak_hwm = gateway.peak_rss()
        except BaseException:
            progress(f"gateway output (tail):\n{gateway.output()}")
            raise
        finally:
            if generators is not None:
                generators.stop()
            exit_code, shutdown_s = gateway.stop()
        if exit_code != 0:
            progress(f"gateway exited with {exit_code} after SIGTERM:\n{gateway.output()}")
    document = _document(config, connect, before, after, samples, replies, metrics_text)
    document.update({
        "machine": _machine(),
        "seconds": round(time.perf_counter() - started, 1),
        "setup": {
            **asdict(config),
            "warmup_s": config.warmup,
            "sample_interval_s": config.interval,
            "disconnect_modes": dict(zip(churn.MODES, churn.MODE_WEIGHTS, strict=True)),
            "fetch_fraction": churn.FETCH_FRACTION,
            "placement": placement.describe(),
            "fd_limits": limits,
            "payload_bytes": published.payload_length,
            "load_average_1min_at_start": load_before,
        },
        "gateway_vm_hwm_bytes": peak_hwm,
        "gateway_shutdown": {"exit_code": exit_code, "seconds": shutdown_s},
    })  # fmt: skip
    return document


def _document(
    config: SoakConfig,
    connect: dict[str, Any],
    before: Sample,
    after: Sample,
    samples: Sequence[Sample],
    replies: Sequence[churn.SoakDone],
    metrics_text: str | None,
) -> dict[str, Any]:
    seconds = max(r.seconds for r in replies)
    latencies = [x for r in replies for x in r.latencies_ms]
    reconnects = [x for r in replies for x in r.reconnect_ms]
    succeeded = sum(r.health_succeeded for r in replies)
    codes = server_codes(metrics_text)
    server_errors = {
        f"{method} {code}": count
        for method, by_code in codes.items()
        for code, count in by_code.items()
        if code not in SERVER_BENIGN_CODES
    }
    connected_at_end = sum(r.connected_at_end for r in replies)
    document: dict[str, Any] = {
        "benchmark": MARK,
        "duration_s": config.duration_s,
        "connect": connect,
        "health": {
            "offered": sum(r.health_offered for r in replies),
            "succeeded": succeeded,
            "skipped": sum(r.health_skipped for r in replies),
            "per_s": succeeded / seconds if seconds else 0.0,
            "p50_ms": _percentile(latencies, 50),
            "p99_ms": _percentile(latencies, 99),
        },
        "churn": {
            "disconnects": _merge_counts([r.disconnects for r in replies]),
            "reconnections": len(reconnects),
            "reconnect_p50_ms": _percentile(reconnects, 50),
            "reconnect_p99_ms": _percentile(reconnects, 99),
            "skipped": sum(r.churn_skipped for r in replies),
            "fetches": sum(r.fetches for r in replies),
            "fetch_bytes": sum(r.fetch_bytes for r in replies),
            "pushes_received": sum(r.pushes_received for r in replies),
        },
        "errors": _merge_counts([r.errors for r in replies]),
        "failed_connections": _merge_counts([connect["failed"], *(r.connect_failures for r in replies)]),
        "cut_by_us": _merge_counts([r.cut for r in replies]),
        "server_codes": codes,
        "server_errors": server_errors,
        "memory": memory_figures(samples, config.warmup, config.duration_s),
        "fds": {"before": before.fds, "after": after.fds},
        "threads": {"before": before.threads, "after": after.threads},
        "agents_connected_at_end": connected_at_end,
        "watched_devices": {"before": before.watched_devices, "after": after.watched_devices},
        "samples": [asdict(s) for s in samples],
        "generator_cpu_percent": sum(r.cpu_seconds for r in replies) / seconds * 100 if seconds else 0.0,
    }
    document["checks"] = [t.as_dict() for t in checks(document, config)]
    document["held"] = not missed(document)
    return document


def checks(document: dict[str, Any], config: SoakConfig) -> list[Target]:
    """The soak's verdict: the memory bound, no leaked descriptors or threads, no error responses."""
    memory = document["memory"]
    slope_name = "gateway RSS slope over the second half, MiB/min"
    slope_bound = memory["slope_bound_mib_per_min"] if memory["slope_judged"] else math.inf
    if not memory["slope_judged"]:
        slope_name += f" (reported: the second half is under {SLOPE_MIN_SPAN_S:g} s)"
    watched_after = document["watched_devices"]["after"]
    return [
        Target("error responses to well-formed calls", sum(document["errors"].values()), 0.0, False),
        Target("failed connections", sum(document["failed_connections"].values()), 0.0, False),
        Target("gateway answers other than OK or CANCELLED (its own count)",
               sum(document["server_errors"].values()), 0.0, False),
        Target("gateway RSS growth after the warm-up, MiB", memory["growth_mib"], memory["growth_bound_mib"], False),
        Target(slope_name, 0.0 if math.isnan(memory["slope_mib_per_min"]) else memory["slope_mib_per_min"],
               slope_bound, False),
        Target(f"gateway descriptors after the churn minus before (+{FD_SLACK} allowed)",
               document["fds"]["after"] - document["fds"]["before"], FD_SLACK, False),
        Target(f"gateway threads after the churn minus before (+{THREAD_SLACK} allowed)",
               document["threads"]["after"] - document["threads"]["before"], THREAD_SLACK, False),
        Target(f"agents connected at the end (of {config.agents})", document["agents_connected_at_end"],
               config.agents, True),
        Target("devices the gateway counts as watching at the end, minus agents connected",
               abs((watched_after if watched_after is not None else -1) - document["agents_connected_at_end"]),
               0.0, False),
    ]  # fmt: skip


def missed(document: dict[str, Any]) -> list[str]:
    """Names of the checks the soak failed."""
    return [t["name"] for t in document["checks"] if not t["met"]]


def markdown(document: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    m, setup = document["machine"], document["setup"]
    memory, churned, health = document["memory"], document["churn"], document["health"]
    modes = ", ".join(f"{mode} {n}" for mode, n in churned["disconnects"].items())
    lines = [
        f"Measured on {m['cpu']} ({m['cores']} cores), grpcio {m['grpcio']}: one gateway process, "
        f"{setup['agents']} simulated mTLS agents, {document['duration_s']:g} s "
        f"({document['duration_s'] / 60:.1f} min) of {setup['health_rate']:g} health reports/s offered while "
        f"{setup['churn_rate']:g} agents/s disconnect and reconnect; {setup['placement']['note']}.",
        *noisy_machine_note(setup["load_average_1min_at_start"]),
        "",
        f"**{'Held' if document['held'] else 'Not held'}.**",
        "",
        "| check | value | bound | met |",
        "|---|---|---|---|",
    ]
    for t in document["checks"]:
        bound = "reported" if "(reported" in t["name"] else f"{t['rule']} {t['bound']:g}"
        lines.append(f"| {t['name']} | {t['value']:.2f} | {bound} | {'yes' if t['met'] else '**no**'} |")
    cut = sum(document["cut_by_us"].values())
    lines += [
        "",
        f"Memory: RSS {memory['start_bytes'] / MIB:.0f} MiB after the {setup['warmup_s']:g} s warm-up, "
        f"{memory['peak_bytes'] / MIB:.0f} MiB peak, {memory['end_bytes'] / MIB:.0f} MiB at the end; slope "
        f"{memory['slope_mib_per_min']:.2f} MiB/min over the last {memory['slope_span_s']:.0f} s. Descriptors "
        f"{document['fds']['before']} → {document['fds']['after']}, threads {document['threads']['before']} → "
        f"{document['threads']['after']}. Health: {health['succeeded']} reports OK of {health['offered']} offered, "
        f"p50 {health['p50_ms']:.1f} ms, p99 {health['p99_ms']:.1f} ms. Churn: {churned['reconnections']} "
        f"reconnections ({modes}), p50 {churned['reconnect_p50_ms']:.0f} ms to the initial assignment; "
        f"{churned['fetches']} metadata/target fetches; {churned['pushes_received']} pushed assignments received; "
        f"{cut} calls and streams cut by the agents' own disconnections (not errors).",
        "",
        f"Bound: RSS growth after the warm-up ≤ max({GROWTH_BOUND_MIB:g} MiB, {GROWTH_BOUND_FRACTION:.0%} of the "
        f"post-warm-up RSS), slope over the second half ≤ {SLOPE_BOUND_MIB_PER_MIN:g} MiB/min (judged when it "
        f"spans ≥ {SLOPE_MIN_SPAN_S:g} s), descriptors and threads back to their pre-churn count, zero error "
        "responses and failed connections.",
    ]
    return "\n".join(lines)


def benchmark(
    config: SoakConfig, out: Path, markdown_file: Path | None, progress: Callable[[str], object] = print
) -> dict[str, Any]:
    """Run, then write the JSON results and the ``bench:gateway-soak`` section of ``markdown_file``."""
    document = run(config, progress)
    write_results(document, out, markdown_file, mark=MARK, table=markdown(document))
    return document
