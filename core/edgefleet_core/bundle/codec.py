"""Transport encoding of ONNX model files: weights as codebooks + Huffman-coded indices, byte-identical.

Codec ``edgefleet-tensors-v1`` splits a model into its *skeleton* (the ModelProto with the payload
of every top-level initializer taken out, zstd-compressed) and one record per initializer, each
stored the smallest of these ways (Deep Compression's weight sharing + Huffman coding, with zstd
and raw as the fall-backs that make sure we never lose):

* ``clustered``: at most 256 distinct values — a codebook of the distinct bit patterns (float32
  values for float32 weights; the zero of a pruned tensor is just another entry) and the indices,
  canonical-Huffman-coded (``huffman.py``, ours on purpose) or fixed-width packed, whichever is
  smaller;
* ``clustered-per-channel``: one codebook per slice of an axis, when the model's
  ``edgefleet.clustering.per_channel`` hint names the axis (the hint is recounted, never trusted);
* ``symbols``: 8-bit tensors (INT8/UINT8 quantized weights) Huffman-coded as they are;
* ``zstd`` of the tensor's bytes, or ``raw``.

Records keep exact bit patterns, so decoding restores every tensor byte for byte and re-serializes
the model; :func:`encode_model` proves that by decoding its own output, and falls back to zstd of
the whole file (codec ``zstd``) whenever the model cannot be rebuilt exactly (non-canonical
serialization, unknown fields, external data, not ONNX at all).

Payload layout (all integers little-endian)::

    magic "EFT1" | u8 format version (1) | u8 flags (bit 0: delta) | u16 zero
    u64 decoded length | 32 bytes sha256 of the decoded base file (zeros unless delta)
    u8 skeleton kind (0: zstd, 1: same as base skeleton, 2: zstd against the base skeleton) | blob
    u32 record count, then per record:
        u32 initializer index | u8 field (0 raw_data, 1 float_data) | u8 item size (1, 2, 4, 8)
        u64 element count | u8 tensor codec | codec body (see ``_read_body``)

A ``blob`` is a u64 length and that many bytes. :func:`decode_model` is the security boundary: it
bounds the skeleton and every tensor by the decoded length the signed manifest pins *before*
allocating, and ends with the sha256 and length check against that manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

import numpy as np
import numpy.typing as npt
import onnx
from google.protobuf.message import DecodeError

from edgefleet_core.bundle import huffman
from edgefleet_core.bundle._wire import Reader, Writer, zstd_compress, zstd_decompress
from edgefleet_core.errors import BundleError, BundleVerificationError

log = logging.getLogger(__name__)

TENSORS_CODEC: Final = "edgefleet-tensors-v1"
ZSTD_CODEC: Final = "zstd"
RAW_CODEC: Final = "raw"
CODECS: Final = (TENSORS_CODEC, ZSTD_CODEC, RAW_CODEC)

MAGIC: Final = b"EFT1"
FORMAT_VERSION: Final = 1
MAX_CODEBOOK: Final = 256
"""At most 2**8 distinct values per codebook: indices of at most 8 bits, as Deep Compression's conv layers."""
CLUSTERING_HINT: Final = "edgefleet.clustering"
PER_CHANNEL_HINT: Final = "edgefleet.clustering.per_channel"
_FLAG_DELTA: Final = 1
_ZERO_SHA: Final = bytes(32)

# Bytes per element of each ONNX type whose raw_data we may cluster; anything else is opaque bytes.
_ITEM_SIZE: Final[Mapping[int, int]] = {
    onnx.TensorProto.FLOAT: 4,
    onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.BFLOAT16: 2,
    onnx.TensorProto.DOUBLE: 8,
    onnx.TensorProto.INT8: 1,
    onnx.TensorProto.UINT8: 1,
    onnx.TensorProto.INT16: 2,
    onnx.TensorProto.UINT16: 2,
    onnx.TensorProto.INT32: 4,
    onnx.TensorProto.UINT32: 4,
    onnx.TensorProto.INT64: 8,
    onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BOOL: 1,
}
_UINT_OF_SIZE: Final[Mapping[int, type[np.unsignedinteger]]] = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class TensorField(IntEnum):
    """Which field of a TensorProto holds the payload."""

    RAW_DATA = 0
    FLOAT_DATA = 1


class TensorCodec(IntEnum):
    """How one tensor record is stored."""

    RAW = 0
    ZSTD = 1
    CLUSTERED = 2
    CLUSTERED_PER_CHANNEL = 3
    SYMBOLS = 4
    BASE = 5
    """Delta: the same bytes as a tensor of the base model (by index, checked by sha256)."""
    CLUSTERED_SPARSE = 6
    """Pruned and clustered: (zero run, value index) pairs Huffman-coded, JPEG/Deep-Compression style."""
    ZSTD_SHUFFLE = 7
    """zstd of the bytes regrouped by byte position (Blosc's shuffle): float exponents compress together."""


SPARSE_RUN = 15
"""Longest zero run one sparse symbol carries; longer runs add escape symbols of this many zeros.

Huffman spends at least one bit per symbol, so coding a 90 %-zero tensor element by element costs
over a bit per weight although its entropy is under one; joining each non-zero with the run of
zeros before it lets the code approach the entropy of the sparse tensor."""


class IndexCoding(IntEnum):
    HUFFMAN = 0
    FIXED = 1
    ZSTD = 2
    """zstd of the indices as bytes (LZ77 finds repeats Huffman's per-symbol code cannot)."""


class SkeletonKind(IntEnum):
    ZSTD = 0
    SAME_AS_BASE = 1
    ZSTD_AGAINST_BASE = 2


@dataclass(frozen=True)
class TensorStats:
    """How one initializer was stored, and what every candidate would have cost."""

    name: str
    decoded_bytes: int
    codec: str
    """The winner: ``raw``, ``zstd``, ``clustered-huffman``, ``clustered-fixed``, ``symbols-huffman``, ``base`` …"""
    encoded_bytes: int
    candidates: Mapping[str, int]
    """Encoded size of every codec tried, the winner included (record body, codebooks included)."""
    distinct_values: int | None
    """Distinct bit patterns, recounted (``None`` when over :data:`MAX_CODEBOOK`)."""
    hinted_bits: int | None
    """Index bits the clustering pass recorded in the model's metadata, if any (informational only)."""


@dataclass(frozen=True)
class EncodedFile:
    """A model file encoded for transport, with what a manifest entry needs."""

    payload: bytes
    codec: str
    sha256: str
    """sha256 of the decoded file."""
    length: int
    """Length of the decoded file."""
    base_sha256: str | None = None
    """sha256 of the decoded base file a delta needs; ``None`` for self-contained payloads."""
    tensors: tuple[TensorStats, ...] = ()
    skeleton_bytes: int = 0
    """Encoded size of the skeleton (0 when the skeleton is referenced from the base)."""
    fallback_reason: str | None = None
    """Why the tensor codec was not used, when it was not."""

    @property
    def payload_sha256(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()


# --------------------------------------------------------------------------------------------------
# Model surgery shared by encoder and decoder


@dataclass
class _Split:
    """A model taken apart: its skeleton bytes and the payload of each extracted initializer."""

    skeleton: bytes
    tensors: list[tuple[int, onnx.TensorProto, TensorField, int, bytes]] = field(default_factory=list)
    """(initializer index, the initializer (in the parsed model), field, item size, element bytes)."""


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:  # upb reports some malformed input as RuntimeError
        raise BundleError(f"{what} is not an ONNX model: {exc}") from None
    return model


def _item_size(tensor: onnx.TensorProto, field_: TensorField, nbytes: int) -> int:
    if field_ is TensorField.FLOAT_DATA:
        return 4
    size = _ITEM_SIZE.get(tensor.data_type, 1)
    return size if nbytes % size == 0 else 1


def _split(model: onnx.ModelProto) -> _Split:
    """The skeleton and the extracted payloads; ``model`` itself is left untouched."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    split = _Split(skeleton=b"")
    for index, (tensor, hollow) in enumerate(zip(model.graph.initializer, skeleton.graph.initializer, strict=True)):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        if tensor.HasField("raw_data") and tensor.raw_data:
            payload, field_ = tensor.raw_data, TensorField.RAW_DATA
            hollow.ClearField("raw_data")
        elif len(tensor.float_data) > 0:
            payload, field_ = np.asarray(tensor.float_data, dtype=np.float32).tobytes(), TensorField.FLOAT_DATA
            hollow.ClearField("float_data")
        else:
            continue
        split.tensors.append((index, tensor, field_, _item_size(tensor, field_, len(payload)), payload))
    split.skeleton = skeleton.SerializeToString()
    return split


def _restore(tensor: onnx.TensorProto, field_: TensorField, payload: bytes) -> None:
    if field_ is TensorField.RAW_DATA:
        tensor.raw_data = payload
    else:
        tensor.float_data.extend(np.frombuffer(payload, dtype=np.float32).tolist())


# --------------------------------------------------------------------------------------------------
# Encoding


def _hints(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """The clustering pass's ``{tensor: bits}`` and ``{tensor: axis}`` hints; junk is ignored, not trusted."""
    props = {p.key: p.value for p in model.metadata_props}

    def int_map(key: str) -> dict[str, int]:
        try:
            loaded = json.loads(props.get(key, "{}"))
        except (ValueError, RecursionError):
            return {}
        if not isinstance(loaded, dict):
            return {}
        return {k: v for k, v in loaded.items() if isinstance(v, int) and not isinstance(v, bool)}

    return int_map(CLUSTERING_HINT), int_map(PER_CHANNEL_HINT)


def _index_streams(indices: npt.NDArray[np.integer], alphabet: int) -> dict[IndexCoding, bytes]:
    bits = max(1, math.ceil(math.log2(max(alphabet, 2))))
    width = np.uint8 if alphabet <= 256 else np.dtype("<u2")
    return {
        IndexCoding.HUFFMAN: huffman.encode(indices, alphabet),
        IndexCoding.FIXED: huffman.pack_fixed(indices, bits),
        IndexCoding.ZSTD: zstd_compress(np.ascontiguousarray(indices, dtype=width).tobytes()),
    }


def _body_clustered(codebook: npt.NDArray[np.generic], stream: bytes, coding: IndexCoding, bits: int) -> bytes:
    w = Writer()
    w.u16(codebook.size)
    w.raw(codebook.tobytes())
    w.u8(coding)
    w.u8(bits)
    w.blob(stream)
    return w.getvalue()


def _candidates(
    tensor: onnx.TensorProto, item_size: int, payload: bytes, axis: int | None
) -> tuple[dict[str, tuple[TensorCodec, bytes]], int | None]:
    """Every applicable record body by candidate name, and the tensor's distinct-value count."""
    out: dict[str, tuple[TensorCodec, bytes]] = {
        "raw": (TensorCodec.RAW, _blob(payload)),
        "zstd": (TensorCodec.ZSTD, _blob(zstd_compress(payload))),
    }
    values = np.frombuffer(payload, dtype=_UINT_OF_SIZE[item_size])
    if item_size > 1 and values.size:
        planes = np.frombuffer(payload, dtype=np.uint8).reshape(-1, item_size).T
        out["zstd-shuffle"] = (TensorCodec.ZSTD_SHUFFLE, _blob(zstd_compress(planes.tobytes())))
    if item_size == 1:
        out["symbols-huffman"] = (TensorCodec.SYMBOLS, _blob(huffman.encode(values, 256)))
    codebook, inverse = np.unique(values, return_inverse=True)
    distinct = int(codebook.size) if codebook.size <= MAX_CODEBOOK else None
    if distinct is not None:
        bits = max(1, math.ceil(math.log2(max(distinct, 2))))
        for coding, stream in _index_streams(inverse.ravel(), distinct).items():
            out[f"clustered-{coding.name.lower()}"] = (
                TensorCodec.CLUSTERED,
                _body_clustered(codebook, stream, coding, bits),
            )
    sparse = _sparse_body(values)
    if sparse is not None:
        out["clustered-sparse-huffman"] = (TensorCodec.CLUSTERED_SPARSE, sparse)
    dims = list(tensor.dims)
    if axis is not None and -len(dims) <= axis < len(dims) and math.prod(dims) == values.size and values.size:
        body = _per_channel(values, dims, axis % len(dims))
        if body is not None:
            for name, encoded in body.items():
                out[name] = (TensorCodec.CLUSTERED_PER_CHANNEL, encoded)
    return out, distinct


def _sparse_body(values: npt.NDArray[np.unsignedinteger]) -> bytes | None:
    """Run-length + Huffman body for mostly-zero tensors with a small codebook of non-zeros, else ``None``."""
    nonzero = np.flatnonzero(values)
    if values.size == 0 or nonzero.size * 2 > values.size:
        return None  # not sparse: the element-wise codings do as well
    book, which = np.unique(values[nonzero], return_inverse=True)
    if book.size > MAX_CODEBOOK or book.size == 0:
        return None
    runs = np.diff(np.concatenate(([-1], nonzero))) - 1
    escapes, rest = np.divmod(runs, SPARSE_RUN)
    escape_symbol = SPARSE_RUN * book.size
    # Each non-zero becomes its escapes (SPARSE_RUN zeros each) followed by one (run, value) symbol.
    symbols = np.repeat(np.full(nonzero.size, escape_symbol, dtype=np.int64), escapes + 1)
    ends = np.cumsum(escapes + 1) - 1
    symbols[ends] = rest * book.size + which.ravel()
    w = Writer()
    w.u16(book.size)
    w.raw(book.tobytes())
    w.u8(SPARSE_RUN)
    w.blob(huffman.encode(symbols, escape_symbol + 1))
    return w.getvalue()


def _read_sparse(r: Reader, count: int, uint: type[np.unsignedinteger]) -> bytes:
    size = r.u16("codebook size")
    if not 1 <= size <= MAX_CODEBOOK:
        raise BundleError(f"codebook of {size} entries")
    book = np.frombuffer(r.take(size * np.dtype(uint).itemsize, "codebook"), dtype=uint)
    run = r.u8("sparse run length")
    if run != SPARSE_RUN:
        raise BundleError(f"sparse run length {run}, this decoder knows {SPARSE_RUN}")
    escape = SPARSE_RUN * size
    # Every symbol advances at least one element, so there are never more symbols than elements.
    symbols = huffman.decode(r.blob("sparse stream"), max_symbols=count).astype(np.int64)
    if symbols.size and int(symbols.max()) > escape:
        raise BundleError(f"sparse symbol {int(symbols.max())} outside an alphabet of {escape + 1}")
    is_escape = symbols == escape
    advance = np.where(is_escape, SPARSE_RUN, symbols // size + 1)
    ends = np.cumsum(advance)
    if ends.size and int(ends[-1]) > count:
        raise BundleError(f"sparse stream covers {int(ends[-1])} elements, the record says {count}")
    out = np.zeros(count, dtype=uint)
    value_symbols = ~is_escape
    out[ends[value_symbols] - 1] = book[symbols[value_symbols] % size]
    return out.tobytes()


def _per_channel(values: npt.NDArray[np.unsignedinteger], dims: list[int], axis: int) -> dict[str, bytes] | None:
    outer, channels, inner = math.prod(dims[:axis]), dims[axis], math.prod(dims[axis + 1 :])
    blocks = values.reshape(outer, channels, inner)
    books: list[npt.NDArray[np.unsignedinteger]] = []
    local = np.empty(blocks.shape, dtype=np.uint16)
    for c in range(channels):
        book, inverse = np.unique(blocks[:, c, :], return_inverse=True)
        if book.size > MAX_CODEBOOK:
            return None
        books.append(book)
        local[:, c, :] = inverse.reshape(outer, inner)
    alphabet = max(b.size for b in books)
    bits = max(1, math.ceil(math.log2(max(alphabet, 2))))
    head = Writer()
    head.u64(outer)
    head.u64(channels)
    head.u64(inner)
    for book in books:
        head.u16(book.size)
    for book in books:
        head.raw(book.tobytes())
    out = {}
    for coding, stream in _index_streams(local.ravel(), alphabet).items():
        w = Writer()
        w.raw(head.getvalue())
        w.u8(coding)
        w.u8(bits)
        w.blob(stream)
        out[f"clustered-per-channel-{coding.name.lower()}"] = w.getvalue()
    return out


def _blob(data: bytes) -> bytes:
    w = Writer()
    w.blob(data)
    return w.getvalue()


@dataclass(frozen=True)
class _BaseModel:
    """What a delta encoder and decoder need from the base file."""

    sha256: bytes
    split: _Split
    by_index: Mapping[int, bytes]
    """Each extracted tensor's bytes by initializer index."""


def _base(data: bytes) -> _BaseModel:
    model = _parse(data, "base model")
    if model.SerializeToString() != data:
        raise BundleError("base model does not re-serialize to its own bytes; no delta against it")
    split = _split(model)
    return _BaseModel(
        sha256=hashlib.sha256(data).digest(),
        split=split,
        by_index={index: payload for index, _, _, _, payload in split.tensors},
    )


def _encode_tensors(data: bytes, model: onnx.ModelProto, base: _BaseModel | None) -> tuple[bytes, EncodedFile]:
    split = _split(model)
    bits_hint, axis_hint = _hints(model)
    base_by_name = {}
    if base is not None:
        base_by_name = {t.name: (i, f, p) for i, t, f, _, p in base.split.tensors}
    w = Writer()
    w.raw(MAGIC)
    w.u8(FORMAT_VERSION)
    w.u8(_FLAG_DELTA if base is not None else 0)
    w.u16(0)
    w.u64(len(data))
    w.raw(base.sha256 if base is not None else _ZERO_SHA)
    if base is not None and split.skeleton == base.split.skeleton:
        skeleton_kind, skeleton_blob = SkeletonKind.SAME_AS_BASE, b""
    elif base is not None:
        skeleton_kind = SkeletonKind.ZSTD_AGAINST_BASE
        skeleton_blob = zstd_compress(split.skeleton, base.split.skeleton)
    else:
        skeleton_kind, skeleton_blob = SkeletonKind.ZSTD, zstd_compress(split.skeleton)
    w.u8(skeleton_kind)
    w.blob(skeleton_blob)
    w.u32(len(split.tensors))
    stats: list[TensorStats] = []
    for index, tensor, field_, item_size, payload in split.tensors:
        w.u32(index)
        w.u8(field_)
        w.u8(item_size)
        w.u64(len(payload) // item_size)
        same = base_by_name.get(tensor.name)
        if same is not None and same[1] is field_ and same[2] == payload:
            ref = Writer()
            ref.u32(same[0])
            ref.raw(hashlib.sha256(payload).digest())
            choice, bodies, distinct = "base", {"base": (TensorCodec.BASE, ref.getvalue())}, None
        else:
            bodies, distinct = _candidates(tensor, item_size, payload, axis_hint.get(tensor.name))
            choice = min(bodies, key=lambda name: len(bodies[name][1]))
        codec, body = bodies[choice]
        w.u8(codec)
        w.raw(body)
        stats.append(
            TensorStats(
                name=tensor.name,
                decoded_bytes=len(payload),
                codec=choice,
                encoded_bytes=len(body),
                candidates={name: len(b) for name, (_, b) in bodies.items()},
                distinct_values=distinct,
                hinted_bits=bits_hint.get(tensor.name),
            )
        )
    payload_bytes = w.getvalue()
    encoded = EncodedFile(
        payload=payload_bytes,
        codec=TENSORS_CODEC,
        sha256=hashlib.sha256(data).hexdigest(),
        length=len(data),
        base_sha256=base.sha256.hex() if base is not None else None,
        tensors=tuple(stats),
        skeleton_bytes=len(skeleton_blob),
    )
    return payload_bytes, encoded


def _whole_file(data: bytes, reason: str) -> EncodedFile:
    log.info("encoding the model as one zstd frame: %s", reason)
    return EncodedFile(
        payload=zstd_compress(data),
        codec=ZSTD_CODEC,
        sha256=hashlib.sha256(data).hexdigest(),
        length=len(data),
        fallback_reason=reason,
    )


def encode_tensors(data: bytes, base: bytes | None) -> EncodedFile:
    """The tensor codec's encoding (a delta when ``base`` is given), proven by decoding it.

    Raises :class:`BundleError` when the model cannot be rebuilt byte for byte from its parts.
    """
    model = _parse(data, "model")
    if model.SerializeToString() != data:
        raise BundleError("the model does not re-serialize to its own bytes (non-canonical field order?)")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise BundleError("the model uses external data")
    base_model = _base(base) if base is not None else None
    payload, encoded = _encode_tensors(data, model, base_model)
    decoded = decode_model(payload, TENSORS_CODEC, expected_sha256=encoded.sha256, expected_length=len(data), base=base)
    if decoded != data:  # pragma: no cover - decode_model's own sha check makes this unreachable
        raise BundleError("the tensor encoding does not decode to the model")
    return encoded


def encode_model(data: bytes, *, base: bytes | None = None) -> EncodedFile:
    """``data`` (an ONNX file) encoded for transport; with ``base``, the delta against it if smaller.

    Never fails on a well-formed model: when the tensor codec cannot reproduce the file exactly,
    the result is zstd of the whole file (``fallback_reason`` says why).
    """
    try:
        full = encode_tensors(data, None)
    except BundleError as exc:
        full = _whole_file(data, str(exc))
    if base is None:
        return full
    try:
        delta = encode_tensors(data, base)
    except BundleError as exc:
        log.info("no delta against the base: %s", exc)
        return full
    return delta if len(delta.payload) < len(full.payload) else full


# --------------------------------------------------------------------------------------------------
# Decoding: the security boundary


class _Budget:
    """Bytes the decoded file may still take: its signed length bounds every allocation."""

    def __init__(self, total: int) -> None:
        self.left = total

    def spend(self, count: int, what: str) -> None:
        if count > self.left:
            raise BundleError(f"{what} needs {count} bytes, over what the signed length leaves ({self.left})")
        self.left -= count


def _read_indices(r: Reader, count: int, alphabet: int) -> npt.NDArray[np.integer]:
    coding = r.u8("index coding")
    bits = r.u8("index bits")
    stream = r.blob("index stream")
    if coding == IndexCoding.HUFFMAN:
        indices = huffman.decode(stream, max_symbols=count)
    elif coding == IndexCoding.ZSTD:
        item = 1 if alphabet <= 256 else 2
        raw = zstd_decompress(stream, count * item, "zstd index stream")
        if len(raw) != count * item:
            raise BundleError(f"zstd index stream holds {len(raw)} bytes, not {count} indices")
        indices = np.frombuffer(raw, dtype=np.uint8 if item == 1 else np.dtype("<u2"))
    elif coding == IndexCoding.FIXED:
        if not 1 <= bits <= 8 or len(stream) != huffman.fixed_width_bytes(count, bits):
            raise BundleError(
                f"fixed-width index stream of {len(stream)} bytes does not hold {count} {bits}-bit indices"
            )
        indices = huffman.unpack_fixed(stream, count, bits)
    else:
        raise BundleError(f"unknown index coding {coding}")
    if indices.size != count:
        raise BundleError(f"index stream holds {indices.size} indices, the record says {count}")
    if count and int(indices.max()) >= alphabet:
        raise BundleError(f"index {int(indices.max())} outside a codebook of {alphabet}")
    return indices


def _read_clustered(r: Reader, count: int, uint: type[np.unsignedinteger]) -> bytes:
    size = r.u16("codebook size")
    if not 1 <= size <= MAX_CODEBOOK:
        raise BundleError(f"codebook of {size} entries")
    book = np.frombuffer(r.take(size * np.dtype(uint).itemsize, "codebook"), dtype=uint)
    values: npt.NDArray[np.unsignedinteger] = book[_read_indices(r, count, size)]
    return values.tobytes()


def _read_symbols(r: Reader, count: int, uint: type[np.unsignedinteger]) -> bytes:
    if uint is not np.uint8:
        raise BundleError("symbol coding is for 8-bit tensors only")
    symbols = huffman.decode(r.blob("symbol stream"), max_symbols=count)
    if symbols.size != count or (count and int(symbols.max()) > 255):
        raise BundleError("symbol stream does not hold the record's bytes")
    return symbols.astype(np.uint8).tobytes()


def _read_base_ref(r: Reader, base: _BaseModel | None) -> bytes:
    if base is None:
        raise BundleError("a record references the base model, but the payload is not a delta")
    index = r.u32("base tensor index")
    digest = r.take(32, "base tensor sha256")
    found = base.by_index.get(index)
    if found is None or hashlib.sha256(found).digest() != digest:
        raise BundleError(f"base tensor {index} is missing or differs from the one the delta was made against")
    return found


def _read_body(r: Reader, codec: int, count: int, item_size: int, base: _BaseModel | None) -> bytes:
    """One record's tensor bytes; ``count * item_size`` is already within the budget."""
    nbytes = count * item_size
    uint = _UINT_OF_SIZE[item_size]
    if codec == TensorCodec.RAW:
        data = r.blob("raw tensor")
    elif codec == TensorCodec.ZSTD:
        data = zstd_decompress(r.blob("zstd tensor"), nbytes, "zstd tensor")
    elif codec == TensorCodec.ZSTD_SHUFFLE:
        planes = zstd_decompress(r.blob("shuffled tensor"), nbytes, "shuffled tensor")
        if len(planes) != nbytes:
            raise BundleError(f"shuffled tensor holds {len(planes)} bytes, its record says {nbytes}")
        data = np.frombuffer(planes, dtype=np.uint8).reshape(item_size, count).T.tobytes()
    elif codec == TensorCodec.SYMBOLS:
        data = _read_symbols(r, count, uint)
    elif codec == TensorCodec.CLUSTERED:
        data = _read_clustered(r, count, uint)
    elif codec == TensorCodec.CLUSTERED_PER_CHANNEL:
        data = _read_per_channel(r, count, uint)
    elif codec == TensorCodec.CLUSTERED_SPARSE:
        data = _read_sparse(r, count, uint)
    elif codec == TensorCodec.BASE:
        data = _read_base_ref(r, base)
    else:
        raise BundleError(f"unknown tensor codec {codec}")
    if len(data) != nbytes:
        raise BundleError(f"tensor decodes to {len(data)} bytes, its record says {nbytes}")
    return data


def _read_per_channel(r: Reader, count: int, uint: type[np.unsignedinteger]) -> bytes:
    item_size = np.dtype(uint).itemsize
    outer, channels, inner = r.u64("outer size"), r.u64("channels"), r.u64("inner size")
    if max(outer, channels, inner) > count or outer * channels * inner != count or channels == 0:
        raise BundleError(f"per-channel shape {outer}×{channels}×{inner} does not hold {count} elements")
    sizes = np.frombuffer(r.take(channels * 2, "codebook sizes"), dtype="<u2").astype(np.int64)
    if int(sizes.min()) < 1 or int(sizes.max()) > MAX_CODEBOOK:
        raise BundleError("per-channel codebook sizes out of range")
    books = np.frombuffer(r.take(int(sizes.sum()) * item_size, "codebooks"), dtype=uint)
    offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    local = _read_indices(r, count, int(sizes.max())).reshape(outer, channels, inner).astype(np.int64)
    if np.any(local >= sizes[None, :, None]):
        raise BundleError("per-channel index outside its channel's codebook")
    return books[local + offsets[None, :, None]].tobytes()


def _read_header(r: Reader, expected_length: int, base_data: bytes | None) -> _BaseModel | None:
    """Checks magic, version, flags and declared length; for a delta, the base it needs (checked first)."""
    if r.take(4, "magic") != MAGIC:
        raise BundleError("not an edgefleet-tensors-v1 payload (bad magic)")
    if (version := r.u8("format version")) != FORMAT_VERSION:
        raise BundleError(f"unsupported tensor format version {version}")
    flags = r.u8("flags")
    if flags & ~_FLAG_DELTA or r.u16("reserved") != 0:
        raise BundleError("unknown flags in the payload header")
    if (declared := r.u64("decoded length")) != expected_length:
        raise BundleVerificationError(f"payload decodes to {declared} bytes, the manifest says {expected_length}")
    base_sha = r.take(32, "base sha256")
    if not flags & _FLAG_DELTA:
        return None
    if base_data is None:
        raise BundleError("the payload is a delta and no base file was given")
    if hashlib.sha256(base_data).digest() != base_sha:
        raise BundleError(f"wrong base: the delta needs base sha256 {base_sha.hex()}")
    return _base(base_data)


def _read_skeleton(r: Reader, budget: _Budget, base: _BaseModel | None) -> onnx.ModelProto:
    kind = r.u8("skeleton kind")
    blob = r.blob("skeleton")
    if kind == SkeletonKind.ZSTD:
        skeleton = zstd_decompress(blob, budget.left, "skeleton")
    elif kind == SkeletonKind.ZSTD_AGAINST_BASE and base is not None:
        skeleton = zstd_decompress(blob, budget.left, "skeleton", base.split.skeleton)
    elif kind == SkeletonKind.SAME_AS_BASE and base is not None and not blob:
        skeleton = base.split.skeleton
    else:
        raise BundleError(f"skeleton kind {kind} is not valid here")
    budget.spend(len(skeleton), "skeleton")
    return _parse(skeleton, "skeleton")


def _read_record(
    r: Reader, budget: _Budget, initializers: Sequence[onnx.TensorProto], base: _BaseModel | None, seen: set[int]
) -> None:
    index = r.u32("initializer index")
    field_code = r.u8("tensor field")
    item_size = r.u8("item size")
    count = r.u64("element count")
    if index >= len(initializers) or index in seen:
        raise BundleError(f"tensor record for initializer {index} is out of range or repeated")
    seen.add(index)
    if field_code not in (TensorField.RAW_DATA, TensorField.FLOAT_DATA) or item_size not in _UINT_OF_SIZE:
        raise BundleError(f"tensor record with field {field_code} and item size {item_size}")
    field_ = TensorField(field_code)
    if field_ is TensorField.FLOAT_DATA and item_size != 4:
        raise BundleError("float_data records have 4-byte items")
    budget.spend(count * item_size, f"initializer {index}")
    data = _read_body(r, r.u8("tensor codec"), count, item_size, base)
    tensor = initializers[index]
    if tensor.HasField("raw_data") or len(tensor.float_data):
        raise BundleError(f"initializer {index} already holds data in the skeleton")
    _restore(tensor, field_, data)


def _decode_tensors(payload: bytes, expected_length: int, base_data: bytes | None) -> bytes:
    r = Reader(payload)
    base = _read_header(r, expected_length, base_data)
    budget = _Budget(expected_length)
    model = _read_skeleton(r, budget, base)
    initializers = model.graph.initializer
    records = r.u32("record count")
    if records > len(initializers):
        raise BundleError(f"{records} tensor records for {len(initializers)} initializers")
    seen: set[int] = set()
    for _ in range(records):
        _read_record(r, budget, initializers, base, seen)
    r.expect_end()
    try:
        return model.SerializeToString()
    except (ValueError, RuntimeError) as exc:  # e.g. over protobuf's 2 GiB message limit
        raise BundleError(f"cannot re-serialize the decoded model: {exc}") from None


def decode_model(
    payload: bytes,
    codec: str,
    *,
    expected_sha256: str,
    expected_length: int,
    base: bytes | None = None,
) -> bytes:
    """The model file a payload encodes, checked against the signed manifest's sha256 and length.

    Raises :class:`BundleVerificationError` when the decoded file does not match the manifest and
    :class:`BundleError` for any malformed payload; nothing is allocated past ``expected_length``.
    """
    if expected_length < 0:
        raise BundleError(f"negative expected length {expected_length}")
    try:
        if codec == TENSORS_CODEC:
            data = _decode_tensors(payload, expected_length, base)
        elif codec == ZSTD_CODEC:
            data = zstd_decompress(payload, expected_length, "model")
        elif codec == RAW_CODEC:
            data = payload
        else:
            raise BundleError(f"unknown bundle codec {codec!r}")
    except (ValueError, OverflowError, IndexError, TypeError, MemoryError) as exc:
        # The decoder checks every bound it knows of; anything numpy or protobuf still raises on a
        # crafted payload is a malformed bundle too, never a crash of the caller.
        raise BundleError(f"malformed payload: {type(exc).__name__}: {exc}") from None
    if len(data) != expected_length:
        raise BundleVerificationError(f"decoded file is {len(data)} bytes, the manifest says {expected_length}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise BundleVerificationError(f"decoded file has sha256 {digest}, the manifest says {expected_sha256}")
    return data
