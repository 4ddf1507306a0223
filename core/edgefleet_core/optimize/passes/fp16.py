"""FP16 conversion for accelerator classes, by ONNX Runtime's float16 converter.

The converter (``onnxruntime.transformers.float16``) knows which ops lack FP16 kernels and which
inputs must stay FP32 (Resize scales and the like); this pass adds the policy: refuse models that
are already reduced-precision, keep ONNX Runtime's own block list under the user's, restore the
topological order the checker requires, and report what was clamped to the FP16 range.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from edgefleet_core.errors import PassNotApplicable
from edgefleet_core.optimize.model_io import serialize
from edgefleet_core.optimize.passes.base import OptimizationPass, PassCapability, PassContext, PassResult
from edgefleet_core.optimize.passes.graph_optimization import EXTERNAL_DATA_BYTES, save_for_tools, unfuse_cpu_fusions
from edgefleet_core.optimize.passes.quantize import is_quantized
from edgefleet_core.resources.recipe import FP16Options

FP16_PROVIDERS = frozenset(
    {
        "CUDAExecutionProvider",
        "TensorrtExecutionProvider",
        "NvTensorRTRTXExecutionProvider",
        "DmlExecutionProvider",
        "CoreMLExecutionProvider",
        "OpenVINOExecutionProvider",
        "ROCMExecutionProvider",
        "MIGraphXExecutionProvider",
        "QNNExecutionProvider",
    }
)
"""EPs with native FP16 kernels; ONNX Runtime's CPU EP runs most FP16 ops through inserted casts."""
FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINIEST = 5.96e-08
"""The converter's default: positive values below it become it (the smallest FP16 subnormal)."""
_REDUCED_FLOATS = frozenset({TensorProto.FLOAT16, TensorProto.BFLOAT16})

# The converter's failures: shape inference errors, asserts and type errors on graphs it misreads.
_CONVERTER_FAILURES: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    KeyError,
    AssertionError,
    RuntimeError,
    onnx.shape_inference.InferenceError,
)


def has_reduced_float(model: onnx.ModelProto) -> bool:
    """Whether ``model`` already computes in FP16 or BF16 (weights, graph inputs/outputs or casts)."""
    if any(init.data_type in _REDUCED_FLOATS for init in model.graph.initializer):
        return True
    graph_io = [*model.graph.input, *model.graph.output]
    if any(value.type.tensor_type.elem_type in _REDUCED_FLOATS for value in graph_io):
        return True
    for node in model.graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i in _REDUCED_FLOATS for a in node.attribute):
            return True
    return False


def _has_fp32(model: onnx.ModelProto) -> bool:
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    return any(init.data_type == TensorProto.FLOAT for init in model.graph.initializer) or any(
        value.type.tensor_type.elem_type == TensorProto.FLOAT for value in values
    )


def _with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    # The converter types intermediate tensors from shape inference; its in-memory call fails
    # over 2 GiB, where ONNX's file-based inference still works.
    if model.ByteSize() <= EXTERNAL_DATA_BYTES:
        return onnx.shape_inference.infer_shapes(model)
    with tempfile.TemporaryDirectory(prefix="edgefleet-fp16-") as tmp:
        source, inferred = Path(tmp) / "input.onnx", Path(tmp) / "inferred.onnx"
        save_for_tools(model, source)
        onnx.shape_inference.infer_shapes_path(str(source), str(inferred))
        return onnx.load(str(inferred))


def _clamped_values(before: onnx.ModelProto, after: onnx.ModelProto) -> int:
    converted = {init.name for init in after.graph.initializer if init.data_type == TensorProto.FLOAT16}
    count = 0
    for init in before.graph.initializer:
        if init.name in converted and init.data_type == TensorProto.FLOAT:
            magnitude = np.abs(numpy_helper.to_array(init))
            finite = np.isfinite(magnitude)
            count += int(np.count_nonzero(finite & (magnitude > FP16_MAX)))
            count += int(np.count_nonzero((magnitude > 0) & (magnitude < FP16_TINIEST)))
    return count


class FP16Pass(OptimizationPass[FP16Options]):
    """Convert weights and activations to FP16, halving the file and using accelerators' FP16 units.

    ``op_block_list`` adds to ONNX Runtime's default block list (ops without FP16 kernels) rather
    than replacing it: dropping an entry of that list breaks the model instead of speeding it up.
    """

    pass_type: ClassVar[str] = "FP16"
    options_type: ClassVar[type[FP16Options]] = FP16Options
    capability: ClassVar[PassCapability] = PassCapability(
        summary="FP16 weights and activations (ONNX Runtime's converter), optionally keeping FP32 inputs/outputs",
        execution_providers=FP16_PROVIDERS,
        precision="fp16",
        needs_data=False,
        exact=False,
    )

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Convert a copy of ``model`` to FP16."""
        if is_quantized(model):
            raise PassNotApplicable(self.pass_type, "already quantized: FP16 applies to FP32 models")
        if has_reduced_float(model):
            raise PassNotApplicable(self.pass_type, "already FP16 (or BF16)")
        if not _has_fp32(model):
            raise PassNotApplicable(self.pass_type, "the model has no FP32 tensors to convert")
        # ONNX Runtime's CPU fusions carry no FP16 type rules for the converter; split them first.
        standard, unfused = unfuse_cpu_fusions(model)
        blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(self.options.op_block_list or []))
        try:
            shaped = _with_shapes(standard)  # a new model: the input is never touched
            converted = convert_float_to_float16(
                shaped, keep_io_types=self.options.keep_io_types, op_block_list=blocked, disable_shape_infer=True
            )
            # The converter appends its boundary Cast nodes at the end of the graph; ONNX requires
            # topological order (ONNX Runtime sorts on load, the checker does not).
            OnnxModel.graph_topological_sort(converted.graph)
        except _CONVERTER_FAILURES as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no message"
            raise PassNotApplicable(
                self.pass_type,
                f"ONNX Runtime's FP16 converter cannot handle this model ({type(exc).__name__}: {first})",
            ) from exc

        fp16_inits = sum(1 for init in converted.graph.initializer if init.data_type == TensorProto.FLOAT16)
        kept = sorted({n.op_type for n in model.graph.node if n.op_type in blocked})
        notes = [*unfused, f"converted {fp16_inits} initializers to FP16"]
        if self.options.keep_io_types:
            notes.append("kept FP32 graph inputs and outputs (casts at the boundary)")
        if kept:
            notes.append(f"kept {', '.join(kept)} in FP32 (blocked ops)")
        clamped = _clamped_values(model, converted)
        if clamped:
            notes.append(f"clamped {clamped} weight values outside the FP16 range")
        ctx.logger.info("FP16: converted %d initializers", fp16_inits)
        metrics = {
            "initializers_fp16": float(fp16_inits),
            "values_clamped": float(clamped),
            "bytes_before": float(len(serialize(model))),
            "bytes_after": float(len(serialize(converted))),
        }
        return PassResult(converted, notes, metrics)
