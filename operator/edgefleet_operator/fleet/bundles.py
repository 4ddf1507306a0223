"""What an assignment names: a bundle's TUF target paths, digest and size, read from the signed repository.

The control plane resolves a bundle before assigning it, through the same verification a device
will do (python-tuf via :class:`~edgefleet_core.signing.TufClient`), so an assignment never names a
bundle that is missing, incomplete, or whose manifest and signed targets disagree. The trust anchor is
the repository's first root in the store: the control plane owns that store (it publishes into it),
and python-tuf follows every root rotation from there.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tuf.ngclient.config import UpdaterConfig

from edgefleet_core.bundle.distribution import MANIFEST, BundleRef
from edgefleet_core.bundle.manifest import MAX_MANIFEST_BYTES, parse_manifest
from edgefleet_core.errors import BundleVerificationError, StoreNotFound
from edgefleet_core.signing.client import TufClient
from edgefleet_core.signing.fetcher import StoreFetcher
from edgefleet_core.signing.layout import is_safe_path, metadata_path
from edgefleet_core.store.base import ArtifactStore
from edgefleet_operator.fleet.errors import BundleNotPublished, FleetInputError


@dataclass(frozen=True)
class ResolvedBundle:
    """The fields of an assignment that say which bytes to fetch."""

    target_paths: list[str]
    """The manifest's target path, then each payload's in manifest order."""
    bundle_sha256: str
    """sha256 of the manifest target's bytes (what the signed targets metadata pins)."""
    bundle_length: int
    """Sum of the signed lengths of every target in ``target_paths``: what a device downloads."""


def resolve_bundle(
    store: ArtifactStore, *, device_class: str, namespace: str, model: str, version: str, tuf_prefix: str = "tuf/"
) -> ResolvedBundle:
    """Find and verify the full bundle of ``namespace/model`` at ``version`` for ``device_class``.

    :class:`BundleNotPublished` if the repository, the manifest or one of its payloads is not in
    the signed targets; :class:`~edgefleet_core.errors.VerificationError` if the signed metadata does
    not verify; :class:`~edgefleet_core.errors.BundleError` if the manifest is malformed or does not
    match its signed targets or the bundle asked for.
    """
    ref = BundleRef(namespace=namespace, name=model, device_class=device_class, version=version)
    prefix = ref.prefix(version)
    if not is_safe_path(prefix):
        raise FleetInputError(f"bundle path {prefix!r} is not a safe path (class, namespace, model, version)")
    root_key = f"{tuf_prefix}{metadata_path('1.root.json')}"
    try:
        trusted_root = store.get(root_key, max_bytes=UpdaterConfig().root_max_length)
    except StoreNotFound as e:
        raise BundleNotPublished(f"no TUF repository in the store under {tuf_prefix!r} ({root_key} is missing)") from e
    manifest_path = f"{prefix}/{MANIFEST}"
    with tempfile.TemporaryDirectory(prefix="edgefleet-resolve-") as scratch:
        # A fresh metadata folder per call: the control plane keeps no client state between assignments.
        client = TufClient(StoreFetcher(store, tuf_prefix), trusted_root, Path(scratch) / "metadata")
        client.refresh()
        manifest_info = client.target_info(manifest_path)
        if manifest_info is None:
            raise BundleNotPublished(f"no bundle {namespace}/{model} {version} is published for class {device_class}")
        data = client.download(manifest_path, max_length=MAX_MANIFEST_BYTES)
        manifest = parse_manifest(data)
        wanted = (namespace, model, device_class, version)
        got = (manifest.model.namespace, manifest.model.name, manifest.device_class, manifest.version)
        if got != wanted:
            raise BundleVerificationError(f"manifest at {manifest_path} is for {got}, not {wanted}")
        paths = [manifest_path]
        length = manifest_info.length
        for entry in manifest.files:
            path = f"{prefix}/{entry.encoding.target}"
            info = client.target_info(path)
            if info is None:
                raise BundleNotPublished(f"the manifest of {prefix} names {path}, which is not in the signed targets")
            if info.length != entry.encoding.length or info.hashes.get("sha256") != entry.encoding.sha256:
                raise BundleVerificationError(f"signed target {path} does not match its manifest entry")
            paths.append(path)
            length += info.length
    return ResolvedBundle(target_paths=paths, bundle_sha256=hashlib.sha256(data).hexdigest(), bundle_length=length)
