"""An ONNX graph as a differentiable ``torch.nn.Module``: the trainer's view of a model.

The pipeline works on ONNX graphs from start to end, and converting a graph to PyTorch code and
exporting it back is fragile (exporters rename, fuse and re-order). So we train the graph itself:
:class:`OnnxModule` runs the nodes one by one with the torch functions of :mod:`.ops`, its float
weights are ``nn.Parameter`` objects, and :func:`write_back` puts the trained values into the very
initializers they came from, leaving the graph untouched.

Which float initializers train: those a layer uses as its weights (Conv, ConvTranspose, Gemm,
MatMul, the affine parts of the normalizations, PRelu slopes), and any other float tensor of more
than one element (biases added by Add, embedding tables). Scalars (epsilons, ``1/sqrt(d)``, GELU's
0.5) and the hyper-parameter inputs of an op (BatchNormalization's running statistics, Pow's
exponent, Clip's bounds, Pad's value) stay constant: they are not weights, and learning them would
change what the graph means rather than fit it better.

BatchNormalization keeps inference semantics — its running mean and variance stay as they are,
only scale and bias train. The graph the pipeline ships normalizes with those statistics, so
training must optimize that very function; batch statistics from small fine-tuning batches would
make the trained function differ from the deployed one, and the statistics of a pruned or
quantized student drifting away from its teacher's is exactly what fine-tuning corrects through
scale and bias.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Protocol

import onnx
from onnx import helper, numpy_helper
from torch import nn

from edgefleet_core.errors import TrainingUnsupported
from edgefleet_core.training.ops import OPS, Args, Node, Tensor, tensor_from_proto

FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})
"""Initializer types that can become parameters."""

WEIGHT_SLOTS: Mapping[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "Einsum": tuple(range(8)),
    "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "PRelu": (1,),
}
"""Inputs that are a layer's weights: always trained, whatever their size."""

CONSTANT_SLOTS: Mapping[str, tuple[int, ...]] = {
    "BatchNormalization": (3, 4),
    "Pow": (1,),
    "Clip": (1, 2),
    "Pad": (2,),
    "Dropout": (1,),
    "Range": (0, 1, 2),
    "ConstantOfShape": (0,),
}
"""Inputs that are hyper-parameters or statistics, never trained."""


class NodeHook(Protocol):
    """Rewrites a node's inputs before it runs and its outputs after (simulated quantization plugs in here)."""

    def inputs(self, node: Node, args: Args) -> Args: ...

    def outputs(self, node: Node, results: list[Tensor]) -> list[Tensor]: ...


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def _trainable(model: onnx.ModelProto, nodes: Sequence[Node]) -> set[str]:
    uses: dict[str, list[tuple[str, int]]] = {}
    for node in nodes:
        for slot, name in enumerate(node.inputs):
            uses.setdefault(name, []).append((node.op_type, slot))
    names = set()
    for init in model.graph.initializer:
        if init.data_type not in FLOAT_TYPES or init.name not in uses:
            continue
        slots = uses[init.name]
        as_weight = any(slot in WEIGHT_SLOTS.get(op, ()) for op, slot in slots)
        as_constant = any(slot in CONSTANT_SLOTS.get(op, ()) for op, slot in slots)
        size = 1
        for dim in init.dims:
            size *= dim
        if as_weight or (size > 1 and not as_constant):
            names.add(init.name)
    return names


def _sorted_nodes(model: onnx.ModelProto, available: set[str]) -> list[onnx.NodeProto]:
    # ONNX requires topological order but not every producer honours it; sorted graphs take one sweep.
    ready = set(available) | {""}
    ordered: list[onnx.NodeProto] = []
    pending = list(model.graph.node)
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            node = waiting[0]
            missing = [name for name in node.input if name not in ready]
            raise TrainingUnsupported(f"node {node.name or node.op_type!r} reads {missing}, which nothing produces")
        pending = waiting
    return ordered


class OnnxModule(nn.Module):
    """Runs an ONNX graph with torch ops; its float weights are trainable parameters.

    ``weights`` holds one parameter per trainable initializer under a sanitized key (torch keys
    cannot contain dots); ``onnx_names`` maps each key back to the initializer's name.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        opset = default_opset(model)
        for proto in graph.node:
            if proto.domain not in ("", "ai.onnx") or proto.op_type not in OPS:
                op = proto.op_type if proto.domain in ("", "ai.onnx") else f"{proto.domain}:{proto.op_type}"
                raise TrainingUnsupported(f"op {op} (node {proto.name!r}) is not supported for training")
        initializers = {init.name for init in graph.initializer}
        self.input_names: list[str] = [v.name for v in graph.input if v.name not in initializers]
        self.output_names: list[str] = [v.name for v in graph.output]
        ordered = _sorted_nodes(model, initializers | set(self.input_names))
        nodes = [Node.parse(proto, opset, index) for index, proto in enumerate(ordered)]
        trainable = _trainable(model, nodes)

        self.weights = nn.ParameterDict()
        self.onnx_names: dict[str, str] = {}
        # Plain tensors, not buffers: they are never saved or moved, the trainer runs on the CPU.
        self._constants: dict[str, Tensor] = {}
        for index, init in enumerate(graph.initializer):
            value = tensor_from_proto(init, f"initializer {init.name!r}")
            if init.name in trainable:
                key = f"w{index}_{re.sub(r'[^0-9A-Za-z_]', '_', init.name)}"
                self.weights[key] = nn.Parameter(value)
                self.onnx_names[key] = init.name
            else:
                self._constants[init.name] = value
        self._parameter_names = set(self.onnx_names.values())
        self._nodes: list[Node] = []
        for node in nodes:
            if node.op_type == "Constant":  # evaluated once, here
                self._constants[node.outputs[0]] = OPS["Constant"](node, [])[0]
            else:
                self._nodes.append(node)
        self.hook: NodeHook | None = None
        """Sees every node's inputs and outputs, e.g. to simulate quantization."""

    @property
    def nodes(self) -> Sequence[Node]:
        """The nodes in execution order (Constant nodes are folded into constants)."""
        return self._nodes

    def is_parameter(self, name: str) -> bool:
        """Whether the tensor called ``name`` in the graph is a trainable parameter."""
        return name in self._parameter_names

    def forward(self, feeds: Mapping[str, Tensor], outputs: Sequence[str] | None = None) -> list[Tensor]:
        """The values of ``outputs`` (the graph's outputs by default) for the given input tensors.

        Any tensor of the graph can be asked for, e.g. the logits before a final Softmax.
        """
        values: dict[str, Tensor] = dict(self._constants)
        for key, parameter in self.weights.items():
            values[self.onnx_names[key]] = parameter
        values.update(feeds)
        for node in self._nodes:
            args: Args = [values[name] if name else None for name in node.inputs]
            if self.hook is not None:
                args = self.hook.inputs(node, args)
            results = OPS[node.op_type](node, args)
            if self.hook is not None:
                results = self.hook.outputs(node, results)
            for name, value in zip(node.outputs, results, strict=False):
                if name:
                    values[name] = value
        wanted = self.output_names if outputs is None else outputs
        missing = [name for name in wanted if name not in values]
        if missing:
            raise TrainingUnsupported(f"the graph does not compute {missing}")
        return [values[name] for name in wanted]


def write_back(module: OnnxModule, model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers hold ``module``'s parameter values.

    Names, dtypes, order and the graph stay as they are; ``model`` itself is not changed.
    """
    trained = {module.onnx_names[key]: p.detach().cpu() for key, p in module.weights.items()}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for index, init in enumerate(out.graph.initializer):
        value = trained.get(init.name)
        if value is None:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        out.graph.initializer[index].CopyFrom(numpy_helper.from_array(value.numpy().astype(dtype), init.name))
    return out
