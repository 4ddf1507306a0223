"""Structured channel surgery: which Conv output channels can be removed, and removing them exactly.

Removing output channel ``c`` of a Conv is exact only if every tensor derived from that channel is
consumed in a way we can cut consistently. :func:`plan_channels` follows the Conv's output through
ops that act per channel (activations, BatchNormalization, pools, elementwise arithmetic with
per-channel or scalar constants) up to the layers that mix channels again — Convs with ``group == 1``,
or a Flatten (or the equivalent Reshape) feeding Gemm/MatMul — and records every initializer to cut.
Anything it cannot follow (a residual Add or Concat with another branch, a graph output, a grouped
Conv, an unknown op) makes it refuse with a reason. The tracer is ours on purpose: ONNX has no
library for structured pruning, and every rule here is one we can state and test.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from edgefleet_core.optimize.graph import attribute, get_array, graph_outputs, set_array
from edgefleet_core.optimize.passes._surgery import (
    forget_shapes,
    fresh_name,
    reference_counts,
    subgraph_references,
    sync_input_declaration,
)

Shape = tuple[int | None, ...]

# Ops that map each element (or each channel) independently: channel c of the output depends only
# on channel c of the input, so cutting channels before them cuts the same channels after them.
UNARY_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu", "Celu",
        "Softplus", "Softsign", "Mish", "Gelu", "ThresholdedRelu", "Identity", "Dropout", "Neg", "Abs",
        "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Floor", "Ceil", "Round", "Sin", "Cos",
    }
)  # fmt: skip
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min"})
POOL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool"})
GLOBAL_POOL_OPS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})


@dataclass(frozen=True)
class Layout:
    """Where a pruned Conv's channels sit in a tensor derived from its output.

    Channel ``c`` occupies indices ``c*block .. c*block+block-1`` of axis 1: ``block`` is 1 for an
    NCHW feature map and ``H*W`` after flattening it.
    """

    rank: int
    block: int


@dataclass(frozen=True)
class Cut:
    """An initializer input of ``node`` to cut along ``axis``, ``block`` entries per channel."""

    node: onnx.NodeProto
    index: int
    axis: int
    block: int


@dataclass(frozen=True)
class Rewrite:
    """An initializer input of ``node`` to replace by a fixed value (a Reshape's target shape)."""

    node: onnx.NodeProto
    index: int
    value: npt.NDArray[np.int64]


@dataclass
class ChannelPlan:
    """Everything that changes when output channels of ``conv`` are removed."""

    conv: onnx.NodeProto
    channels: int
    cuts: list[Cut] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    region: set[str] = field(default_factory=set)
    """Tensors whose channel count changes (their recorded shapes become stale)."""
    batch_norm: onnx.NodeProto | None = None
    """The BatchNormalization right after the Conv, whose scale weighs each filter's importance."""


class GraphIndex:
    """Lookups over the current graph; rebuilt after each surgery because names may change."""

    def __init__(self, model: onnx.ModelProto, shapes: Mapping[str, Shape]) -> None:
        self.model = model
        self.shapes = shapes
        self.initializers = {init.name: init for init in model.graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in model.graph.node:
            for name in dict.fromkeys(node.input):
                if name:
                    self.consumers[name].append(node)
        self.outputs = graph_outputs(model)
        self.in_subgraphs = subgraph_references(model)

    def used(self, name: str) -> bool:
        return bool(name) and (name in self.outputs or bool(self.consumers.get(name)) or name in self.in_subgraphs)

    def dims(self, name: str) -> tuple[int, ...] | None:
        init = self.initializers.get(name)
        return tuple(init.dims) if init is not None else None


def static_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Shapes ONNX shape inference can tell, on a copy (inferred entries must not stay in the model:
    channel surgery would make them stale)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError):
        return {}
    shapes: dict[str, Shape] = {}
    graph = inferred.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    return shapes


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name or node.output[0]!r}"


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    value = attribute(node, name, default)
    return int(value) if isinstance(value, int) else default


def _constant(index: GraphIndex, name: str) -> npt.NDArray[np.generic] | None:
    init = index.initializers.get(name)
    return None if init is None else numpy_helper.to_array(init)


def _extra_outputs_unused(index: GraphIndex, node: onnx.NodeProto) -> bool:
    # BatchNormalization's running statistics, MaxPool's indices, Dropout's mask: their shapes
    # or values depend on the channel count in ways we do not rewrite.
    return not any(index.used(name) for name in node.output[1:])


@dataclass
class _Trace:
    index: GraphIndex
    plan: ChannelPlan
    layouts: dict[str, Layout] = field(default_factory=dict)
    joins: list[onnx.NodeProto] = field(default_factory=list)
    """Elementwise nodes with two activation inputs: exact only if both come from this Conv alike."""

    def operand(self, node: onnx.NodeProto, position: int, layout: Layout) -> str | None:
        """Record the cut of a constant operand broadcast against the traced tensor, or say why not."""
        dims = self.index.dims(node.input[position])
        if dims is None:
            return f"{_label(node)} combines it with a computed tensor"
        if len(dims) > layout.rank:
            return f"{_label(node)} broadcasts it to a higher rank"
        offset = layout.rank - len(dims)
        if offset > 1 or dims[1 - offset] == 1:
            return None  # the constant is the same for every channel
        if dims[1 - offset] == self.plan.channels * layout.block:
            self.plan.cuts.append(Cut(node, position, 1 - offset, layout.block))
            return None
        return f"{_label(node)} applies a constant of shape {list(dims)} that does not follow its channels"

    def follow(self, node: onnx.NodeProto, tensor: str, layout: Layout) -> Layout | str | None:
        """The layout of ``node``'s first output given ``tensor``'s, recording cuts; or why not.

        ``None`` means ``node`` mixes channels (a Conv, Gemm or MatMul whose weight was cut): the
        trace ends there.
        """
        if node.domain not in ("", "ai.onnx"):
            return f"its output reaches {_label(node)} of domain {node.domain!r}, which cannot be rewired"
        if node.op_type in BINARY_OPS:
            return self._elementwise(node, tensor, layout)
        if [i for i, name in enumerate(node.input) if name == tensor] != [0]:
            return f"its output is a parameter input of {_label(node)}"
        if not _extra_outputs_unused(self.index, node):
            return f"{_label(node)} has a second output in use"
        op = node.op_type
        if op in UNARY_OPS or op in POOL_OPS or op in GLOBAL_POOL_OPS or op == "BatchNormalization":
            return self._per_channel(node, layout)
        special = {"Flatten": self._flatten_node, "Reshape": self._reshape, "Squeeze": self._squeeze}.get(op)
        return special(node, tensor, layout) if special else self._sink(node, layout)

    def _elementwise(self, node: onnx.NodeProto, tensor: str, layout: Layout) -> Layout | str:
        for position, name in enumerate(node.input):
            if name == tensor or not name:
                continue
            if name not in self.index.initializers:
                self.joins.append(node)  # checked once the whole region is known
                continue
            problem = self.operand(node, position, layout)
            if problem:
                return problem
        return layout

    def _per_channel(self, node: onnx.NodeProto, layout: Layout) -> Layout | str:
        if node.op_type in UNARY_OPS:
            return layout  # elementwise: any layout, flattened or not
        if layout.block != 1:
            return f"{_label(node)} follows a Flatten"
        if node.op_type == "BatchNormalization":
            if any(name not in self.index.initializers for name in node.input[1:5]):
                return f"{_label(node)} has computed parameters"
            self.plan.cuts.extend(Cut(node, position, 0, 1) for position in range(1, 5))
        return layout

    def _flatten_node(self, node: onnx.NodeProto, tensor: str, layout: Layout) -> Layout | str:
        return self._flatten(node, tensor, layout, _int_attr(node, "axis", 1))

    def _flatten(self, node: onnx.NodeProto, tensor: str, layout: Layout, axis: int) -> Layout | str:
        if axis < 0:
            axis += layout.rank
        if axis != 1:
            return f"{_label(node)} flattens on axis {axis}, mixing channels with other axes"
        if layout.rank == 2:
            return layout
        shape = self.index.shapes.get(tensor)
        spatial = shape[2:] if shape is not None and len(shape) == layout.rank else None
        if spatial is None or any(not d for d in spatial):
            return f"{_label(node)} flattens a feature map whose spatial size is unknown"
        return Layout(2, layout.block * math.prod(d or 0 for d in spatial))

    def _reshape(self, node: onnx.NodeProto, tensor: str, layout: Layout) -> Layout | str:
        # Only the Flatten(axis=1) equivalents: [0, -1], and [-1, C*H*W] which becomes [0, -1].
        target = _constant(self.index, node.input[1])
        reason = f"its output reaches {_label(node)}, which is not a flatten of the channels"
        if target is None or target.ndim != 1 or target.size != 2 or _int_attr(node, "allowzero", 0):
            return reason
        first, second = (int(v) for v in target)
        flattened = self._flatten(node, tensor, layout, 1)
        if isinstance(flattened, str):
            return flattened
        if (first, second) == (0, -1):
            return flattened
        if first == -1 and second == self.plan.channels * flattened.block:
            self.plan.rewrites.append(Rewrite(node, 1, np.array([0, -1], dtype=np.int64)))
            return flattened
        return reason

    def _squeeze(self, node: onnx.NodeProto, tensor: str, layout: Layout) -> Layout | str:
        axes_value = attribute(node, "axes") if len(node.input) < 2 else _constant(self.index, node.input[1])
        axes = [int(a) for a in np.asarray(axes_value).ravel()] if axes_value is not None else []
        axes = [a + layout.rank if a < 0 else a for a in axes]
        if not axes or min(axes) < 2:
            return f"{_label(node)} may squeeze the batch or channel axis"
        return Layout(layout.rank - len(set(axes)), layout.block)

    def _sink(self, node: onnx.NodeProto, layout: Layout) -> str | None:
        """A layer that mixes channels: cut its weight's input side and stop there."""
        op = node.op_type
        if op in ("Conv", "ConvTranspose"):
            return self._conv_sink(node, layout)
        if op in ("Gemm", "MatMul"):
            return self._matrix_sink(node, layout)
        if op in ("Concat", "Add", "Sum"):
            return f"its output reaches a residual {op} ({_label(node)})"
        return f"its output reaches {_label(node)}, which cannot be rewired"

    def _conv_sink(self, node: onnx.NodeProto, layout: Layout) -> str | None:
        if _int_attr(node, "group", 1) != 1:
            return f"its output feeds the grouped convolution {_label(node)}"
        weight = self.index.dims(node.input[1])
        if weight is None or layout.block != 1 or len(weight) != layout.rank:
            return f"its output feeds {_label(node)} in a way that cannot be rewired"
        # Conv weights are (out, in, ...); ConvTranspose weights are (in, out, ...).
        self.plan.cuts.append(Cut(node, 1, 1 if node.op_type == "Conv" else 0, 1))
        return None

    def _matrix_sink(self, node: onnx.NodeProto, layout: Layout) -> str | None:
        weight = self.index.dims(node.input[1])
        if layout.rank != 2 or weight is None or len(weight) != 2:
            return f"its output feeds {_label(node)} in a way that cannot be rewired"
        if node.op_type == "Gemm" and _int_attr(node, "transA", 0):
            return f"its output feeds {_label(node)} with transA"
        axis = 1 if node.op_type == "Gemm" and _int_attr(node, "transB", 0) else 0
        self.plan.cuts.append(Cut(node, 1, axis, layout.block))
        return None


def _start(index: GraphIndex, conv: onnx.NodeProto) -> ChannelPlan | str:
    """The cuts of the Conv itself (weight rows, bias), or why its filters cannot be removed."""
    weight = index.dims(conv.input[1])
    if _int_attr(conv, "group", 1) != 1:
        return "it is a grouped or depthwise convolution"
    if weight is None:
        return "its weight is not an initializer"
    bias = conv.input[2] if len(conv.input) > 2 else ""
    if bias and bias not in index.initializers:
        return "its bias is computed"
    plan = ChannelPlan(conv, channels=weight[0])
    plan.cuts.append(Cut(conv, 1, 0, 1))
    if bias:
        plan.cuts.append(Cut(conv, 2, 0, 1))
    first = index.consumers.get(conv.output[0], [])
    if len(first) == 1 and first[0].op_type == "BatchNormalization" and first[0].input[0] == conv.output[0]:
        plan.batch_norm = first[0]
    return plan


def plan_channels(index: GraphIndex, conv: onnx.NodeProto) -> ChannelPlan | str:
    """What removing output channels of ``conv`` changes, or why they cannot be removed exactly."""
    plan = _start(index, conv)
    if isinstance(plan, str):
        return plan
    start = conv.output[0]
    trace = _Trace(index, plan, {start: Layout(len(index.dims(conv.input[1]) or ()), 1)})
    queue = deque([start])
    visited: set[int] = set()
    while queue:
        tensor = queue.popleft()
        problem = _region_problem(index, tensor)
        if problem:
            return problem
        plan.region.add(tensor)
        for node in index.consumers.get(tensor, []):
            if id(node) in visited:
                continue
            visited.add(id(node))
            result = trace.follow(node, tensor, trace.layouts[tensor])
            if isinstance(result, str):
                return result
            if result is not None:
                trace.layouts[node.output[0]] = result
                queue.append(node.output[0])
    for join in trace.joins:
        # x * sigmoid(x) is per channel; x + (a tensor from another branch) is a residual join.
        sides = {trace.layouts.get(name) for name in join.input if name and name not in index.initializers}
        if None in sides or len(sides) != 1:
            return f"its output reaches a residual {join.op_type} ({_label(join)})"
    return plan


def _region_problem(index: GraphIndex, tensor: str) -> str | None:
    if tensor in index.outputs:
        return f"its output reaches the graph output {tensor!r}"
    if tensor in index.in_subgraphs:
        return f"{tensor!r} is read inside a control-flow subgraph"
    return None


def filter_scores(
    weight: npt.NDArray[np.generic], criterion: str, bn: tuple[npt.NDArray[np.floating], ...] | None
) -> npt.NDArray[np.float64]:
    """Importance of each output filter: its L1 or L2 norm, times the BatchNormalization gain after it.

    BatchNormalization rescales each channel by ``|gamma| / sqrt(var + eps)``, so a filter with a
    small norm may still matter a lot; its effective norm is what reaches the next layer.
    """
    flat = weight.reshape(weight.shape[0], -1).astype(np.float64)
    scores = np.abs(flat).sum(axis=1) if criterion == "l1" else np.sqrt((flat**2).sum(axis=1))
    if bn is not None:
        gamma, variance, epsilon = bn
        scores = scores * np.abs(gamma.astype(np.float64)) / np.sqrt(variance.astype(np.float64) + float(epsilon))
    return np.asarray(scores, dtype=np.float64)


def batch_norm_gain(index: GraphIndex, plan: ChannelPlan) -> tuple[npt.NDArray[np.floating], ...] | None:
    """(gamma, variance, epsilon) of the BatchNormalization right after the Conv, if there is one."""
    node = plan.batch_norm
    if node is None:
        return None
    gamma = get_array(index.model, node.input[1])
    variance = get_array(index.model, node.input[4])
    epsilon = np.asarray(attribute(node, "epsilon", 1e-5), dtype=np.float64)
    return gamma.astype(np.float64), variance.astype(np.float64), epsilon


def _channel_indices(keep: npt.NDArray[np.int64], block: int) -> npt.NDArray[np.int64]:
    return (keep[:, None] * block + np.arange(block)[None, :]).ravel()


def apply_plan(model: onnx.ModelProto, plan: ChannelPlan, keep: npt.NDArray[np.int64], taken: set[str]) -> None:
    """Keep only channels ``keep`` (sorted) of ``plan.conv`` in ``model``, in place.

    An initializer that other nodes also read is copied before it is cut, so they keep the original.
    """
    refs = reference_counts(model)
    released: list[str] = []

    def target(node: onnx.NodeProto, position: int) -> str:
        name = node.input[position]
        if refs[name] > 1:
            refs[name] -= 1
            released.append(name)
            name = fresh_name(taken, f"{name}_pruned")
            node.input[position] = name
            refs[name] = 1
        return name

    for cut in plan.cuts:
        source = get_array(model, cut.node.input[cut.index])
        name = target(cut.node, cut.index)
        value = np.take(source, _channel_indices(keep, cut.block), axis=cut.axis)
        set_array(model, name, value)
        sync_input_declaration(model, name, value.shape)
    for rewrite in plan.rewrites:
        name = target(rewrite.node, rewrite.index)
        set_array(model, name, rewrite.value)
        sync_input_declaration(model, name, rewrite.value.shape)
    _drop_unused(model, released, refs)
    forget_shapes(model, plan.region)


def _drop_unused(model: onnx.ModelProto, names: Iterable[str], refs: Mapping[str, int]) -> None:
    outputs = graph_outputs(model)
    unused = {name for name in names if refs.get(name, 0) <= 0 and name not in outputs}
    if not unused:
        return
    keep = [init for init in model.graph.initializer if init.name not in unused]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    inputs = [value for value in model.graph.input if value.name not in unused]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
