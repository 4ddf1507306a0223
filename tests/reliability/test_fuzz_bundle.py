"""Fuzz target: the bundle decoder, fed structured mutations of real payloads, and the bundle fetch path.

tests/unit/bundle/test_bundle_format.py already throws blind byte mutations at one clustered MLP.
This target knows the payload's layout: it decodes each seed payload once through a recording
:class:`Reader` to learn where every header field, length prefix, record field and codec body sits
(``_layout``), then edits *those*: a length prefix set just past what is left or to 2**64-1, an
element count doubled, a codec or an index-coding byte swapped for another valid one, a record cut
at a field boundary, two records swapped, a record repeated. The seeds cover every tensor codec the
encoder picks (clustered, clustered-sparse, per-channel, symbols, zstd, zstd-shuffle, raw, base)
and both skeleton kinds of a delta.

A crash is anything other than :class:`BundleError` (``BundleVerificationError`` included), a
decode that allocates far past the signed length, or one that takes seconds.

The second test fuzzes the bundle as a device receives it: a publisher (who holds the keys, so TUF
lets it through) signs a mutated manifest and payload, and ``fetch_bundle`` must refuse with our
error types, never hand back bytes that differ from what the manifest pins.
"""

from __future__ import annotations

import hashlib
import json
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgefleet_core.bundle import codec
from edgefleet_core.bundle._wire import Reader
from edgefleet_core.bundle.codec import TENSORS_CODEC, decode_model, encode_model
from edgefleet_core.bundle.distribution import BundleRef, build_bundles, fetch_bundle
from edgefleet_core.errors import BundleError, EdgeFleetError
from edgefleet_core.signing import KeySet, StoreFetcher, TufClient, TufRepository
from edgefleet_core.store.local import LocalStore
from tests.support.reliability import fuzz_examples, record_fuzz

pytestmark = [pytest.mark.reliability, pytest.mark.fuzz]

DECODE_SECONDS = 5.0
"""A decode of these few-KiB payloads takes milliseconds; seconds means a loop that does not end."""


# --------------------------------------------------------------------------------------------------
# Seeds: small models whose tensors, between them, make the encoder use every tensor codec


def _model(initializers: list[TensorProto], metadata: dict[str, str] | None = None) -> bytes:
    # Identity per initializer keeps the graph valid; the codec only needs a canonical ModelProto.
    nodes = [helper.make_node("Identity", [t.name], [f"{t.name}.out"]) for t in initializers]
    outputs = [helper.make_tensor_value_info(f"{t.name}.out", t.data_type, list(t.dims)) for t in initializers]
    model = helper.make_model(
        helper.make_graph(nodes, "fuzz", [], outputs, initializers), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    if metadata:
        helper.set_model_props(model, metadata)
    return model.SerializeToString()


def _tensors(seed: int) -> list[TensorProto]:
    rng = np.random.default_rng(seed)
    book = rng.standard_normal(6).astype(np.float32)
    centroids = np.linspace(-0.5, 0.5, 15).astype(np.float32)
    sparse = centroids[rng.integers(0, 15, 4096)]
    sparse[rng.random(4096) < 0.9] = 0.0
    channel_books = rng.standard_normal((8, 4)).astype(np.float32)
    per_channel = np.take_along_axis(channel_books, rng.integers(0, 4, (8, 36)), axis=1).reshape(8, 4, 3, 3)
    return [
        numpy_helper.from_array(book[rng.integers(0, 6, (32, 16))], "clustered"),
        numpy_helper.from_array(sparse.reshape(64, 64), "sparse"),
        numpy_helper.from_array(per_channel, "per_channel"),
        numpy_helper.from_array(np.clip(np.round(rng.standard_normal(512) * 9), -127, 127).astype(np.int8), "int8"),
        numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "dense"),
        numpy_helper.from_array(np.arange(24, dtype=np.int64), "shape"),
        numpy_helper.from_array(rng.standard_normal(40).astype(np.float16), "half"),
        helper.make_tensor("typed", TensorProto.FLOAT, [8], rng.standard_normal(8).astype(np.float32)),
    ]


_HINTS = {"edgefleet.clustering.per_channel": json.dumps({"per_channel": 0})}


@dataclass(frozen=True)
class Field:
    """One value the decoder read: where it sits in the payload, how wide it is, what it is."""

    offset: int
    width: int
    what: str


@dataclass(frozen=True)
class Seed:
    name: str
    payload: bytes
    sha256: str
    length: int
    base: bytes | None
    fields: tuple[Field, ...]
    records: tuple[int, ...]
    """Offset at which each tensor record starts (its initializer index field)."""


class _RecordingReader(Reader):
    """A Reader that notes the offset, width and name of every value it hands out."""

    log: list[Field]

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.log = []

    def take(self, count: int, what: str) -> bytes:
        start = len(self._data) - self.remaining
        out = super().take(count, what)
        self.log.append(Field(start, count, what))
        return out


def _layout(payload: bytes, sha256: str, length: int, base: bytes | None) -> tuple[Field, ...]:
    readers: list[_RecordingReader] = []

    def make(data: bytes) -> _RecordingReader:
        reader = _RecordingReader(data)
        readers.append(reader)
        return reader

    with mock.patch.object(codec, "Reader", make):
        decode_model(payload, TENSORS_CODEC, expected_sha256=sha256, expected_length=length, base=base)
    # The first reader is the payload's; later ones (if any) read nested streams.
    return tuple(readers[0].log)


@cache
def _seeds() -> tuple[Seed, ...]:
    data = _model(_tensors(1), _HINTS)
    changed = _tensors(1)
    changed[4] = numpy_helper.from_array(np.random.default_rng(7).standard_normal((16, 16)).astype(np.float32), "dense")
    newer = _model(changed, _HINTS)
    renamed = _model(_tensors(1), {**_HINTS, "note": "skeleton differs"})
    out = []
    for name, file, base in (("full", data, None), ("delta", newer, data), ("delta-skeleton", renamed, data)):
        encoded = encode_model(file, base=base)
        assert encoded.codec == TENSORS_CODEC, encoded.fallback_reason
        used_base = base if encoded.base_sha256 else None
        fields = _layout(encoded.payload, encoded.sha256, encoded.length, used_base)
        records = tuple(f.offset for f in fields if f.what == "initializer index")
        out.append(Seed(name, encoded.payload, encoded.sha256, encoded.length, used_base, fields, records))
    return tuple(out)


def test_seeds_cover_every_tensor_codec() -> None:
    """The fuzzer mutates what the encoder really writes: every codec and both delta skeleton kinds."""
    data = _model(_tensors(1), _HINTS)
    codecs = {t.codec.split("-huffman")[0].split("-fixed")[0] for t in encode_model(data).tensors}
    assert {"clustered", "clustered-sparse", "clustered-per-channel", "symbols"} <= codecs, codecs
    assert any(c.startswith(("zstd", "raw")) for c in codecs), codecs
    seeds = {s.name: s for s in _seeds()}
    assert seeds["delta"].base is not None
    assert seeds["delta-skeleton"].base is not None
    for seed in seeds.values():
        names = {f.what for f in seed.fields}
        assert {"magic", "decoded length", "length of skeleton", "record count", "tensor codec"} <= names
        assert len(seed.records) >= 4


# --------------------------------------------------------------------------------------------------
# Structured mutations


def _edges(width: int, current: int, remaining: int) -> list[int]:
    top = (1 << (8 * width)) - 1
    return [v & top for v in (0, 1, current - 1, current + 1, current * 2, remaining, remaining + 1, top, top - 1)]


@st.composite
def _mutation(draw: st.DrawFn, seed: Seed) -> bytes:
    out = bytearray(seed.payload)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "length", "cut", "flip", "swap", "repeat", "drop", "bytes"]))
        fields = seed.fields
        if kind == "length":
            fields = tuple(f for f in seed.fields if f.what.startswith("length of")) or fields
        target = draw(st.sampled_from(fields))
        if target.offset + target.width > len(out):
            continue
        if kind in ("field", "length") and target.width in (1, 2, 4, 8):
            current = int.from_bytes(out[target.offset : target.offset + target.width], "little")
            remaining = len(out) - target.offset - target.width
            value = draw(st.one_of(st.sampled_from(_edges(target.width, current, remaining)),
                                   st.integers(0, (1 << (8 * target.width)) - 1)))  # fmt: skip
            out[target.offset : target.offset + target.width] = value.to_bytes(target.width, "little")
        elif kind == "cut":
            # At a field boundary or inside the field: where a streaming decoder is most fragile.
            del out[target.offset + draw(st.integers(0, target.width)) :]
        elif kind == "flip":
            bit = draw(st.integers(0, 8 * max(1, target.width) - 1))
            out[target.offset + bit // 8] ^= 1 << (bit % 8)
        elif kind == "bytes" and target.width:
            start = target.offset + draw(st.integers(0, target.width - 1))
            patch = draw(st.binary(min_size=1, max_size=8))
            out[start : start + len(patch)] = patch
        elif kind in ("swap", "repeat", "drop") and len(seed.records) >= 2:
            bounds = [*seed.records, len(seed.payload)]
            i = draw(st.integers(0, len(seed.records) - 1))
            j = draw(st.integers(0, len(seed.records) - 1))
            if max(bounds[i + 1], bounds[j + 1]) > len(out):
                continue
            a, b = bytes(out[bounds[i] : bounds[i + 1]]), bytes(out[bounds[j] : bounds[j + 1]])
            if kind == "repeat":
                out[bounds[i + 1] : bounds[i + 1]] = a
            elif kind == "drop":
                del out[bounds[i] : bounds[i + 1]]
            elif i < j:
                out[bounds[i] : bounds[j + 1]] = b + out[bounds[i + 1] : bounds[j]] + a
    return bytes(out)


@st.composite
def _case(draw: st.DrawFn) -> tuple[Seed, bytes, int]:
    seed = draw(st.sampled_from(_seeds()))
    length = draw(st.sampled_from([seed.length, seed.length, seed.length - 1, seed.length + 1, 0, 1 << 31]))
    return seed, draw(_mutation(seed)), length


@contextmanager
def _bounded(length: int) -> Iterator[None]:
    """Fails when what runs inside allocates more than the signed length allows, or takes seconds."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        yield
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        elapsed = time.monotonic() - started
        # A few copies of the decoded file (skeleton, tensors, re-serialized model) plus numpy's temporaries.
        assert peak < 64 * min(length, 1 << 20) + (4 << 20), f"peak allocation {peak} bytes for a {length}-byte file"
        assert elapsed < DECODE_SECONDS, f"decode took {elapsed:.1f} s"


DECODER = "bundle decoder (structured mutations of real payloads)"
FETCH = "bundle fetch (signed manifest and payload, mutated)"


@pytest.fixture(scope="module")
def executions() -> Iterator[Counter[str]]:
    """Inputs each target ran in this module, recorded when the module's tests are done."""
    counts: Counter[str] = Counter()
    yield counts
    for target, count in counts.items():
        record_fuzz(target, executions=count, crashes_fixed=[])


@settings(max_examples=fuzz_examples(300), deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(case=_case())
def test_structured_mutations_of_real_payloads_only_raise_bundle_errors(
    executions: Counter[str], case: tuple[Seed, bytes, int]
) -> None:
    seed, payload, length = case
    executions[DECODER] += 1
    with _bounded(length):
        try:
            decoded = decode_model(payload, TENSORS_CODEC, expected_sha256=seed.sha256, expected_length=length,
                                   base=seed.base)  # fmt: skip
        except BundleError:
            return  # BundleVerificationError included; anything else is a crash and fails here
    # A mutation the decoder accepts must still give exactly the signed file.
    assert hashlib.sha256(decoded).hexdigest() == seed.sha256
    assert len(decoded) == length


# --------------------------------------------------------------------------------------------------
# The bundle as a device receives it: signed by a publisher, mutated before signing


@dataclass
class _Repo:
    repository: TufRepository
    client: TufClient
    store: LocalStore
    data: bytes


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> _Repo:
    folder: Path = tmp_path_factory.mktemp("fuzz-bundle")
    store = LocalStore(folder / "store")
    repository = TufRepository(store, KeySet.generate())
    repository.initialize()
    client = TufClient(StoreFetcher(store), repository.trusted_root(), folder / "device")
    return _Repo(repository, client, store, _model(_tensors(2), _HINTS))


_MANIFEST_EDITS: dict[str, Any] = {
    "length": st.sampled_from([0, 1, (1 << 31) - 1, -1, "7"]),
    "sha256": st.sampled_from(["0" * 64, "A" * 64, "", None]),
    "codec": st.sampled_from(["zstd", "raw", "gzip", TENSORS_CODEC]),
    "encoding.length": st.sampled_from([0, 1, (1 << 31) - 1]),
    "encoding.codec": st.sampled_from(["zstd", "raw", TENSORS_CODEC, "x"]),
    "encoding.target": st.sampled_from(["../model.onnx.eft", "model.onnx", "other.eft"]),
    "encoding.baseSha256": st.sampled_from(["ab" * 32, None]),
    "encoding.deltaFrom": st.sampled_from(["0.9", None]),
    "name": st.sampled_from(["head.onnx", "tail.onnx", "x.onnx", "model.onnx"]),
    "role": st.sampled_from(["head", "tail", "model", "weights"]),
}


@settings(max_examples=fuzz_examples(25), deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    edits=st.dictionaries(st.sampled_from(sorted(_MANIFEST_EDITS)), st.none(), max_size=3),
    values=st.data(),
    payload_cut=st.one_of(st.none(), st.integers(0, 4096)),
)
def test_signed_but_mutated_bundles_are_refused_by_fetch(
    repo: _Repo, executions: Counter[str], edits: dict[str, None], values: st.DataObject, payload_cut: int | None
) -> None:
    executions[FETCH] += 1
    version = f"1.{executions[FETCH]}"
    ref = BundleRef("fuzz", "digits", "cpu-small", version)
    (built,) = build_bundles({"model.onnx": repo.data}, ref, version, variant_id="ab" * 32, lineage={}, recipe=[],
                             metrics={})  # fmt: skip
    document = json.loads(built.manifest.canonical_json())
    entry = document["files"][0]
    for path in edits:
        where, _, key = path.rpartition(".")
        node = entry["encoding"] if where == "encoding" else entry
        node[key] = values.draw(_MANIFEST_EDITS[path])
    payloads = dict(built.payloads)
    if payload_cut is not None:
        (name,) = payloads
        payloads[name] = payloads[name][:payload_cut] + payloads[name][payload_cut + 1 :]
    targets = {f"{built.prefix}/{n}": p for n, p in payloads.items()}
    targets[f"{built.prefix}/manifest.json"] = json.dumps(document).encode()
    repo.repository.publish(targets)
    try:
        fetched = fetch_bundle(repo.client, ref)
    except EdgeFleetError:
        return  # BundleError, BundleVerificationError, VerificationError: refused, with a reason
    # Accepted: then it must be exactly the model, as the (possibly edited) manifest pins it.
    assert fetched.files["model.onnx"] == repo.data
    assert fetched.manifest.files[0].sha256 == hashlib.sha256(repo.data).hexdigest()
