"""Tiny ONNX models and data for the quantization, FP16 and graph-optimization pass tests.

Built with ``onnx.helper`` from seeded random weights (He-scaled so activations neither vanish nor
explode), opset 17: a CNN with the Conv + BatchNormalization + Relu + MaxPool + Gemm pattern that
static quantization and operator fusion target, and a MatMul/Add/Softmax attention-and-MLP block
that dynamic quantization targets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgefleet_core.optimize.data import Dataset

OPSET = 17
IR_VERSION = 8
"""The IR version of ONNX 1.12 (opset 17); ``helper.make_model`` would stamp onnx's newest, which the
installed ONNX Runtime may not read yet."""
FloatArray = npt.NDArray[np.float32]


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> FloatArray:
    weights: FloatArray = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return weights


def _conv_bn_relu(
    rng: np.random.Generator,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    x: str,
    *,
    index: int,
    channels: tuple[int, int],
) -> str:
    cin, cout = channels
    prefix = f"conv{index}"
    inits.append(numpy_helper.from_array(_he(rng, (cout, cin, 3, 3), cin * 9), f"{prefix}.weight"))
    inits.append(numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), f"{prefix}.bias"))
    inits.append(
        numpy_helper.from_array((1.0 + rng.standard_normal(cout) * 0.1).astype(np.float32), f"bn{index}.scale")
    )
    inits.append(numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), f"bn{index}.shift"))
    inits.append(numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), f"bn{index}.mean"))
    inits.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, cout).astype(np.float32), f"bn{index}.var"))
    nodes.append(
        helper.make_node(
            "Conv", [x, f"{prefix}.weight", f"{prefix}.bias"], [f"{prefix}.out"], name=prefix, pads=[1, 1, 1, 1]
        )
    )
    nodes.append(
        helper.make_node(
            "BatchNormalization",
            [f"{prefix}.out", f"bn{index}.scale", f"bn{index}.shift", f"bn{index}.mean", f"bn{index}.var"],
            [f"bn{index}.out"],
            name=f"bn{index}",
        )
    )
    nodes.append(helper.make_node("Relu", [f"bn{index}.out"], [f"relu{index}.out"], name=f"relu{index}"))
    nodes.append(
        helper.make_node(
            "MaxPool",
            [f"relu{index}.out"],
            [f"pool{index}.out"],
            name=f"pool{index}",
            kernel_shape=[2, 2],
            strides=[2, 2],
        )
    )
    return f"pool{index}.out"


def small_cnn(*, batch: int | str = "batch", hidden: int = 128, seed: int = 0) -> onnx.ModelProto:
    """1×16×16 images → 10 logits: two Conv+BN+Relu+MaxPool stages, then Gemm+Relu+Gemm.

    With the default ``hidden`` the first Gemm holds most of the ~75 k weights, so the file is
    weight-dominated and INT8 should make it about 4× smaller.
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = _conv_bn_relu(rng, nodes, inits, "input", index=1, channels=(1, 16))
    x = _conv_bn_relu(rng, nodes, inits, x, index=2, channels=(16, 32))
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten", axis=1))
    inits.append(numpy_helper.from_array(_he(rng, (hidden, 32 * 4 * 4), 32 * 4 * 4), "fc1.weight"))
    inits.append(numpy_helper.from_array(np.zeros(hidden, np.float32), "fc1.bias"))
    inits.append(numpy_helper.from_array(_he(rng, (10, hidden), hidden), "fc2.weight"))
    inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "fc2.bias"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1.out"], name="fc1", transB=1))
    nodes.append(helper.make_node("Relu", ["fc1.out"], ["fc1.relu"], name="fc1_relu"))
    nodes.append(helper.make_node("Gemm", ["fc1.relu", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1))
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgefleet-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def attention_block(*, width: int = 64, seed: int = 0) -> onnx.ModelProto:
    """``[batch, seq, width]`` → same: single-head self-attention and a two-layer MLP, both residual.

    MatMul/Add/Softmax only (no Conv): what dynamic quantization is for.
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def linear(name: str, x: str, cin: int, cout: int) -> str:
        inits.append(numpy_helper.from_array(_he(rng, (cin, cout), cin), f"{name}.weight"))
        inits.append(numpy_helper.from_array((rng.standard_normal(cout) * 0.02).astype(np.float32), f"{name}.bias"))
        nodes.append(helper.make_node("MatMul", [x, f"{name}.weight"], [f"{name}.mm"], name=name))
        nodes.append(helper.make_node("Add", [f"{name}.mm", f"{name}.bias"], [f"{name}.out"], name=f"{name}_bias"))
        return f"{name}.out"

    q = linear("query", "hidden", width, width)
    k = linear("key", "hidden", width, width)
    v = linear("value", "hidden", width, width)
    nodes.append(helper.make_node("Transpose", [k], ["key.t"], name="key_t", perm=[0, 2, 1]))
    nodes.append(helper.make_node("MatMul", [q, "key.t"], ["scores.raw"], name="scores"))
    inits.append(numpy_helper.from_array(np.array(1.0 / np.sqrt(width), np.float32), "scale"))
    nodes.append(helper.make_node("Mul", ["scores.raw", "scale"], ["scores.scaled"], name="scores_scale"))
    nodes.append(helper.make_node("Softmax", ["scores.scaled"], ["probs"], name="softmax", axis=-1))
    nodes.append(helper.make_node("MatMul", ["probs", v], ["context"], name="context"))
    attn = linear("attn_out", "context", width, width)
    nodes.append(helper.make_node("Add", ["hidden", attn], ["resid1"], name="resid1"))
    up = linear("mlp_up", "resid1", width, 2 * width)
    nodes.append(helper.make_node("Relu", [up], ["mlp_act"], name="mlp_relu"))
    down = linear("mlp_down", "mlp_act", 2 * width, width)
    nodes.append(helper.make_node("Add", ["resid1", down], ["output"], name="resid2"))
    graph = helper.make_graph(
        nodes,
        "attention_block",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "seq", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgefleet-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def image_data(count: int = 64, *, seed: int = 1) -> Dataset:
    """Images for :func:`small_cnn`: smooth blobs plus noise, so activations have structure."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(16), np.arange(16), indexing="ij"), axis=0).astype(np.float32)
    centres = rng.uniform(2, 14, (count, 2, 1, 1)).astype(np.float32)
    widths = rng.uniform(1.5, 4.0, (count, 1, 1)).astype(np.float32)
    blobs = np.exp(-(((grid[None] - centres) ** 2).sum(axis=1)) / (2 * widths**2))
    images = blobs + 0.1 * rng.standard_normal(blobs.shape).astype(np.float32)
    return Dataset({"input": images[:, None].astype(np.float32)})


def sequence_data(count: int = 32, *, seq: int = 8, width: int = 64, seed: int = 2) -> Dataset:
    """Token embeddings for :func:`attention_block`."""
    rng = np.random.default_rng(seed)
    return Dataset({"hidden": rng.standard_normal((count, seq, width)).astype(np.float32)})


def run(model: onnx.ModelProto, feeds: Mapping[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
    """Outputs of ``model`` in a plain ONNX Runtime CPU session (all outputs, in order)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    return list(sess.run(None, dict(feeds)))


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the main graph has."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
