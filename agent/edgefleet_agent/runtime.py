"""The models this device serves: ONNX Runtime sessions per version, hot swap, and per-window statistics.

A model version is loaded into a :class:`LoadedModel` — one session for ``model.onnx``, or a head
and a tail session, each with its own thread pool, joined by a :class:`PipelinedExecutor` so
concurrent requests overlap (the head of one runs while the tail of the one before does) — and
self-tested before :meth:`ModelRuntime.activate` swaps it in. The swap is one reference
assignment under a lock: a request picks the version it runs on when it starts and finishes on
those sessions even if a swap happens meanwhile, so a swap drops no request. The version that
was active before stays loaded as the previous one, so requests that pin it keep working.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from edgefleet_agent.accelerator import AcceleratorServer, FailoverStage, stage_id_for
from edgefleet_agent.assignments import SlotName
from edgefleet_agent.errors import (
    InferenceFailed,
    InvalidTensors,
    ModelLoadError,
    ModelNotReady,
    UnknownModel,
)
from edgefleet_agent.metrics import UNKNOWN_MODEL, AgentMetrics, InferenceErrorKind, ServedModel
from edgefleet_agent.pipeline import DEFAULT_DEPTH, LocalStage, PipelinedExecutor
from edgefleet_core.bundle.manifest import BundleManifest
from edgefleet_core.bundle.selftest import ORT_TYPES, SelfTest, check_outputs, generate_inputs
from edgefleet_core.errors import BundleError
from edgefleet_core.optimize.runtime import CPU_EP
from edgefleet_core.partition.plan import PartitionPlan

log = logging.getLogger(__name__)

MAX_LATENCY_SAMPLES: Final = 10_000
"""Latencies kept per model version and window for the percentiles (the most recent ones)."""

ModelState = Literal["loading", "ready", "degraded", "unavailable"]
SelfTestReason = Literal["SelfTestOutputs", "SelfTestLatency", "SelfTestLoad"]
Array = npt.NDArray[Any]


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: name, numpy dtype name (``None`` if not one we carry), shape (``None`` = dynamic)."""

    name: str
    dtype: str | None
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class ModelWindowStats:
    """What one model version did since the previous :meth:`ModelRuntime.drain_windows`."""

    model_namespace: str
    model_name: str
    version: str
    slot: SlotName | None
    inference_count: int
    error_count: int
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    accelerator_fallback_count: int
    started_at: datetime | None = None
    """When the first request of the window this version served started (for an idle entry: when it
    was activated, if during the window); where a report splits its window at a version switch."""


@dataclass(frozen=True)
class Prediction:
    """A served request: the version that ran it, the outputs asked for, and per-stage seconds."""

    version: str
    outputs: list[tuple[str, Array]]
    timings: list[tuple[str, float]]
    """(stage, seconds) in execution order: ``run`` or ``head`` and ``tail``, then ``total``."""


@dataclass(frozen=True)
class SelfTestFailure:
    """Why a version's self-test failed."""

    reason: SelfTestReason
    message: str


@dataclass(frozen=True)
class ModelStatusView:
    """What the runtime serves for one model (for GetModelStatus and `agent status`)."""

    namespace: str
    name: str
    state: ModelState
    active_version: str
    active_slot: SlotName | None
    previous_version: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    partition_plan_id: str
    execution_providers: tuple[str, ...]


def tensor_infos(args: Sequence[Any]) -> tuple[TensorInfo, ...]:
    return tuple(
        TensorInfo(a.name, ORT_TYPES.get(a.type), tuple(d if isinstance(d, int) and d >= 0 else None for d in a.shape))
        for a in args
    )


def read_partition_plan(manifest: BundleManifest | None, label: str) -> PartitionPlan | None:
    """The manifest's partition plan, parsed; ``None`` when there is none or it is not a valid plan.

    ``edgefleet publish`` validates the plan before signing it, so an invalid one is an older or
    hand-made bundle: it still serves (providers are read leniently), only without a plan id.
    """
    document = manifest.partition_plan if manifest is not None else None
    if not document:
        return None
    try:
        return PartitionPlan.model_validate(document)
    except ValidationError as exc:
        log.warning("[%s] the manifest's partition plan is not valid, so it has no plan id: %s", label, exc)
        return None


def _in_plan_order(
    plan: PartitionPlan | None, head: Sequence[Any], tail: Sequence[Any], tail_inputs: Sequence[str]
) -> list[Any]:
    """The served outputs: the whole model's, in its order when the plan records it."""
    # Without the plan's order, head outputs the tail does not read come first (as run_split orders them).
    default = [*(arg for arg in head if arg.name not in tail_inputs), *tail]
    if plan is None or not plan.outputs:
        return default
    # A cut tensor can be a model output too: the plan's names are looked up in both stages.
    by_name = {arg.name: arg for arg in (*head, *tail)}
    if any(name not in by_name for name in plan.outputs):
        return default
    return [by_name[name] for name in plan.outputs]


def _falls_back(stage: LocalStage | FailoverStage, wanted: str) -> bool:
    """Not on the provider it wanted, or (a remote tail) not on the accelerator server."""
    return stage.execution_provider != wanted or (isinstance(stage, FailoverStage) and not stage.attached)


class LoadedModel:
    """The sessions of one model version, ready to run (safe to share between threads).

    One stage runs in the caller's thread. A head and a tail run through a
    :class:`PipelinedExecutor` whose worker threads end once the version is no longer referenced
    (a request that picked it keeps it alive until it finishes), or at :meth:`close`.
    """

    def __init__(
        self,
        namespace: str,
        name: str,
        version: str,
        slot: SlotName | None,
        manifest: BundleManifest | None,
        stages: Sequence[LocalStage | FailoverStage],
        wanted_providers: Sequence[str],
        *,
        depth: int = DEFAULT_DEPTH,
    ) -> None:
        if len(stages) not in (1, 2) or len(wanted_providers) != len(stages):
            raise ValueError("a model is one stage, or a head and a tail, each with the provider it wants")
        self.namespace = namespace
        self.name = name
        self.version = version
        self.slot = slot
        self.manifest = manifest
        self.partition_plan = read_partition_plan(manifest, f"{namespace}/{name} {version}")
        self._plan_id = self.partition_plan.plan_id if self.partition_plan is not None else ""
        self._stages = tuple(stages)
        self._wanted = tuple(wanted_providers)
        roles = ("model",) if len(stages) == 1 else ("head", "tail")
        self.fallbacks = tuple(
            (role, stage.execution_provider)
            for role, stage, want in zip(roles, stages, self._wanted, strict=True)
            if _falls_back(stage, want)
        )
        """(stage, provider it got) of each stage that, when loaded, was not on the provider it wanted (or
        not on the accelerator server the agent was told to use)."""
        self._single: LocalStage | FailoverStage | None = None
        self._pipeline: PipelinedExecutor | None = None
        if len(stages) == 1:
            self._single = stages[0]
            self.inputs = tensor_infos(stages[0].inputs)
            self.outputs = tensor_infos(stages[0].outputs)
            return
        head, tail = stages
        # Tail inputs the head does not compute are graph inputs the tail reads directly (forwarded).
        forwarded = [arg for arg in tail.inputs if arg.name not in head.output_names]
        self.inputs = tensor_infos([*head.inputs, *(a for a in forwarded if a.name not in head.input_names)])
        self.outputs = tensor_infos(_in_plan_order(self.partition_plan, head.outputs, tail.outputs, tail.input_names))
        self._pipeline = PipelinedExecutor(
            head,
            tail,
            depth=depth,
            forwarded=[arg.name for arg in forwarded],
            outputs=[info.name for info in self.outputs],
            tail_inputs=tail.input_names,
        )

    @property
    def execution_providers(self) -> tuple[str, ...]:
        """The provider each stage runs on now (a remote tail's is the server's while it answers)."""
        return tuple(stage.execution_provider for stage in self._stages)

    @property
    def degraded(self) -> bool:
        """A stage runs on a fallback provider (e.g. the CPU while the plan names an accelerator), or
        the tail runs locally because the accelerator server is not answering."""
        return any(_falls_back(stage, want) for stage, want in zip(self._stages, self._wanted, strict=True))

    @property
    def partition_plan_id(self) -> str:
        """:attr:`PartitionPlan.plan_id` of the manifest's plan (sha256 of its canonical JSON); empty without one."""
        return self._plan_id

    def validate(self, inputs: Mapping[str, Array], output_names: Sequence[str]) -> list[str]:
        """Check inputs against the graph; the output names to return. :class:`InvalidTensors` names the problem."""
        expected = {info.name: info for info in self.inputs}
        unknown = sorted(set(inputs) - set(expected))
        missing = sorted(set(expected) - set(inputs))
        if unknown or missing:
            raise InvalidTensors(
                f"model {self.name} takes inputs {sorted(expected)}; unknown {unknown}, missing {missing}"
            )
        for name, value in inputs.items():
            info = expected[name]
            if info.dtype is None or value.dtype.name != info.dtype:
                wanted_type = info.dtype or "a type the API does not carry"
                raise InvalidTensors(f"input {name!r} is {value.dtype.name}; the model takes {wanted_type}")
            if value.ndim != len(info.shape) or any(
                want is not None and got != want for got, want in zip(value.shape, info.shape, strict=True)
            ):
                wanted = ["?" if d is None else d for d in info.shape]
                raise InvalidTensors(f"input {name!r} has shape {list(value.shape)}; the model takes {wanted}")
        all_outputs = [info.name for info in self.outputs]
        if not output_names:
            return all_outputs
        unknown = sorted(set(output_names) - set(all_outputs))
        if unknown:
            raise InvalidTensors(f"model {self.name} has outputs {all_outputs}; unknown {unknown}")
        if len(set(output_names)) != len(output_names):
            raise InvalidTensors(f"output names repeat: {list(output_names)}")
        return list(output_names)

    def run(
        self, inputs: Mapping[str, Array], output_names: Sequence[str]
    ) -> tuple[dict[str, Array], list[tuple[str, float]]]:
        """Run the model on validated inputs; outputs by name and (stage, seconds) per stage."""
        if self._pipeline is not None:
            staged = self._pipeline.submit_timed(inputs).result()
            outputs, timings = staged.outputs, list(staged.timings)
        else:
            assert self._single is not None
            started = time.perf_counter()
            outputs = self._single.run(inputs)
            timings = [("run", time.perf_counter() - started)]
        return {name: outputs[name] for name in output_names}, timings

    def close(self) -> None:
        """Finish the requests already accepted and stop the pipeline's threads (no-op for one stage)."""
        if self._pipeline is not None:
            self._pipeline.close()


@dataclass
class _Window:
    slot: SlotName | None
    started_at: datetime | None
    """When the first request recorded in this window started (wall clock); see ModelWindowStats."""
    count: int = 0
    errors: int = 0
    fallbacks: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_LATENCY_SAMPLES))


@dataclass
class _Served:
    active: LoadedModel | None = None
    previous: LoadedModel | None = None
    loading: bool = False
    activated_at: datetime | None = None
    """When ``active`` started serving."""


def _percentile(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q)) if samples else 0.0


class ModelRuntime:
    """Every model this device serves, keyed by (namespace, name)."""

    def __init__(
        self,
        providers: Sequence[str] = (CPU_EP,),
        *,
        intra_op_threads: int = 1,
        metrics: AgentMetrics | None = None,
        accelerator: AcceleratorServer | None = None,
        device_key: str = "",
    ) -> None:
        """``metrics``: where requests, fallbacks and the served versions are recorded (the Updater
        records install outcomes there too); ``None``: a registry of this runtime's own.
        ``accelerator``: the server partitioned models' tails run on (a local session stands by).
        ``device_key`` (the device id) makes their stage ids the same on every start of this agent,
        so a restarted agent gets back the sessions it left on the server; empty: random ids."""
        if not providers:
            raise ValueError("at least one execution provider is needed")
        self.providers = tuple(providers)
        self.accelerator = accelerator
        self.device_key = device_key
        self.intra_op_threads = intra_op_threads
        self.metrics = metrics or AgentMetrics()
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], _Served] = {}
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self.metrics.follow_models(self._served_models)

    # --- loading and swapping ------------------------------------------------------------------

    def _providers(self, manifest: BundleManifest | None) -> tuple[list[str], list[str]]:
        """What the head and the tail should run on: the plan's providers, else the configured ones."""
        plan = manifest.partition_plan if manifest is not None else None
        head = plan.get("headExecutionProvider") if plan else None
        tail = plan.get("tailExecutionProvider") if plan else None
        configured = list(self.providers)
        return (
            [head, *configured] if isinstance(head, str) and head else configured,
            [tail, *configured] if isinstance(tail, str) and tail else configured,
        )

    def load(
        self,
        namespace: str,
        name: str,
        version: str,
        files: Mapping[str, bytes],
        *,
        slot: SlotName | None = None,
        manifest: BundleManifest | None = None,
    ) -> LoadedModel:
        """Sessions for one version's files (``model.onnx``, or ``head.onnx`` + ``tail.onnx``); not served yet."""
        if set(files) == {"model.onnx"}:
            order = ["model.onnx"]
        elif set(files) == {"head.onnx", "tail.onnx"}:
            order = ["head.onnx", "tail.onnx"]
        else:
            raise ModelLoadError(f"{namespace}/{name} {version}: {sorted(files)} is not a model, or a head and a tail")
        with self._lock:
            served = self._models.setdefault((namespace, name), _Served())
            served.loading = True
        head_providers, tail_providers = self._providers(manifest) if len(order) == 2 else ([*self.providers], [])
        wanted = [head_providers, tail_providers][: len(order)]
        try:
            stages: list[LocalStage | FailoverStage] = [
                LocalStage(
                    files[file],
                    providers,
                    self.intra_op_threads,
                    label=f"model {name} {version}, {file.removesuffix('.onnx')}",
                )
                for file, providers in zip(order, wanted, strict=True)
            ]
            if self.accelerator is not None and len(stages) == 2 and isinstance(tail := stages[1], LocalStage):
                stages[1] = self._remote_tail(namespace, name, version, files["tail.onnx"], tail, tail_providers)
            loaded = LoadedModel(namespace, name, version, slot, manifest, stages, [p[0] for p in wanted])
        finally:
            with self._lock:
                served.loading = False
        for stage, provider in loaded.fallbacks:
            wanted_provider = (head_providers if stage != "tail" else tail_providers)[0]
            if provider != wanted_provider:
                log.warning("[%s/%s] %s: the %s stage runs on %s, not %s", namespace, name, version, stage, provider,
                            wanted_provider)  # fmt: skip
            # else: a tail the accelerator server did not take, which FailoverStage has logged
            self.metrics.fallback(name, stage, provider)
        return loaded

    def _remote_tail(
        self, namespace: str, name: str, version: str, model: bytes, local: LocalStage, providers: Sequence[str]
    ) -> FailoverStage:
        assert self.accelerator is not None
        label = f"[{namespace}/{name}] {version}: tail"
        return FailoverStage(
            self.accelerator,
            model,
            local,
            providers,
            label=label,
            on_detach=lambda provider: self.metrics.fallback(name, "tail", provider),
            stage_id=stage_id_for(self.device_key, namespace, name, version, model) if self.device_key else None,
        )

    def self_test(self, model: LoadedModel, test: SelfTest | None) -> SelfTestFailure | None:
        """Run the golden inputs, compare outputs, check the latency SLO; ``None`` when the version passes.

        Without a self-test (older bundles) one inference on generated inputs must succeed.
        """
        try:
            if test is None:
                feed = generate_inputs([(i.name, _ort_type(i.dtype), i.shape) for i in model.inputs], seed=0)
            else:
                feed = test.input_arrays()
            names = model.validate(feed, [])
            outputs, _ = model.run(feed, names)  # also the warm-up before timing
            problem = None if test is None else check_outputs(test, outputs)
            if problem is not None:
                return SelfTestFailure("SelfTestOutputs", problem)
            if test is None or test.latency_slo_ms is None:
                return None
            latencies = []
            for _ in range(test.runs):
                started = time.perf_counter()
                model.run(feed, names)
                latencies.append((time.perf_counter() - started) * 1000)
        except (InvalidTensors, BundleError) as exc:
            return SelfTestFailure("SelfTestOutputs", f"golden inputs do not fit the model: {exc}")
        except InferenceFailed as exc:
            return SelfTestFailure("SelfTestOutputs", f"the model fails on the golden inputs: {exc}")
        p95 = _percentile(latencies, 95)
        if p95 <= test.latency_slo_ms:
            return None
        slo = test.latency_slo_ms
        return SelfTestFailure("SelfTestLatency", f"p95 {p95:.3f} ms of {test.runs} runs is above the SLO of {slo} ms")

    def activate(self, model: LoadedModel) -> None:
        """Serve ``model`` from now on; the version it replaces stays loaded as the previous one."""
        with self._lock:
            served = self._models.setdefault((model.namespace, model.name), _Served())
            if served.active is not None and served.active.version != model.version:
                served.previous = served.active
            if served.previous is not None and served.previous.version == model.version:
                served.previous = None
            if served.active is not model:
                served.activated_at = datetime.now(UTC)
            served.active = model
        log.info("[%s/%s] serving %s from slot %s", model.namespace, model.name, model.version, model.slot)

    def forget_slot(self, namespace: str, name: str, slot: SlotName) -> None:
        """``slot`` is about to be overwritten: stop keeping the previous version loaded from it."""
        with self._lock:
            served = self._models.get((namespace, name))
            if served is not None and served.previous is not None and served.previous.slot == slot:
                served.previous = None

    def set_previous(self, namespace: str, name: str, model: LoadedModel | None) -> None:
        """Keep ``model`` loaded as the version requests may still pin (``None`` drops it)."""
        with self._lock:
            self._models.setdefault((namespace, name), _Served()).previous = model

    def mark_unavailable(self, namespace: str, name: str) -> None:
        """The model is held on this device but nothing of it can be served (no verified version)."""
        with self._lock:
            self._models[(namespace, name)] = _Served()

    def unload(self, namespace: str, name: str) -> None:
        """Stop serving the model; requests already running finish on their sessions."""
        with self._lock:
            self._models.pop((namespace, name), None)

    def active(self, namespace: str, name: str) -> LoadedModel | None:
        """The version serving now, if any."""
        with self._lock:
            served = self._models.get((namespace, name))
            return served.active if served is not None else None

    # --- serving -------------------------------------------------------------------------------

    def _pick(self, namespace: str, name: str, version: str) -> LoadedModel:
        with self._lock:
            served = self._models.get((namespace, name))
            if served is None:
                raise UnknownModel(f"no model {name!r} on this device")
            active, previous = served.active, served.previous
        if active is None:
            raise ModelNotReady(f"model {name!r} has no version ready to serve")
        if not version or version == active.version:
            return active
        if previous is not None and previous.version == version:
            return previous
        held = [active.version] + ([previous.version] if previous is not None else [])
        raise ModelNotReady(f"model {name!r} does not hold version {version!r}; it serves {held}")

    def predict(
        self,
        name: str,
        inputs: Mapping[str, Array],
        output_names: Sequence[str] = (),
        version: str = "",
        *,
        namespace: str,
    ) -> Prediction:
        """Serve one request on the active version (or the pinned one); typed errors for bad requests."""
        started = time.perf_counter()
        started_at = datetime.now(UTC)
        try:
            model = self._pick(namespace, name, version)
        except UnknownModel:
            self.metrics.inference_error(UNKNOWN_MODEL, "unknown_model")
            raise
        except ModelNotReady:
            self.metrics.inference_error(name, "not_ready")
            raise
        try:
            names = model.validate(inputs, output_names)
            outputs, timings = model.run(inputs, names)
        except (InvalidTensors, InferenceFailed) as exc:
            kind: InferenceErrorKind = "invalid_request" if isinstance(exc, InvalidTensors) else "failed"
            self.metrics.inference_error(name, kind)
            self._record(model, started_at, None, degraded=model.degraded)
            raise
        total = time.perf_counter() - started
        degraded = model.degraded  # read once: a remote tail may re-attach at any moment
        self.metrics.inference(name, total, fallback=degraded)
        self._record(model, started_at, total, degraded=degraded)
        return Prediction(model.version, [(n, outputs[n]) for n in names], [*timings, ("total", total)])

    def _record(self, model: LoadedModel, started_at: datetime, seconds: float | None, *, degraded: bool) -> None:
        """Count one request against the version that served it (chosen when the request started)."""
        key = (model.namespace, model.name, model.version)
        with self._lock:
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(model.slot, started_at)
            window.started_at = started_at if window.started_at is None else min(window.started_at, started_at)
            window.count += 1
            if seconds is None:
                window.errors += 1
            else:
                window.latencies_ms.append(seconds * 1000)
            if degraded:
                window.fallbacks += 1

    # --- reporting -----------------------------------------------------------------------------

    def drain_windows(self) -> list[ModelWindowStats]:
        """Statistics since the last call: one entry per model version that served (fleet.proto's ModelHealth).

        Each request counts against the version that served it. When versions switched during the
        window a model has several entries, oldest first (by their first request), and the version
        active now is always the last one, even if idle: a served model reports every window.
        """
        with self._lock:
            windows, self._windows = self._windows, {}
            active = {key: s for key, s in self._models.items() if s.active is not None}
        per_model: dict[tuple[str, str], list[tuple[str, _Window]]] = {}
        for (namespace, name, version), window in windows.items():
            per_model.setdefault((namespace, name), []).append((version, window))
        for key in active:
            per_model.setdefault(key, [])
        stats = []
        for (namespace, name), parts in sorted(per_model.items()):
            served = active.get((namespace, name))
            current = served.active if served is not None else None
            # Oldest first; the version active now last.
            parts.sort(key=lambda part: (current is not None and part[0] == current.version, part[1].started_at))
            if served is not None and current is not None and (not parts or parts[-1][0] != current.version):
                # The active version served nothing in this window: reported idle, since its switch
                # when that came within the window (another version served in it).
                parts.append((current.version, _Window(current.slot, served.activated_at if parts else None)))
            stats += [self._window_stats(namespace, name, version, window) for version, window in parts]
        return stats

    @staticmethod
    def _window_stats(namespace: str, name: str, version: str, window: _Window) -> ModelWindowStats:
        samples = list(window.latencies_ms)
        return ModelWindowStats(
            model_namespace=namespace,
            model_name=name,
            version=version,
            slot=window.slot,
            inference_count=window.count,
            error_count=window.errors,
            latency_p50_ms=_percentile(samples, 50),
            latency_p95_ms=_percentile(samples, 95),
            latency_p99_ms=_percentile(samples, 99),
            accelerator_fallback_count=window.fallbacks,
            started_at=window.started_at,
        )

    def _served_models(self) -> list[ServedModel]:
        """Every active version, for the metrics (read at scrape time)."""
        with self._lock:
            active = [s.active for s in self._models.values() if s.active is not None]
        return [
            ServedModel(m.name, m.version, m.slot or "", "split" if len(m.execution_providers) == 2 else "whole")
            for m in active
        ]

    def served(self) -> list[tuple[str, str, str, SlotName]]:
        """(namespace, name, version, slot) of every active version that came from a slot."""
        with self._lock:
            return sorted(
                (ns, name, s.active.version, s.active.slot)
                for (ns, name), s in self._models.items()
                if s.active is not None and s.active.slot is not None
            )

    def status(self, namespace: str, name: str = "") -> list[ModelStatusView]:
        """What is served for ``name`` in ``namespace`` (every model of the namespace when empty)."""
        with self._lock:
            entries = sorted(
                (key, _Served(s.active, s.previous, s.loading))
                for key, s in self._models.items()
                if key[0] == namespace and (not name or key[1] == name)
            )
        views = []
        for (ns, model_name), served in entries:
            active = served.active
            state: ModelState
            if active is None:
                state = "loading" if served.loading else "unavailable"
            else:
                state = "degraded" if active.degraded else "ready"
            views.append(
                ModelStatusView(
                    namespace=ns,
                    name=model_name,
                    state=state,
                    active_version=active.version if active else "",
                    active_slot=active.slot if active else None,
                    previous_version=served.previous.version if served.previous else "",
                    inputs=active.inputs if active else (),
                    outputs=active.outputs if active else (),
                    partition_plan_id=active.partition_plan_id if active else "",
                    execution_providers=active.execution_providers if active else (),
                )
            )
        return views


def _ort_type(dtype: str | None) -> str:
    """The ONNX Runtime type string of a numpy dtype name (an unknown one makes input generation refuse)."""
    for ort_type, name in ORT_TYPES.items():
        if name == dtype:
            return ort_type
    return "tensor(unsupported)"
