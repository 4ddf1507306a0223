"""Small helpers for reading and rewriting ONNX graphs, shared by the passes."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

FloatArray = npt.NDArray[np.floating]


def initializer_map(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers by name."""
    return {init.name: init for init in model.graph.initializer}


def get_array(model: onnx.ModelProto, name: str) -> npt.NDArray[np.generic]:
    """The value of an initializer as a NumPy array (a copy)."""
    for init in model.graph.initializer:
        if init.name == name:
            return np.array(numpy_helper.to_array(init))
    raise KeyError(name)


def set_array(model: onnx.ModelProto, name: str, value: npt.NDArray[np.generic]) -> None:
    """Replace (or add) an initializer's value in place, keeping its position."""
    tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
    for index, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[index].CopyFrom(tensor)
            return
    model.graph.initializer.append(tensor)


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Nodes reading each tensor."""
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            if name:
                out[name].append(node)
    return out


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """The node producing each tensor."""
    return {name: node for node in model.graph.node for name in node.output if name}


def attribute(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """An attribute's Python value, or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def parameter_count(model: onnx.ModelProto) -> int:
    """Elements in all initializers."""
    return sum(int(np.prod(init.dims)) for init in model.graph.initializer)


def graph_outputs(model: onnx.ModelProto) -> set[str]:
    """Names of the graph's outputs."""
    return {o.name for o in model.graph.output}
