"""One test per attack TUF defends against, the way python-tuf tests them: publish with the real
repository, tamper with the bytes in the store (re-signing with whatever keys the attacker holds),
then refresh or download with a client and expect a refusal naming python-tuf's error class."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest

from edgefleet_core.errors import VerificationError
from edgefleet_core.signing import KeySet, TufClient
from edgefleet_core.signing.fetcher import CHUNK_BYTES
from tests.unit.signing import tamper
from tests.unit.signing.conftest import MODEL, MODEL_BYTES, World


def _refused(action: Callable[[], object], *reasons: str) -> VerificationError:
    with pytest.raises(VerificationError) as caught:
        action()
    assert caught.value.reason.split(":")[0] in reasons, caught.value.reason
    return caught.value


def _target_key() -> str:
    digest = hashlib.sha256(MODEL_BYTES).hexdigest()
    return f"tuf/targets/{MODEL.rpartition('/')[0]}/{digest}.model.onnx"


def test_tampered_target_is_refused(world: World) -> None:
    data = bytearray(world.store.objects[_target_key()])
    data[0] ^= 0xFF  # same length, different bytes
    world.store.objects[_target_key()] = bytes(data)
    error = _refused(lambda: world.client().download(MODEL, max_length=10_000), "LengthOrHashMismatchError")
    assert error.what == MODEL


def test_tampered_timestamp_fails_its_signature(world: World) -> None:
    key = tamper.metadata_key("timestamp.json")
    expires = json.loads(world.store.objects[key])["signed"]["expires"]
    # An edit to a signed field, same length, not re-signed.
    world.store.objects[key] = world.store.objects[key].replace(expires.encode(), b"2099-01-01T00:00:00Z")
    _refused(world.client().refresh, "UnsignedMetadataError")


def test_tampered_targets_metadata_is_refused(world: World) -> None:
    # Pointing the model at other bytes (same length): the snapshot pins targets.json's hash, and
    # the signature would not verify either.
    key = tamper.metadata_key(f"{world.repo.versions().targets}.targets.json")
    digest = hashlib.sha256(MODEL_BYTES).hexdigest().encode()
    world.store.objects[key] = world.store.objects[key].replace(digest, hashlib.sha256(b"evil").hexdigest().encode())
    _refused(world.client().refresh, "LengthOrHashMismatchError")


def test_timestamp_signed_with_a_wrong_key_is_refused(world: World) -> None:
    timestamp = tamper.read(world.store, "timestamp.json")
    timestamp.signed.version += 1
    tamper.write(world.store, "timestamp.json", timestamp, KeySet.generate().signers("timestamp"))
    _refused(world.client().refresh, "UnsignedMetadataError")


def test_targets_signed_with_a_wrong_key_is_refused_even_with_genuine_online_keys(world: World) -> None:
    # The attacker holds the snapshot and timestamp keys (the online ones) but not the targets key.
    versions = world.repo.versions()
    targets = tamper.read(world.store, f"{versions.targets}.targets.json")
    targets.signed.version += 1
    targets.signed.targets[MODEL].hashes["sha256"] = hashlib.sha256(b"evil").hexdigest()
    tamper.write(world.store, f"{targets.signed.version}.targets.json", targets, KeySet.generate().signers("targets"))
    snapshot = tamper.read(world.store, f"{versions.snapshot}.snapshot.json")
    snapshot.signed.version += 1
    snapshot.signed.meta["targets.json"] = tamper.metafile(targets)
    tamper.write(world.store, f"{snapshot.signed.version}.snapshot.json", snapshot, world.keys.signers("snapshot"))
    timestamp = tamper.read(world.store, "timestamp.json")
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = tamper.metafile(snapshot)
    tamper.write(world.store, "timestamp.json", timestamp, world.keys.signers("timestamp"))
    error = _refused(world.client().refresh, "UnsignedMetadataError")
    assert "targets" in error.reason


def test_new_root_signed_below_the_threshold_is_refused(make_world: Callable[..., World]) -> None:
    made = make_world(root_keys=3, root_threshold=2)
    attacker = KeySet.generate()
    root = tamper.read(made.store, "1.root.json")
    root.signed.version = 2
    for role in ("root", "targets", "snapshot", "timestamp"):
        for keyid in list(root.signed.roles[role].keyids):
            root.signed.revoke_key(keyid, role)
        for key in attacker.public_keys(role):
            root.signed.add_key(key, role)
    # One stolen root key of three (threshold 2), plus the attacker's own new root key.
    tamper.write(made.store, "2.root.json", root, (made.keys.signers("root")[0], attacker.signers("root")[0]))
    error = _refused(made.client().refresh, "UnsignedMetadataError")
    assert "1/2" in error.reason


def test_rollback_of_the_timestamp_is_refused(world: World) -> None:
    client = world.client("device")
    client.refresh()
    old_timestamp = world.store.objects[tamper.metadata_key("timestamp.json")]
    world.repo.publish({MODEL: b"version 3"})
    world.client("device").refresh()
    # A mirror serves the whole older repository state again.
    world.store.objects[tamper.metadata_key("timestamp.json")] = old_timestamp
    _refused(world.client("device").refresh, "BadVersionNumberError")


def test_rollback_of_the_snapshot_is_refused(world: World) -> None:
    old_snapshot_meta = tamper.read(world.store, "timestamp.json").signed.snapshot_meta
    world.repo.publish({MODEL: b"version 3"})
    world.client("device").refresh()
    # The attacker holds the timestamp key and points a fresh timestamp at the older snapshot.
    timestamp = tamper.read(world.store, "timestamp.json")
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = old_snapshot_meta
    tamper.write(world.store, "timestamp.json", timestamp, world.keys.signers("timestamp"))
    error = _refused(world.client("device").refresh, "BadVersionNumberError")
    assert "snapshot" in error.reason


def test_rollback_of_targets_is_refused(world: World) -> None:
    old_targets_meta = tamper.read(world.store, f"{world.repo.versions().snapshot}.snapshot.json").signed.meta[
        "targets.json"
    ]
    world.repo.publish({MODEL: b"version 3"})
    world.client("device").refresh()
    # Snapshot and timestamp keys stolen: a new snapshot lists the older targets version.
    snapshot = tamper.read(world.store, f"{world.repo.versions().snapshot}.snapshot.json")
    snapshot.signed.version += 1
    snapshot.signed.meta["targets.json"] = old_targets_meta
    tamper.write(world.store, f"{snapshot.signed.version}.snapshot.json", snapshot, world.keys.signers("snapshot"))
    timestamp = tamper.read(world.store, "timestamp.json")
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = tamper.metafile(snapshot)
    tamper.write(world.store, "timestamp.json", timestamp, world.keys.signers("timestamp"))
    error = _refused(world.client("device").refresh, "BadVersionNumberError")
    assert "targets" in error.reason


def test_freeze_an_expired_timestamp_is_refused(make_world: Callable[..., World], now: datetime) -> None:
    # Signed two days ago with the default one-day timestamp expiry: a frozen mirror.
    made = make_world(clock=lambda: now - timedelta(days=2))
    made.repo.publish({MODEL: MODEL_BYTES})
    error = _refused(made.client().refresh, "ExpiredMetadataError")
    assert "timestamp" in error.reason


def test_freeze_ends_when_the_timestamp_is_refreshed(make_world: Callable[..., World], now: datetime) -> None:
    signed_at = [now - timedelta(days=8)]
    made = make_world(clock=lambda: signed_at[0])
    made.repo.publish({MODEL: MODEL_BYTES})
    signed_at[0] = now
    versions = made.repo.refresh_timestamp()
    assert versions.snapshot == 3  # the eight-day-old snapshot had lapsed too, so it was renewed
    assert made.client().download(MODEL, max_length=10_000) == MODEL_BYTES


def test_mix_and_match_targets_not_matching_the_snapshot_is_refused(world: World) -> None:
    version = world.repo.versions().targets
    world.repo.publish({MODEL: b"version 3"})
    # Serve the previous targets under the name the snapshot pins for the current one.
    world.store.objects[tamper.metadata_key(f"{version + 1}.targets.json")] = world.store.objects[
        tamper.metadata_key(f"{version}.targets.json")
    ]
    # The snapshot pins the length and hash of targets.json: the longer old file is cut off at the
    # pinned length; one of the same length would fail the hash.
    _refused(world.client().refresh, "DownloadLengthMismatchError", "LengthOrHashMismatchError")


def test_mix_and_match_targets_version_not_the_one_the_snapshot_names_is_refused(world: World) -> None:
    # With the snapshot and timestamp keys, the attacker pins the genuine older targets file's
    # length and hash under the newer version's name: only the version check is left to catch it.
    old_version = world.repo.versions().targets
    old_targets = world.store.objects[tamper.metadata_key(f"{old_version}.targets.json")]
    versions = world.repo.publish({MODEL: b"version 3"})
    world.store.objects[tamper.metadata_key(f"{versions.targets}.targets.json")] = old_targets
    snapshot = tamper.read(world.store, f"{versions.snapshot}.snapshot.json")
    snapshot.signed.version += 1
    snapshot.signed.meta["targets.json"] = tamper.metafile(tamper.read(world.store, f"{old_version}.targets.json"))
    snapshot.signed.meta["targets.json"].version = versions.targets
    tamper.write(world.store, f"{snapshot.signed.version}.snapshot.json", snapshot, world.keys.signers("snapshot"))
    timestamp = tamper.read(world.store, "timestamp.json")
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = tamper.metafile(snapshot)
    tamper.write(world.store, "timestamp.json", timestamp, world.keys.signers("timestamp"))
    error = _refused(world.client().refresh, "BadVersionNumberError")
    assert f"targets v{versions.targets}, got v{old_version}" in error.reason


def test_endless_target_stops_at_the_signed_length(world: World) -> None:
    world.store.objects[_target_key()] = MODEL_BYTES + b"\0" * (8 * CHUNK_BYTES)
    world.store.bytes_served.clear()
    _refused(lambda: world.client().download(MODEL, max_length=10_000), "DownloadLengthMismatchError")
    assert world.store.bytes_served[_target_key()] <= len(MODEL_BYTES) + CHUNK_BYTES


def test_endless_metadata_stops_at_its_cap(world: World) -> None:
    key = tamper.metadata_key("timestamp.json")
    world.store.objects[key] = b" " * (4 * CHUNK_BYTES)
    world.store.bytes_served.clear()
    _refused(world.client().refresh, "DownloadLengthMismatchError")
    assert world.store.bytes_served[key] <= CHUNK_BYTES


def test_root_rotation(make_world: Callable[..., World]) -> None:
    made = make_world(root_keys=3, root_threshold=2)
    made.repo.publish({MODEL: MODEL_BYTES})
    made.client("device").refresh()
    old_keys, new_keys = made.keys, KeySet.generate(root_keys=3, root_threshold=2)

    made.repo.rotate_root(new_keys)
    made.repo.publish({MODEL: b"after rotation"})  # signed with the new keys only

    # A device provisioned with root v1 walks to v2 and accepts what the new keys signed.
    device: TufClient = made.client("device")
    assert device.download(MODEL, max_length=100) == b"after rotation"
    assert (made.tmp / "device" / "metadata" / "root_history" / "2.root.json").is_file()
    assert made.client().download(MODEL, max_length=100) == b"after rotation"  # and a fresh one too

    # The rotated-out timestamp key no longer counts.
    timestamp = tamper.read(made.store, "timestamp.json")
    timestamp.signed.version += 1
    tamper.write(made.store, "timestamp.json", timestamp, old_keys.signers("timestamp"))
    _refused(made.client("device").refresh, "UnsignedMetadataError")

    # Nor do the rotated-out root keys, even all of them together.
    root = tamper.read(made.store, "2.root.json")
    root.signed.version = 3
    tamper.write(made.store, "3.root.json", root, old_keys.signers("root"))
    _refused(made.client("device").refresh, "UnsignedMetadataError")


def test_rotation_is_readable_before_the_new_root_is_written(make_world: Callable[..., World]) -> None:
    # rotate_root writes the dual-signed targets/snapshot/timestamp first and the new root last: a
    # reader in between (simulated by removing the new root) still verifies everything.
    made = make_world()
    made.repo.publish({MODEL: MODEL_BYTES})
    made.repo.rotate_root(KeySet.generate())
    del made.store.objects[tamper.metadata_key("2.root.json")]
    assert made.client().download(MODEL, max_length=10_000) == MODEL_BYTES


def test_rotation_needs_the_old_root_threshold(make_world: Callable[..., World]) -> None:
    from edgefleet_core.errors import SigningError

    made = make_world(root_keys=3, root_threshold=2)
    with pytest.raises(SigningError, match="cannot sign root"):
        type(made.repo)(made.store, KeySet.generate()).rotate_root(KeySet.generate())
