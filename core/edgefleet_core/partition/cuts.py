"""Cut points of an ONNX graph, and splitting a model into a head and a tail at one of them.

A cut is a *frontier* of a topological order: the head runs ``nodes[:index]``, the tail
``nodes[index:]``, and the tensors the head produces and the tail reads cross between them (over
the accelerator link, or the network). This module is ours on purpose (``onnx.utils.Extractor``
extracts by tensor names and cannot tell a valid frontier from a leaky one); everything numeric is
ONNX Runtime's.

Rules, chosen so a split is exact and cheap to reason about:

* The order is deterministic: the graph's own node order when it is topological (ONNX requires
  it), else Kahn's algorithm that always takes the earliest-listed ready node.
* ``Constant`` nodes and initializers never cross: they are not part of the order, and each side
  carries its own copy of the ones it reads.
* Cut tensors are only values the head *computes*. Graph inputs the tail reads directly are the
  tail model's own inputs, forwarded by the caller with the original inputs
  (:attr:`CutPoint.forwarded`); they are not cut tensors and do not count towards ``max_tensors``.
* Graph outputs the head computes are head outputs as well, passed through to the caller.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper

from edgefleet_core.errors import EdgeFleetError, ModelError
from edgefleet_core.optimize.runtime import CPU_EP, run, session

__all__ = [
    "CutPoint",
    "CutTensor",
    "PartitionError",
    "SplitModel",
    "cut_after",
    "enumerate_cuts",
    "run_split",
    "split_model",
    "tensors_read",
    "verify_split",
]

# ONNX Runtime fuses across what becomes the cut in the whole model (Conv+BatchNormalization,
# MatMul+Add → Gemm, …) but cannot in the split, where the fused ops sit in different sessions, so
# optimized whole and split runs can differ in the last bits. Verification compares the graphs as
# written: with fusions off both sides run the very same kernels on the very same values.
VERIFY_OPTIMIZATION = ort.GraphOptimizationLevel.ORT_DISABLE_ALL


class PartitionError(EdgeFleetError):
    """A cut is not valid for a model, or a split does not reproduce the whole model."""

    def __init__(self, message: str, tensors: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.tensors = tuple(tensors)
        """The tensors the problem is about (may be empty)."""


@dataclass(frozen=True)
class CutTensor:
    """One tensor crossing a cut, typed by ONNX shape inference."""

    name: str
    elem_type: int
    """``onnx.TensorProto`` element type (``TensorProto.FLOAT`` …)."""
    shape: tuple[int | str, ...]
    """Dimensions; symbolic ones (the batch ``N``) as their name, unnamed unknown ones as ``"?"``."""
    rank_known: bool = True
    """False when inference could not tell the rank (``shape`` is then empty)."""

    def nbytes(self, batch: int = 1) -> int | None:
        """Bytes of one value of this tensor with ``batch`` items.

        A symbolic leading dimension is the batch; any other unknown dimension (or an unknown rank,
        or a type without a fixed size such as strings) makes the size unknown: None.
        """
        if not self.rank_known:
            return None
        itemsize = _itemsize(self.elem_type)
        if itemsize is None:
            return None
        count = 1
        for position, dim in enumerate(self.shape):
            if isinstance(dim, int):
                count *= dim
            elif position == 0:
                count *= batch
            else:
                return None
        return count * itemsize


@dataclass(frozen=True)
class CutPoint:
    """A frontier of the model's deterministic topological order."""

    index: int
    """Head = ``nodes[:index]``, tail = ``nodes[index:]`` (Constant nodes excluded from the order)."""
    tensors: tuple[CutTensor, ...]
    """Tensors the head computes and the tail reads, sorted by name."""
    head_nodes: int
    tail_nodes: int
    forwarded: tuple[CutTensor, ...] = ()
    """Graph inputs the tail reads directly, sorted by name: the caller passes them to the tail too."""

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the cut tensors, sorted."""
        return tuple(t.name for t in self.tensors)

    def nbytes(self, batch: int = 1) -> int | None:
        """Bytes crossing the cut per call with ``batch`` items (None when a size is unknown)."""
        return _total_bytes(self.tensors, batch)

    def forwarded_nbytes(self, batch: int = 1) -> int | None:
        """Bytes of the graph inputs the tail also needs (0 when it needs none)."""
        return _total_bytes(self.forwarded, batch)


@dataclass(frozen=True)
class SplitModel:
    """Standalone head and tail models; together they compute what the whole model does."""

    head: onnx.ModelProto
    tail: onnx.ModelProto
    cut: CutPoint
    outputs: tuple[str, ...] = field(default=())
    """The whole model's output names, in its order (what :func:`run_split` returns)."""


def _itemsize(elem_type: int) -> int | None:
    if elem_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
        return None
    try:
        return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return None


def _total_bytes(tensors: Iterable[CutTensor], batch: int) -> int | None:
    total = 0
    for tensor in tensors:
        size = tensor.nbytes(batch)
        if size is None:
            return None
        total += size
    return total


# ------------------------------------------------------------------------------------ graph view


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph (If/Loop/Scan body) reads from enclosing scopes."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    defined |= {i.values.name for i in graph.sparse_initializer}
    reads: set[str] = set()
    for node in graph.node:
        reads.update(n for n in node.input if n)
        reads |= _node_subgraph_reads(node)
        defined.update(n for n in node.output if n)
    return reads - defined


def _node_subgraph_reads(node: onnx.NodeProto) -> set[str]:
    reads: set[str] = set()
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            reads |= _subgraph_reads(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for graph in attr.graphs:
                reads |= _subgraph_reads(graph)
    return reads


def tensors_read(node: onnx.NodeProto) -> set[str]:
    """Every tensor ``node`` reads: its inputs and what its subgraphs read from enclosing scopes."""
    return {n for n in node.input if n} | _node_subgraph_reads(node)


def _is_constant(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


@dataclass
class _Graph:
    """The dependency structure of a model's top-level graph, in deterministic topological order."""

    model: onnx.ModelProto
    order: list[onnx.NodeProto]
    reads: list[set[str]]
    """Per node in ``order``: every tensor it reads, including from inside its subgraphs."""
    producer: dict[str, int]
    """Tensor → position in ``order`` of the node computing it."""
    consumers: dict[str, list[int]]
    constants: dict[str, onnx.NodeProto]
    initializers: set[str]
    graph_inputs: list[str]
    """Real inputs (not initializers listed as inputs, as IR < 4 models do), in the graph's order."""
    graph_outputs: list[str]
    types: dict[str, onnx.ValueInfoProto]


def _topological_order(nodes: Sequence[onnx.NodeProto], reads: list[set[str]]) -> list[int]:
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    waiting = [0] * len(nodes)
    successors: list[list[int]] = [[] for _ in nodes]
    for i, names in enumerate(reads):
        for before in {producer[n] for n in names if n in producer and producer[n] != i}:
            waiting[i] += 1
            successors[before].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for after in successors[i]:
            waiting[after] -= 1
            if waiting[after] == 0:
                heapq.heappush(ready, after)
    if len(order) != len(nodes):
        stuck = next(nodes[i] for i, count in enumerate(waiting) if count > 0)
        raise PartitionError(f"the graph has a cycle through node {stuck.name or stuck.op_type!r}")
    return order


def _inferred_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError, ValueError):
        inferred = model  # a custom op inference cannot handle: fall back to what the file declares
    types: dict[str, onnx.ValueInfoProto] = {}
    for graph in (model.graph, inferred.graph):
        for info in (*graph.value_info, *graph.input, *graph.output):
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
                types.setdefault(info.name, info)
    return types


def _sorted_copy(
    model: onnx.ModelProto, constants: Mapping[str, onnx.NodeProto], order: Sequence[onnx.NodeProto]
) -> onnx.ModelProto:
    # Shape inference walks the nodes as listed, so it needs them in a topological order.
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.ClearField("node")
    copy.graph.node.extend([*constants.values(), *order])
    return copy


def _analyse(model: onnx.ModelProto) -> _Graph:
    graph = model.graph
    if any(external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model)):
        raise PartitionError("the model's external data is not loaded; load it (load_model does) before splitting")
    constants = {n.output[0]: n for n in graph.node if _is_constant(n) and n.output}
    computed = [n for n in graph.node if not _is_constant(n)]
    all_reads = [tensors_read(node) for node in computed]
    positions = _topological_order(computed, all_reads)
    order = [computed[i] for i in positions]
    reads = [all_reads[i] for i in positions]
    producer = {name: i for i, node in enumerate(order) for name in node.output if name}
    consumers: dict[str, list[int]] = {}
    for i, names in enumerate(reads):
        for name in names:
            consumers.setdefault(name, []).append(i)
    initializers = {i.name for i in graph.initializer} | {i.values.name for i in graph.sparse_initializer}
    return _Graph(
        model=model,
        order=order,
        reads=reads,
        producer=producer,
        consumers=consumers,
        constants=constants,
        initializers=initializers,
        graph_inputs=[i.name for i in graph.input if i.name not in initializers],
        graph_outputs=[o.name for o in graph.output],
        types=_inferred_types(model if positions == sorted(positions) else _sorted_copy(model, constants, order)),
    )


def _cut_tensor(view: _Graph, name: str) -> CutTensor | None:
    info = view.types.get(name)
    if info is None:
        return None
    tensor_type = info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return CutTensor(name=name, elem_type=tensor_type.elem_type, shape=(), rank_known=False)
    dims: list[int | str] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or "?")
    return CutTensor(name=name, elem_type=tensor_type.elem_type, shape=tuple(dims))


# ---------------------------------------------------------------------------------- enumeration


def _last_use(view: _Graph) -> dict[str, int]:
    return {name: max(users) for name, users in view.consumers.items()}


def _output_positions(view: _Graph) -> list[int]:
    return [view.producer[name] for name in view.graph_outputs if name in view.producer]


def enumerate_cuts(model: onnx.ModelProto, *, max_tensors: int = 4) -> list[CutPoint]:
    """Every frontier of the model's topological order with 1..``max_tensors`` cut tensors.

    The trivial cuts (empty head or tail) are left out, and so are frontiers after which the tail
    would compute no graph output (it would only run dead nodes).
    """
    if max_tensors < 1:
        raise PartitionError(f"max_tensors must be at least 1, not {max_tensors}")
    view = _analyse(model)
    count = len(view.order)
    last_use = _last_use(view)
    last_output = max(_output_positions(view), default=-1)
    # Tensor t crosses the frontier at k when it is computed before k and still read at k or later.
    starts: dict[int, list[str]] = {}
    for name, position in view.producer.items():
        if last_use.get(name, -1) > position:
            starts.setdefault(position + 1, []).append(name)
    live: set[str] = set()
    cuts: list[CutPoint] = []
    for k in range(1, min(count, last_output + 1)):
        live.update(starts.get(k, ()))
        live = {name for name in live if last_use[name] >= k}
        if not 1 <= len(live) <= max_tensors:
            continue
        tensors = [_cut_tensor(view, name) for name in sorted(live)]
        if any(t is None for t in tensors):
            continue  # a crossing tensor shape inference cannot type cannot be a model input
        forwarded = _forwarded(view, k)
        cuts.append(
            CutPoint(
                index=k,
                tensors=tuple(t for t in tensors if t is not None),
                head_nodes=k,
                tail_nodes=count - k,
                forwarded=tuple(t for t in forwarded if t is not None),
            )
        )
    return cuts


def cut_after(model: onnx.ModelProto, tensor: str) -> CutPoint:
    """The frontier right after the node computing ``tensor`` in the model's order, however many
    tensors cross it (:func:`enumerate_cuts` keeps to ``max_tensors``; a planner placing a cut at a
    given operator needs that one frontier)."""
    view = _analyse(model)
    position = view.producer.get(tensor)
    if position is None:
        raise PartitionError(f"no node of the model computes {tensor!r}", [tensor])
    k = position + 1
    count = len(view.order)
    if k >= count:
        raise PartitionError(f"{tensor!r} is computed by the last node: a cut after it leaves no tail", [tensor])
    live = sorted(n for n, p in view.producer.items() if p < k and any(u >= k for u in view.consumers.get(n, ())))
    tensors = [_cut_tensor(view, name) for name in live]
    untyped = [name for name, t in zip(live, tensors, strict=True) if t is None]
    if untyped:
        raise PartitionError(f"tensor {untyped[0]!r} has no type shape inference can tell; it cannot cross", untyped)
    return CutPoint(
        index=k,
        tensors=tuple(t for t in tensors if t is not None),
        head_nodes=k,
        tail_nodes=count - k,
        forwarded=tuple(t for t in _forwarded(view, k) if t is not None),
    )


def _forwarded(view: _Graph, k: int) -> list[CutTensor | None]:
    names = sorted(n for n in view.graph_inputs if any(i >= k for i in view.consumers.get(n, ())))
    return [_cut_tensor(view, n) for n in names]


# ---------------------------------------------------------------------------------- manual cuts


def _ancestors(view: _Graph, seeds: Iterable[int], into: set[int]) -> None:
    stack = [s for s in seeds if s not in into]
    into.update(stack)
    while stack:
        for name in view.reads[stack.pop()]:
            before = view.producer.get(name)
            if before is not None and before not in into:
                into.add(before)
                stack.append(before)


def _check_names(view: _Graph, names: Sequence[str]) -> list[str]:
    if not names:
        raise PartitionError("a cut needs at least one tensor")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise PartitionError(f"tensor {name!r} is listed twice in the cut", [name])
        seen.add(name)
        if name in view.producer:
            continue
        if name in view.graph_inputs:
            why = "is a graph input; the tail takes graph inputs directly, they are never cut tensors"
        elif name in view.initializers or name in view.constants:
            why = "is a constant; constants never cross a cut, each side carries its own copy"
        else:
            why = "is not a tensor of this model"
        raise PartitionError(f"tensor {name!r} {why}", [name])
    return sorted(seen)


def _head_for(view: _Graph, names: Sequence[str]) -> set[int]:
    """The smallest head whose cut tensors are exactly ``names``; PartitionError naming a culprit if none."""
    wanted = set(_check_names(view, names))
    head: set[int] = set()
    _ancestors(view, (view.producer[n] for n in wanted), head)
    # Anything else the head computes must stay inside it, so its readers join the head too.
    leaks = sorted(
        name
        for i in head
        for name in view.order[i].output
        if name and name not in wanted and any(u not in head for u in view.consumers.get(name, ()))
    )
    changed = True
    while changed:
        changed = False
        for i in sorted(head):
            for name in view.order[i].output:
                if not name or name in wanted:
                    continue
                outside = [u for u in view.consumers.get(name, ()) if u not in head]
                if outside:
                    _ancestors(view, outside, head)
                    changed = True
    tail = set(range(len(view.order))) - head
    crossing = {n for n in wanted if any(u in tail for u in view.consumers.get(n, ()))}
    missing = sorted(wanted - crossing)
    if missing:
        hint = f"; {', '.join(map(repr, leaks))} also cross(es) there" if leaks else ""
        raise PartitionError(
            f"tensor {missing[0]!r} is not on a frontier: nothing after the cut reads it{hint}", [*missing, *leaks]
        )
    if not any(view.producer.get(o, -1) in tail for o in view.graph_outputs):
        raise PartitionError(f"cut {sorted(wanted)} leaves the tail no graph output to compute", sorted(wanted))
    return head


def _manual_cut(view: _Graph, names: Sequence[str]) -> tuple[CutPoint, list[int], list[int]]:
    head = _head_for(view, names)
    head_order = sorted(head)
    tail_order = [i for i in range(len(view.order)) if i not in head]
    tensors = [_cut_tensor(view, n) for n in sorted(set(names))]
    for name, tensor in zip(sorted(set(names)), tensors, strict=True):
        if tensor is None:
            raise PartitionError(f"tensor {name!r} has no type shape inference can tell; it cannot cross", [name])
    # Head-first reordering is itself a topological order, so ``index`` keeps its meaning there.
    forwarded = sorted(n for n in view.graph_inputs if any(u not in head for u in view.consumers.get(n, ())))
    cut = CutPoint(
        index=len(head_order),
        tensors=tuple(t for t in tensors if t is not None),
        head_nodes=len(head_order),
        tail_nodes=len(tail_order),
        forwarded=tuple(t for t in (_cut_tensor(view, n) for n in forwarded) if t is not None),
    )
    return cut, head_order, tail_order


def _resolve(view: _Graph, cut: CutPoint | Sequence[str]) -> tuple[CutPoint, list[int], list[int]]:
    if not isinstance(cut, CutPoint):
        if isinstance(cut, str):
            cut = [cut]
        return _manual_cut(view, list(cut))
    count = len(view.order)
    if 0 < cut.index < count:
        head = set(range(cut.index))
        live = sorted(
            n for n, p in view.producer.items() if p in head and any(u >= cut.index for u in view.consumers.get(n, ()))
        )
        if tuple(live) == cut.names:
            return cut, list(range(cut.index)), list(range(cut.index, count))
    # A cut from a manual list (or another model): its tensors decide, and must agree.
    resolved = _manual_cut(view, list(cut.names))
    if resolved[0].head_nodes != cut.head_nodes:
        raise PartitionError(f"cut at {cut.index} ({list(cut.names)}) is not a cut of this model", cut.names)
    return resolved


# ------------------------------------------------------------------------------------- splitting


def _strict_check_works(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError):
        return False
    return True


def _model_shell(original: onnx.ModelProto) -> onnx.ModelProto:
    """A model with everything of ``original`` but its graph: opsets, IR version, functions, metadata."""
    model = onnx.ModelProto()
    for descriptor, value in original.ListFields():
        if descriptor.name in ("graph", "training_info"):
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(model, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(model, descriptor.name).CopyFrom(value)
        else:
            setattr(model, descriptor.name, value)
    return model


def _value_info(view: _Graph, name: str) -> onnx.ValueInfoProto:
    info = onnx.ValueInfoProto()
    info.CopyFrom(view.types[name])
    return info


def _side(
    view: _Graph,
    positions: Sequence[int],
    inputs: Sequence[str],
    outputs: Sequence[str],
    suffix: str,
) -> onnx.ModelProto:
    original = view.model
    nodes = [view.order[i] for i in positions]
    reads: set[str] = set().union(*(view.reads[i] for i in positions))
    produced = {n for node in nodes for n in node.output if n}
    model = _model_shell(original)
    graph = model.graph
    graph.name = f"{original.graph.name}_{suffix}"
    graph.doc_string = original.graph.doc_string
    needed = reads | set(outputs)
    graph.node.extend(view.constants[n] for n in sorted(needed - produced) if n in view.constants)
    graph.node.extend(nodes)
    graph.initializer.extend(i for i in original.graph.initializer if i.name in needed)
    graph.sparse_initializer.extend(i for i in original.graph.sparse_initializer if i.values.name in needed)
    declared = [
        i
        for i in original.graph.input
        if i.name in needed and (i.name in view.initializers or i.name in view.graph_inputs)
    ]
    graph.input.extend(declared)
    graph.input.extend(_value_info(view, n) for n in inputs)
    graph.output.extend(_value_info(view, n) for n in outputs)
    boundary = set(inputs) | set(outputs)
    graph.value_info.extend(v for v in original.graph.value_info if v.name in produced and v.name not in boundary)
    return model


def _check(model: onnx.ModelProto, full: bool, what: str) -> None:
    try:
        onnx.checker.check_model(model, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PartitionError(f"the {what} model is not valid ONNX: {first}") from None


def split_model(model: onnx.ModelProto, cut: CutPoint | Sequence[str]) -> SplitModel:
    """Split ``model`` into standalone head and tail models at ``cut``.

    ``cut`` is a :class:`CutPoint` from :func:`enumerate_cuts` or a list of tensor names (a manual
    cut, e.g. an EdgeModel's ``spec.partition.cut``), which is validated: a name that is not a
    computed tensor, or a set that is not a frontier, raises :class:`PartitionError` naming it.
    Head outputs are the cut tensors, then the graph outputs the head computes; tail inputs are the
    cut tensors, after the graph inputs the tail reads directly.
    """
    view = _analyse(model)
    point, head_positions, tail_positions = _resolve(view, cut)
    cut_names = list(point.names)
    head_set = set(head_positions)
    head_outputs = [*cut_names]
    head_outputs += [o for o in view.graph_outputs if o not in head_outputs and view.producer.get(o, -1) in head_set]
    # A graph output no node computes (an input or constant passed straight through) goes with the head.
    head_outputs += [o for o in view.graph_outputs if o not in head_outputs and o not in view.producer]
    tail_outputs = [o for o in view.graph_outputs if o not in head_outputs]
    missing = [n for n in (*head_outputs, *cut_names) if n not in view.types]
    if missing:
        raise PartitionError(f"tensor {missing[0]!r} has no type shape inference can tell", missing)
    head = _side(view, head_positions, [], head_outputs, "head")
    tail = _side(view, tail_positions, cut_names, tail_outputs, "tail")
    full = _strict_check_works(model)
    _check(head, full, "head")
    _check(tail, full, "tail")
    return SplitModel(head=head, tail=tail, cut=point, outputs=tuple(view.graph_outputs))


# ------------------------------------------------------------------------------------- running


def _feed(model: onnx.ModelProto, values: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    initializers = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    absent = [n for n in names if n not in values]
    if absent:
        raise PartitionError(f"the {what} needs input {absent[0]!r}, which was not given", absent)
    return {n: values[n] for n in names}


def run_split(
    split: SplitModel,
    inputs: Mapping[str, np.ndarray],
    providers: Sequence[str] = (CPU_EP,),
    *,
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> dict[str, np.ndarray]:
    """Run head then tail in ONNX Runtime; the whole model's outputs by name, in its order.

    ``providers[0]`` is the execution provider (CPU as fallback); ``inputs`` are the whole model's
    inputs, the tail gets the ones it reads directly forwarded.
    """
    provider = providers[0] if providers else CPU_EP
    head = session(split.head, provider, optimization=optimization)
    head_names = [o.name for o in split.head.graph.output]
    produced = dict(zip(head_names, run(head, head_names, _feed(split.head, inputs, "head")), strict=True))
    tail = session(split.tail, provider, optimization=optimization)
    tail_names = [o.name for o in split.tail.graph.output]
    tail_feed = _feed(split.tail, {**inputs, **produced}, "tail")
    produced.update(zip(tail_names, run(tail, tail_names, tail_feed), strict=True))
    names = split.outputs or (*[n for n in head_names if n not in split.cut.names], *tail_names)
    return {n: produced[n] for n in names}


def verify_split(model: onnx.ModelProto, split: SplitModel, inputs: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`PartitionError` unless head + tail reproduce ``model``'s outputs bit for bit.

    Bit for bit means same dtype, same shape and the same bytes (so NaNs compare equal to
    themselves), with graph fusions off on both sides (see :data:`VERIFY_OPTIMIZATION`).
    """
    whole = session(model, optimization=VERIFY_OPTIMIZATION)
    names = [o.name for o in model.graph.output]
    expected = dict(zip(names, run(whole, names, _feed(model, inputs, "model")), strict=True))
    try:
        actual = run_split(split, inputs, optimization=VERIFY_OPTIMIZATION)
    except ModelError as exc:
        raise PartitionError(f"the split cannot run: {exc}") from None
    for name in names:
        want, got = expected[name], actual.get(name)
        if got is None:
            raise PartitionError(f"the split does not compute output {name!r}", [name])
        if got.dtype != want.dtype or got.shape != want.shape or got.tobytes() != want.tobytes():
            raise PartitionError(
                f"output {name!r} differs from the whole model's after cut {list(split.cut.names)}", [name]
            )
