"""What an attacker does to a repository in the store: rewrite bytes, re-sign with keys it holds."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from securesystemslib.signer import Signer  # type: ignore[attr-defined]
from tuf.api.metadata import Metadata, MetaFile  # type: ignore[attr-defined]

from tests.unit.signing.memory_store import MemoryStore

PREFIX = "tuf/"


def metadata_key(filename: str) -> str:
    return f"{PREFIX}metadata/{filename}"


def read(store: MemoryStore, filename: str) -> Metadata[Any]:
    return Metadata.from_bytes(store.objects[metadata_key(filename)])


def write(store: MemoryStore, filename: str, metadata: Metadata[Any], signers: Iterable[Signer]) -> bytes:
    """Sign ``metadata`` with exactly ``signers`` and put it under ``filename``; returns the bytes."""
    metadata.signatures.clear()
    for signer in signers:
        metadata.sign(signer, append=True)
    data = metadata.to_bytes()
    store.objects[metadata_key(filename)] = data
    return data


def metafile(metadata: Metadata[Any]) -> MetaFile:
    data = metadata.to_bytes()
    return MetaFile(metadata.signed.version, len(data), {"sha256": hashlib.sha256(data).hexdigest()})
