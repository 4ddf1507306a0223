"""Operator fission: one heavy Conv, Gemm or MatMul computed as two parts, so a cut can fall inside it.

When one operator dominates a model (the widest Conv of a small CNN, the hidden Gemm of an MLP),
no frontier of the graph balances two pipeline stages: whatever side that operator lands on is the
bottleneck. Splitting it along its output channels (as CoEdge and DeepThings split layers across
devices) lets the head compute the first ``k`` channels and the tail the rest from the same input,
and a ``Concat`` restores the original tensor under its original name::

    Y = Conv(X, W, B)   →   Y/0 = Conv(X, W[:k], B[:k])       (head)
                            Y/1 = Conv(X, W[k:], B[k:])       (tail)
                            Y   = Concat(Y/0, Y/1, axis=1)    (tail)

The cut between the two parts carries ``X`` and ``Y/0``. Each output channel is the same dot
products over the same inputs, so the result is the whole operator's, bit for bit, as long as each
part stays on the kernels' general path: ONNX Runtime computes a lone output channel through a
different routine, so every part keeps at least :data:`MIN_PART` channels. The planner still verifies
every fissioned candidate against the whole model before it offers it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgefleet_core.partition.cuts import PartitionError, tensors_read

__all__ = ["MIN_PART", "FissionSite", "OperatorKind", "apply_fission", "balanced_split", "fission_sites"]

MIN_PART: Final = 8
"""Fewest output channels either part keeps (one channel takes ONNX Runtime's GEMV path, not GEMM)."""

OperatorKind = Literal["Conv", "Gemm", "MatMul"]
_KINDS: Final[dict[str, OperatorKind]] = {"Conv": "Conv", "Gemm": "Gemm", "MatMul": "MatMul"}
# The axis of the output that the parts are concatenated along.
_CONCAT_AXIS: Final[dict[str, int]] = {"Conv": 1, "Gemm": 1, "MatMul": -1}


@dataclass(frozen=True)
class FissionSite:
    """An operator that can be split along its output channels."""

    output: str
    """The operator's output tensor (unique in the graph: the site's identity)."""
    op_type: OperatorKind
    channels: int
    """Output channels (Conv) or features (Gemm, MatMul)."""
    position: int
    """Index of the operator in ``model.graph.node``."""


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _weight_axis(node: onnx.NodeProto) -> int:
    """The axis of the weight initializer that indexes output channels."""
    if node.op_type == "Gemm":
        return 0 if _attribute(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return 1
    return 0  # Conv: [M, C/group, kH, kW]


def _site(
    node: onnx.NodeProto, position: int, weights: dict[str, onnx.TensorProto], overridable: set[str]
) -> FissionSite | None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in _CONCAT_AXIS or len(node.output) != 1:
        return None
    if len(node.input) < 2 or node.input[1] not in weights or node.input[1] in overridable:
        return None  # a weight the caller can override at run time cannot be sliced ahead of time
    weight = weights[node.input[1]]
    if node.op_type == "Conv":
        if _attribute(node, "group", 1) != 1 or len(weight.dims) < 3:
            return None  # grouped / depthwise: channels are tied to input groups
    elif len(weight.dims) != 2:
        return None
    channels = int(weight.dims[_weight_axis(node)])
    if len(node.input) > 2 and node.input[2]:
        bias = node.input[2]
        if bias not in weights or bias in overridable or _bias_axis(node, weights[bias], channels) is _UNSLICEABLE:
            return None
    return FissionSite(output=node.output[0], op_type=_KINDS[node.op_type], channels=channels, position=position)


_UNSLICEABLE: Final = -2


def _bias_axis(node: onnx.NodeProto, bias: onnx.TensorProto, channels: int) -> int | None:
    """Axis of the bias to slice, ``None`` when it broadcasts whole to both parts, or :data:`_UNSLICEABLE`."""
    dims = list(bias.dims)
    if node.op_type == "Conv":
        return 0 if dims == [channels] else _UNSLICEABLE
    # Gemm's C broadcasts to [M, N]: scalar or trailing dimension 1 copies whole, N slices.
    if not dims or dims[-1] == 1:
        return None
    return len(dims) - 1 if dims[-1] == channels else _UNSLICEABLE


def fission_sites(model: onnx.ModelProto, *, min_part: int = MIN_PART) -> list[FissionSite]:
    """Every top-level Conv (ungrouped), Gemm and MatMul with constant weights wide enough to split."""
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    overridable = {i.name for i in graph.input}
    sites = []
    for position, node in enumerate(graph.node):
        site = _site(node, position, weights, overridable)
        if site is not None and site.channels >= 2 * min_part:
            sites.append(site)
    return sites


def balanced_split(
    channels: int, before_ms: float, operator_ms: float, after_ms: float, *, min_part: int = MIN_PART
) -> int:
    """Channels for the head's part so head and tail take equal time (Amdahl on a linear cost).

    ``before_ms`` is the head up to the operator, ``after_ms`` the tail after it. Rounded to the
    widest of 16/8/4 that divides ``channels`` (vector kernels block output channels so), and kept
    within ``[min_part, channels - min_part]``.
    """
    if channels < 2 * min_part:
        raise PartitionError(f"{channels} channels cannot be split into two parts of at least {min_part}")
    fraction = 0.5 if operator_ms <= 0 else (after_ms + operator_ms - before_ms) / (2.0 * operator_ms)
    align = next((a for a in (16, 8, 4) if channels % a == 0 and channels // a >= 4), 1)
    first = round(fraction * channels / align) * align
    return min(max(first, min_part), channels - min_part)


def _fresh(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    taken.add(candidate)
    return candidate


def _slice(tensor: onnx.TensorProto, axis: int, start: int, stop: int, name: str) -> onnx.TensorProto:
    array = numpy_helper.to_array(tensor)
    part = np.ascontiguousarray(np.take(array, np.arange(start, stop), axis=axis))
    return numpy_helper.from_array(part, name)


def apply_fission(model: onnx.ModelProto, output: str, parts: Sequence[int]) -> onnx.ModelProto:
    """A copy of ``model`` where the operator computing ``output`` is two operators and a Concat.

    ``parts`` are the channel counts of the head's part and the tail's part (they must add up to the
    operator's channels, each at least :data:`MIN_PART`). The parts sit where the operator was in
    the node list, so a cut right after the first part is a frontier of the graph's order.
    """
    sites = {s.output: s for s in fission_sites(model, min_part=1)}
    site = sites.get(output)
    if site is None:
        raise PartitionError(f"no Conv, Gemm or MatMul with constant weights computes {output!r}", [output])
    if len(parts) != 2 or sum(parts) != site.channels or min(parts) < MIN_PART:
        raise PartitionError(
            f"{output!r} has {site.channels} channels; parts {list(parts)} must be two of at least {MIN_PART} "
            f"adding up to it",
            [output],
        )
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    node = graph.node[site.position]
    weights = {t.name: t for t in graph.initializer}
    taken = {n for nd in graph.node for n in (*nd.input, *nd.output)} | set(weights)
    taken |= {i.name for i in graph.input} | {o.name for o in graph.output}
    taken |= {nd.name for nd in graph.node if nd.name}
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bias_axis = _bias_axis(node, weights[bias], site.channels) if bias is not None else None
    new_nodes: list[onnx.NodeProto] = []
    new_weights: list[onnx.TensorProto] = []
    start = 0
    for index, count in enumerate(parts):
        stop = start + count
        inputs = [node.input[0], _fresh(f"{node.input[1]}/fission/{index}", taken)]
        new_weights.append(_slice(weights[node.input[1]], _weight_axis(node), start, stop, inputs[1]))
        if bias is not None:
            if bias_axis is None:
                inputs.append(bias)  # broadcast whole: both parts read the original
            else:
                inputs.append(_fresh(f"{bias}/fission/{index}", taken))
                new_weights.append(_slice(weights[bias], bias_axis, start, stop, inputs[-1]))
        part = helper.make_node(
            node.op_type,
            inputs,
            [_fresh(f"{output}/fission/{index}", taken)],
            name=_fresh(f"{node.name or output}/fission/{index}", taken),
        )
        part.attribute.extend(node.attribute)
        new_nodes.append(part)
        start = stop
    concat = helper.make_node(
        "Concat",
        [p.output[0] for p in new_nodes],
        [output],
        name=_fresh(f"{node.name or output}/fission/concat", taken),
        axis=_CONCAT_AXIS[node.op_type],
    )
    nodes = list(graph.node)
    nodes[site.position : site.position + 1] = [*new_nodes, concat]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(new_weights)
    # Drop the whole weight (and bias) unless another node still reads it: ONNX Runtime warns about
    # unused initializers, and each side of a split carries only what it reads anyway.
    still_read = set().union(*(tensors_read(nd) for nd in graph.node))
    kept = [t for t in graph.initializer if t.name in still_read or t.name not in (node.input[1], bias)]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    return result
