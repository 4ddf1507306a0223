"""The training extra: the ONNX interpreter, the trainer, and the Distillation and QAT passes.

Real data (scikit-learn's bundled digits), real training, small models and few epochs; every run
is seeded and single-threaded, so the accuracy comparisons are reproducible, not lucky.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("sklearn.datasets")

from onnxruntime.quantization import (  # noqa: E402
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

from edgefleet_core.errors import PassNotApplicable, TrainingUnsupported  # noqa: E402
from edgefleet_core.optimize.data import Dataset  # noqa: E402
from edgefleet_core.optimize.passes.base import PassContext, TrainingRequest  # noqa: E402
from edgefleet_core.optimize.passes.distillation import DistillationPass  # noqa: E402
from edgefleet_core.optimize.passes.qat import QuantizationAwareTrainingPass  # noqa: E402
from edgefleet_core.optimize.runtime import session  # noqa: E402
from edgefleet_core.resources.recipe import DistillationOptions, QuantizationAwareTrainingOptions  # noqa: E402
from edgefleet_core.training import load_trainer, logits_name  # noqa: E402
from edgefleet_core.training.onnx_module import OnnxModule, write_back  # noqa: E402
from edgefleet_core.training.trainer import FakeQuantizer, TorchTrainer  # noqa: E402

Array = npt.NDArray[np.generic]
F32 = np.float32
ROOT = Path(__file__).resolve().parents[3]


# ---------------------------------------------------------------- model building


def _model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[str],
    initializers: Mapping[str, Array] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes),
        "g",
        list(inputs),
        [onnx.ValueInfoProto(name=name) for name in outputs],  # ONNX Runtime infers the types
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()],
    )
    # IR 8/9: the newest this ONNX Runtime reads (onnx's default is newer).
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8 if opset <= 17 else 9)


def _input(name: str, dtype: type[np.generic], shape: Sequence[int | str | None]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), list(shape))


def _ort(model: onnx.ModelProto, feeds: dict[str, Array]) -> list[Array]:
    return [np.asarray(v) for v in session(model).run(None, feeds)]


def _ours(model: onnx.ModelProto, feeds: dict[str, Array]) -> list[Array]:
    module = OnnxModule(model)
    with torch.no_grad():
        values = module({k: torch.from_numpy(np.array(v)) for k, v in feeds.items()})
    return [v.numpy() for v in values]


def _assert_same_as_ort(model: onnx.ModelProto, feeds: dict[str, Array], tolerance: float = 1e-4) -> None:
    theirs, ours = _ort(model, feeds), _ours(model, feeds)
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.dtype == reference.dtype
        assert mine.shape == reference.shape
        np.testing.assert_allclose(
            mine.astype(np.float64), reference.astype(np.float64), rtol=tolerance, atol=tolerance
        )


RNG = np.random.default_rng(7)


def _r(*shape: int) -> npt.NDArray[np.float32]:
    return RNG.standard_normal(shape).astype(F32)


def _i(*values: int) -> npt.NDArray[np.int64]:
    return np.array(values, dtype=np.int64)


@dataclass
class OpCase:
    """One node fed by graph inputs (``feeds``) and initializers (``consts``), in ``order``."""

    op: str
    feeds: dict[str, Array]
    consts: dict[str, Array]
    order: list[str]
    attrs: dict[str, Any]
    outputs: int = 1
    opset: int = 17

    def model(self) -> onnx.ModelProto:
        outs = [f"y{i}" for i in range(self.outputs)]
        node = helper.make_node(self.op, self.order, outs, name="under_test", **self.attrs)
        inputs = [_input(k, v.dtype.type, v.shape) for k, v in self.feeds.items()]
        return _model([node], inputs, outs, self.consts, self.opset)


def case(op: str, *args: Array | tuple[Array] | None, outputs: int = 1, opset: int = 17, **attrs: Any) -> OpCase:
    """Plain arrays become graph inputs, 1-tuples initializers, ``None`` an omitted input."""
    feeds: dict[str, Array] = {}
    consts: dict[str, Array] = {}
    order = []
    for index, arg in enumerate(args):
        if arg is None:
            order.append("")
        elif isinstance(arg, tuple):
            consts[f"c{index}"] = arg[0]
            order.append(f"c{index}")
        else:
            feeds[f"x{index}"] = arg
            order.append(f"x{index}")
    return OpCase(op, feeds, consts, order, attrs, outputs, opset)


X4 = _r(2, 4, 7, 6)
POSITIVE = np.abs(_r(3, 5)) + 0.1
OP_CASES = {
    "conv-asymmetric-pads": case("Conv", X4, (_r(6, 2, 3, 3),), (_r(6),), group=2, pads=[0, 1, 2, 0], strides=[2, 1]),
    "conv-dilated": case("Conv", X4, (_r(3, 4, 2, 2),), dilations=[2, 2], pads=[1, 1, 1, 1]),
    "conv-same-upper": case("Conv", X4, (_r(3, 4, 3, 3),), auto_pad="SAME_UPPER", strides=[2, 2]),
    "conv-same-lower": case("Conv", X4, (_r(3, 4, 2, 2),), auto_pad="SAME_LOWER", strides=[2, 2]),
    "conv-1d": case("Conv", _r(2, 3, 9), (_r(4, 3, 3),), (_r(4),), pads=[1, 1]),
    "conv-transpose": case(
        "ConvTranspose",
        X4,
        (_r(4, 3, 3, 3),),
        (_r(6),),
        group=2,
        strides=[2, 2],
        pads=[1, 0, 0, 1],
        output_padding=[1, 0],
    ),
    "gemm": case("Gemm", _r(5, 3), (_r(4, 5),), (_r(4),), alpha=0.5, beta=2.0, transA=1, transB=1),
    "matmul-batched": case("MatMul", _r(2, 3, 4), (_r(4, 5),)),
    "add-broadcast": case("Add", _r(2, 3, 4), (_r(4),)),
    "sub": case("Sub", _r(2, 3), _r(2, 3)),
    "mul": case("Mul", _r(2, 3), (_r(1, 3),)),
    "div": case("Div", _r(2, 3), POSITIVE[:2, :3]),
    "div-int-truncates": case("Div", _i(7, -7, 9, -9), (_i(2, 2, -4, 4),)),
    "pow": case("Pow", POSITIVE, (np.array(2.5, F32),)),
    "sqrt": case("Sqrt", POSITIVE),
    "neg": case("Neg", _r(3, 4)),
    "abs": case("Abs", _r(3, 4)),
    "exp": case("Exp", _r(3, 4)),
    "log": case("Log", POSITIVE),
    "relu": case("Relu", _r(3, 4)),
    "leaky-relu": case("LeakyRelu", _r(3, 4), alpha=0.2),
    "prelu": case("PRelu", _r(2, 3, 4), (_r(3, 1),)),
    "elu": case("Elu", _r(3, 4), alpha=0.7),
    "sigmoid": case("Sigmoid", _r(3, 4)),
    "tanh": case("Tanh", _r(3, 4)),
    "erf": case("Erf", _r(3, 4)),
    "softplus": case("Softplus", _r(3, 4)),
    "gelu": case("Gelu", _r(3, 4), opset=20),
    "gelu-tanh": case("Gelu", _r(3, 4), opset=20, approximate="tanh"),
    "hard-sigmoid": case("HardSigmoid", _r(3, 4) * 4, alpha=0.3, beta=0.4),
    "hard-swish": case("HardSwish", _r(3, 4) * 4),
    "clip-inputs": case("Clip", _r(3, 4), (np.array(-0.5, F32),), (np.array(0.7, F32),)),
    "clip-max-only": case("Clip", _r(3, 4), None, (np.array(0.2, F32),)),
    "clip-attributes-opset-10": case("Clip", _r(3, 4), opset=10, min=-0.1, max=0.3),
    "softmax": case("Softmax", _r(2, 3, 4), axis=1),
    "softmax-opset-11-coerces-2d": case("Softmax", _r(2, 3, 4), opset=11, axis=1),
    "log-softmax": case("LogSoftmax", _r(2, 3, 4)),
    "batch-norm": case("BatchNormalization", X4, (_r(4),), (_r(4),), (_r(4),), (np.abs(_r(4)) + 0.5,), epsilon=1e-3),
    "instance-norm": case("InstanceNormalization", X4, (_r(4),), (_r(4),)),
    "layer-norm-last": case("LayerNormalization", _r(2, 3, 8), (_r(8),), (_r(8),)),
    "layer-norm-two-axes": case("LayerNormalization", _r(2, 3, 8), (_r(3, 8),), axis=1, epsilon=1e-3),
    "max-pool-asymmetric-ceil": case(
        "MaxPool", X4, kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 0, 1], ceil_mode=1
    ),
    "max-pool-padded": case("MaxPool", X4, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "average-pool-excludes-pad": case("AveragePool", X4, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
    "average-pool-includes-pad": case("AveragePool", X4, kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1),
    "average-pool-asymmetric": case("AveragePool", X4, kernel_shape=[2, 3], pads=[0, 2, 1, 0]),
    "global-average-pool": case("GlobalAveragePool", X4),
    "global-max-pool": case("GlobalMaxPool", X4),
    "flatten": case("Flatten", X4, axis=2),
    "reshape-zero-and-minus-one": case("Reshape", X4, (_i(0, -1, 3),)),
    "transpose": case("Transpose", X4, perm=[0, 2, 3, 1]),
    "concat": case("Concat", _r(2, 3), (_r(2, 2),), axis=1),
    "split-sizes": case("Split", _r(2, 7), (_i(3, 4),), outputs=2, axis=1),
    "split-equal-opset-18": case("Split", _r(2, 7), outputs=3, opset=18, axis=1, num_outputs=3),
    "slice-negative-steps": case("Slice", X4, (_i(-1, 0),), (_i(-100, 9),), (_i(3, 1),), (_i(-2, 2),)),
    "slice-clamped": case("Slice", X4, (_i(1),), (_i(2**62),), (_i(2),)),
    "gather-negative-indices": case("Gather", _r(3, 5, 2), (np.array([[0, -1], [2, 1]], np.int64),), axis=1),
    "gather-scalar": case("Gather", _r(3, 5), (np.array(-2, np.int64),)),
    "gather-elements": case("GatherElements", _r(3, 4), (np.array([[0, 3], [1, -1], [2, 2]], np.int64),), axis=1),
    "unsqueeze": case("Unsqueeze", _r(3, 4), (_i(0, -1),)),
    "squeeze-axes": case("Squeeze", _r(3, 1, 4, 1), (_i(-1),)),
    "squeeze-all": case("Squeeze", _r(3, 1, 4, 1)),
    "shape-range": case("Shape", X4, start=1, end=-1),
    "identity": case("Identity", _r(3)),
    "dropout": case("Dropout", _r(3, 4)),
    "cast": case("Cast", _r(3, 4) * 10, to=TensorProto.INT64),
    "reduce-mean": case("ReduceMean", X4, axes=[1, -1], keepdims=0),
    "reduce-sum-axes-input": case("ReduceSum", X4, (_i(2),)),
    "reduce-sum-all": case("ReduceSum", X4, keepdims=0),
    "reduce-max": case("ReduceMax", X4, axes=[2]),
    "reduce-l2": case("ReduceL2", X4, axes=[3]),
    "arg-max": case("ArgMax", _r(3, 5), axis=1, keepdims=0),
    "expand-both-ways": case("Expand", _r(3, 1), (_i(2, 1, 4),)),
    "where": case("Where", _r(3, 4) > 0, _r(3, 4), (_r(4),)),
    "equal": case("Equal", _i(1, 2, 3), (_i(1, 0, 3),)),
    "less": case("Less", _r(3, 4), (_r(4),)),
    "max": case("Max", _r(3, 4), _r(3, 4), (_r(4),)),
    "pad-constant": case("Pad", X4, (_i(0, 0, 1, 2, 0, 0, 3, 0),), (np.array(1.5, F32),)),
    "pad-reflect": case("Pad", X4, (_i(0, 0, 2, 1, 0, 0, 1, 2),), mode="reflect"),
    "pad-edge-axes": case("Pad", X4, (_i(1, 2, 3, 0),), None, (_i(2, 3),), opset=18, mode="edge"),
    "range": case("Range", np.array(1, np.int64), (np.array(10, np.int64),), (np.array(3, np.int64),)),
    "tile": case("Tile", _r(2, 3), (_i(2, 1),)),
    "einsum": case("Einsum", _r(2, 3, 4), (_r(4, 5),), equation="bij,jk->bik"),
    "constant-of-shape": case("ConstantOfShape", _i(2, 3), value=numpy_helper.from_array(np.array([1.5], F32))),
}


@pytest.mark.parametrize("op_case", OP_CASES.values(), ids=list(OP_CASES))
def test_each_op_computes_what_onnx_runtime_computes(op_case: OpCase) -> None:
    _assert_same_as_ort(op_case.model(), op_case.feeds)


def test_constant_nodes_are_folded_and_feed_later_nodes() -> None:
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(_r(4))),
        helper.make_node("Constant", [], ["s"], value_ints=[2, 2]),
        helper.make_node("Add", ["x", "c"], ["a"]),
        helper.make_node("Reshape", ["a", "s"], ["y"]),
    ]
    _assert_same_as_ort(_model(nodes, [_input("x", F32, [4])], ["y"]), {"x": _r(4)})


def _cnn(seed: int = 0, channels: tuple[int, int] = (8, 16)) -> onnx.ModelProto:
    """Conv+BN+Relu+MaxPool, Conv+Relu, GlobalAveragePool, Flatten, Gemm: a digits classifier (1×8×8)."""
    rng = np.random.default_rng(seed)
    c1, c2 = channels

    def he(*shape: int) -> npt.NDArray[np.float32]:
        fan_in = int(np.prod(shape[1:]))
        weights: npt.NDArray[np.float32] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(F32)
        return weights

    inits = {
        "conv1_w": he(c1, 1, 3, 3),
        "conv1_b": np.zeros(c1, F32),
        "bn_scale": np.ones(c1, F32),
        "bn_bias": np.zeros(c1, F32),
        "bn_mean": (rng.standard_normal(c1) * 0.1).astype(F32),
        "bn_var": (1.0 + rng.random(c1)).astype(F32),
        "conv2_w": he(c2, c1, 3, 3),
        "conv2_b": np.zeros(c2, F32),
        "fc_w": he(10, c2),
        "fc_b": np.zeros(10, F32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv1_w", "conv1_b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["b1"], name="bn"),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2_w", "conv2_b"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, [_input("x", F32, ["N", 1, 8, 8])], ["logits"], inits)


def _mlp(seed: int = 0, hidden: int = 64, softmax: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {
        "fc1_w": (rng.standard_normal((hidden, 64)) * np.sqrt(2 / 64)).astype(F32),
        "fc1_b": np.zeros(hidden, F32),
        "fc2_w": (rng.standard_normal((10, hidden)) * np.sqrt(2 / hidden)).astype(F32),
        "fc2_b": np.zeros(10, F32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "fc1_w", "fc1_b"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "fc2_w", "fc2_b"], ["logits"], name="fc2", transB=1),
    ]
    outputs = ["logits"]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        outputs = ["probs"]
    return _model(nodes, [_input("x", F32, ["N", 64])], outputs, inits)


def _encoder_block(dim: int = 16, heads: int = 2, ffn: int = 32) -> onnx.ModelProto:
    """Self-attention + feed-forward with Erf-GELU and two LayerNorms, as exporters write it."""
    head = dim // heads
    inits: dict[str, Array] = {
        name: _r(*shape) * 0.3
        for name, shape in {
            "wq": (dim, dim),
            "wk": (dim, dim),
            "wv": (dim, dim),
            "wo": (dim, dim),
            "w1": (dim, ffn),
            "w2": (ffn, dim),
            "bq": (dim,),
            "bk": (dim,),
            "bv": (dim,),
            "bo": (dim,),
            "b1": (ffn,),
            "b2": (dim,),
            "ln1_g": (dim,),
            "ln1_b": (dim,),
            "ln2_g": (dim,),
            "ln2_b": (dim,),
        }.items()
    }
    inits |= {
        "heads_shape": _i(0, 0, heads, -1),
        "scale": np.array(np.sqrt(head), F32),
        "sqrt2": np.array(np.sqrt(2.0), F32),
        "one": np.array(1.0, F32),
        "half": np.array(0.5, F32),
        "first_two": _i(0),
        "two": _i(2),
        "minus_one": _i(-1),
    }
    n = helper.make_node
    nodes = []
    for p in "qkv":
        nodes += [n("MatMul", ["x", f"w{p}"], [f"{p}0"]), n("Add", [f"{p}0", f"b{p}"], [f"{p}1"])]
        nodes.append(n("Reshape", [f"{p}1", "heads_shape"], [f"{p}2"]))
    nodes += [
        n("Transpose", ["q2"], ["qh"], perm=[0, 2, 1, 3]),
        n("Transpose", ["k2"], ["kh"], perm=[0, 2, 3, 1]),
        n("Transpose", ["v2"], ["vh"], perm=[0, 2, 1, 3]),
        n("MatMul", ["qh", "kh"], ["s0"]),
        n("Div", ["s0", "scale"], ["s1"]),
        n("Softmax", ["s1"], ["att"], axis=-1),
        n("MatMul", ["att", "vh"], ["ctx0"]),
        n("Transpose", ["ctx0"], ["ctx1"], perm=[0, 2, 1, 3]),
        # The merged shape is computed at run time, as dynamic-axes exports do.
        n("Shape", ["x"], ["xs"]),
        n("Slice", ["xs", "first_two", "two"], ["bs"]),
        n("Concat", ["bs", "minus_one"], ["merged_shape"], axis=0),
        n("Reshape", ["ctx1", "merged_shape"], ["ctx2"]),
        n("MatMul", ["ctx2", "wo"], ["o0"]),
        n("Add", ["o0", "bo"], ["o1"]),
        n("Add", ["x", "o1"], ["res1"]),
        n("LayerNormalization", ["res1", "ln1_g", "ln1_b"], ["ln1"], axis=-1),
        n("MatMul", ["ln1", "w1"], ["f0"]),
        n("Add", ["f0", "b1"], ["f1"]),
        n("Div", ["f1", "sqrt2"], ["g0"]),
        n("Erf", ["g0"], ["g1"]),
        n("Add", ["g1", "one"], ["g2"]),
        n("Mul", ["f1", "g2"], ["g3"]),
        n("Mul", ["g3", "half"], ["g4"]),
        n("MatMul", ["g4", "w2"], ["f2"]),
        n("Add", ["f2", "b2"], ["f3"]),
        n("Add", ["ln1", "f3"], ["res2"]),
        n("LayerNormalization", ["res2", "ln2_g", "ln2_b"], ["y"], axis=-1),
    ]
    return _model(nodes, [_input("x", F32, ["B", "S", dim])], ["y"], inits)


def test_cnn_matches_onnx_runtime() -> None:
    model = _cnn(seed=3)
    _assert_same_as_ort(model, {"x": _r(5, 1, 8, 8)})


def test_encoder_block_matches_onnx_runtime_and_trains_only_weights() -> None:
    model = _encoder_block()
    _assert_same_as_ort(model, {"x": _r(3, 5, 16)})
    _assert_same_as_ort(model, {"x": _r(1, 2, 16)})  # dynamic batch and sequence
    trained = set(OnnxModule(model).onnx_names.values())
    # Scalars (the attention scale, GELU's constants) and shapes are not weights.
    assert trained == {
        "wq",
        "wk",
        "wv",
        "wo",
        "w1",
        "w2",
        "bq",
        "bk",
        "bv",
        "bo",
        "b1",
        "b2",
        "ln1_g",
        "ln1_b",
        "ln2_g",
        "ln2_b",
    }


def test_batch_norm_statistics_stay_constant_but_affine_trains() -> None:
    names = set(OnnxModule(_cnn()).onnx_names.values())
    assert {"bn_scale", "bn_bias", "conv1_w", "fc_b"} <= names
    assert not {"bn_mean", "bn_var"} & names


def test_unsupported_op_names_the_op_and_the_node() -> None:
    nodes = [helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["picked"], name="nms_head")]
    model = _model(nodes, [_input("boxes", F32, [1, 4, 4]), _input("scores", F32, [1, 1, 4])], ["picked"])
    with pytest.raises(TrainingUnsupported, match=r"NonMaxSuppression.*nms_head"):
        OnnxModule(model)
    custom = _model(
        [helper.make_node("FancyOp", ["x"], ["y"], name="mystery", domain="com.example")],
        [_input("x", F32, [2])],
        ["y"],
    )
    with pytest.raises(TrainingUnsupported, match=r"com\.example:FancyOp.*mystery"):
        OnnxModule(custom)


def test_write_back_keeps_graph_names_and_dtypes() -> None:
    model = _cnn()
    module = OnnxModule(model)
    with torch.no_grad():
        for parameter in module.weights.values():
            parameter.add_(1.0)
    out = write_back(module, model)
    assert out.graph.node == model.graph.node
    assert [(i.name, i.data_type, list(i.dims)) for i in out.graph.initializer] == [
        (i.name, i.data_type, list(i.dims)) for i in model.graph.initializer
    ]
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    np.testing.assert_allclose(after["conv1_w"], before["conv1_w"] + 1.0)
    np.testing.assert_array_equal(after["bn_mean"], before["bn_mean"])  # a constant, untouched
    assert model.graph.initializer[0].name == "conv1_w"  # the input is not changed


def test_logits_are_taken_before_a_final_softmax() -> None:
    assert logits_name(_mlp(softmax=True)) == "logits"
    assert logits_name(_mlp()) == "logits"


# ---------------------------------------------------------------- training on real data


@dataclass(frozen=True)
class Digits:
    train: Dataset
    test: Dataset

    def images(self) -> Digits:
        """The same samples as 1×8×8 images, for the CNN."""

        def reshape(data: Dataset) -> Dataset:
            return Dataset({"x": np.asarray(data.inputs["x"]).reshape(-1, 1, 8, 8)}, data.labels)

        return Digits(reshape(self.train), reshape(self.test))


@pytest.fixture(scope="module")
def digits() -> Digits:
    bunch = datasets.load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    x = (bunch.data[order] / 16.0).astype(F32)
    y = bunch.target[order].astype(np.int64)
    return Digits(Dataset({"x": x[:1300]}, y[:1300]), Dataset({"x": x[1300:]}, y[1300:]))


def _accuracy(model: onnx.ModelProto, data: Dataset) -> float:
    (scores,) = _ort(model, dict(data.inputs))[:1]
    assert data.labels is not None
    return float(np.mean(scores.argmax(axis=1) == data.labels))


def _weights(model: onnx.ModelProto) -> dict[str, Array]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _prune(model: onnx.ModelProto, sparsity: float) -> onnx.ModelProto:
    """Magnitude pruning of every weight matrix: the damage distillation must repair."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for index, init in enumerate(out.graph.initializer):
        weight = numpy_helper.to_array(init)
        if weight.ndim >= 2:
            threshold = np.quantile(np.abs(weight), sparsity)
            pruned = np.where(np.abs(weight) <= threshold, 0, weight).astype(weight.dtype)
            out.graph.initializer[index].CopyFrom(numpy_helper.from_array(pruned, init.name))
    return out


def _train(
    model: onnx.ModelProto,
    data: Dataset,
    epochs: int,
    lr: float = 5e-3,
    *,
    seed: int = 0,
    teacher: onnx.ModelProto | None = None,
    alpha: float = 1.0,
    freeze_zeros: bool = False,
    fake_quantize: bool = False,
) -> onnx.ModelProto:
    request = TrainingRequest(
        epochs=epochs,
        learning_rate=lr,
        batch_size=64,
        teacher=teacher,
        alpha=alpha,
        freeze_zeros=freeze_zeros,
        fake_quantize=fake_quantize,
        seed=seed,
    )
    return TorchTrainer().train(model, data, request)


@pytest.fixture(scope="module")
def mlp_teacher(digits: Digits) -> onnx.ModelProto:
    """An MLP trained from scratch by the trainer itself, on labels only."""
    model = _train(_mlp(seed=1), digits.train, epochs=12, lr=1e-2)
    assert _accuracy(model, digits.test) > 0.93
    return model


@pytest.fixture(scope="module")
def cnn_teacher(digits: Digits) -> onnx.ModelProto:
    images = digits.images()
    model = _train(_cnn(seed=2), images.train, epochs=12, lr=1e-2)
    assert _accuracy(model, images.test) > 0.85
    return model


def test_training_repairs_a_pruned_model_and_keeps_zeros_at_zero(mlp_teacher: onnx.ModelProto, digits: Digits) -> None:
    damaged = _prune(mlp_teacher, 0.9)
    damaged_bytes = damaged.SerializeToString()
    damaged_accuracy = _accuracy(damaged, digits.test)
    assert damaged_accuracy < _accuracy(mlp_teacher, digits.test) - 0.05  # really damaged

    repaired = _train(damaged, digits.train, epochs=4, freeze_zeros=True)

    assert _accuracy(repaired, digits.test) > damaged_accuracy + 0.03
    assert damaged.SerializeToString() == damaged_bytes  # the input is not changed
    before, after = _weights(damaged), _weights(repaired)
    for name in ("fc1_w", "fc2_w"):
        zeros = before[name] == 0
        assert zeros.mean() >= 0.89
        assert np.all(after[name][zeros] == 0)
        assert not np.array_equal(after[name][~zeros], before[name][~zeros])


def _context(
    source: onnx.ModelProto, data: Dataset | None, trainer: TorchTrainer | None = None, seed: int = 0
) -> PassContext:
    return PassContext("CPUExecutionProvider", frozenset({"fp32", "int8"}), source, data, trainer, seed=seed)


def test_distillation_raises_agreement_with_the_teacher(mlp_teacher: onnx.ModelProto, digits: Digits) -> None:
    student = _prune(mlp_teacher, 0.9)
    student_bytes = student.SerializeToString()
    unlabeled = Dataset(digits.train.inputs)
    options = DistillationOptions(epochs=4, learning_rate=5e-3, batch_size=64)

    result = DistillationPass(options).apply(student, _context(mlp_teacher, unlabeled, TorchTrainer()))

    metrics = result.metrics
    assert metrics["agreement_after"] > metrics["agreement_before"] + 0.03
    assert metrics["loss_after"] < metrics["loss_before"]
    assert metrics["epochs"] == 4
    assert metrics["alpha"] == 1.0
    assert any("no labels" in note for note in result.notes)
    assert student.SerializeToString() == student_bytes
    zeros = _weights(student)["fc1_w"] == 0
    assert np.all(_weights(result.model)["fc1_w"][zeros] == 0)  # a pruned student stays pruned
    assert _accuracy(result.model, digits.test) > _accuracy(student, digits.test)


def test_distillation_mixes_in_labels_when_there_are_some(mlp_teacher: onnx.ModelProto, digits: Digits) -> None:
    student = _prune(mlp_teacher, 0.8)
    options = DistillationOptions(epochs=1, learning_rate=5e-3, alpha=0.5)
    result = DistillationPass(options).apply(student, _context(mlp_teacher, digits.train.take(512), TorchTrainer()))
    assert result.metrics["alpha"] == 0.5
    assert result.metrics["loss_after"] < result.metrics["loss_before"]


class _Calibration(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, data: Dataset, samples: int = 128) -> None:
        images = np.asarray(data.inputs["x"])[:samples]
        self._batches: Iterator[dict[str, Array]] = iter({"x": images[i : i + 32]} for i in range(0, samples, 32))

    def get_next(self) -> dict[str, Array] | None:
        return next(self._batches, None)


def _int8(model: onnx.ModelProto, calibration: Dataset, path: Path) -> onnx.ModelProto:
    source = path.with_suffix(".fp32.onnx")
    onnx.save(model, source)  # quantize_static rewrites a ModelProto it is given (external data)
    quantize_static(
        source,
        path,
        _Calibration(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return onnx.load(path)


def test_qat_then_static_int8_is_no_worse_than_plain_static_int8(
    cnn_teacher: onnx.ModelProto, digits: Digits, tmp_path: Path
) -> None:
    images = digits.images()
    ptq_accuracy = _accuracy(_int8(cnn_teacher, images.train, tmp_path / "ptq.onnx"), images.test)

    options = QuantizationAwareTrainingOptions(epochs=2, learning_rate=1e-3, batch_size=64)
    result = QuantizationAwareTrainingPass(options).apply(
        cnn_teacher, _context(cnn_teacher, images.train, TorchTrainer())
    )
    qat_accuracy = _accuracy(_int8(result.model, images.train, tmp_path / "qat.onnx"), images.test)

    assert result.model.graph.node == cnn_teacher.graph.node  # still FP32: QuantizeInt8 comes next
    assert result.metrics["agreement_after"] > 0.9
    assert qat_accuracy >= ptq_accuracy - 0.01
    assert qat_accuracy > 0.85

    quantized = _int8(cnn_teacher, images.train, tmp_path / "again.onnx")
    with pytest.raises(PassNotApplicable, match="already quantized"):
        QuantizationAwareTrainingPass(options).apply(quantized, _context(cnn_teacher, images.train, TorchTrainer()))


def test_simulated_int8_is_closer_to_onnx_runtime_int8_than_float_is(
    mlp_teacher: onnx.ModelProto, digits: Digits, tmp_path: Path
) -> None:
    int8 = _ort(_int8(mlp_teacher, digits.train, tmp_path / "q.onnx"), dict(digits.test.inputs))[0].astype(F32)
    fp32 = _ort(mlp_teacher, dict(digits.test.inputs))[0].astype(F32)
    module = OnnxModule(mlp_teacher)
    quantizer = FakeQuantizer(module)
    module.hook = quantizer
    with torch.no_grad():
        quantizer.calibrating = True  # on the same 128 samples the quantizer calibrates on
        module({"x": torch.from_numpy(np.array(digits.train.inputs["x"][:128]))})
        quantizer.calibrating = False
        simulated = module({"x": torch.from_numpy(np.array(digits.test.inputs["x"]))})[0].numpy()
    assert np.abs(simulated - int8).mean() < 0.75 * np.abs(fp32 - int8).mean()


def test_a_classifier_exported_with_softmax_trains_on_its_logits(digits: Digits) -> None:
    trained = _train(_mlp(seed=5, softmax=True), digits.train, epochs=3, lr=1e-2)
    assert _accuracy(trained, digits.test) > 0.85


def test_same_seed_same_weights_other_seed_other_weights(mlp_teacher: onnx.ModelProto, digits: Digits) -> None:
    data = digits.train.take(320)
    student = _prune(mlp_teacher, 0.5)

    def run(seed: int) -> onnx.ModelProto:
        return _train(
            student, data, epochs=1, seed=seed, teacher=mlp_teacher, alpha=0.5, fake_quantize=True, freeze_zeros=True
        )

    first, second, other = run(11), run(11), run(12)
    assert first.SerializeToString() == second.SerializeToString()
    assert first.SerializeToString() != other.SerializeToString()


def test_training_uses_one_thread_and_restores_the_setting(digits: Digits) -> None:
    torch.set_num_threads(2)
    try:
        _train(_mlp(), digits.train.take(64), epochs=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_float_targets_train_by_mean_squared_error() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((256, 3)).astype(F32)
    targets = (x @ np.array([[1.0], [-2.0], [0.5]], F32)).astype(F32)
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [_input("x", F32, ["N", 3])],
        ["y"],
        {"w": np.zeros((3, 1), F32)},
    )
    trained = _train(model, Dataset({"x": x}, targets), epochs=30, lr=5e-2)
    np.testing.assert_allclose(_weights(trained)["w"].astype(np.float64).ravel(), np.array([1.0, -2.0, 0.5]), atol=0.05)


def test_nothing_to_learn_from_is_refused(digits: Digits) -> None:
    with pytest.raises(TrainingUnsupported, match="nothing to learn from"):
        _train(_mlp(), Dataset(digits.train.take(10).inputs), epochs=1)


def test_labels_that_do_not_fit_the_output_are_refused(digits: Digits) -> None:
    data = Dataset(digits.train.take(10).inputs, np.full(10, 12, np.int64))
    with pytest.raises(TrainingUnsupported, match=r"outside 0\.\.9"):
        _train(_mlp(), data, epochs=1)


def test_divergence_is_reported() -> None:
    x = np.ones((8, 2), F32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Exp", ["h"], ["y"])]
    model = _model(nodes, [_input("x", F32, ["N", 2])], ["y"], {"w": np.ones((2, 1), F32)})
    with pytest.raises(TrainingUnsupported, match="training diverged"):
        _train(model, Dataset({"x": x}, np.full((8, 1), 1e30, F32)), epochs=20, lr=1e3)


# ---------------------------------------------------------------- pass preconditions


@pytest.mark.parametrize(
    ("pass_", "reason"),
    [
        (DistillationPass(DistillationOptions()), "train extra"),
        (QuantizationAwareTrainingPass(QuantizationAwareTrainingOptions()), "train extra"),
    ],
)
def test_passes_need_the_trainer(pass_: DistillationPass | QuantizationAwareTrainingPass, reason: str) -> None:
    model = _mlp()
    data = Dataset({"x": np.zeros((4, 64), F32)})
    with pytest.raises(PassNotApplicable, match=reason):
        pass_.apply(model, _context(model, data))
    with pytest.raises(PassNotApplicable, match="needs training data"):
        pass_.apply(model, _context(model, None, TorchTrainer()))


def test_a_model_the_trainer_cannot_run_skips_the_pass() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("TopK", ["h", "k"], ["y", "idx"], name="top"),
    ]
    model = _model(nodes, [_input("x", F32, ["N", 3])], ["y"], {"w": _r(3, 4), "k": _i(2)})
    data = Dataset({"x": _r(8, 3)})
    with pytest.raises(PassNotApplicable, match=r"cannot train this model: op TopK"):
        DistillationPass(DistillationOptions(epochs=1)).apply(model, _context(model, data, TorchTrainer()))


def test_pass_capabilities_are_declared() -> None:
    for pass_type in (DistillationPass, QuantizationAwareTrainingPass):
        assert pass_type.capability.needs_trainer
        assert pass_type.capability.needs_data
        assert not pass_type.capability.exact
    assert DistillationPass.pass_type == "Distillation"
    assert QuantizationAwareTrainingPass.pass_type == "QuantizationAwareTraining"


def test_load_trainer_gives_the_torch_trainer() -> None:
    assert isinstance(load_trainer(), TorchTrainer)


def test_without_torch_the_package_imports_and_offers_no_trainer() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import edgefleet_core.training as t\n"
        "import edgefleet_core.optimize.passes.distillation, edgefleet_core.optimize.passes.qat\n"
        "assert t.load_trainer() is None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_a_deferred_trainer_imports_torch_only_when_it_trains() -> None:
    script = (
        "import sys\n"
        "from edgefleet_core.training import load_trainer\n"
        "trainer = load_trainer(deferred=True)\n"
        "assert trainer is not None\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False"
