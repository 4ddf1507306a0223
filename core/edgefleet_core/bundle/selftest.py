"""Self-test data carried in a bundle manifest: golden inputs, the outputs they must give, and a latency SLO.

Computed at publish time with ONNX Runtime on the CPU from the exact model bytes that are signed
(:func:`make_self_test`), and checked on the device after a new version's sessions are created and
before it takes traffic (:func:`check_outputs`). The tensors are small (at most
:data:`MAX_SELF_TEST_BYTES` of raw data in all) because they travel inside the signed manifest.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Final, Literal, Self, cast, get_args

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel

from edgefleet_core.errors import BundleError

MAX_SELF_TEST_BYTES: Final = 64 * 1024
"""Largest total of raw tensor data (inputs and outputs) a self-test may carry."""
MAX_TENSOR_RANK: Final = 8
MAX_SELF_TEST_RUNS: Final = 1000

SelfTestDtype = Literal["float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"]
"""numpy dtype names a self-test tensor may have: the ONNX types the inference API carries and numpy has."""

ORT_TYPES: Final[Mapping[str, SelfTestDtype]] = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}
"""ONNX Runtime's type strings (``NodeArg.type``) and the numpy dtype of each."""

TensorName = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Dimension = Annotated[int, Field(ge=0, le=MAX_SELF_TEST_BYTES)]
_MAX_BASE64 = 4 * math.ceil(MAX_SELF_TEST_BYTES / 3)

Shape = tuple[int | str | None, ...]
"""A graph input's shape as ONNX Runtime reports it: ints, or a name / ``None`` for a dynamic dimension."""


class _SelfTestModel(BaseModel):
    """camelCase on the wire, unknown fields refused, immutable (as the rest of the manifest)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, validate_default=True
    )


class SelfTestTensor(_SelfTestModel):
    """One named tensor: numpy dtype name, concrete shape, raw little-endian C-order data in base64."""

    name: TensorName
    dtype: SelfTestDtype
    shape: Annotated[list[Dimension], Field(max_length=MAX_TENSOR_RANK)]
    data: Annotated[str, StringConstraints(max_length=_MAX_BASE64)]
    """Standard base64 (with padding) of ``product(shape) * itemsize`` bytes."""

    @model_validator(mode="after")
    def _data_matches_shape(self) -> Self:
        expected = math.prod(self.shape) * np.dtype(self.dtype).itemsize
        if len(self.raw()) != expected:
            raise ValueError(f"tensor {self.name!r}: data has {len(self.raw())} bytes, shape and dtype need {expected}")
        return self

    def raw(self) -> bytes:
        """The decoded data bytes."""
        try:
            return base64.b64decode(self.data, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"tensor {self.name!r}: data is not base64 ({exc})") from None

    def array(self) -> npt.NDArray[np.generic]:
        """The tensor as a (writable) numpy array."""
        dtype = np.dtype(self.dtype).newbyteorder("<")
        return np.frombuffer(self.raw(), dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(self.shape)

    @classmethod
    def from_array(cls, name: str, value: npt.ArrayLike) -> SelfTestTensor:
        """A tensor from a numpy array whose dtype is one of :data:`SelfTestDtype`."""
        array = np.asarray(value)
        dtype = array.dtype.name
        if dtype not in get_args(SelfTestDtype):
            raise BundleError(f"tensor {name!r} has dtype {dtype}, which a self-test cannot carry")
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        return cls(
            name=name,
            dtype=cast("SelfTestDtype", dtype),
            shape=list(array.shape),
            data=base64.b64encode(data).decode("ascii"),
        )


class SelfTest(_SelfTestModel):
    """Golden inputs, expected outputs and tolerances a device checks before a version takes traffic."""

    inputs: Annotated[list[SelfTestTensor], Field(min_length=1, max_length=64)]
    outputs: Annotated[list[SelfTestTensor], Field(min_length=1, max_length=64)]
    rtol: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 1e-3
    atol: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-4
    latency_slo_ms: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    """The p95 of ``runs`` golden-input runs must be at most this; ``None`` checks no latency."""
    runs: Annotated[int, Field(ge=1, le=MAX_SELF_TEST_RUNS)] = 5

    @model_validator(mode="after")
    def _small_and_unique(self) -> Self:
        for group, tensors in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [t.name for t in tensors]
            if len(set(names)) != len(names):
                raise ValueError(f"self-test {group} repeat a name: {sorted(names)}")
        total = sum(len(t.raw()) for t in (*self.inputs, *self.outputs))
        if total > MAX_SELF_TEST_BYTES:
            raise ValueError(f"self-test data is {total} bytes, over the {MAX_SELF_TEST_BYTES}-byte cap")
        return self

    def input_arrays(self) -> dict[str, npt.NDArray[np.generic]]:
        """The golden inputs by name."""
        return {t.name: t.array() for t in self.inputs}


def generate_inputs(specs: Sequence[tuple[str, str, Shape]], *, seed: int = 0) -> dict[str, npt.NDArray[np.generic]]:
    """Deterministic inputs for graph inputs given as (name, ONNX Runtime type string, shape).

    Dynamic dimensions are 1. Floats are uniform in [0, 1); integers are 0 or 1 and booleans random,
    so index-like inputs (token ids, gather indices) stay in range for any table.
    """
    rng = np.random.default_rng(seed)
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for name, ort_type, shape in specs:
        dtype = ORT_TYPES.get(ort_type)
        if dtype is None:
            raise BundleError(f"graph input {name!r} has type {ort_type}, which a self-test cannot generate")
        dims = [d if isinstance(d, int) and d >= 0 else 1 for d in shape]
        if dtype == "bool":
            arrays[name] = rng.integers(0, 2, dims).astype(np.bool_)
        elif np.issubdtype(np.dtype(dtype), np.floating):
            arrays[name] = rng.uniform(0.0, 1.0, dims).astype(dtype)
        else:
            arrays[name] = rng.integers(0, 2, dims).astype(dtype)
    return arrays


def _refuse_external_data(data: bytes, name: str) -> None:
    """Refuse a model whose tensors point at external files: a bundle carries whole models only, and
    ONNX Runtime would resolve the paths of a model given as bytes against the working folder."""
    import onnx  # noqa: PLC0415 - as ONNX Runtime below
    from google.protobuf.message import DecodeError  # noqa: PLC0415
    from onnx import external_data_helper  # noqa: PLC0415

    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError):
        return  # ONNX Runtime refuses it next, in its own words
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            raise BundleError(f"{name}: tensor {tensor.name!r} uses external data; a bundle holds whole models")


def _session(data: bytes, name: str) -> Any:
    # Imported here: the manifest module (and everything that parses manifests) must not pay for ONNX Runtime.
    import onnxruntime as ort  # noqa: PLC0415

    from edgefleet_core.optimize.runtime import CPU_EP, ORT_ERRORS  # noqa: PLC0415

    _refuse_external_data(data, name)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(data, sess_options=options, providers=[CPU_EP])
    except ORT_ERRORS as exc:
        raise BundleError(f"{name}: ONNX Runtime cannot load it for the self-test: {exc}") from None


def _run(session: Any, feed: Mapping[str, npt.NDArray[np.generic]], name: str) -> dict[str, npt.NDArray[np.generic]]:
    from edgefleet_core.optimize.runtime import ORT_ERRORS  # noqa: PLC0415 - as in _session

    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    try:
        values = session.run(names, {k: v for k, v in feed.items() if k in wanted})
    except ORT_ERRORS as exc:
        raise BundleError(f"{name}: ONNX Runtime cannot run the self-test inputs: {exc}") from None
    return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}


def _input_specs(session: Any) -> list[tuple[str, str, Shape]]:
    return [(i.name, i.type, tuple(i.shape)) for i in session.get_inputs()]


def make_self_test(
    files: Mapping[str, bytes],
    *,
    inputs: Mapping[str, npt.ArrayLike] | None = None,
    latency_slo_ms: float | None = None,
    seed: int = 0,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    runs: int = 5,
) -> SelfTest:
    """Run the model files (``model.onnx``, or ``head.onnx`` then ``tail.onnx``) on the CPU and record the outputs.

    ``inputs`` are sample inputs by graph input name (e.g. one batch of golden data); without them
    inputs are generated from the graph's input types and shapes (:func:`generate_inputs`).
    """
    if set(files) == {"model.onnx"}:
        stages = [("model.onnx", _session(files["model.onnx"], "model.onnx"))]
    elif set(files) == {"head.onnx", "tail.onnx"}:
        stages = [(n, _session(files[n], n)) for n in ("head.onnx", "tail.onnx")]
    else:
        raise BundleError(f"a self-test runs model.onnx, or head.onnx and tail.onnx; got {sorted(files)}")
    first = stages[0][1]
    specs = _input_specs(first)
    if inputs is None:
        feed = generate_inputs(specs, seed=seed)
    else:
        feed = {}
        expected = {name: ort_type for name, ort_type, _ in specs}
        if set(inputs) != set(expected):
            raise BundleError(f"sample inputs are {sorted(inputs)}; the model's inputs are {sorted(expected)}")
        for name, value in inputs.items():
            array = np.asarray(value)
            if ORT_TYPES.get(expected[name]) != array.dtype.name:
                raise BundleError(f"sample input {name!r} is {array.dtype.name}; the model takes {expected[name]}")
            feed[name] = array
    values: dict[str, npt.NDArray[np.generic]] = dict(feed)
    outputs: dict[str, npt.NDArray[np.generic]] = {}
    for name, session in stages:
        # A tail takes the head's outputs by name (and any model input it also needs).
        outputs = _run(session, values, name)
        values.update(outputs)
    total = sum(v.nbytes for v in (*feed.values(), *outputs.values()))
    if total > MAX_SELF_TEST_BYTES:
        raise BundleError(
            f"self-test data is {total} bytes, over the {MAX_SELF_TEST_BYTES}-byte cap of a manifest; "
            "give smaller sample inputs (e.g. one row) or publish without a self-test"
        )
    try:
        return SelfTest(
            inputs=[SelfTestTensor.from_array(n, v) for n, v in feed.items()],
            outputs=[SelfTestTensor.from_array(n, v) for n, v in outputs.items()],
            rtol=rtol,
            atol=atol,
            latency_slo_ms=latency_slo_ms,
            runs=runs,
        )
    except ValueError as exc:  # pydantic's ValidationError is a ValueError: over the size cap, bad tolerances
        raise BundleError(f"self-test data cannot go into the manifest: {exc}") from None


def _compare(name: str, golden: npt.NDArray[np.generic], actual: npt.NDArray[np.generic], test: SelfTest) -> str | None:
    if actual.dtype != golden.dtype:
        return f"output {name!r} is {actual.dtype.name}, expected {golden.dtype.name}"
    if actual.shape != golden.shape:
        return f"output {name!r} has shape {list(actual.shape)}, expected {list(golden.shape)}"
    if not np.issubdtype(golden.dtype, np.floating):
        mismatched = int(np.count_nonzero(actual != golden))
        return f"output {name!r}: {mismatched} of {golden.size} values differ" if mismatched else None
    wide_golden = golden.astype(np.float64)
    wide_actual = actual.astype(np.float64)
    broken = np.isfinite(wide_golden) & ~np.isfinite(wide_actual)
    if broken.any():
        return f"output {name!r}: {int(broken.sum())} non-finite values where the golden ones are finite"
    close = np.isclose(wide_actual, wide_golden, rtol=test.rtol, atol=test.atol, equal_nan=True)
    if close.all():
        return None
    worst = float(np.nanmax(np.abs(wide_actual - wide_golden)))
    return (
        f"output {name!r}: {int((~close).sum())} of {golden.size} values outside "
        f"rtol={test.rtol} atol={test.atol} (largest difference {worst:.6g})"
    )


def check_outputs(self_test: SelfTest, outputs: Mapping[str, npt.NDArray[np.generic]]) -> str | None:
    """``None`` when ``outputs`` match the golden outputs within tolerance, else why they do not.

    A non-finite value where the golden one is finite fails even inside the tolerance; NaN where the
    golden output has NaN passes (the model produced it at publish time too).
    """
    for expected in self_test.outputs:
        got = outputs.get(expected.name)
        if got is None:
            return f"output {expected.name!r} is missing"
        problem = _compare(expected.name, expected.array(), np.asarray(got), self_test)
        if problem is not None:
            return problem
    return None
