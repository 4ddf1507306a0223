"""``edgefleet bench bundles``: what the bundle format buys in transport size, and how fast it verifies.

Same-run figures on the digits-trained sample models: the Deep-Compression-style end-to-end ratio
(pruned + clustered + Huffman-coded bundle against the FP32 ONNX file), Huffman against fixed-width
indices and zstd, a head-only update as a delta, and verify + decode throughput of a 20 MB bundle
through the real TUF client and a local store.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import zstandard
from onnx import TensorProto, helper, numpy_helper

from edgefleet_core.bench.measure import accuracy, machine
from edgefleet_core.bench.pipeline import Target, compress_mlp, mlp_recipe
from edgefleet_core.bundle.codec import EncodedFile, decode_model, encode_model
from edgefleet_core.bundle.distribution import BundleRef, build_bundles, fetch_bundle, publish_bundles
from edgefleet_core.optimize.lineage import canonical_pass, lineage_for
from edgefleet_core.optimize.model_io import model_digest, serialize
from edgefleet_core.optimize.passes.base import PassContext
from edgefleet_core.optimize.passes.clustering import WeightClusteringPass
from edgefleet_core.optimize.runtime import session
from edgefleet_core.resources.recipe import WeightClusteringOptions
from edgefleet_core.samples.digits import DigitsSplit, load_digits_split
from edgefleet_core.samples.models import build
from edgefleet_core.signing.client import TufClient
from edgefleet_core.signing.fetcher import StoreFetcher
from edgefleet_core.signing.keys import KeySet
from edgefleet_core.signing.repository import TufRepository
from edgefleet_core.store.local import LocalStore

MARK = "bundles"


def _bundle_bytes(
    model: bytes,
    name: str,
    *,
    lineage: Mapping[str, Any] | None = None,
    recipe: list[Any] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> tuple[int, EncodedFile]:
    """Bytes a device downloads for ``model``: the signed manifest plus the encoded payload."""
    variant = lineage_variant(lineage) if lineage else "0" * 64
    (full,) = build_bundles({"model.onnx": model}, BundleRef("bench", name, "cpu"), "1", variant_id=variant,
                            lineage=lineage or {}, recipe=recipe or [], metrics=metrics or {})  # fmt: skip
    payload = full.encodings["model.onnx"]
    return len(full.manifest.canonical_json()) + len(payload.payload), payload


def lineage_variant(lineage: Mapping[str, Any]) -> str:
    """The variant id of a lineage record (as the pipeline computes it)."""
    return hashlib.sha256(json.dumps(lineage, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _index_codings(encoded: EncodedFile, model: onnx.ModelProto) -> dict[str, int]:
    """Sizes of clustered tensors' indices under each coding, summed over the clustered tensors.

    ``zstd_indices`` is zstd of the same index stream the Huffman coder gets (one byte per index):
    the like-for-like comparison; ``zstd`` is zstd of the tensor's float bytes.
    """
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    sums = {"huffman": 0, "sparse_huffman": 0, "fixed": 0, "zstd": 0, "zstd_indices": 0, "tensors": 0}
    for tensor in encoded.tensors:
        candidates = tensor.candidates
        if "clustered-huffman" in candidates and "clustered-fixed" in candidates:
            sums["huffman"] += candidates["clustered-huffman"]
            sums["fixed"] += candidates["clustered-fixed"]
            sums["zstd"] += candidates.get("zstd", tensor.decoded_bytes)
            _, indices = np.unique(arrays[tensor.name], return_inverse=True)
            sums["zstd_indices"] += len(zstandard.ZstdCompressor(level=19).compress(indices.astype(np.uint8).tobytes()))
            # The run-length coding applies to sparse tensors only; elsewhere the element-wise one stands.
            sums["sparse_huffman"] += candidates.get("clustered-sparse-huffman", candidates["clustered-huffman"])
            sums["tensors"] += 1
    return sums


def deep_compression(split: DigitsSplit, quick: bool) -> dict[str, Any]:
    """The pipeline benchmark's pruned + clustered MLP as a bundle, against its FP32 file."""
    sample, compressed, records = compress_mlp(split, quick)
    fp32_bytes = len(serialize(sample.model))
    model_bytes = serialize(compressed)
    # The manifest a real publish carries: the variant's lineage, recipe and measured metrics.
    recipe = mlp_recipe(quick)
    lineage = asdict(
        lineage_for(model_digest(sample.model), recipe, None, 0, {"executionProvider": "CPUExecutionProvider"})
    )
    # The metrics `edgefleet publish --report` carries (accuracy, its delta, size).
    measured = accuracy(compressed, sample.test_inputs, sample.test_labels)
    metrics = {"accuracy": measured, "accuracyDelta": measured - sample.accuracy, "sizeBytes": float(len(model_bytes))}
    del records
    bundle, encoded = _bundle_bytes(model_bytes, "mlp", lineage=lineage, recipe=[canonical_pass(p) for p in recipe],
                                    metrics=metrics)  # fmt: skip
    decoded = decode_model(
        encoded.payload, encoded.codec, expected_sha256=encoded.sha256, expected_length=encoded.length
    )
    restored = onnx.load_model_from_string(decoded)
    codings = _index_codings(encoded, compressed)
    ratio = fp32_bytes / bundle
    return {
        "scenario": "deep-compression",
        "model": sample.name,
        "fp32_file_bytes": fp32_bytes,
        "compressed_file_bytes": len(model_bytes),
        "bundle_bytes": bundle,
        "byte_identical": decoded == model_bytes,
        "accuracy_fp32": sample.accuracy,
        "accuracy_bundle": accuracy(restored, sample.test_inputs, sample.test_labels),
        "index_codings": codings,
        "targets": [
            Target("FP32 file / bundle", ratio, 35.0, True).as_dict(),
            Target(
                "decoded file differs from the published one (bytes)", float(decoded != model_bytes), 0.0, False
            ).as_dict(),
        ],
    }


def huffman_gain(split: DigitsSplit, quick: bool) -> dict[str, Any]:
    """Huffman against fixed-width indices and zstd on clustered models (with and without pruning)."""
    rows = []
    _, compressed, _ = compress_mlp(split, quick)
    rows.append(("overparameterized-mlp pruned 90 % + 4 bits", compressed))
    cnn = build("digits-cnn", quick=quick, split=split)
    ctx = PassContext("CPUExecutionProvider", frozenset({"fp32"}), cnn.model)
    clustered = WeightClusteringPass(WeightClusteringOptions(bits=5)).apply(cnn.model, ctx).model
    rows.append(("digits-cnn 5 bits, not pruned", clustered))
    results: list[dict[str, Any]] = []
    for label, model in rows:
        _, encoded = _bundle_bytes(serialize(model), "m")
        codings = _index_codings(encoded, model)
        results.append({
            "model": label,
            **codings,
            "huffman_gain_vs_fixed": 1 - codings["huffman"] / codings["fixed"],
            "huffman_vs_zstd": codings["huffman"] / codings["zstd_indices"],
        })  # fmt: skip
    unpruned = results[1]
    return {
        "scenario": "huffman-gain",
        "rows": results,
        "targets": [
            Target(
                "Huffman saving vs fixed width, unpruned clustered CNN (reported)",
                unpruned["huffman_gain_vs_fixed"],
                0.0,
                True,
            ).as_dict(),
            # Reported comparisons (the issue sets no bound): the codec takes the smallest coding per tensor.
            Target(
                "Huffman / zstd of the same indices, pruned MLP (reported)",
                results[0]["huffman_vs_zstd"],
                float("inf"),
                False,
            ).as_dict(),
            Target(
                "Huffman / zstd of the same indices, unpruned CNN (reported)",
                unpruned["huffman_vs_zstd"],
                float("inf"),
                False,
            ).as_dict(),
        ],
    }


def _retrain_head(model: onnx.ModelProto, split: DigitsSplit, epochs: int) -> onnx.ModelProto:
    """Fine-tune only the classifier (Gemm after Flatten) by softmax regression on the frozen features."""
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info(gemm.input[0], TensorProto.FLOAT, None))
    sess = session(probe)
    features = sess.run([gemm.input[0]], {"input": split.train.images})[0].astype(np.float64)
    weights = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    w, b = weights[gemm.input[1]], weights[gemm.input[2]]
    labels = np.eye(10)[split.train.labels]
    rng = np.random.default_rng(0)
    for _ in range(epochs):  # plain mini-batch gradient descent on the cross-entropy
        for batch in np.array_split(rng.permutation(len(features)), 20):
            logits = features[batch] @ w.T + b
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            grad = (p - labels[batch]) / len(batch)
            w -= 0.05 * grad.T @ features[batch]
            b -= 0.05 * grad.sum(axis=0)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name == gemm.input[1]:
            init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
        elif init.name == gemm.input[2]:
            init.CopyFrom(numpy_helper.from_array(b.astype(np.float32), init.name))
    return out


def delta(split: DigitsSplit, quick: bool) -> dict[str, Any]:
    """A fine-tune of the classifier head only, shipped as a delta against the previous version."""
    sample = build("digits-cnn", quick=quick, split=split)
    base = serialize(sample.model)
    tuned = _retrain_head(sample.model, split, epochs=3)
    new = serialize(tuned)
    full = encode_model(new)
    diff = encode_model(new, base=base)
    restored = decode_model(
        diff.payload, diff.codec, expected_sha256=diff.sha256, expected_length=diff.length, base=base
    )
    share = len(diff.payload) / len(full.payload)
    return {
        "scenario": "delta-head-only",
        "model": sample.name,
        "full_payload_bytes": len(full.payload),
        "delta_payload_bytes": len(diff.payload),
        "byte_identical": restored == new,
        "accuracy_before": sample.accuracy,
        "accuracy_after": accuracy(tuned, sample.test_inputs, sample.test_labels),
        "targets": [Target("delta / full bundle", share, 0.10, False).as_dict()],
    }


def big_model(megabytes: float) -> bytes:
    """One MatMul of random FP32 weights sized for a bundle of about ``megabytes`` MB.

    Random weights are the worst case for the codecs (they only squeeze a few percent out of the
    exponent bits), so the payload is a little smaller than the file; the weight is sized for that.
    """
    rng = np.random.default_rng(0)
    width = int((megabytes * 1e6 / 4 / 0.93) ** 0.5)
    weight = numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) * 0.02, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["output"])],
        "big",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", width])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return serialize(model)


def throughput(split: DigitsSplit, quick: bool) -> dict[str, Any]:
    """Refresh + download + verify + decode + verify of a ~20 MB bundle from a local store (MB/s)."""
    del split
    model = big_model(5 if quick else 20)
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "store")
        repository = TufRepository(store, KeySet.generate())
        repository.initialize()
        ref = BundleRef("bench", "big", "cpu")
        bundles = build_bundles({"model.onnx": model}, ref, "1", variant_id="0" * 64, lineage={}, recipe=[], metrics={})
        publish_bundles(repository, bundles)
        seconds = []
        transferred = 0
        for run in range(3):
            client = TufClient(StoreFetcher(store), repository.trusted_root(), Path(tmp) / f"meta{run}")
            start = time.perf_counter()
            fetched = fetch_bundle(client, BundleRef("bench", "big", "cpu", "1"))
            seconds.append(time.perf_counter() - start)
            transferred = fetched.transferred_bytes
            assert fetched.files["model.onnx"] == model
    rate = transferred / statistics.median(seconds) / 1e6
    return {
        "scenario": "verify-decode-throughput",
        "runs": len(seconds),
        "bundle_bytes": transferred,
        "decoded_bytes": len(model),
        "seconds_median": statistics.median(seconds),
        "targets": [Target("verify + decode MB/s of bundle bytes (reported)", rate, 0.0, True).as_dict()],
    }


SCENARIOS = {"deep-compression": deep_compression, "huffman-gain": huffman_gain, "delta-head-only": delta,
             "verify-decode-throughput": throughput}  # fmt: skip


def run(quick: bool = False, progress: Any = print) -> dict[str, Any]:
    """Every scenario, in one run."""
    split = load_digits_split()
    started = time.perf_counter()
    results = []
    for name, scenario in SCENARIOS.items():
        progress(f"running {name} ...")
        began = time.perf_counter()
        result = scenario(split, quick)
        result["seconds"] = round(time.perf_counter() - began, 1)
        results.append(result)
    return {"benchmark": MARK, "quick": quick, "machine": machine(), "seconds": round(time.perf_counter() - started, 1),
            "scenarios": results}  # fmt: skip


def markdown(document: dict[str, Any]) -> str:
    """The BENCHMARKS.md table."""
    m = document["machine"]
    lines = [f"Measured on {m['cpu']} ({m['cores']} cores){' — quick run' if document['quick'] else ''}.", "",
             "| scenario | figure | value | target | met |", "|---|---|---|---|---|"]  # fmt: skip
    for scenario in document["scenarios"]:
        for t in scenario["targets"]:
            lines.append(f"| {scenario['scenario']} | {t['name']} | {t['value']:.3f} | {t['rule']} {t['bound']} | "
                         f"{'yes' if t['met'] else '**no**'} |")  # fmt: skip
    lines += ["", "Index bytes of the clustered tensors under each coding (the bundle takes the smallest per tensor):",
              "", "| clustered model | tensors | fixed width | Huffman | sparse run-length Huffman | zstd of indices | "
              "zstd of floats | Huffman saving vs fixed |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for scenario in document["scenarios"]:
        for row in scenario.get("rows", []):
            gain = row["huffman_gain_vs_fixed"] * 100
            cells = [row["model"], row["tensors"], row["fixed"], row["huffman"], row["sparse_huffman"],
                     row["zstd_indices"], row["zstd"], f"{gain:.1f} %"]  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
