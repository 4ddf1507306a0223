"""Tensor-level deltas: version N+1 of a model as "same as base tensor …" plus the tensors that changed.

A delta is an ``edgefleet-tensors-v1`` payload with the delta flag set and the sha256 of the decoded
base file in its header. Unchanged initializers become references to the base's tensor (by index,
with the tensor's sha256, checked on decode); an unchanged skeleton is referenced too, and a changed
one is zstd-compressed against the base skeleton as a dictionary. Decoding needs the base file and
checks its sha256 before anything else, so a device holding another version gets a typed error.
"""

from __future__ import annotations

from edgefleet_core.bundle.codec import EncodedFile, encode_model, encode_tensors


def encode_delta(new: bytes, base: bytes) -> EncodedFile:
    """``new`` as a delta against ``base``; :class:`BundleError` if either cannot be rebuilt exactly."""
    return encode_tensors(new, base)


def choose_encoding(new: bytes, base: bytes | None) -> EncodedFile:
    """The smaller of the full encoding of ``new`` and its delta against ``base`` (when there is one)."""
    return encode_model(new, base=base)
