"""The partition planner: the cost model on fixed profiles, and real profiling on tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgefleet_core.optimize.model_io import model_digest
from edgefleet_core.optimize.runtime import CPU_EP, can_run
from edgefleet_core.partition.cuts import PartitionError, verify_split
from edgefleet_core.partition.plan import (
    PartitionPlan,
    SegmentCosts,
    accelerator_link,
    plan_from_costs,
    plan_partition,
    price,
    split_for,
)
from edgefleet_core.partition.profile import example_inputs
from edgefleet_core.resources.device_class import AcceleratorLink, DeviceClass
from tests.support.tiny_models import tiny_cnn, wide_mlp

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "valid"
DIGEST = "ab" * 32


def device_class(link: dict[str, Any] | None = None, *, accelerator: bool = True) -> DeviceClass:
    """The Jetson example class, with the link (bandwidthMBps, latencyMicroseconds) replaced."""
    body = yaml.safe_load((EXAMPLES / "deviceclass-jetson-gpu.yaml").read_text(encoding="utf-8"))
    if not accelerator:
        del body["spec"]["accelerator"]
    elif link is None:
        del body["spec"]["accelerator"]["link"]
    else:
        body["spec"]["accelerator"]["link"] = link
    return DeviceClass.model_validate(body)


FAST = {"bandwidthMBps": 20000, "latencyMicroseconds": 30}
SLOW = {"bandwidthMBps": 1.25, "latencyMicroseconds": 0}  # 10 Mbit/s


def plan(costs: list[SegmentCosts], link: dict[str, Any], policy: Any = "latency", **extra: Any) -> PartitionPlan:
    return plan_from_costs(
        costs,
        model_digest=DIGEST,
        device_class=device_class(link),
        policy=policy,
        tail_measured_on=CPU_EP,
        runs=5,
        max_tensors=4,
        **extra,
    )


def test_price_adds_head_both_transfers_and_tail() -> None:
    link = AcceleratorLink(bandwidth_mbps=1.0, latency_microseconds=100)
    candidate = price(SegmentCosts(3, ("a", "b"), 1000, 40, 2.0, 3.0), link)
    # 1000 B at 1 MB/s = 1 ms, back 40 B = 0.04 ms, plus 0.1 ms link latency each way.
    assert candidate.transfer_ms == pytest.approx(1.0 + 0.1 + 0.04 + 0.1)
    assert candidate.latency_ms == pytest.approx(2.0 + 1.24 + 3.0)
    assert candidate.throughput_per_s == pytest.approx(1000.0 / 3.0)
    assert candidate.tensors == ["a", "b"]
    assert candidate.bytes == 1000
    assert candidate.output_bytes == 40


def test_no_split_has_no_transfer_and_no_tail() -> None:
    link = AcceleratorLink(bandwidth_mbps=1.0, latency_microseconds=100)
    whole = price(SegmentCosts(None, (), 0, 0, 5.0, 0.0), link)
    assert (whole.transfer_ms, whole.tail_ms, whole.latency_ms) == (0.0, 0.0, 5.0)
    assert whole.throughput_per_s == pytest.approx(200.0)
    assert not whole.is_split


# A fast accelerator: cutting early (a big tensor crosses) saves the most compute.
LINK_COSTS = [
    SegmentCosts(None, (), 0, 0, 10.0, 0.0),
    SegmentCosts(1, ("big",), 4_000_000, 40, 1.0, 1.0),
    SegmentCosts(2, ("medium",), 400_000, 40, 2.0, 1.0),
    SegmentCosts(3, ("small",), 4_000, 40, 3.0, 1.0),
]


def test_a_slow_link_moves_the_cut_to_the_smallest_crossing_tensor() -> None:
    fast = plan(LINK_COSTS, FAST)
    slow = plan(LINK_COSTS, SLOW)
    assert fast.chosen.tensors == ["big"]
    assert slow.chosen.tensors == ["small"]
    smallest = min((c for c in slow.candidates if c.is_split), key=lambda c: c.bytes)
    assert slow.chosen_cut == smallest.cut_index
    assert slow.chosen.latency_ms < 10.0  # still better than no split


def test_an_unaffordable_link_means_no_split() -> None:
    costs = [SegmentCosts(None, (), 0, 0, 1.0, 0.0), SegmentCosts(1, ("t",), 4_000_000, 40, 0.5, 0.1)]
    result = plan(costs, SLOW)
    assert result.chosen_cut is None
    assert result.chosen.tensors == []


BALANCE_COSTS = [
    SegmentCosts(None, (), 0, 0, 10.0, 0.0),
    SegmentCosts(1, ("a",), 400, 40, 1.0, 9.0),
    SegmentCosts(2, ("b",), 400, 40, 5.0, 5.0),
    SegmentCosts(3, ("c",), 400, 40, 9.0, 1.0),
]


def test_throughput_picks_the_balanced_cut_and_latency_does_not_split() -> None:
    throughput = plan(BALANCE_COSTS, FAST, "throughput")
    assert throughput.chosen.tensors == ["b"]
    assert throughput.chosen.throughput_per_s == pytest.approx(200.0)
    latency = plan(BALANCE_COSTS, FAST, "latency")  # every cut costs 10 ms plus the transfer
    assert latency.chosen_cut is None


def test_plan_id_is_stable_and_covers_the_decision() -> None:
    first, second = plan(BALANCE_COSTS, FAST, "throughput"), plan(list(reversed(BALANCE_COSTS)), FAST, "throughput")
    assert first.canonical_json() == second.canonical_json()
    assert len(first.plan_id) == 64
    assert first.plan_id == second.plan_id
    assert plan(BALANCE_COSTS, FAST, "latency").plan_id != first.plan_id
    document = json.loads(first.canonical_json())
    assert document["apiVersion"] == "edgefleet.io/partition-plan/v1"
    assert document["chosenCut"] == 2
    assert document["link"]["bandwidthMBps"] == 20000
    assert {"cutIndex", "headMs", "transferMs", "tailMs", "latencyMs", "throughputPerS"} <= set(
        document["candidates"][1]
    )
    assert PartitionPlan.model_validate_json(first.canonical_json()).plan_id == first.plan_id


def test_a_manual_cut_is_chosen_whatever_it_costs() -> None:
    result = plan(BALANCE_COSTS, FAST, "latency", manual_cut=["c"])
    assert result.chosen_cut == 3
    assert result.manual_cut == ["c"]
    with pytest.raises(PartitionError, match="nope"):
        plan(BALANCE_COSTS, FAST, manual_cut=["nope"])


def test_the_plan_needs_a_no_split_baseline() -> None:
    with pytest.raises(PartitionError, match="baseline"):
        plan(BALANCE_COSTS[1:], FAST)


def test_a_class_without_accelerator_or_link_is_refused() -> None:
    with pytest.raises(PartitionError, match="no accelerator"):
        accelerator_link(device_class(accelerator=False))
    with pytest.raises(PartitionError, match="link"):
        accelerator_link(device_class(None))
    with pytest.raises(PartitionError, match="link"):
        plan_partition(tiny_cnn(), device_class(None), runs=1)


@pytest.mark.parametrize("build", [tiny_cnn, wide_mlp], ids=["tiny_cnn", "wide_mlp"])
def test_plan_partition_profiles_every_cut_on_real_sessions(build: Any) -> None:
    model = build()
    result = plan_partition(model, device_class(FAST), policy="throughput", runs=2, warmup=1, measure=True)
    assert result.model_digest == model_digest(model)
    assert result.tail_execution_provider == "TensorrtExecutionProvider"
    # Never pretend: tails run on the accelerator's provider only where it exists.
    assert result.tail_measured_on == ("TensorrtExecutionProvider" if can_run("TensorrtExecutionProvider") else CPU_EP)
    whole, *splits = result.candidates
    assert whole.cut_index is None
    assert whole.tail_ms == 0
    assert splits
    keys = [c.key for c in splits]
    assert len(set(keys)) == len(keys)
    assert [k[0] for k in keys] == sorted(k[0] for k in keys if k[0] is not None)
    inputs = example_inputs(model)
    for candidate in splits:
        assert candidate.bytes > 0
        assert candidate.output_bytes == 40
        assert candidate.tail_ms > 0
        assert candidate.latency_ms >= candidate.head_ms + candidate.tail_ms
        verify_split(model, split_for(model, result, candidate), inputs)
    assert all(c.measured_ms is not None and c.measured_latency_ms is not None for c in result.candidates)
    assert result.chosen in result.candidates


def test_example_inputs_follow_the_declared_types() -> None:
    feed = example_inputs(tiny_cnn())
    assert list(feed) == ["input"]
    assert feed["input"].shape == (1, 1, 8, 8)
    assert str(feed["input"].dtype) == "float32"


def test_the_closest_contenders_are_timed_again_in_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgefleet_core.partition import plan as plan_module

    timed: list[int | None] = []
    real = plan_module._split_costs

    def counting(split: Any, *args: Any, **kwargs: Any) -> SegmentCosts:
        timed.append(split.cut.index)
        return real(split, *args, **kwargs)

    monkeypatch.setattr(plan_module, "_split_costs", counting)
    result = plan_partition(tiny_cnn(), device_class(FAST), policy="throughput", runs=1, warmup=0, fission=False)
    splits = len(result.candidates) - 1  # every candidate but the whole model is a split, timed once first
    first, again = timed[:splits], timed[splits:]
    assert sorted(first, key=str) == sorted({c.cut_index for c in result.candidates} - {None}, key=str)
    # Up to three contenders (the whole model among them, possibly) are timed twice more, one after another.
    contenders = list(dict.fromkeys(again))
    assert 1 <= len(contenders) <= plan_module.CONFIRM_CONTENDERS
    rounds = plan_module.CONFIRM_ROUNDS - 1
    assert again == contenders * rounds


def test_a_contender_costs_the_median_of_its_timings() -> None:
    from edgefleet_core.partition.plan import _median_costs

    rounds = [SegmentCosts(3, ("a",), 10, 0, head, tail) for head, tail in ((1.0, 9.0), (5.0, 2.0), (2.0, 3.0))]
    merged = _median_costs(rounds)
    assert (merged.head_ms, merged.tail_ms) == (2.0, 3.0)
    assert (merged.cut_index, merged.tensors, merged.nbytes) == (3, ("a",), 10)
