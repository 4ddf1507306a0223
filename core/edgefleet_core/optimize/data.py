"""Evaluation, calibration and training data: NumPy ``.npz`` files with arrays named after the model inputs.

An optional ``labels`` array holds the true classes (classification) or targets (regression).
A model with a single input also accepts its array under the name ``inputs``.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

from edgefleet_core.errors import DataError, ModelError

Array = npt.NDArray[np.generic]
LABELS = "labels"
MAX_DATA_BYTES = 4 * 1024**3
"""Largest data file read; evaluation sets are samples, not training corpora."""


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, element type, and shape (``None`` for a dynamic dimension)."""

    name: str
    dtype: np.dtype[np.generic]
    shape: tuple[int | None, ...]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers)."""
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            raise ModelError("<model>", f"input {value.name!r} is not a tensor (sequence, map and optional inputs "
                             "are not supported)")  # fmt: skip
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), dims))
    return specs


@dataclass(frozen=True)
class Dataset:
    """Samples along the first axis of every input array, and optional labels."""

    inputs: Mapping[str, Array]
    labels: Array | None = None

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, count: int) -> Dataset:
        """The first ``count`` samples."""
        labels = None if self.labels is None else self.labels[:count]
        return Dataset({k: v[:count] for k, v in self.inputs.items()}, labels)

    def batches(self, batch_size: int) -> Iterator[dict[str, Array]]:
        """Input feeds of at most ``batch_size`` samples, in order."""
        for start in range(0, len(self), batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.inputs.items()}

    def sample(self, index: int, size: int = 1) -> dict[str, Array]:
        """The feed of ``size`` samples from ``index`` (a batch of one by default)."""
        return {k: v[index : index + size] for k, v in self.inputs.items()}


def dataset_for(model: onnx.ModelProto, arrays: Mapping[str, Array], source: str = "<data>") -> Dataset:
    """Check ``arrays`` against the model's inputs and build a :class:`Dataset`."""
    specs = input_specs(model)
    inputs: dict[str, Array] = {}
    for spec in specs:
        array = arrays.get(spec.name)
        if array is None and len(specs) == 1:
            array = arrays.get("inputs")
        if array is None:
            raise DataError(source, f"no array for model input {spec.name!r} (arrays: {sorted(arrays)})")
        if array.ndim != len(spec.shape):
            raise DataError(source, f"input {spec.name!r} has rank {array.ndim}, the model expects {len(spec.shape)}")
        for axis, (got, want) in enumerate(zip(array.shape[1:], spec.shape[1:], strict=True), start=1):
            if want is not None and got != want:
                raise DataError(source, f"input {spec.name!r} has size {got} on axis {axis}, the model expects {want}")
        if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
            raise DataError(source, f"input {spec.name!r} is {array.dtype}, the model expects {spec.dtype}")
        inputs[spec.name] = np.ascontiguousarray(array.astype(spec.dtype, copy=False))
    counts = {name: a.shape[0] for name, a in inputs.items()}
    labels = arrays.get(LABELS)
    if labels is not None:
        counts[LABELS] = labels.shape[0]
    if len(set(counts.values())) != 1:
        raise DataError(source, f"arrays disagree on the number of samples: {counts}")
    if next(iter(counts.values())) == 0:
        raise DataError(source, "the data set is empty")
    return Dataset(inputs, labels)


def load_dataset(path: Path, model: onnx.ModelProto) -> Dataset:
    """Read an ``.npz`` file for ``model``; raises :class:`DataError` naming the problem."""
    source = str(path)
    try:
        if path.stat().st_size > MAX_DATA_BYTES:
            raise DataError(source, f"file is larger than {MAX_DATA_BYTES} bytes")
        # allow_pickle=False: a data file must never be able to run code.
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise DataError(source, "no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(source, f"not a readable .npz file: {exc}") from None
    return dataset_for(model, arrays, source)
