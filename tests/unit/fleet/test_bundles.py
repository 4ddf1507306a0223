"""resolve_bundle against a real TUF repository in a LocalStore, built and published with our signing code."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import pytest

from edgefleet_core.bundle.distribution import BundleRef, build_bundles, publish_bundles
from edgefleet_core.errors import BundleVerificationError, VerificationError
from edgefleet_core.signing import KeySet, TufRepository
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet import BundleNotPublished, FleetInputError, resolve_bundle
from tests.support.tiny_models import tiny_matmul_bytes

VARIANT = "cd" * 32


def _publish(repo: TufRepository, files: dict[str, bytes], version: str, device_class: str = "cpu-small") -> None:
    ref = BundleRef(namespace="factory", name="digits", device_class=device_class)
    built = build_bundles(files, ref, version, variant_id=VARIANT, lineage={}, recipe=[], metrics={"accuracy": 0.9})
    publish_bundles(repo, built)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def repo(store: LocalStore) -> TufRepository:
    repository = TufRepository(store, KeySet.generate())
    repository.initialize()
    _publish(repository, {"model.onnx": tiny_matmul_bytes(0)}, "1.0.0")
    return repository


def test_resolves_the_manifest_then_payloads_with_digest_and_length(store: LocalStore, repo: TufRepository) -> None:
    resolved = resolve_bundle(store, device_class="cpu-small", namespace="factory", model="digits", version="1.0.0")
    prefix = "cpu-small/factory/digits/1.0.0"
    assert resolved.target_paths == [f"{prefix}/manifest.json", f"{prefix}/model.onnx.eft"]
    manifest_key = next(k for k in store.list(f"tuf/targets/{prefix}/") if k.endswith(".manifest.json"))
    manifest = store.get(manifest_key, max_bytes=1 << 20)
    payload_key = next(k for k in store.list(f"tuf/targets/{prefix}/") if k.endswith(".model.onnx.eft"))
    payload = store.get(payload_key, max_bytes=1 << 20)
    assert resolved.bundle_sha256 == hashlib.sha256(manifest).hexdigest()
    assert resolved.bundle_length == len(manifest) + len(payload)


def test_a_split_bundle_lists_payloads_in_manifest_order(store: LocalStore, repo: TufRepository) -> None:
    _publish(repo, {"tail.onnx": tiny_matmul_bytes(2), "head.onnx": tiny_matmul_bytes(1)}, "2.0.0")
    resolved = resolve_bundle(store, device_class="cpu-small", namespace="factory", model="digits", version="2.0.0")
    prefix = "cpu-small/factory/digits/2.0.0"
    assert resolved.target_paths == [f"{prefix}/manifest.json", f"{prefix}/head.onnx.eft", f"{prefix}/tail.onnx.eft"]


def test_follows_root_rotations_from_the_first_root(store: LocalStore, repo: TufRepository) -> None:
    repo.rotate_root(KeySet.generate())
    _publish(repo, {"model.onnx": tiny_matmul_bytes(3)}, "1.1.0")
    resolved = resolve_bundle(store, device_class="cpu-small", namespace="factory", model="digits", version="1.1.0")
    assert resolved.target_paths[0] == "cpu-small/factory/digits/1.1.0/manifest.json"


@pytest.mark.parametrize(
    ("device_class", "model", "version"),
    [("cpu-small", "digits", "9.9.9"), ("gpu-large", "digits", "1.0.0"), ("cpu-small", "faces", "1.0.0")],
)
def test_an_unpublished_bundle_is_named(
    store: LocalStore, repo: TufRepository, device_class: str, model: str, version: str
) -> None:
    with pytest.raises(BundleNotPublished, match=f"{model} {version} is published for class {device_class}"):
        resolve_bundle(store, device_class=device_class, namespace="factory", model=model, version=version)


def test_no_repository_at_all(store: LocalStore) -> None:
    with pytest.raises(BundleNotPublished, match="no TUF repository"):
        resolve_bundle(store, device_class="cpu-small", namespace="factory", model="digits", version="1.0.0")


def test_an_unsafe_version_is_refused_before_any_read(store: LocalStore, repo: TufRepository) -> None:
    with pytest.raises(FleetInputError, match="safe path"):
        resolve_bundle(store, device_class="cpu-small", namespace="factory", model="digits", version="..")


def test_tampered_metadata_does_not_verify(store: LocalStore, repo: TufRepository) -> None:
    key = "tuf/metadata/timestamp.json"
    store.put(key, store.get(key, max_bytes=1 << 20).replace(b'"_type":"timestamp"', b'"_type":"timestamp","x":1'))
    with pytest.raises(VerificationError):
        resolve_bundle(store, device_class="cpu-small", namespace="factory", model="digits", version="1.0.0")


def test_a_tampered_manifest_does_not_verify(store: LocalStore, repo: TufRepository) -> None:
    prefix = "cpu-small/factory/digits/1.0.0"
    manifest_key = next(k for k in store.list(f"tuf/targets/{prefix}/") if k.endswith(".manifest.json"))
    store.put(manifest_key, store.get(manifest_key, max_bytes=1 << 20).replace(b"0.9", b"1.0"))
    with pytest.raises(VerificationError, match=r"manifest\.json"):
        resolve_bundle(store, device_class="cpu-small", namespace="factory", model="digits", version="1.0.0")


def test_a_manifest_published_under_another_bundles_path_is_refused(store: LocalStore, repo: TufRepository) -> None:
    # A correctly signed manifest of 1.0.0 republished as 3.0.0: mix and match, refused.
    prefix = "cpu-small/factory/digits/1.0.0"
    manifest_key = next(k for k in store.list(f"tuf/targets/{prefix}/") if k.endswith(".manifest.json"))
    manifest = store.get(manifest_key, max_bytes=1 << 20)
    repo.publish({"cpu-small/factory/digits/3.0.0/manifest.json": manifest})
    with pytest.raises(BundleVerificationError, match="not"):
        resolve_bundle(store, device_class="cpu-small", namespace="factory", model="digits", version="3.0.0")


def test_a_manifest_naming_an_unpublished_payload(store: LocalStore, repo: TufRepository) -> None:
    ref = BundleRef(namespace="factory", name="digits", device_class="cpu-small")
    (built,) = build_bundles(
        {"model.onnx": tiny_matmul_bytes(4)}, ref, "4.0.0", variant_id=VARIANT, lineage={}, recipe=[], metrics={}
    )
    repo.publish({f"{built.prefix}/manifest.json": built.manifest.canonical_json()})  # payload left out
    with pytest.raises(BundleNotPublished, match=r"model\.onnx\.eft"):
        resolve_bundle(store, device_class="cpu-small", namespace="factory", model="digits", version="4.0.0")


def test_check_model_is_valid() -> None:
    onnx.checker.check_model(onnx.load_from_string(tiny_matmul_bytes(0)))
