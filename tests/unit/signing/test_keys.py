"""Key sets in files (CLI) and in Kubernetes Secret data (operator)."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from edgefleet_core.errors import SigningError
from edgefleet_core.signing import KeySet
from edgefleet_core.signing.keys import ROLES


def _ids(keys: KeySet) -> dict[str, list[str]]:
    return {role: [k.keyid for k in keys.public_keys(role)] for role in ROLES}


@pytest.fixture
def keys() -> KeySet:
    return KeySet.generate(root_keys=3, root_threshold=2)


def test_generate_gives_distinct_ed25519_keys(keys: KeySet) -> None:
    every = [k for role in ROLES for k in keys.public_keys(role)]
    assert len({k.keyid for k in every}) == 6
    assert {k.keytype for k in every} == {"ed25519"}
    assert keys.root_threshold == 2


@pytest.mark.parametrize(("count", "threshold"), [(0, 1), (1, 2), (3, 0)])
def test_generate_refuses_impossible_thresholds(count: int, threshold: int) -> None:
    with pytest.raises(SigningError):
        KeySet.generate(root_keys=count, root_threshold=threshold)


def test_save_and_load_round_trip_with_private_permissions(keys: KeySet, tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    keys.save(directory)
    loaded = KeySet.load(directory)
    assert _ids(loaded) == _ids(keys)
    assert loaded.root_threshold == 2
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    names = sorted(p.name for p in directory.iterdir())
    assert names == sorted(["keys.json", *(f"{k}.pem" for ks in _ids(keys).values() for k in ks)])
    assert {stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()} == {0o600}
    # The loaded keys sign what the originals' public keys verify.
    signature = loaded.targets.sign(b"payload")
    keys.targets.public_key.verify_signature(signature, b"payload")


def test_save_refuses_to_overwrite_a_key_set_unless_told(keys: KeySet, tmp_path: Path) -> None:
    keys.save(tmp_path)
    replacement = KeySet.generate()
    with pytest.raises(SigningError, match="refusing to overwrite"):
        replacement.save(tmp_path)
    assert _ids(KeySet.load(tmp_path)) == _ids(keys)
    replacement.save(tmp_path, overwrite=True)
    assert _ids(KeySet.load(tmp_path)) == _ids(replacement)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_secret_data_round_trip(keys: KeySet) -> None:
    data = keys.to_secret_data()
    assert "keys.json" in data
    assert all(isinstance(v, str) for v in data.values())
    assert json.loads(base64.b64decode(data["keys.json"]))["roles"]["root"]["threshold"] == 2
    assert _ids(KeySet.from_secret_data(data)) == _ids(keys)


def test_secret_data_and_files_hold_the_same_bytes(keys: KeySet, tmp_path: Path) -> None:
    keys.save(tmp_path)
    for name, encoded in keys.to_secret_data(online_only=False).items():
        assert (tmp_path / name).read_bytes() == base64.b64decode(encoded)


def test_the_operator_secret_holds_no_root_private_key(keys: KeySet) -> None:
    from edgefleet_core.signing.repository import TufRepository
    from tests.unit.signing.memory_store import MemoryStore

    data = keys.to_secret_data()
    root_ids = {k.keyid for k in keys.public_keys("root")}
    assert not any(name == f"{keyid}.pem" for name in data for keyid in root_ids)
    online = KeySet.from_secret_data(data)
    assert online.online_only
    assert online.public_keys("root") == keys.public_keys("root")
    store = MemoryStore()
    TufRepository(store, keys).initialize()
    TufRepository(store, online).publish({"c/ns/m/1/model.onnx": b"model"})  # publishing needs no root key
    with pytest.raises(SigningError, match="root private keys are not in this key set"):
        TufRepository(store, online).rotate_root(KeySet.generate())


def test_a_public_root_key_filed_under_another_id_is_refused(keys: KeySet) -> None:
    data = keys.to_secret_data()
    other = KeySet.generate().to_secret_data()
    ours = next(name for name in data if name.endswith(".pub.json"))
    theirs = next(name for name in other if name.endswith(".pub.json"))
    data[ours] = other[theirs]
    with pytest.raises(SigningError, match="is another key"):
        KeySet.from_secret_data(data)


def test_secret_data_with_bad_base64_is_refused(keys: KeySet) -> None:
    data = keys.to_secret_data()
    data["keys.json"] = "not base64!"
    with pytest.raises(SigningError, match="base64"):
        KeySet.from_secret_data(data)


def test_missing_key_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SigningError, match=r"keys\.json is missing"):
        KeySet.load(tmp_path / "nowhere")


def test_corrupt_key_file_is_refused(keys: KeySet, tmp_path: Path) -> None:
    keys.save(tmp_path)
    victim = tmp_path / f"{keys.snapshot.public_key.keyid}.pem"
    victim.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SigningError, match="not an unencrypted PEM private key"):
        KeySet.load(tmp_path)


def test_missing_key_file_is_refused(keys: KeySet, tmp_path: Path) -> None:
    keys.save(tmp_path)
    second_root = keys.public_keys("root")[1].keyid
    (tmp_path / f"{second_root}.pem").unlink()
    with pytest.raises(SigningError, match="is missing"):
        KeySet.load(tmp_path)


def test_key_of_the_wrong_type_is_refused(keys: KeySet, tmp_path: Path) -> None:
    keys.save(tmp_path)
    ecdsa = ec.generate_private_key(ec.SECP256R1()).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    (tmp_path / f"{keys.timestamp.public_key.keyid}.pem").write_bytes(ecdsa)
    with pytest.raises(SigningError, match="not an Ed25519 key"):
        KeySet.load(tmp_path)


def test_key_swapped_for_another_is_refused(keys: KeySet, tmp_path: Path) -> None:
    keys.save(tmp_path)
    (tmp_path / f"{keys.timestamp.public_key.keyid}.pem").write_bytes(keys.targets.private_bytes)
    with pytest.raises(SigningError, match="not the one its name says"):
        KeySet.load(tmp_path)


@pytest.mark.parametrize(
    "index",
    [
        b"{not json",
        b"[]",
        b'{"format": "something-else/1", "roles": {}}',
        b'{"format": "edgefleet-tuf-keys/1", "roles": {"root": {"keyids": [], "threshold": 1}}}',
    ],
)
def test_corrupt_index_is_refused(keys: KeySet, tmp_path: Path, index: bytes) -> None:
    keys.save(tmp_path)
    (tmp_path / "keys.json").write_bytes(index)
    with pytest.raises(SigningError, match=r"keys\.json"):
        KeySet.load(tmp_path)


def test_index_with_an_impossible_threshold_is_refused(keys: KeySet, tmp_path: Path) -> None:
    keys.save(tmp_path)
    index = json.loads((tmp_path / "keys.json").read_bytes())
    index["roles"]["root"]["threshold"] = 4
    (tmp_path / "keys.json").write_text(json.dumps(index))
    with pytest.raises(SigningError, match="threshold 4"):
        KeySet.load(tmp_path)


def test_repr_shows_no_key_material(keys: KeySet) -> None:
    text = repr(keys)
    assert keys.targets.public_key.keyid in text
    assert "PRIVATE" not in text


def test_a_mounted_operator_secret_loads_as_a_folder(keys: KeySet, tmp_path: Path) -> None:
    # What Kubernetes mounts for `edgefleet keys secret`: the files, plus its own `..data` entries.
    for name, encoded in keys.to_secret_data().items():
        (tmp_path / name).write_bytes(base64.b64decode(encoded))
    (tmp_path / "..data").mkdir()
    online = KeySet.load(tmp_path)
    assert online.online_only
    assert online.public_keys("root") == keys.public_keys("root")
    assert _ids(online) == _ids(keys)
