"""INT8 post-training quantization with ONNX Runtime's quantizer, and the machinery shared with mixed precision.

The quantizing itself is ONNX Runtime's (``quantize_static`` / ``quantize_dynamic``, after
``quant_pre_process``): it knows which ops each format and kernel supports. What is ours is the
policy around it: static or dynamic and QDQ or QOperator for the target execution provider, a
calibration reader over our :class:`Dataset` that respects fixed batch dimensions, pre-processing
that degrades step by step on models symbolic shape inference cannot follow, and one calibration
shared by every quantization of the same model (mixed precision quantizes the same graph many
times with different nodes kept in FP32).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Literal

import onnx
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

from edgefleet_core.errors import ModelError, PassNotApplicable
from edgefleet_core.optimize.data import Array, Dataset, input_specs
from edgefleet_core.optimize.graph import producers
from edgefleet_core.optimize.model_io import serialize
from edgefleet_core.optimize.passes.base import OptimizationPass, PassCapability, PassContext, PassResult
from edgefleet_core.optimize.passes.graph_optimization import (
    CONTRIB_DOMAIN,
    EXTERNAL_DATA_BYTES,
    save_for_tools,
    unfuse_cpu_fusions,
)
from edgefleet_core.optimize.runtime import CPU_EP, ORT_ERRORS, session
from edgefleet_core.resources.recipe import QuantizeInt8Options

_logger = logging.getLogger(__name__)

QUANTIZABLE_OPS = frozenset({"Conv", "MatMul", "Gemm"})
"""The compute-heavy ops whose quantization pays; mixed precision decides about each of them."""
CONVOLUTIONAL_OPS = frozenset({"Conv", "ConvTranspose"})
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "QGemm",
        "QAttention",
        "QEmbedLayerNormalization",
        "QOrderedMatMul",
        "MatMulIntegerToFloat",
        "MatMulNBits",
        "MatMulBnb4",
        "GatherBlockQuantized",
    }
)
"""Ops that only appear in a model that has been quantized already (plus every ``QLinear*`` op)."""
QDQ_ONLY_PROVIDERS = frozenset({"TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider", "QNNExecutionProvider"})
"""Providers that run integer models only in QDQ form, from static quantization."""
SYMMETRIC_INT8_PROVIDERS = frozenset({"TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider"})
"""TensorRT takes only signed INT8 with zero points at 0, for activations and weights alike."""

CALIBRATION_BATCH = 16
"""Samples per calibration run for models with a dynamic batch dimension: large enough to keep
ONNX Runtime busy, small enough that the calibrator's per-run tensors stay modest."""

_CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
_QUANT_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}

# What the quantizer raises when it cannot handle a graph: its Python code asserts and raises
# the builtin errors below; the native parts (calibration sessions) raise ONNX Runtime's own.
QUANTIZER_FAILURES: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AssertionError,
    RuntimeError,
    onnx.checker.ValidationError,
    *ORT_ERRORS,
)


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether ``model`` already holds quantized ops (QDQ pairs, ``QLinear*``, integer MatMul/Conv)."""
    return any(node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear") for node in model.graph.node)


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the main graph's Conv/MatMul/Gemm nodes, in graph order."""
    return [node.name for node in model.graph.node if node.op_type in QUANTIZABLE_OPS]


def quantized_nodes(candidates: Collection[str], original: onnx.ModelProto, quantized: onnx.ModelProto) -> list[str]:
    """Which of ``candidates`` (node names of ``original``) the quantizer really turned into INT8.

    The quantizer keeps the name and op of a node it leaves in float. In QOperator form it
    replaces a quantized node by one with a new name (``conv1_quant``); in QDQ form it keeps the
    node and feeds its weights from ``DequantizeLinear`` of an integer initializer. Activation
    inputs say nothing: a float node after a quantized one reads a dequantized tensor too. A node
    without weights (activation × activation MatMul) counts as quantized when every input is
    dequantized, which cannot tell it apart from a float one between quantized neighbours; callers
    that excluded such a node know better (see :meth:`Int8Quantizer.quantize`).
    """
    before = {node.name: node for node in original.graph.node}
    weights = {init.name for init in original.graph.initializer}
    integer_inits = {init.name for init in quantized.graph.initializer if init.data_type != onnx.TensorProto.FLOAT}
    made_by = producers(quantized)
    after = {node.name: node for node in quantized.graph.node}

    def dequantized(tensor: str, *, of_weight: bool) -> bool:
        node = made_by.get(tensor)
        if node is None or node.op_type != "DequantizeLinear":
            return False
        return not of_weight or node.input[0] in integer_inits

    result = []
    for name in candidates:
        node, old = after.get(name), before.get(name)
        if node is None or old is None or node.op_type != old.op_type:
            result.append(name)
        elif any(i in weights for i in old.input):
            if any(dequantized(i, of_weight=True) for i in node.input if i):
                result.append(name)
        elif all(dequantized(i, of_weight=False) for i in node.input if i):
            result.append(name)
    return result


def with_unique_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose main-graph nodes all have distinct names.

    The quantizer selects nodes to keep in FP32 by name, and reports need names too; exporters
    often leave them empty or repeat them.
    """
    named = onnx.ModelProto()
    named.CopyFrom(model)
    taken: set[str] = set()
    for index, node in enumerate(named.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        while name in taken:
            name = f"{name}_{index}"
        node.name = name
        taken.add(name)
    return named


@dataclass(frozen=True)
class QuantizationPlan:
    """How a model will be quantized, with the reasons for every automatic choice."""

    mode: Literal["static", "dynamic"]
    format: Literal["qdq", "qoperator"]
    per_channel: bool
    activation_type: Literal["int8", "uint8"]
    weight_type: Literal["int8", "uint8"]
    calibration_method: Literal["minmax", "entropy", "percentile"]
    calibration_samples: int
    symmetric: bool = False
    """Zero points at 0 for activations and weights (TensorRT)."""
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for reports, e.g. ``static QOperator, per-channel, uint8 activations/int8 weights``."""
        channel = "per-channel" if self.per_channel else "per-tensor"
        form = "QDQ" if self.format == "qdq" else "QOperator"
        if self.mode == "dynamic":
            return f"dynamic {form}, {channel} {self.weight_type} weights"
        symmetric = ", symmetric" if self.symmetric else ""
        return (
            f"static {form}, {channel}, {self.activation_type} activations/{self.weight_type} weights{symmetric}, "
            f"{self.calibration_method} calibration"
        )


def plan_quantization(
    pass_type: str, model: onnx.ModelProto, options: QuantizeInt8Options, execution_provider: str, data: Dataset | None
) -> QuantizationPlan:
    """Resolve ``auto`` for ``model`` on ``execution_provider``; :class:`PassNotApplicable` when it cannot apply."""
    if is_quantized(model):
        raise PassNotApplicable(pass_type, "already quantized")
    ops = {node.op_type for node in model.graph.node}
    if not ops & QUANTIZABLE_OPS:
        raise PassNotApplicable(pass_type, "no Conv, MatMul or Gemm node to quantize")
    if data is not None and len(data) == 0:
        raise PassNotApplicable(pass_type, "the calibration data set is empty")
    notes: list[str] = []
    mode = _mode(
        pass_type,
        options,
        convolutional=bool(ops & CONVOLUTIONAL_OPS),
        execution_provider=execution_provider,
        data=data,
        notes=notes,
    )
    if mode == "dynamic":
        if options.format == "qdq":
            raise PassNotApplicable(
                pass_type, "dynamic quantization has no QDQ form in ONNX Runtime; use format qoperator or auto"
            )
        if options.activation_type == "int8":
            notes.append("activation_type int8 applies to static quantization; dynamic computes uint8 activations")
        return QuantizationPlan(
            mode="dynamic",
            format="qoperator",
            per_channel=options.per_channel,
            activation_type="uint8",
            weight_type=options.weight_type,
            calibration_method=options.calibration_method,
            calibration_samples=0,
            notes=tuple(notes),
        )
    assert data is not None  # _mode refuses static quantization without data
    activation_type, weight_type, symmetric = options.activation_type, options.weight_type, False
    if execution_provider in SYMMETRIC_INT8_PROVIDERS:
        if (activation_type, weight_type) != ("int8", "int8"):
            notes.append(f"{execution_provider} takes only symmetric signed INT8: using int8 activations and weights")
        activation_type, weight_type, symmetric = "int8", "int8", True
    if activation_type == "int8" and weight_type == "uint8":
        raise PassNotApplicable(pass_type, "ONNX Runtime has no kernels for int8 activations with uint8 weights")
    return QuantizationPlan(
        mode="static",
        format=_static_format(pass_type, options, execution_provider, activation_type, notes),
        per_channel=options.per_channel,
        activation_type=activation_type,
        weight_type=weight_type,
        calibration_method=options.calibration_method,
        calibration_samples=min(options.calibration_samples, len(data)),
        symmetric=symmetric,
        notes=tuple(notes),
    )


def _mode(
    pass_type: str,
    options: QuantizeInt8Options,
    *,
    convolutional: bool,
    execution_provider: str,
    data: Dataset | None,
    notes: list[str],
) -> Literal["static", "dynamic"]:
    mode: Literal["static", "dynamic"]
    if options.mode != "auto":
        mode = options.mode
    elif convolutional:
        if data is None:
            raise PassNotApplicable(pass_type, "static quantization needs calibration data (convolutional model)")
        mode = "static"
        notes.append("static quantization: convolutional model with calibration data")
    elif data is not None and execution_provider != CPU_EP:
        # Dynamic quantization computes activation ranges at run time with CPU contrib kernels;
        # accelerators run integer models as static QDQ graphs, so calibrate when we can.
        mode = "static"
        notes.append(f"static quantization: {execution_provider} runs calibrated QDQ graphs, not dynamic ones")
    else:
        mode = "dynamic"
        notes.append("dynamic quantization: no Conv (MatMul/Gemm model)")
    if mode == "static" and data is None:
        raise PassNotApplicable(pass_type, "static quantization needs calibration data")
    if mode == "dynamic" and execution_provider in QDQ_ONLY_PROVIDERS:
        raise PassNotApplicable(
            pass_type, f"{execution_provider} runs only static QDQ models, which need calibration data"
        )
    return mode


def _static_format(
    pass_type: str, options: QuantizeInt8Options, execution_provider: str, activation_type: str, notes: list[str]
) -> Literal["qdq", "qoperator"]:
    if options.format == "qoperator" and execution_provider in QDQ_ONLY_PROVIDERS:
        raise PassNotApplicable(pass_type, f"{execution_provider} runs only QDQ models, not QOperator ones")
    if options.format != "auto":
        return options.format
    if execution_provider != CPU_EP:
        # Accelerator EPs (TensorRT, OpenVINO, QNN, DirectML, CUDA) read QDQ pairs and fuse them
        # into their own integer kernels; QOperator ops are ONNX Runtime CPU kernels to them.
        notes.append(f"QDQ format: {execution_provider} fuses QDQ pairs into its own INT8 kernels")
        return "qdq"
    if activation_type == "uint8":
        # Measured on the CPU EP (ONNX Runtime 1.31, x86-64 AMD EPYC, one thread, a 6-Conv CNN at
        # 32×32, per-channel): uint8 activations with int8 weights run as fast in QOperator form as
        # in QDQ form (ONNX Runtime fuses the QDQ pairs into the same QLinearConv kernels at load
        # time: 0.24 ms either way, against 0.67 ms in FP32), and QOperator files are smaller (no
        # separate Q/DQ nodes: 3.76× vs 3.53× smaller than FP32 on a weight-dominated test CNN),
        # so QOperator. With uint8 weights, QDQ took 0.57 ms against QOperator's 0.24 ms.
        notes.append("QOperator format: as fast as QDQ on the CPU for uint8 activations, and a smaller file")
        return "qoperator"
    # int8 activations: QOperator's QLinearConv S8S8 kernel was 12× slower than QDQ's fused path
    # in the same measurement (3.1 ms vs 0.25 ms), and ONNX Runtime itself warns about it.
    notes.append("QDQ format: ONNX Runtime's CPU QOperator kernels are slow with int8 activations")
    return "qdq"


def calibration_batch_size(model: onnx.ModelProto, data: Dataset, pass_type: str) -> tuple[int, bool]:
    """Samples per calibration run, and whether the model fixes that number (its batch dimension).

    :data:`CALIBRATION_BATCH` when the batch dimension is dynamic.
    """
    missing = sorted(spec.name for spec in input_specs(model) if spec.name not in data.inputs)
    if missing:
        raise PassNotApplicable(pass_type, f"the calibration data has no array for model input(s) {', '.join(missing)}")
    fixed = {spec.shape[0] for spec in input_specs(model) if spec.shape and spec.shape[0] is not None}
    if len(fixed) > 1:
        raise PassNotApplicable(pass_type, f"model inputs disagree on their fixed batch sizes {sorted(fixed)}")
    if fixed:
        size = int(fixed.pop())
        if len(data) < size:
            raise PassNotApplicable(
                pass_type, f"the model's fixed batch size is {size} but only {len(data)} calibration samples were given"
            )
        return size, True
    return min(CALIBRATION_BATCH, len(data)), False


class DatasetCalibrationReader:
    """Feeds a :class:`Dataset` to ONNX Runtime's calibrator in batches.

    ONNX Runtime's ``CalibrationDataReader`` accepts any object with ``get_next`` (its
    ``__subclasshook__`` says so), so this class does not inherit the untyped base. With
    ``whole_batches`` (a model with a fixed batch dimension) a short last batch is left out, as
    the model would reject it.
    """

    def __init__(self, data: Dataset, batch_size: int, *, whole_batches: bool = False) -> None:
        self._data = data
        self._batch_size = batch_size
        self._count = len(data) // batch_size if whole_batches else -(-len(data) // batch_size)
        self._batches = self._iterate()

    @property
    def samples(self) -> int:
        """How many samples the batches hold."""
        return min(len(self._data), self._count * self._batch_size)

    def _iterate(self) -> Iterator[dict[str, Array]]:
        for index, batch in enumerate(self._data.batches(self._batch_size)):
            if index >= self._count:
                return
            yield dict(batch)

    def get_next(self) -> dict[str, Array] | None:
        """The next batch's input feed, or ``None`` when the data is exhausted."""
        return next(self._batches, None)

    def __len__(self) -> int:
        return self._count


class _LogCapture(logging.Handler):
    """Collects a library logger's records so they become notes instead of tracebacks on stderr."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _captured(logger_name: str) -> Iterator[_LogCapture]:
    target = logging.getLogger(logger_name)
    capture = _LogCapture()
    propagate = target.propagate
    target.addHandler(capture)
    target.propagate = False
    try:
        yield capture
    finally:
        target.removeHandler(capture)
        target.propagate = propagate


@dataclass
class PreparedModel:
    """A model ready for ONNX Runtime's quantizer, and what pre-processing did or had to skip."""

    path: Path
    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)


def prepare_for_quantization(model: onnx.ModelProto, workdir: Path) -> PreparedModel:
    """Name the nodes and run ``quant_pre_process``, degrading step by step when it fails.

    Full pre-processing (symbolic shape inference, ONNX Runtime's basic optimizations such as
    Conv+BatchNormalization folding, ONNX shape inference) quantizes best. Symbolic shape inference
    fails on dynamic dimensions and ops it does not know, so it is dropped first; if pre-processing
    still fails the model is quantized as it is. The notes say what was skipped.
    """
    named = with_unique_node_names(model)
    source = workdir / "source.onnx"
    save_for_tools(named, source)
    notes: list[str] = []
    attempts: list[tuple[str, bool]] = [("with symbolic shape inference", False), ("without it", True)]
    for label, skip_symbolic in attempts:
        target = workdir / f"preprocessed-{'nosym' if skip_symbolic else 'full'}.onnx"
        with _captured("onnxruntime.quantization.shape_inference") as log:
            try:
                quant_pre_process(
                    str(source),
                    str(target),
                    skip_symbolic_shape=skip_symbolic,
                    save_as_external_data=named.ByteSize() > EXTERNAL_DATA_BYTES,
                )
            # Symbolic shape inference reports failure with a bare ``Exception`` and asserts, and
            # sympy raises its own errors: every failure here means "cannot pre-process this way",
            # and the next, more modest attempt follows.
            except Exception as exc:  # noqa: BLE001
                notes.append(f"quantization pre-processing {label} failed ({type(exc).__name__}: {_first_line(exc)})")
                continue
        for record in log.records:
            _logger.debug("quant_pre_process: %s", record.getMessage())
        if any(record.levelno >= logging.ERROR for record in log.records):
            # quant_pre_process logs, rather than raises, when ONNX Runtime cannot optimize the graph.
            notes.append("ONNX Runtime's pre-quantization graph optimization failed; quantized the unoptimized graph")
        if skip_symbolic:
            notes.append("skipped symbolic shape inference (it cannot follow this model); used ONNX shape inference")
        return PreparedModel(target, onnx.load(str(target)), notes)
    notes.append("skipped quantization pre-processing entirely: quantized the graph as it is")
    return PreparedModel(source, named, notes)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no message"


@dataclass(frozen=True)
class QuantizedModel:
    """One quantization of a prepared model."""

    model: onnx.ModelProto
    quantized: tuple[str, ...]
    """Names of the prepared model's Conv/MatMul/Gemm nodes that became INT8."""
    excluded: frozenset[str]
    """Nodes that were asked to stay in FP32."""


class Int8Quantizer:
    """Quantizes one model any number of times, with different nodes kept in FP32, calibrating once.

    Pre-processing runs once when the quantizer opens; static calibration runs on the first
    :meth:`quantize` and its tensor ranges are cached (ONNX Runtime's calibration cache) for the
    rest, so a sensitivity analysis costs one calibration however many variants it builds.
    Use as a context manager: it owns a temporary folder.
    """

    def __init__(self, pass_type: str, model: onnx.ModelProto, plan: QuantizationPlan, data: Dataset | None) -> None:
        self.pass_type = pass_type
        self.plan = plan
        self._tmp = tempfile.TemporaryDirectory(prefix="edgefleet-quant-")
        self._workdir = Path(self._tmp.name)
        try:
            self.prepared = prepare_for_quantization(model, self._workdir)
            self.candidates: list[str] = quantizable_nodes(self.prepared.model)
            self._data: Dataset | None = None
            self._batch_size, self._whole_batches = 0, False
            if plan.mode == "static":
                if data is None:
                    raise PassNotApplicable(pass_type, "static quantization needs calibration data")
                self._data = data.take(plan.calibration_samples)
                self._batch_size, self._whole_batches = calibration_batch_size(
                    self.prepared.model, self._data, pass_type
                )
        except BaseException:
            self._tmp.cleanup()
            raise
        self._cache = self._workdir / "calibration.json"
        self._runs = 0

    def _reader(self) -> DatasetCalibrationReader:
        assert self._data is not None
        return DatasetCalibrationReader(self._data, self._batch_size, whole_batches=self._whole_batches)

    @property
    def calibration_samples(self) -> int:
        """Samples the calibration uses; 0 for dynamic quantization."""
        return 0 if self._data is None else self._reader().samples

    def quantize(self, exclude: Collection[str] = ()) -> QuantizedModel:
        """The model with every quantizable node in INT8 except ``exclude``.

        Raises :class:`PassNotApplicable` when ONNX Runtime's quantizer cannot handle the model.
        """
        self._runs += 1
        output = self._workdir / f"quantized-{self._runs}.onnx"
        large = self.prepared.model.ByteSize() > EXTERNAL_DATA_BYTES
        plan = self.plan
        try:
            if plan.mode == "static":
                extra = {"ActivationSymmetric": True, "WeightSymmetric": True} if plan.symmetric else {}
                quantize_static(
                    str(self.prepared.path),
                    str(output),
                    self._reader(),
                    quant_format=QuantFormat.QDQ if plan.format == "qdq" else QuantFormat.QOperator,
                    per_channel=plan.per_channel,
                    activation_type=_QUANT_TYPES[plan.activation_type],
                    weight_type=_QUANT_TYPES[plan.weight_type],
                    nodes_to_exclude=sorted(exclude),
                    calibrate_method=_CALIBRATION_METHODS[plan.calibration_method],
                    calibration_cache_path=str(self._cache),
                    use_external_data_format=large,
                    extra_options=extra,
                )
            else:
                quantize_dynamic(
                    str(self.prepared.path),
                    str(output),
                    per_channel=plan.per_channel,
                    weight_type=_QUANT_TYPES[plan.weight_type],
                    nodes_to_exclude=sorted(exclude),
                    use_external_data_format=large,
                )
            result = onnx.load(str(output))
        except QUANTIZER_FAILURES as exc:
            contrib = sorted({n.op_type for n in self.prepared.model.graph.node if n.domain == CONTRIB_DOMAIN})
            hint = (
                f"; the graph holds ONNX Runtime contrib ops ({', '.join(contrib)}): quantize first" if contrib else ""
            )
            raise PassNotApplicable(
                self.pass_type,
                f"ONNX Runtime's quantizer cannot handle this model ({type(exc).__name__}: {_first_line(exc)}){hint}",
            ) from exc
        done = [n for n in quantized_nodes(self.candidates, self.prepared.model, result) if n not in exclude]
        return QuantizedModel(result, tuple(done), frozenset(exclude))

    def close(self) -> None:
        """Remove the temporary folder."""
        self._tmp.cleanup()

    def __enter__(self) -> Int8Quantizer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def check_loads_on_cpu(pass_type: str, model: onnx.ModelProto) -> None:
    """Raise :class:`PassNotApplicable` unless ONNX Runtime's CPU EP can load ``model``.

    Every EP falls back to the CPU for the nodes it does not take, so a variant the CPU cannot
    load is useless everywhere; this also catches type combinations without kernels.
    """
    try:
        session(model)
    except ModelError as exc:
        raise PassNotApplicable(pass_type, f"the quantized model does not load: {exc.problem}") from exc


class QuantizeInt8Pass(OptimizationPass[QuantizeInt8Options]):
    """INT8 post-training quantization: static with calibration for CNNs, dynamic for MatMul models.

    The choices ``auto`` makes (mode, QDQ or QOperator) depend on the model, the data and the
    target EP and are listed in the result's notes; see :func:`plan_quantization` for why.
    """

    pass_type: ClassVar[str] = "QuantizeInt8"
    options_type: ClassVar[type[QuantizeInt8Options]] = QuantizeInt8Options
    capability: ClassVar[PassCapability] = PassCapability(
        summary=(
            "INT8 post-training quantization with ONNX Runtime: static with calibration for convolutional "
            "models, dynamic for MatMul/Gemm models; QDQ for accelerator EPs, QOperator or QDQ on the CPU"
        ),
        execution_providers=None,
        precision="int8",
        needs_data=False,
        exact=False,
    )

    def apply(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        """Quantize a copy of ``model`` for ``ctx.execution_provider``, calibrating on ``ctx.data``."""
        if is_quantized(model):
            raise PassNotApplicable(self.pass_type, "already quantized")
        model, unfused = unfuse_cpu_fusions(model)
        plan = plan_quantization(self.pass_type, model, self.options, ctx.execution_provider, ctx.data)
        with Int8Quantizer(self.pass_type, model, plan, ctx.data) as quantizer:
            outcome = quantizer.quantize()
            notes = [*unfused, *plan.notes, *quantizer.prepared.notes]
            samples = quantizer.calibration_samples
            candidates = len(quantizer.candidates)
        if not outcome.quantized:
            raise PassNotApplicable(
                self.pass_type, "ONNX Runtime's quantizer quantized none of the Conv/MatMul/Gemm nodes"
            )
        check_loads_on_cpu(self.pass_type, outcome.model)
        calibration = f" on {samples} calibration samples" if plan.mode == "static" else ""
        notes.append(
            f"quantized {len(outcome.quantized)} of {candidates} Conv/MatMul/Gemm nodes "
            f"({plan.describe()}){calibration}"
        )
        ctx.logger.info("QuantizeInt8: %s", notes[-1])
        metrics = {
            "nodes_quantized": float(len(outcome.quantized)),
            "nodes_quantizable": float(candidates),
            "calibration_samples": float(samples),
            "bytes_before": float(len(serialize(model))),
            "bytes_after": float(len(serialize(outcome.model))),
        }
        return PassResult(outcome.model, notes, metrics)
