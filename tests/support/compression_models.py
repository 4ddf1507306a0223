"""Small ONNX models (opset 17, dynamic batch) and helpers for the compression-pass tests."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgefleet_core.optimize.data import Dataset
from edgefleet_core.optimize.passes.base import PassContext, Trainer, TrainingRequest
from edgefleet_core.optimize.runtime import session

Array = npt.NDArray[np.float32]
OPSET = 17


class Builder:
    """Accumulates nodes and initializers; weights are random from one seeded generator."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, prefix: str, value: npt.NDArray[np.generic]) -> str:
        name = self._name(prefix)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def random(self, *shape: int, scale: float | None = None) -> Array:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        std = scale if scale is not None else float(np.sqrt(2.0 / max(fan_in, 1)))
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def node(self, op: str, inputs: list[str], name: str | None = None, **attrs: Any) -> str:
        node_name = name or self._name(op.lower())
        output = f"{node_name}_out"
        self.nodes.append(helper.make_node(op, inputs, [output], name=node_name, **attrs))
        return output

    def conv(
        self,
        x: str,
        weight: Array,
        *,
        bias: Array | None = None,
        name: str | None = None,
        **attrs: object,
    ) -> str:
        inputs = [x, self.const("w", weight)]
        if bias is not None:
            inputs.append(self.const("b", bias))
        return self.node("Conv", inputs, name=name, **attrs)

    def batch_norm(self, x: str, channels: int, *, zero_shift: bool = False) -> str:
        scale = self.rng.uniform(0.5, 1.5, channels).astype(np.float32)
        shift = np.zeros(channels, np.float32) if zero_shift else self.random(channels, scale=0.1)
        mean = np.zeros(channels, np.float32) if zero_shift else self.random(channels, scale=0.1)
        var = self.rng.uniform(0.5, 1.5, channels).astype(np.float32)
        params = [self.const(p, v) for p, v in (("gamma", scale), ("beta", shift), ("mean", mean), ("var", var))]
        return self.node("BatchNormalization", [x, *params])

    def model(self, input_shape: tuple[int, ...], output: str, output_rank: int = 2) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *input_shape])]
        dims = ["N", *(f"d{i}" for i in range(1, output_rank))]
        outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, dims)]
        graph = helper.make_graph(self.nodes, "test", inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def cnn(seed: int = 0, *, zero_filters: int = 0, batch_norm: bool = True, wide: int = 32) -> onnx.ModelProto:
    """conv1(+BN)+Relu → MaxPool → conv2+Relu → conv3 (stride 2)+Relu → GAP → Flatten → Gemm(transB).

    With ``zero_filters`` the first that many filters of every conv (and their bias and BN shift)
    are zero: pruning them must not change the outputs at all.
    """
    b = Builder(seed)

    def weights(cout: int, cin: int) -> tuple[Array, Array]:
        w, bias = b.random(cout, cin, 3, 3), b.random(cout, scale=0.1)
        w[:zero_filters] = 0
        bias[:zero_filters] = 0
        return w, bias

    w1, b1 = weights(16, 3)
    x = b.conv("x", w1, bias=b1, name="conv1", pads=[1, 1, 1, 1])
    if batch_norm:
        x = b.batch_norm(x, 16, zero_shift=zero_filters > 0)
    x = b.node("Relu", [x])
    x = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    w2, b2 = weights(wide, 16)
    x = b.node("Relu", [b.conv(x, w2, bias=b2, name="conv2", pads=[1, 1, 1, 1])])
    w3, b3 = weights(wide, wide)
    x = b.node("Relu", [b.conv(x, w3, bias=b3, name="conv3", pads=[1, 1, 1, 1], strides=[2, 2])])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    x = b.node("Gemm", [x, b.const("fc", b.random(10, wide)), b.const("fcb", b.random(10, scale=0.1))], transB=1)
    return b.model((3, 16, 16), x)


def flatten_cnn(seed: int = 0, *, zero_filters: int = 0, reshape: bool = False) -> onnx.ModelProto:
    """conv+Relu → MaxPool → conv+Sigmoid·x (SiLU) → Flatten (or Reshape [-1, C*H*W]) → MatMul + Add."""
    b = Builder(seed)
    w1 = b.random(8, 3, 3, 3)
    w2 = b.random(8, 8, 3, 3)
    w1[:zero_filters] = 0
    w2[:zero_filters] = 0
    x = b.node("Relu", [b.conv("x", w1, name="conv1", pads=[1, 1, 1, 1])])
    x = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    y = b.conv(x, w2, name="conv2", pads=[1, 1, 1, 1])
    x = b.node("Mul", [y, b.node("Sigmoid", [y])])
    x = b.node("Mul", [x, b.const("gain", b.rng.uniform(0.5, 1.5, (8, 1, 1)).astype(np.float32))])
    if reshape:
        x = b.node("Reshape", [x, b.const("shape", np.array([-1, 8 * 4 * 4], np.int64))])
    else:
        x = b.node("Flatten", [x])
    x = b.node("MatMul", [x, b.const("fc", b.random(8 * 4 * 4, 10))])
    x = b.node("Add", [x, b.const("fcb", b.random(10, scale=0.1))])
    return b.model((3, 8, 8), x)


def squeeze_cnn(seed: int = 0, *, zero_filters: int = 0) -> onnx.ModelProto:
    """conv → Add (per-channel) → PRelu (per-channel) → GlobalMaxPool → Squeeze → MatMul, with every
    initializer also declared as a graph input (as IR < 4 exporters write them)."""
    b = Builder(seed)
    w = b.random(8, 3, 3, 3)
    shift = b.random(1, 8, 1, 1, scale=0.1)
    w[:zero_filters] = 0
    shift[:, :zero_filters] = 0
    x = b.node("Add", [b.conv("x", w, name="conv1", pads=[1, 1, 1, 1]), b.const("shift", shift)])
    x = b.node("PRelu", [x, b.const("slope", b.rng.uniform(0.1, 0.3, (8, 1, 1)).astype(np.float32))])
    x = b.node("Squeeze", [b.node("GlobalMaxPool", [x]), b.const("axes", np.array([2, 3], np.int64))])
    model = b.model((3, 6, 6), b.node("MatMul", [x, b.const("fc", b.random(8, 5))]))
    for init in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    onnx.checker.check_model(model)
    return model


def residual_cnn(seed: int = 0) -> onnx.ModelProto:
    """conv0+Relu → conv1+Relu ─┬→ conv2 → Add ← ┘ → GAP → Flatten → Gemm: conv1 and conv2 feed a residual Add."""
    b = Builder(seed)
    x = b.node("Relu", [b.conv("x", b.random(8, 3, 3, 3), name="conv0", pads=[1, 1, 1, 1])])
    r = b.node("Relu", [b.conv(x, b.random(8, 8, 3, 3), name="conv1", pads=[1, 1, 1, 1])])
    y = b.conv(r, b.random(8, 8, 3, 3), name="conv2", pads=[1, 1, 1, 1])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [b.node("Add", [y, r])])])
    x = b.node("Gemm", [x, b.const("fc", b.random(8, 4)), b.const("fcb", b.random(4))])
    return b.model((3, 8, 8), x)


def mlp(seed: int = 0, sizes: tuple[int, ...] = (64, 128, 128, 10)) -> onnx.ModelProto:
    """MatMul+Add+Relu layers, then a Gemm: plain dense weights for pruning and clustering."""
    b = Builder(seed)
    x = "x"
    for fan_in, fan_out in itertools.pairwise(sizes[:-1]):
        x = b.node("MatMul", [x, b.const("w", b.random(fan_out, fan_in).T.copy())])
        x = b.node("Relu", [b.node("Add", [x, b.const("b", b.random(fan_out, scale=0.1))])])
    fc, fcb = b.const("fc", b.random(sizes[-1], sizes[-2])), b.const("fcb", b.random(sizes[-1]))
    x = b.node("Gemm", [x, fc, fcb], transB=1)
    return b.model((sizes[0],), x)


def low_rank_matrix(rng: np.random.Generator, rows: int, cols: int, rank: int, noise: float = 0.0) -> Array:
    """A ``rows × cols`` matrix of exactly ``rank`` (plus optional noise), entries of order 1/sqrt(rows)."""
    value = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / np.sqrt(rows * rank)
    value += noise * rng.standard_normal((rows, cols)) / np.sqrt(rows)
    return np.asarray(value, dtype=np.float32)


def matmul_model(weight: Array, *, batch_dims: int = 1) -> onnx.ModelProto:
    """x (N, [S,] K) @ W (K, N) + bias."""
    b = Builder(1)
    x = b.node("MatMul", ["x", b.const("w", weight)], name="fc")
    x = b.node("Add", [x, b.const("bias", b.random(weight.shape[1], scale=0.1))])
    shape = (5, weight.shape[0]) if batch_dims == 2 else (weight.shape[0],)
    return b.model(shape, x, output_rank=len(shape) + 1)


def gemm_model(
    weight: Array, *, trans_b: int, alpha: float = 1.0, beta: float = 1.0, trans_a: int = 0
) -> onnx.ModelProto:
    """Gemm(x, W, C) with the given transB, alpha and beta; ``weight`` is stored as given.
    With ``trans_a`` the input is transposed first so that the Gemm reads it as ``Aᵀ``."""
    b = Builder(2)
    outputs = weight.shape[0] if trans_b else weight.shape[1]
    inputs = weight.shape[1] if trans_b else weight.shape[0]
    c = b.const("c", b.random(outputs, scale=0.1))
    a = b.node("Transpose", ["x"], perm=[1, 0]) if trans_a else "x"
    attrs = {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta}
    x = b.node("Gemm", [a, b.const("w", weight), c], name="fc", **attrs)
    return b.model((inputs,), x)


def conv_model(weight: Array, **attrs: object) -> onnx.ModelProto:
    """A single Conv with bias, then Relu; input 8×9 spatial so strides and pads are visible."""
    b = Builder(3)
    y = b.conv("x", weight, bias=b.random(weight.shape[0], scale=0.1), name="conv", **attrs)
    return b.model((weight.shape[1], 8, 9), b.node("Relu", [y]), output_rank=4)


def run(model: onnx.ModelProto, x: Array) -> Array:
    """The first output of ``model`` on ``x`` in an ONNX Runtime CPU session."""
    result = session(model).run(None, {"x": x})[0]
    return np.asarray(result, dtype=np.float32)


def inputs_for(model: onnx.ModelProto, batch: int = 4, seed: int = 9) -> Array:
    """Random inputs of the model's input shape with ``batch`` samples."""
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(seed).standard_normal((batch, *dims)).astype(np.float32)


def context(model: onnx.ModelProto, *, trainer: Trainer | None = None, data: Dataset | None = None) -> PassContext:
    """A CPU pass context with ``model`` as the FP32 source."""
    return PassContext(
        execution_provider="CPUExecutionProvider",
        precisions=frozenset({"fp32"}),
        source=model,
        data=data,
        trainer=trainer,
    )


@dataclass
class RecordingTrainer:
    """A Trainer at our seam: records each request and the model it got, optionally nudges every
    weight (zeros included) so tests can see that a pass re-imposes what it must keep."""

    nudge: float = 0.0
    requests: list[TrainingRequest] = field(default_factory=list)
    models: list[onnx.ModelProto] = field(default_factory=list)

    def train(self, model: onnx.ModelProto, data: Dataset, request: TrainingRequest) -> onnx.ModelProto:
        self.requests.append(request)
        self.models.append(model)
        tuned = onnx.ModelProto()
        tuned.CopyFrom(model)
        if self.nudge:
            for init in tuned.graph.initializer:
                value = numpy_helper.to_array(init)
                if value.dtype == np.float32 and value.ndim >= 2:
                    init.CopyFrom(numpy_helper.from_array((value + self.nudge).astype(np.float32), init.name))
        return tuned
