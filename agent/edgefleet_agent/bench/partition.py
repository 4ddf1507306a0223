"""``edgefleet bench partition``: is a partitioned, pipelined model faster than the whole model?

On the pipeline issue's sample architectures (built from code, untrained: only timing matters), in
one run: the whole model on one core and on two cores (intra-op threads), then head and tail of
the planner's cut one after the other, pipelined in this process, and pipelined with the tail in an
``edgefleet accel-server serve`` subprocess on loopback. Every candidate cut is also measured, to
judge the planner against the best cut found by measurement, and the same profile is re-priced for
a slow (10 Mbit/s) link to show the latency planner moving the cut to a small crossing tensor.

There is no accelerator here: the "accelerator" is a second ONNX Runtime session with its own
thread, on the machine's second CPU core (or a separate process for the remote tail), and the
documents say so. Each request is a batch of images, sized so that one whole-model run takes a few
milliseconds: shorter runs would measure thread hand-over, not inference.
"""

from __future__ import annotations

import contextlib
import functools
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx

from edgefleet_agent.errors import AgentError
from edgefleet_agent.pipeline import LocalStage, PipelinedExecutor, SequentialExecutor, Stage
from edgefleet_agent.remote_stage import RemoteStage
from edgefleet_core.bench.measure import machine
from edgefleet_core.bench.pipeline import Target, write_results
from edgefleet_core.optimize.runtime import CPU_EP
from edgefleet_core.partition.plan import (
    Candidate,
    PartitionPlan,
    Policy,
    SegmentCosts,
    choose,
    measure_candidates,
    plan_from_costs,
    plan_partition,
    split_for,
)
from edgefleet_core.partition.profile import example_inputs
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.samples.models import SAMPLES
from edgefleet_core.samples.training import deterministic

__all__ = [
    "BenchModel",
    "PartitionBenchConfig",
    "PartitionBenchError",
    "bench_model",
    "benchmark",
    "device_class",
    "markdown",
    "missed",
    "run",
]

FAST_LINK_MBPS: Final = 20000.0
"""The Jetson example's CPU-GPU link (examples/valid/deviceclass-jetson-gpu.yaml): 20 GB/s, 30 µs."""
FAST_LINK_LATENCY_US: Final = 30.0
SLOW_LINK_MBPS: Final = 1.25
"""10 Mbit/s: a link slow enough that moving a large activation costs more than computing it."""
SLOW_LINK_LATENCY_US: Final = 1000.0

FULL_REPEAT: Final = 5
"""Runs of each model in a full benchmark. On a VM with noisy neighbours one run's ratio moves by
±0.1 from one minute to the next (the one-core baseline alone by up to 30 %), so a single run decides
nothing near a bound; the median of five, spread over the whole benchmark, does."""
PIPELINED_VS_ONE_CORE_TARGET: Final = 1.6
PLANNER_VS_BEST_TARGET: Final = 1.10
SLOW_LINK_BYTES_TARGET: Final = 0.5
SERVER_START_TIMEOUT: Final = 60.0
"""Seconds the accelerator server may take to print its ready line (it imports gRPC and ONNX Runtime)."""

STAND_IN: Final = (
    "No accelerator: the tail stage runs in a second ONNX Runtime session with its own intra-op thread on the "
    "machine's second CPU core (in-process), or in an `edgefleet accel-server serve` subprocess on loopback "
    "(remote). Tails are timed on the CPU execution provider."
)


class PartitionBenchError(AgentError):
    """The benchmark cannot run: the accelerator server did not start, or a model cannot be built."""


@dataclass(frozen=True)
class BenchModel:
    """One sample architecture and the batch of images one request carries."""

    name: str
    """A key of :data:`edgefleet_core.samples.models.SAMPLES`."""
    batch: int


@dataclass(frozen=True)
class PartitionBenchConfig:
    """How much to measure; :meth:`full` gives the published figures, :meth:`quick_run` a CI smoke run."""

    models: tuple[BenchModel, ...]
    requests: int
    """Requests per throughput figure."""
    rounds: int
    """Throughput figures are the median of this many interleaved rounds (the machine is shared)."""
    warmup: int
    runs: int
    """Timed runs per segment when the planner profiles, and per candidate when it measures latency."""
    quick: bool = False
    remote: bool = True
    """Also run the tail in an accelerator-server subprocess."""
    repeat: int = 1
    """Independent runs of every model, planner included; the figures are their medians (see :func:`combined`)."""

    @classmethod
    def full(cls) -> PartitionBenchConfig:
        return cls(DEFAULT_MODELS, requests=200, rounds=7, warmup=10, runs=40, repeat=FULL_REPEAT)

    @classmethod
    def quick_run(cls) -> PartitionBenchConfig:
        return cls(DEFAULT_MODELS, requests=60, rounds=1, warmup=3, runs=10, quick=True)


# One whole-model run of each takes about 2-4 ms on one core of a current x86 CPU.
DEFAULT_MODELS: Final = (
    BenchModel("digits-cnn", 16),
    BenchModel("wide-cnn", 4),
    BenchModel("overparameterized-mlp", 128),
)


def device_class(bandwidth_mbps: float, latency_us: float, name: str) -> DeviceClass:
    """A device class whose "accelerator" is a second CPU core, with the given link."""
    return DeviceClass.model_validate(
        {
            "apiVersion": "edgefleet.io/v1alpha1",
            "kind": "DeviceClass",
            "metadata": {"name": name},
            "spec": {
                "description": "Benchmark stand-in: a second CPU core plays the accelerator.",
                "cpu": {"arch": "x86_64", "cores": 2},
                "memory": "1Gi",
                "accelerator": {
                    "type": "gpu",
                    "model": "none (a second CPU core stands in)",
                    "executionProvider": CPU_EP,
                    "link": {"bandwidthMBps": bandwidth_mbps, "latencyMicroseconds": latency_us},
                },
                "selector": {"matchLabels": {"edgefleet.io/hardware": "bench"}},
            },
        }
    )


def bench_model(spec: BenchModel, seed: int = 0) -> onnx.ModelProto:
    """The sample architecture with fresh weights and the batch fixed, so every cut tensor has a known size."""
    try:
        sample = SAMPLES[spec.name]
    except KeyError:
        raise PartitionBenchError(f"no sample model named {spec.name!r}; known: {', '.join(SAMPLES)}") from None
    if spec.batch < 1:
        raise PartitionBenchError(f"{spec.name}: the batch must be at least 1, not {spec.batch}")
    with deterministic(seed):
        module = sample.make()
    model = sample.emit(module, sample.name, sample.description)
    for value in (*model.graph.input, *model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.dim_value = spec.batch  # replaces the symbolic batch (a oneof with dim_param)
    return model


# ------------------------------------------------------------------------------------ measuring


def _closed_loop(call: Callable[[], object], requests: int, warmup: int) -> dict[str, float]:
    """One request at a time: throughput and median latency."""
    for _ in range(warmup):
        call()
    samples: list[float] = []
    started = time.perf_counter()
    for _ in range(requests):
        begin = time.perf_counter()
        call()
        samples.append(time.perf_counter() - begin)
    elapsed = time.perf_counter() - started
    return {"throughput_per_s": requests / elapsed, "p50_ms": statistics.median(samples) * 1000.0}


def _open_pipeline(submit: Callable[[], Future[Any]], requests: int, warmup: int) -> dict[str, float]:
    """Many requests in flight (the executor's bounded queues apply backpressure): throughput."""
    for future in [submit() for _ in range(warmup)]:
        future.result()
    started = time.perf_counter()
    futures = [submit() for _ in range(requests)]
    for future in futures:
        future.result()
    return {"throughput_per_s": requests / (time.perf_counter() - started)}


TOGETHER_START_TIMEOUT: Final = 120.0
"""Seconds one loop of :func:`_together` waits for the other to finish its warm-up."""


def _together(
    first: Callable[[], object], second: Callable[[], object], requests: int, warmup: int
) -> dict[str, float]:
    """Two calls looping at the same time on two threads, started together, no hand-over between them.

    What two stages can do on this machine at all: each is slowed only by sharing it with the other
    (caches, memory, the interpreter), not by waiting for it. Both loops stop as soon as one has made
    ``requests`` calls (and the other at least two), so the calls counted ran while the other loop
    ran too. ``first_ms`` and
    ``second_ms`` are each loop's mean; the throughput is the slower one's. A call that raises ends
    both loops and is raised here.
    """
    start = threading.Barrier(2, timeout=TOGETHER_START_TIMEOUT)
    stop = threading.Event()
    calls = [0, 0]
    elapsed = [0.0, 0.0]
    errors: list[BaseException] = []

    def loop(index: int, call: Callable[[], object]) -> None:
        try:
            for _ in range(warmup):
                call()
            start.wait()
            began = time.perf_counter()
            while not stop.is_set():
                call()
                calls[index] += 1
                if calls[index] >= requests and min(calls) >= min(requests, 2):  # the other ran meanwhile
                    stop.set()
            elapsed[index] = time.perf_counter() - began
        except threading.BrokenBarrierError:
            pass  # the other loop failed (its error is reported) or never started
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)
            stop.set()
            start.abort()

    threads = [threading.Thread(target=loop, args=(i, c)) for i, c in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    if min(calls) == 0:
        raise PartitionBenchError("the two stages never ran at the same time")
    first_ms, second_ms = (elapsed[i] / calls[i] * 1000.0 for i in (0, 1))
    return {
        "first_ms": first_ms,
        "second_ms": second_ms,
        "first_calls": calls[0],
        "second_calls": calls[1],
        "throughput_per_s": 1000.0 / max(first_ms, second_ms),
    }


def _round_ratio(rounds: Mapping[str, Sequence[dict[str, float]]], variant: str, baseline: str) -> float:
    """Median over rounds of ``variant``'s throughput / ``baseline``'s in the same round.

    The machine is shared (a VM with steal time): the ratio of figures measured seconds apart is
    steadier than the ratio of two medians taken over the whole run.
    """
    return statistics.median(
        v["throughput_per_s"] / b["throughput_per_s"] for v, b in zip(rounds[variant], rounds[baseline], strict=True)
    )


def _median_rounds(rounds: Sequence[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


@dataclass(frozen=True)
class _Split:
    """What an executor needs besides its two stages."""

    head: bytes
    tail: bytes
    forwarded: tuple[str, ...]
    outputs: tuple[str, ...]
    tail_inputs: tuple[str, ...]


def _split_parts(model: onnx.ModelProto, plan: PartitionPlan, candidate: Candidate) -> _Split:
    split = split_for(model, plan, candidate)
    return _Split(
        head=split.head.SerializeToString(),
        tail=split.tail.SerializeToString(),
        forwarded=tuple(t.name for t in split.cut.forwarded),
        outputs=split.outputs,
        tail_inputs=tuple(i.name for i in split.tail.graph.input),
    )


def _pipelined(parts: _Split, tail: Stage) -> PipelinedExecutor:
    head = LocalStage(parts.head, [CPU_EP], 1, label="head")
    return PipelinedExecutor(
        head, tail, forwarded=parts.forwarded, outputs=parts.outputs, tail_inputs=parts.tail_inputs
    )


def _max_abs_diff(expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(expected[name] - got[name]))) for name in expected)


@contextlib.contextmanager
def accel_server(models_dir: Path, log_file: Path) -> Iterator[str]:
    """An ``edgefleet accel-server serve`` subprocess on loopback; yields its ``HOST:PORT``."""
    command = [sys.executable, "-m", "edgefleet_core.cli", "accel-server", "serve", "--models", str(models_dir)]
    with (
        log_file.open("wb") as log,
        subprocess.Popen(  # noqa: S603 - our own interpreter and arguments, no shell
            [*command, "--listen", "127.0.0.1:0", "--intra-op-threads", "1"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        ) as process,
    ):
        try:
            assert process.stdout is not None  # stdout=PIPE
            ready, _, _ = select.select([process.stdout], [], [], SERVER_START_TIMEOUT)
            line = process.stdout.readline() if ready else ""
            prefix = "accel-server listening "
            if not line.startswith(prefix):
                problem = "no ready line" if ready else f"not ready within {SERVER_START_TIMEOUT:.0f} s"
                log.flush()
                detail = log_file.read_text(encoding="utf-8", errors="replace")[-2000:]
                raise PartitionBenchError(f"the accelerator server did not start ({problem}): {detail}")
            yield line[len(prefix) :].strip()
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


# -------------------------------------------------------------------------------------- planning


def _costs(plan: PartitionPlan) -> list[SegmentCosts]:
    return [
        SegmentCosts(c.cut_index, tuple(c.tensors), c.bytes, c.output_bytes, c.head_ms, c.tail_ms, c.fission)
        for c in plan.candidates
    ]


def _repriced(plan: PartitionPlan, link_class: DeviceClass, policy: Policy) -> PartitionPlan:
    """``plan``'s own measurements priced for another link and policy (only the link's cost changes)."""
    repriced = plan_from_costs(
        _costs(plan),
        model_digest=plan.model_digest,
        device_class=link_class,
        policy=policy,
        tail_measured_on=plan.tail_measured_on,
        runs=plan.runs,
        max_tensors=plan.max_tensors,
    )
    measured = {c.key: c.measured_ms for c in plan.candidates}
    candidates = []
    for candidate in repriced.candidates:
        ms = measured[candidate.key]
        assert ms is not None  # the plan was made with measure=True
        update = {"measured_ms": ms, "measured_latency_ms": ms + candidate.transfer_ms}
        candidates.append(candidate.model_copy(update=update))
    return repriced.model_copy(update={"candidates": candidates})


def _cut_summary(candidate: Candidate) -> dict[str, Any]:
    return {
        "cut_index": candidate.cut_index,
        "fission": candidate.fission.model_dump(mode="json") if candidate.fission is not None else None,
        "label": candidate.label,
        "tensors": candidate.tensors,
        "bytes": candidate.bytes,
        "measured_latency_ms": candidate.measured_latency_ms,
    }


def _by_key(plan: PartitionPlan, key: tuple[int | None, str | None]) -> Candidate:
    return next(c for c in plan.candidates if c.key == key)


CONFIRM_PASSES: Final = 5
CONFIRM_CONTENDERS: Final = 3


def _confirmed_planner_vs_best(
    model: onnx.ModelProto,
    plan: PartitionPlan,
    link_class: DeviceClass,
    feed: Mapping[str, np.ndarray],
    config: PartitionBenchConfig,
) -> float:
    """Measured latency of the planner's cut / the best cut's, confirmed by re-measuring the contenders.

    The single pass over every candidate measures them one after another, seconds apart, on a shared
    machine. So the chosen cut and the fastest few are measured again, back to back, in several
    passes, and the ratio is the median of the per-pass ratios.
    """
    ranked = sorted(
        (c for c in plan.candidates if c.measured_latency_ms is not None), key=lambda c: c.measured_latency_ms or 0.0
    )
    contenders = {plan.chosen.key: plan.chosen}
    for candidate in ranked[:CONFIRM_CONTENDERS]:
        contenders.setdefault(candidate.key, candidate)
    subset = plan.model_copy(update={"candidates": list(contenders.values())})
    ratios = []
    for _ in range(CONFIRM_PASSES):
        again = measure_candidates(model, subset, link_class, inputs=feed, runs=config.runs, warmup=config.warmup)
        latency = {c.key: c.measured_latency_ms or 0.0 for c in again.candidates}
        ratios.append(latency[plan.chosen.key] / min(latency.values()))
    return statistics.median(ratios)


def _slow_link(fast_throughput: PartitionPlan, fast_latency: PartitionPlan, slow: PartitionPlan) -> dict[str, Any]:
    """Where the latency planner cuts on the slow link, against the cuts it makes on the fast one."""
    slow_split = choose([c for c in slow.candidates if c.is_split], "latency")
    fast_split = choose([c for c in fast_latency.candidates if c.is_split], "latency")
    deployed = fast_throughput.chosen
    deployed_on_slow = _by_key(slow, deployed.key)
    assert slow_split.measured_latency_ms is not None
    assert deployed_on_slow.measured_latency_ms is not None
    smallest = min(c.bytes for c in slow.candidates if c.is_split)
    return {
        "link": slow.link.model_dump(mode="json", by_alias=True),
        # Every cut of a plain MLP crosses a full hidden layer: then there is nowhere smaller to move to.
        "smaller_cut_exists": smallest <= SLOW_LINK_BYTES_TARGET * deployed.bytes,
        "fast_link_cut": _cut_summary(deployed),
        "fast_link_latency_cut": _cut_summary(fast_split),
        "slow_link_cut": _cut_summary(slow_split),
        "slow_link_planner_choice": _cut_summary(slow.chosen),
        "fast_link_cut_on_slow_link": _cut_summary(deployed_on_slow),
        "bytes_slow_vs_fast": slow_split.bytes / deployed.bytes if deployed.bytes else 0.0,
        "measured_slow_cut_vs_fast_cut": slow_split.measured_latency_ms / deployed_on_slow.measured_latency_ms,
    }


# ----------------------------------------------------------------------------------------- a model


def _measure_cuts(
    model: onnx.ModelProto, plan: PartitionPlan, feed: Mapping[str, np.ndarray], config: PartitionBenchConfig
) -> list[dict[str, Any]]:
    rows = []
    for candidate in plan.candidates:
        row: dict[str, Any] = candidate.model_dump(mode="json")
        row["label"] = candidate.label
        if candidate.is_split:
            parts = _split_parts(model, plan, candidate)
            with _pipelined(parts, LocalStage(parts.tail, [CPU_EP], 1, label="tail")) as executor:
                row["pipelined"] = _open_pipeline(lambda: executor.submit(feed), config.requests, config.warmup)
        rows.append(row)
    return rows


def _variants(
    model: onnx.ModelProto,
    parts: _Split,
    feed: Mapping[str, np.ndarray],
    config: PartitionBenchConfig,
    server: str | None,
    models_dir: Path,
) -> tuple[dict[str, dict[str, float]], dict[str, list[dict[str, float]]], dict[str, float]]:
    """Throughput of the whole model and of the chosen cut's executors (median and every round), and how
    far their outputs are from the whole's.

    Also what bounds the pipeline: head and tail each alone (``stages_alone``: the slower one's pace
    is the most a pipeline of them can reach) and both looping at once on two threads without
    hand-over (``stages_together``: the same, once the stages share the machine).
    """
    whole_bytes = model.SerializeToString()
    one_core = LocalStage(whole_bytes, [CPU_EP], 1, label="whole")
    two_cores = LocalStage(whole_bytes, [CPU_EP], 2, label="whole")
    expected = one_core.run(feed)
    sequential = SequentialExecutor(
        LocalStage(parts.head, [CPU_EP], 1, label="head"),
        LocalStage(parts.tail, [CPU_EP], 1, label="tail"),
        forwarded=parts.forwarded,
        outputs=parts.outputs,
        tail_inputs=parts.tail_inputs,
    )
    pipelines = {"pipelined": _pipelined(parts, LocalStage(parts.tail, [CPU_EP], 1, label="tail"))}
    head = LocalStage(parts.head, [CPU_EP], 1, label="head")
    tail = LocalStage(parts.tail, [CPU_EP], 1, label="tail")
    head_outputs = head.run(feed)
    available = {**{name: feed[name] for name in parts.forwarded if name in feed}, **head_outputs}
    tail_feed = {name: available[name] for name in parts.tail_inputs}

    def stages_alone() -> dict[str, float]:
        head_ms = 1000.0 / _closed_loop(lambda: head.run(feed), config.requests, config.warmup)["throughput_per_s"]
        tail_ms = 1000.0 / _closed_loop(lambda: tail.run(tail_feed), config.requests, config.warmup)["throughput_per_s"]
        return {"head_ms": head_ms, "tail_ms": tail_ms, "throughput_per_s": 1000.0 / max(head_ms, tail_ms)}

    def stages_together() -> dict[str, float]:
        both = _together(lambda: head.run(feed), lambda: tail.run(tail_feed), config.requests, config.warmup)
        return {"head_ms": both["first_ms"], "tail_ms": both["second_ms"], "throughput_per_s": both["throughput_per_s"]}

    with contextlib.ExitStack() as stack:
        stack.callback(sequential.close)
        for executor in pipelines.values():
            stack.callback(executor.close)
        if server is not None:
            pipelines["pipelined_remote"] = _pipelined(parts, RemoteStage(server, parts.tail, models_dir=models_dir))
            stack.callback(pipelines["pipelined_remote"].close)
        check = {name: _max_abs_diff(expected, p.submit(feed).result()) for name, p in pipelines.items()}
        rounds: dict[str, list[dict[str, float]]] = {}
        for _ in range(config.rounds):
            # Interleaved, so a noisy neighbour on the machine hurts every variant alike; the pipelines
            # right after the one-core baseline their main figure is judged against.
            figures = {"whole_one_core": _closed_loop(lambda: one_core.run(feed), config.requests, config.warmup)}
            for name, executor in pipelines.items():
                figures[name] = _open_pipeline(functools.partial(executor.submit, feed), config.requests, config.warmup)
            figures["whole_two_cores"] = _closed_loop(lambda: two_cores.run(feed), config.requests, config.warmup)
            figures["sequential"] = _closed_loop(lambda: sequential.run_timed(feed), config.requests, config.warmup)
            figures["stages_alone"] = stages_alone()
            figures["stages_together"] = stages_together()
            for name, figure in figures.items():
                rounds.setdefault(name, []).append(figure)
    return {name: _median_rounds(r) for name, r in rounds.items()}, rounds, check


def _model_run(
    spec: BenchModel,
    config: PartitionBenchConfig,
    server: str | None,
    models_dir: Path,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    model = bench_model(spec)
    feed = example_inputs(model)
    fast = device_class(FAST_LINK_MBPS, FAST_LINK_LATENCY_US, "bench-fast-link")
    slow = device_class(SLOW_LINK_MBPS, SLOW_LINK_LATENCY_US, "bench-slow-link")
    progress(f"  {spec.name}: profiling every cut")
    plan = plan_partition(
        model, fast, policy="throughput", inputs=feed, runs=config.runs, warmup=config.warmup, measure=True
    )
    chosen = plan.chosen
    if not chosen.is_split:
        raise PartitionBenchError(f"{spec.name}: the throughput planner does not split it; nothing to pipeline")
    parts = _split_parts(model, plan, chosen)
    results, rounds, check = _variants(model, parts, feed, config, server, models_dir)
    progress(f"  {spec.name}: pipelined throughput of every cut")
    cuts = _measure_cuts(model, plan, feed, config)
    latency_plan = _repriced(plan, fast, "latency")
    slow_plan = _repriced(plan, slow, "latency")
    measured = [c.measured_latency_ms for c in latency_plan.candidates if c.measured_latency_ms is not None]
    chosen_latency = latency_plan.chosen.measured_latency_ms
    assert chosen_latency is not None
    best_pipelined = max(r["pipelined"]["throughput_per_s"] for r in cuts if "pipelined" in r)
    chosen_pipelined = next(r["pipelined"]["throughput_per_s"] for r in cuts if r["label"] == chosen.label)
    document: dict[str, Any] = {
        "model": spec.name,
        "batch": spec.batch,
        "description": SAMPLES[spec.name].description,
        "weights": "untrained (timing only)",
        "whole_model_ms": results["whole_one_core"]["p50_ms"],
        "chosen_cut": {
            "policy": "throughput",
            "cut_index": chosen.cut_index,
            "fission": chosen.fission.model_dump(mode="json") if chosen.fission is not None else None,
            "label": chosen.label,
            "tensors": chosen.tensors,
            "bytes": chosen.bytes,
            "predicted_speedup": chosen.throughput_per_s / _by_key(plan, (None, None)).throughput_per_s,
        },
        **results,
        "max_abs_diff_vs_whole": check,
        "pipelined_vs_one_core": _round_ratio(rounds, "pipelined", "whole_one_core"),
        "pipelined_vs_two_cores": _round_ratio(rounds, "pipelined", "whole_two_cores"),
        "sequential_vs_one_core": _round_ratio(rounds, "sequential", "whole_one_core"),
        "stages_alone_vs_one_core": _round_ratio(rounds, "stages_alone", "whole_one_core"),
        "stages_together_vs_one_core": _round_ratio(rounds, "stages_together", "whole_one_core"),
        "planner_vs_best": _confirmed_planner_vs_best(model, latency_plan, fast, feed, config),
        "planner_vs_best_single_pass": chosen_latency / min(measured),
        "planner_latency_cut": _cut_summary(latency_plan.chosen),
        "planner_vs_best_throughput": best_pipelined / chosen_pipelined,
        "cuts": cuts,
        "slow_link": _slow_link(plan, latency_plan, slow_plan),
    }
    if "pipelined_remote" in results:
        document["pipelined_remote_vs_one_core"] = _round_ratio(rounds, "pipelined_remote", "whole_one_core")
    document["targets"] = [
        Target(
            "pipelined_vs_one_core", document["pipelined_vs_one_core"], PIPELINED_VS_ONE_CORE_TARGET, True
        ).as_dict(),
        Target("planner_vs_best", document["planner_vs_best"], PLANNER_VS_BEST_TARGET, False).as_dict(),
    ]
    if document["slow_link"]["smaller_cut_exists"]:
        document["targets"] += [
            Target(
                "slow_link_bytes_vs_fast", document["slow_link"]["bytes_slow_vs_fast"], SLOW_LINK_BYTES_TARGET, False
            ).as_dict(),
            Target(
                "slow_link_measured_vs_fast_cut", document["slow_link"]["measured_slow_cut_vs_fast_cut"], 1.0, False
            ).as_dict(),
        ]
    return document


# Figures that are medians over a model's runs; every run's value is kept in ``runs``.
REPEATED_FIGURES: Final = (
    "pipelined_vs_one_core",
    "pipelined_vs_two_cores",
    "sequential_vs_one_core",
    "stages_alone_vs_one_core",
    "stages_together_vs_one_core",
    "pipelined_remote_vs_one_core",
    "planner_vs_best",
    "planner_vs_best_single_pass",
    "planner_vs_best_throughput",
)


def combined(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One model's runs as one document.

    It is the run with the median pipelined / one-core ratio, with every ratio replaced by its median
    over the runs, each run's figures under ``runs``, and each target judged on the median of its
    per-run values (``runs_met`` says in how many runs it held). Medians are the lower median, so
    each is one run's value. The shown run's throughputs and cuts stay as measured, so its table row
    is one real run, and its pipelined / one-core ratio is the median itself.
    """
    if not runs:
        raise ValueError("no runs to combine")
    # The lower median throughout: for an even number of runs it is still one run's value, so the
    # shown run's own ratio is the median the targets are judged on.
    ordered = sorted(runs, key=lambda r: float(r["pipelined_vs_one_core"]))
    document = dict(ordered[(len(ordered) - 1) // 2])
    document["repeats"] = len(runs)
    document["runs"] = [
        {
            **{figure: r[figure] for figure in REPEATED_FIGURES if figure in r},
            "whole_model_ms": r["whole_model_ms"],
            "chosen_cut": r["chosen_cut"]["label"],
        }
        for r in runs
    ]
    for figure in REPEATED_FIGURES:
        values = [float(r[figure]) for r in runs if figure in r]
        if len(values) == len(runs):
            document[figure] = statistics.median_low(values)
    # A target some runs lack (the slow-link ones need a smaller cut, which depends on the run's
    # chosen cut) is judged on the runs that have it; ``runs`` says how many.
    rules: dict[str, Mapping[str, Any]] = {}
    for r in runs:
        for target in r["targets"]:
            rules.setdefault(target["name"], target)
    targets = []
    for name, rule in rules.items():
        values = [float(t["value"]) for r in runs for t in r["targets"] if t["name"] == name]
        judged = Target(name, statistics.median_low(values), rule["bound"], rule["rule"] == ">=")
        held = sum(Target(name, v, judged.bound, judged.at_least).met for v in values)
        targets.append({**judged.as_dict(), "runs_met": held, "runs": len(values)})
    document["targets"] = targets
    return document


def run(config: PartitionBenchConfig, *, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every model of ``config`` ``config.repeat`` times; the results document.

    The runs take turns (every model once, then every model again), so each model's runs are spread
    over the whole benchmark and a slow minute of the machine does not fall on one model's runs only.
    """
    if config.repeat < 1:
        raise PartitionBenchError(f"repeat must be at least 1, not {config.repeat}")
    started = time.perf_counter()
    runs: list[list[dict[str, Any]]] = [[] for _ in config.models]
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-partition-") as scratch:
        models_dir = Path(scratch) / "models"
        models_dir.mkdir()
        with contextlib.ExitStack() as stack:
            server = None
            if config.remote:
                server = stack.enter_context(accel_server(models_dir, Path(scratch) / "accel-server.log"))
            for repeat in range(config.repeat):
                for index, spec in enumerate(config.models):
                    progress(f"running {spec.name} (batch {spec.batch}), run {repeat + 1} of {config.repeat} ...")
                    runs[index].append(_model_run(spec, config, server, models_dir, progress))
    results = [combined(model_runs) for model_runs in runs]
    facts = machine()
    facts["threads_per_session"] = "1 (2 for whole_two_cores)"
    return {
        "benchmark": "partition",
        "quick": config.quick,
        "machine": facts,
        "accelerator": STAND_IN,
        "fast_link": {"bandwidthMBps": FAST_LINK_MBPS, "latencyMicroseconds": FAST_LINK_LATENCY_US},
        "slow_link": {"bandwidthMBps": SLOW_LINK_MBPS, "latencyMicroseconds": SLOW_LINK_LATENCY_US},
        "requests": config.requests,
        "rounds": config.rounds,
        "repeat": config.repeat,
        "runs": config.runs,
        "seconds": round(time.perf_counter() - started, 1),
        "models": results,
    }


def missed(document: Mapping[str, Any]) -> list[str]:
    """``model: target`` for every target the run missed."""
    return [f"{m['model']}: {t['name']}" for m in document["models"] for t in m["targets"] if not t["met"]]


def markdown(document: Mapping[str, Any]) -> str:
    """The BENCHMARKS.md section for a results document."""
    m = document["machine"]
    lines = [
        f"Measured on {m['cpu']} ({m['cores']} cores), ONNX Runtime {m['onnxruntime']}, one intra-op thread per "
        f"session (two for the two-core whole model); throughput is the median of {document['rounds']} interleaved "
        f"rounds of {document['requests']} requests{' — quick run' if document['quick'] else ''}. "
        f"{document['accelerator']} Untrained weights; a request is a batch of 8x8 images.",
        "",
        *_repeats_note(document),
        "| model | batch | ms/request | 1 core req/s | 2 cores req/s | sequential req/s | pipelined req/s "
        "| remote req/s | pipelined / 1 core | pipelined / 2 cores | cut (bytes) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in document["models"]:
        remote = r.get("pipelined_remote", {}).get("throughput_per_s")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['whole_model_ms']:.2f} "
            f"| {r['whole_one_core']['throughput_per_s']:.0f} "
            f"| {r['whole_two_cores']['throughput_per_s']:.0f} | {r['sequential']['throughput_per_s']:.0f} "
            f"| {r['pipelined']['throughput_per_s']:.0f} | {'—' if remote is None else f'{remote:.0f}'} "
            f"| {r['pipelined_vs_one_core']:.2f}x | {r['pipelined_vs_two_cores']:.2f}x "
            f"| {r['chosen_cut'].get('label', '')}: {', '.join(r['chosen_cut']['tensors'])} "
            f"({r['chosen_cut']['bytes']}) |"
        )
    lines += [
        "",
        f"Slow link ({document['slow_link']['bandwidthMBps']} MB/s): the cut deployed on the fast link (the "
        "throughput plan's) against where the latency planner cuts on the slow link, and their measured latency "
        "on the slow link (head then tail here, plus the modelled transfer).",
        "",
        "| model | fast-link cut (bytes) | slow-link cut (bytes) | slow link: fast cut ms | slow link: slow cut ms "
        "| planner vs best (latency) |",
        "|---|---|---|---|---|---|",
    ]
    for r in document["models"]:
        s = r["slow_link"]
        lines.append(
            f"| {r['model']} | {', '.join(s['fast_link_cut']['tensors'])} ({s['fast_link_cut']['bytes']}) "
            f"| {', '.join(s['slow_link_cut']['tensors'])} ({s['slow_link_cut']['bytes']}) "
            f"| {s['fast_link_cut_on_slow_link']['measured_latency_ms']:.2f} "
            f"| {s['slow_link_cut']['measured_latency_ms']:.2f} | {r['planner_vs_best']:.3f} |"
        )
    lines += [
        "",
        "Where the 2x goes, against the whole model on one core: head then tail (sequential); the slower of head "
        "and tail, each timed alone (the most any pipeline of them can reach); both looping at once on the two "
        "cores with no hand-over (the same, once they share the machine); the pipeline.",
        "",
        "| model | sequential | stages alone | stages together | pipelined |",
        "|---|---|---|---|---|",
    ]
    for r in document["models"]:
        cells = [
            "—" if figure not in r else f"{r[figure]:.2f}x"
            for figure in (
                "sequential_vs_one_core",
                "stages_alone_vs_one_core",
                "stages_together_vs_one_core",
                "pipelined_vs_one_core",
            )
        ]
        lines.append(f"| {r['model']} | {' | '.join(cells)} |")
    lines += ["", "| model | figure | value | target | met | runs met |", "|---|---|---|---|---|---|"]
    for r in document["models"]:
        for t in r["targets"]:
            held = f"{t['runs_met']} of {t['runs']}" if "runs_met" in t else "—"
            lines.append(
                f"| {r['model']} | {t['name']} | {t['value']:.3f} | {t['rule']} {t['bound']} "
                f"| {'yes' if t['met'] else '**no**'} | {held} |"
            )
    return "\n".join(lines)


def _repeats_note(document: Mapping[str, Any]) -> list[str]:
    """With several runs per model: how they combine, and every run's pipelined / one-core ratio and cut."""
    repeat = int(document.get("repeat", 1))
    if repeat < 2:
        return []
    lines = [
        f"Each model was run {repeat} times, planner included, the models taking turns. A row below is the run "
        "with the median pipelined / one-core ratio; every ratio shown is the median over the runs, and a target "
        "is judged on that median. Every run's pipelined / one-core ratio, and the cut its planner chose:",
        "",
        "| model | " + " | ".join(f"run {i + 1}" for i in range(repeat)) + " | median |",
        "|---|" + "---|" * (repeat + 1),
    ]
    for r in document["models"]:
        cells = [f"{run['pipelined_vs_one_core']:.2f}x ({run['chosen_cut']})" for run in r.get("runs", [])]
        lines.append(f"| {r['model']} | {' | '.join(cells)} | {r['pipelined_vs_one_core']:.2f}x |")
    return [*lines, ""]


def benchmark(
    config: PartitionBenchConfig,
    out: Path,
    markdown_file: Path | None,
    *,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run, then write the JSON results and the ``bench:partition`` section of ``markdown_file``."""
    document = run(config, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results(document, out, markdown_file, mark="partition", table=markdown(document))
    return document
