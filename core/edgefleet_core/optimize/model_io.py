"""Loading ONNX models safely and writing outputs atomically.

A model file is untrusted input: it may not be ONNX at all, be truncated, point its external data
outside its own folder, or use an opset older than our passes understand. Everything is checked
before a pass sees the model, and every refusal names the problem.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Final

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, version_converter

from edgefleet_core.atomic import write_dir_atomic, write_file_atomic
from edgefleet_core.errors import ModelError

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "load_model", "parse_model", "serialize", "write_dir_atomic", "write_file_atomic"]

MAX_MODEL_BYTES = 2 * 1024**3 - 1
"""Protobuf cannot hold more in one message; larger models must use external data."""
MIN_OPSET = 9
"""The oldest ai.onnx opset we accept (older ones lack ops the converter can map)."""
TARGET_OPSET = 17
"""Models older than this are upgraded to it: ONNX Runtime's quantizer and our passes know it well."""
RUNTIME_MAX_IR_VERSION = 13
"""Newest IR version ONNX Runtime (1.31) reads; onnx 1.23 stamps 14 on models it makes."""


@dataclass(frozen=True)
class LoadedModel:
    """A model that passed every check, with its digest and what loading changed."""

    model: onnx.ModelProto
    digest: str
    """Hex sha256 of the model file's bytes (what an EdgeModel's ``source.sha256`` pins)."""
    path: Path
    notes: list[str] = field(default_factory=list)
    """What loading did to the model, e.g. an opset upgrade."""

    @property
    def content_digest(self) -> str:
        """Digest of the loaded model, external data included: what variant ids are built on."""
        return model_digest(self.model)


def sha256_hex(data: bytes) -> str:
    """Full lowercase hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def model_digest(model: onnx.ModelProto) -> str:
    """Content digest of an in-memory model (deterministic serialization)."""
    return sha256_hex(model.SerializeToString(deterministic=True))


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version (0 when it declares none)."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


# ----------------------------------------------------------------------------- tensor sizes

_BIT_WIDTHS: Final = (
    ("FLOAT", 32), ("UINT8", 8), ("INT8", 8), ("UINT16", 16), ("INT16", 16), ("INT32", 32), ("INT64", 64),
    ("BOOL", 8), ("FLOAT16", 16), ("DOUBLE", 64), ("UINT32", 32), ("UINT64", 64), ("COMPLEX64", 64),
    ("COMPLEX128", 128), ("BFLOAT16", 16), ("FLOAT8E4M3FN", 8), ("FLOAT8E4M3FNUZ", 8), ("FLOAT8E5M2", 8),
    ("FLOAT8E5M2FNUZ", 8), ("FLOAT8E8M0", 8), ("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2),
    ("INT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6),
)  # fmt: skip
_BITS: Final[dict[int, int]] = {
    getattr(onnx.TensorProto, name): bits for name, bits in _BIT_WIDTHS if hasattr(onnx.TensorProto, name)
}
"""Bits per element of every fixed-size element type (STRING has none: it is checked by count)."""
_TYPED_FIELDS: Final[dict[int, tuple[str, int]]] = {
    **{t: ("int32_data", 1) for t, bits in _BITS.items() if bits <= 16},
    onnx.TensorProto.INT32: ("int32_data", 1),
    onnx.TensorProto.INT64: ("int64_data", 1),
    onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1),
    onnx.TensorProto.FLOAT: ("float_data", 1),
    onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1),
    onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.STRING: ("string_data", 1),
}
"""Where a tensor without raw data keeps its values, and how many values one element takes."""
_COUNT_CAP: Final = 1 << 64
"""Element counts are computed up to this and no further: far beyond any file, and cheap to reach."""


def _element_count(label: str, dims: Sequence[int], source: str) -> int:
    """The product of ``dims`` (capped at :data:`_COUNT_CAP`); negative dims are refused."""
    count = 1
    for dim in dims:
        if dim < 0:
            raise ModelError(source, f"{label} has a negative dimension in dims {_dims_text(dims)}")
        count = min(count * dim, _COUNT_CAP)
    return count


def _dims_text(dims: Sequence[int]) -> str:
    shown = ", ".join(str(d) for d in dims[:8])
    return f"[{shown}{', ...' if len(dims) > 8 else ''}]"


def _byte_range(count: int, bits: int) -> tuple[int, int]:
    """Acceptable byte lengths of ``count`` elements: exact, or for sub-byte types packed to one per byte."""
    packed = (count * bits + 7) // 8
    return (packed, max(packed, count)) if bits < 8 else (packed, packed)


def _check_size(label: str, tensor: onnx.TensorProto, source: str, external_bytes: int | None = None) -> None:
    """Refuse a tensor whose dims do not match the data it holds (or its external data declares).

    Before anything reads or converts it: a tensor with dims [2**40] and four bytes of data would
    otherwise make a later step (NumPy, ONNX Runtime) try to allocate what its dims say.
    """
    count = _element_count(label, tensor.dims, source)
    bits = _BITS.get(tensor.data_type)
    if external_bytes is not None or tensor.HasField("raw_data"):
        if bits is None:
            raise ModelError(source, f"{label} has raw or external data but element type {tensor.data_type} "
                             "has no fixed size")  # fmt: skip
        have = external_bytes if external_bytes is not None else len(tensor.raw_data)
        low, high = _byte_range(count, bits)
        if not low <= have <= high:
            raise ModelError(source, f"{label} has dims {_dims_text(tensor.dims)} ({_need(count, bits)}) "
                             f"but {have} bytes of data")  # fmt: skip
        return
    typed = _TYPED_FIELDS.get(tensor.data_type)
    if typed is None:
        return  # an unknown element type: the checker refuses it
    name, per_element = typed
    have = len(getattr(tensor, name))
    low, high = (count * per_element, count * per_element)
    if bits is not None and bits < 8:
        low, high = _byte_range(count, bits)
    if not low <= have <= high:
        elements = str(count) if count < _COUNT_CAP else "over 2**64"
        raise ModelError(source, f"{label} has dims {_dims_text(tensor.dims)} ({elements} elements) "
                         f"but {have} values in {name}")  # fmt: skip


def _need(count: int, bits: int) -> str:
    if count >= _COUNT_CAP:
        return "over 2**64 elements"
    return f"{(count * bits + 7) // 8} bytes"


# ----------------------------------------------------------------------------- every tensor of a model


def _tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto | onnx.SparseTensorProto]]:
    """Every tensor a model holds, with a label naming it: initializers, sparse ones, node attributes, subgraphs."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node, f"function {function.name!r}")


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, onnx.TensorProto | onnx.SparseTensorProto]]:
    for tensor in graph.initializer:
        yield f"tensor {tensor.name!r}", tensor
    for sparse in graph.sparse_initializer:
        yield f"sparse tensor {sparse.values.name!r}", sparse
    yield from _node_tensors(graph.node, f"graph {graph.name!r}")


def _node_tensors(
    nodes: Iterable[onnx.NodeProto], where: str
) -> Iterator[tuple[str, onnx.TensorProto | onnx.SparseTensorProto]]:
    for node in nodes:
        for attribute in node.attribute:
            label = f"tensor {attribute.name!r} of node {node.name or node.op_type!r} in {where}"
            if attribute.HasField("t"):
                yield label, attribute.t
            for tensor in attribute.tensors:
                yield label, tensor
            if attribute.HasField("sparse_tensor"):
                yield label, attribute.sparse_tensor
            for sparse in attribute.sparse_tensors:
                yield label, sparse
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for graph in attribute.graphs:
                yield from _graph_tensors(graph)


def _check_sparse(label: str, sparse: onnx.SparseTensorProto, source: str) -> None:
    dense = _element_count(label, sparse.dims, source)
    bits = _BITS.get(sparse.values.data_type, 8)
    if dense * bits // 8 > MAX_MODEL_BYTES:
        raise ModelError(source, f"{label} has dense dims {_dims_text(sparse.dims)} ({_need(dense, bits)}): "
                         f"ONNX Runtime makes it dense, and over {MAX_MODEL_BYTES} bytes is refused")  # fmt: skip


# ----------------------------------------------------------------------------- external data


def _external_field(label: str, info: dict[str, str], key: str, source: str) -> int | None:
    value = info.get(key)
    if value is None or value == "":
        return None
    if not (value.isascii() and value.isdecimal()) or len(value) > 20:
        raise ModelError(source, f"external data of {label} has {key} {value[:40]!r}, not a non-negative integer")
    return int(value)


def _open_external(label: str, location: str, base_fd: int, source: str) -> int:
    """A read-only descriptor of ``location`` under the model's folder; refused unless a plain regular file.

    Walks the path one component at a time with ``O_NOFOLLOW``: no component may be a symbolic link
    (one inside the folder today may point elsewhere tomorrow). The file is looked at (``lstat``)
    before it is opened, so a FIFO or a device is never opened: opening a FIFO would block.
    """
    parts = [part for part in PurePosixPath(location).parts if part != "."]
    if not parts or "\x00" in location or PurePosixPath(location).is_absolute() or ".." in parts:
        raise ModelError(source, f"external data of {label} points outside the model's folder: {location!r}")
    opened: list[int] = []
    try:
        folder = base_fd
        for part in parts[:-1]:
            folder = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
            opened.append(folder)
        found = os.stat(parts[-1], dir_fd=folder, follow_symlinks=False)
        if stat.S_ISLNK(found.st_mode):
            raise ModelError(source, f"external data of {label} is a symbolic link: {location!r}")
        if not stat.S_ISREG(found.st_mode):
            raise ModelError(source, f"external data of {label} is not a regular file: {location!r}")
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) or (exc.errno == errno.ENOENT and _is_link(parts, base_fd)):
            raise ModelError(source, f"external data of {label} goes through a symbolic link or a non-folder: "
                             f"{location!r}") from None  # fmt: skip
        if exc.errno == errno.ENOENT:
            raise ModelError(source, f"external data file of {label} is missing: {location!r}") from None
        raise ModelError(source, f"external data of {label} cannot be opened ({location!r}): {exc.strerror}") from None
    finally:
        for folder in opened:
            os.close(folder)
    return fd


def _is_link(parts: Sequence[str], base_fd: int) -> bool:
    """Whether the first component of a path that could not be walked is a symbolic link (for the message)."""
    try:
        return stat.S_ISLNK(os.stat(parts[0], dir_fd=base_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _read_external(label: str, tensor: onnx.TensorProto, base_fd: int, source: str, budget: int) -> int:
    """Check one external tensor and move its bytes into ``raw_data``; the bytes read."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    offset = _external_field(label, info, "offset", source) or 0
    length = _external_field(label, info, "length", source)
    fd = _open_external(label, location, base_fd, source)
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):  # replaced between the look and the open
            raise ModelError(source, f"external data of {label} is not a regular file: {location!r}")
        if found.st_nlink > 1:
            raise ModelError(source, f"external data of {label} is a hard link: {location!r}")
        end = found.st_size if length is None else offset + length
        if offset > found.st_size or end > found.st_size:
            raise ModelError(source, f"external data of {label} declares bytes {offset}..{end} beyond its file "
                             f"({found.st_size} bytes)")  # fmt: skip
        wanted = end - offset
        _check_size(label, tensor, source, external_bytes=wanted)
        if wanted > budget:
            raise ModelError(source, f"external data adds up to over {MAX_MODEL_BYTES} bytes at {label}")
        data = _pread_exactly(fd, wanted, offset)
    finally:
        os.close(fd)
    if len(data) != wanted:
        raise ModelError(source, f"external data of {label} changed while it was read: {location!r}")
    tensor.raw_data = data
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    return wanted


def _pread_exactly(fd: int, length: int, offset: int) -> bytes:
    pieces: list[bytes] = []
    done = 0
    while done < length:
        piece = os.pread(fd, min(length - done, 1 << 26), offset + done)
        if not piece:
            break  # shorter than it was a moment ago: the caller refuses it
        pieces.append(piece)
        done += len(piece)
    return b"".join(pieces)


def _check_tensors(model: onnx.ModelProto, source: str, base_dir: Path | None, model_bytes: int) -> None:
    """Every tensor's dims against its data, external data read in place; nothing allocated from dims."""
    external = []
    for label, tensor in _tensors(model):
        if isinstance(tensor, onnx.SparseTensorProto):
            _check_sparse(label, tensor, source)
            for part, inner in (("values", tensor.values), ("indices", tensor.indices)):
                if external_data_helper.uses_external_data(inner):
                    external.append((f"{label} ({part})", inner))
                else:
                    _check_size(f"{label} ({part})", inner, source)
        elif external_data_helper.uses_external_data(tensor):
            external.append((label, tensor))
        else:
            _check_size(label, tensor, source)
    if not external:
        return
    if base_dir is None:
        raise ModelError(source, "model uses external data but has no folder to read it from")
    budget = MAX_MODEL_BYTES - model_bytes
    try:
        base_fd = os.open(base_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ModelError(source, f"cannot open the model's folder for its external data: {exc.strerror}") from None
    try:
        for label, tensor in external:
            budget -= _read_external(label, tensor, base_fd, source, budget)
    finally:
        os.close(base_fd)


def parse_model(data: bytes, source: str, base_dir: Path | None = None) -> onnx.ModelProto:
    """A checked model from serialized bytes (external data resolved against ``base_dir``).

    Every tensor's dims are checked against the data it holds before anything converts it, and
    external data is read here (only regular files inside ``base_dir``, never through a link), so
    a hostile file is refused with the tensor and the problem named, before any allocation its
    dims ask for.
    """
    if not data:
        raise ModelError(source, "file is empty")
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelError(source, f"not an ONNX model (cannot parse protobuf: {exc})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise ModelError(source, "not an ONNX model (no graph or an empty graph)")
    _check_tensors(model, source, base_dir, len(data))
    if any(external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model)):
        raise ModelError(source, "model has external data in a place this loader does not read")  # defensive
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:  # ValueError: over 2 GiB in memory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise ModelError(source, f"invalid ONNX model: {first}") from None
    return model


def upgrade_opset(model: onnx.ModelProto, source: str, notes: list[str]) -> onnx.ModelProto:
    """The model at :data:`TARGET_OPSET` when it is older; unchanged (with a note) if conversion fails."""
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise ModelError(source, f"opset {opset} is older than the oldest supported, {MIN_OPSET}")
    if opset >= TARGET_OPSET:
        return model
    try:
        upgraded = version_converter.convert_version(model, TARGET_OPSET)
        onnx.checker.check_model(upgraded)
    except (RuntimeError, ValueError, onnx.checker.ValidationError, IndexError, version_converter.ConvertError) as exc:
        notes.append(f"kept opset {opset}: upgrading to {TARGET_OPSET} failed ({type(exc).__name__})")
        logger.info("%s: opset upgrade failed: %s", source, exc)
        return model
    notes.append(f"upgraded opset {opset} to {TARGET_OPSET}")
    return upgraded


def fit_ir_version(model: onnx.ModelProto, source: str, notes: list[str]) -> onnx.ModelProto:
    """The model with an IR version ONNX Runtime reads, when only the version stamp stands in the way.

    Exporters stamp the newest IR version their onnx library knows even when the model uses
    nothing newer than its opsets need; lowering the stamp to what the opsets require (checked
    again afterwards) lets ONNX Runtime load it.
    """
    if model.ir_version <= RUNTIME_MAX_IR_VERSION:
        return model
    needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if needed > RUNTIME_MAX_IR_VERSION:
        raise ModelError(source, f"IR version {model.ir_version} with opsets that need IR {needed}; "
                         f"ONNX Runtime reads up to {RUNTIME_MAX_IR_VERSION}")  # fmt: skip
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    lowered.ir_version = max(needed, 7)
    try:
        onnx.checker.check_model(lowered)
    except onnx.checker.ValidationError as exc:
        raise ModelError(source, f"IR version {model.ir_version} is newer than ONNX Runtime reads "
                         f"({RUNTIME_MAX_IR_VERSION}) and the model uses newer features: {exc}") from None  # fmt: skip
    notes.append(f"lowered IR version {model.ir_version} to {lowered.ir_version} (what its opsets need)")
    return lowered


def _read_model_file(path: Path, source: str) -> bytes:
    """The bytes of a regular model file; a FIFO or a device is refused without blocking on it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ModelError(source, "no such file") from None
    except OSError as exc:
        raise ModelError(source, f"cannot read: {exc.strerror or exc}") from None
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise ModelError(source, "no such file (not a regular file)")
        if found.st_size > MAX_MODEL_BYTES:
            raise ModelError(source, f"file is {found.st_size} bytes, over the {MAX_MODEL_BYTES}-byte protobuf limit")
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(found.st_size + 1)  # read(n) reserves n bytes: the size it has, not the cap
    except OSError as exc:
        raise ModelError(source, f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_MODEL_BYTES:
        raise ModelError(source, f"file grew over the {MAX_MODEL_BYTES}-byte protobuf limit while read")
    return data


def load_model(path: Path) -> LoadedModel:
    """Read, check and normalise a model file; raises :class:`ModelError` naming the problem."""
    source = str(path)
    data = _read_model_file(path, source)
    model = parse_model(data, source, path.parent)
    notes: list[str] = []
    model = fit_ir_version(upgrade_opset(model, source, notes), source, notes)
    return LoadedModel(model=model, digest=sha256_hex(data), path=path, notes=notes)


def serialize(model: onnx.ModelProto) -> bytes:
    """Deterministic bytes of a model, for files and digests alike."""
    return model.SerializeToString(deterministic=True)
