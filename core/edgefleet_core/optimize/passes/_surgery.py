"""Graph-surgery helpers shared by the compression passes (pruning, low-rank, clustering).

They find the weight tensors of Conv/Gemm/MatMul layers, count who else reads a tensor (so a
pass never changes a value another node relies on), make fresh names, and keep declarations in
step when an initializer changes shape.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
from onnx import TensorProto

from edgefleet_core.optimize.graph import attribute

FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE})
"""Initializer types the compression passes change; integer or quantized weights are left alone."""

WEIGHT_OPS = frozenset({"Conv", "Gemm", "MatMul"})


@dataclass(frozen=True)
class WeightUse:
    """A layer whose second input is a float initializer: the weight a compression pass works on."""

    node: onnx.NodeProto
    name: str
    """The initializer's name."""
    output_axis: int
    """The weight's axis that indexes the layer's output channels/features."""


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _graph_input_refs(graph: onnx.GraphProto, counts: Counter[str]) -> None:
    for node in graph.node:
        counts.update(name for name in node.input if name)
        for sub in _subgraphs(node):
            _graph_input_refs(sub, counts)


def reference_counts(model: onnx.ModelProto) -> Counter[str]:
    """How many node inputs name each tensor, including nodes inside control-flow subgraphs.

    Subgraphs (If/Loop/Scan bodies) may read outer tensors by name without listing them as node
    inputs of the outer node, so they are walked too: a tensor they read is never edited.
    """
    counts: Counter[str] = Counter()
    _graph_input_refs(model.graph, counts)
    return counts


def subgraph_references(model: onnx.ModelProto) -> set[str]:
    """Names read by nodes inside any control-flow subgraph of the main graph."""
    counts: Counter[str] = Counter()
    for node in model.graph.node:
        for sub in _subgraphs(node):
            _graph_input_refs(sub, counts)
    return set(counts)


def weight_uses(model: onnx.ModelProto) -> list[WeightUse]:
    """Conv, Gemm and MatMul nodes (main graph, default domain) whose weight is a float initializer."""
    initializers = {init.name: init for init in model.graph.initializer}
    uses = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        init = initializers.get(node.input[1])
        if init is None or init.data_type not in FLOAT_TYPES:
            continue
        if node.op_type == "Conv":
            axis = 0
        elif node.op_type == "Gemm":
            axis = 0 if attribute(node, "transB", 0) else 1
        else:
            if len(init.dims) < 2:
                continue
            axis = len(init.dims) - 1
        uses.append(WeightUse(node, init.name, axis))
    return uses


def fresh_name(taken: set[str], base: str) -> str:
    """``base`` or ``base_<n>``, whichever is not taken yet; the result is added to ``taken``."""
    name = base
    index = 1
    while name in taken:
        name = f"{base}_{index}"
        index += 1
    taken.add(name)
    return name


def all_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor and node name in the main graph, so new ones can avoid them."""
    graph = model.graph
    names = {init.name for init in graph.initializer}
    names.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    for node in graph.node:
        for sub in _subgraphs(node):
            for inner in sub.node:
                names.update(inner.input)
                names.update(inner.output)
    names.discard("")
    return names


def forget_shapes(model: onnx.ModelProto, names: set[str]) -> None:
    """Drop ``value_info`` entries of tensors whose shape a pass changed (they would be stale)."""
    keep = [v for v in model.graph.value_info if v.name not in names]
    if len(keep) != len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)


def sync_input_declaration(model: onnx.ModelProto, name: str, shape: tuple[int, ...]) -> None:
    """Keep a graph input that declares an initializer (IR < 4 style) in step with its new shape."""
    for value in model.graph.input:
        if value.name == name and value.type.HasField("tensor_type"):
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in shape:
                dims.add().dim_value = size
