"""The bundle format: manifest, byte-identical tensor codec, deltas, and the decoder as a security boundary."""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
from functools import cache

import numpy as np
import numpy.typing as npt
import onnx
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgefleet_core.bundle import (
    TENSORS_CODEC,
    ZSTD_CODEC,
    BundleManifest,
    EncodedFile,
    choose_encoding,
    decode_model,
    encode_delta,
    encode_model,
    parse_manifest,
)
from edgefleet_core.errors import BundleError, BundleVerificationError

FUZZ_EXAMPLES = int(os.environ.get("EDGEFLEET_FUZZ_EXAMPLES", "150"))

# --------------------------------------------------------------------------------------------------
# Models built with onnx.helper


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[TensorProto],
    metadata: dict[str, str] | None = None,
) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.ir_version = 8
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _mlp(weights: list[npt.NDArray[np.float32]], metadata: dict[str, str] | None = None) -> bytes:
    """A chain of Gemm + Relu layers; ``weights`` are (in, out) matrices, biases zero-ish."""
    nodes, inits = [], []
    current = "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inits.append(numpy_helper.from_array(np.full(w.shape[1], 0.01 * i, np.float32), f"b{i}"))
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"h{i}"]))
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"]))
            current = f"r{i}"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weights[0].shape[0]])
    y = helper.make_tensor_value_info(f"h{len(weights) - 1}", TensorProto.FLOAT, [1, weights[-1].shape[1]])
    return _model(nodes, [x], [y], inits, metadata)


def _random_mlp(seed: int = 0, head_seed: int = 1) -> bytes:
    r = _rng(seed)
    body = [r.standard_normal((64, 256), dtype=np.float32), r.standard_normal((256, 256), dtype=np.float32)]
    head = _rng(head_seed).standard_normal((256, 10), dtype=np.float32)
    return _mlp([*body, head])


def _cnn() -> bytes:
    r = _rng(2)
    w1 = r.standard_normal((16, 3, 3, 3), dtype=np.float32)
    w2 = r.standard_normal((32, 16, 3, 3), dtype=np.float32)
    fc = r.standard_normal((32, 10), dtype=np.float32)
    inits = [
        numpy_helper.from_array(w1, "conv1.w"),
        numpy_helper.from_array(np.zeros(16, np.float32), "conv1.b"),
        numpy_helper.from_array(w2, "conv2.w"),
        numpy_helper.from_array(fc, "fc.w"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.w", "conv1.b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.w"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "fc.w"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])
    return _model(nodes, [x], [y], inits)


def _transformerish() -> bytes:
    """Attention-shaped block; one initializer in float_data (typed field), an INT64 shape, a float16 table."""
    r = _rng(3)
    d = 32
    inits = [numpy_helper.from_array(r.standard_normal((d, d), dtype=np.float32), n) for n in ("wq", "wk", "wv")]
    inits.append(helper.make_tensor("wo", TensorProto.FLOAT, [d, d], r.standard_normal(d * d).astype(np.float32)))
    inits.append(numpy_helper.from_array(np.array([1, 4, d], np.int64), "shape"))
    inits.append(numpy_helper.from_array(np.ones(d, np.float32), "ln.g"))
    inits.append(numpy_helper.from_array(np.zeros(d, np.float32), "ln.b"))
    inits.append(numpy_helper.from_array(r.standard_normal(d).astype(np.float16), "unused.f16"))
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Softmax", ["s"], ["a"], axis=-1),
        helper.make_node("MatMul", ["a", "v"], ["o"]),
        helper.make_node("MatMul", ["o", "wo"], ["o2"]),
        helper.make_node("Add", ["o2", "x"], ["res"]),
        helper.make_node("LayerNormalization", ["res", "ln.g", "ln.b"], ["ln"], axis=-1),
        helper.make_node("Reshape", ["ln", "shape"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, d])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, d])
    return _model(nodes, [x], [y], inits)


def _pruned_clustered_weight(seed: int = 4) -> npt.NDArray[np.float32]:
    """256×256, 90 % exact zeros, the nonzeros clustered to 15 shared values (16 codebook entries)."""
    r = _rng(seed)
    centroids = np.concatenate([np.linspace(-1.0, -0.1, 7), np.linspace(0.1, 1.0, 8)]).astype(np.float32)
    w = centroids[r.integers(0, 15, size=(256, 256))]
    w[r.random((256, 256)) < 0.9] = 0.0
    return w


@cache
def _pruned_clustered_mlp() -> bytes:
    hint = {"edgefleet.clustering": json.dumps({"w0": 4})}
    return _mlp([_pruned_clustered_weight()], metadata=hint)


def _int8_model() -> bytes:
    """A quantized MatMul: INT8 weights (bell-shaped, as quantized weights are) through DequantizeLinear."""
    r = _rng(5)
    q = np.clip(np.round(r.standard_normal((256, 128)) * 12), -127, 127).astype(np.int8)
    inits = [
        numpy_helper.from_array(q, "wq"),
        numpy_helper.from_array(np.array(0.02, np.float32), "scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])
    return _model(nodes, [x], [y], inits)


def _per_channel_conv() -> bytes:
    """128 output channels with 8 values each: 1,024 distinct overall, so only per-channel codebooks fit."""
    r = _rng(6)
    books = r.standard_normal((128, 8)).astype(np.float32)
    w = np.take_along_axis(books, r.integers(0, 8, size=(128, 32 * 9)), axis=1).reshape(128, 32, 3, 3)
    hint = {"edgefleet.clustering": json.dumps({"w": 3}), "edgefleet.clustering.per_channel": json.dumps({"w": 0})}
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128, 3, 3])
    return _model(nodes, [x], [y], [numpy_helper.from_array(w, "w")], hint)


def _decode(encoded: EncodedFile, base: bytes | None = None) -> bytes:
    return decode_model(
        encoded.payload, encoded.codec, expected_sha256=encoded.sha256, expected_length=encoded.length, base=base
    )


def _stats(encoded: EncodedFile, name: str) -> str:
    return next(t.codec for t in encoded.tensors if t.name == name)


# --------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize(
    "build", [_random_mlp, _cnn, _transformerish, _int8_model, _per_channel_conv, _pruned_clustered_mlp]
)
def test_round_trip_is_byte_identical(build: object) -> None:
    assert callable(build)
    data: bytes = build()
    encoded = encode_model(data)
    assert encoded.codec == TENSORS_CODEC, encoded.fallback_reason
    assert encoded.sha256 == hashlib.sha256(data).hexdigest()
    assert encoded.length == len(data)
    assert _decode(encoded) == data


def test_pruned_clustered_weights_use_the_codebook_and_beat_zstd() -> None:
    data = _pruned_clustered_mlp()
    encoded = encode_model(data)
    w0 = next(t for t in encoded.tensors if t.name == "w0")
    assert w0.codec.startswith("clustered-")
    assert w0.distinct_values == 16
    assert w0.hinted_bits == 4
    assert len(data) >= 8 * len(encoded.payload)
    assert len(encoded.payload) < len(zstandard.ZstdCompressor(level=19).compress(data))


def test_random_float_weights_are_not_forced_into_a_codebook() -> None:
    encoded = encode_model(_random_mlp())
    w1 = next(t for t in encoded.tensors if t.name == "w1")
    assert w1.distinct_values is None
    assert w1.codec in {"raw", "zstd", "zstd-shuffle"}  # general-purpose codecs, never a codebook
    assert w1.encoded_bytes == min(w1.candidates.values())


def test_int8_weights_are_entropy_coded() -> None:
    encoded = encode_model(_int8_model())
    wq = next(t for t in encoded.tensors if t.name == "wq")
    assert wq.codec != "raw"
    assert "symbols-huffman" in wq.candidates
    assert wq.encoded_bytes < wq.decoded_bytes


def test_per_channel_hint_is_used_when_it_pays() -> None:
    encoded = encode_model(_per_channel_conv())
    w = next(t for t in encoded.tensors if t.name == "w")
    assert w.distinct_values is None  # over 256 overall: only the per-channel codebooks fit
    assert w.codec.startswith("clustered-per-channel-")


def test_lying_hints_are_recounted() -> None:
    weight = _rng(7).standard_normal((64, 64)).astype(np.float32)
    hints = {"edgefleet.clustering": json.dumps({"w0": 2}), "edgefleet.clustering.per_channel": "[junk"}
    data = _mlp([weight], metadata=hints)
    encoded = encode_model(data)
    assert _stats(encoded, "w0") in {"raw", "zstd", "zstd-shuffle"}  # general-purpose codecs, never a codebook
    assert _decode(encoded) == data


def test_non_canonical_model_falls_back_to_whole_file_zstd() -> None:
    data = _cnn() + b"\x08\x07"  # a second ir_version after the graph: parses, but re-serializes differently
    encoded = encode_model(data)
    assert encoded.codec == ZSTD_CODEC
    assert encoded.fallback_reason
    assert _decode(encoded) == data


def test_not_onnx_falls_back_and_still_round_trips() -> None:
    data = b"\xff\xfe not a protobuf" * 10
    encoded = encode_model(data)
    assert encoded.codec == ZSTD_CODEC
    assert _decode(encoded) == data


# --------------------------------------------------------------------------------------------------
# Deltas


def test_delta_of_a_head_only_fine_tune_is_small() -> None:
    base = _random_mlp(head_seed=1)
    new = _random_mlp(head_seed=99)
    full = encode_model(new)
    delta = encode_delta(new, base)
    assert delta.base_sha256 == hashlib.sha256(base).hexdigest()
    assert len(delta.payload) <= 0.10 * len(full.payload)
    assert {t.name for t in delta.tensors if t.codec != "base"} == {"w2"}
    assert _decode(delta, base=base) == new
    chosen = choose_encoding(new, base)
    assert chosen.payload == delta.payload


def test_choose_encoding_keeps_the_smaller_payload() -> None:
    new = _random_mlp()
    full = encode_model(new)
    assert choose_encoding(new, None).payload == full.payload
    for base in (_cnn(), new):
        chosen = choose_encoding(new, base)
        assert len(chosen.payload) == min(len(full.payload), len(encode_delta(new, base).payload))
        assert _decode(chosen, base=base) == new
    unusable = choose_encoding(new, b"not a model")  # no delta possible: the full payload, not an error
    assert unusable.payload == full.payload
    assert unusable.base_sha256 is None


def test_changed_skeleton_is_coded_against_the_base() -> None:
    base = _random_mlp()
    model = onnx.load_model_from_string(base)
    model.doc_string = "fine-tuned"
    new = model.SerializeToString()
    delta = encode_delta(new, base)
    assert all(t.codec == "base" for t in delta.tensors)
    assert _decode(delta, base=base) == new


def test_delta_with_a_wrong_or_missing_base_is_refused() -> None:
    base = _random_mlp(head_seed=1)
    new = _random_mlp(head_seed=99)
    delta = encode_delta(new, base)
    with pytest.raises(BundleError, match="wrong base"):
        _decode(delta, base=_random_mlp(head_seed=2))
    with pytest.raises(BundleError, match="no base"):
        _decode(delta, base=None)


# --------------------------------------------------------------------------------------------------
# Verification against the manifest


def test_sha256_mismatch_is_a_verification_error() -> None:
    encoded = encode_model(_cnn())
    with pytest.raises(BundleVerificationError, match="sha256"):
        decode_model(encoded.payload, encoded.codec, expected_sha256="0" * 64, expected_length=encoded.length)


@pytest.mark.parametrize("codec", [TENSORS_CODEC, ZSTD_CODEC, "raw"])
def test_length_mismatch_is_a_verification_error(codec: str) -> None:
    data = _cnn()
    payload = {TENSORS_CODEC: encode_model(data).payload, ZSTD_CODEC: zstandard.compress(data), "raw": data}[codec]
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(BundleError):
        decode_model(payload, codec, expected_sha256=sha, expected_length=len(data) - 1)
    assert decode_model(payload, codec, expected_sha256=sha, expected_length=len(data)) == data


def test_unknown_codec_is_refused() -> None:
    with pytest.raises(BundleError, match="unknown bundle codec"):
        decode_model(b"", "gzip", expected_sha256="0" * 64, expected_length=0)


def test_zstd_bomb_is_stopped_at_the_signed_length() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))  # header declares 64 MiB
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 << 20))
    for payload in (bomb, unsized):
        with pytest.raises(BundleError, match="bound"):
            decode_model(payload, ZSTD_CODEC, expected_sha256="0" * 64, expected_length=1000)


# --------------------------------------------------------------------------------------------------
# Fuzzing the decoder


@cache
def _fuzz_target() -> tuple[bytes, bytes, str, int]:
    """A small clustered model's payload and a delta against it: short enough to mutate exhaustively."""
    weight = _pruned_clustered_weight(8)[:24, :16].copy()
    data = _mlp([weight, _rng(9).standard_normal((16, 4)).astype(np.float32)])
    base = _mlp([weight, _rng(10).standard_normal((16, 4)).astype(np.float32)])
    return encode_model(data).payload, encode_delta(data, base).payload, hashlib.sha256(data).hexdigest(), len(data)


_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("u64"), st.integers(0, 1 << 20), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("u32"), st.integers(0, 1 << 20), st.integers(0, (1 << 32) - 1)),
    st.tuples(st.just("byte"), st.integers(0, 1 << 20), st.integers(0, 255)),
)


def _mutate(payload: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(payload)
    for kind, position, value in mutations:
        if not out:
            break
        at = position % len(out)
        if kind == "flip":
            out[at] ^= 1 << value
        elif kind == "truncate":
            del out[at:]
        elif kind == "byte":
            out[at] = value
        else:
            width = 8 if kind == "u64" else 4
            out[at : at + width] = value.to_bytes(width, "little")
    return bytes(out)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(_mutation, min_size=1, max_size=4), delta=st.booleans())
def test_fuzzed_payloads_only_raise_bundle_errors_and_stay_bounded(
    mutations: list[tuple[str, int, int]], delta: bool
) -> None:
    full, delta_payload, sha, length = _fuzz_target()
    payload = _mutate(delta_payload if delta else full, mutations)
    base = _mlp([_pruned_clustered_weight(8)[:24, :16].copy(), _rng(10).standard_normal((16, 4)).astype(np.float32)])
    tracemalloc.start()
    try:
        decode_model(payload, TENSORS_CODEC, expected_sha256=sha, expected_length=length, base=base)
    except BundleError:
        pass  # BundleVerificationError included; anything else fails the test
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 64 * length + (1 << 20)


# --------------------------------------------------------------------------------------------------
# Manifest


def _manifest_doc(**file_overrides: object) -> dict[str, object]:
    encoded = encode_model(_cnn())
    file_entry: dict[str, object] = {
        "name": "model.onnx",
        "role": "model",
        "sha256": encoded.sha256,
        "length": encoded.length,
        "encoding": {
            "target": "model.onnx.eft",
            "sha256": encoded.payload_sha256,
            "length": len(encoded.payload),
            "codec": encoded.codec,
            "deltaFrom": None,
            "baseSha256": None,
        },
    }
    file_entry.update(file_overrides)
    return {
        "apiVersion": "edgefleet.io/bundle/v1",
        "model": {"namespace": "vision", "name": "resnet-tiny"},
        "version": "1.2.0",
        "deviceClass": "jetson-orin",
        "variantId": "ab" * 32,
        "lineage": {"source": "s3://models/resnet.onnx", "passes": ["pruning", "clustering"]},
        "recipe": [{"type": "WeightClustering", "bits": 4}],
        "partitionPlan": None,
        "metrics": {"accuracy": 0.91, "latencyMs": 3.5},
        "files": [file_entry],
    }


def test_manifest_canonical_json_is_stable_and_round_trips() -> None:
    doc = _manifest_doc()
    manifest = parse_manifest(json.dumps(doc, indent=2).encode())
    canonical = manifest.canonical_json()
    assert canonical == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert b" " not in canonical
    reparsed = parse_manifest(canonical)
    assert reparsed == manifest
    assert reparsed.canonical_json() == canonical
    reordered = dict(reversed(list(doc.items())))
    assert parse_manifest(json.dumps(reordered).encode()).canonical_json() == canonical
    assert manifest.file("model.onnx").encoding.codec == TENSORS_CODEC


@pytest.mark.parametrize(
    "name", ["../model.onnx", "a/b.onnx", "/etc/passwd", ".hidden", "..", "", "x\\y.onnx", "model.onnx\x00", "m o.onnx"]
)
@pytest.mark.parametrize("where", ["name", "target"])
def test_unsafe_file_names_are_refused(name: str, where: str) -> None:
    doc = _manifest_doc()
    files = doc["files"]
    assert isinstance(files, list)
    if where == "name":
        files[0]["name"] = name
    else:
        files[0]["encoding"]["target"] = name
    with pytest.raises(BundleError, match="not valid"):
        parse_manifest(json.dumps(doc).encode())


@pytest.mark.parametrize(
    ("change", "value"),
    [
        ("role", "head"),  # a head without a tail
        ("sha256", "XYZ"),
        ("length", -1),
        ("extra", 1),  # unknown field
    ],
)
def test_invalid_file_entries_are_refused(change: str, value: object) -> None:
    with pytest.raises(BundleError, match="not valid"):
        parse_manifest(json.dumps(_manifest_doc(**{change: value})).encode())


def test_delta_fields_go_together() -> None:
    doc = _manifest_doc()
    files = doc["files"]
    assert isinstance(files, list)
    files[0]["encoding"]["deltaFrom"] = "1.1.0"
    with pytest.raises(BundleError, match="deltaFrom and baseSha256"):
        parse_manifest(json.dumps(doc).encode())
    files[0]["encoding"]["baseSha256"] = "cd" * 32
    assert parse_manifest(json.dumps(doc).encode()).files[0].encoding.delta_from == "1.1.0"


def test_head_and_tail_bundle_is_accepted() -> None:
    doc = _manifest_doc(name="head.onnx", role="head")
    files = doc["files"]
    assert isinstance(files, list)
    tail = json.loads(json.dumps(files[0]))
    tail.update(name="tail.onnx", role="tail")
    tail["encoding"]["target"] = "tail.onnx.eft"
    files.append(tail)
    manifest = parse_manifest(json.dumps(doc).encode())
    assert [f.role for f in manifest.files] == ["head", "tail"]
    with pytest.raises(BundleError, match="no file"):
        manifest.file("model.onnx")


@pytest.mark.parametrize("data", [b"{", b"[]", b"\xff", b"1" * 5000, b"[" * 100_000])
def test_malformed_manifests_are_bundle_errors(data: bytes) -> None:
    with pytest.raises(BundleError):
        parse_manifest(data)


def test_oversized_manifest_is_refused_before_parsing() -> None:
    with pytest.raises(BundleError, match="cap"):
        parse_manifest(b" " * 100 + b"{}", max_size=64)


def test_nan_metrics_are_refused() -> None:
    doc = _manifest_doc()
    text = json.dumps(doc).replace('"accuracy": 0.91', '"accuracy": NaN')
    with pytest.raises(BundleError):
        parse_manifest(text.encode())
    assert isinstance(BundleManifest.model_validate(doc), BundleManifest)


def _sparse_values(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centroids = np.linspace(-0.5, 0.5, 15).astype(np.float32)
    values = centroids[rng.integers(0, 15, size)]
    values[rng.random(size) < 0.9] = 0.0
    return values


def test_a_pruned_clustered_tensor_costs_under_a_bit_per_weight() -> None:
    from onnx import TensorProto, helper, numpy_helper

    from edgefleet_core.bundle.codec import decode_model, encode_model

    weight = _sparse_values(512 * 512).reshape(512, 512)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "sparse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 512])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = model.SerializeToString()
    encoded = encode_model(data)
    (stats,) = [t for t in encoded.tensors if t.name == "w"]
    assert stats.codec == "clustered-sparse-huffman"
    # Element-wise Huffman cannot go under one bit per weight; the run-length coding can.
    assert stats.encoded_bytes * 8 / weight.size < 1.0
    assert stats.candidates["clustered-sparse-huffman"] < stats.candidates["clustered-huffman"]
    assert decode_model(encoded.payload, encoded.codec, expected_sha256=encoded.sha256,
                        expected_length=encoded.length) == data  # fmt: skip


@settings(max_examples=int(os.environ.get("EDGEFLEET_FUZZ_EXAMPLES", "150")), deadline=None, database=None)
@given(st.data())
def test_fuzzed_sparse_bodies_only_raise_bundle_errors(data: st.DataObject) -> None:
    from edgefleet_core.bundle import codec
    from edgefleet_core.bundle._wire import Reader
    from edgefleet_core.errors import BundleError

    values = _sparse_values(2000, seed=data.draw(st.integers(0, 3))).view(np.uint32)
    body = codec._sparse_body(values)
    assert body is not None
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(mutated) - 1))
        mutated[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    try:
        out = codec._read_sparse(Reader(bytes(mutated[:cut] if data.draw(st.booleans()) else mutated)), 2000, np.uint32)
    except BundleError:
        return
    assert len(out) == 2000 * 4
