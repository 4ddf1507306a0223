"""Infinite costs in partition plans: refused when a plan is parsed, and never priced into one.

Found by the manifest fuzz target (tests/reliability/test_fuzz_manifest.py): ``headMs: 1e400``
passed ``gt=0``, then ``canonical_json`` (and so ``plan_id``, which the agent computes for every
partitioned model it loads) raised ``ValueError``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from edgefleet_core.partition.cuts import PartitionError
from edgefleet_core.partition.plan import PartitionPlan, SegmentCosts, price
from edgefleet_core.resources.device_class import AcceleratorLink


def _plan(**candidate: Any) -> dict[str, Any]:
    whole = {"cutIndex": None, "tensors": [], "bytes": 0, "outputBytes": 40, "headMs": 1.5, "transferMs": 0.0,
             "tailMs": 0.0, "latencyMs": 1.5, "throughputPerS": 650.0, **candidate}  # fmt: skip
    return {
        "modelDigest": "ab" * 32,
        "deviceClass": "npu-kiosk",
        "policy": "latency",
        "link": {"bandwidthMBps": 320.0},
        "headExecutionProvider": "CPUExecutionProvider",
        "tailExecutionProvider": "OpenVINOExecutionProvider",
        "tailMeasuredOn": "CPUExecutionProvider",
        "runs": 3,
        "maxTensors": 4,
        "candidates": [whole],
        "chosenCut": None,
    }


@pytest.mark.parametrize(
    "field", ["headMs", "transferMs", "tailMs", "latencyMs", "throughputPerS", "measuredMs", "measuredLatencyMs"]
)
def test_an_infinite_cost_is_refused(field: str) -> None:
    text = json.dumps(_plan(**{field: float("inf")})).replace("Infinity", "1e400")
    with pytest.raises(ValidationError, match="finite"):
        PartitionPlan.model_validate_json(text)


def test_a_finite_plan_has_an_id() -> None:
    plan = PartitionPlan.model_validate(_plan())
    assert len(plan.plan_id) == 64


def test_a_link_so_slow_the_transfer_overflows_is_a_partition_error() -> None:
    """Found by the CR spec fuzz target: ``bandwidthMBps: 5e-324`` is valid (> 0) and made every cut cost infinity.

    The reconciler then crashed on the plan's canonical JSON; now the planner refuses the cut with
    the error it documents, and ``auto`` partitioning ships the whole model instead.
    """
    link = AcceleratorLink.model_validate({"bandwidthMBps": 5e-324})
    costs = SegmentCosts(cut_index=3, tensors=("relu1",), nbytes=1024, output_nbytes=40, head_ms=1.0, tail_ms=1.0)
    with pytest.raises(PartitionError, match="not finite"):
        price(costs, link)
    whole = SegmentCosts(cut_index=None, tensors=(), nbytes=0, output_nbytes=40, head_ms=1.0, tail_ms=0.0)
    assert price(whole, link).latency_ms == 1.0  # no split moves nothing over the link
