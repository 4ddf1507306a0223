"""Loading ONNX models safely and writing outputs atomically.

A model file is untrusted input: it may not be ONNX at all, be truncated, point its external data
outside its own folder, or use an opset older than our passes understand. Everything is checked
before a pass sees the model, and every refusal names the problem.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

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


def _check_external_data(model: onnx.ModelProto, base: Path, source: str) -> None:
    # Every external tensor must live in a regular file inside the model's folder, and its
    # declared range must lie inside that file, before anything is read.
    base = base.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        candidate = Path(location)
        if not location or candidate.is_absolute() or ".." in candidate.parts:
            raise ModelError(
                source, f"external data of tensor {tensor.name!r} points outside the model's folder: {location!r}"
            )
        target = base / candidate
        if target.is_symlink():
            raise ModelError(source, f"external data of tensor {tensor.name!r} is a symbolic link: {location!r}")
        try:
            stat = target.stat()
        except OSError:
            raise ModelError(source, f"external data file of tensor {tensor.name!r} is missing: {location!r}") from None
        if not target.resolve().is_relative_to(base) or not target.is_file():
            raise ModelError(source, f"external data of tensor {tensor.name!r} is not a file in the model's folder")
        if stat.st_nlink > 1:
            raise ModelError(source, f"external data of tensor {tensor.name!r} is a hard link: {location!r}")
        offset = int(info.get("offset", "0") or 0)
        length = int(info.get("length", "0") or 0)
        if offset < 0 or length < 0 or offset + length > stat.st_size:
            raise ModelError(
                source,
                f"external data of tensor {tensor.name!r} declares bytes {offset}..{offset + length} beyond its file",
            )


def parse_model(data: bytes, source: str, base_dir: Path | None = None) -> onnx.ModelProto:
    """A checked model from serialized bytes (external data resolved against ``base_dir``)."""
    if not data:
        raise ModelError(source, "file is empty")
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelError(source, f"not an ONNX model (cannot parse protobuf: {exc})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise ModelError(source, "not an ONNX model (no graph or an empty graph)")
    if any(external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model)):
        if base_dir is None:
            raise ModelError(source, "model uses external data but has no folder to read it from")
        _check_external_data(model, base_dir, source)
        external_data_helper.load_external_data_for_model(model, str(base_dir))
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


def load_model(path: Path) -> LoadedModel:
    """Read, check and normalise a model file; raises :class:`ModelError` naming the problem."""
    source = str(path)
    try:
        if not path.is_file():
            raise ModelError(source, "no such file")
        size = path.stat().st_size
        if size > MAX_MODEL_BYTES:
            raise ModelError(source, f"file is {size} bytes, over the {MAX_MODEL_BYTES}-byte protobuf limit")
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(source, f"cannot read: {exc.strerror or exc}") from None
    model = parse_model(data, source, path.parent)
    notes: list[str] = []
    model = fit_ir_version(upgrade_opset(model, source, notes), source, notes)
    return LoadedModel(model=model, digest=sha256_hex(data), path=path, notes=notes)


def serialize(model: onnx.ModelProto) -> bytes:
    """Deterministic bytes of a model, for files and digests alike."""
    return model.SerializeToString(deterministic=True)
