"""``edgefleet bench operator``: what kopf and the Kubernetes API add to a reconcile, in one run.

Reconcile overhead without the pipeline: every EdgeModel's builds are published before anything is
timed (the first reconcile of each model builds and publishes them), so each timed reconcile adopts
its published variants and steps its rollout, which is what a resync or a restart costs. Two ways,
same machine, same run, same models, same store, same worker count:

* **baseline**: :class:`~edgefleet_operator.reconcile.edge_model.EdgeModelReconciler` alone, the
  models handed over as typed objects, ``workers`` reconciles at a time; timed before and after the
  operator run (their mean is the baseline, their spread shows the machine's drift), each time with
  a reconciler built afresh as the operator builds its own (nothing remembered: every published
  build is looked up in the signed repository). The same reconciler's second pass, which remembers
  what it adopted, is reported as ``baseline_warm_reconciles_per_s``;
* **operator**: the real kopf operator (:func:`edgefleet_operator.kopf_app.serve`, in a thread of
  this process) against the test API server (``edgefleet_operator.devtools.kube_api``, a process of
  its own, as a real API server is): the models are created over HTTP and a watch observes when each
  one's status is patched with its variants (event → handler → status patch, seen by a client).

``reconciles_per_s`` is models settled per second through the operator; ``ratio_vs_baseline`` is it
divided by the baseline's. The source model is a small MLP made here (no training) and the recipe
GraphOptimization only: the builds are primed, so neither shows in the timed figures.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import logging
import math
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet_core.bench.measure import machine
from edgefleet_core.bench.pipeline import noisy_machine_note, write_results
from edgefleet_core.bundle.publisher import Publisher
from edgefleet_core.errors import EdgeFleetError
from edgefleet_core.resources.base import API_GROUP, API_VERSION
from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import EdgeModel
from edgefleet_core.resources.loading import parse_resource
from edgefleet_core.signing.keys import KeySet
from edgefleet_operator.devtools.kube_api.client import KubeClient, WatchStream
from edgefleet_operator.devtools.kube_api.process import KubeApiStartError, SpawnedKubeApi, spawned_kube_api
from edgefleet_operator.kopf_app import KopfSettings, serve
from edgefleet_operator.reconcile.edge_model import EdgeModelReconciler, ReconcileResult
from edgefleet_operator.reconcile.status import STALLED, is_true
from edgefleet_operator.runtime import OperatorSettings, load_keys, open_artifact_store, reconciler_pool

MARK: Final = "operator"
NAMESPACE: Final = "bench"
CLASS_NAMES: Final = ("bench-cpu-a", "bench-cpu-b")
"""Two classes per model: each reconcile adopts two variants and steps two rollouts."""
GROUP_VERSION: Final = f"{API_GROUP}/{API_VERSION}"
EDGEMODELS_PATH: Final = f"/apis/{GROUP_VERSION}/namespaces/{NAMESPACE}/edgemodels"
DEVICECLASSES_PATH: Final = f"/apis/{GROUP_VERSION}/deviceclasses"
OPERATOR_READY_S: Final = 60.0
"""Operator start-up: kopf, the reconciler (keys, store, repository), the first watches."""
POLL_S: Final = 0.05
WRITE_VERBS: Final = frozenset({"create", "update", "patch", "delete"})
KOPF_REACTOR_LOGGER: Final = "kopf._core.reactor.running"


class OperatorBenchError(EdgeFleetError):
    """The benchmark could not run (not a slow figure): the server or the operator did not start, a model stalled."""


@dataclass(frozen=True)
class OperatorBenchConfig:
    """Sizes of one run; :meth:`full` and :meth:`quick_run` are the two the CLI offers."""

    models: int
    """EdgeModels reconciled in each timed pass (each targets every class of :data:`CLASS_NAMES`)."""
    workers: int
    """Reconciles (and builds) at a time, in the baseline and in the operator alike."""
    quick: bool
    settle_timeout_s: float
    """How long the operator pass may take before the run is declared failed."""

    @classmethod
    def full(cls, models: int | None = None, workers: int | None = None) -> OperatorBenchConfig:
        count = models or 60
        return cls(count, workers or 2, quick=False, settle_timeout_s=60.0 + count)

    @classmethod
    def quick_run(cls, models: int | None = None, workers: int | None = None) -> OperatorBenchConfig:
        count = models or 12
        return cls(count, workers or 2, quick=True, settle_timeout_s=30.0 + count)


# ---------------------------------------------------------------------------------- inputs


def source_model(seed: int = 0) -> bytes:
    """A small MLP (64 → 32 → 10, digits-shaped input) with fixed random weights: enough for the pipeline."""
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.standard_normal((64, 32)).astype(np.float32) * 0.1,
        "b1": np.zeros(32, np.float32),
        "w2": rng.standard_normal((32, 10)).astype(np.float32) * 0.1,
        "b2": np.zeros(10, np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bench-mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def device_class_document(name: str) -> dict[str, Any]:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "DeviceClass",
        "metadata": {"name": name},
        "spec": {
            "description": "edgefleet bench operator: a CPU-only class.",
            "cpu": {"arch": "x86_64", "cores": 2},
            "memory": "1Gi",
            "precisions": ["fp32"],
            "selector": {"matchLabels": {"edgefleet.io/hardware": name}},
        },
    }


def model_name(index: int) -> str:
    return f"bench-{index:04d}"


def edge_model_document(name: str, source_uri: str, sha256: str) -> dict[str, Any]:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "EdgeModel",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "source": {"uri": source_uri, "sha256": sha256},
            "task": "classification",
            "targets": {"deviceClasses": list(CLASS_NAMES)},
            "optimization": {"recipe": {"passes": [{"type": "GraphOptimization"}]}},
            "partition": {"policy": "off"},
        },
    }


def _parsed_models(documents: Sequence[Mapping[str, Any]]) -> list[EdgeModel]:
    parsed = [parse_resource(d, f"EdgeModel {d['metadata']['name']}") for d in documents]
    return [m for m in parsed if isinstance(m, EdgeModel)]


def _parsed_classes(documents: Sequence[Mapping[str, Any]]) -> list[DeviceClass]:
    parsed = [parse_resource(d, f"DeviceClass {d['metadata']['name']}") for d in documents]
    return [c for c in parsed if isinstance(c, DeviceClass)]


# ---------------------------------------------------------------------------------- measuring


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def _variants(status: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """deviceClass → (version, digest) of a status in its wire form."""
    return {v["deviceClass"]: (v["version"], v["digest"]) for v in status.get("variants") or []}


def _check_results(results: Sequence[ReconcileResult], models: Sequence[EdgeModel], what: str) -> None:
    for model, result in zip(models, results, strict=True):
        name = model.metadata.name
        if is_true(result.status.conditions, STALLED):
            raise OperatorBenchError(f"{what}: EdgeModel {name} stalled: {result.status.conditions}")
        got = sorted(v.device_class for v in result.status.variants or [])
        if got != sorted(CLASS_NAMES):
            raise OperatorBenchError(f"{what}: EdgeModel {name} has variants for {got}, not {list(CLASS_NAMES)}")


def reconcile_all(
    reconciler: EdgeModelReconciler, models: Sequence[EdgeModel], classes: Sequence[DeviceClass], workers: int
) -> tuple[float, list[ReconcileResult]]:
    """Seconds to reconcile every model, ``workers`` at a time, and the results in model order."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-reconcile") as calls:
        started = time.perf_counter()
        results = list(calls.map(lambda m: reconciler.reconcile(m, classes), models))
        return time.perf_counter() - started, results


class _ExpectedSignalsNote(logging.Filter):
    """kopf warns that it cannot install signal handlers off the main thread: expected, the bench stops it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("OS signals are ignored: running not in the main thread")


class _OperatorThread:
    """The real operator (``kopf_app.serve``) on an event loop of its own, stopped through its stop flag."""

    def __init__(self, settings: OperatorSettings, kopf_settings: KopfSettings) -> None:
        self._settings, self._kopf_settings = settings, kopf_settings
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-operator", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(OPERATOR_READY_S):
            raise OperatorBenchError(f"the operator did not get ready within {OPERATOR_READY_S:.0f} s")
        if self._failure is not None or not self._thread.is_alive():
            raise OperatorBenchError(f"the operator did not start: {self._failure!r}") from self._failure

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(OPERATOR_READY_S)
        if self._thread.is_alive():
            raise OperatorBenchError("the operator did not stop")
        if self._failure is not None:
            raise OperatorBenchError(f"the operator failed: {self._failure!r}") from self._failure

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001  (reported by start() and stop() in the bench's thread)
            self._failure = exc
        finally:
            self._ready.set()  # a failed start must not leave start() waiting

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop, ready = asyncio.Event(), asyncio.Event()

        async def relay() -> None:
            await ready.wait()
            self._ready.set()

        relaying = asyncio.create_task(relay())
        try:
            await serve(self._settings, self._kopf_settings, stop_flag=self._stop, ready_flag=ready)
        finally:
            relaying.cancel()


@contextmanager
def _operator(settings: OperatorSettings, kopf_settings: KopfSettings) -> Iterator[None]:
    running = _OperatorThread(settings, kopf_settings)
    note, reactor_log = _ExpectedSignalsNote(), logging.getLogger(KOPF_REACTOR_LOGGER)
    reactor_log.addFilter(note)
    try:
        running.start()
        try:
            yield
        finally:
            running.stop()
    finally:
        reactor_log.removeFilter(note)


def _audit(client: KubeClient) -> list[dict[str, Any]]:
    reply = client.get("/_kube_api/audit")
    records: list[dict[str, Any]] = reply.body
    return records


def _wait_for_watches(client: KubeClient, deadline: float) -> None:
    """Until the operator watches EdgeModels and DeviceClasses: models created earlier would come as a listing."""
    while time.monotonic() < deadline:
        watched = {r["resource"] for r in _audit(client) if r["verb"] == "watch"}
        if {"edgemodels", "deviceclasses"} <= watched:
            return
        time.sleep(POLL_S)
    raise OperatorBenchError("the operator never opened its watches")


def _settled(obj: Mapping[str, Any]) -> bool:
    status = obj.get("status") or {}
    return status.get("observedGeneration") == obj["metadata"].get("generation") and sorted(
        _variants(status)
    ) == sorted(CLASS_NAMES)


def _observe(stream: WatchStream, names: set[str], settled: dict[str, float], statuses: dict[str, Any]) -> None:
    """Record when each model's status first shows its variants for its generation (a client's view)."""
    try:
        while len(settled) < len(names):
            event = stream.next()
            if event is None:
                return
            obj = event.get("object") or {}
            name = obj.get("metadata", {}).get("name")
            if name in names and name not in settled and _settled(obj):
                settled[name] = time.perf_counter()
                statuses[name] = obj["status"]
    except (TimeoutError, OSError, http.client.HTTPException, ValueError):
        return  # the stream ended early or was closed: the pass reports the models that did not settle


@dataclass(frozen=True)
class OperatorPass:
    seconds: float
    latencies_s: list[float]
    statuses: dict[str, Any]
    requests: Counter[str]
    errors: Counter[str]
    events: Counter[str]


def operator_pass(
    api: SpawnedKubeApi,
    settings: OperatorSettings,
    class_documents: Sequence[Mapping[str, Any]],
    model_documents: Sequence[Mapping[str, Any]],
    config: OperatorBenchConfig,
) -> OperatorPass:
    """Create the models with the operator running; seconds until the last status is observed."""
    client = KubeClient(api.url)
    for path, body in [
        ("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
        *((DEVICECLASSES_PATH, d) for d in class_documents),
    ]:
        reply = client.post(path, body)
        if reply.status != 201:
            raise OperatorBenchError(f"the API server refused {path}: {reply.status} {reply.body}")
    identity = f"bench-operator@{os.getpid()}"
    kopf_settings = KopfSettings(server=api.url, identity=identity)
    names = {d["metadata"]["name"] for d in model_documents}
    settled: dict[str, float] = {}
    statuses: dict[str, Any] = {}
    created: dict[str, float] = {}
    with _operator(settings, kopf_settings):
        _wait_for_watches(client, time.monotonic() + OPERATOR_READY_S)
        with client.watch(EDGEMODELS_PATH, timeout=config.settle_timeout_s) as stream:
            observer = threading.Thread(target=_observe, args=(stream, names, settled, statuses), name="bench-watch")
            observer.start()
            started = time.perf_counter()
            for document in model_documents:
                created[document["metadata"]["name"]] = time.perf_counter()
                reply = client.post(EDGEMODELS_PATH, document)
                if reply.status != 201:
                    raise OperatorBenchError(f"the API server refused an EdgeModel: {reply.status} {reply.body}")
            observer.join(config.settle_timeout_s)
        observer.join(OPERATOR_READY_S)  # the stream is closed now: the observer ends if it had not
        missing = sorted(names - settled.keys())
        if missing:
            raise OperatorBenchError(
                f"{len(missing)} of {len(names)} EdgeModels were not reconciled within "
                f"{config.settle_timeout_s:.0f} s (first: {missing[0]})"
            )
        seconds = max(settled.values()) - started
        ours = [r for r in _audit(client) if identity in r.get("user_agent", "")]
    events = client.get(f"/api/v1/namespaces/{NAMESPACE}/events").body.get("items", [])
    return OperatorPass(
        seconds=seconds,
        latencies_s=[settled[n] - created[n] for n in sorted(names)],
        statuses=statuses,
        requests=Counter(_request_name(r) for r in ours),
        errors=Counter(f"{_request_name(r)} {r['code']}" for r in ours if r["code"] >= 400),
        events=Counter(str(e.get("reason")) for e in events),
    )


def _request_name(record: Mapping[str, Any]) -> str:
    what = record["resource"] or record["path"]
    return f"{record['verb']} {what}{'/' + record['subresource'] if record['subresource'] else ''}"


# ---------------------------------------------------------------------------------- the run


def run(config: OperatorBenchConfig, progress: Callable[[str], object] = print) -> dict[str, Any]:
    """The whole benchmark; the results document."""
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-operator-") as scratch:
        root = Path(scratch)
        KeySet.generate().save(root / "keys")
        data = source_model()
        (root / "models").mkdir()
        (root / "models" / "mlp.onnx").write_bytes(data)
        sha256 = hashlib.sha256(data).hexdigest()
        settings = OperatorSettings(
            store_url=(root / "store").as_uri(),
            keys_dir=root / "keys",
            cache_dir=root / "cache",
            workers=config.workers,
        )
        class_documents = [device_class_document(n) for n in CLASS_NAMES]
        model_documents = [
            edge_model_document(model_name(i), (root / "models" / "mlp.onnx").as_uri(), sha256)
            for i in range(config.models)
        ]
        classes = _parsed_classes(class_documents)

        def timed(what: str, reconciler: EdgeModelReconciler) -> tuple[float, dict[str, dict[str, Any]]]:
            models = _parsed_models(model_documents)
            seconds, results = reconcile_all(reconciler, models, classes, config.workers)
            _check_results(results, models, what)
            return seconds, {m.metadata.name: _wire(r) for m, r in zip(models, results, strict=True)}

        progress(f"priming: building and publishing {config.models} x {len(CLASS_NAMES)} variants")
        with reconciler_pool(settings) as (reconciler, _):
            prime_s, statuses = timed("priming", reconciler)
        published = {name: _variants(status) for name, status in statuses.items()}

        # Each timed pass starts a reconciler afresh, as the operator does when it starts: nothing of
        # the priming is remembered in memory, every build is found in the signed repository.
        progress("baseline: the reconciler alone")
        with reconciler_pool(settings) as (reconciler, _):
            first_s, statuses = timed("baseline", reconciler)
            _same_variants(published, statuses)
            warm_s, statuses = timed("baseline, warm", reconciler)
            _same_variants(published, statuses)

        progress("operator: kopf and the test API server")
        try:
            with spawned_kube_api() as api:
                through = operator_pass(api, settings, class_documents, model_documents, config)
        except KubeApiStartError as exc:
            raise OperatorBenchError(str(exc)) from exc
        _same_variants(published, through.statuses)

        progress("baseline again: the reconciler alone")
        with reconciler_pool(settings) as (reconciler, _):
            second_s, statuses = timed("baseline", reconciler)
            _same_variants(published, statuses)

        adopted = _only_first_versions(settings, [d["metadata"]["name"] for d in model_documents])
    return _document(config, machine_facts(load_before), prime_s, (first_s, second_s), warm_s, through, adopted)


def _wire(result: ReconcileResult) -> dict[str, Any]:
    status: dict[str, Any] = result.status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return status


def _same_variants(published: Mapping[str, dict[str, tuple[str, str]]], statuses: Mapping[str, Any]) -> None:
    """Every pass must report the primed variants: anything else means it built again, or lost some."""
    for name, expected in published.items():
        got = _variants(statuses[name])
        if got != expected:
            raise OperatorBenchError(f"EdgeModel {name}: variants {got}, but the primed ones are {expected}")


def _only_first_versions(settings: OperatorSettings, names: Sequence[str]) -> bool:
    """Whether the repository holds exactly version 1 of every (model, class): the timed passes adopted only."""
    publisher = Publisher(open_artifact_store(settings), load_keys(settings.keys_dir))
    expected = {c: ["1"] for c in CLASS_NAMES}
    return all(publisher.model_versions(NAMESPACE, name) == expected for name in names)


def machine_facts(load_average: float) -> dict[str, Any]:
    return {
        **machine(),
        "kopf": package_version("kopf"),
        "aiohttp": package_version("aiohttp"),
        "load_average_1min_at_start": load_average,
    }


def _document(
    config: OperatorBenchConfig,
    facts: dict[str, Any],
    prime_s: float,
    baseline_s: tuple[float, float],
    warm_s: float,
    through: OperatorPass,
    adopted: bool,
) -> dict[str, Any]:
    n = config.models
    baseline_rates = [n / s for s in baseline_s]
    baseline = statistics.fmean(baseline_rates)
    per_s = n / through.seconds
    latencies_ms = [s * 1000 for s in through.latencies_s]
    requests = dict(sorted(through.requests.items()))
    return {
        "benchmark": MARK,
        "quick": config.quick,
        "machine": facts,
        "setup": {
            "models": n,
            "device_classes": len(CLASS_NAMES),
            "workers": config.workers,
            "api_server": "edgefleet_operator.devtools.kube_api in its own process on loopback",
            "operator": "edgefleet_operator.kopf_app.serve in a thread of the benchmark process",
            "store": "LocalStore (temporary folder)",
            "recipe": "GraphOptimization (primed: every timed reconcile adopts its published variants)",
        },
        "reconciles_per_s": per_s,
        "baseline_reconciles_per_s": baseline,
        "ratio_vs_baseline": per_s / baseline,
        "baseline_runs_per_s": baseline_rates,
        "baseline_warm_reconciles_per_s": n / warm_s,
        "operator_seconds": through.seconds,
        "latency_ms": {
            "p50": _percentile(latencies_ms, 50),
            "p95": _percentile(latencies_ms, 95),
            "max": max(latencies_ms),
        },
        "prime_seconds": prime_s,
        "first_reconcile_per_s": n / prime_s,
        "adopted_only": adopted,
        "api_requests": requests,
        "api_writes_per_model": sum(c for r, c in through.requests.items() if r.split()[0] in WRITE_VERBS) / n,
        "api_errors": dict(sorted(through.errors.items())),
        "events": dict(sorted(through.events.items())),
    }


def markdown(document: Mapping[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    m, setup, latency = document["machine"], document["setup"], document["latency_ms"]
    first, second = document["baseline_runs_per_s"]
    lines = [
        f"Measured on {m['cpu']} ({m['cores']} cores), Python {m['python']}, kopf {m['kopf']}; "
        f"{setup['models']} EdgeModels x {setup['device_classes']} DeviceClasses, {setup['workers']} workers"
        f"{' — quick run' if document['quick'] else ''}.",
        *noisy_machine_note(m["load_average_1min_at_start"]),
        "",
        "| figure | value |",
        "|---|---|",
        f"| reconciles/s through kopf + API server (`reconciles_per_s`) | {document['reconciles_per_s']:.1f} |",
        f"| reconciles/s, reconciler alone (baseline, before {first:.1f} / after {second:.1f}) "
        f"| {document['baseline_reconciles_per_s']:.1f} |",
        f"| ratio operator / baseline | {document['ratio_vs_baseline']:.2f} |",
        f"| reconciles/s, reconciler alone, second pass (adoptions remembered; reported) "
        f"| {document['baseline_warm_reconciles_per_s']:.1f} |",
        f"| create → status observed, p50 / p95 / max ms | {latency['p50']:.0f} / {latency['p95']:.0f} / "
        f"{latency['max']:.0f} |",
        f"| API writes per model by the operator (patches, events) | {document['api_writes_per_model']:.1f} |",
        f"| first reconciles/s (build + publish, not the figure) | {document['first_reconcile_per_s']:.2f} |",
        f"| timed passes only adopted (nothing published twice) | {'yes' if document['adopted_only'] else '**no**'} |",
        "",
        "Operator requests: "
        + ", ".join(f"{name} {count}" for name, count in document["api_requests"].items())
        + (
            "; refused: " + ", ".join(f"{name} x{count}" for name, count in document["api_errors"].items())
            if document["api_errors"]
            else ""
        )
        + ".",
    ]
    return "\n".join(lines)


def benchmark(
    config: OperatorBenchConfig, out: Path, markdown_file: Path | None, progress: Callable[[str], object] = print
) -> dict[str, Any]:
    """Run, then write the JSON results and the ``bench:operator`` section of ``markdown_file``."""
    document = run(config, progress)
    write_results(document, out, markdown_file, mark=MARK, table=markdown(document))
    return document
