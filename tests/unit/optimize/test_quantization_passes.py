"""GraphOptimization, FP16, QuantizeInt8 and MixedPrecision, with real ONNX Runtime on tiny models."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnxruntime.quantization import quant_pre_process as real_pre_process

from edgefleet_core.errors import PassNotApplicable
from edgefleet_core.optimize.data import Dataset
from edgefleet_core.optimize.model_io import model_digest, serialize
from edgefleet_core.optimize.passes import fp16 as fp16_module
from edgefleet_core.optimize.passes import graph_optimization as graph_optimization_module
from edgefleet_core.optimize.passes import quantize as quantize_module
from edgefleet_core.optimize.passes.base import OptimizationPass, PassContext, PassResult
from edgefleet_core.optimize.passes.fp16 import FP16Pass
from edgefleet_core.optimize.passes.graph_optimization import (
    GraphOptimizationPass,
    portable_level,
    unfuse_cpu_fusions,
)
from edgefleet_core.optimize.passes.mixed_precision import MAX_PROBES, MixedPrecisionPass, probe_order
from edgefleet_core.optimize.passes.quantize import (
    DatasetCalibrationReader,
    Int8Quantizer,
    QuantizeInt8Pass,
    calibration_batch_size,
    is_quantized,
    plan_quantization,
    quantized_nodes,
)
from edgefleet_core.optimize.runtime import CPU_EP, session
from edgefleet_core.resources.recipe import (
    OPTIONS_BY_PASS,
    FP16Options,
    GraphOptimizationOptions,
    MixedPrecisionOptions,
    PassOptions,
    QuantizeInt8Options,
)
from tests.support.quant_models import (
    IR_VERSION,
    OPSET,
    attention_block,
    image_data,
    op_counts,
    run,
    sequence_data,
    small_cnn,
)

CNN_LAYERS = ["conv1", "conv2", "fc1", "fc2"]
PASSES: list[type[OptimizationPass[Any]]] = [GraphOptimizationPass, FP16Pass, QuantizeInt8Pass, MixedPrecisionPass]


@pytest.fixture(scope="module")
def cnn() -> onnx.ModelProto:
    return small_cnn()


@pytest.fixture(scope="module")
def images() -> Dataset:
    return image_data(64)


@pytest.fixture(scope="module")
def attention() -> onnx.ModelProto:
    return attention_block()


@pytest.fixture(scope="module")
def sequences() -> Dataset:
    return sequence_data(16)


def context(
    model: onnx.ModelProto,
    *,
    ep: str = CPU_EP,
    data: Dataset | None = None,
    evaluator: Any = None,
    max_accuracy_drop: float = 0.01,
) -> PassContext:
    return PassContext(
        execution_provider=ep,
        precisions=frozenset({"fp32", "fp16", "int8"}),
        source=model,
        data=data,
        evaluator=evaluator,
        max_accuracy_drop=max_accuracy_drop,
    )


def applied(pass_: OptimizationPass[Any], model: onnx.ModelProto, ctx: PassContext) -> PassResult:
    """Apply ``pass_`` and check what every pass owes: input untouched, output valid and loadable on the CPU."""
    digest = model_digest(model)
    result = pass_.apply(model, ctx)
    assert model_digest(model) == digest, "the pass changed its input model"
    onnx.checker.check_model(result.model)
    feeds = {
        value.name: np.zeros(
            [d.dim_value if d.dim_value > 0 else 1 for d in value.type.tensor_type.shape.dim],
            helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type),
        )
        for value in result.model.graph.input
    }
    run(result.model, feeds)
    return result


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(axis=-1) == b.argmax(axis=-1)))


# --- every pass ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pass_cls", PASSES, ids=lambda c: c.pass_type)
def test_class_vars_match_the_recipe_contract(pass_cls: type[OptimizationPass[Any]]) -> None:
    assert OPTIONS_BY_PASS[pass_cls.pass_type] is pass_cls.options_type
    assert pass_cls.capability.summary
    pass_cls(pass_cls.options_type())  # default options construct the pass


def test_capabilities_are_honest() -> None:
    assert GraphOptimizationPass.capability.exact
    assert GraphOptimizationPass.capability.precision is None
    assert FP16Pass.capability.precision == "fp16"
    assert FP16Pass.capability.execution_providers is not None
    assert "CUDAExecutionProvider" in FP16Pass.capability.execution_providers
    assert CPU_EP not in FP16Pass.capability.execution_providers
    assert QuantizeInt8Pass.capability.precision == "int8"
    assert not QuantizeInt8Pass.capability.needs_data  # dynamic quantization needs none
    assert MixedPrecisionPass.capability.needs_data
    assert not any(c.capability.needs_trainer for c in PASSES)


@pytest.mark.parametrize(
    ("pass_cls", "wrong"),
    [
        (FP16Pass, QuantizeInt8Options()),
        (QuantizeInt8Pass, MixedPrecisionOptions()),
        (MixedPrecisionPass, FP16Options()),
    ],
)
def test_options_of_another_pass_are_refused(pass_cls: type[OptimizationPass[Any]], wrong: PassOptions) -> None:
    with pytest.raises(TypeError, match="takes"):
        pass_cls(wrong)


# --- GraphOptimization --------------------------------------------------------------------------


def test_graph_optimization_fuses_conv_bn_relu_exactly(cnn: onnx.ModelProto, images: Dataset) -> None:
    result = applied(GraphOptimizationPass(GraphOptimizationOptions(level="extended")), cnn, context(cnn))
    ops = op_counts(result.model)
    assert "BatchNormalization" not in ops
    assert ops.get("FusedConv") == 2  # Conv+BN folded, then Conv+Relu fused
    assert sum(ops.values()) < len(cnn.graph.node)
    assert result.metrics == {
        "nodes_before": float(len(cnn.graph.node)),
        "nodes_after": float(len(result.model.graph.node)),
    }
    np.testing.assert_allclose(run(result.model, dict(images.inputs))[0], run(cnn, dict(images.inputs))[0], atol=1e-4)
    # Only the domains the graph uses are declared (ONNX Runtime declares every one it knows).
    assert {entry.domain for entry in result.model.opset_import} == {"", "com.microsoft"}


@pytest.mark.parametrize("level", ["layout", "all"])
def test_graph_optimization_never_ships_hardware_specific_layouts(
    cnn: onnx.ModelProto, images: Dataset, level: str
) -> None:
    result = applied(
        GraphOptimizationPass(GraphOptimizationOptions.model_validate({"level": level})), cnn, context(cnn)
    )
    assert any("lowered to extended" in note and "architectures" in note for note in result.notes)
    assert not any(n.domain == "com.microsoft.nchwc" or n.op_type == "ReorderOutput" for n in result.model.graph.node)
    np.testing.assert_allclose(run(result.model, dict(images.inputs))[0], run(cnn, dict(images.inputs))[0], atol=1e-4)


def test_graph_optimization_for_an_accelerator_uses_portable_rewrites_only(
    cnn: onnx.ModelProto, images: Dataset
) -> None:
    ctx = context(cnn, ep="CUDAExecutionProvider")
    result = applied(GraphOptimizationPass(GraphOptimizationOptions(level="extended")), cnn, ctx)
    ops = op_counts(result.model)
    assert ops["Conv"] == 2
    assert "BatchNormalization" not in ops  # folded: basic level is EP-independent
    assert ops["Relu"] == 3  # not fused into a CPU-only contrib op
    assert all(n.domain == "" for n in result.model.graph.node)
    assert any("lowered to basic" in note for note in result.notes)
    np.testing.assert_allclose(run(result.model, dict(images.inputs))[0], run(cnn, dict(images.inputs))[0], atol=1e-4)


@pytest.mark.parametrize(
    ("requested", "ep", "expected", "lowered"),
    [
        ("basic", CPU_EP, "basic", False),
        ("extended", CPU_EP, "extended", False),
        ("layout", CPU_EP, "extended", True),
        ("all", CPU_EP, "extended", True),
        ("basic", "OpenVINOExecutionProvider", "basic", False),
        ("extended", "OpenVINOExecutionProvider", "basic", True),
        ("all", "TensorrtExecutionProvider", "basic", True),
    ],
)
def test_portable_level(requested: Any, ep: str, expected: str, lowered: bool) -> None:
    level, why = portable_level(requested, ep)
    assert level == expected
    assert (why is not None) == lowered


def test_graph_optimization_of_a_model_onnx_runtime_cannot_load_is_skipped() -> None:
    node = helper.make_node("Mystery", ["x"], ["y"], domain="example.unknown")
    graph = helper.make_graph(
        [node],
        "mystery",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("example.unknown", 1)]
    )
    model.ir_version = IR_VERSION
    with pytest.raises(PassNotApplicable, match="cannot load the model") as caught:
        GraphOptimizationPass(GraphOptimizationOptions()).apply(model, context(model))
    assert caught.value.pass_type == "GraphOptimization"


# --- FP16 ---------------------------------------------------------------------------------------


def test_fp16_is_close_to_fp32_and_keeps_io_types(cnn: onnx.ModelProto, images: Dataset) -> None:
    result = applied(FP16Pass(FP16Options()), cnn, context(cnn, ep="CUDAExecutionProvider"))
    model = result.model
    assert {init.data_type for init in model.graph.initializer} == {TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    fp32, fp16 = run(cnn, dict(images.inputs))[0], run(model, dict(images.inputs))[0]
    assert np.abs(fp32 - fp16).max() < 1e-2 * np.abs(fp32).max()
    assert agreement(fp32, fp16) >= 0.95
    assert result.metrics["bytes_after"] < 0.6 * result.metrics["bytes_before"]


def test_fp16_without_keep_io_types_takes_and_returns_fp16(cnn: onnx.ModelProto, images: Dataset) -> None:
    result = applied(FP16Pass(FP16Options(keep_io_types=False)), cnn, context(cnn))
    assert result.model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert result.model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    half = run(result.model, {"input": images.inputs["input"].astype(np.float16)})[0]
    assert half.dtype == np.float16
    assert agreement(run(cnn, dict(images.inputs))[0], half.astype(np.float32)) >= 0.95


def test_fp16_op_block_list_keeps_those_ops_fp32(cnn: onnx.ModelProto) -> None:
    result = applied(FP16Pass(FP16Options(op_block_list=["Gemm"])), cnn, context(cnn))
    types = {init.name: init.data_type for init in result.model.graph.initializer}
    assert types["fc1.weight"] == TensorProto.FLOAT
    assert types["conv1.weight"] == TensorProto.FLOAT16
    assert any("Gemm" in note for note in result.notes)


def test_fp16_after_cpu_graph_optimization(cnn: onnx.ModelProto, images: Dataset) -> None:
    fused = GraphOptimizationPass(GraphOptimizationOptions()).apply(cnn, context(cnn)).model
    result = applied(FP16Pass(FP16Options()), fused, context(fused))
    assert any("split ONNX Runtime's CPU fusions" in note for note in result.notes)
    assert agreement(run(cnn, dict(images.inputs))[0], run(result.model, dict(images.inputs))[0]) >= 0.95


def test_fp16_reports_values_clamped_to_its_range(cnn: onnx.ModelProto) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(cnn)
    for init in model.graph.initializer:
        if init.name == "fc2.bias":
            init.CopyFrom(onnx.numpy_helper.from_array(np.full(10, 1e6, np.float32), "fc2.bias"))
    result = applied(FP16Pass(FP16Options()), model, context(model))
    assert result.metrics["values_clamped"] == 10
    assert any("clamped 10" in note for note in result.notes)


def test_fp16_refuses_reduced_precision_and_quantized_models(cnn: onnx.ModelProto, images: Dataset) -> None:
    half = FP16Pass(FP16Options()).apply(cnn, context(cnn)).model
    with pytest.raises(PassNotApplicable, match="already FP16"):
        FP16Pass(FP16Options()).apply(half, context(half))
    quantized = QuantizeInt8Pass(QuantizeInt8Options()).apply(cnn, context(cnn, data=images)).model
    with pytest.raises(PassNotApplicable, match="already quantized"):
        FP16Pass(FP16Options()).apply(quantized, context(quantized))


# --- QuantizeInt8 -------------------------------------------------------------------------------


def test_static_quantization_of_a_cnn_on_the_cpu(cnn: onnx.ModelProto, images: Dataset) -> None:
    result = applied(QuantizeInt8Pass(QuantizeInt8Options()), cnn, context(cnn, data=images))
    ops = op_counts(result.model)
    assert ops["QLinearConv"] == 2  # QOperator: the CPU's choice for uint8 activations
    assert "Conv" not in ops
    assert is_quantized(result.model)
    assert result.metrics["nodes_quantized"] == 4
    assert result.metrics["calibration_samples"] == 64
    fp32, int8 = run(cnn, dict(images.inputs))[0], run(result.model, dict(images.inputs))[0]
    assert agreement(fp32, int8) >= 0.9
    assert np.abs(fp32 - int8).max() < 0.1 * np.abs(fp32).max()
    assert any("static quantization" in note for note in result.notes)
    assert any("QOperator format" in note for note in result.notes)


def test_a_weight_dominated_model_gets_about_four_times_smaller(images: Dataset) -> None:
    model = small_cnn(hidden=512)
    result = applied(QuantizeInt8Pass(QuantizeInt8Options()), model, context(model, data=images))
    ratio = len(serialize(model)) / len(serialize(result.model))
    assert ratio > 3.7
    assert result.metrics["bytes_before"] / result.metrics["bytes_after"] == pytest.approx(ratio)


@pytest.mark.parametrize("ep", ["OpenVINOExecutionProvider", "QNNExecutionProvider", "DmlExecutionProvider"])
def test_accelerators_get_qdq(cnn: onnx.ModelProto, images: Dataset, ep: str) -> None:
    result = applied(QuantizeInt8Pass(QuantizeInt8Options()), cnn, context(cnn, ep=ep, data=images))
    ops = op_counts(result.model)
    assert ops["QuantizeLinear"] >= 1
    assert ops["DequantizeLinear"] >= 4
    assert ops["Conv"] == 2  # QDQ keeps float ops between Q/DQ pairs for the EP to fuse
    assert "QLinearConv" not in ops
    assert agreement(run(cnn, dict(images.inputs))[0], run(result.model, dict(images.inputs))[0]) >= 0.9


def test_tensorrt_gets_symmetric_signed_int8(cnn: onnx.ModelProto, images: Dataset) -> None:
    result = applied(
        QuantizeInt8Pass(QuantizeInt8Options()), cnn, context(cnn, ep="TensorrtExecutionProvider", data=images)
    )
    zero_points = [
        onnx.numpy_helper.to_array(init)
        for init in result.model.graph.initializer
        if init.data_type in (TensorProto.INT8, TensorProto.UINT8) and init.name.endswith("zero_point")
    ]
    assert zero_points
    assert all(zp.dtype == np.int8 and not zp.any() for zp in zero_points)
    assert any("symmetric signed INT8" in note for note in result.notes)


def test_int8_activations_on_the_cpu_use_qdq(cnn: onnx.ModelProto, images: Dataset) -> None:
    options = QuantizeInt8Options(activation_type="int8", per_channel=False, calibration_samples=32)
    result = applied(QuantizeInt8Pass(options), cnn, context(cnn, data=images))
    assert "QLinearConv" not in op_counts(result.model)
    assert op_counts(result.model)["DequantizeLinear"] >= 4
    assert result.metrics["calibration_samples"] == 32


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_calibration_methods(cnn: onnx.ModelProto, images: Dataset, method: Any) -> None:
    options = QuantizeInt8Options(calibration_method=method, calibration_samples=32)
    result = applied(QuantizeInt8Pass(options), cnn, context(cnn, data=images))
    assert agreement(run(cnn, dict(images.inputs))[0], run(result.model, dict(images.inputs))[0]) >= 0.8
    assert any(f"{method} calibration" in note for note in result.notes)


def test_dynamic_quantization_of_a_matmul_model(attention: onnx.ModelProto, sequences: Dataset) -> None:
    result = applied(QuantizeInt8Pass(QuantizeInt8Options()), attention, context(attention))
    ops = op_counts(result.model)
    assert ops["DynamicQuantizeLinear"] >= 1
    assert ops["MatMulInteger"] == 6  # the weight MatMuls; activation×activation ones stay float
    assert result.metrics["nodes_quantized"] == 6
    assert result.metrics["calibration_samples"] == 0
    assert any("dynamic quantization" in note for note in result.notes)
    feeds = dict(sequences.inputs)
    fp32, int8 = run(attention, feeds)[0], run(result.model, feeds)[0]
    assert np.abs(fp32 - int8).max() < 0.05 * np.abs(fp32).max()


def test_static_quantization_of_a_matmul_model_with_dynamic_sequence_length(
    attention: onnx.ModelProto, sequences: Dataset
) -> None:
    options = QuantizeInt8Options(mode="static", format="qdq", activation_type="int8")
    result = applied(QuantizeInt8Pass(options), attention, context(attention, data=sequences))
    assert op_counts(result.model)["DequantizeLinear"] >= 6
    longer = sequence_data(4, seq=12)  # a sequence length calibration never saw
    fp32, int8 = run(attention, dict(longer.inputs))[0], run(result.model, dict(longer.inputs))[0]
    assert np.abs(fp32 - int8).max() < 0.1 * np.abs(fp32).max()


def test_a_fixed_batch_model_is_calibrated_one_sample_at_a_time(images: Dataset) -> None:
    model = small_cnn(batch=1)
    assert calibration_batch_size(model, images, "QuantizeInt8") == (1, True)
    result = applied(QuantizeInt8Pass(QuantizeInt8Options(calibration_samples=8)), model, context(model, data=images))
    assert result.metrics["calibration_samples"] == 8


def test_calibration_reader_batches(images: Dataset) -> None:
    assert calibration_batch_size(small_cnn(), images, "QuantizeInt8") == (16, False)

    def sizes(reader: DatasetCalibrationReader) -> list[int]:
        batches = []
        while (feed := reader.get_next()) is not None:
            batches.append(feed["input"].shape[0])
        return batches

    dynamic = DatasetCalibrationReader(images.take(40), 16)
    assert (len(dynamic), dynamic.samples, sizes(dynamic)) == (3, 40, [16, 16, 8])
    fixed = DatasetCalibrationReader(images.take(40), 16, whole_batches=True)
    assert (len(fixed), fixed.samples, sizes(fixed)) == (2, 32, [16, 16])
    with pytest.raises(PassNotApplicable, match="fixed batch size is 4 but only 3"):
        calibration_batch_size(small_cnn(batch=4), images.take(3), "QuantizeInt8")
    with pytest.raises(PassNotApplicable, match="no array for model input"):
        calibration_batch_size(small_cnn(), Dataset({"other": images.inputs["input"]}), "QuantizeInt8")


def test_calibration_uses_every_sample_of_a_dynamic_batch_model(cnn: onnx.ModelProto, images: Dataset) -> None:
    result = applied(QuantizeInt8Pass(QuantizeInt8Options(calibration_samples=40)), cnn, context(cnn, data=images))
    assert result.metrics["calibration_samples"] == 40
    fixed = small_cnn(batch=16)
    result = applied(QuantizeInt8Pass(QuantizeInt8Options(calibration_samples=40)), fixed, context(fixed, data=images))
    assert result.metrics["calibration_samples"] == 32


def _relu_only() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


class Refusal(NamedTuple):
    model: str
    options: dict[str, Any]
    ep: str
    with_data: bool
    fragment: str


@pytest.mark.parametrize(
    "case",
    [
        Refusal("cnn", {}, CPU_EP, False, "static quantization needs calibration data"),
        Refusal("attention", {"mode": "static"}, CPU_EP, False, "static quantization needs calibration data"),
        Refusal("attention", {"mode": "dynamic", "format": "qdq"}, CPU_EP, False, "no QDQ form"),
        Refusal("cnn", {"activation_type": "int8", "weight_type": "uint8"}, CPU_EP, True, "no kernels for int8 activ"),
        Refusal("attention", {}, "QNNExecutionProvider", False, "runs only static QDQ models"),
        Refusal("cnn", {"format": "qoperator"}, "TensorrtExecutionProvider", True, "runs only QDQ models"),
        Refusal("relu", {}, CPU_EP, True, "no Conv, MatMul or Gemm node"),
    ],
    ids=lambda case: case.fragment,
)
def test_quantization_that_cannot_apply_says_why(
    cnn: onnx.ModelProto, attention: onnx.ModelProto, images: Dataset, sequences: Dataset, case: Refusal
) -> None:
    model = {"cnn": cnn, "attention": attention, "relu": _relu_only()}[case.model]
    data = {"cnn": images, "attention": sequences, "relu": Dataset({"x": np.ones((4, 4), np.float32)})}[case.model]
    pass_ = QuantizeInt8Pass(QuantizeInt8Options.model_validate(case.options))
    with pytest.raises(PassNotApplicable, match=case.fragment) as caught:
        pass_.apply(model, context(model, ep=case.ep, data=data if case.with_data else None))
    assert caught.value.pass_type == "QuantizeInt8"


def test_already_quantized_models_are_refused(cnn: onnx.ModelProto, images: Dataset) -> None:
    quantized = QuantizeInt8Pass(QuantizeInt8Options()).apply(cnn, context(cnn, data=images)).model
    with pytest.raises(PassNotApplicable, match="already quantized"):
        QuantizeInt8Pass(QuantizeInt8Options()).apply(quantized, context(quantized, data=images))


def test_graph_optimization_then_quantization(
    cnn: onnx.ModelProto, images: Dataset, attention: onnx.ModelProto, sequences: Dataset
) -> None:
    # The natural recipe order: ONNX Runtime's CPU fusions are split back for the quantizer.
    fused_cnn = GraphOptimizationPass(GraphOptimizationOptions()).apply(cnn, context(cnn)).model
    assert "FusedConv" in op_counts(fused_cnn)
    static = applied(QuantizeInt8Pass(QuantizeInt8Options()), fused_cnn, context(fused_cnn, data=images))
    assert static.metrics["nodes_quantized"] == 4
    assert any("split ONNX Runtime's CPU fusions" in note for note in static.notes)
    assert agreement(run(cnn, dict(images.inputs))[0], run(static.model, dict(images.inputs))[0]) >= 0.9

    fused_attention = GraphOptimizationPass(GraphOptimizationOptions()).apply(attention, context(attention)).model
    assert "FusedMatMul" in op_counts(fused_attention)
    dynamic = applied(QuantizeInt8Pass(QuantizeInt8Options()), fused_attention, context(fused_attention))
    assert dynamic.metrics["nodes_quantized"] == 6
    feeds = dict(sequences.inputs)
    fp32, int8 = run(attention, feeds)[0], run(dynamic.model, feeds)[0]
    assert np.abs(fp32 - int8).max() < 0.05 * np.abs(fp32).max()


def _contrib(node: onnx.NodeProto, inputs: dict[str, np.ndarray], output_shape: list[int]) -> onnx.ModelProto:
    initializers = [onnx.numpy_helper.from_array(v, k) for k, v in inputs.items() if k != "x"]
    graph = helper.make_graph(
        [node],
        node.op_type,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(inputs["x"].shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = IR_VERSION
    return model


@pytest.mark.parametrize(
    ("op", "attributes", "extra"),
    [
        ("FusedConv", {"activation": "LeakyRelu", "activation_params": [0.2]}, ["z"]),
        ("FusedConv", {"activation": "Clip", "activation_params": [-0.5, 0.5]}, []),
        ("FusedConv", {"activation": "HardSigmoid", "activation_params": [0.3, 0.4]}, []),
        ("FusedGemm", {"activation": "LeakyRelu", "activation_alpha": 0.3, "transB": 1, "alpha": 0.5}, []),
        ("FusedMatMul", {"transA": 1, "alpha": 0.25}, []),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_unfused_ops_compute_what_onnx_runtime_fused_ones_do(
    op: str, attributes: dict[str, Any], extra: list[str]
) -> None:
    rng = np.random.default_rng(5)
    if op == "FusedConv":
        inputs = {
            "x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32),
            "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            "b": rng.standard_normal(4).astype(np.float32),
            "z": rng.standard_normal((2, 4, 4, 4)).astype(np.float32),
        }
        names, shape = ["x", "w", "b", *extra], [2, 4, 4, 4]
    elif op == "FusedGemm":
        inputs = {
            "x": rng.standard_normal((2, 5)).astype(np.float32),
            "w": rng.standard_normal((3, 5)).astype(np.float32),
            "b": rng.standard_normal(3).astype(np.float32),
        }
        names, shape = ["x", "w", "b"], [2, 3]
    else:
        inputs = {
            "x": rng.standard_normal((2, 4, 3)).astype(np.float32),
            "w": rng.standard_normal((4, 5)).astype(np.float32),
        }
        names, shape = ["x", "w"], [2, 3, 5]
    node = helper.make_node(op, names, ["y"], name="fused", domain="com.microsoft", **attributes)
    fused = _contrib(node, {k: v for k, v in inputs.items() if k in names}, shape)
    split, notes = unfuse_cpu_fusions(fused)
    assert notes
    assert all(n.domain == "" for n in split.graph.node)
    assert {e.domain for e in split.opset_import} == {""}
    onnx.checker.check_model(split, full_check=True)
    feeds = {"x": inputs["x"]}
    np.testing.assert_allclose(run(split, feeds)[0], run(fused, feeds)[0], rtol=1e-5, atol=1e-5)


def test_pre_processing_falls_back_step_by_step(
    cnn: onnx.ModelProto, images: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []

    def without_symbolic_shapes(source: str, target: str, **kwargs: Any) -> None:
        calls.append(kwargs["skip_symbolic_shape"])
        if not kwargs["skip_symbolic_shape"]:
            raise Exception("Incomplete symbolic shape inference")  # what ONNX Runtime raises
        real_pre_process(source, target, **kwargs)

    monkeypatch.setattr(quantize_module, "quant_pre_process", without_symbolic_shapes)
    result = applied(QuantizeInt8Pass(QuantizeInt8Options()), cnn, context(cnn, data=images))
    assert calls == [False, True]
    assert any("skipped symbolic shape inference" in note for note in result.notes)
    assert "BatchNormalization" not in op_counts(result.model)  # the optimization step still ran


def test_quantization_works_without_any_pre_processing(
    cnn: onnx.ModelProto, images: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(source: str, target: str, **kwargs: Any) -> None:
        raise AssertionError("shape inference cannot follow this graph")

    monkeypatch.setattr(quantize_module, "quant_pre_process", broken)
    result = applied(QuantizeInt8Pass(QuantizeInt8Options()), cnn, context(cnn, data=images))
    assert any("skipped quantization pre-processing entirely" in note for note in result.notes)
    assert agreement(run(cnn, dict(images.inputs))[0], run(result.model, dict(images.inputs))[0]) >= 0.9


def test_unnamed_nodes_get_names_the_quantizer_can_exclude(images: Dataset) -> None:
    model = small_cnn()
    for node in model.graph.node:
        node.name = ""
    plan = plan_quantization("QuantizeInt8", model, QuantizeInt8Options(), CPU_EP, images)
    with Int8Quantizer("QuantizeInt8", model, plan, images) as quantizer:
        assert len(set(quantizer.candidates)) == 4
        keep = quantizer.candidates[0]
        partial = quantizer.quantize({keep})
    assert keep not in partial.quantized
    assert len(partial.quantized) == 3


@pytest.mark.parametrize("ep", [CPU_EP, "OpenVINOExecutionProvider"])  # QOperator and QDQ forms
def test_quantizer_keeps_excluded_nodes_in_float_and_knows_which(
    cnn: onnx.ModelProto, images: Dataset, ep: str
) -> None:
    plan = plan_quantization("QuantizeInt8", cnn, QuantizeInt8Options(), ep, images)
    with Int8Quantizer("QuantizeInt8", cnn, plan, images) as quantizer:
        assert quantizer.candidates == CNN_LAYERS
        everything = quantizer.quantize()
        partial = quantizer.quantize({"conv1", "fc2"})
    assert set(everything.quantized) == set(CNN_LAYERS)
    assert set(partial.quantized) == {"conv2", "fc1"}
    kept = {n.name: n.op_type for n in partial.model.graph.node if n.name in {"conv1", "fc2"}}
    assert kept == {"conv1": "Conv", "fc2": "Gemm"}
    assert set(quantized_nodes(CNN_LAYERS, cnn, partial.model)) == {"conv2", "fc1"}


# --- MixedPrecision -----------------------------------------------------------------------------


class FakeEvaluator:
    """Scores and times a model by which layers it quantized, as the test dictates.

    ``score = 1 - Σ penalty[quantized layer]``; ``latency = fp32_ms`` when nothing is quantized,
    else ``int8_ms + Σ cost[quantized layer]``.
    """

    def __init__(
        self,
        reference: onnx.ModelProto,
        *,
        penalty: Mapping[str, float] | None = None,
        fp32_ms: float | None = 10.0,
        int8_ms: float = 6.0,
        cost: Mapping[str, float] | None = None,
    ) -> None:
        self.reference = reference
        self.penalty = dict(penalty or {})
        self.fp32_ms = fp32_ms
        self.int8_ms = int8_ms
        self.cost = dict(cost or {})
        self.latency_calls = 0

    def quantized(self, model: onnx.ModelProto) -> set[str]:
        return set(quantized_nodes(CNN_LAYERS, self.reference, model))

    def score(self, model: onnx.ModelProto) -> float:
        return 1.0 - sum(self.penalty.get(n, 0.0) for n in self.quantized(model))

    def latency_ms(self, model: onnx.ModelProto) -> float | None:
        self.latency_calls += 1
        if self.fp32_ms is None:
            return None
        layers = self.quantized(model)
        if not layers:
            return self.fp32_ms
        return self.int8_ms + sum(self.cost.get(n, 0.0) for n in layers)


def mixed(
    model: onnx.ModelProto,
    data: Dataset,
    evaluator: Any,
    *,
    require_speedup: bool = True,
    budget: float = 0.01,
) -> PassResult:
    pass_ = MixedPrecisionPass(MixedPrecisionOptions(require_speedup=require_speedup))
    return applied(pass_, model, context(model, data=data, evaluator=evaluator, max_accuracy_drop=budget))


def kept_fp32(result: PassResult, reference: onnx.ModelProto) -> set[str]:
    return set(CNN_LAYERS) - set(quantized_nodes(CNN_LAYERS, reference, result.model))


def test_mixed_precision_quantizes_everything_when_it_pays(cnn: onnx.ModelProto, images: Dataset) -> None:
    result = mixed(cnn, images, FakeEvaluator(cnn))
    assert kept_fp32(result, cnn) == set()
    assert result.metrics["nodes_quantized"] == 4
    assert result.metrics["nodes_kept_fp32"] == 0
    assert result.metrics["variants_built"] == 1  # no analysis was needed
    assert result.metrics["latency_ms_mixed"] == 6.0


def test_mixed_precision_keeps_the_sensitive_layer_fp32(cnn: onnx.ModelProto, images: Dataset) -> None:
    result = mixed(cnn, images, FakeEvaluator(cnn, penalty={"conv1": 0.05, "fc1": 0.002}))
    assert kept_fp32(result, cnn) == {"conv1"}
    assert "kept conv1 in FP32: quantizing it cost 0.05 of score" in result.notes
    assert result.metrics["score_mixed"] == pytest.approx(0.998)
    assert result.metrics["score_all_int8"] == pytest.approx(0.948)


def test_mixed_precision_adds_layers_greedily_until_within_budget(cnn: onnx.ModelProto, images: Dataset) -> None:
    evaluator = FakeEvaluator(cnn, penalty={"conv1": 0.03, "fc2": 0.02, "fc1": 0.004})
    result = mixed(cnn, images, evaluator)
    assert kept_fp32(result, cnn) == {"conv1", "fc2"}
    kept_notes = [note for note in result.notes if note.startswith("kept ")]
    assert [note.split()[1] for note in kept_notes] == ["conv1", "fc2"]  # most sensitive first
    assert result.metrics["nodes_kept_fp32"] == 2
    # 1 all-INT8 + 4 leave-one-out variants + 1 combination: bounded, no re-quantizing.
    assert result.metrics["variants_built"] == 6


def test_mixed_precision_keeps_slow_layers_fp32(cnn: onnx.ModelProto, images: Dataset) -> None:
    evaluator = FakeEvaluator(cnn, fp32_ms=10.0, int8_ms=6.0, cost={"fc2": 5.0})
    result = mixed(cnn, images, evaluator)
    assert kept_fp32(result, cnn) == {"fc2"}
    assert "kept fc2 in FP32: INT8 made the model 5 ms slower" in result.notes
    assert result.metrics["latency_ms_mixed"] == 6.0
    assert result.metrics["latency_ms_fp32"] == 10.0


def test_mixed_precision_returns_fp32_when_int8_is_slower(cnn: onnx.ModelProto, images: Dataset) -> None:
    # Every quantized layer costs time: the pipeline must find out that INT8 does not pay here.
    evaluator = FakeEvaluator(cnn, fp32_ms=10.0, int8_ms=10.0, cost=dict.fromkeys(CNN_LAYERS, 1.0))
    result = mixed(cnn, images, evaluator)
    assert model_digest(result.model) == model_digest(cnn)
    assert result.model is not cnn
    assert any(note.startswith("INT8 is slower than FP32 here") for note in result.notes)
    assert result.metrics["nodes_quantized"] == 0
    assert result.metrics["nodes_kept_fp32"] == 4


def test_mixed_precision_returns_fp32_when_no_mix_meets_the_budget(cnn: onnx.ModelProto, images: Dataset) -> None:
    evaluator = FakeEvaluator(cnn, penalty=dict.fromkeys(CNN_LAYERS, 0.5))
    result = mixed(cnn, images, evaluator)
    assert model_digest(result.model) == model_digest(cnn)
    assert any("accuracy budget" in note for note in result.notes)


def test_mixed_precision_without_timing(cnn: onnx.ModelProto, images: Dataset) -> None:
    untimed = FakeEvaluator(cnn, fp32_ms=None)
    result = mixed(cnn, images, untimed)
    assert kept_fp32(result, cnn) == set()
    assert any(note.startswith("speed not checked") for note in result.notes)
    not_required = FakeEvaluator(cnn, int8_ms=50.0)
    result = mixed(cnn, images, not_required, require_speedup=False)
    assert kept_fp32(result, cnn) == set()
    assert not_required.latency_calls == 0


def test_mixed_precision_needs_data_an_evaluator_and_an_fp32_model(cnn: onnx.ModelProto, images: Dataset) -> None:
    pass_ = MixedPrecisionPass(MixedPrecisionOptions())
    with pytest.raises(PassNotApplicable, match="needs data"):
        pass_.apply(cnn, context(cnn, evaluator=FakeEvaluator(cnn)))
    with pytest.raises(PassNotApplicable, match="needs an evaluator"):
        pass_.apply(cnn, context(cnn, data=images))
    quantized = QuantizeInt8Pass(QuantizeInt8Options()).apply(cnn, context(cnn, data=images)).model
    with pytest.raises(PassNotApplicable, match="already quantized"):
        pass_.apply(quantized, context(quantized, data=images, evaluator=FakeEvaluator(cnn)))


class OrtEvaluator:
    """A real evaluator: top-1 agreement with the FP32 model and median CPU latency, with ONNX Runtime."""

    def __init__(self, reference: onnx.ModelProto, data: Dataset, repeats: int = 40) -> None:
        self.feeds = dict(data.inputs)
        self.labels = run(reference, self.feeds)[0].argmax(axis=-1)
        self.one = {k: v[:1] for k, v in self.feeds.items()}
        self.repeats = repeats

    def score(self, model: onnx.ModelProto) -> float:
        return float(np.mean(run(model, self.feeds)[0].argmax(axis=-1) == self.labels))

    def latency_ms(self, model: onnx.ModelProto) -> float | None:
        sess = session(model)
        timings = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            sess.run(None, self.one)
            timings.append((time.perf_counter() - start) * 1e3)
        return statistics.median(timings)


def test_mixed_precision_with_a_real_evaluator(cnn: onnx.ModelProto, images: Dataset) -> None:
    result = mixed(cnn, images, OrtEvaluator(cnn, images), budget=0.05)
    if result.metrics["nodes_quantized"] == 0:
        # A legitimate outcome on some CPUs; it must then be the FP32 model, and say why.
        assert model_digest(result.model) == model_digest(cnn)
        assert any("kept the FP32 model" in note or "slower than FP32" in note for note in result.notes)
    else:
        assert result.metrics["score_fp32"] - result.metrics["score_mixed"] <= 0.05
        assert result.metrics["latency_ms_mixed"] < result.metrics["latency_ms_fp32"]
        assert is_quantized(result.model)


# --- the paths models over 2 GiB take ---------------------------------------------------------


def test_models_beyond_protobuf_limits_go_through_external_data(
    cnn: onnx.ModelProto, images: Dataset, attention: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend every model is over the limit: the file-based, external-data code paths then run.
    for module in (graph_optimization_module, quantize_module, fp16_module):
        monkeypatch.setattr(module, "EXTERNAL_DATA_BYTES", 0)
    fused = applied(GraphOptimizationPass(GraphOptimizationOptions()), cnn, context(cnn))
    np.testing.assert_allclose(run(fused.model, dict(images.inputs))[0], run(cnn, dict(images.inputs))[0], atol=1e-4)
    static = applied(QuantizeInt8Pass(QuantizeInt8Options()), cnn, context(cnn, data=images))
    assert static.metrics["nodes_quantized"] == 4
    dynamic = applied(QuantizeInt8Pass(QuantizeInt8Options()), attention, context(attention))
    assert dynamic.metrics["nodes_quantized"] == 6
    half = applied(FP16Pass(FP16Options()), cnn, context(cnn))
    assert half.metrics["initializers_fp16"] == 16
    for result in (fused, static, dynamic, half):
        assert not any(onnx.external_data_helper.uses_external_data(t) for t in result.model.graph.initializer), (
            "results live in memory, with their data"
        )


def test_a_failed_pre_quantization_optimization_becomes_a_note(
    cnn: onnx.ModelProto, images: Dataset, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def optimizer_fails(source: str, target: str, **kwargs: Any) -> None:
        # What quant_pre_process does when ONNX Runtime cannot optimize: log, and go on without.
        logging.getLogger("onnxruntime.quantization.shape_inference").error("ONNX Runtime Model Optimization Failed!")
        real_pre_process(source, target, skip_optimization=True, **kwargs)

    monkeypatch.setattr(quantize_module, "quant_pre_process", optimizer_fails)
    result = applied(QuantizeInt8Pass(QuantizeInt8Options()), cnn, context(cnn, data=images))
    assert any("pre-quantization graph optimization failed" in note for note in result.notes)
    assert "Optimization Failed" not in capsys.readouterr().err


@pytest.mark.parametrize("level", ["basic", "extended"])
def test_graph_optimization_is_exact_on_a_matmul_model(
    attention: onnx.ModelProto, sequences: Dataset, level: Any
) -> None:
    result = applied(GraphOptimizationPass(GraphOptimizationOptions(level=level)), attention, context(attention))
    feeds = dict(sequences.inputs)
    np.testing.assert_allclose(run(result.model, feeds)[0], run(attention, feeds)[0], atol=1e-4)


def test_fp16_on_a_matmul_model(attention: onnx.ModelProto, sequences: Dataset) -> None:
    result = applied(FP16Pass(FP16Options()), attention, context(attention))
    feeds = dict(sequences.inputs)
    fp32, fp16 = run(attention, feeds)[0], run(result.model, feeds)[0]
    assert fp16.dtype == np.float32
    assert np.abs(fp32 - fp16).max() < 1e-2 * np.abs(fp32).max()


def test_probe_order_caps_big_models_where_the_trouble_usually_is() -> None:
    names = [f"layer{i}" for i in range(MAX_PROBES + 10)]
    sizes = {name: i for i, name in enumerate(names)}
    assert probe_order(names[:5], sizes, for_speed=False) == names[:5]
    for_accuracy = probe_order(names, sizes, for_speed=False)
    assert len(for_accuracy) == MAX_PROBES
    assert for_accuracy[0] == names[0]  # the first and last layers are always analysed
    assert for_accuracy[-1] == names[-1]
    assert names[1] not in for_accuracy  # then the largest weights
    assert probe_order(names, sizes, for_speed=True) == names[:MAX_PROBES]  # the smallest weights
