"""An in-memory ``ArtifactStore`` for the signing tests: our own seam, faked, with a read counter."""

from __future__ import annotations

from collections import Counter

from edgefleet_core.errors import StoreLimitExceeded, StoreNotFound
from edgefleet_core.store.base import ObjectStat, validate_key


class MemoryStore:
    """Keys → bytes in a dict; ``bytes_served`` counts what each key gave out (endless-data tests)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.bytes_served: Counter[str] = Counter()

    def put(self, key: str, data: bytes) -> None:
        self.objects[validate_key(key)] = bytes(data)

    def create(self, key: str, data: bytes) -> bool:
        if validate_key(key) in self.objects:
            return False
        self.objects[key] = bytes(data)
        return True

    def get(self, key: str, *, max_bytes: int) -> bytes:
        data = self._existing(key)
        if len(data) > max_bytes:
            raise StoreLimitExceeded(f"{key} is {len(data)} bytes, over {max_bytes}")
        self.bytes_served[key] += len(data)
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        chunk = self._existing(key)[offset : offset + length]
        self.bytes_served[key] += len(chunk)
        return chunk

    def stat(self, key: str) -> ObjectStat | None:
        data = self.objects.get(validate_key(key))
        return None if data is None else ObjectStat(key=key, size=len(data))

    def list(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))

    def delete(self, key: str) -> None:
        self.objects.pop(validate_key(key), None)

    def _existing(self, key: str) -> bytes:
        data = self.objects.get(validate_key(key))
        if data is None:
            raise StoreNotFound(key)
        return data
