"""ONNX operators as PyTorch functions, for the training interpreter (:mod:`.onnx_module`).

Each function takes a parsed node and its input tensors (``None`` for an omitted optional input)
and returns the node's outputs, following the ONNX operator specification, opset 9 onwards.
They are inference semantics throughout: Dropout is the identity, BatchNormalization uses the
running statistics — the graph a pass hands on is an inference graph, and training must
optimize the function that graph computes.

This table is ours on purpose: converters from ONNX to PyTorch (onnx2torch and the like) lag
behind the opsets real models use and rebuild the model as a different program, while the
pipeline needs the very initializers of the very graph it hands on, written back by name.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from edgefleet_core.errors import TrainingUnsupported

Tensor = torch.Tensor
Args = list[Tensor | None]

TORCH_DTYPES: Mapping[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.BOOL: torch.bool,
}
"""ONNX element types the interpreter can hold; others (strings, 4-bit, unsigned wide) cannot train."""


@dataclass(frozen=True)
class Node:
    """One ONNX node, parsed once: attributes as Python values, the model's opset alongside."""

    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, object]
    opset: int
    """The model's ai.onnx opset; several operators moved attributes to inputs over the versions."""

    @classmethod
    def parse(cls, proto: onnx.NodeProto, opset: int, index: int) -> Node:
        attrs: dict[str, object] = {}
        for attr in proto.attribute:
            value = onnx.helper.get_attribute_value(attr)
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                value = [v.decode("utf-8", "replace") for v in value]
            attrs[attr.name] = value
        return cls(
            name=proto.name or f"{proto.op_type}_{index}",
            op_type=proto.op_type,
            inputs=tuple(proto.input),
            outputs=tuple(proto.output),
            attrs=attrs,
            opset=opset,
        )

    def unsupported(self, what: str) -> TrainingUnsupported:
        """The error for a feature of this node the interpreter does not implement."""
        return TrainingUnsupported(f"op {self.op_type} (node {self.name!r}): {what} is not supported for training")

    def attr_int(self, key: str, default: int) -> int:
        value = self.attrs.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.unsupported(f"non-integer attribute {key}")
        return value

    def attr_float(self, key: str, default: float) -> float:
        value = self.attrs.get(key, default)
        if not isinstance(value, int | float):
            raise self.unsupported(f"non-float attribute {key}")
        return float(value)

    def attr_str(self, key: str, default: str) -> str:
        value = self.attrs.get(key, default)
        if not isinstance(value, str):
            raise self.unsupported(f"non-string attribute {key}")
        return value

    def attr_ints(self, key: str) -> list[int] | None:
        """The attribute's integers, or ``None`` when it is absent or empty."""
        value = self.attrs.get(key)
        if value is None or value == []:
            return None
        if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
            raise self.unsupported(f"non-integer-list attribute {key}")
        return [int(v) for v in value]

    def attr_floats(self, key: str) -> list[float] | None:
        value = self.attrs.get(key)
        if value is None or value == []:
            return None
        if not isinstance(value, list):
            raise self.unsupported(f"non-float-list attribute {key}")
        return [float(v) for v in value]

    def attr_tensor(self, key: str) -> Tensor | None:
        value = self.attrs.get(key)
        if value is None:
            return None
        if not isinstance(value, onnx.TensorProto):
            raise self.unsupported(f"non-tensor attribute {key}")
        return tensor_from_proto(value, f"attribute {key} of node {self.name!r}")


def tensor_from_proto(proto: onnx.TensorProto, what: str) -> Tensor:
    """A tensor holding a copy of ``proto``'s value (the model is never shared with torch)."""
    dtype = TORCH_DTYPES.get(proto.data_type)
    if dtype is None:
        name = onnx.TensorProto.DataType.Name(proto.data_type)
        raise TrainingUnsupported(f"{what} has element type {name}, which cannot be trained")
    array = numpy_helper.to_array(proto)
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.array(array, dtype=np.float32)).to(torch.bfloat16)
    # A copy: ONNX arrays may be read-only views, which torch only accepts with a warning.
    return torch.from_numpy(np.array(array, copy=True))


def _arg(node: Node, args: Args, index: int) -> Tensor:
    value = args[index] if index < len(args) else None
    if value is None:
        raise TrainingUnsupported(f"op {node.op_type} (node {node.name!r}) misses its input {index}")
    return value


def _opt(args: Args, index: int) -> Tensor | None:
    return args[index] if index < len(args) else None


def _ints(value: Tensor) -> list[int]:
    return [int(v) for v in value.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _ints_input_or_attr(node: Node, args: Args, index: int, key: str) -> list[int] | None:
    """Operators that moved an attribute to an input in later opsets (axes, pads, split ...)."""
    value = _opt(args, index)
    return _ints(value) if value is not None else node.attr_ints(key)


# ---------------------------------------------------------------- elementwise


def _unary(fn: Callable[[Tensor], Tensor]) -> Callable[[Node, Args], list[Tensor]]:
    def op(node: Node, args: Args) -> list[Tensor]:
        return [fn(_arg(node, args, 0))]

    return op


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Node, Args], list[Tensor]]:
    def op(node: Node, args: Args) -> list[Tensor]:
        return [fn(_arg(node, args, 0), _arg(node, args, 1))]

    return op


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Node, Args], list[Tensor]]:
    def op(node: Node, args: Args) -> list[Tensor]:
        return [functools.reduce(fn, [a for a in args if a is not None])]

    return op


def _div(a: Tensor, b: Tensor) -> Tensor:
    # Integer Div truncates in ONNX (shape arithmetic relies on it); torch's `/` would give floats.
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _pow(a: Tensor, b: Tensor) -> Tensor:
    return torch.pow(a, b).to(a.dtype)  # ONNX Pow keeps the base's type


def _leaky_relu(node: Node, args: Args) -> list[Tensor]:
    return [F.leaky_relu(_arg(node, args, 0), node.attr_float("alpha", 0.01))]


def _elu(node: Node, args: Args) -> list[Tensor]:
    return [F.elu(_arg(node, args, 0), node.attr_float("alpha", 1.0))]


def _selu(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)
    alpha = node.attr_float("alpha", 1.67326319217681884765625)
    gamma = node.attr_float("gamma", 1.05070102214813232421875)
    return [gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))]


def _prelu(node: Node, args: Args) -> list[Tensor]:
    x, slope = _arg(node, args, 0), _arg(node, args, 1)
    return [torch.where(x >= 0, x, x * slope)]


def _hard_sigmoid(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)
    return [torch.clamp(node.attr_float("alpha", 0.2) * x + node.attr_float("beta", 0.5), 0.0, 1.0)]


def _gelu(node: Node, args: Args) -> list[Tensor]:
    approximate = node.attr_str("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise node.unsupported(f"approximate={approximate}")
    return [F.gelu(_arg(node, args, 0), approximate=approximate)]


def _clip(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)
    if node.opset < 11:
        return [torch.clamp(x, min=node.attr_float("min", -math.inf), max=node.attr_float("max", math.inf))]
    low, high = _opt(args, 1), _opt(args, 2)
    if low is None and high is None:
        return [x]
    return [torch.clamp(x, min=low, max=high)]


def _where(node: Node, args: Args) -> list[Tensor]:
    return [torch.where(_arg(node, args, 0).bool(), _arg(node, args, 1), _arg(node, args, 2))]


def _cast(node: Node, args: Args) -> list[Tensor]:
    to = node.attr_int("to", onnx.TensorProto.FLOAT)
    dtype = TORCH_DTYPES.get(to)
    if dtype is None:
        raise node.unsupported(f"cast to {onnx.TensorProto.DataType.Name(to)}")
    return [_arg(node, args, 0).to(dtype)]


def _cast_like(node: Node, args: Args) -> list[Tensor]:
    return [_arg(node, args, 0).to(_arg(node, args, 1).dtype)]


def _identity(node: Node, args: Args) -> list[Tensor]:
    return [_arg(node, args, 0)]


def _dropout(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)  # inference semantics: the exported graph's Dropout does nothing
    return [x, torch.ones_like(x, dtype=torch.bool)]


# ---------------------------------------------------------------- linear algebra


def _gemm(node: Node, args: Args) -> list[Tensor]:
    a, b, c = _arg(node, args, 0), _arg(node, args, 1), _opt(args, 2)
    if node.attr_int("transA", 0):
        a = a.t()
    if node.attr_int("transB", 0):
        b = b.t()
    y = a @ b
    alpha, beta = node.attr_float("alpha", 1.0), node.attr_float("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None and beta != 0.0:
        y = y + (c if beta == 1.0 else beta * c)
    return [y]


def _einsum(node: Node, args: Args) -> list[Tensor]:
    return [torch.einsum(node.attr_str("equation", ""), *[a for a in args if a is not None])]


# ---------------------------------------------------------------- convolution and pooling


def _spatial_pads(
    node: Node, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Begin and end padding of every spatial axis, resolving ``auto_pad``."""
    rank = len(kernel)
    auto_pad = node.attr_str("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        pads = node.attr_ints("pads") or [0] * (2 * rank)
        return pads[:rank], pads[rank:]
    if auto_pad == "VALID":
        return [0] * rank, [0] * rank
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise node.unsupported(f"auto_pad={auto_pad}")
    begin, end = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        first = small if auto_pad == "SAME_UPPER" else total - small
        begin.append(first)
        end.append(total - first)
    return begin, end


def _pad_spatial(x: Tensor, begin: Sequence[int], end: Sequence[int], value: float) -> Tensor:
    # F.pad lists (begin, end) pairs from the last axis backwards.
    pairs: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        pairs += [b, e]
    return F.pad(x, pairs, value=value)


_CONV: Mapping[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T: Mapping[int, Callable[..., Tensor]] = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL: Mapping[int, Callable[..., Tensor]] = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL: Mapping[int, Callable[..., Tensor]] = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _spatial_fn(node: Node, table: Mapping[int, Callable[..., Tensor]], rank: int) -> Callable[..., Tensor]:
    fn = table.get(rank)
    if fn is None:
        raise node.unsupported(f"{rank} spatial dimensions")
    return fn


def _conv(node: Node, args: Args) -> list[Tensor]:
    x, w, b = _arg(node, args, 0), _arg(node, args, 1), _opt(args, 2)
    rank = w.dim() - 2
    kernel = list(w.shape[2:])
    strides = node.attr_ints("strides") or [1] * rank
    dilations = node.attr_ints("dilations") or [1] * rank
    begin, end = _spatial_pads(node, list(x.shape[2:]), kernel, strides, dilations)
    padding = begin
    if begin != end:  # torch pads symmetrically only
        x, padding = _pad_spatial(x, begin, end, 0.0), [0] * rank
    fn = _spatial_fn(node, _CONV, rank)
    return [fn(x, w, b, stride=strides, padding=padding, dilation=dilations, groups=node.attr_int("group", 1))]


def _conv_transpose(node: Node, args: Args) -> list[Tensor]:
    x, w, b = _arg(node, args, 0), _arg(node, args, 1), _opt(args, 2)
    rank = w.dim() - 2
    if node.attr_ints("output_shape") is not None:
        raise node.unsupported("output_shape")
    if node.attr_str("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise node.unsupported("auto_pad SAME")
    strides = node.attr_ints("strides") or [1] * rank
    dilations = node.attr_ints("dilations") or [1] * rank
    output_padding = node.attr_ints("output_padding") or [0] * rank
    pads = node.attr_ints("pads") or [0] * (2 * rank)
    fn = _spatial_fn(node, _CONV_T, rank)
    group = node.attr_int("group", 1)
    y = fn(x, w, b, stride=strides, padding=0, output_padding=output_padding, groups=group, dilation=dilations)
    # Unpadded transpose, then crop: covers asymmetric pads, which torch cannot express.
    index = [slice(None), slice(None)] + [slice(pads[i], y.shape[2 + i] - pads[rank + i]) for i in range(rank)]
    return [y[tuple(index)]]


def _pool_geometry(node: Node, x: Tensor) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    kernel = node.attr_ints("kernel_shape")
    if kernel is None:
        raise node.unsupported("a missing kernel_shape")
    rank = len(kernel)
    strides = node.attr_ints("strides") or [1] * rank
    dilations = node.attr_ints("dilations") or [1] * rank
    begin, end = _spatial_pads(node, list(x.shape[2:]), kernel, strides, dilations)
    return kernel, strides, dilations, begin, end


def _torch_can_pad(kernel: Sequence[int], begin: Sequence[int], end: Sequence[int]) -> bool:
    # torch pools pad symmetrically and at most half a kernel; anything else is padded by hand.
    return list(begin) == list(end) and all(p <= k // 2 for p, k in zip(begin, kernel, strict=True))


def _crop_to_onnx(y: Tensor, sizes: Sequence[int], begin: Sequence[int], strides: Sequence[int]) -> Tensor:
    """Drop a ceil-mode window that would start in the end padding (torch only knows its own padding)."""
    index: list[slice] = [slice(None), slice(None)]
    for axis, (size, b, s) in enumerate(zip(sizes, begin, strides, strict=True)):
        count = y.shape[2 + axis]
        if (count - 1) * s >= size + b:
            count -= 1
        index.append(slice(0, count))
    return y[tuple(index)]


def _max_pool(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)
    if len(node.outputs) > 1 and node.outputs[1]:
        raise node.unsupported("the Indices output")
    kernel, strides, dilations, begin, end = _pool_geometry(node, x)
    ceil_mode = bool(node.attr_int("ceil_mode", 0))
    fn = _spatial_fn(node, _MAX_POOL, len(kernel))
    if _torch_can_pad(kernel, begin, end):
        return [fn(x, kernel, strides, begin, dilations, ceil_mode=ceil_mode)]
    y = fn(_pad_spatial(x, begin, end, -math.inf), kernel, strides, 0, dilations, ceil_mode=ceil_mode)
    return [_crop_to_onnx(y, x.shape[2:], begin, strides) if ceil_mode else y]


def _average_pool(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)
    kernel, strides, dilations, begin, end = _pool_geometry(node, x)
    if any(d != 1 for d in dilations):
        raise node.unsupported("dilations")
    ceil_mode = bool(node.attr_int("ceil_mode", 0))
    include_pad = bool(node.attr_int("count_include_pad", 0))
    fn = _spatial_fn(node, _AVG_POOL, len(kernel))
    if _torch_can_pad(kernel, begin, end):
        return [fn(x, kernel, strides, begin, ceil_mode, include_pad)]
    # Padded by hand: the sum over each window divided by the count of the positions that count.
    zeros = [0] * len(kernel)
    total = fn(_pad_spatial(x, begin, end, 0.0), kernel, strides, zeros, ceil_mode, True)
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    count = fn(_pad_spatial(ones, begin, end, 1.0 if include_pad else 0.0), kernel, strides, zeros, ceil_mode, True)
    y = total / count
    return [_crop_to_onnx(y, x.shape[2:], begin, strides) if ceil_mode else y]


def _global_average_pool(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)
    return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]


def _global_max_pool(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)
    return [x.amax(dim=tuple(range(2, x.dim())), keepdim=True)]


# ---------------------------------------------------------------- normalization and softmax


def _batch_norm(node: Node, args: Args) -> list[Tensor]:
    if node.attr_int("training_mode", 0):
        raise node.unsupported("training_mode=1")
    x, scale, bias, mean, var = (_arg(node, args, i) for i in range(5))
    eps = node.attr_float("epsilon", 1e-5)
    return [F.batch_norm(x, mean, var, weight=scale, bias=bias, training=False, eps=eps)]


def _instance_norm(node: Node, args: Args) -> list[Tensor]:
    x, scale, bias = _arg(node, args, 0), _arg(node, args, 1), _arg(node, args, 2)
    return [F.instance_norm(x, weight=scale, bias=bias, eps=node.attr_float("epsilon", 1e-5))]


def _layer_norm(node: Node, args: Args) -> list[Tensor]:
    x, scale, bias = _arg(node, args, 0), _arg(node, args, 1), _opt(args, 2)
    axis = _axis(node.attr_int("axis", -1), x.dim())
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    centered = x - mean
    inv_std = torch.rsqrt((centered * centered).mean(dim=dims, keepdim=True) + node.attr_float("epsilon", 1e-5))
    y = centered * inv_std * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv_std]


def _softmax(fn: Callable[[Tensor, int], Tensor]) -> Callable[[Node, Args], list[Tensor]]:
    def op(node: Node, args: Args) -> list[Tensor]:
        x = _arg(node, args, 0)
        if node.opset >= 13:
            return [fn(x, node.attr_int("axis", -1))]
        # Before opset 13 the input is coerced to 2-D at `axis` and normalized over the second part.
        axis = _axis(node.attr_int("axis", 1), x.dim())
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return [fn(flat, 1).reshape(x.shape)]

    return op


# ---------------------------------------------------------------- shapes and indexing


def _flatten(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)
    axis = _axis(node.attr_int("axis", 1), x.dim())
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


def _reshape(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)
    shape = _ints_input_or_attr(node, args, 1, "shape")
    if shape is None:
        raise node.unsupported("a missing shape")
    if not node.attr_int("allowzero", 0):  # 0 copies the input's dimension
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _transpose(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)
    return [x.permute(node.attr_ints("perm") or list(reversed(range(x.dim()))))]


def _concat(node: Node, args: Args) -> list[Tensor]:
    return [torch.cat([a for a in args if a is not None], dim=node.attr_int("axis", 0))]


def _split(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)
    axis = node.attr_int("axis", 0)
    sizes = _ints_input_or_attr(node, args, 1, "split")
    if sizes is None:  # equal parts, the last one smaller when it does not divide (opset 18)
        parts = node.attr_int("num_outputs", len(node.outputs))
        return list(torch.split(x, math.ceil(x.shape[axis] / parts), dim=axis))
    return list(torch.split(x, sizes, dim=axis))


def _slice(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)
    if node.opset < 10:
        starts, ends, axes, steps = node.attr_ints("starts"), node.attr_ints("ends"), node.attr_ints("axes"), None
    else:
        starts, ends = _ints(_arg(node, args, 1)), _ints(_arg(node, args, 2))
        axes_t, steps_t = _opt(args, 3), _opt(args, 4)
        axes = None if axes_t is None else _ints(axes_t)
        steps = None if steps_t is None else _ints(steps_t)
    if starts is None or ends is None:
        raise node.unsupported("missing starts or ends")
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index: list[slice] = [slice(None)] * x.dim()
    reversed_axes: list[tuple[int, Tensor]] = []
    for given_start, given_end, given_axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(given_axis, x.dim())
        size = x.shape[axis]
        start = given_start + size if given_start < 0 else given_start
        end = given_end + size if given_end < 0 else given_end
        if step > 0:
            index[axis] = slice(min(max(start, 0), size), min(max(end, 0), size), step)
        elif step < 0:  # torch slicing has no negative steps
            first, stop = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
            reversed_axes.append((axis, torch.arange(first, stop, step)))
        else:
            raise node.unsupported("step 0")
    y = x[tuple(index)]
    for axis, positions in reversed_axes:
        y = torch.index_select(y, axis, positions)
    return [y]


def _gather(node: Node, args: Args) -> list[Tensor]:
    data, indices = _arg(node, args, 0), _arg(node, args, 1).long()
    axis = _axis(node.attr_int("axis", 0), data.dim())
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    picked = torch.index_select(data, axis, indices.reshape(-1))
    return [picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))]


def _gather_elements(node: Node, args: Args) -> list[Tensor]:
    data, indices = _arg(node, args, 0), _arg(node, args, 1).long()
    axis = _axis(node.attr_int("axis", 0), data.dim())
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    return [torch.gather(data, axis, indices)]


def _unsqueeze(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)
    axes = _ints_input_or_attr(node, args, 1, "axes") or []
    rank = x.dim() + len(axes)
    for axis in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return [x]


def _squeeze(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)
    axes = _ints_input_or_attr(node, args, 1, "axes")
    if axes is None:
        return [x.squeeze()]
    for axis in sorted((_axis(a, x.dim()) for a in axes), reverse=True):
        x = x.squeeze(axis)
    return [x]


def _shape(node: Node, args: Args) -> list[Tensor]:
    dims = list(_arg(node, args, 0).shape)
    start, end = node.attr_int("start", 0), node.attrs.get("end")
    chosen = dims[start:] if not isinstance(end, int) else dims[start:end]
    return [torch.tensor(chosen, dtype=torch.int64)]


def _size(node: Node, args: Args) -> list[Tensor]:
    return [torch.tensor(_arg(node, args, 0).numel(), dtype=torch.int64)]


def _constant(node: Node, args: Args) -> list[Tensor]:
    value = node.attr_tensor("value")
    if value is not None:
        return [value]
    if "value_float" in node.attrs:
        return [torch.tensor(node.attr_float("value_float", 0.0), dtype=torch.float32)]
    if "value_int" in node.attrs:
        return [torch.tensor(node.attr_int("value_int", 0), dtype=torch.int64)]
    floats = node.attr_floats("value_floats")
    if floats is not None:
        return [torch.tensor(floats, dtype=torch.float32)]
    ints = node.attr_ints("value_ints")
    if ints is not None:
        return [torch.tensor(ints, dtype=torch.int64)]
    raise node.unsupported(f"a constant of kind {sorted(node.attrs)}")


def _constant_of_shape(node: Node, args: Args) -> list[Tensor]:
    shape = _ints(_arg(node, args, 0))
    value = node.attr_tensor("value")
    if value is None:
        value = torch.zeros(1, dtype=torch.float32)
    return [torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype)]


def _expand(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)
    # ONNX Expand broadcasts both ways: a 1 in the shape keeps the input's dimension.
    shape = _ints(_arg(node, args, 1))
    rank = max(x.dim(), len(shape))
    have = [1] * (rank - x.dim()) + list(x.shape)
    want = [1] * (rank - len(shape)) + shape
    return [x.expand([h if w == 1 else w for h, w in zip(have, want, strict=True)])]


def _tile(node: Node, args: Args) -> list[Tensor]:
    return [_arg(node, args, 0).repeat(_ints(_arg(node, args, 1)))]


def _range(node: Node, args: Args) -> list[Tensor]:
    start, limit, delta = (_arg(node, args, i) for i in range(3))
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


_PAD_MODES = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad(node: Node, args: Args) -> list[Tensor]:
    x = _arg(node, args, 0)
    rank = x.dim()
    if node.opset < 11:
        pads, value, axes = node.attr_ints("pads"), node.attr_float("value", 0.0), None
    else:
        pads = _ints(_arg(node, args, 1))
        fill = _opt(args, 2)
        value = 0.0 if fill is None or fill.numel() == 0 else float(fill.reshape(-1)[0].item())
        axes_t = _opt(args, 3)
        axes = None if axes_t is None else _ints(axes_t)
    axes = [_axis(a, rank) for a in (axes or range(rank))]
    if pads is None or len(pads) != 2 * len(axes):
        raise node.unsupported("pads that do not match the axes")
    begin, end = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begin[axis], end[axis] = pads[i], pads[len(axes) + i]
    mode = node.attr_str("mode", "constant")
    if mode == "constant":
        return [_pad_spatial(x, begin, end, value)]
    padded = [a for a in range(rank) if begin[a] or end[a]]
    if not padded:
        return [x]
    first = padded[0]
    # torch pads in these modes only the last one to three axes of a batched input.
    if mode not in _PAD_MODES or rank - first > 3 or first == 0:
        raise node.unsupported(f"mode {mode} on these axes")
    pairs: list[int] = []
    for axis in reversed(range(first, rank)):
        pairs += [begin[axis], end[axis]]
    return [F.pad(x, pairs, mode=_PAD_MODES[mode])]


# ---------------------------------------------------------------- reductions


def _reduce(fn: Callable[[Tensor, tuple[int, ...], bool], Tensor]) -> Callable[[Node, Args], list[Tensor]]:
    def op(node: Node, args: Args) -> list[Tensor]:
        x = _arg(node, args, 0)
        axes = _ints_input_or_attr(node, args, 1, "axes")
        if not axes:
            if node.attr_int("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, tuple(_axis(a, x.dim()) for a in axes), bool(node.attr_int("keepdims", 1)))]

    return op


def _arg_reduce(fn: Callable[..., Tensor]) -> Callable[[Node, Args], list[Tensor]]:
    def op(node: Node, args: Args) -> list[Tensor]:
        x = _arg(node, args, 0)
        axis = _axis(node.attr_int("axis", 0), x.dim())
        keep = bool(node.attr_int("keepdims", 1))
        if node.attr_int("select_last_index", 0):
            flipped = fn(torch.flip(x, (axis,)), dim=axis, keepdim=keep)
            return [x.shape[axis] - 1 - flipped]
        return [fn(x, dim=axis, keepdim=keep)]

    return op


OpFn = Callable[[Node, Args], list[Tensor]]

OPS: Mapping[str, OpFn] = {
    # elementwise
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pow": _binary(_pow),
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor),
    "Not": _unary(torch.logical_not),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Sign": _unary(torch.sign),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Erf": _unary(torch.erf),
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Softplus": _unary(F.softplus),
    "Softsign": _unary(F.softsign),
    "HardSwish": _unary(F.hardswish),
    "LeakyRelu": _leaky_relu,
    "Elu": _elu,
    "Selu": _selu,
    "PRelu": _prelu,
    "HardSigmoid": _hard_sigmoid,
    "Gelu": _gelu,
    "Clip": _clip,
    "Where": _where,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Identity": _identity,
    "Dropout": _dropout,
    # linear algebra
    "Gemm": _gemm,
    "MatMul": _binary(torch.matmul),
    "Einsum": _einsum,
    # convolution and pooling
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
    "GlobalMaxPool": _global_max_pool,
    # normalization and softmax
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm,
    "Softmax": _softmax(F.softmax),
    "LogSoftmax": _softmax(F.log_softmax),
    # shapes and indexing
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Shape": _shape,
    "Size": _size,
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Tile": _tile,
    "Range": _range,
    "Pad": _pad,
    # reductions
    "ReduceMean": _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k)),
    "ReduceSum": _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k)),
    "ReduceMax": _reduce(lambda x, d, k: x.amax(dim=d, keepdim=k)),
    "ReduceMin": _reduce(lambda x, d, k: x.amin(dim=d, keepdim=k)),
    "ReduceSumSquare": _reduce(lambda x, d, k: (x * x).sum(dim=d, keepdim=k)),
    "ReduceL2": _reduce(lambda x, d, k: torch.linalg.vector_norm(x, 2, dim=d, keepdim=k)),
    "ReduceLogSumExp": _reduce(lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k)),
    "ArgMax": _arg_reduce(torch.argmax),
    "ArgMin": _arg_reduce(torch.argmin),
}
"""Every ai.onnx operator the interpreter runs, by op type."""
