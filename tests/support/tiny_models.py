"""Tiny ONNX models built in code for fast tests (random weights, fixed seeds)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_cnn(seed: int = 0, opset: int = 17, channels: int = 8) -> onnx.ModelProto:
    """Conv+BatchNormalization+Relu → GlobalAveragePool → Flatten → Gemm, input [N,1,8,8], 10 logits."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (channels, 1, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (channels,)).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, (channels,)).astype(np.float32), "bn_scale"),
        numpy_helper.from_array(rng.normal(0, 0.1, (channels,)).astype(np.float32), "bn_bias"),
        numpy_helper.from_array(rng.normal(0, 0.1, (channels,)).astype(np.float32), "bn_mean"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, (channels,)).astype(np.float32), "bn_var"),
        numpy_helper.from_array(rng.normal(0, 0.5, (10, channels)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["b1"]),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["g1"]),
        helper.make_node("Flatten", ["g1"], ["f1"]),
        helper.make_node("Gemm", ["f1", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    return model


def tiny_inputs(count: int = 48, seed: int = 1) -> np.ndarray:
    """Inputs for :func:`tiny_cnn`."""
    return np.random.default_rng(seed).uniform(0, 1, (count, 1, 8, 8)).astype(np.float32)


def wide_mlp(seed: int = 0, width: int = 1024, inputs: int = 64) -> onnx.ModelProto:
    """MatMul → Relu → MatMul with a ``width``×``width`` hidden layer: megabytes of weights, still fast.

    For tests where a transfer or an install must take measurable time (kills mid-download).
    Input ``x`` [N, inputs], output ``y`` [N, 10].
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.1, (inputs, width)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.normal(0, 0.05, (width, width)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.05, (width, 10)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["a0"]),
        helper.make_node("MatMul", ["a0", "w1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "wide_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_matmul_bytes(seed: int = 0) -> bytes:
    """A one-MatMul model ([1, 8] → [1, 4]) as bytes: a distinct, valid ``model.onnx`` per seed for bundles."""
    weights = np.random.default_rng(seed).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()
