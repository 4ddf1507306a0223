"""Weight clustering: k-means weight sharing with k = 2**bits (Han et al., "Deep Compression").

Every clustered weight tensor (or, with ``per_channel``, every output channel of it) keeps at most
``k`` distinct values, **zero included**: exact zeros — the sparsity magnitude pruning produced —
stay exactly zero and count as one of the ``k`` values, and the nonzeros share the other ``k - 1``
centroids (all ``k`` when the tensor has no zeros). So a ``bits``-wide index addresses every value
of a codebook, which is what the bundle format's Huffman coding of the indices relies on.

The model stays in its float type; which tensors were clustered, and how many bits their indices
need, is recorded in the model's ``metadata_props`` under :data:`METADATA_KEY` as JSON
``{tensor: bits}`` (and per-channel tensors' codebook axis under :data:`PER_CHANNEL_KEY`).
The 1-D k-means is ours on purpose: sorted centroids make assignment a binary search, and a linear
initialisation between min and max (as in Deep Compression) makes it deterministic without a seed.
"""

from __future__ import annotations

import json
import math
from typing import ClassVar

import numpy as np
import numpy.typing as npt
import onnx

from edgefleet_core.errors import PassNotApplicable
from edgefleet_core.optimize.graph import get_array, set_array
from edgefleet_core.optimize.passes._surgery import weight_uses
from edgefleet_core.optimize.passes.base import OptimizationPass, PassCapability, PassContext, PassResult
from edgefleet_core.resources.recipe import WeightClusteringOptions

METADATA_KEY = "edgefleet.clustering"
"""``metadata_props`` key: JSON ``{tensor name: index bits}`` of the clustered weights."""
PER_CHANNEL_KEY = "edgefleet.clustering.per_channel"
"""``metadata_props`` key: JSON ``{tensor name: axis}`` for tensors with one codebook per slice of that axis."""
MIN_CLUSTER_ELEMENTS = 64
"""Smaller weights are left alone: their indices and codebook would not be smaller than the floats."""
MAX_ITERATIONS = 100
"""Lloyd iterations before giving up on convergence (1-D k-means usually settles within a few dozen)."""


def kmeans_1d(values: npt.NDArray[np.float64], k: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.intp]]:
    """Lloyd's k-means of 1-D ``values`` from ``k`` centroids spread evenly between min and max.

    Returns the sorted centroids and each value's cluster. In one dimension the clusters are
    intervals, so assignment is a binary search against the midpoints between centroids. An empty
    cluster keeps its centroid (it simply goes unused); iteration stops when no assignment changes.
    """
    centroids = np.linspace(float(values.min()), float(values.max()), k)
    labels = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)
    for _ in range(MAX_ITERATIONS):
        counts = np.bincount(labels, minlength=k)
        sums = np.bincount(labels, weights=values, minlength=k)
        centroids = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centroids))
        updated = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)
        if np.array_equal(updated, labels):
            break
        labels = updated
    return centroids, labels


def cluster(values: npt.NDArray[np.generic], k: int) -> npt.NDArray[np.generic]:
    """``values`` with at most ``k`` distinct entries, zero (if present) being one of them and kept exact."""
    flat = values.astype(np.float64).ravel()
    nonzero = flat != 0
    slots = k - 1 if not nonzero.all() else k
    picked = flat[nonzero]
    if slots < 1 or picked.size == 0 or np.unique(picked).size <= slots:
        return values.copy()
    centroids, labels = kmeans_1d(picked, slots)
    flat[nonzero] = centroids[labels]
    return flat.reshape(values.shape).astype(values.dtype)


def index_bits(unique: int) -> int:
    """Bits of an index over ``unique`` codebook entries (at least 1)."""
    return max(1, math.ceil(math.log2(max(unique, 1))))


def _unique_per_codebook(values: npt.NDArray[np.generic], axis: int | None) -> int:
    if axis is None:
        return int(np.unique(values).size)
    moved = np.moveaxis(values, axis, 0)
    return max(int(np.unique(channel).size) for channel in moved)


class WeightClusteringPass(OptimizationPass[WeightClusteringOptions]):
    """Share weights: each Conv/Gemm/MatMul weight (or output channel) keeps at most 2**bits values."""

    pass_type: ClassVar[str] = "WeightClustering"
    options_type: ClassVar[type[WeightClusteringOptions]] = WeightClusteringOptions
    capability: ClassVar[PassCapability] = PassCapability(
        summary=(
            "k-means weight sharing (k = 2**bits, per tensor or per output channel) of Conv/Gemm/MatMul "
            "weights, zeros kept exact; the model stays float, and the bundle Huffman-codes the indices."
        ),
    )

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        k = 2**self.options.bits
        axes: dict[str, int] = {}
        for use in weight_uses(out):
            # A weight shared by several layers is clustered once; its output axis is the first use's.
            axes.setdefault(use.name, use.output_axis)
        sizes = {init.name: int(np.prod(init.dims)) for init in out.graph.initializer}
        targets = {name: axis for name, axis in axes.items() if sizes[name] >= MIN_CLUSTER_ELEMENTS}
        if not targets:
            raise PassNotApplicable(
                self.pass_type, f"no float Conv/Gemm/MatMul weight of at least {MIN_CLUSTER_ELEMENTS} elements"
            )
        bits: dict[str, int] = {}
        unique_max = 0
        for name, axis in targets.items():
            weight = get_array(out, name)
            codebook_axis = axis if self.options.per_channel else None
            if codebook_axis is None:
                clustered = cluster(weight, k)
            else:
                moved = np.moveaxis(weight, codebook_axis, 0)
                clustered = np.moveaxis(np.stack([cluster(channel, k) for channel in moved]), 0, codebook_axis)
            set_array(out, name, clustered.astype(weight.dtype))
            unique = _unique_per_codebook(clustered, codebook_axis)
            unique_max = max(unique_max, unique)
            bits[name] = index_bits(unique)
        self._record(out, bits, {name: targets[name] for name in bits} if self.options.per_channel else {})
        scope = "output channel" if self.options.per_channel else "tensor"
        notes = [f"clustered {len(bits)} weight tensors to at most {k} values per {scope} (zero included)"]
        small = len(axes) - len(targets)
        if small:
            notes.append(f"left {small} weight tensor(s) under {MIN_CLUSTER_ELEMENTS} elements as they are")
        metrics = {
            "clustered_tensors": float(len(bits)),
            "clustered_parameters": float(sum(sizes[name] for name in bits)),
            "unique_values_max": float(unique_max),
            "bits": float(self.options.bits),
        }
        return PassResult(out, notes, metrics)

    @staticmethod
    def _record(model: onnx.ModelProto, bits: dict[str, int], per_channel: dict[str, int]) -> None:
        """Merge this run's tensors into the model's clustering metadata (a later run wins per tensor)."""
        props = {prop.key: prop.value for prop in model.metadata_props}
        recorded = _json_dict(props.get(METADATA_KEY))
        recorded.update(bits)
        axes = {name: axis for name, axis in _json_dict(props.get(PER_CHANNEL_KEY)).items() if name not in bits}
        axes.update(per_channel)
        props[METADATA_KEY] = json.dumps(recorded, sort_keys=True)
        if axes:
            props[PER_CHANNEL_KEY] = json.dumps(axes, sort_keys=True)
        else:
            props.pop(PER_CHANNEL_KEY, None)
        del model.metadata_props[:]
        for key, value in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value


def _json_dict(text: str | None) -> dict[str, int]:
    """A ``{name: int}`` JSON object, or empty when absent or not of that form."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): int(v) for k, v in value.items() if isinstance(v, int)}
