"""Operator fusion and constant folding by ONNX Runtime's offline graph optimization.

ONNX Runtime optimizes every graph when it loads it; run offline, the same transformers write
their result to a file (``SessionOptions.optimized_model_filepath``), so the shipped model starts
fused and folded and loads faster on the device. A variant is built once and shipped to many
devices, possibly of another CPU architecture, so this pass never writes hardware-specific
layouts (see :func:`portable_level`).

For the CPU, the fused ops are ONNX Runtime contrib ops (FusedConv, FusedGemm, FusedMatMul) that
ONNX's tools and ONNX Runtime's own quantizer do not read; :func:`unfuse_cpu_fusions` splits them
back, exactly, for passes that run after this one. Helpers for ONNX Runtime's file-based tools
(models over 2 GiB need external data) live here too.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Literal

import onnx
import onnxruntime as ort

from edgefleet_core.errors import PassNotApplicable
from edgefleet_core.optimize.passes.base import OptimizationPass, PassCapability, PassContext, PassResult
from edgefleet_core.optimize.runtime import CPU_EP, ORT_ERRORS
from edgefleet_core.resources.recipe import GraphOptimizationOptions

EXTERNAL_DATA_BYTES = 1024**3
"""Models larger than this are written with external data for ONNX Runtime's file-based tools
(a single protobuf cannot exceed 2 GiB)."""
OPTIMIZED_EXTERNAL_MIN_BYTES = 1024
"""ONNX Runtime writes initializers of at least this size next to the optimized model. Always on,
so that models over 2 GiB and small ones take the same, tested, path back into memory."""

Level = Literal["basic", "extended", "layout", "all"]
_ORT_LEVELS: dict[Level, ort.GraphOptimizationLevel] = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "layout": ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_RANK: dict[Level, int] = {"basic": 0, "extended": 1, "layout": 2, "all": 3}


def save_for_tools(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` where ONNX Runtime's file-based tools can read it (external data when large).

    ``model`` is left as it was: saving with external data rewrites the tensors it saves, so a
    large model is saved from a copy (briefly twice the memory, never a changed input).
    """
    if model.ByteSize() <= EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path))
        return
    detached = onnx.ModelProto()
    detached.CopyFrom(model)
    onnx.save_model(detached, str(path), save_as_external_data=True, location=f"{path.name}.data")


def portable_level(requested: Level, execution_provider: str) -> tuple[Level, str | None]:
    """The highest level whose output runs on every device of the class, and why it was lowered.

    ``layout`` (and ``all``, which includes it) rewrites Conv into NCHWc blocks sized for this
    machine's vector width: valid only on the CPU that optimized it. ``extended`` fusions
    (FusedConv, FusedGemm, attention and layer-norm fusions) are ONNX Runtime contrib ops that
    the CPU EP runs on every architecture but other EPs may not, so non-CPU classes get ``basic``
    (EP-independent rewrites: constant folding, Conv+BatchNormalization folding, redundant-node
    elimination) and let their EP fuse at load time.
    """
    ceiling: Level = "extended" if execution_provider == CPU_EP else "basic"
    if _RANK[requested] <= _RANK[ceiling]:
        return requested, None
    if execution_provider == CPU_EP:
        why = (
            f"level {requested} lowered to extended: layout optimizations (NCHWc) are specific to the CPU "
            "that runs them, and a variant ships to devices of other CPU architectures"
        )
    else:
        why = (
            f"level {requested} lowered to basic: extended fusions are ONNX Runtime CPU contrib ops that "
            f"{execution_provider} may not run; it applies its own fusions when it loads the model"
        )
    return ceiling, why


def used_domains(graph: onnx.GraphProto) -> set[str]:
    """Operator domains of ``graph``'s nodes and of their subgraphs."""
    domains: set[str] = set()
    for node in graph.node:
        domains.add(node.domain)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                domains |= used_domains(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    domains |= used_domains(sub)
    return domains


def drop_unused_opsets(model: onnx.ModelProto) -> None:
    """Remove ``model``'s opset imports that neither the graph nor its functions use (in place)."""
    # ONNX Runtime declares every domain it knows (training, preview, aten ...) in the models it
    # writes; keep the default domain and those the graph or its functions use.
    keep = used_domains(model.graph) | {"", "ai.onnx"}
    for function in model.functions:
        keep.add(function.domain)
        for node in function.node:
            keep.add(node.domain)
    kept = [entry for entry in model.opset_import if entry.domain in keep]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def optimize_offline(model: onnx.ModelProto, level: ort.GraphOptimizationLevel) -> onnx.ModelProto:
    """ONNX Runtime's optimization of ``model`` at ``level`` on the CPU EP, as a new model.

    Raises the ONNX Runtime error when it cannot load the model. The result is read back with
    its external data, so it lives in memory only, like the input.
    """
    with tempfile.TemporaryDirectory(prefix="edgefleet-graphopt-") as tmp:
        source = Path(tmp) / "input.onnx"
        target = Path(tmp) / "optimized.onnx"
        save_for_tools(model, source)
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.optimized_model_filepath = str(target)
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", f"{target.name}.data"
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", str(OPTIMIZED_EXTERNAL_MIN_BYTES)
        )
        # Creating the session runs the optimizers and writes the file; the session is not used.
        ort.InferenceSession(str(source), sess_options=options, providers=[CPU_EP])
        optimized = onnx.load(str(target), load_external_data=True)
    drop_unused_opsets(optimized)
    return optimized


CONTRIB_DOMAIN = "com.microsoft"
_ACTIVATION_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "Relu": (),
    "Sigmoid": (),
    "Tanh": (),
    "Softsign": (),
    "Softplus": (),
    "LeakyRelu": ("alpha",),
    "HardSigmoid": ("alpha", "beta"),
    "Elu": ("alpha",),
    "ThresholdedRelu": ("alpha",),
    "Selu": ("alpha", "gamma"),
}
"""Activations ONNX Runtime fuses into FusedConv/FusedGemm, with their parameters in fused order."""


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _node(
    op_type: str, inputs: list[str], output: str, name: str, attributes: Mapping[str, object] | None = None
) -> onnx.NodeProto:
    node = onnx.helper.make_node(op_type, inputs, [output], name=name)
    node.attribute.extend(onnx.helper.make_attribute(key, value) for key, value in (attributes or {}).items())
    return node


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(value: object) -> float:
    if not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _numbers(value: object) -> list[float]:
    return [_number(v) for v in value] if isinstance(value, list) else []


class _Unfuser:
    """Splits ONNX Runtime's CPU fusions back into the standard ops they were made from.

    Ours on purpose: ONNX Runtime has no inverse of its fusions, and its quantizer (like every
    pass that reads Conv/Gemm/MatMul) cannot handle FusedConv, FusedGemm or FusedMatMul. The split
    is exact; ONNX Runtime fuses again when a device loads the model.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.opset = next((e.version for e in model.opset_import if e.domain in ("", "ai.onnx")), 0)
        self.initializers: list[onnx.TensorProto] = []
        self.ranks: dict[str, int] | None = None

    def _rank(self, tensor: str) -> int | None:
        if self.ranks is None:
            # FusedMatMul's transposes need ranks; ONNX shape inference gives them for tensors
            # made by standard ops (it is skipped over 2 GiB, where those nodes stay fused).
            inferred = self.model
            if self.model.ByteSize() <= EXTERNAL_DATA_BYTES:
                inferred = onnx.shape_inference.infer_shapes(self.model)
            values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
            self.ranks = {
                v.name: len(v.type.tensor_type.shape.dim) for v in values if v.type.tensor_type.HasField("shape")
            }
            self.ranks |= {init.name: len(init.dims) for init in inferred.graph.initializer}
        return self.ranks.get(tensor)

    def _constant(self, node: onnx.NodeProto, suffix: str, value: float) -> str:
        name = f"{node.output[0]}/unfused_{suffix}"
        self.initializers.append(onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [], [value]))
        return name

    def _activation(
        self, node: onnx.NodeProto, kind: str, params: dict[str, float], x: str
    ) -> list[onnx.NodeProto] | None:
        y = node.output[0]
        if kind == "Clip" and {"min", "max"} <= params.keys():
            if self.opset < 11:
                return [_node("Clip", [x], y, f"{node.name}/Clip", params)]
            bounds = [self._constant(node, "min", params["min"]), self._constant(node, "max", params["max"])]
            return [_node("Clip", [x, *bounds], y, f"{node.name}/Clip")]
        if kind not in _ACTIVATION_ATTRIBUTES:
            return None
        kept = {k: v for k, v in params.items() if k in _ACTIVATION_ATTRIBUTES[kind]}
        return [_node(kind, [x], y, f"{node.name}/{kind}", kept)]

    def split(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        """Standard nodes computing what ``node`` does, or ``None`` to keep it as it is."""
        if node.domain != CONTRIB_DOMAIN:
            return None
        attrs = _attributes(node)
        if node.op_type == "FusedConv":
            return self._fused_conv(node, attrs)
        if node.op_type == "FusedGemm":
            return self._fused_gemm(node, attrs)
        if node.op_type == "FusedMatMul":
            return self._fused_matmul(node, attrs)
        return None

    def _fused_conv(self, node: onnx.NodeProto, attrs: dict[str, object]) -> list[onnx.NodeProto] | None:
        # FusedConv(X, W, B, Z) = activation(Conv(X, W, B) + Z)
        kind = _text(attrs.pop("activation", ""))
        values = _numbers(attrs.pop("activation_params", []))
        names = ("min", "max") if kind == "Clip" else _ACTIVATION_ATTRIBUTES.get(kind, ())
        conv_out = f"{node.output[0]}/unfused_conv"
        conv_inputs = list(node.input[:3])
        while conv_inputs and not conv_inputs[-1]:
            conv_inputs.pop()
        nodes = [_node("Conv", conv_inputs, conv_out, node.name, attrs)]
        if len(node.input) > 3 and node.input[3]:
            summed = f"{node.output[0]}/unfused_sum"
            nodes.append(_node("Add", [conv_out, node.input[3]], summed, f"{node.name}/Add"))
            conv_out = summed
        activation = self._activation(node, kind, dict(zip(names, values, strict=False)), conv_out)
        return None if activation is None else [*nodes, *activation]

    def _fused_gemm(self, node: onnx.NodeProto, attrs: dict[str, object]) -> list[onnx.NodeProto] | None:
        kind = _text(attrs.pop("activation", ""))
        params = {
            k: _number(attrs.pop(f"activation_{k}")) for k in ("alpha", "beta", "gamma") if f"activation_{k}" in attrs
        }
        gemm_out = f"{node.output[0]}/unfused_gemm"
        gemm = _node("Gemm", list(node.input), gemm_out, node.name, attrs)
        activation = None if kind == "Clip" else self._activation(node, kind, params, gemm_out)
        return None if activation is None else [gemm, *activation]

    def _fused_matmul(self, node: onnx.NodeProto, attrs: dict[str, object]) -> list[onnx.NodeProto] | None:
        # FusedMatMul(A, B) = alpha · MatMul(A or Aᵀ, B or Bᵀ), transposing the last two axes.
        if attrs.get("transBatchA") or attrs.get("transBatchB"):
            return None
        nodes: list[onnx.NodeProto] = []
        operands = []
        for index, flag in ((0, "transA"), (1, "transB")):
            tensor = node.input[index]
            if attrs.get(flag):
                rank = self._rank(tensor)
                if rank is None or rank < 2:
                    return None
                perm = [*range(rank - 2), rank - 1, rank - 2]
                transposed = f"{node.output[0]}/unfused_{flag}"
                nodes.append(
                    onnx.helper.make_node("Transpose", [tensor], [transposed], name=f"{node.name}/{flag}", perm=perm)
                )
                tensor = transposed
            operands.append(tensor)
        alpha = _number(attrs.get("alpha", 1.0))
        product = node.output[0] if alpha == 1.0 else f"{node.output[0]}/unfused_matmul"
        nodes.append(onnx.helper.make_node("MatMul", operands, [product], name=node.name))
        if alpha != 1.0:
            scale = self._constant(node, "alpha", alpha)
            nodes.append(onnx.helper.make_node("Mul", [product, scale], [node.output[0]], name=f"{node.name}/Mul"))
        return nodes


def unfuse_cpu_fusions(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` with ONNX Runtime's FusedConv/FusedGemm/FusedMatMul split into standard ops.

    Returns ``model`` itself when it holds none, else a new model and a note. Nodes that cannot be
    split (an activation without a standard op, ranks shape inference cannot give) stay fused.
    """
    if not any(
        n.domain == CONTRIB_DOMAIN and n.op_type in {"FusedConv", "FusedGemm", "FusedMatMul"} for n in model.graph.node
    ):
        return model, []
    unfuser = _Unfuser(model)
    nodes: list[onnx.NodeProto] = []
    split: list[str] = []
    for node in model.graph.node:
        replacement = unfuser.split(node)
        if replacement is None:
            nodes.append(node)
        else:
            nodes.extend(replacement)
            split.append(node.op_type)
    if not split:
        return model, []
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    result.graph.initializer.extend(unfuser.initializers)
    drop_unused_opsets(result)
    counts = ", ".join(f"{split.count(op)} {op}" for op in sorted(set(split)))
    return result, [f"split ONNX Runtime's CPU fusions back into standard ops ({counts}) so that they can be quantized"]


class GraphOptimizationPass(OptimizationPass[GraphOptimizationOptions]):
    """Constant folding and operator fusion (Conv+BatchNormalization, Conv+activation ...) by ONNX Runtime.

    Exact: ONNX Runtime's rewrites preserve the outputs up to floating-point rounding. The level
    is capped so that no variant carries hardware-specific layouts (:func:`portable_level`).
    """

    pass_type: ClassVar[str] = "GraphOptimization"
    options_type: ClassVar[type[GraphOptimizationOptions]] = GraphOptimizationOptions
    capability: ClassVar[PassCapability] = PassCapability(
        summary=(
            "ONNX Runtime offline graph optimization: constant folding, Conv+BatchNormalization folding and, "
            "for the CPU EP, Conv/Gemm+activation fusion; never hardware-specific layouts"
        ),
        execution_providers=None,
        precision=None,
        needs_data=False,
        exact=True,
    )

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Optimize a copy of ``model`` at the portable level for ``ctx.execution_provider``."""
        level, lowered = portable_level(self.options.level, ctx.execution_provider)
        try:
            optimized = optimize_offline(model, _ORT_LEVELS[level])
        except ORT_ERRORS as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise PassNotApplicable(self.pass_type, f"ONNX Runtime cannot load the model: {first}") from exc
        notes = [] if lowered is None else [lowered]
        before, after = len(model.graph.node), len(optimized.graph.node)
        summary = f"ONNX Runtime {level} optimization: {before} → {after} nodes"
        notes.append(summary)
        contrib = sorted({n.op_type for n in optimized.graph.node if n.domain == CONTRIB_DOMAIN})
        if contrib:
            # Only ONNX Runtime runs these; the quantization passes split them back (unfuse_cpu_fusions).
            notes.append(f"the result holds ONNX Runtime contrib ops ({', '.join(contrib)})")
        ctx.logger.info("GraphOptimization: %s", summary)
        return PassResult(
            optimized,
            notes,
            {"nodes_before": float(before), "nodes_after": float(after)},
        )
