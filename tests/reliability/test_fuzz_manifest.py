"""Fuzz target: the bundle manifest (and the partition plan and self-test inside it) as a device parses it.

Seeds are real manifests (a whole-model one and a head/tail one with a partition plan and a
self-test); a mutation edits the JSON tree where it matters — deletes a field, swaps a value for
an extreme one (2**63, -1, 1e400 which JSON reads as infinity, NaN, a 100 KiB string, a deep
list), renames a key, adds one, repeats a list element — or edits the serialized bytes (cut,
flip, a control character, a BOM). Every input must end in :class:`BundleError` or a manifest
that behaves: its canonical JSON serializes and parses back to the same manifest, and its plan
either parses (then has a canonical form and an id) or is refused with pydantic's
``ValidationError`` / :class:`PartitionError`, which is what the agent and ``edgefleet bundle
publish`` catch.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edgefleet_core.bundle.manifest import parse_manifest
from edgefleet_core.bundle.selftest import SelfTest, SelfTestTensor
from edgefleet_core.errors import BundleError
from edgefleet_core.partition.cuts import PartitionError
from edgefleet_core.partition.plan import PartitionPlan
from tests.support.json_paths import at
from tests.support.json_paths import paths as json_paths
from tests.support.reliability import fuzz_examples, record_fuzz

pytestmark = [pytest.mark.reliability, pytest.mark.fuzz]

MANIFEST = "bundle manifest (JSON tree and byte mutations)"
PLAN = "partition plan (parsed alone, as `bundle publish --partition-plan` reads it)"
CRASHES_FIXED = {
    MANIFEST: [
        "1e400 (JSON for infinity) in lineage/recipe/partitionPlan was accepted, then canonical_json raised ValueError",
    ],
    PLAN: [
        "1e400 in a candidate's headMs/latencyMs/... was accepted, then canonical_json/plan_id raised ValueError",
    ],
}
Json = Any


def _file(name: str, role: str) -> dict[str, Json]:
    return {
        "name": name,
        "role": role,
        "sha256": "12" * 32,
        "length": 4096,
        "encoding": {"target": f"{name}.eft", "sha256": "34" * 32, "length": 1024, "codec": "edgefleet-tensors-v1",
                     "deltaFrom": "1.0.0", "baseSha256": "56" * 32},
    }  # fmt: skip


def _plan() -> dict[str, Json]:
    def candidate(cut: int | None, tensors: list[str], **extra: Json) -> dict[str, Json]:
        return {"cutIndex": cut, "tensors": tensors, "bytes": 1024 * len(tensors), "outputBytes": 40, "headMs": 1.5,
                "transferMs": 0.3, "tailMs": 0.7 if cut else 0.0, "latencyMs": 2.5, "throughputPerS": 650.0,
                "measuredMs": 2.1, "measuredLatencyMs": 2.4, **extra}  # fmt: skip

    return {
        "apiVersion": "edgefleet.io/partition-plan/v1",
        "modelDigest": "ab" * 32,
        "deviceClass": "npu-kiosk",
        "policy": "latency",
        "link": {"bandwidthMBps": 320.0, "latencyMicroseconds": 400.0},
        "headExecutionProvider": "CPUExecutionProvider",
        "tailExecutionProvider": "OpenVINOExecutionProvider",
        "tailMeasuredOn": "CPUExecutionProvider",
        "runs": 3,
        "maxTensors": 4,
        "manualCut": None,
        "candidates": [
            candidate(None, []),
            candidate(3, ["relu1"]),
            candidate(4, ["conv2"], fission={"output": "conv2", "opType": "Conv", "parts": [8, 8]}),
        ],
        "chosenCut": 4,
        "chosenFission": "conv2",
        "outputs": ["logits"],
    }


def _self_test() -> dict[str, Json]:
    test = SelfTest(
        inputs=[SelfTestTensor.from_array("input", np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 1, 8, 8))],
        outputs=[SelfTestTensor.from_array("logits", np.arange(10, dtype=np.float32).reshape(1, 10))],
        latency_slo_ms=25.0,
    )
    document: dict[str, Json] = test.model_dump(mode="json", by_alias=True)
    return document


def _seeds() -> list[dict[str, Json]]:
    base = {
        "apiVersion": "edgefleet.io/bundle/v1",
        "model": {"namespace": "vision", "name": "digits"},
        "version": "1.2.0",
        "deviceClass": "npu-kiosk",
        "variantId": "cd" * 32,
        "lineage": {"source": "s3://models/digits.onnx", "passes": ["GraphOptimization"], "buildKey": "ef" * 32},
        "recipe": [{"type": "WeightClustering", "weightClustering": {"bits": 4}}],
        "partitionPlan": None,
        "metrics": {"accuracy": 0.97, "latencyMs": 2.5},
        "files": [_file("model.onnx", "model")],
    }
    split = {**base, "partitionPlan": _plan(), "selfTest": _self_test(),
             "files": [_file("head.onnx", "head"), _file("tail.onnx", "tail")]}  # fmt: skip
    return [base, split]


def test_seeds_are_valid() -> None:
    """Mutations start from manifests the parser accepts, plan and self-test included."""
    for seed in _seeds():
        manifest = parse_manifest(json.dumps(seed).encode())
        assert parse_manifest(manifest.canonical_json()) == manifest
    plan = PartitionPlan.model_validate(_plan())
    assert plan.chosen.fission is not None
    assert len(plan.plan_id) == 64


# --------------------------------------------------------------------------------------------------
# Mutations

_EXTREMES: list[Json] = [None, True, 0, -1, 1 << 31, (1 << 63) + 1, -(1 << 63), 0.0, -0.0, 1e-320, 1e308,
                         float("inf"), float("-inf"), float("nan"), "", "x" * 100_000, "\u0000", "\ud800", "../x",
                         [], {}, [[[[[]]]]], {"": None}]  # fmt: skip
_json_values: st.SearchStrategy[Json] = st.recursive(
    st.one_of(st.sampled_from(_EXTREMES), st.integers(), st.floats(), st.text(max_size=12), st.booleans()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)


def _mutate_tree(draw: st.DrawFn, document: dict[str, Json]) -> None:
    kind = draw(st.sampled_from(["replace", "replace", "delete", "rename", "add", "repeat", "wrap", "number"]))
    paths = [p for p in json_paths(document) if p]
    numeric = [p for p in paths if isinstance(at(document, p), int | float | None)]
    # Numbers are edited where numbers are: bounds and non-finite values are what a schema forgets.
    path = draw(st.sampled_from(numeric if kind == "number" and numeric else paths))
    parent, key = at(document, path[:-1]), path[-1]
    if kind == "replace":
        parent[key] = copy.deepcopy(draw(_json_values))  # sampled_from reuses objects: no shared ones
    elif kind == "number":
        parent[key] = draw(st.sampled_from([1e400, -1e400, float("nan"), 1 << 64, -1, 0, 0.5, 10**30]))
    elif kind == "delete":
        del parent[key]
    elif kind == "rename" and isinstance(parent, dict):
        parent[draw(st.sampled_from(["Name", "name_", "", "apiVersion", str(key).lower()]))] = parent.pop(key)
    elif kind == "add":
        target = parent[key]
        if isinstance(target, dict):
            target[draw(st.text(max_size=10))] = copy.deepcopy(draw(_json_values))
        elif isinstance(target, list):
            target.append(copy.deepcopy(draw(_json_values)))
    elif kind == "repeat" and isinstance(parent, list):
        parent.insert(key, json.loads(json.dumps(parent[key])))
    elif kind == "wrap":
        parent[key] = [parent[key]]


def _mutate_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    at = draw(st.integers(0, max(0, len(out) - 1)))
    kind = draw(st.sampled_from(["cut", "flip", "insert"]))
    if kind == "cut":
        del out[at:]
    elif kind == "flip" and out:
        out[at] ^= 1 << draw(st.integers(0, 7))
    else:
        out[at:at] = draw(st.sampled_from([b"\x00", b"\xef\xbb\xbf", b"\xff", b",", b'"', b"[" * 2000, b"\\u0000"]))
    return bytes(out)


@st.composite
def _manifest_bytes(draw: st.DrawFn) -> bytes:
    document = json.loads(json.dumps(draw(st.sampled_from(_seeds()))))
    for _ in range(draw(st.integers(1, 4))):
        _mutate_tree(draw, document)
    data = json.dumps(document, allow_nan=True).encode()
    if draw(st.integers(0, 4)) == 0:
        data = _mutate_bytes(draw, data)
    return data


# --------------------------------------------------------------------------------------------------
# Targets


@pytest.fixture(scope="module")
def executions() -> Iterator[Counter[str]]:
    counts: Counter[str] = Counter()
    yield counts
    for target, count in counts.items():
        record_fuzz(target, executions=count, crashes_fixed=CRASHES_FIXED[target])


def _check_plan(plan: PartitionPlan) -> None:
    assert PartitionPlan.model_validate_json(plan.canonical_json()) == plan
    assert len(plan.plan_id) == 64
    with contextlib.suppress(PartitionError):  # raised when the choice is not among the candidates
        plan.chosen  # noqa: B018 - the property is the check


@settings(max_examples=fuzz_examples(400), deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=_manifest_bytes())
def test_mutated_manifests_are_refused_or_round_trip(executions: Counter[str], data: bytes) -> None:
    executions[MANIFEST] += 1
    try:
        manifest = parse_manifest(data)
    except BundleError:
        return
    canonical = manifest.canonical_json()
    assert parse_manifest(canonical) == manifest
    if manifest.self_test is not None:
        for tensor in (*manifest.self_test.inputs, *manifest.self_test.outputs):
            assert tensor.array().nbytes == len(tensor.raw())
    if manifest.partition_plan:
        # As the agent reads it (edgefleet_agent.runtime.read_partition_plan): ValidationError means "no plan".
        try:
            plan = PartitionPlan.model_validate(manifest.partition_plan)
        except ValidationError:
            return
        _check_plan(plan)


@st.composite
def _plan_bytes(draw: st.DrawFn) -> bytes:
    document = _plan()
    for _ in range(draw(st.integers(1, 3))):
        _mutate_tree(draw, document)
    data = json.dumps(document, allow_nan=True).encode()
    return _mutate_bytes(draw, data) if draw(st.integers(0, 4)) == 0 else data


@settings(max_examples=fuzz_examples(300), deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=_plan_bytes())
def test_mutated_partition_plans_are_refused_or_round_trip(executions: Counter[str], data: bytes) -> None:
    executions[PLAN] += 1
    try:
        plan = PartitionPlan.model_validate_json(data)
    except ValidationError:
        return
    _check_plan(plan)
