"""A small helper that writes ONNX graphs node by node from trained PyTorch weights.

Ours on purpose: the sample models are emitted with ``onnx.helper`` rather than the
``torch.onnx`` exporter, whose output depends on the exporter's version and path (TorchScript or
dynamo) and which has been fragile here. Emitting the graph ourselves keeps every sample's node
layout stable and exactly what its architecture says (BatchNormalization left unfused, 2-D
projection weights, plain Conv chains), which is what the optimization passes are tested on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
"""The IR version that goes with opset 17, so older tools read the samples too."""
PRODUCER = "edgefleet-samples"
INPUT = "input"
OUTPUT = "logits"
BATCH = "N"
"""The symbolic batch dimension of the input and output."""


def weight(tensor: torch.Tensor) -> npt.NDArray[np.float32]:
    """A parameter or buffer as a float32 array, detached from autograd."""
    return np.ascontiguousarray(tensor.detach().cpu().numpy().astype(np.float32))


class GraphBuilder:
    """Collects nodes and initializers under unique names, then makes a checked model."""

    def __init__(self) -> None:
        self._nodes: list[onnx.NodeProto] = []
        self._initializers: list[onnx.TensorProto] = []
        self._names: set[str] = {INPUT}

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"name used twice in the graph: {name!r}")
        self._names.add(name)
        return name

    def initializer(self, name: str, value: npt.NDArray[np.generic]) -> str:
        """Add a constant tensor; returns its name."""
        self._initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), self._claim(name)))
        return name

    def ints(self, name: str, values: Sequence[int]) -> str:
        """Add an int64 vector constant (a shape for Reshape); returns its name."""
        return self.initializer(name, np.asarray(values, dtype=np.int64))

    def node(self, op_type: str, inputs: Sequence[str], name: str, output: str | None = None, **attrs: Any) -> str:
        """Add a node with one output (named after the node unless given); returns the output's name."""
        out = self._claim(output if output is not None else name)
        self._nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def model(
        self,
        graph_name: str,
        input_dims: Sequence[int],
        output_dims: Sequence[int],
        doc: str,
    ) -> onnx.ModelProto:
        """The finished model: input ``input`` ``[N, *input_dims]``, output ``logits`` ``[N, *output_dims]``."""
        graph = helper.make_graph(
            self._nodes,
            graph_name,
            [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [BATCH, *input_dims])],
            [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [BATCH, *output_dims])],
            initializer=self._initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER,
            doc_string=doc,
        )
        onnx.checker.check_model(model, full_check=True)
        return model
