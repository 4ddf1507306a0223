"""The publisher trusts only metadata its own keys signed: the store cannot make it sign an attacker's targets."""

from __future__ import annotations

import pytest
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]
from tuf.api.metadata import Snapshot, Targets, Timestamp  # type: ignore[attr-defined]

from edgefleet_core.errors import VerificationError
from tests.unit.signing.conftest import MODEL, World
from tests.unit.signing.tamper import metadata_key, metafile, read, write


def test_unsigned_edits_to_targets_are_refused_before_anything_is_signed(world: World) -> None:
    versions = world.repo.versions()
    name = f"{versions.targets}.targets.json"
    key = metadata_key(name)
    # Drop the published model from targets.json without re-signing (same version, same file).
    world.store.objects[key] = world.store.objects[key].replace(
        b'"cpu-small/default/digits', b'"cpu-small/default/digitz'
    )
    before = dict(world.store.objects)
    with pytest.raises(VerificationError):
        world.repo.publish({"cpu-small/default/other/1/model.onnx": b"x" * 10})
    assert world.store.objects == before  # nothing was signed or written


def test_metadata_signed_by_an_attacker_key_is_refused(world: World) -> None:
    attacker = CryptoSigner.generate_ed25519()
    targets = read(world.store, f"{world.repo.versions().targets}.targets.json")
    assert isinstance(targets.signed, Targets)
    targets.signed.targets.pop(MODEL)
    targets.signed.version += 1
    write(world.store, f"{targets.signed.version}.targets.json", targets, [attacker])
    snapshot = read(world.store, f"{world.repo.versions().snapshot}.snapshot.json")
    assert isinstance(snapshot.signed, Snapshot)
    snapshot.signed.meta["targets.json"] = metafile(targets)
    snapshot.signed.version += 1
    write(world.store, f"{snapshot.signed.version}.snapshot.json", snapshot, [attacker])
    timestamp = read(world.store, "timestamp.json")
    assert isinstance(timestamp.signed, Timestamp)
    timestamp.signed.snapshot_meta = metafile(snapshot)
    timestamp.signed.version += 1
    write(world.store, "timestamp.json", timestamp, [attacker])
    with pytest.raises(VerificationError, match="signed by 0 of this repository's keys"):
        world.repo.publish({"cpu-small/default/other/1/model.onnx": b"x" * 10})
