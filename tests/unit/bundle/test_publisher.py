"""The Publisher against real TUF repositories in a LocalStore, read back the way a device reads them."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgefleet_core.bundle.distribution import BundleRef, build_bundles, fetch_bundle, publish_bundles
from edgefleet_core.bundle.publisher import BUILD_KEY, PublishedVariant, Publisher
from edgefleet_core.errors import BundleError, BundleVerificationError, SigningError, VerificationError
from edgefleet_core.signing import KeySet, StoreFetcher, TufClient, TufRepository
from edgefleet_core.store.local import LocalStore
from tests.support.tiny_models import tiny_cnn

VARIANT = "ab" * 32
KEY_A = hashlib.sha256(b"build inputs A").hexdigest()
KEY_B = hashlib.sha256(b"build inputs B").hexdigest()
CNN = tiny_cnn(channels=16).SerializeToString()


def _head_changed(model: bytes, factor: float = 1.5) -> bytes:
    """The same model with only the classifier's weights scaled: what a head-only fine-tune gives."""
    proto = onnx.load_from_string(model)
    weights = next(i for i in proto.graph.initializer if i.name == "fc_w")
    weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) * np.float32(factor), "fc_w"))
    return proto.SerializeToString()


def _ref(version: str | None = None, device_class: str = "cpu-small", model: str = "digits") -> BundleRef:
    return BundleRef("vision", model, device_class, version)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def keys() -> KeySet:
    return KeySet.generate()


@pytest.fixture
def publisher(store: LocalStore, keys: KeySet) -> Publisher:
    made = Publisher(store, keys)
    made.ensure_initialized()
    return made


def _publish(
    publisher: Publisher, ref: BundleRef, files: dict[str, bytes] | None = None, *, build_key: str | None = None
) -> PublishedVariant:
    return publisher.publish(
        ref,
        files or {"model.onnx": CNN},
        build_key=build_key,
        variant_id=VARIANT,
        lineage={"source": "digits.onnx"},
        recipe=[{"type": "GraphOptimization"}],
        metrics={"accuracy": 0.9},
    )


def _device(store: LocalStore, publisher: Publisher, state: Path) -> TufClient:
    """A device's client: trusts the root it was given, keeps its verified metadata in ``state``."""
    return TufClient(StoreFetcher(store), publisher.trusted_root(), state)


def test_an_empty_store_is_initialized_once_and_reads_as_nothing_published(store: LocalStore, keys: KeySet) -> None:
    publisher = Publisher(store, keys)
    assert not publisher.is_initialized()
    assert publisher.versions(_ref()) == []
    assert publisher.model_versions("vision", "digits") == {}
    assert publisher.find_build(_ref(), KEY_A) is None
    assert publisher.next_version("vision", "digits") == "1"
    assert publisher.unpublish("vision", "digits") == 0
    with pytest.raises(SigningError, match="initialize it first"):
        _publish(publisher, _ref("1"))
    with pytest.raises(SigningError, match="no TUF repository"):
        publisher.trusted_root()
    root = publisher.ensure_initialized()
    assert publisher.is_initialized()
    assert publisher.ensure_initialized() == root == publisher.trusted_root()
    assert store.list("tuf/metadata/").count("tuf/metadata/1.root.json") == 1


def test_initializing_over_metadata_without_a_root_is_refused(store: LocalStore, keys: KeySet) -> None:
    store.put("tuf/metadata/3.targets.json", b"{}")
    with pytest.raises(SigningError, match="holds TUF metadata but no root"):
        Publisher(store, keys).ensure_initialized()
    assert store.list("tuf/") == ["tuf/metadata/3.targets.json"]


def test_publish_records_the_build_key_and_devices_fetch_the_files(
    store: LocalStore, publisher: Publisher, tmp_path: Path
) -> None:
    published = _publish(publisher, _ref("1"), build_key=KEY_A)
    assert not published.adopted
    assert published.ref == _ref("1")
    assert published.manifest.lineage == {"source": "digits.onnx", BUILD_KEY: KEY_A}
    assert published.repository is not None
    assert published.repository.targets == 2
    assert [b.prefix for b in published.bundles] == ["cpu-small/vision/digits/1"]
    fetched = fetch_bundle(_device(store, publisher, tmp_path / "device"), _ref())
    assert fetched.files == {"model.onnx": CNN}
    assert fetched.manifest == published.manifest


def test_the_same_build_key_is_adopted_without_a_write(publisher: Publisher) -> None:
    first = _publish(publisher, _ref("1"), build_key=KEY_A)
    again = _publish(publisher, _ref("2"), {"model.onnx": _head_changed(CNN)}, build_key=KEY_A)
    assert again.adopted
    assert again.ref == _ref("1")
    assert again.manifest == first.manifest
    assert again.bundles == ()
    assert again.repository is None
    assert publisher.versions(_ref()) == ["1"]
    assert publisher.find_build(_ref("7"), KEY_A) == again  # the version asked for plays no part
    assert publisher.find_build(_ref(), KEY_B) is None
    assert publisher.find_build(_ref(device_class="gpu-large"), KEY_A) is None  # per class


def test_find_build_takes_the_newest_version_with_the_key(publisher: Publisher) -> None:
    _publish(publisher, _ref("1"), build_key=KEY_A)
    _publish(publisher, _ref("2"), {"model.onnx": _head_changed(CNN)}, build_key=KEY_B)
    # Published by hand with the same lineage (a rebuild outside the operator): the newer one wins.
    publisher.publish(_ref("3"), {"model.onnx": CNN}, build_key=None, variant_id=VARIANT,
                      lineage={BUILD_KEY: KEY_A}, recipe=[], metrics={})  # fmt: skip
    found_a = publisher.find_build(_ref(), KEY_A)
    found_b = publisher.find_build(_ref(), KEY_B)
    assert found_a is not None
    assert found_a.ref.version == "3"
    assert found_b is not None
    assert found_b.ref.version == "2"
    assert found_b.adopted


def test_an_existing_version_is_refused_whatever_the_build_key(publisher: Publisher) -> None:
    _publish(publisher, _ref("1"), build_key=KEY_A)
    before = publisher.trusted_root()
    for build_key in (KEY_B, None):
        with pytest.raises(BundleError, match="vision/digits 1 for cpu-small is already published"):
            _publish(publisher, _ref("1"), {"model.onnx": _head_changed(CNN)}, build_key=build_key)
    assert publisher.trusted_root() == before
    assert publisher.versions(_ref()) == ["1"]


def test_a_version_and_a_non_empty_build_key_are_required(publisher: Publisher) -> None:
    with pytest.raises(BundleError, match="needs a version"):
        _publish(publisher, _ref())
    with pytest.raises(BundleError, match="build key is empty"):
        _publish(publisher, _ref("1"), build_key="")
    assert publisher.versions(_ref()) == []


def test_next_version_is_model_wide_and_ignores_versions_that_are_not_integers(publisher: Publisher) -> None:
    _publish(publisher, _ref("1"))
    _publish(publisher, _ref("2", device_class="gpu-large"))
    _publish(publisher, _ref("3", device_class="gpu-large"))
    for by_hand in ("1.0.0", "10a", "v99"):
        _publish(publisher, _ref(by_hand))
    _publish(publisher, _ref("50", model="digits-large"))  # another model: not counted
    _publish(publisher, BundleRef("other", "digits", "cpu-small", "60"))  # same name, other namespace
    assert publisher.model_versions("vision", "digits") == {
        "cpu-small": ["1", "1.0.0", "10a", "v99"],
        "gpu-large": ["2", "3"],
    }
    assert publisher.next_version("vision", "digits") == "4"
    assert publisher.next_version("vision", "digits-large") == "51"
    assert publisher.next_version("vision", "nothing") == "1"


def test_only_non_integer_versions_start_at_one(publisher: Publisher) -> None:
    _publish(publisher, _ref("1.0.0"))
    assert publisher.next_version("vision", "digits") == "1"


def test_a_new_version_also_travels_as_a_delta_against_the_newest_earlier_one(
    store: LocalStore, publisher: Publisher, tmp_path: Path
) -> None:
    _publish(publisher, _ref("1"))
    _publish(publisher, _ref("5", device_class="gpu-large"))  # other classes are no base
    second = _head_changed(CNN)
    published = _publish(publisher, _ref("2"), {"model.onnx": second})
    assert [b.prefix for b in published.bundles] == [
        "cpu-small/vision/digits/2",
        "cpu-small/vision/digits/2/delta-from-1",
    ]
    assert published.manifest == published.bundles[0].manifest
    assert publisher.versions(_ref()) == ["1", "2"]  # a delta is not a version
    fetched = fetch_bundle(_device(store, publisher, tmp_path / "device"), _ref("2"), base=("1", {"model.onnx": CNN}))
    assert fetched.delta
    assert fetched.files == {"model.onnx": second}


def test_unpublish_removes_every_class_version_and_delta(
    store: LocalStore, keys: KeySet, publisher: Publisher, tmp_path: Path
) -> None:
    _publish(publisher, _ref("1"), build_key=KEY_A)
    _publish(publisher, _ref("2"), {"model.onnx": _head_changed(CNN)}, build_key=KEY_B)
    _publish(publisher, _ref("2", device_class="gpu-large"), build_key=KEY_A)
    _publish(publisher, _ref("1", model="digits-large"))  # shares a name prefix: stays
    device = _device(store, publisher, tmp_path / "device")
    fetch_bundle(device, _ref("2"))  # a device that has seen the model before it goes

    removed = publisher.unpublish("vision", "digits")
    # v1: manifest + payload; v2: the same twice (full and delta); gpu-large v2: manifest + payload.
    assert removed == 8
    assert publisher.model_versions("vision", "digits") == {}
    assert publisher.find_build(_ref(), KEY_A) is None
    assert publisher.next_version("vision", "digits") == "1"
    assert not [k for k in store.list("tuf/targets/") if "/vision/digits/" in k]
    with pytest.raises(VerificationError, match="no bundle is published"):
        fetch_bundle(device, _ref())
    with pytest.raises(VerificationError, match="no such bundle"):
        fetch_bundle(device, _ref("1"))
    assert fetch_bundle(device, _ref(model="digits-large")).files == {"model.onnx": CNN}

    versions = TufRepository(store, keys).versions()
    assert publisher.unpublish("vision", "digits") == 0
    assert TufRepository(store, keys).versions() == versions  # nothing signed again


def test_unpublish_finishes_the_deletion_an_interrupted_run_left(store: LocalStore, keys: KeySet) -> None:
    publisher = Publisher(store, keys)
    publisher.ensure_initialized()
    _publish(publisher, _ref("1"))
    repository = TufRepository(store, keys)
    repository.remove(p for p in repository.target_paths() if p.startswith("cpu-small/vision/digits/"))
    assert [k for k in store.list("tuf/targets/") if "/vision/digits/" in k]  # the crash left the bytes
    assert publisher.unpublish("vision", "digits") == 0
    assert not [k for k in store.list("tuf/targets/") if "/vision/digits/" in k]


def test_removing_targets_that_are_not_listed_is_refused_before_writing(
    publisher: Publisher, store: LocalStore, keys: KeySet
) -> None:
    _publish(publisher, _ref("1"))
    repository = TufRepository(store, keys)
    before = repository.versions()
    with pytest.raises(SigningError, match=re.escape("not listed: cpu-small/vision/digits/9/manifest.json")):
        repository.remove(["cpu-small/vision/digits/1/manifest.json", "cpu-small/vision/digits/9/manifest.json"])
    with pytest.raises(SigningError, match="nothing to remove"):
        repository.remove([])
    assert repository.versions() == before
    assert repository.delete_unreferenced(lambda path: True) == []  # every stored file is still listed


def test_a_tampered_manifest_in_the_store_is_a_verification_error(publisher: Publisher, store: LocalStore) -> None:
    _publish(publisher, _ref("1"), build_key=KEY_A)
    [key] = [k for k in store.list("tuf/targets/") if k.endswith(".manifest.json")]
    store.put(key, store.get(key, max_bytes=1 << 20).replace(KEY_A.encode(), KEY_B.encode()))
    with pytest.raises(VerificationError, match=re.escape("cpu-small/vision/digits/1/manifest.json")):
        publisher.find_build(_ref(), KEY_B)
    with pytest.raises(VerificationError, match=re.escape("cpu-small/vision/digits/1/manifest.json")):
        _publish(publisher, _ref("2"), build_key=KEY_B)


@pytest.mark.parametrize(
    ("manifest", "error", "message"),
    [
        (b"not json", BundleError, "published manifest cpu-small/vision/digits/1/manifest.json: manifest is not JSON"),
        (b'{"version": "1"}', BundleError, "published manifest cpu-small/vision/digits/1/manifest.json: .*not valid"),
        (None, BundleVerificationError, "is for .*'2'.*, not .*'1'"),
    ],
)
def test_a_signed_but_wrong_manifest_is_a_clear_error(
    publisher: Publisher, store: LocalStore, keys: KeySet, manifest: bytes | None, error: type[Exception], message: str
) -> None:
    if manifest is None:  # a valid manifest of version 2 served as version 1 (mix and match)
        [built] = build_bundles({"model.onnx": CNN}, _ref(), "2", variant_id=VARIANT, lineage={}, recipe=[], metrics={})
        manifest = built.manifest.canonical_json()
    TufRepository(store, keys).publish({"cpu-small/vision/digits/1/manifest.json": manifest})
    assert publisher.versions(_ref()) == ["1"]
    with pytest.raises(error, match=message):
        publisher.find_build(_ref(), KEY_A)
    assert publisher.next_version("vision", "digits") == "2"  # versions come from paths: still answers


def test_a_rolled_back_store_is_noticed_with_a_kept_metadata_dir(
    store: LocalStore, keys: KeySet, tmp_path: Path
) -> None:
    publisher = Publisher(store, keys, metadata_dir=tmp_path / "publisher-metadata")
    publisher.ensure_initialized()
    _publish(publisher, _ref("1"))
    old_timestamp = store.get("tuf/metadata/timestamp.json", max_bytes=1 << 20)
    _publish(publisher, _ref("2"))
    assert publisher.versions(_ref()) == ["1", "2"]
    store.put("tuf/metadata/timestamp.json", old_timestamp)
    with pytest.raises(VerificationError, match="metadata"):
        publisher.versions(_ref())


def test_a_published_bundle_reads_the_same_as_one_published_by_hand(
    publisher: Publisher, store: LocalStore, keys: KeySet
) -> None:
    """Bundles published before the Publisher existed (build_bundles + publish_bundles) are read alike."""
    [built] = build_bundles({"model.onnx": CNN}, _ref(), "4", variant_id=VARIANT, lineage={BUILD_KEY: KEY_A},
                            recipe=[], metrics={})  # fmt: skip
    publish_bundles(TufRepository(store, keys), [built])
    found = publisher.find_build(_ref(), KEY_A)
    assert found is not None
    assert found.manifest == built.manifest
    assert found.ref.version == "4"


class _Clock:
    def __init__(self) -> None:
        from edgefleet_core.signing.repository import utc_now

        self.now = utc_now()

    def __call__(self) -> datetime:
        return self.now


def _roles(store: LocalStore) -> dict[str, int]:
    """Newest version of each online role in the store."""
    found: dict[str, int] = {}
    for key in store.list("tuf/metadata/"):
        name = key.rsplit("/", 1)[-1]
        match = re.fullmatch(r"(\d+)\.(targets|snapshot)\.json", name)
        if match:
            found[match[2]] = max(found.get(match[2], 0), int(match[1]))
    timestamp = json.loads(store.get("tuf/metadata/timestamp.json", max_bytes=1 << 20))
    found["timestamp"] = timestamp["signed"]["version"]
    return found


def test_signed_metadata_is_renewed_before_it_lapses_and_only_then(
    store: LocalStore, keys: KeySet, tmp_path: Path
) -> None:
    clock = _Clock()
    publisher = Publisher(store, keys, clock=clock)
    publisher.ensure_initialized()
    _publish(publisher, _ref("1"))
    start = _roles(store)
    assert publisher.renew_if_due() is None  # everything fresh: nothing written
    clock.now += timedelta(hours=11)
    assert publisher.renew_if_due() is None  # the timestamp (one day) still has 13 h
    assert _roles(store) == start
    clock.now += timedelta(hours=2)  # 11 h left: within the 12 h margin
    written = publisher.renew_if_due()
    assert written is not None
    assert _roles(store) == {**start, "timestamp": start["timestamp"] + 1}
    # Days later the snapshot (7 days) is due too, and after 90 days the targets: each in turn.
    for _ in range(200):
        clock.now += timedelta(hours=12)
        publisher.renew_if_due()
    renewed = _roles(store)
    assert renewed["snapshot"] > start["snapshot"]
    assert renewed["targets"] > start["targets"]
    # A device that trusts the root still verifies and fetches the bundle, 100 days on.
    client = _device(store, publisher, tmp_path / "device")
    client.refresh()
    assert fetch_bundle(client, _ref("1")).files["model.onnx"] == CNN


def test_renewing_an_uninitialized_repository_names_the_problem(store: LocalStore, keys: KeySet) -> None:
    with pytest.raises(SigningError, match="initialize it first"):
        Publisher(store, keys).renew_if_due()
