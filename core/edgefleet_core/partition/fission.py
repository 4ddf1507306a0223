"""Operator fission: one heavy Conv, Gemm or MatMul computed as two parts, so a cut can fall inside it.

When one operator dominates a model (the widest Conv of a small CNN, the hidden Gemm of an MLP),
no frontier of the graph balances two pipeline stages: whatever side that operator lands on is the
bottleneck. Splitting it along its output channels (as CoEdge and DeepThings split layers across
devices) lets the head compute the first ``k`` channels and the tail the rest from the same input,
and a ``Concat`` restores the original tensor under its original name::

    Y = Conv(X, W, B)   →   Y/0 = Conv(X, W[:k], B[:k])       (head)
                            Y/1 = Conv(X, W[k:], B[k:])       (tail)
                            Y   = Concat(Y/0, Y/1, axis=1)    (tail)

The cut between the two parts carries ``X`` and ``Y/0``. Operators after the split one that work
channel by channel (BatchNormalization, Relu and other activations, Add or Mul of a per-channel
constant, pooling) are split with it, so each part stays ``Conv → BatchNormalization → Relu``, which
ONNX Runtime fuses into one kernel as it does in the whole model; the Concat then joins the last of
them. A pooling operator in the chain also shrinks what the head hands the tail (a 2x2 MaxPool: a
quarter of the bytes) and the Concat's copy.
Each output channel is the same dot
products over the same inputs, so the result is the whole operator's, bit for bit, as long as each
part stays on the kernels' general path: ONNX Runtime computes a lone output channel through a
different routine, so every part keeps at least :data:`MIN_PART` channels. The planner still verifies
every fissioned candidate against the whole model before it offers it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgefleet_core.partition.cuts import PartitionError, tensors_read

__all__ = [
    "MIN_PART",
    "FissionSite",
    "Fissioned",
    "OperatorKind",
    "apply_fission",
    "balanced_split",
    "fission",
    "fission_sites",
    "rebalanced_split",
]

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
    return _aligned(fraction * channels, channels, min_part)


def _aligned(first: float, channels: int, min_part: int) -> int:
    """``first`` rounded to the widest of 16/8/4 dividing ``channels``, within ``[min_part, channels - min_part]``."""
    align = next((a for a in (16, 8, 4) if channels % a == 0 and channels // a >= 4), 1)
    return min(max(round(first / align) * align, min_part), channels - min_part)


def rebalanced_split(
    channels: int, head_part: int, head_ms: float, tail_ms: float, operator_ms: float, *, min_part: int = MIN_PART
) -> int:
    """The head's channels after measuring a split at ``head_part``: move channels to the faster stage.

    The first split comes from costs measured without it; the split itself changes them a little
    (two smaller kernels, the Concat, fusions). Each channel costs about ``operator_ms / channels``,
    so half the measured difference, in channels, moves from the slower stage to the faster one.
    """
    if operator_ms <= 0:
        return head_part
    per_channel = operator_ms / channels
    return _aligned(head_part - (head_ms - tail_ms) / (2.0 * per_channel), channels, min_part)


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


@dataclass(frozen=True)
class Fissioned:
    """A model with one operator split in two parts, and where the parts meet."""

    model: onnx.ModelProto
    parts: tuple[str, str]
    """The tensors the two parts end in (the head's part first): the Concat's inputs."""
    joined: str
    """The tensor the Concat writes: the split operator's output, or that of the last operator split with it."""
    absorbed: tuple[str, ...]
    """Op types of the per-channel operators split along with it, in order."""


def _scalar(tensor: onnx.TensorProto) -> bool:
    return int(np.prod(tensor.dims, dtype=np.int64)) == 1


def _constant_axis(tensor: onnx.TensorProto, rank: int, axis: int, channels: int) -> int | None:
    """How a constant operand broadcasts against ``[.., channels at axis, ..]`` of rank ``rank``.

    The constant's axis to slice, ``None`` when it is one value for every channel, or
    :data:`_UNSLICEABLE`.
    """
    if _scalar(tensor):
        return None
    dims = list(tensor.dims)
    if len(dims) > rank:
        return _UNSLICEABLE
    aligned = [1] * (rank - len(dims)) + dims  # numpy broadcasting aligns trailing dimensions
    channel_axis = axis % rank
    if aligned[channel_axis] != channels or any(d != 1 for i, d in enumerate(aligned) if i != channel_axis):
        return _UNSLICEABLE
    return channel_axis - (rank - len(dims))


_Weights = dict[str, onnx.TensorProto]
_Shape = tuple[int, int, int]  # rank, channel axis, channels of the split tensor


@dataclass(frozen=True)
class _Link:
    """A node of the chain that is split: which input carries the channels, and how its others slice."""

    node: onnx.NodeProto
    carries: int
    """The input that reads the previous link's output (the split tensor)."""
    slices: dict[int, int | None]
    """Its other inputs → the axis to slice them along, or ``None`` (one value for all channels: shared)."""


def _link_unary(node: onnx.NodeProto, tensor: str, weights: _Weights, shape: _Shape) -> _Link | None:
    return _Link(node, 0, {}) if list(node.input) == [tensor] else None


def _link_prelu(node: onnx.NodeProto, tensor: str, weights: _Weights, shape: _Shape) -> _Link | None:
    if len(node.input) != 2 or node.input[0] != tensor or node.input[1] not in weights:
        return None
    found = _constant_axis(weights[node.input[1]], *shape)
    return None if found == _UNSLICEABLE else _Link(node, 0, {1: found})


def _link_clip(node: onnx.NodeProto, tensor: str, weights: _Weights, shape: _Shape) -> _Link | None:
    bounds = {i: n for i, n in enumerate(node.input) if i > 0 and n}
    if (
        not node.input
        or node.input[0] != tensor
        or not all(n in weights and _scalar(weights[n]) for n in bounds.values())
    ):
        return None
    return _Link(node, 0, dict.fromkeys(bounds))


def _link_batch_norm(node: onnx.NodeProto, tensor: str, weights: _Weights, shape: _Shape) -> _Link | None:
    rank, axis, channels = shape
    if axis % rank != 1 or len(node.input) != 5 or node.input[0] != tensor or _attribute(node, "training_mode", 0):
        return None
    if not all(p in weights and list(weights[p].dims) == [channels] for p in node.input[1:]):
        return None
    return _Link(node, 0, dict.fromkeys(range(1, 5), 0))


def _link_binary(node: onnx.NodeProto, tensor: str, weights: _Weights, shape: _Shape) -> _Link | None:
    if len(node.input) != 2 or tensor not in node.input or node.input[0] == node.input[1]:
        return None
    carries = list(node.input).index(tensor)
    other = node.input[1 - carries]
    if other not in weights:
        return None  # a run-time operand (a residual branch) would need its channels split too
    found = _constant_axis(weights[other], *shape)
    return None if found == _UNSLICEABLE else _Link(node, carries, {1 - carries: found})


def _link_pool(node: onnx.NodeProto, tensor: str, weights: _Weights, shape: _Shape) -> _Link | None:
    """A pooling operator reduces each channel of an ``[N, C, spatial...]`` tensor on its own."""
    rank, axis, _ = shape
    if rank < 3 or axis % rank != 1 or list(node.input) != [tensor]:
        return None
    return _Link(node, 0, {})


# Operators that map each channel on its own: a part of the channels in, the same part out, so they
# can run on each part before the Concat (and fuse there with the split operator, as in the whole).
_LINKS: Final[dict[str, Callable[[onnx.NodeProto, str, _Weights, _Shape], _Link | None]]] = {
    **dict.fromkeys(
        (
            "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
            "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Abs", "Neg", "Exp", "Erf", "Sqrt",
        ),
        _link_unary,
    ),
    "PRelu": _link_prelu,
    "Clip": _link_clip,
    "BatchNormalization": _link_batch_norm,
    **dict.fromkeys(
        ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"), _link_pool
    ),
    **dict.fromkeys(("Add", "Sub", "Mul", "Div"), _link_binary),
}  # fmt: skip


def _output_rank(node: onnx.NodeProto, weights: dict[str, onnx.TensorProto], model: onnx.ModelProto) -> int | None:
    """Rank of the split operator's output, when the graph tells it."""
    if node.op_type == "Conv":
        return len(weights[node.input[1]].dims)  # [N, M, spatial...] like the weight [M, C, spatial...]
    if node.op_type == "Gemm":
        return 2
    graph = model.graph
    known = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
    if node.output[0] not in known:
        try:  # MatMul broadcasts, so its rank is its input's: let ONNX work it out
            graph = onnx.shape_inference.infer_shapes(model).graph
        except (onnx.shape_inference.InferenceError, ValueError):
            return None
        known = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
    value = known.get(node.output[0])
    if value is None or not value.type.tensor_type.HasField("shape"):
        return None
    return len(value.type.tensor_type.shape.dim)


def _absorbable(model: onnx.ModelProto, site: FissionSite, weights: _Weights) -> list[_Link]:
    """The chain of per-channel operators right after ``site`` that can be split with it.

    Each link is the only reader of the tensor before it (which is no graph output), so splitting
    it changes nothing any other node sees.
    """
    graph = model.graph
    rank = _output_rank(graph.node[site.position], weights, model)
    if rank is None:
        return []
    shape = (rank, _CONCAT_AXIS[site.op_type], site.channels)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in tensors_read(node):
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    overridable = {i.name for i in graph.input}
    constants = {name: t for name, t in weights.items() if name not in overridable}
    chain: list[_Link] = []
    tensor = site.output
    while tensor not in outputs and len(readers.get(tensor, [])) == 1:
        (node,) = readers[tensor]
        make = _LINKS.get(node.op_type) if node.domain in ("", "ai.onnx") and len(node.output) == 1 else None
        link = None if make is None else make(node, tensor, constants, shape)
        if link is None:
            break
        chain.append(link)
        tensor = node.output[0]
    return chain


def _names_taken(graph: onnx.GraphProto) -> set[str]:
    taken = {n for nd in graph.node for n in (*nd.input, *nd.output)} | {t.name for t in graph.initializer}
    taken |= {i.name for i in graph.input} | {o.name for o in graph.output}
    return taken | {nd.name for nd in graph.node if nd.name}


def _part(
    links: Sequence[_Link],
    source: str,
    index: int,
    channels: tuple[int, int],
    weights: _Weights,
    taken: set[str],
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Part ``index`` of the chain: channels ``[start, stop)`` of every link, from ``source`` on."""
    start, stop = channels
    nodes: list[onnx.NodeProto] = []
    sliced: list[onnx.TensorProto] = []
    current = source
    for link in links:
        inputs = list(link.node.input)
        inputs[link.carries] = current
        for position, axis in link.slices.items():
            if axis is None:
                continue  # one value for every channel: both parts read the original
            name = _fresh(f"{inputs[position]}/fission/{index}", taken)
            sliced.append(_slice(weights[inputs[position]], axis, start, stop, name))
            inputs[position] = name
        node = helper.make_node(
            link.node.op_type,
            inputs,
            [_fresh(f"{link.node.output[0]}/fission/{index}", taken)],
            name=_fresh(f"{link.node.name or link.node.output[0]}/fission/{index}", taken),
        )
        node.attribute.extend(link.node.attribute)
        nodes.append(node)
        current = node.output[0]
    return nodes, sliced


def fission(model: onnx.ModelProto, output: str, parts: Sequence[int]) -> Fissioned:
    """A copy of ``model`` where the operator computing ``output`` is two operators and a Concat.

    ``parts`` are the channel counts of the head's part and the tail's part (they must add up to the
    operator's channels, each at least :data:`MIN_PART`). The per-channel operators right after it
    are split too (see the module's docs). The parts sit where the operator was in the node list,
    so a cut right after the head's part is a frontier of the graph's order.
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
    # The split operator is the first link: its weight (input 1) and bias (input 2) slice like the others'.
    slices: dict[int, int | None] = {1: _weight_axis(node)}
    if len(node.input) > 2 and node.input[2]:
        slices[2] = _bias_axis(node, weights[node.input[2]], site.channels)
    links = [_Link(node, 0, slices), *_absorbable(result, site, weights)]
    taken = _names_taken(graph)
    new_nodes: list[onnx.NodeProto] = []
    new_weights: list[onnx.TensorProto] = []
    bounds = (0, parts[0], site.channels)
    for index in (0, 1):
        nodes, sliced = _part(links, node.input[0], index, (bounds[index], bounds[index + 1]), weights, taken)
        new_nodes += nodes
        new_weights += sliced
    ends = (new_nodes[len(links) - 1].output[0], new_nodes[-1].output[0])
    joined = links[-1].node.output[0]
    concat = helper.make_node(
        "Concat", list(ends), [joined], name=_fresh(f"{node.name or output}/fission/concat", taken),
        axis=_CONCAT_AXIS[node.op_type],
    )  # fmt: skip
    # The chain's nodes read nothing but the split tensor and constants, so all of them can move to
    # where the operator was; whatever read the chain's end comes later in the order anyway.
    replaced = {id(link.node) for link in links}
    nodes = [n for n in graph.node[: site.position] if id(n) not in replaced]
    nodes += [*new_nodes, concat, *(n for n in graph.node[site.position :] if id(n) not in replaced)]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.initializer.extend(new_weights)
    # Drop the whole weights unless another node still reads them: ONNX Runtime warns about unused
    # initializers, and each side of a split carries only what it reads anyway.
    whole = {link.node.input[p] for link in links for p, axis in link.slices.items() if axis is not None}
    still_read = set().union(*(tensors_read(nd) for nd in graph.node))
    kept = [t for t in graph.initializer if t.name in still_read or t.name not in whole]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    return Fissioned(result, ends, joined, tuple(link.node.op_type for link in links[1:]))


def apply_fission(model: onnx.ModelProto, output: str, parts: Sequence[int]) -> onnx.ModelProto:
    """:func:`fission`'s model."""
    return fission(model, output, parts).model
