"""Operator fission: a heavy Conv / Gemm / MatMul computed in two parts, exactly, so a cut can fall inside it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet_core.optimize.runtime import run, session
from edgefleet_core.partition import plan as plan_module
from edgefleet_core.partition.cuts import VERIFY_OPTIMIZATION, PartitionError, cut_after, split_model, verify_split
from edgefleet_core.partition.fission import (
    MIN_PART,
    apply_fission,
    balanced_split,
    fission,
    fission_sites,
    rebalanced_split,
)
from edgefleet_core.partition.plan import PartitionPlan, plan_partition, split_for
from edgefleet_core.partition.profile import example_inputs
from tests.support.tiny_models import tiny_cnn, wide_mlp
from tests.unit.partition.test_plan import FAST, device_class


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], x: list[int | str], y: list[int | str]) -> Any:
    graph = helper.make_graph(
        nodes,
        "fission",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


RNG = np.random.default_rng(7)


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def conv_model(*, bias: bool = True, group: int = 1, channels: int = 32) -> Any:
    inits = {"w": _f32(channels, 8 // group, 3, 3)}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = _f32(channels)
        inputs.append("b")
    nodes = [
        helper.make_node("Conv", inputs, ["c"], pads=[1, 1, 1, 1], group=group),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    return _model(nodes, inits, ["N", 8, 6, 6], ["N", channels, 6, 6])


def gemm_model(*, trans_b: int, c_shape: tuple[int, ...] | None) -> Any:
    inits = {"w": _f32(48, 24) if trans_b else _f32(24, 48)}
    inputs = ["x", "w"]
    if c_shape is not None:
        inits["c"] = _f32(*c_shape)
        inputs.append("c")
    nodes = [
        helper.make_node("Gemm", inputs, ["g"], transB=trans_b, alpha=0.5, beta=2.0),
        helper.make_node("Tanh", ["g"], ["y"]),
    ]
    return _model(nodes, inits, [5, 24], [5, 48])


def matmul_model() -> Any:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Sigmoid", ["m"], ["y"])]
    return _model(nodes, {"w": _f32(16, 40)}, [2, 3, 16], [2, 3, 40])


def _exact(model: Any, other: Any, feed: dict[str, np.ndarray]) -> bool:
    want = run(session(model, optimization=VERIFY_OPTIMIZATION), None, feed)
    got = run(session(other, optimization=VERIFY_OPTIMIZATION), None, feed)
    return all(a.tobytes() == b.tobytes() and a.shape == b.shape for a, b in zip(want, got, strict=True))


CASES: dict[str, tuple[Callable[[], onnx.ModelProto], str, list[int]]] = {
    "conv+bias": (conv_model, "c", [16, 16]),
    "conv": (lambda: conv_model(bias=False), "c", [8, 24]),
    "gemm-transB-vector-C": (lambda: gemm_model(trans_b=1, c_shape=(48,)), "g", [16, 32]),
    "gemm-matrix-C": (lambda: gemm_model(trans_b=0, c_shape=(5, 48)), "g", [24, 24]),
    "gemm-broadcast-C": (lambda: gemm_model(trans_b=0, c_shape=(5, 1)), "g", [40, 8]),
    "gemm-no-C": (lambda: gemm_model(trans_b=1, c_shape=None), "g", [8, 40]),
    "matmul-3d": (matmul_model, "m", [8, 32]),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_fissioned_operator_computes_the_same_bits(case: str) -> None:
    build, output, parts = CASES[case]
    model = build()
    fissioned = apply_fission(model, output, parts)
    onnx.checker.check_model(fissioned, full_check=True)
    ops = [n.op_type for n in fissioned.graph.node]
    assert ops.count("Concat") == 1
    # The parts replace the operator where it was: a cut right after the first is a frontier.
    cut = cut_after(fissioned, f"{output}/fission/0")
    assert f"{output}/fission/0" in cut.names
    assert _exact(model, fissioned, example_inputs(model, batch=3))
    split = split_model(fissioned, cut)
    verify_split(model, split, example_inputs(model, batch=2))
    # The whole weight is gone: each part carries its slice.
    assert "w" not in {t.name for t in fissioned.graph.initializer}


def test_sites_are_ungrouped_constant_weight_operators_wide_enough_to_split() -> None:
    assert [(s.output, s.op_type, s.channels) for s in fission_sites(conv_model())] == [("c", "Conv", 32)]
    assert fission_sites(conv_model(group=2)) == []
    assert fission_sites(conv_model(channels=2 * MIN_PART - 1)) == []
    assert [s.channels for s in fission_sites(gemm_model(trans_b=0, c_shape=None))] == [48]
    # A weight listed as a graph input can be overridden at run time: it cannot be sliced ahead.
    model = matmul_model()
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [16, 40]))
    assert fission_sites(model) == []
    # A Gemm bias that fits neither a broadcast nor the output's last axis is left alone.
    odd = gemm_model(trans_b=1, c_shape=(48,))
    odd.graph.initializer[1].CopyFrom(numpy_helper.from_array(_f32(24), "c"))
    assert fission_sites(odd) == []


def test_bad_fissions_are_refused_naming_the_tensor() -> None:
    model = conv_model()
    with pytest.raises(PartitionError, match="'nope'"):
        apply_fission(model, "nope", [16, 16])
    with pytest.raises(PartitionError, match="32 channels"):
        apply_fission(model, "c", [16, 15])
    with pytest.raises(PartitionError, match="at least 8"):
        apply_fission(model, "c", [4, 28])
    with pytest.raises(PartitionError, match="'y'"):
        apply_fission(model, "y", [16, 16])  # Relu: not an operator fission splits


def test_a_weight_another_node_reads_is_kept_and_new_names_never_collide() -> None:
    w = _f32(16, 16)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m/fission/0"]),
        helper.make_node("MatMul", ["m/fission/0", "w"], ["y"]),
    ]
    model = _model(nodes, {"w": w}, [4, 16], [4, 16])
    fissioned = apply_fission(model, "m/fission/0", [8, 8])
    assert "w" in {t.name for t in fissioned.graph.initializer}  # the second MatMul still reads it
    outputs = [o for n in fissioned.graph.node for o in n.output]
    assert len(outputs) == len(set(outputs))
    assert _exact(model, fissioned, {"x": _f32(4, 16)})


def test_balanced_split_evens_out_the_stages_within_bounds() -> None:
    assert balanced_split(128, 1.0, 2.0, 1.0) == 64
    # 0.4 ms before, 1.4 ms operator, 0.6 ms after: the head takes 8/14 of the channels (73 → 80, a multiple of 16).
    assert balanced_split(128, 0.4, 1.4, 0.6) == 80
    assert balanced_split(128, 5.0, 1.0, 0.0) == MIN_PART  # the head is already the slow side
    assert balanced_split(128, 0.0, 1.0, 5.0) == 128 - MIN_PART
    assert balanced_split(24, 0.0, 1.0, 0.0) == 12
    with pytest.raises(PartitionError, match="cannot be split"):
        balanced_split(15, 0.0, 1.0, 0.0)


def test_cut_after_takes_every_live_tensor_and_refuses_the_last_node() -> None:
    model = tiny_cnn()
    cut = cut_after(model, "c1")
    assert cut.names == ("c1",)
    assert cut.index == 1
    with pytest.raises(PartitionError, match="last node"):
        cut_after(model, "logits")
    with pytest.raises(PartitionError, match="'ghost'"):
        cut_after(model, "ghost")


def test_the_planner_tries_the_dominant_operator_split_and_offers_it_only_exact() -> None:
    model = wide_mlp(width=512)
    inputs = example_inputs(model, batch=32)  # the 512x512 MatMul is most of the model's time
    result = plan_partition(model, device_class(FAST), policy="throughput", inputs=inputs, runs=5, warmup=2)
    fissions = {c.fission.output: c for c in result.candidates if c.fission is not None}
    assert "h1" in fissions, "the planner must try the dominant MatMul split"
    for output, candidate in fissions.items():
        assert candidate.fission is not None
        assert sum(candidate.fission.parts) == 512  # h0 and h1 both have 512 features
        assert fission(model, output, candidate.fission.parts).parts[0] in candidate.tensors
        assert candidate.head_ms > 0
        assert candidate.tail_ms > 0
        verify_split(model, split_for(model, result, candidate), inputs)
    # The plan travels as JSON and comes back the same, fission and choice included.
    again = PartitionPlan.model_validate_json(result.canonical_json())
    assert again == result
    assert again.plan_id == result.plan_id
    assert again.chosen == result.chosen


def test_plans_without_fission_keep_their_canonical_bytes() -> None:
    model = tiny_cnn()
    result = plan_partition(model, device_class(FAST), policy="throughput", runs=1, warmup=0, fission=False)
    assert all(c.fission is None for c in result.candidates)
    document = json.loads(result.canonical_json())
    assert "chosenFission" not in document
    assert all("fission" not in c for c in document["candidates"])


def test_a_fission_that_is_not_exact_is_never_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    def inexact(*_: object) -> None:
        raise PartitionError("differs")

    monkeypatch.setattr(plan_module, "verify_split", inexact)
    result = plan_partition(wide_mlp(width=512), device_class(FAST), policy="throughput", runs=2, warmup=1)
    assert all(c.fission is None for c in result.candidates)


def test_optimized_sessions_agree_on_the_fissioned_gemm() -> None:
    # Not the planner's guarantee (that is with fusions off), but what the agent runs: it holds here.
    model = gemm_model(trans_b=1, c_shape=(48,))
    fissioned = apply_fission(model, "g", [16, 32])
    feed = {"x": _f32(5, 24)}
    level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    want = run(session(model, optimization=level), None, feed)
    got = run(session(fissioned, optimization=level), None, feed)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(want, got, strict=True))


def conv_chain(tail: list[onnx.NodeProto], extra: dict[str, np.ndarray], side: int = 6) -> Any:
    """x → Conv (32 channels) → ``tail`` (reading "c", ending in "z", ``side`` pixels square) → 1x1 Conv to 4 → y."""
    inits = {"w": _f32(32, 8, 3, 3), "b": _f32(32), "w2": _f32(4, 32, 1, 1), **extra}
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        *tail,
        helper.make_node("Conv", ["z", "w2"], ["y"]),
    ]
    return _model(nodes, inits, ["N", 8, 6, 6], ["N", 4, side, side])


def _bn(channels: int = 32) -> dict[str, np.ndarray]:
    return {
        "scale": _f32(channels),
        "shift": _f32(channels),
        "mean": _f32(channels),
        "var": np.abs(_f32(channels)) + 0.5,
    }


CHAINS: dict[str, tuple[Callable[[], onnx.ModelProto], tuple[str, ...]]] = {
    "batchnorm-relu": (
        lambda: conv_chain(
            [
                helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"]),
                helper.make_node("Relu", ["n"], ["z"]),
            ],
            _bn(),
        ),
        ("BatchNormalization", "Relu"),
    ),
    "per-channel-add-then-scalar-mul-then-clip": (
        lambda: conv_chain(
            [
                helper.make_node("Add", ["k", "c"], ["a"]),  # the constant first: Add commutes, its order is kept
                helper.make_node("Mul", ["a", "half"], ["m"]),
                helper.make_node("Clip", ["m", "lo", "hi"], ["z"]),
            ],
            {
                "k": _f32(32, 1, 1),
                "half": np.array(0.5, np.float32),
                "lo": np.array(0.0, np.float32),
                "hi": np.array(6.0, np.float32),
            },
        ),
        ("Add", "Mul", "Clip"),
    ),
    "prelu-per-channel-slope": (
        lambda: conv_chain([helper.make_node("PRelu", ["c", "slope"], ["z"])], {"slope": _f32(32, 1, 1)}),
        ("PRelu",),
    ),
    "relu-then-max-pool": (
        lambda: conv_chain(
            [
                helper.make_node("Relu", ["c"], ["r"]),
                helper.make_node("MaxPool", ["r"], ["z"], kernel_shape=[2, 2], strides=[2, 2]),
            ],
            {},
            side=3,
        ),
        ("Relu", "MaxPool"),
    ),
    "padded-average-pool-then-global-average-pool": (
        lambda: conv_chain(
            [
                helper.make_node("AveragePool", ["c"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                helper.make_node("GlobalAveragePool", ["p"], ["z"]),
            ],
            {},
            side=1,
        ),
        ("AveragePool", "GlobalAveragePool"),
    ),
    "a-max-pool-with-indices-stops-the-chain": (
        lambda: conv_chain(
            [
                helper.make_node("Relu", ["c"], ["r"]),
                helper.make_node("MaxPool", ["r"], ["z", "where"], kernel_shape=[2, 2], strides=[2, 2]),
            ],
            {},
            side=3,
        ),
        ("Relu",),
    ),
    "a-spatial-constant-stops-the-chain": (
        lambda: conv_chain(
            [helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Add", ["r", "row"], ["z"])],
            {"row": _f32(6)},  # broadcasts along the width: it would mix into every channel's part the same
        ),
        ("Relu",),
    ),
    "a-second-reader-stops-the-chain": (
        lambda: conv_chain(
            [helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Add", ["r", "c"], ["z"])],  # a residual
            {},
        ),
        (),
    ),
    "a-run-time-operand-stops-the-chain": (
        lambda: conv_chain(
            [
                helper.make_node("Relu", ["c"], ["r"]),
                helper.make_node("ReduceMean", ["x"], ["g"], axes=[1], keepdims=1),
                helper.make_node("Mul", ["r", "g"], ["z"]),
            ],
            {},
        ),
        ("Relu",),
    ),
}


@pytest.mark.parametrize("case", list(CHAINS), ids=list(CHAINS))
def test_per_channel_successors_are_split_with_the_operator_and_stay_exact(case: str) -> None:
    build, absorbed = CHAINS[case]
    model = build()
    result = fission(model, "c", [16, 16])
    onnx.checker.check_model(result.model, full_check=True)
    assert result.absorbed == absorbed
    ops = [n.op_type for n in result.model.graph.node]
    for op in absorbed:
        assert ops.count(op) == 2, f"{op} is in both parts and nowhere else"
    (concat,) = [n for n in result.model.graph.node if n.op_type == "Concat"]
    assert list(concat.input) == list(result.parts)
    assert list(concat.output) == [result.joined]
    # Whatever read the chain's end still reads it under its name; no whole per-channel constant stays.
    feed = example_inputs(model, batch=3)
    assert _exact(model, result.model, feed)
    verify_split(model, split_model(result.model, cut_after(result.model, result.parts[0])), feed)
    names = {t.name for t in result.model.graph.initializer}
    assert not names & {"w", "b", "scale", "shift", "mean", "var", "k", "slope"}


def test_a_graph_output_ends_the_chain_under_its_own_name() -> None:
    result = fission(conv_model(), "c", [16, 16])  # Conv → Relu → graph output y
    assert result.absorbed == ("Relu",)
    assert result.joined == "y"
    assert [o.name for o in result.model.graph.output] == ["y"]


def test_the_optimized_head_part_is_one_fused_kernel(tmp_path: Path) -> None:
    # What the absorption is for: ONNX Runtime fuses Conv + BatchNormalization + Relu in each part,
    # where a Concat between them (the old fission) left BatchNormalization and Relu on their own.
    model = CHAINS["batchnorm-relu"][0]()
    result = fission(model, "c", [16, 16])
    split = split_model(result.model, cut_after(result.model, result.parts[0]))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "head.onnx")
    ort.InferenceSession(split.head.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    assert [n.op_type for n in optimized.graph.node] == ["FusedConv"]


def test_a_measured_split_moves_channels_from_the_slower_stage() -> None:
    # 128 channels cost 1.28 ms (0.01 ms each); the head measured 0.2 ms slower: 10 channels move, rounded to 16.
    assert rebalanced_split(128, 80, 1.4, 1.2, 1.28) == 64
    assert rebalanced_split(128, 80, 1.2, 1.4, 1.28) == 96  # the tail is slower: the head takes more
    assert rebalanced_split(128, 80, 1.3, 1.3, 1.28) == 80  # even already
    assert rebalanced_split(128, 80, 9.0, 0.1, 1.28) == 128 - 120  # bounded by the smallest part
    assert rebalanced_split(128, 80, 1.4, 1.2, 0.0) == 80  # no operator cost measured: left alone


def test_the_planner_offers_one_candidate_per_split_operator() -> None:
    model = wide_mlp(width=512)
    result = plan_partition(model, device_class(FAST), policy="throughput", inputs=example_inputs(model, batch=32))
    keys = [c.key for c in result.candidates]
    assert len(keys) == len(set(keys))
