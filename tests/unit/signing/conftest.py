"""A published repository in an in-memory store, and clients that read it, for the signing tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edgefleet_core.signing import KeySet, StoreFetcher, TufClient, TufRepository
from tests.unit.signing.memory_store import MemoryStore

MODEL = "cpu-small/default/digits/1.0.0/model.onnx"
MODEL_BYTES = b"\x08\x07onnx-model-bytes" * 64
CUSTOM = {"deviceClass": "cpu-small", "model": "digits", "version": "1.0.0"}


@dataclass
class World:
    """One repository, its store, and the root a device was provisioned with."""

    store: MemoryStore
    keys: KeySet
    repo: TufRepository
    trusted_root: bytes
    tmp: Path
    clients: int = field(default=0)

    def client(self, state: str | None = None) -> TufClient:
        """A client with its own metadata directory, or the one named ``state`` (kept across calls)."""
        if state is None:
            self.clients += 1
            state = f"device-{self.clients}"
        return TufClient(StoreFetcher(self.store), self.trusted_root, self.tmp / state / "metadata")


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def make_world(tmp_path: Path, now: datetime) -> Callable[..., World]:
    def make(*, root_keys: int = 1, root_threshold: int = 1, clock: Callable[[], datetime] | None = None) -> World:
        store = MemoryStore()
        keys = KeySet.generate(root_keys=root_keys, root_threshold=root_threshold)
        repo = TufRepository(store, keys, clock=clock or (lambda: now))
        repo.initialize()
        return World(store=store, keys=keys, repo=repo, trusted_root=repo.trusted_root(), tmp=tmp_path)

    return make


@pytest.fixture
def world(make_world: Callable[..., World]) -> World:
    """A repository with one published model file."""
    made = make_world()
    made.repo.publish({MODEL: MODEL_BYTES}, {MODEL: CUSTOM})
    return made
