"""The artifact-store protocol every backend implements, and content addressing on top of it.

Keys are relative slash-separated paths (``blobs/sha256/<hex>``, ``metadata/1.root.json``); every
read takes a size cap, because a store is not trusted to be small (endless-data defence).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

from edgefleet_core.errors import StoreError, StoreLimitExceeded

MAX_KEY_LENGTH = 1024
_KEY = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
BLOB_PREFIX = "blobs/sha256/"


@dataclass(frozen=True)
class ObjectStat:
    """What a store knows about one object without reading it."""

    key: str
    size: int


def validate_key(key: str) -> str:
    """``key`` if it is a safe relative object key, else :class:`StoreError` naming the problem."""
    if len(key) > MAX_KEY_LENGTH or not _KEY.fullmatch(key) or any(part in (".", "..") for part in key.split("/")):
        raise StoreError(f"invalid object key {key!r}: relative path of [A-Za-z0-9._-] segments, no '.' or '..'")
    return key


class ArtifactStore(Protocol):
    """A flat key → bytes store. Writes are atomic: a reader sees the old object or the whole new one."""

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing what was there."""
        ...

    def create(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` only if nothing is there; ``False`` when something is.

        The store's one compare-and-swap: of writers racing to create a key, exactly one gets
        ``True`` (a local ``link``, an S3 ``If-None-Match: *`` put), across processes and hosts.
        """
        ...

    def get(self, key: str, *, max_bytes: int) -> bytes:
        """The whole object; :class:`StoreNotFound` if absent, :class:`StoreLimitExceeded` if over ``max_bytes``."""
        ...

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (fewer at the end; empty at or past the end)."""
        ...

    def stat(self, key: str) -> ObjectStat | None:
        """Size of the object, or ``None`` if absent."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix``, sorted."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; absent objects are not an error."""
        ...


def blob_key(digest: str) -> str:
    """The key of a content-addressed blob."""
    if not re.fullmatch(r"[a-f0-9]{64}", digest):
        raise StoreError(f"not a sha256 hex digest: {digest!r}")
    return f"{BLOB_PREFIX}{digest}"


def put_blob(store: ArtifactStore, data: bytes) -> str:
    """Store ``data`` by content; returns its sha256 hex. Storing the same bytes twice is a no-op."""
    digest = hashlib.sha256(data).hexdigest()
    key = blob_key(digest)
    existing = store.stat(key)
    if existing is None or existing.size != len(data):
        store.put(key, data)
    return digest


def get_blob(store: ArtifactStore, digest: str, *, max_bytes: int) -> bytes:
    """The blob with that digest, checked against it (a corrupt store is an error, not data)."""
    data = store.get(blob_key(digest), max_bytes=max_bytes)
    if hashlib.sha256(data).hexdigest() != digest:
        raise StoreError(f"blob {digest} is corrupt in the store (content hashes differently)")
    if len(data) > max_bytes:  # backends enforce the cap; this keeps a faulty one honest
        raise StoreLimitExceeded(f"blob {digest} is {len(data)} bytes, over {max_bytes}")
    return data
