"""The sample architectures: each a PyTorch module for training and an emitter of the same network as ONNX.

Every emitter reads only the module's weights and writes the graph the module computes, op for op,
so ONNX Runtime's output equals PyTorch's (checked by the unit tests within 1e-4). Initializers are
named after the module's ``state_dict`` keys (``conv1.weight``, ``layers.0.q.bias``), so a pass's
report can be traced back to a layer.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional

from edgefleet_core.samples.digits import CLASSES, IMAGE_SIDE
from edgefleet_core.samples.graph_builder import OUTPUT, GraphBuilder, weight


def _linear_gemm(g: GraphBuilder, x: str, layer: nn.Linear, name: str, output: str | None = None) -> str:
    # Gemm with transB=1 keeps PyTorch's [out, in] weight layout, as exporters emit it.
    w = g.initializer(f"{name}.weight", weight(layer.weight))
    b = g.initializer(f"{name}.bias", weight(layer.bias))
    return g.node("Gemm", [x, w, b], name, output=output, transB=1)


def _linear_matmul(g: GraphBuilder, x: str, layer: nn.Linear, name: str) -> str:
    # MatMul + Add works on [N, T, features]; the weight is a 2-D [in, out] initializer, which is
    # what dynamic quantization and low-rank factorization look for.
    w = g.initializer(f"{name}.weight", weight(layer.weight).T.copy())
    b = g.initializer(f"{name}.bias", weight(layer.bias))
    product = g.node("MatMul", [x, w], f"{name}.matmul")
    return g.node("Add", [product, b], name)


def _conv(g: GraphBuilder, x: str, conv: nn.Conv2d, name: str) -> str:
    inputs = [x, g.initializer(f"{name}.weight", weight(conv.weight))]
    if conv.bias is not None:
        inputs.append(g.initializer(f"{name}.bias", weight(conv.bias)))
    pad_h, pad_w = conv.padding if isinstance(conv.padding, tuple) else (0, 0)
    return g.node(
        "Conv",
        inputs,
        name,
        kernel_shape=list(conv.kernel_size),
        strides=list(conv.stride),
        pads=[pad_h, pad_w, pad_h, pad_w],
        dilations=list(conv.dilation),
        group=conv.groups,
    )


def _batch_norm(g: GraphBuilder, x: str, bn: nn.BatchNorm2d, name: str) -> str:
    assert bn.running_mean is not None
    assert bn.running_var is not None
    return g.node(
        "BatchNormalization",
        [
            x,
            g.initializer(f"{name}.weight", weight(bn.weight)),
            g.initializer(f"{name}.bias", weight(bn.bias)),
            g.initializer(f"{name}.running_mean", weight(bn.running_mean)),
            g.initializer(f"{name}.running_var", weight(bn.running_var)),
        ],
        name,
        epsilon=bn.eps,
    )


def _layer_norm(g: GraphBuilder, x: str, norm: nn.LayerNorm, name: str) -> str:
    scale = g.initializer(f"{name}.weight", weight(norm.weight))
    bias = g.initializer(f"{name}.bias", weight(norm.bias))
    return g.node("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=norm.eps)


# ------------------------------------------------------------------------------------------ CNN


class PlainCNN(nn.Module):
    """Conv blocks on the 8×8 image, a 2×2 max pool, one more conv, global average pool, classifier.

    A plain chain, no residuals, so a structured pass can remove filters and rewire the next layer.
    With ``batch_norm`` each block before the pool is Conv (no bias) + BatchNormalization + Relu,
    else Conv + Relu.
    """

    def __init__(self, channels: Sequence[int], head_channels: int, *, batch_norm: bool) -> None:
        super().__init__()
        self.batch_norm = batch_norm
        widths = [1, *channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm) for c_in, c_out in itertools.pairwise(widths)
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in channels) if batch_norm else nn.ModuleList()
        self.head = nn.Conv2d(widths[-1], head_channels, 3, padding=1)
        self.fc = nn.Linear(head_channels, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, conv in enumerate(self.convs):
            x = conv(x)
            if self.batch_norm:
                x = self.norms[index](x)
            x = functional.relu(x)
        x = functional.max_pool2d(x, 2)
        x = functional.relu(self.head(x))
        x = x.mean(dim=(2, 3))
        return self.fc(x)  # type: ignore[no-any-return]


def plain_cnn_onnx(module: PlainCNN, graph_name: str, doc: str) -> onnx.ModelProto:
    """The ONNX graph of ``module``: input ``[N, 1, 8, 8]``, output logits ``[N, 10]``."""
    g = GraphBuilder()
    x = "input"
    for index, conv in enumerate(module.convs):
        assert isinstance(conv, nn.Conv2d)
        x = _conv(g, x, conv, f"convs.{index}")
        if module.batch_norm:
            norm = module.norms[index]
            assert isinstance(norm, nn.BatchNorm2d)
            x = _batch_norm(g, x, norm, f"norms.{index}")
        x = g.node("Relu", [x], f"relu.{index}")
    x = g.node("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])
    x = g.node("Relu", [_conv(g, x, module.head, "head")], "head.relu")
    x = g.node("GlobalAveragePool", [x], "gap")
    x = g.node("Flatten", [x], "flatten", axis=1)
    _linear_gemm(g, x, module.fc, "fc", output=OUTPUT)
    return g.model(graph_name, [1, IMAGE_SIDE, IMAGE_SIDE], [CLASSES], doc)


# ------------------------------------------------------------------------------------------ MLP


class MLP(nn.Module):
    """Fully connected layers with Relu between them on the flattened ``[N, 64]`` image."""

    def __init__(self, hidden: Sequence[int]) -> None:
        super().__init__()
        widths = [IMAGE_SIDE * IMAGE_SIDE, *hidden, CLASSES]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = functional.relu(layer(x))
        return self.layers[-1](x)  # type: ignore[no-any-return]


def mlp_onnx(module: MLP, graph_name: str, doc: str) -> onnx.ModelProto:
    """The ONNX graph of ``module``: input ``[N, 64]``, output logits ``[N, 10]``, Gemm + Relu."""
    g = GraphBuilder()
    x = "input"
    last = len(module.layers) - 1
    for index, layer in enumerate(module.layers):
        assert isinstance(layer, nn.Linear)
        if index == last:
            _linear_gemm(g, x, layer, f"layers.{index}", output=OUTPUT)
        else:
            x = g.node("Relu", [_linear_gemm(g, x, layer, f"layers.{index}")], f"layers.{index}.relu")
    return g.model(graph_name, [IMAGE_SIDE * IMAGE_SIDE], [CLASSES], doc)


# ---------------------------------------------------------------------------------- transformer


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer: multi-head self-attention, then a Relu feed-forward.

    Written out (not ``nn.MultiheadAttention``) so the Q/K/V/out projections are separate linear
    layers, each emitted as one MatMul with its own 2-D weight.
    """

    def __init__(self, d_model: int, heads: int, d_ff: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
        self.heads = heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        head_dim = d // self.heads
        q = self.q(x).reshape(n, t, self.heads, head_dim).transpose(1, 2)
        k = self.k(x).reshape(n, t, self.heads, head_dim).permute(0, 2, 3, 1)
        v = self.v(x).reshape(n, t, self.heads, head_dim).transpose(1, 2)
        scores = torch.matmul(q, k) * (1.0 / math.sqrt(head_dim))
        context = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(n, t, d)
        x = self.norm1(x + self.out(context))
        return self.norm2(x + self.ff2(functional.relu(self.ff1(x))))  # type: ignore[no-any-return]


class TinyTransformer(nn.Module):
    """Rows of the image as 8 tokens of 8 features → d_model, learned positions, encoder layers, mean, classifier."""

    def __init__(self, d_model: int = 64, heads: int = 4, d_ff: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(IMAGE_SIDE, d_model)
        self.position = nn.Parameter(torch.zeros(IMAGE_SIDE, d_model))
        nn.init.normal_(self.position, std=0.02)
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, d_ff) for _ in range(layers))
        self.classifier = nn.Linear(d_model, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.position
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x.mean(dim=1))  # type: ignore[no-any-return]


def _attention(g: GraphBuilder, x: str, layer: EncoderLayer, name: str) -> str:
    d_model = layer.q.in_features
    head_dim = d_model // layer.heads
    # 0 copies the input's dimension: the batch (and token count) stay dynamic.
    split = g.ints(f"{name}.split_shape", [0, 0, layer.heads, head_dim])
    merge = g.ints(f"{name}.merge_shape", [0, 0, d_model])
    heads = {}
    for part, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        projected = _linear_matmul(g, x, getattr(layer, part), f"{name}.{part}")
        shaped = g.node("Reshape", [projected, split], f"{name}.{part}.split")
        heads[part] = g.node("Transpose", [shaped], f"{name}.{part}.heads", perm=perm)
    scores = g.node("MatMul", [heads["q"], heads["k"]], f"{name}.scores")
    scale = g.initializer(f"{name}.scale", np.asarray(1.0 / math.sqrt(head_dim), dtype=np.float32))
    scaled = g.node("Mul", [scores, scale], f"{name}.scaled")
    weights = g.node("Softmax", [scaled], f"{name}.softmax", axis=-1)
    context = g.node("MatMul", [weights, heads["v"]], f"{name}.context")
    context = g.node("Transpose", [context], f"{name}.context.tokens", perm=[0, 2, 1, 3])
    context = g.node("Reshape", [context, merge], f"{name}.context.merge")
    return _linear_matmul(g, context, layer.out, f"{name}.out")


def _encoder_layer(g: GraphBuilder, x: str, layer: EncoderLayer, name: str) -> str:
    attended = g.node("Add", [x, _attention(g, x, layer, name)], f"{name}.residual1")
    x = _layer_norm(g, attended, layer.norm1, f"{name}.norm1")
    hidden = g.node("Relu", [_linear_matmul(g, x, layer.ff1, f"{name}.ff1")], f"{name}.ff1.relu")
    fed = g.node("Add", [x, _linear_matmul(g, hidden, layer.ff2, f"{name}.ff2")], f"{name}.residual2")
    return _layer_norm(g, fed, layer.norm2, f"{name}.norm2")


def transformer_onnx(module: TinyTransformer, graph_name: str, doc: str) -> onnx.ModelProto:
    """The ONNX graph of ``module``: input ``[N, 8, 8]`` (rows as tokens), output logits ``[N, 10]``."""
    g = GraphBuilder()
    x = _linear_matmul(g, "input", module.embed, "embed")
    x = g.node("Add", [x, g.initializer("position", weight(module.position))], "embed.position")
    for index, layer in enumerate(module.layers):
        assert isinstance(layer, EncoderLayer)
        x = _encoder_layer(g, x, layer, f"layers.{index}")
    pooled = g.node("ReduceMean", [x], "pool", axes=[1], keepdims=0)
    _linear_gemm(g, pooled, module.classifier, "classifier", output=OUTPUT)
    return g.model(graph_name, [IMAGE_SIDE, IMAGE_SIDE], [CLASSES], doc)


def parameter_count(module: nn.Module) -> int:
    """Trainable parameters of ``module`` (BatchNorm running statistics are not parameters)."""
    return sum(p.numel() for p in module.parameters())
