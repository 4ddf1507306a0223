"""Bundles: the manifest a device installs by, and the transport encoding of its model files.

``manifest`` is the signed description (file digests and lengths, lineage, recipe, metrics);
``codec`` encodes ONNX files as codebooks + Huffman-coded indices (``huffman``, ours on purpose)
with zstd and raw as fall-backs; ``delta`` makes tensor-level deltas against a previous version.
Decoding is a security boundary: bounded by the signed length, typed errors, sha256 checked last.
"""

from edgefleet_core.bundle.codec import (
    CODECS,
    RAW_CODEC,
    TENSORS_CODEC,
    ZSTD_CODEC,
    EncodedFile,
    TensorStats,
    decode_model,
    encode_model,
)
from edgefleet_core.bundle.delta import choose_encoding, encode_delta
from edgefleet_core.bundle.manifest import (
    BUNDLE_API_VERSION,
    BundleFile,
    BundleManifest,
    FileEncoding,
    ModelRef,
    parse_manifest,
)

__all__ = [
    "BUNDLE_API_VERSION",
    "CODECS",
    "RAW_CODEC",
    "TENSORS_CODEC",
    "ZSTD_CODEC",
    "BundleFile",
    "BundleManifest",
    "EncodedFile",
    "FileEncoding",
    "ModelRef",
    "TensorStats",
    "choose_encoding",
    "decode_model",
    "encode_delta",
    "encode_model",
    "parse_manifest",
]
