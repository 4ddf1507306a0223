"""Fuzz target: TUF metadata as the client side reads it (TufClient over StoreFetcher, python-tuf ngclient).

A genuine repository (root, timestamp, snapshot, targets, one target) sits in an in-memory store,
and a device has refreshed from it once. Each input mutates one file the device will read — the
timestamp, the snapshot, the targets metadata, the target itself, a *next* root (``2.root.json``,
which the client always asks for), or the root the device was provisioned with — as bytes (cut,
flipped bit, garbage, another file's bytes) or as a JSON tree (a field deleted, a value swapped for
an extreme one, a key added), and for the tree edits optionally **re-signs** it with the genuine
key of that role, so python-tuf's checks past the signature (versions, expiry, lengths, hashes,
key and role structure) get the mutated values too.

Then the device refreshes and downloads the target. It must either get exactly the genuine bytes
or fail with :class:`VerificationError` (python-tuf's ``RepositoryError``/``DownloadError``
family, wrapped); any other exception is a crash. Its trusted state must survive: after an
unsigned mutation the metadata folder is byte for byte what it was; after a re-signed one every
file in it still parses, and with the genuine repository back the device either refreshes or
refuses with :class:`VerificationError` (a validly signed newer version is a rollback to it).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from securesystemslib.formats import encode_canonical
from tuf.api.metadata import Metadata

from edgefleet_core.errors import VerificationError
from edgefleet_core.signing import KeySet, StoreFetcher, TufClient, TufRepository
from tests.support.json_paths import at
from tests.support.json_paths import paths as json_paths
from tests.support.reliability import fuzz_examples, record_fuzz
from tests.unit.signing.memory_store import MemoryStore

pytestmark = [pytest.mark.reliability, pytest.mark.fuzz]

TARGET = "tuf metadata and targets (client refresh and download)"
MODEL = "cpu-small/fuzz/digits/1.0.0/model.onnx"
MODEL_BYTES = b"\x08\x07onnx-model-bytes" * 64
PREFIX = "tuf/metadata/"
Json = Any


@dataclass
class Repo:
    store: MemoryStore
    keys: KeySet
    trusted_root: bytes
    genuine: dict[str, bytes]
    """The store's objects as published: restored before every input."""
    device: Path
    """A metadata folder that refreshed from the genuine repository: the trusted state to protect."""
    scratch: Path


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    folder = tmp_path_factory.mktemp("fuzz-tuf")
    store = MemoryStore()
    keys = KeySet.generate()
    repository = TufRepository(store, keys)
    repository.initialize()
    repository.publish({MODEL: MODEL_BYTES})
    trusted_root = repository.trusted_root()
    device = folder / "device"
    client = TufClient(StoreFetcher(store), trusted_root, device)
    assert client.download(MODEL, max_length=1 << 20) == MODEL_BYTES
    return Repo(store, keys, trusted_root, dict(store.objects), device, folder / "scratch")


def _state(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# Mutations

_EXTREMES: list[Json] = [None, True, 0, -1, 1, 2, 1 << 31, (1 << 63), -(1 << 63), 10**30, "", "x" * 5000,
                         "1970-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2026-13-45T99:99:99Z", "not a date",
                         "sha256", "ed25519", "../../root.json", [], {}, [{}], {"": {}}, 0.5]  # fmt: skip
_json_values: st.SearchStrategy[Json] = st.recursive(
    st.one_of(st.sampled_from(_EXTREMES), st.integers(), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)


def _mutate_signed(draw: st.DrawFn, signed: dict[str, Json]) -> None:
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in json_paths(signed) if p]
        if not paths:
            return
        path = draw(st.sampled_from(paths))
        parent, key = at(signed, path[:-1]), path[-1]
        kind = draw(st.sampled_from(["replace", "replace", "delete", "add", "bump"]))
        # Copies: sampled_from hands out the same mutable object every time, and an "add" into a
        # value inserted earlier could then put that object inside itself (a cycle).
        if kind == "replace":
            parent[key] = copy.deepcopy(draw(_json_values))
        elif kind == "delete":
            del parent[key]
        elif kind == "add" and isinstance(parent[key], dict):
            parent[key][draw(st.text(max_size=10))] = copy.deepcopy(draw(_json_values))
        elif kind == "bump" and isinstance(parent[key], int) and not isinstance(parent[key], bool):
            parent[key] += draw(st.sampled_from([-2, -1, 1, 2, 1 << 40]))


def _role(filename: str) -> str:
    return filename.rsplit(".", 2)[-2]


def _sign(keys: KeySet, role: str, signed: dict[str, Json]) -> list[dict[str, str]] | None:
    """Signatures by the genuine keys of ``role`` over ``signed``; ``None`` where canonical JSON cannot encode it."""
    try:
        data = str(encode_canonical(signed)).encode()
    except Exception:  # noqa: BLE001 - securesystemslib raises FormatError (floats, odd keys): then no re-signing
        return None
    return [{"keyid": s.public_key.keyid, "sig": s.sign(data).signature} for s in keys.signers(role)]


@dataclass(frozen=True)
class Case:
    key: str
    """The store key replaced (or added)."""
    data: bytes
    resigned: bool
    trusted_root: bytes | None
    """A mutated provisioning root, or ``None`` for the genuine one."""


@st.composite
def _mutated(draw: st.DrawFn, genuine: dict[str, bytes], key: str, where: str, keys: KeySet) -> tuple[bytes, bool]:
    """``genuine[key]`` edited as a JSON tree (re-signed or not), as bytes, or replaced by another file."""
    how = draw(st.sampled_from(["tree", "tree", "bytes", "other-file"]))
    if how == "tree" and where != "target":
        document = json.loads(genuine[key])
        _mutate_signed(draw, document["signed"])
        resigned = False
        if draw(st.booleans()) and where != "trusted-root":
            signatures = _sign(keys, "root" if where == "next-root" else where, document["signed"])
            if signatures is not None:
                document["signatures"], resigned = signatures, True
        return json.dumps(document).encode(), resigned
    if how == "other-file":
        return genuine[draw(st.sampled_from(sorted(genuine)))], False
    out = bytearray(genuine[key])
    at = draw(st.integers(0, len(out) - 1))
    edit = draw(st.sampled_from(["cut", "flip", "garbage"]))
    if edit == "cut":
        del out[at:]
    elif edit == "flip":
        out[at] ^= 1 << draw(st.integers(0, 7))
    else:
        out[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(out), False


@st.composite
def _case(draw: st.DrawFn, genuine: dict[str, bytes], keys: KeySet) -> Case:
    metadata = sorted(k for k in genuine if k.startswith(PREFIX))
    targets = sorted(k for k in genuine if k.startswith("tuf/targets/"))
    root = next(k for k in metadata if k.endswith("1.root.json"))
    where = draw(st.sampled_from(["timestamp", "snapshot", "targets", "target", "next-root", "trusted-root"]))
    if where == "target":
        key = targets[0]
    elif where in ("next-root", "trusted-root"):
        key = root
    else:
        key = next(k for k in metadata if k.endswith(f"{where}.json") and not k.endswith("root.json"))
    data, resigned = draw(_mutated(genuine, key, where, keys))
    if where == "next-root":
        return Case(key.replace("1.root.json", "2.root.json"), data, resigned, None)
    if where == "trusted-root":
        return Case(key, genuine[key], False, data)
    return Case(key, data, resigned, None)


@pytest.fixture(scope="module")
def executions() -> Iterator[Counter[str]]:
    counts: Counter[str] = Counter()
    yield counts
    for target, count in counts.items():
        record_fuzz(target, executions=count, crashes_fixed=[])


@settings(max_examples=fuzz_examples(250), deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_metadata_ends_in_a_verification_error_and_keeps_the_trusted_state(
    repo: Repo, executions: Counter[str], data: st.DataObject
) -> None:
    case = data.draw(_case(repo.genuine, repo.keys))
    executions[TARGET] += 1
    repo.store.objects = dict(repo.genuine)
    repo.store.objects[case.key] = case.data
    if repo.scratch.exists():
        shutil.rmtree(repo.scratch)
    shutil.copytree(repo.device, repo.scratch)
    before = _state(repo.scratch)
    trusted_root = case.trusted_root if case.trusted_root is not None else repo.trusted_root
    try:
        client = TufClient(StoreFetcher(repo.store), trusted_root, repo.scratch)
        got = client.download(MODEL, max_length=1 << 20)
    except VerificationError:
        got = None
    if got is not None:
        # Accepted (a mutation that kept every signed fact): then exactly the genuine target.
        assert got == MODEL_BYTES
        return
    after = _state(repo.scratch)
    if not case.resigned:
        assert after == before, "an unsigned mutation changed the device's trusted metadata"
        return
    for name, content in after.items():
        if name.endswith(".json"):
            Metadata.from_bytes(content)  # nothing half-written or unverified
    repo.store.objects = dict(repo.genuine)
    # A validly re-signed newer version may have been trusted: the genuine one then reads as a rollback.
    with contextlib.suppress(VerificationError):
        client = TufClient(StoreFetcher(repo.store), repo.trusted_root, repo.scratch)
        assert client.download(MODEL, max_length=1 << 20) == MODEL_BYTES


def test_a_mutated_provisioning_root_is_a_verification_error(repo: Repo, tmp_path: Path) -> None:
    """The one input a device does not fetch: the bootstrap root it was installed with."""
    document = json.loads(repo.trusted_root)
    broken = copy.deepcopy(document)
    broken["signed"]["roles"]["root"]["threshold"] = 0
    for bad in (b"", b"{}", repo.trusted_root[:-1], json.dumps(broken).encode()):
        with pytest.raises(VerificationError):
            TufClient(StoreFetcher(repo.store), bad, tmp_path / hashlib.sha256(bad).hexdigest())
