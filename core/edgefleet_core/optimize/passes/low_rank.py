"""Low-rank factorization: replace a large weight by a product of thin ones.

``method`` says what is factorized, and how:

* ``svd`` — MatMul and Gemm layers with a 2-D weight ``W (K×N)`` become two layers through ``r``
  channels (``K×r`` then ``r×N``, the truncated SVD), Convs untouched;
* ``spatialSvd`` — a ``kh×kw`` Conv becomes ``kh×1`` into ``r`` channels then ``1×kw`` (Jaderberg et al.);
* ``tucker`` — a ``kh×kw`` Conv becomes 1×1 (C→R_in), the ``kh×kw`` core (R_in→R_out), 1×1 (R_out→O);
* ``cp`` — a ``kh×kw`` Conv becomes 1×1 (C→R), depthwise ``kh×1``, depthwise ``1×kw``, 1×1 (R→O)
  (Lebedev et al.), from a CP decomposition by alternating least squares.

Each method touches one kind of layer so recipes can combine them (``svd`` for the classifier, then
``tucker`` for the convolutions) and each pass's metrics describe one thing. A layer is factorized
only when it has at least ``min_parameters`` weights and the factors have fewer parameters than the
weight; its rank comes from ``rank_ratio`` when set, else from ``energy`` (the fraction of the
weight's squared Frobenius norm the factors must keep).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper

from edgefleet_core.errors import PassNotApplicable
from edgefleet_core.optimize.graph import attribute, get_array, set_array
from edgefleet_core.optimize.passes._decompositions import (
    F64,
    choose_rank,
    cp_als,
    ratio_rank,
    singular_values,
    spatial_matrix,
    spatial_svd,
    truncated_svd,
    tucker2,
    unfold,
)
from edgefleet_core.optimize.passes._surgery import FLOAT_TYPES, all_names, fresh_name, reference_counts
from edgefleet_core.optimize.passes.base import OptimizationPass, PassCapability, PassContext, PassResult
from edgefleet_core.resources.recipe import LowRankFactorizationOptions

CP_SEARCH_ITERATIONS = 60
"""ALS sweeps per trial rank while searching the rank for an energy target; the chosen rank then
gets a full run, which can only raise the fit."""
CP_WORK_LIMIT = 4e11
"""Floating-point operations a CP rank search may cost per layer (minutes on a small CPU); larger
layers are left to ``tucker`` or ``spatialSvd``, with a note."""


@dataclass
class Factorization:
    """The nodes and weights replacing one layer, and what it saved."""

    nodes: list[onnx.NodeProto]
    weights: dict[str, F64]
    before: int
    after: int
    ranks: dict[str, int]
    energy: float
    """Fraction of the weight's squared norm the factors keep."""


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D Conv's explicit padding, strides and dilations."""

    pads: tuple[int, int, int, int]
    """Top, left, bottom, right."""
    strides: tuple[int, int]
    dilations: tuple[int, int]


def _ints(node: onnx.NodeProto, name: str, default: list[int]) -> list[int]:
    value = attribute(node, name, default)
    return [int(v) for v in value] if isinstance(value, list) else default


def conv_geometry(node: onnx.NodeProto) -> ConvGeometry | str:
    """The geometry of a 2-D Conv, or why it cannot be split per axis."""
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    mode = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if mode not in ("NOTSET", "VALID"):
        # SAME_* pads depend on the input size and cannot be split between two convolutions.
        return f"auto_pad {mode} cannot be split between two convolutions"
    pads = [0, 0, 0, 0] if mode == "VALID" else _ints(node, "pads", [0, 0, 0, 0])
    strides = _ints(node, "strides", [1, 1])
    dilations = _ints(node, "dilations", [1, 1])
    return ConvGeometry((pads[0], pads[1], pads[2], pads[3]), (strides[0], strides[1]), (dilations[0], dilations[1]))


def _conv(
    inputs: list[str],
    output: str,
    name: str,
    kernel: tuple[int, int],
    *,
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    strides: tuple[int, int] = (1, 1),
    dilations: tuple[int, int] = (1, 1),
    group: int = 1,
) -> onnx.NodeProto:
    return helper.make_node(
        "Conv",
        inputs,
        [output],
        name=name,
        kernel_shape=list(kernel),
        pads=list(pads),
        strides=list(strides),
        dilations=list(dilations),
        group=group,
    )


def _float_attr(node: onnx.NodeProto, name: str) -> float:
    value = attribute(node, name, 1.0)
    return float(value) if isinstance(value, int | float) else 1.0


def _label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


class LowRankFactorizationPass(OptimizationPass[LowRankFactorizationOptions]):
    """Factorize large MatMul/Gemm (``svd``) or Conv (``spatialSvd``, ``tucker``, ``cp``) weights."""

    pass_type: ClassVar[str] = "LowRankFactorization"
    options_type: ClassVar[type[LowRankFactorizationOptions]] = LowRankFactorizationOptions
    capability: ClassVar[PassCapability] = PassCapability(
        summary=(
            "Low-rank factorization: truncated SVD of MatMul/Gemm weights into two thin layers, or spatial "
            "SVD, Tucker-2 or CP of Conv kernels into a chain of smaller convolutions; rank by energy or "
            "ratio, applied only where it saves parameters. Exact only at full rank."
        ),
    )

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        candidates = self._candidates(out)
        if not candidates:
            kind = "MatMul/Gemm with a 2-D float weight" if self.options.method == "svd" else "k×k Conv (group 1)"
            raise PassNotApplicable(self.pass_type, f"method {self.options.method}: the model has no {kind}")
        taken = all_names(out)
        refs = reference_counts(out)
        notes: list[str] = []
        metrics: dict[str, float] = {}
        replaced: dict[int, list[onnx.NodeProto]] = {}
        before = after = small = 0
        for position, node in candidates:
            weight = get_array(out, node.input[1])
            label = _label(node)
            if weight.size < self.options.min_parameters:
                small += 1
                continue
            if refs[node.input[1]] > 1:
                notes.append(f"kept {label}: its weight is shared with other layers")
                continue
            result = self._factorize(node, weight.astype(np.float64), taken, ctx.seed)
            if isinstance(result, str):
                notes.append(f"kept {label}: {result}")
                continue
            for name, value in result.weights.items():
                set_array(out, name, value.astype(weight.dtype))
            replaced[position] = result.nodes
            before += result.before
            after += result.after
            for key, rank in result.ranks.items():
                metrics[f"rank.{label}{key}"] = float(rank)
            metrics[f"energy.{label}"] = result.energy
            ranks = ", ".join(f"{key.lstrip('.') or 'rank'} {rank}" for key, rank in result.ranks.items())
            notes.append(
                f"{label}: {self.options.method} {ranks}, {result.before} → {result.after} parameters "
                f"({result.energy:.2%} energy kept)"
            )
        if small:
            notes.append(f"left {small} layer(s) under {self.options.min_parameters} parameters as they are")
        if not replaced:
            raise PassNotApplicable(self.pass_type, "no layer saves parameters: " + ("; ".join(notes) or "none large"))
        self._splice(out, replaced)
        metrics.update(
            {
                "parameters_before": float(before),
                "parameters_after": float(after),
                "factorized_layers": float(len(replaced)),
            }
        )
        return PassResult(out, notes, metrics)

    def _candidates(self, model: onnx.ModelProto) -> list[tuple[int, onnx.NodeProto]]:
        initializers = {init.name: init for init in model.graph.initializer}
        found = []
        for position, node in enumerate(model.graph.node):
            if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
                continue
            init = initializers.get(node.input[1])
            if init is None or init.data_type not in FLOAT_TYPES:
                continue
            dims = tuple(init.dims)
            if self.options.method == "svd":
                usable = node.op_type in ("MatMul", "Gemm") and len(dims) == 2
            else:
                needs_both = self.options.method == "spatialSvd"
                spatial = len(dims) == 4 and (min(dims[2:]) > 1 if needs_both else dims[2] * dims[3] > 1)
                group = attribute(node, "group", 1)
                usable = node.op_type == "Conv" and spatial and group == 1
            if usable:
                found.append((position, node))
        return found

    def _factorize(self, node: onnx.NodeProto, weight: F64, taken: set[str], seed: int) -> Factorization | str:
        method = self.options.method
        if method == "svd":
            return self._svd(node, weight, taken)
        geometry = conv_geometry(node)
        if isinstance(geometry, str):
            return geometry
        if method == "spatialSvd":
            return self._spatial(node, weight, geometry, taken)
        if method == "tucker":
            return self._tucker(node, weight, geometry, taken)
        return self._cp(node, weight, geometry, taken, seed)

    def _svd(self, node: onnx.NodeProto, weight: F64, taken: set[str]) -> Factorization | str:
        trans_a = node.op_type == "Gemm" and attribute(node, "transA", 0) == 1
        if node.op_type == "Gemm" and attribute(node, "transB", 0) == 1:
            weight = weight.T
        rows, cols = weight.shape
        values = singular_values(weight)
        rank = choose_rank(values, self.options.energy, self.options.rank_ratio)
        after = rank * (rows + cols)
        if after >= rows * cols:
            return f"no saving at rank {rank} ({after} ≥ {rows * cols} parameters)"
        left, right = truncated_svd(weight, rank)
        label = _label(node)
        u, v = fresh_name(taken, f"{node.input[1]}_u"), fresh_name(taken, f"{node.input[1]}_v")
        middle = fresh_name(taken, f"{node.output[0]}_lowrank")
        first_name = fresh_name(taken, f"{label}_u")
        if trans_a:
            first = helper.make_node("Gemm", [node.input[0], u], [middle], name=first_name, transA=1)
        else:
            first = helper.make_node("MatMul", [node.input[0], u], [middle], name=first_name)
        if node.op_type == "Gemm":
            # The second factor carries the bias and the scalars: alpha·(A·U)·V + beta·C.
            second = helper.make_node(
                "Gemm",
                [middle, v, *node.input[2:3]],
                [node.output[0]],
                name=fresh_name(taken, f"{label}_v"),
                alpha=_float_attr(node, "alpha"),
                beta=_float_attr(node, "beta"),
            )
        else:
            second = helper.make_node("MatMul", [middle, v], [node.output[0]], name=fresh_name(taken, f"{label}_v"))
        return Factorization([first, second], {u: left, v: right}, weight.size, after, {"": rank}, _kept(values, rank))

    def _spatial(self, node: onnx.NodeProto, weight: F64, geo: ConvGeometry, taken: set[str]) -> Factorization | str:
        out_channels, in_channels, kh, kw = weight.shape
        values = singular_values(spatial_matrix(weight))
        rank = choose_rank(values, self.options.energy, self.options.rank_ratio)
        after = rank * (in_channels * kh + out_channels * kw)
        if after >= weight.size:
            return f"no saving at rank {rank} ({after} ≥ {weight.size} parameters)"
        vertical, horizontal = spatial_svd(weight, rank)
        label = _label(node)
        v, h = fresh_name(taken, f"{node.input[1]}_vertical"), fresh_name(taken, f"{node.input[1]}_horizontal")
        middle = fresh_name(taken, f"{node.output[0]}_vertical")
        top, left, bottom, right = geo.pads
        nodes = [
            _conv(
                [node.input[0], v],
                middle,
                fresh_name(taken, f"{label}_vertical"),
                (kh, 1),
                pads=(top, 0, bottom, 0),
                strides=(geo.strides[0], 1),
                dilations=(geo.dilations[0], 1),
            ),
            _conv(
                [middle, h, *node.input[2:3]],
                node.output[0],
                fresh_name(taken, f"{label}_horizontal"),
                (1, kw),
                pads=(0, left, 0, right),
                strides=(1, geo.strides[1]),
                dilations=(1, geo.dilations[1]),
            ),
        ]
        return Factorization(nodes, {v: vertical, h: horizontal}, weight.size, after, {"": rank}, _kept(values, rank))

    def _tucker(self, node: onnx.NodeProto, weight: F64, geo: ConvGeometry, taken: set[str]) -> Factorization | str:
        out_channels, in_channels, kh, kw = weight.shape
        out_values, in_values = singular_values(unfold(weight, 0)), singular_values(unfold(weight, 1))
        out_rank = choose_rank(out_values, self.options.energy, self.options.rank_ratio)
        in_rank = choose_rank(in_values, self.options.energy, self.options.rank_ratio)
        after = in_channels * in_rank + out_rank * in_rank * kh * kw + out_channels * out_rank
        if after >= weight.size:
            return f"no saving at ranks {out_rank}×{in_rank} ({after} ≥ {weight.size} parameters)"
        tucker = tucker2(weight, out_rank, in_rank)
        label = _label(node)
        names = [fresh_name(taken, f"{node.input[1]}_{part}") for part in ("in", "core", "out")]
        hidden = [fresh_name(taken, f"{node.output[0]}_{part}") for part in ("in", "core")]
        nodes = [
            _conv([node.input[0], names[0]], hidden[0], fresh_name(taken, f"{label}_in"), (1, 1)),
            _conv(
                [hidden[0], names[1]],
                hidden[1],
                fresh_name(taken, f"{label}_core"),
                (kh, kw),
                pads=geo.pads,
                strides=geo.strides,
                dilations=geo.dilations,
            ),
            _conv([hidden[1], names[2], *node.input[2:3]], node.output[0], fresh_name(taken, f"{label}_out"), (1, 1)),
        ]
        weights = {
            names[0]: tucker.in_basis.T[:, :, None, None],
            names[1]: tucker.core,
            names[2]: tucker.out_basis[:, :, None, None],
        }
        energy = float((tucker.core**2).sum() / max(float((weight**2).sum()), 1e-300))
        return Factorization(nodes, weights, weight.size, after, {".out": out_rank, ".in": in_rank}, energy)

    def _cp(
        self, node: onnx.NodeProto, weight: F64, geo: ConvGeometry, taken: set[str], seed: int
    ) -> Factorization | str:
        out_channels, in_channels, kh, kw = weight.shape
        per_rank = out_channels + in_channels + kh + kw
        if self.options.rank_ratio is not None:
            rank = ratio_rank(self.options.rank_ratio, min(out_channels, in_channels))
            if rank * per_rank >= weight.size:
                return f"no saving at rank {rank} ({rank * per_rank} ≥ {weight.size} parameters)"
        else:
            searched = self._cp_rank(weight, per_rank, seed)
            if isinstance(searched, str):
                return searched
            rank = searched
        cp = cp_als(weight, rank, seed=seed)
        outer, inner, vertical, horizontal = cp.factors
        label = _label(node)
        names = [fresh_name(taken, f"{node.input[1]}_cp{part}") for part in range(4)]
        hidden = [fresh_name(taken, f"{node.output[0]}_cp{part}") for part in range(3)]
        top, left, bottom, right = geo.pads
        nodes = [
            _conv([node.input[0], names[0]], hidden[0], fresh_name(taken, f"{label}_cp_in"), (1, 1)),
            _conv(
                [hidden[0], names[1]],
                hidden[1],
                fresh_name(taken, f"{label}_cp_vertical"),
                (kh, 1),
                pads=(top, 0, bottom, 0),
                strides=(geo.strides[0], 1),
                dilations=(geo.dilations[0], 1),
                group=rank,
            ),
            _conv(
                [hidden[1], names[2]],
                hidden[2],
                fresh_name(taken, f"{label}_cp_horizontal"),
                (1, kw),
                pads=(0, left, 0, right),
                strides=(1, geo.strides[1]),
                dilations=(1, geo.dilations[1]),
                group=rank,
            ),
            _conv(
                [hidden[2], names[3], *node.input[2:3]], node.output[0], fresh_name(taken, f"{label}_cp_out"), (1, 1)
            ),
        ]
        weights = {
            names[0]: inner.T[:, :, None, None],
            names[1]: vertical.T[:, None, :, None],
            names[2]: horizontal.T[:, None, None, :],
            names[3]: outer[:, :, None, None],
        }
        return Factorization(nodes, weights, weight.size, rank * per_rank, {"": rank}, cp.fit)

    def _cp_rank(self, weight: F64, per_rank: int, seed: int) -> int | str:
        """The smallest CP rank whose fit reaches ``energy``, by bisection over the ranks that save."""
        highest = (weight.size - 1) // per_rank
        if highest < 1:
            return "no CP rank saves parameters"
        work = 4.0 * weight.size * highest * CP_SEARCH_ITERATIONS * np.log2(highest + 1)
        if work > CP_WORK_LIMIT:
            return "too large for a CP rank search here; use tucker or spatialSvd, or set rankRatio"
        energy = self.options.energy

        def fits(rank: int) -> bool:
            return cp_als(weight, rank, seed=seed, iterations=CP_SEARCH_ITERATIONS).fit >= energy

        if not fits(highest):
            return f"no saving: even rank {highest} keeps less than {energy:.2%} of the energy"
        low, high = 1, highest
        while low < high:
            middle = (low + high) // 2
            if fits(middle):
                high = middle
            else:
                low = middle + 1
        return high

    @staticmethod
    def _splice(model: onnx.ModelProto, replaced: dict[int, list[onnx.NodeProto]]) -> None:
        """Put each factorized layer's nodes where it was (order stays topological); drop old weights."""
        old_weights = {model.graph.node[position].input[1] for position in replaced}
        nodes: list[onnx.NodeProto] = []
        for position, node in enumerate(model.graph.node):
            nodes.extend(replaced.get(position, [node]))
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        refs = reference_counts(model)
        unused = {name for name in old_weights if refs[name] == 0}
        kept = [init for init in model.graph.initializer if init.name not in unused]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        inputs = [value for value in model.graph.input if value.name not in unused]
        del model.graph.input[:]
        model.graph.input.extend(inputs)


def _kept(values: F64, rank: int) -> float:
    squares = values**2
    total = float(squares.sum())
    return float(squares[:rank].sum() / total) if total else 1.0
