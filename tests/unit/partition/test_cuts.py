"""Cut points and head/tail splits, verified bit for bit against the whole model in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet_core.partition.cuts import (
    CutPoint,
    CutTensor,
    PartitionError,
    enumerate_cuts,
    run_split,
    split_model,
    verify_split,
)
from tests.support.tiny_models import tiny_cnn, tiny_inputs, wide_mlp

Feed = dict[str, np.ndarray]


def _residual() -> onnx.ModelProto:
    """x → Conv a → Relu b → Conv c; out = Relu(c + a) * scale + x: a skip connection, a Constant
    read on both sides of most cuts, and a graph input the tail reads directly."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32), "w2"),
    ]
    scale = helper.make_tensor("scale_value", TensorProto.FLOAT, [], [0.5])
    nodes = [
        helper.make_node("Constant", [], ["scale"], value=scale),
        helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["a", "scale"], ["as"]),
        helper.make_node("Relu", ["as"], ["b"]),
        helper.make_node("Conv", ["b", "w2"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "a"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("Mul", ["r", "scale"], ["rs"]),
        helper.make_node("Add", ["rs", "x"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 6, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"source": "test"})
    onnx.checker.check_model(model, full_check=True)
    return model


def _two_outputs() -> onnx.ModelProto:
    """``hidden`` is a graph output that the rest of the graph also reads; ``logits`` the other output."""
    rng = np.random.default_rng(4)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (16, 32)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.normal(0, 0.3, (32, 5)).astype(np.float32), "w1"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"]),
        helper.make_node("Tanh", ["h"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w1"], ["m"]),
        helper.make_node("Softmax", ["m"], ["logits"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5]),
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", 32]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _normal(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _verify_every_cut(model: onnx.ModelProto, feed: Feed, *, max_tensors: int = 4) -> list[CutPoint]:
    cuts = enumerate_cuts(model, max_tensors=max_tensors)
    assert cuts
    for cut in cuts:
        split = split_model(model, cut)
        for part in (split.head, split.tail):
            onnx.checker.check_model(part, full_check=True)
            assert part.ir_version == model.ir_version
            assert list(part.opset_import) == list(model.opset_import)
            assert list(part.metadata_props) == list(model.metadata_props)
        assert [o.name for o in split.head.graph.output][: len(cut.tensors)] == list(cut.names)
        assert {i.name for i in split.tail.graph.input} == {*cut.names, *(t.name for t in cut.forwarded)}
        verify_split(model, split, feed)
    return cuts


def test_chain_models_cut_after_every_node() -> None:
    cnn = tiny_cnn()
    cuts = _verify_every_cut(cnn, {"input": tiny_inputs(5)})
    assert [c.names for c in cuts] == [("c1",), ("b1",), ("r1",), ("g1",), ("f1",)]
    assert cuts[0].tensors == (CutTensor("c1", TensorProto.FLOAT, ("N", 8, 8, 8)),)
    assert cuts[0].nbytes(batch=2) == 2 * 8 * 8 * 8 * 4
    assert (cuts[2].head_nodes, cuts[2].tail_nodes) == (3, 3)

    mlp = wide_mlp(width=64)
    cuts = _verify_every_cut(mlp, {"x": _normal((3, 64))})
    assert [c.names for c in cuts] == [("h0",), ("a0",), ("h1",), ("a1",)]


def test_skip_connection_gives_multi_tensor_frontiers() -> None:
    model = _residual()
    cuts = _verify_every_cut(model, {"x": _normal((2, 4, 6, 6), seed=1)})
    names = [c.names for c in cuts]
    assert names == [("a",), ("a", "as"), ("a", "b"), ("a", "c"), ("s",), ("r",), ("rs",)]
    # Constants and graph inputs never cross: x is forwarded to the tail by the caller.
    assert all(t.name == "x" for c in cuts for t in c.forwarded)
    assert all("scale" not in c.names and "x" not in c.names for c in cuts)
    assert [c.names for c in enumerate_cuts(model, max_tensors=1)] == [("a",), ("s",), ("r",), ("rs",)]


def test_constants_are_copied_into_each_side() -> None:
    split = split_model(_residual(), ["a", "b"])
    for part in (split.head, split.tail):
        assert [n.op_type for n in part.graph.node].count("Constant") == 1
    assert [i.name for i in split.head.graph.initializer] == ["w1"]
    assert [i.name for i in split.tail.graph.initializer] == ["w2"]


def test_graph_output_read_by_the_tail_crosses_and_is_returned() -> None:
    model = _two_outputs()
    feed = {"x": _normal((4, 16), seed=2)}
    cuts = _verify_every_cut(model, feed)
    assert [c.names for c in cuts] == [("h",), ("hidden",), ("m",)]
    split = split_model(model, ["hidden"])
    result = run_split(split, feed)
    assert list(result) == ["logits", "hidden"]
    late = split_model(model, cuts[-1])
    assert [o.name for o in late.head.graph.output] == ["m", "hidden"]


def test_digits_cnn_sample_splits_exactly() -> None:
    torch = pytest.importorskip("torch")
    from edgefleet_core.samples.architectures import PlainCNN, plain_cnn_onnx

    torch.manual_seed(0)
    module = PlainCNN((8, 16, 16), 16, batch_norm=True).eval()
    model = plain_cnn_onnx(module, "digits_cnn", "untrained, for cut tests")
    cuts = _verify_every_cut(model, {"input": _normal((3, 1, 8, 8), seed=5)})
    assert len(cuts) == len(model.graph.node) - 1 - sum(n.op_type == "Constant" for n in model.graph.node)


def test_manual_cut_must_be_a_frontier() -> None:
    model = _residual()
    with pytest.raises(PartitionError, match="'b'") as info:
        split_model(model, ["b"])
    assert info.value.tensors[0] == "b"
    assert "a" in info.value.tensors  # the skip connection also crosses there
    split = split_model(model, ["b", "a"])
    assert split.cut.names == ("a", "b")
    verify_split(model, split, {"x": _normal((1, 4, 6, 6))})


@pytest.mark.parametrize(
    ("cut", "named", "message"),
    [
        (["nope"], "nope", "not a tensor of this model"),
        (["x"], "x", "graph input"),
        (["w1"], "w1", "constant"),
        (["scale"], "scale", "constant"),
        (["a", "a"], "a", "twice"),
        (["out"], "out", "not on a frontier"),
    ],
)
def test_manual_cut_errors_name_the_tensor(cut: list[str], named: str, message: str) -> None:
    with pytest.raises(PartitionError, match=message) as info:
        split_model(_residual(), cut)
    assert named in str(info.value)
    assert info.value.tensors[0] == named


def test_empty_manual_cut_and_bad_max_tensors() -> None:
    with pytest.raises(PartitionError, match="at least one tensor"):
        split_model(_residual(), [])
    with pytest.raises(PartitionError, match="max_tensors"):
        enumerate_cuts(_residual(), max_tensors=0)


def test_split_shares_nothing_with_the_model() -> None:
    model = _residual()
    before = model.SerializeToString(deterministic=True)
    split = split_model(model, enumerate_cuts(model)[0])
    split.head.graph.initializer[0].float_data.append(1.0)
    split.tail.graph.node[0].name = "changed"
    assert model.SerializeToString(deterministic=True) == before


def test_unsorted_graph_is_ordered_deterministically() -> None:
    model = tiny_cnn()
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(model)
    shuffled.graph.ClearField("node")
    shuffled.graph.node.extend(reversed(model.graph.node))
    assert enumerate_cuts(shuffled) == enumerate_cuts(model)
    split = split_model(shuffled, ["r1"])
    verify_split(model, split, {"input": tiny_inputs(2)})


def test_verify_split_catches_a_wrong_tail() -> None:
    model = tiny_cnn()
    feed = {"input": tiny_inputs(2)}
    split = split_model(model, ["f1"])
    fc_w = next(i for i in split.tail.graph.initializer if i.name == "fc_w")
    changed = numpy_helper.to_array(fc_w).copy()
    changed[0, 0] += 1.0
    fc_w.CopyFrom(numpy_helper.from_array(changed, "fc_w"))
    with pytest.raises(PartitionError, match="'logits' differs"):
        verify_split(model, split, feed)
    with pytest.raises(PartitionError, match="'input'"):
        run_split(split, {})


def test_cut_from_another_model_is_refused() -> None:
    cut = enumerate_cuts(_residual())[0]
    with pytest.raises(PartitionError, match="'a'"):
        split_model(tiny_cnn(), cut)


def test_nbytes_with_unknown_sizes() -> None:
    assert CutTensor("t", TensorProto.FLOAT16, ("N", 3)).nbytes(batch=4) == 4 * 3 * 2
    assert CutTensor("t", TensorProto.FLOAT, ("N", "H")).nbytes() is None
    assert CutTensor("t", TensorProto.STRING, (2,)).nbytes() is None
    assert CutTensor("t", TensorProto.FLOAT, (), rank_known=False).nbytes() is None
    assert CutTensor("t", TensorProto.INT64, ()).nbytes() == 8
