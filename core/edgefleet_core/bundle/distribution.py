"""Publishing bundles as signed TUF targets, and fetching them back verified and decoded.

Layout of one bundle's targets (TUF target paths; the repository adds the content hash to names):
``<deviceClass>/<namespace>/<model>/<version>/manifest.json`` and one encoded payload per model
file beside it. When the previous version's files are at hand and a tensor-level delta is smaller,
a second, delta bundle is published under ``…/<version>/delta-from-<base>/``: a device that holds
the base with the signed digest fetches that; everyone else the full bundle. Every byte a device
receives is verified by TUF (length and hash from signed metadata) and decoded files are checked
again against the signed manifest before anything is handed over.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast, get_args

from edgefleet_core.bundle.codec import EncodedFile, decode_model, encode_model
from edgefleet_core.bundle.manifest import (
    MAX_MANIFEST_BYTES,
    BundleFile,
    BundleManifest,
    Codec,
    FileEncoding,
    FileRole,
    ModelRef,
    parse_manifest,
)
from edgefleet_core.bundle.selftest import SelfTest
from edgefleet_core.errors import BundleError, BundleVerificationError, VerificationError
from edgefleet_core.signing.client import TufClient
from edgefleet_core.signing.repository import RepositoryVersions, TufRepository

MANIFEST = "manifest.json"
ROLES: dict[str, FileRole] = {"model.onnx": "model", "head.onnx": "head", "tail.onnx": "tail"}
"""The file names a bundle may carry, and their roles."""


@dataclass(frozen=True)
class BundleRef:
    """Which bundle: a model (namespace/name) at a version for a device class."""

    namespace: str
    name: str
    device_class: str
    version: str | None = None
    """``None`` asks for the newest published version."""

    @property
    def model_prefix(self) -> str:
        """The target-path prefix of every version of this model for this class."""
        return f"{self.device_class}/{self.namespace}/{self.name}/"

    def prefix(self, version: str) -> str:
        """The target-path folder of one version's full bundle."""
        return f"{self.model_prefix}{version}"


@dataclass(frozen=True)
class BuiltBundle:
    """A manifest and its encoded payloads, ready to publish under ``prefix``."""

    prefix: str
    manifest: BundleManifest
    payloads: Mapping[str, bytes]
    encodings: Mapping[str, EncodedFile]


@dataclass(frozen=True)
class FetchedBundle:
    """A verified, decoded bundle."""

    manifest: BundleManifest
    files: Mapping[str, bytes]
    delta: bool
    """Whether it travelled as a delta against the base the caller held."""
    transferred_bytes: int


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order of versions: ``1.10`` after ``1.9``, ``10`` after ``9``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.\-+_]", version))


def _codec(name: str) -> Codec:
    if name not in get_args(Codec):
        raise BundleError(f"unknown codec {name!r}")
    return cast("Codec", name)


def _encoded_name(name: str) -> str:
    return f"{name}.eft"


def build_bundles(
    files: Mapping[str, bytes],
    ref: BundleRef,
    version: str,
    *,
    variant_id: str,
    lineage: Mapping[str, Any],
    recipe: list[Any],
    metrics: Mapping[str, float],
    partition_plan: Mapping[str, Any] | None = None,
    base: tuple[str, Mapping[str, bytes]] | None = None,
    self_test: SelfTest | None = None,
) -> list[BuiltBundle]:
    """The full bundle, plus a delta bundle against ``base`` (version, files) when that is smaller.

    ``self_test`` (see :mod:`edgefleet_core.bundle.selftest`) goes into both manifests.
    """
    unknown = sorted(set(files) - set(ROLES))
    if unknown or not files:
        raise BundleError(f"a bundle carries model.onnx, or head.onnx and tail.onnx; got {sorted(files)}")

    def bundle(prefix: str, encoded: Mapping[str, EncodedFile], delta_from: str | None) -> BuiltBundle:
        entries = [
            BundleFile(
                name=name,
                role=ROLES[name],
                sha256=enc.sha256,
                length=enc.length,
                encoding=FileEncoding(
                    target=_encoded_name(name),
                    sha256=enc.payload_sha256,
                    length=len(enc.payload),
                    codec=_codec(enc.codec),
                    delta_from=delta_from if enc.base_sha256 else None,
                    base_sha256=enc.base_sha256,
                ),
            )
            for name, enc in sorted(encoded.items())
        ]
        manifest = BundleManifest.model_validate(
            {
                "model": ModelRef(namespace=ref.namespace, name=ref.name),
                "version": version,
                "device_class": ref.device_class,
                "variant_id": variant_id,
                "lineage": dict(lineage),
                "recipe": list(recipe),
                "partition_plan": dict(partition_plan) if partition_plan is not None else None,
                "metrics": dict(metrics),
                "files": entries,
                "self_test": self_test,
            }
        )
        payloads = {_encoded_name(name): enc.payload for name, enc in encoded.items()}
        return BuiltBundle(prefix, manifest, payloads, encoded)

    full = {name: encode_model(data) for name, data in files.items()}
    bundles = [bundle(ref.prefix(version), full, None)]
    if base is not None:
        base_version, base_files = base
        if base_version == version:
            raise BundleError(f"version {version} cannot be a delta against itself")
        delta = {
            name: encode_model(data, base=base_files[name]) if name in base_files else full[name]
            for name, data in files.items()
        }
        # Published only when it saves bytes: otherwise devices simply take the full bundle.
        if sum(len(e.payload) for e in delta.values()) < sum(len(e.payload) for e in full.values()):
            bundles.append(bundle(f"{ref.prefix(version)}/delta-from-{base_version}", delta, base_version))
    return bundles


def publish_bundles(repository: TufRepository, bundles: list[BuiltBundle]) -> RepositoryVersions:
    """Publish every bundle's manifest and payloads as TUF targets in one new repository version."""
    targets: dict[str, bytes] = {}
    custom: dict[str, dict[str, Any]] = {}
    for built in bundles:
        manifest = built.manifest
        path = f"{built.prefix}/{MANIFEST}"
        targets[path] = manifest.canonical_json()
        delta_from = next((f.encoding.delta_from for f in manifest.files if f.encoding.delta_from), None)
        custom[path] = {
            "deviceClass": manifest.device_class,
            "model": f"{manifest.model.namespace}/{manifest.model.name}",
            "version": manifest.version,
            "variantId": manifest.variant_id,
            "deltaFrom": delta_from,
        }
        for name, payload in built.payloads.items():
            targets[f"{built.prefix}/{name}"] = payload
    return repository.publish(targets, custom)


def published_versions(client: TufClient, ref: BundleRef) -> list[str]:
    """Versions with a full bundle for this model and class, oldest first."""
    versions = set()
    for info in client.targets_for(ref.model_prefix):
        rest = info.path[len(ref.model_prefix) :].split("/")
        if len(rest) == 2 and rest[1] == MANIFEST:
            versions.add(rest[0])
    # The raw string breaks ties ("1.0" vs "1-0"): the order is total and does not depend on hashing.
    return sorted(versions, key=lambda v: (version_key(v), v))


def _manifest(client: TufClient, path: str, ref: BundleRef, version: str) -> tuple[BundleManifest, int]:
    data = client.download(path, max_length=MAX_MANIFEST_BYTES)
    manifest = parse_manifest(data)
    # The signed manifest must be the one asked for: a signed manifest of another model, class or
    # version served under this path would be a mix-and-match attack.
    wanted = (ref.namespace, ref.name, ref.device_class, version)
    got = (manifest.model.namespace, manifest.model.name, manifest.device_class, manifest.version)
    if got != wanted:
        raise BundleVerificationError(f"manifest at {path} is for {got}, not {wanted}")
    return manifest, len(data)


def _decode(
    client: TufClient, prefix: str, manifest: BundleManifest, base_files: Mapping[str, bytes] | None
) -> tuple[dict[str, bytes], int]:
    files: dict[str, bytes] = {}
    transferred = 0
    for entry in manifest.files:
        if ROLES.get(entry.name) != entry.role:
            raise BundleVerificationError(f"manifest file {entry.name!r} with role {entry.role!r} is not a bundle file")
        encoding = entry.encoding
        payload = client.download(f"{prefix}/{encoding.target}", max_length=encoding.length)
        transferred += len(payload)
        if len(payload) != encoding.length or hashlib.sha256(payload).hexdigest() != encoding.sha256:
            raise BundleVerificationError(f"payload {encoding.target} does not match its manifest entry")
        base = None
        if encoding.base_sha256 is not None:
            base = (base_files or {}).get(entry.name)
            if base is None or hashlib.sha256(base).hexdigest() != encoding.base_sha256:
                raise BundleError(f"{entry.name} is a delta against a base this device does not hold")
        files[entry.name] = decode_model(
            payload, encoding.codec, expected_sha256=entry.sha256, expected_length=entry.length, base=base
        )
    return files, transferred


def _same_content(delta: BundleManifest, full: BundleManifest) -> bool:
    """Whether a delta manifest promises exactly the full manifest's model: files, identity, self-test."""

    def decoded(m: BundleManifest) -> list[tuple[str, str, int]]:
        return sorted((f.name, f.sha256, f.length) for f in m.files)

    return (
        decoded(delta) == decoded(full)
        and delta.model == full.model
        and delta.version == full.version
        and delta.device_class == full.device_class
        and delta.self_test == full.self_test
    )


def fetch_bundle(
    client: TufClient,
    ref: BundleRef,
    *,
    base: tuple[str, Mapping[str, bytes]] | None = None,
    refresh: bool = True,
    full_manifest: BundleManifest | None = None,
) -> FetchedBundle:
    """Refresh, find the bundle, download and verify every byte, decode, verify the decoded files.

    With ``base`` (a version this device holds and its decoded files) a delta bundle is used when
    one was published for it; if it does not decode against the base, the full bundle is fetched.
    ``refresh=False`` uses the metadata the caller refreshed already. ``full_manifest`` is the
    version's full manifest the caller fetched and pinned (e.g. to a digest it was told): a delta
    is used only when its manifest promises exactly the same decoded files, model, version, class
    and self-test, and the full bundle is decoded against it instead of fetching the manifest again.
    """
    if refresh:
        client.refresh()
    version = ref.version
    if version is None:
        versions = published_versions(client, ref)
        if not versions:
            raise VerificationError(ref.model_prefix, "no bundle is published for this model and device class")
        version = versions[-1]
    prefix = ref.prefix(version)
    if base is not None and base[0] != version:
        delta_prefix = f"{prefix}/delta-from-{base[0]}"
        if client.target_info(f"{delta_prefix}/{MANIFEST}") is not None:
            manifest, size = _manifest(client, f"{delta_prefix}/{MANIFEST}", ref, version)
            if full_manifest is None or _same_content(manifest, full_manifest):
                try:
                    files, transferred = _decode(client, delta_prefix, manifest, base[1])
                except BundleError:
                    pass  # the base is not what the delta expects: the full bundle below
                else:
                    return FetchedBundle(manifest, files, True, size + transferred)
            # else: a delta that differs from the pinned manifest is ignored: the full bundle below
    if full_manifest is not None:
        wanted = (ref.namespace, ref.name, ref.device_class, version)
        got = (
            full_manifest.model.namespace,
            full_manifest.model.name,
            full_manifest.device_class,
            full_manifest.version,
        )
        if got != wanted:
            raise BundleVerificationError(f"the pinned manifest is for {got}, not {wanted}")
        files, transferred = _decode(client, prefix, full_manifest, None)
        return FetchedBundle(full_manifest, files, False, transferred)
    if client.target_info(f"{prefix}/{MANIFEST}") is None:
        raise VerificationError(prefix, "no such bundle in the signed targets")
    manifest, size = _manifest(client, f"{prefix}/{MANIFEST}", ref, version)
    files, transferred = _decode(client, prefix, manifest, None)
    return FetchedBundle(manifest, files, False, size + transferred)


def manifest_json(manifest: BundleManifest) -> bytes:
    """The manifest as a readable JSON file for the output folder."""
    return json.dumps(manifest.model_dump(mode="json", by_alias=True), indent=2).encode()
