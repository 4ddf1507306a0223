"""Publishing with the real repository and reading back with the real client: the happy paths."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from edgefleet_core.errors import SigningError, VerificationError
from edgefleet_core.signing import KeySet, StoreFetcher, TufClient, TufRepository
from tests.unit.signing.conftest import CUSTOM, MODEL, MODEL_BYTES, World


def test_publish_then_download_is_byte_identical(world: World) -> None:
    assert world.client().download(MODEL, max_length=len(MODEL_BYTES)) == MODEL_BYTES


def test_custom_fields_reach_the_client(world: World) -> None:
    info = world.client().target_info(MODEL)
    assert info is not None
    assert info.custom == CUSTOM
    assert info.length == len(MODEL_BYTES)
    assert info.hashes == {"sha256": hashlib.sha256(MODEL_BYTES).hexdigest()}


def test_store_layout_is_consistent_snapshot(world: World) -> None:
    digest = hashlib.sha256(MODEL_BYTES).hexdigest()
    assert world.store.list("tuf/") == [
        "tuf/metadata/1.root.json",
        "tuf/metadata/1.snapshot.json",
        "tuf/metadata/1.targets.json",
        "tuf/metadata/2.snapshot.json",
        "tuf/metadata/2.targets.json",
        "tuf/metadata/timestamp.json",
        f"tuf/targets/cpu-small/default/digits/1.0.0/{digest}.model.onnx",
    ]
    assert world.repo.versions().targets == 2


def test_targets_for_lists_by_prefix_and_publish_adds(world: World) -> None:
    other = "cpu-small/default/digits/1.1.0/model.onnx"
    gpu = "gpu-large/default/digits/1.0.0/model.onnx"
    world.repo.publish({other: b"v1.1", gpu: b"gpu"}, {other: {"version": "1.1.0"}})
    client = world.client()
    assert [t.path for t in client.targets_for("cpu-small/")] == [MODEL, other]
    assert [t.path for t in client.targets_for("")] == [MODEL, other, gpu]
    assert client.targets_for("arm/") == []
    assert client.download(other, max_length=100) == b"v1.1"


def test_republishing_a_path_replaces_it(world: World) -> None:
    world.repo.publish({MODEL: b"fixed"})
    client = world.client()
    assert client.download(MODEL, max_length=100) == b"fixed"
    info = client.target_info(MODEL)
    assert info is not None
    assert info.custom is None


def test_unknown_target_is_none_and_cannot_be_downloaded(world: World) -> None:
    client = world.client()
    assert client.target_info("cpu-small/default/nope/1/model.onnx") is None
    with pytest.raises(VerificationError, match="not listed"):
        client.download("cpu-small/default/nope/1/model.onnx", max_length=10)


def test_download_over_the_callers_limit_is_refused_before_fetching(world: World) -> None:
    with pytest.raises(VerificationError, match="over the limit"):
        world.client().download(MODEL, max_length=len(MODEL_BYTES) - 1)
    assert not any(key.startswith("tuf/targets/") for key in world.store.bytes_served)


def test_targets_dir_caches_verified_targets(world: World, tmp_path: Path) -> None:
    def client() -> TufClient:
        return TufClient(StoreFetcher(world.store), world.trusted_root, tmp_path / "m", tmp_path / "t")

    assert client().download(MODEL, max_length=10_000) == MODEL_BYTES
    target_keys = [k for k in world.store.bytes_served if k.startswith("tuf/targets/")]
    served = sum(world.store.bytes_served[k] for k in target_keys)
    assert client().download(MODEL, max_length=10_000) == MODEL_BYTES
    assert sum(world.store.bytes_served[k] for k in target_keys) == served  # second read: the cache
    cached = next((tmp_path / "t").iterdir())
    cached.write_bytes(b"tampered on disk")
    assert client().download(MODEL, max_length=10_000) == MODEL_BYTES  # a bad cache entry is re-fetched


def test_refresh_timestamp_bumps_only_what_is_needed(world: World) -> None:
    before = world.repo.versions()
    after = world.repo.refresh_timestamp()
    assert after.timestamp == before.timestamp + 1
    assert (after.snapshot, after.targets) == (before.snapshot, before.targets)
    assert world.client().download(MODEL, max_length=10_000) == MODEL_BYTES


def test_initialize_twice_is_refused(world: World) -> None:
    with pytest.raises(SigningError, match="already exists"):
        world.repo.initialize()


def test_publish_without_initialize_is_refused(world: World) -> None:
    fresh = TufRepository(world.store, world.keys, prefix="other/")
    with pytest.raises(SigningError, match="initialize it first"):
        fresh.publish({MODEL: b"x"})


def test_keys_the_root_does_not_name_cannot_publish(world: World) -> None:
    stranger = TufRepository(world.store, KeySet.generate())
    with pytest.raises(SigningError, match="cannot sign"):
        stranger.publish({MODEL: b"x"})


@pytest.mark.parametrize("path", ["/abs/model.onnx", "a/../b", "a//b", "a/b c", ""])
def test_unsafe_target_paths_are_refused(world: World, path: str) -> None:
    with pytest.raises(SigningError, match="invalid target path"):
        world.repo.publish({path: b"x"})


def test_custom_fields_for_unpublished_targets_are_refused(world: World) -> None:
    with pytest.raises(SigningError, match="not published"):
        world.repo.publish({MODEL: b"x"}, {"other/file": {"model": "m"}})


def test_custom_fields_that_are_not_json_are_refused_before_anything_is_written(world: World) -> None:
    before = dict(world.store.objects)
    with pytest.raises(SigningError, match="not JSON"):
        world.repo.publish({"a/b": b"x"}, {"a/b": {"when": object()}})
    assert world.store.objects == before


def test_a_malformed_trusted_root_is_refused(world: World, tmp_path: Path) -> None:
    with pytest.raises(VerificationError) as caught:
        TufClient(StoreFetcher(world.store), b"{not json", tmp_path / "m")
    assert caught.value.what == "trusted root"
    assert caught.value.reason.startswith("DeserializationError")


def test_a_repository_under_another_prefix_is_independent(make_world: Callable[..., World], tmp_path: Path) -> None:
    made = make_world()
    other = TufRepository(made.store, made.keys, prefix="fleet-b/tuf/")
    other.initialize()
    other.publish({MODEL: b"b"})
    client = TufClient(StoreFetcher(made.store, "fleet-b/tuf/"), other.trusted_root(), tmp_path / "b")
    assert client.download(MODEL, max_length=10) == b"b"
    assert made.client().target_info(MODEL) is None


def test_rotating_only_the_root_keys_keeps_the_online_keys(world: World) -> None:
    fresh = KeySet.generate(root_keys=2, root_threshold=2)
    new_keys = KeySet(fresh.root, 2, world.keys.targets, world.keys.snapshot, world.keys.timestamp)
    device = world.client("device")
    device.refresh()
    versions = world.repo.rotate_root(new_keys)
    assert versions.root == 2
    world.repo.publish({MODEL: b"v"})
    assert world.client("device").download(MODEL, max_length=10) == b"v"
    assert world.repo.trusted_root() == world.store.objects["tuf/metadata/2.root.json"]
