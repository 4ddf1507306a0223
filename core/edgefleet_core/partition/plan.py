"""The partition planner: where to cut a model between the node CPU and its accelerator.

Ours on purpose (after Neurosurgeon, Kang et al., ASPLOS 2017): every candidate cut is priced from
measurements, the head on the node CPU, the crossing tensors over the DeviceClass's link (and the
tail's outputs back), the tail on the accelerator, and the policy picks the cheapest. Running the
whole model on the node CPU ("no split") is always a candidate.

    latency    = head + transfer + tail                 (one request, sequential)
    throughput = 1 / max(head, transfer, tail)          (requests pipelined through the three stages)

Measurements are honest: when the accelerator's execution provider is not available on this
machine the tail is timed on a CPU session and the plan says so in ``tailMeasuredOn``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Final, Literal

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from edgefleet_core.optimize.model_io import model_digest
from edgefleet_core.optimize.runtime import CPU_EP, can_run, run, session
from edgefleet_core.partition.cuts import (
    PartitionError,
    SplitModel,
    cut_after,
    enumerate_cuts,
    split_model,
    verify_split,
)
from edgefleet_core.partition.fission import apply_fission, balanced_split, fission_sites, rebalanced_split
from edgefleet_core.partition.fission import fission as split_fission
from edgefleet_core.partition.profile import DEFAULT_RUNS, DEFAULT_WARMUP, example_inputs, profile_model
from edgefleet_core.resources.device_class import AcceleratorLink, DeviceClass

__all__ = [
    "PLAN_API_VERSION",
    "Candidate",
    "Fission",
    "PartitionPlan",
    "Policy",
    "SegmentCosts",
    "accelerator_link",
    "check_head_tail",
    "choose",
    "measure_candidates",
    "plan_from_costs",
    "plan_partition",
    "price",
    "split_for",
]

PLAN_API_VERSION: Final = "edgefleet.io/partition-plan/v1"
Policy = Literal["latency", "throughput"]


class _PlanModel(BaseModel):
    """camelCase on the wire, unknown fields refused, immutable (as the rest of core's documents)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, validate_default=True
    )


class Fission(_PlanModel):
    """An operator the candidate computes in two parts, split along its output channels.

    The head computes the first ``parts[0]`` channels, the tail the rest and the ``Concat`` (see
    :mod:`edgefleet_core.partition.fission`); the candidate's cut and tensors are those of the
    model with that operator split.
    """

    output: Annotated[str, Field(min_length=1, max_length=1024)]
    """The split operator's output tensor (it keeps its name: the Concat computes it)."""
    op_type: Literal["Conv", "Gemm", "MatMul"]
    parts: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)]
    """Output channels computed by the head's part, then by the tail's part."""


class Candidate(_PlanModel):
    """One way to run the model: a cut (head on the CPU, tail on the accelerator) or no split."""

    cut_index: Annotated[int, Field(ge=1)] | None
    """Position of the cut in the model's topological order; ``None``: the whole model on the node CPU."""
    tensors: Annotated[list[str], Field(max_length=32)]
    """The tensors crossing the link, sorted by name (empty for no split)."""
    bytes: Annotated[int, Field(ge=0)]
    """Bytes sent from the node to the accelerator per request (batch 1): the cut tensors and any graph
    inputs the tail reads directly."""
    output_bytes: Annotated[int, Field(ge=0)]
    """Bytes of the tail's outputs sent back to the node per request."""
    # Finite only: an infinity passes a lower bound, and the canonical JSON (the plan id) cannot carry it.
    head_ms: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    transfer_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    """Modelled from the DeviceClass's link, both directions."""
    tail_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    latency_ms: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    throughput_per_s: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    measured_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    """Measured head then tail, end to end in this process (no link: it is modelled, not here)."""
    measured_latency_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    """``measured_ms`` plus the modelled ``transfer_ms``: comparable with ``latency_ms``."""
    fission: Fission | None = None
    """The operator this candidate splits in two, when a cut inside it balances the stages better
    than any cut between operators; ``None`` for a plain cut (left out of the canonical JSON)."""

    @property
    def is_split(self) -> bool:
        """Whether this candidate cuts the model (``False``: the whole model on the node CPU)."""
        return self.cut_index is not None

    @property
    def key(self) -> tuple[int | None, str | None]:
        """What identifies the candidate in its plan: the cut index alone repeats across fissions."""
        return self.cut_index, self.fission.output if self.fission is not None else None

    @property
    def label(self) -> str:
        """How people read the candidate: ``no split``, ``cut 7``, ``cut 7 inside convs.2 (80/48)``."""
        if self.cut_index is None:
            return "no split"
        if self.fission is None:
            return f"cut {self.cut_index}"
        head, tail = self.fission.parts
        return f"cut {self.cut_index} inside {self.fission.output} ({head}/{tail})"


class PartitionPlan(_PlanModel):
    """The planner's decision for one model on one device class, with every candidate it priced."""

    api_version: Literal["edgefleet.io/partition-plan/v1"] = PLAN_API_VERSION
    model_digest: Annotated[str, Field(pattern=r"^[a-f0-9]{64}$")]
    """Content digest (sha256 hex) of the model that was cut."""
    device_class: str
    policy: Policy
    link: AcceleratorLink
    head_execution_provider: str
    tail_execution_provider: str
    """The accelerator's execution provider (from the DeviceClass)."""
    tail_measured_on: str
    """The provider tails were actually timed on: the CPU when the accelerator's is not available here."""
    runs: Annotated[int, Field(ge=1)]
    max_tensors: Annotated[int, Field(ge=1, le=32)]
    manual_cut: Annotated[list[str], Field(max_length=32)] | None = None
    """The cut the user asked for, if any: then it is chosen whatever it costs."""
    candidates: Annotated[list[Candidate], Field(min_length=1)]
    chosen_cut: int | None
    """``cutIndex`` of the chosen candidate; ``None``: no split."""
    chosen_fission: str | None = None
    """``fission.output`` of the chosen candidate when it splits an operator (then ``chosenCut`` is
    an index of the model with that operator split); left out of the canonical JSON when ``None``."""
    outputs: Annotated[list[str], Field(max_length=4096)] = Field(default_factory=list)
    """The whole model's output names in its order, so a head and a tail serve them in that order.
    Empty in plans made before it was recorded (then it is left out of the canonical JSON)."""

    @property
    def chosen(self) -> Candidate:
        """The chosen candidate."""
        for candidate in self.candidates:
            if candidate.key == (self.chosen_cut, self.chosen_fission):
                return candidate
        inside = f" inside {self.chosen_fission}" if self.chosen_fission is not None else ""
        raise PartitionError(f"plan chooses cut {self.chosen_cut}{inside}, which is not among its candidates")

    def canonical_json(self) -> bytes:
        """Sorted keys, no spaces, ASCII: the bytes ``plan_id`` hashes and ``plan.json`` holds."""
        document = self.model_dump(mode="json", by_alias=True)
        # Fields added after v1 shipped are left out while unset, so older plans keep their bytes and id.
        if not self.outputs:
            del document["outputs"]
        if self.chosen_fission is None:
            del document["chosenFission"]
        for candidate in document["candidates"]:
            if candidate["fission"] is None:
                del candidate["fission"]
        return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
            "ascii"
        )

    @property
    def plan_id(self) -> str:
        """Full sha256 hex of :meth:`canonical_json`."""
        return hashlib.sha256(self.canonical_json()).hexdigest()


@dataclass(frozen=True)
class SegmentCosts:
    """What was measured for one candidate: the cost model's input."""

    cut_index: int | None
    tensors: tuple[str, ...]
    nbytes: int
    output_nbytes: int
    head_ms: float
    tail_ms: float
    fission: Fission | None = None


def accelerator_link(device_class: DeviceClass) -> AcceleratorLink:
    """The link the planner prices; :class:`PartitionError` when the class has no accelerator or link."""
    name = device_class.metadata.name
    accelerator = device_class.spec.accelerator
    if accelerator is None:
        raise PartitionError(f"DeviceClass {name} has no accelerator: there is nothing to partition across")
    if accelerator.link is None:
        raise PartitionError(f"DeviceClass {name} has no spec.accelerator.link: the transfer cost is unknown")
    return accelerator.link


def price(costs: SegmentCosts, link: AcceleratorLink) -> Candidate:
    """The cost model for one candidate (no split: no transfer, no tail)."""
    if costs.cut_index is None:
        transfer_ms = 0.0
    else:
        transfer_ms = link.transfer_seconds(costs.nbytes) * 1000.0
        if costs.output_nbytes:
            transfer_ms += link.transfer_seconds(costs.output_nbytes) * 1000.0
    slowest = max(costs.head_ms, transfer_ms, costs.tail_ms)
    if not math.isfinite(costs.head_ms + transfer_ms + costs.tail_ms):
        # A link the CRD allows (any bandwidth above 0) can make a transfer overflow to infinity;
        # such a cut has no usable cost, and a plan cannot carry one (its canonical JSON refuses it).
        raise PartitionError(
            f"cut {costs.cut_index}: the modelled cost is not finite "
            f"(head {costs.head_ms} ms, transfer {transfer_ms} ms, tail {costs.tail_ms} ms); "
            f"is the link's bandwidth ({link.bandwidth_mbps} MB/s) realistic?"
        )
    return Candidate(
        cut_index=costs.cut_index,
        tensors=list(costs.tensors),
        bytes=costs.nbytes,
        output_bytes=costs.output_nbytes,
        head_ms=costs.head_ms,
        transfer_ms=transfer_ms,
        tail_ms=costs.tail_ms,
        latency_ms=costs.head_ms + transfer_ms + costs.tail_ms,
        throughput_per_s=1000.0 / slowest,
        fission=costs.fission,
    )


def choose(candidates: Sequence[Candidate], policy: Policy) -> Candidate:
    """The best candidate for ``policy``; ties go to no split, then to the earlier cut, then to a plain cut.

    The latency policy chooses among plain cuts only (fission serves throughput).
    """

    def tie(candidate: Candidate) -> tuple[int, str]:
        return _order(candidate)

    if policy == "latency":
        # A split operator's two parts run one after the other within a request: fission only adds
        # work to a request (two smaller kernels, the Concat); what it buys is a pipeline's throughput.
        plain = [c for c in candidates if c.fission is None]
        return min(plain, key=lambda c: (c.latency_ms, tie(c)))
    return min(candidates, key=lambda c: (-c.throughput_per_s, tie(c)))


def _order(candidate: Candidate) -> tuple[int, str]:
    # No split first, then by cut index; a plain cut before a fission at the same index.
    index = -1 if candidate.cut_index is None else candidate.cut_index
    return index, candidate.fission.output if candidate.fission is not None else ""


def plan_from_costs(
    costs: Sequence[SegmentCosts],
    *,
    model_digest: str,
    device_class: DeviceClass,
    policy: Policy,
    tail_measured_on: str,
    runs: int,
    max_tensors: int,
    manual_cut: Sequence[str] | None = None,
    outputs: Sequence[str] = (),
) -> PartitionPlan:
    """Price every candidate and choose one (pure: the same costs give the same plan, byte for byte)."""
    link = accelerator_link(device_class)
    accelerator = device_class.spec.accelerator
    assert accelerator is not None  # accelerator_link refused a class without one
    candidates = sorted((price(c, link) for c in costs), key=_order)
    if not any(c.cut_index is None for c in candidates):
        raise PartitionError("the costs have no whole-model baseline (no split is always a candidate)")
    if manual_cut is not None:
        wanted = sorted(manual_cut)
        matches = [c for c in candidates if c.cut_index is not None and c.fission is None and c.tensors == wanted]
        if not matches:
            raise PartitionError(f"the manual cut {', '.join(wanted)} is not among the candidates")
        chosen = matches[0]
    else:
        chosen = choose(candidates, policy)
    return PartitionPlan(
        model_digest=model_digest,
        device_class=device_class.metadata.name,
        policy=policy,
        link=link,
        head_execution_provider=CPU_EP,
        tail_execution_provider=accelerator.execution_provider,
        tail_measured_on=tail_measured_on,
        runs=runs,
        max_tensors=max_tensors,
        manual_cut=sorted(manual_cut) if manual_cut is not None else None,
        candidates=candidates,
        chosen_cut=chosen.cut_index,
        chosen_fission=chosen.fission.output if chosen.fission is not None else None,
        outputs=list(outputs),
    )


def _tail_feed(
    split: SplitModel, inputs: Mapping[str, np.ndarray], head_outputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    # The tail reads the cut tensors the head made, and any graph inputs it needs directly.
    feed: dict[str, np.ndarray] = {}
    for value in split.tail.graph.input:
        if value.name in head_outputs:
            feed[value.name] = head_outputs[value.name]
        elif value.name in inputs:
            feed[value.name] = inputs[value.name]
    return feed


def _tail_output_nbytes(split: SplitModel, tail_outputs: Mapping[str, np.ndarray], graph_outputs: set[str]) -> int:
    return sum(int(tail_outputs[o.name].nbytes) for o in split.tail.graph.output if o.name in graph_outputs)


def _tail_provider(device_class: DeviceClass) -> tuple[str, str]:
    accelerator = device_class.spec.accelerator
    wanted = accelerator.execution_provider if accelerator is not None else CPU_EP
    return wanted, (wanted if can_run(wanted) else CPU_EP)


def _split_costs(
    split: SplitModel,
    feed: Mapping[str, np.ndarray],
    graph_outputs: set[str],
    tail_ep: str,
    *,
    runs: int,
    warmup: int,
    intra_op_threads: int,
    fission: Fission | None = None,
) -> SegmentCosts:
    """Time ``split``'s head on the CPU, then its tail on ``tail_ep`` fed with the head's real outputs."""
    head, head_outputs = profile_model(split.head, feed, runs=runs, warmup=warmup, intra_op_threads=intra_op_threads)
    tail, tail_outputs = profile_model(
        split.tail,
        _tail_feed(split, feed, head_outputs),
        execution_provider=tail_ep,
        runs=runs,
        warmup=warmup,
        intra_op_threads=intra_op_threads,
    )
    # The cut tensors, and the graph inputs the tail reads directly, all cross the link.
    crossing = split.cut.nbytes()
    if crossing is None:  # a dimension the model leaves open: count what actually crossed
        crossing = sum(int(head_outputs[t.name].nbytes) for t in split.cut.tensors)
    forwarded = split.cut.forwarded_nbytes()
    if forwarded is None:
        forwarded = sum(int(feed[t.name].nbytes) for t in split.cut.forwarded)
    return SegmentCosts(
        split.cut.index,
        tuple(t.name for t in split.cut.tensors),
        crossing + forwarded,
        _tail_output_nbytes(split, tail_outputs, graph_outputs),
        head.median_ms,
        tail.median_ms,
        fission,
    )


# An operator is worth splitting when it alone takes this share of the whole model: then no cut
# between operators can bring the slower stage near half the model's time.
FISSION_SHARE: Final = 0.2
FISSION_SITES: Final = 3
"""At most this many operators (the heaviest) are tried split."""


def _fission_candidates(
    model: onnx.ModelProto, whole_ms: float, plain: Sequence[SegmentCosts]
) -> list[tuple[Fission, float]]:
    """Operators heavy enough to split, with the head's share of channels that balances the stages.

    The operator's cost is the difference between the heads just after and just before it (both
    plain cuts already measured); operators without both measured cuts are skipped.
    """
    measured = {c.cut_index: c for c in plain if c.cut_index is not None}
    found: list[tuple[Fission, float]] = []
    for site in fission_sites(model):
        try:
            after = cut_after(model, site.output).index
        except PartitionError:
            continue  # the last operator: nothing would follow it in the tail
        if after not in measured or (after > 1 and after - 1 not in measured):
            continue
        before_ms = measured[after - 1].head_ms if after > 1 else 0.0  # the first operator: an empty head
        operator_ms = measured[after].head_ms - before_ms
        if operator_ms < FISSION_SHARE * whole_ms:
            continue
        head = balanced_split(site.channels, before_ms, operator_ms, measured[after].tail_ms)
        parts = [head, site.channels - head]
        found.append((Fission(output=site.output, op_type=site.op_type, parts=parts), operator_ms))
    found.sort(key=lambda pair: -pair[1])
    return found[:FISSION_SITES]


# The candidates the first timing ranks closest are timed again, in turns, before one is chosen:
# on a shared machine one slow moment can otherwise rank a cut ahead of a better one.
CONFIRM_CONTENDERS: Final = 3
CONFIRM_ROUNDS: Final = 3


def _contenders(priced: Sequence[Candidate], policy: Policy) -> list[int]:
    """Indices of the best :data:`CONFIRM_CONTENDERS` candidates for ``policy``, best first."""

    def rank(index: int) -> tuple[bool, float, tuple[int, str]]:
        candidate = priced[index]
        excluded = policy == "latency" and candidate.fission is not None  # see choose()
        value = candidate.latency_ms if policy == "latency" else -candidate.throughput_per_s
        return excluded, value, _order(candidate)

    return sorted(range(len(priced)), key=rank)[:CONFIRM_CONTENDERS]


def _median_costs(rounds: Sequence[SegmentCosts]) -> SegmentCosts:
    """One candidate's costs over several timings: the median head and tail."""
    first = rounds[0]
    return dataclasses.replace(
        first,
        head_ms=statistics.median(r.head_ms for r in rounds),
        tail_ms=statistics.median(r.tail_ms for r in rounds),
    )


def _exact_fission(model: onnx.ModelProto, spec: Fission, feed: Mapping[str, np.ndarray]) -> SplitModel | None:
    """The split right after the head's part of ``spec``, if head and tail reproduce ``model`` exactly."""
    fissioned = split_fission(model, spec.output, spec.parts)
    split = split_model(fissioned.model, cut_after(fissioned.model, fissioned.parts[0]))
    try:
        verify_split(model, split, feed)
    except PartitionError:
        return None
    return split


def _timed_fission(
    model: onnx.ModelProto,
    spec: Fission,
    operator_ms: float,
    feed: Mapping[str, np.ndarray],
    timed: Callable[[SplitModel, Fission], SegmentCosts],
) -> tuple[SplitModel, Fission, SegmentCosts] | None:
    """``spec``'s split timed, or the same operator split more evenly when the timing shows it is.

    Measured, a split is rarely as even as predicted from the plain cuts (two smaller kernels, the
    Concat and the fusions change the costs a little), so it is tried once more moved toward even,
    and the more even of the two is kept: one candidate per split operator, since a plan names its
    choice by cut and operator. ``None`` when the split does not reproduce the model exactly.
    """
    split = _exact_fission(model, spec, feed)
    if split is None:
        return None
    costs = timed(split, spec)
    channels = sum(spec.parts)
    moved = rebalanced_split(channels, spec.parts[0], costs.head_ms, costs.tail_ms, operator_ms)
    if moved == spec.parts[0]:
        return split, spec, costs
    respec = spec.model_copy(update={"parts": [moved, channels - moved]})
    resplit = _exact_fission(model, respec, feed)
    if resplit is None:
        return split, spec, costs
    retimed = timed(resplit, respec)
    if max(retimed.head_ms, retimed.tail_ms) < max(costs.head_ms, costs.tail_ms):
        return resplit, respec, retimed
    return split, spec, costs


def plan_partition(
    model: onnx.ModelProto,
    device_class: DeviceClass,
    *,
    policy: Policy = "latency",
    inputs: Mapping[str, np.ndarray] | None = None,
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
    max_tensors: int = 4,
    intra_op_threads: int = 1,
    manual_cut: Sequence[str] | None = None,
    measure: bool = False,
    fission: bool = True,
) -> PartitionPlan:
    """Profile every candidate cut of ``model`` and choose one for ``device_class`` and ``policy``.

    Each candidate's head is timed on the node CPU, then its tail on the accelerator's provider
    (the CPU when that is not available here) with the head's real outputs as input. With
    ``fission``, the heaviest operators (Conv, Gemm, MatMul taking at least :data:`FISSION_SHARE`
    of the model) are also tried split in two at the channel count that balances head and tail;
    such a candidate is offered only after its head and tail reproduce the whole model bit for bit.
    With ``manual_cut`` only that cut (and no split) is priced, and it is chosen. With ``measure``
    each candidate is also run end to end (:func:`measure_candidates`).
    """
    accelerator_link(device_class)  # refuse a class without a link before any work
    feed = dict(inputs) if inputs is not None else example_inputs(model)
    _, tail_ep = _tail_provider(device_class)
    graph_outputs = {o.name for o in model.graph.output}
    whole, _ = profile_model(model, feed, runs=runs, warmup=warmup, intra_op_threads=intra_op_threads)
    costs = [SegmentCosts(None, (), 0, 0, whole.median_ms, 0.0)]
    if manual_cut is not None:
        splits = [split_model(model, list(manual_cut))]
    else:
        splits = [split_model(model, cut) for cut in enumerate_cuts(model, max_tensors=max_tensors)]

    def timed(split: SplitModel, spec: Fission | None = None) -> SegmentCosts:
        return _split_costs(
            split,
            feed,
            graph_outputs,
            tail_ep,
            runs=runs,
            warmup=warmup,
            intra_op_threads=intra_op_threads,
            fission=spec,
        )

    timed_splits: list[tuple[SplitModel | None, Fission | None]] = [(None, None)]
    timed_splits += [(split, None) for split in splits]
    costs += [timed(split) for split in splits]
    if fission and manual_cut is None:
        for spec, operator_ms in _fission_candidates(model, whole.median_ms, costs):
            found = _timed_fission(model, spec, operator_ms, feed, timed)
            if found is not None:  # else not exact on this runtime: never offered
                timed_splits.append((found[0], found[1]))
                costs.append(found[2])
    if manual_cut is None:

        def again(index: int) -> SegmentCosts:
            split, spec = timed_splits[index]
            if split is not None:
                return timed(split, spec)
            profile, _ = profile_model(model, feed, runs=runs, warmup=warmup, intra_op_threads=intra_op_threads)
            return SegmentCosts(None, (), 0, 0, profile.median_ms, 0.0)

        link = accelerator_link(device_class)
        contenders = _contenders([price(c, link) for c in costs], policy)
        timings = {index: [costs[index]] for index in contenders}
        for _ in range(CONFIRM_ROUNDS - 1):
            for index in contenders:  # in turns, so a slow moment of the machine hits them alike
                timings[index].append(again(index))
        for index, rounds in timings.items():
            costs[index] = _median_costs(rounds)
    plan = plan_from_costs(
        costs,
        model_digest=model_digest(model),
        device_class=device_class,
        policy=policy,
        tail_measured_on=tail_ep,
        runs=runs,
        max_tensors=max_tensors,
        manual_cut=manual_cut,
        outputs=[o.name for o in model.graph.output],
    )
    if measure:
        plan = measure_candidates(
            model, plan, device_class, inputs=feed, runs=runs, warmup=warmup, intra_op_threads=intra_op_threads
        )
    return plan


def split_for(model: onnx.ModelProto, plan: PartitionPlan, candidate: Candidate | None = None) -> SplitModel:
    """The head and tail of ``candidate`` (default: the chosen one); :class:`PartitionError` for no split."""
    target = candidate if candidate is not None else plan.chosen
    if target.cut_index is None:
        raise PartitionError("the candidate does not split the model")
    if target.fission is not None:
        model = apply_fission(model, target.fission.output, target.fission.parts)
    split = split_model(model, target.tensors)
    if split.cut.index != target.cut_index:
        raise PartitionError(
            f"cut {', '.join(target.tensors)} is at {split.cut.index}, the plan says {target.cut_index}"
        )
    return split


def _graph_names(values: Sequence[onnx.ValueInfoProto], initializers: Sequence[onnx.TensorProto]) -> list[str]:
    constant = {i.name for i in initializers}
    return [v.name for v in values if v.name not in constant]


def check_head_tail(plan: PartitionPlan, head: onnx.ModelProto, tail: onnx.ModelProto) -> None:
    """Raise :class:`PartitionError` unless ``head`` and ``tail`` are what ``plan``'s chosen cut makes.

    Without the whole model the digests cannot be compared; what can be is the cut itself: its
    tensors are outputs of the head and inputs of the tail, every other tail input is a graph input
    (something the head takes too, or forwarded), and the two serve the plan's outputs together.
    """
    chosen = plan.chosen
    if chosen.cut_index is None:
        raise PartitionError("the plan chooses no split: publish the whole model as model.onnx instead")
    head_outputs = [o.name for o in head.graph.output]
    tail_inputs = _graph_names(tail.graph.input, tail.graph.initializer)
    tail_outputs = [o.name for o in tail.graph.output]
    absent = [t for t in chosen.tensors if t not in head_outputs]
    if absent:
        raise PartitionError(f"the plan's cut tensor {absent[0]!r} is not an output of the head", absent)
    absent = [t for t in chosen.tensors if t not in tail_inputs]
    if absent:
        raise PartitionError(f"the plan's cut tensor {absent[0]!r} is not an input of the tail", absent)
    # Anything else the tail reads must be a graph input the node has at hand, never a head tensor
    # the plan does not say crosses the link.
    stray = [t for t in tail_inputs if t not in chosen.tensors and t in head_outputs]
    if stray:
        raise PartitionError(f"the tail reads head output {stray[0]!r}, which is not in the plan's cut", stray)
    if plan.outputs:
        # A cut tensor may be a model output too, so head outputs are not all cut tensors or outputs.
        missing = [o for o in plan.outputs if o not in head_outputs and o not in tail_outputs]
        extra = [o for o in tail_outputs if o not in plan.outputs]
        if missing or extra:
            raise PartitionError(
                f"head and tail do not serve the plan's outputs {plan.outputs}: missing {missing}, extra {extra}",
                [*missing, *extra],
            )


def _whole_request(
    model: onnx.ModelProto, feed: Mapping[str, np.ndarray], intra_op_threads: int
) -> Callable[[], object]:
    whole = session(model, intra_op_threads=intra_op_threads)
    whole_feed = {i.name: feed[i.name] for i in whole.get_inputs()}
    return lambda: run(whole, None, whole_feed)


def _split_request(
    split: SplitModel, feed: Mapping[str, np.ndarray], tail_ep: str, intra_op_threads: int
) -> Callable[[], object]:
    head = session(split.head, intra_op_threads=intra_op_threads)
    tail = session(split.tail, tail_ep, intra_op_threads=intra_op_threads)
    head_feed = {i.name: feed[i.name] for i in head.get_inputs()}
    head_names = [o.name for o in head.get_outputs()]
    tail_inputs = [i.name for i in tail.get_inputs()]

    def request() -> object:
        produced = dict(zip(head_names, run(head, head_names, head_feed), strict=True))
        return run(tail, None, {n: produced[n] if n in produced else feed[n] for n in tail_inputs})

    return request


def measure_candidates(
    model: onnx.ModelProto,
    plan: PartitionPlan,
    device_class: DeviceClass,
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
    intra_op_threads: int = 1,
) -> PartitionPlan:
    """``plan`` with every candidate's measured latency: head then tail, end to end, ``runs`` times.

    The median wall time of a whole request (head run, hand-over of the cut tensors, tail run) in
    this process; the link is modelled, so ``measuredLatencyMs`` adds the candidate's ``transferMs``.
    """
    if plan.model_digest != model_digest(model):
        raise PartitionError("the plan was made for a different model")
    feed = dict(inputs) if inputs is not None else example_inputs(model)
    _, tail_ep = _tail_provider(device_class)
    measured: list[Candidate] = []
    for candidate in plan.candidates:
        if candidate.cut_index is None:
            request = _whole_request(model, feed, intra_op_threads)
        else:
            request = _split_request(split_for(model, plan, candidate), feed, tail_ep, intra_op_threads)
        for _ in range(warmup):
            request()
        samples: list[float] = []
        for _ in range(runs):
            start = time.perf_counter()
            request()
            samples.append((time.perf_counter() - start) * 1000.0)
        measured_ms = statistics.median(samples)
        measured.append(
            candidate.model_copy(
                update={"measured_ms": measured_ms, "measured_latency_ms": measured_ms + candidate.transfer_ms}
            )
        )
    return plan.model_copy(update={"candidates": measured})
