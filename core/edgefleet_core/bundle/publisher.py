"""The publishing side of bundles as one object: initialize, look up, publish, adopt, unpublish.

Shared by ``edgefleet publish`` and the operator's reconciler. Everything it reads about what is
published it reads through TUF (a :class:`TufClient` over a :class:`StoreFetcher`), exactly as a
device would: a store that was tampered with fails here the same way it would fail on the fleet.
Writes go through :class:`TufRepository`, which keeps no state between calls, so a publisher may be
rebuilt at any time (one writer at a time, as for the repository).

**Adoption** makes publishing idempotent: a caller that names the ``build_key`` of its build inputs
gets back the version already published with that key instead of a second copy, so a run that is
repeated after a crash converges on the artifacts the first run wrote.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from edgefleet_core.bundle.distribution import (
    MANIFEST,
    BuiltBundle,
    BundleRef,
    build_bundles,
    fetch_bundle,
    publish_bundles,
    published_versions,
    version_key,
)
from edgefleet_core.bundle.manifest import MAX_MANIFEST_BYTES, BundleManifest, parse_manifest
from edgefleet_core.bundle.selftest import SelfTest
from edgefleet_core.errors import BundleError, BundleVerificationError, SigningError
from edgefleet_core.signing.client import TufClient
from edgefleet_core.signing.fetcher import StoreFetcher
from edgefleet_core.signing.keys import KeySet
from edgefleet_core.signing.layout import METADATA_DIR
from edgefleet_core.signing.repository import ExpiryPolicy, RepositoryVersions, TufRepository, utc_now
from edgefleet_core.store.base import ArtifactStore

RENEW_WITHIN = timedelta(hours=12)
"""Renew signed metadata this long before it lapses: twice a day for the one-day timestamp."""
BUILD_KEY = "buildKey"
"""The lineage field that records the build key a version was published for."""
_INTEGER = re.compile(r"^[0-9]+$")


@dataclass(frozen=True)
class PublishedVariant:
    """A version of one model for one device class that is in the signed repository."""

    ref: BundleRef
    """With ``version`` set."""
    manifest: BundleManifest
    """The full bundle's manifest."""
    adopted: bool
    """True: it was already published with the same build key, and nothing was written now."""
    bundles: tuple[BuiltBundle, ...] = field(default=(), compare=False, repr=False)
    """What was written now (the full bundle, then a delta when one paid); empty when adopted."""
    repository: RepositoryVersions | None = None
    """The repository's role versions after the write; ``None`` when adopted."""


class Publisher:
    """Publishes bundles into the TUF repository under ``prefix`` in ``store``, signed with ``keys``.

    Reads verify against the repository's newest root, held in a scratch metadata folder per call,
    or in ``metadata_dir`` when given (then a rolled-back store is noticed across calls too).
    """

    def __init__(
        self,
        store: ArtifactStore,
        keys: KeySet,
        *,
        expiry: ExpiryPolicy | None = None,
        prefix: str = "tuf/",
        metadata_dir: Path | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._store = store
        self._prefix = prefix
        self._metadata_dir = metadata_dir
        self._repository = TufRepository(store, keys, prefix=prefix, expiry=expiry, clock=clock)
        self._clock = clock
        self._renew_due: datetime | None = None

    # ------------------------------------------------------------------ the repository itself

    def renew_if_due(self, *, within: timedelta = RENEW_WITHIN) -> RepositoryVersions | None:
        """Re-sign the signed metadata that would lapse within ``within`` (see :meth:`TufRepository.renew`).

        Cheap when nothing is due: the publisher remembers when the next renewal falls and reads
        nothing before then (a renewal by someone else only moves that moment later). ``None`` when
        nothing was written.
        """
        if self._renew_due is not None and self._clock() < self._renew_due:
            return None
        written, self._renew_due = self._repository.renew(within=within)
        return written

    def is_initialized(self) -> bool:
        """Whether the repository has a root (any version)."""
        return self._root_or_none() is not None

    def ensure_initialized(self) -> bytes:
        """Initialize the repository if it has no root yet; the trusted root (root.json bytes) either way.

        Initializing signs a root, which needs the root private keys (not in an operator's key set).
        """
        root = self._root_or_none()
        if root is None:
            folder = f"{self._prefix}{METADATA_DIR}"
            if self._store.list(folder):
                # What is left of a repository whose root went missing: a new root over it would
                # hide the damage (devices would refuse the new keys), so a person looks first.
                raise SigningError(f"{folder} holds TUF metadata but no root; refusing to initialize over it")
            self._repository.initialize()
            root = self._repository.trusted_root()
        return root

    def trusted_root(self) -> bytes:
        """The newest root metadata: what devices are given to trust. :class:`SigningError` if none."""
        return self._repository.trusted_root()

    # ------------------------------------------------------------------ what is published

    def versions(self, ref: BundleRef) -> list[str]:
        """Versions with a full bundle for ``ref``'s model and class, oldest first (``ref.version`` is ignored)."""
        with self._client() as client:
            return [] if client is None else published_versions(client, ref)

    def model_versions(self, namespace: str, model: str) -> dict[str, list[str]]:
        """Device class → versions with a full bundle (oldest first), for every class the model has."""
        with self._client() as client:
            return {} if client is None else _model_versions(client, namespace, model)

    def find_build(self, ref: BundleRef, build_key: str) -> PublishedVariant | None:
        """The newest version of ``ref``'s model and class published for ``build_key``, if any.

        ``ref.version`` is ignored: the build key, not the version, says whether a build is there.
        """
        with self._client() as client:
            return None if client is None else _find_build(client, ref, build_key)

    def next_version(self, namespace: str, model: str) -> str:
        """``"1"`` for a model with nothing published, else the highest integer version over all classes + 1.

        Versions that are not integers (``1.0.0``) are published by hand and do not count.
        """
        numbers = [
            int(version)
            for versions in self.model_versions(namespace, model).values()
            for version in versions
            if _INTEGER.fullmatch(version)
        ]
        return str(max(numbers, default=0) + 1)

    # ------------------------------------------------------------------ writes

    def publish(
        self,
        ref: BundleRef,
        files: Mapping[str, bytes],
        *,
        build_key: str | None,
        variant_id: str,
        lineage: Mapping[str, Any],
        recipe: list[Any],
        metrics: Mapping[str, float],
        partition_plan: Mapping[str, Any] | None = None,
        self_test: SelfTest | None = None,
    ) -> PublishedVariant:
        """Publish ``files`` as ``ref.version``, or adopt the version already published for ``build_key``.

        A new version is encoded in full, and also as a delta against the newest earlier version of
        the same class when that is smaller (devices holding that version fetch only the delta).
        ``lineage`` gets :data:`BUILD_KEY` when ``build_key`` is given. A version that is already
        published (with other content) is refused: versions are immutable.
        """
        version = ref.version
        if version is None:
            raise BundleError(f"publishing {_describe(ref)} needs a version")
        if build_key is not None and not build_key:
            raise BundleError("the build key is empty; pass None to publish without one")
        with self._client() as client:
            if client is None:
                raise SigningError(f"no TUF repository under {self._prefix!r}; initialize it first")
            if build_key is not None:
                found = _find_build(client, ref, build_key)
                if found is not None:
                    return found
            existing = published_versions(client, ref)
            if version in existing:
                raise BundleError(f"{ref.namespace}/{ref.name} {version} for {ref.device_class} is already published")
            earlier = [v for v in existing if version_key(v) < version_key(version)]
            base = None
            if earlier:
                previous = fetch_bundle(client, replace(ref, version=earlier[-1]), refresh=False)
                base = (earlier[-1], previous.files)
        recorded = dict(lineage) if build_key is None else {**lineage, BUILD_KEY: build_key}
        bundles = build_bundles(
            files,
            ref,
            version,
            variant_id=variant_id,
            lineage=recorded,
            recipe=recipe,
            metrics=metrics,
            partition_plan=partition_plan,
            base=base,
            self_test=self_test,
        )
        written = publish_bundles(self._repository, bundles)
        return PublishedVariant(ref, bundles[0].manifest, adopted=False, bundles=tuple(bundles), repository=written)

    def unpublish(self, namespace: str, model: str) -> int:
        """Remove every target of the model (all classes, versions and deltas) and their stored bytes.

        The targets leave the signed metadata first (new targets, snapshot and timestamp versions),
        then stored bytes that nothing listed references are deleted, so a device never sees a
        listed target whose bytes are gone. Returns how many targets were removed; repeating it
        removes none (and finishes any deletion an interrupted run left).
        """
        if self._root_or_none() is None:
            return 0

        def of_model(path: str) -> bool:
            # <deviceClass>/<namespace>/<model>/<version>/...: any class, this model only.
            parts = path.split("/")
            return len(parts) >= 4 and parts[1] == namespace and parts[2] == model

        paths = [path for path in self._repository.target_paths() if of_model(path)]
        if paths:
            self._repository.remove(paths)
        self._repository.delete_unreferenced(of_model)
        return len(paths)

    # ------------------------------------------------------------------ internals

    def _root_or_none(self) -> bytes | None:
        try:
            return self._repository.trusted_root()
        except SigningError:  # raised only when there is no root at all
            return None

    @contextlib.contextmanager
    def _client(self) -> Iterator[TufClient | None]:
        """A refreshed client of our own repository, or ``None`` while it has no root."""
        root = self._root_or_none()
        if root is None:
            yield None
            return
        with contextlib.ExitStack() as stack:
            metadata = self._metadata_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            client = TufClient(StoreFetcher(self._store, self._prefix), root, metadata)
            client.refresh()
            yield client


def _describe(ref: BundleRef) -> str:
    return f"{ref.namespace}/{ref.name} for {ref.device_class}"


def _model_versions(client: TufClient, namespace: str, model: str) -> dict[str, list[str]]:
    found: dict[str, set[str]] = {}
    for info in client.targets_for(""):
        parts = info.path.split("/")
        # Full bundles only: <class>/<ns>/<model>/<version>/manifest.json (a delta has one level more).
        if len(parts) == 5 and parts[1] == namespace and parts[2] == model and parts[4] == MANIFEST:
            found.setdefault(parts[0], set()).add(parts[3])
    # The raw string breaks ties, as in published_versions: a total order.
    return {cls: sorted(versions, key=lambda v: (version_key(v), v)) for cls, versions in sorted(found.items())}


def _find_build(client: TufClient, ref: BundleRef, build_key: str) -> PublishedVariant | None:
    for version in reversed(published_versions(client, ref)):
        manifest = _read_manifest(client, ref, version)
        if manifest.lineage.get(BUILD_KEY) == build_key:
            return PublishedVariant(replace(ref, version=version), manifest, adopted=True)
    return None


def _read_manifest(client: TufClient, ref: BundleRef, version: str) -> BundleManifest:
    path = f"{ref.prefix(version)}/{MANIFEST}"
    data = client.download(path, max_length=MAX_MANIFEST_BYTES)
    try:
        manifest = parse_manifest(data)
    except BundleError as exc:
        raise BundleError(f"published manifest {path}: {exc}") from None
    # Signed, yet for another model, class or version: a mix-and-match the device would refuse too.
    wanted = (ref.namespace, ref.name, ref.device_class, version)
    got = (manifest.model.namespace, manifest.model.name, manifest.device_class, manifest.version)
    if got != wanted:
        raise BundleVerificationError(f"manifest at {path} is for {got}, not {wanted}")
    return manifest
