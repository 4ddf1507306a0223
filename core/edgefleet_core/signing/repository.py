"""The writing side of TUF: signed root / targets / snapshot / timestamp metadata in an artifact store.

Built on python-tuf's metadata API (``tuf.api.metadata``); what is ours is only the choice of
files and the order they are written in. The repository keeps no state of its own: every
operation reads the current versions back from the store, so a CLI run and the operator can take
turns (one writer at a time; nothing here arbitrates between two concurrent writers).

Write order is the consistency guarantee. Every file but ``timestamp.json`` is written once under a
new versioned name; ``timestamp.json`` is replaced last, so a reader who starts from it always finds
the complete set it points to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from securesystemslib.exceptions import UnverifiedSignatureError

# python-tuf and securesystemslib re-export these names without ``__all__``/``as`` aliases, which
# mypy's strict no-implicit-reexport rejects; the modules named here are their documented homes.
from securesystemslib.signer import Signer  # type: ignore[attr-defined]
from tuf.api.exceptions import LengthOrHashMismatchError, UnsignedMetadataError
from tuf.api.metadata import (  # type: ignore[attr-defined]
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import CanonicalJSONSerializer
from tuf.ngclient.config import UpdaterConfig

from edgefleet_core.errors import SigningError, VerificationError
from edgefleet_core.signing.keys import ONLINE_ROLES, ROLES, KeySet
from edgefleet_core.signing.layout import METADATA_DIR, TARGETS_DIR, is_safe_path, metadata_path, target_path
from edgefleet_core.store.base import ArtifactStore, validate_key

logger = logging.getLogger(__name__)

_S = TypeVar("_S", Root, Timestamp, Snapshot, Targets)
_ROOT_FILE = re.compile(r"^([1-9][0-9]*)\.root\.json$")
# A stored target file, relative to the targets folder: layout.target_path's "<folder>/<sha256>.<name>".
_TARGET_FILE = re.compile(r"^(?P<folder>(?:[^/]+/)*)[a-f0-9]{64}\.(?P<name>[^/]+)$")
# The writer reads its own metadata back with the same caps the client downloads it with.
_LIMITS = UpdaterConfig()
_HASH = "sha256"


def utc_now() -> datetime:
    """The default clock."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's metadata stays valid after it is signed."""

    root: timedelta = timedelta(days=365)
    """Root changes rarely (key rotation); re-sign it with :meth:`TufRepository.rotate_root` yearly."""
    targets: timedelta = timedelta(days=90)
    """Renewed by every publish."""
    snapshot: timedelta = timedelta(days=7)
    """Renewed by every publish, and by :meth:`TufRepository.refresh_timestamp` when it would lapse."""
    timestamp: timedelta = timedelta(days=1)
    """Short, so a frozen mirror is noticed within a day: refresh it more often than this."""


@dataclass(frozen=True)
class RepositoryVersions:
    """The version of each top-level role after a write."""

    root: int
    targets: int
    snapshot: int
    timestamp: int


@dataclass
class _State:
    root: Metadata[Root]
    targets: Metadata[Targets]
    snapshot: Metadata[Snapshot]
    timestamp: Metadata[Timestamp]

    def versions(self) -> RepositoryVersions:
        return RepositoryVersions(
            root=self.root.signed.version,
            targets=self.targets.signed.version,
            snapshot=self.snapshot.signed.version,
            timestamp=self.timestamp.signed.version,
        )


class TufRepository:
    """A TUF repository (consistent snapshots) under ``prefix`` in ``store``, signed with ``keys``."""

    def __init__(
        self,
        store: ArtifactStore,
        keys: KeySet,
        *,
        prefix: str = "tuf/",
        expiry: ExpiryPolicy | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        if prefix and (not prefix.endswith("/") or not is_safe_path(prefix[:-1])):
            raise SigningError(f"repository prefix {prefix!r} must be empty or a safe path ending in '/'")
        self._store = store
        self._keys = keys
        self._prefix = prefix
        self._expiry = expiry or ExpiryPolicy()
        self._clock = clock

    @property
    def keys(self) -> KeySet:
        """The keys the next write signs with (the new ones after :meth:`rotate_root`)."""
        return self._keys

    # ------------------------------------------------------------------ operations

    def initialize(self) -> RepositoryVersions:
        """Version 1 of every role: a root naming our keys, no targets. Refused if a root exists."""
        if self._root_versions():
            raise SigningError(f"a TUF repository already exists under {self._prefix!r}")
        now = self._now()
        root = Metadata(Root(version=1, expires=now + self._expiry.root, consistent_snapshot=True))
        self._set_role_keys(root.signed, self._keys)
        _sign(root, self._keys.signers("root"))
        targets = Metadata(Targets(version=1, expires=now + self._expiry.targets))
        state = self._sign_online(root, targets, snapshot_version=1, timestamp_version=1)
        self._write_metadata("1.root.json", root)
        self._write_online(state)
        logger.info("initialized TUF repository under %r", self._prefix)
        return state.versions()

    def publish(
        self, targets: Mapping[str, bytes], custom: Mapping[str, Mapping[str, Any]] | None = None
    ) -> RepositoryVersions:
        """Add or replace target files, with optional custom fields per target, in one new version.

        Target paths are relative paths of ``[A-Za-z0-9._-]`` segments, by convention
        ``<deviceClass>/<namespace>/<model>/<version>/<file>``. The target bytes are stored first,
        then targets, snapshot and timestamp metadata.
        """
        custom = custom or {}
        if not targets:
            raise SigningError("nothing to publish")
        unknown = sorted(set(custom) - set(targets))
        if unknown:
            raise SigningError(f"custom fields given for targets that are not published: {', '.join(unknown)}")
        for path in targets:
            if not is_safe_path(path):
                raise SigningError(f"invalid target path {path!r}: relative path of [A-Za-z0-9._-] segments")
        for path, fields in custom.items():
            try:
                json.dumps(fields, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise SigningError(f"custom fields of {path} are not JSON: {e}") from e

        state = self._load()
        new_targets = state.targets.signed
        for path, data in targets.items():
            digest = hashlib.sha256(data).hexdigest()
            self._store.put(self._key(target_path(path, digest)), data)
            fields = {"custom": dict(custom[path])} if path in custom else {}
            new_targets.targets[path] = TargetFile(len(data), {_HASH: digest}, path, unrecognized_fields=fields)
        versions = self._write_targets(state)
        logger.info("published %d target(s) as targets version %d", len(targets), versions.targets)
        return versions

    def target_paths(self) -> list[str]:
        """Every target path the current signed targets metadata lists, sorted."""
        return sorted(self._load().targets.signed.targets)

    def remove(self, paths: Iterable[str]) -> RepositoryVersions:
        """Drop listed targets from the signed targets metadata in one new version.

        Clients stop seeing them at their next refresh. Their stored bytes stay (an older snapshot a
        client is still working from may name them) until :meth:`delete_unreferenced` removes them.
        Refused, before anything is written, if a path is not listed.
        """
        wanted = sorted(set(paths))
        if not wanted:
            raise SigningError("nothing to remove")
        state = self._load()
        listed = state.targets.signed.targets
        missing = [path for path in wanted if path not in listed]
        if missing:
            raise SigningError(f"cannot remove targets that are not listed: {', '.join(missing)}")
        for path in wanted:
            del listed[path]
        versions = self._write_targets(state)
        logger.info("removed %d target(s) as targets version %d", len(wanted), versions.targets)
        return versions

    def delete_unreferenced(self, select: Callable[[str], bool]) -> list[str]:
        """Delete stored target bytes that no listed target references, for target paths ``select`` accepts.

        Returns the target paths whose bytes were deleted (one per stored file, so a path replaced by
        a later publish may appear more than once). Only files named the way :meth:`publish` stores
        them are considered; anything else under the targets folder is left alone. Safe to repeat:
        it finishes what an interrupted run left behind.
        """
        state = self._load()
        referenced = {
            target_path(path, info.hashes[_HASH])
            for path, info in state.targets.signed.targets.items()
            if _HASH in info.hashes
        }
        folder = f"{self._prefix}{TARGETS_DIR}"
        deleted = []
        for key in self._store.list(folder):
            match = _TARGET_FILE.fullmatch(key[len(folder) :])
            if match is None or key[len(self._prefix) :] in referenced:
                continue
            path = f"{match['folder']}{match['name']}"
            if select(path):
                self._store.delete(key)
                deleted.append(path)
        if deleted:
            logger.info("deleted the stored bytes of %d unreferenced target file(s)", len(deleted))
        return deleted

    def refresh_timestamp(self) -> RepositoryVersions:
        """A new timestamp (and a new snapshot too, if it would lapse before that timestamp does)."""
        state = self._load()
        now = self._now()
        timestamp_expires = now + self._expiry.timestamp
        if state.snapshot.signed.expires < timestamp_expires:
            snapshot = state.snapshot.signed
            snapshot.version += 1
            snapshot.expires = now + self._expiry.snapshot
            state.snapshot = Metadata(snapshot)
            _sign(state.snapshot, self._keys.signers("snapshot"))
            self._write_metadata(f"{snapshot.version}.snapshot.json", state.snapshot)
        timestamp = state.timestamp.signed
        timestamp.version += 1
        timestamp.expires = timestamp_expires
        timestamp.snapshot_meta = self._metafile(state.snapshot)
        state.timestamp = Metadata(timestamp)
        _sign(state.timestamp, self._keys.signers("timestamp"))
        self._write_metadata("timestamp.json", state.timestamp)
        return state.versions()

    def renew(self, *, within: timedelta) -> tuple[RepositoryVersions | None, datetime]:
        """Re-sign the online roles that would lapse within ``within``; what was written, and when next due.

        Devices refuse expired metadata, and only a publish renews targets (90 days) and snapshot:
        a control plane that publishes nothing for a while must still keep them current. Targets
        due: a new targets version (with snapshot and timestamp). Else snapshot or timestamp due: a
        new timestamp (:meth:`refresh_timestamp`). The second value is the earliest moment one of
        them is due again (their earliest expiry less ``within``). Online keys are enough.
        """
        state = self._load()
        horizon = self._now() + within
        written: RepositoryVersions | None = None
        if state.targets.signed.expires <= horizon:
            written = self._write_targets(state)
        elif min(state.snapshot.signed.expires, state.timestamp.signed.expires) <= horizon:
            written = self.refresh_timestamp()
        if written is not None:
            state = self._load()
        earliest = min(state.targets.signed.expires, state.snapshot.signed.expires, state.timestamp.signed.expires)
        return written, earliest - within

    def rotate_root(self, new_keys: KeySet) -> RepositoryVersions:
        """Hand the repository to ``new_keys``: a new root version signed by the old and the new root keys.

        The new root must satisfy both the old root's threshold (so clients trust it) and its own
        (so it is self-consistent), as TUF requires. Passing the current keys again just renews root.
        Targets, snapshot and timestamp are re-signed in new versions carrying the old *and* the new
        online keys' signatures and written before the new root: a client that has not yet seen the
        new root and one that has both verify the same files. Later writes sign with the new keys only.
        """
        state = self._load()
        now = self._now()
        old_root = state.root
        new_root = Metadata(
            Root(version=old_root.signed.version + 1, expires=now + self._expiry.root, consistent_snapshot=True)
        )
        self._set_role_keys(new_root.signed, new_keys)
        _sign(new_root, _distinct((*self._keys.signers("root"), *new_keys.signers("root"))))
        try:
            old_root.signed.verify_delegate(Root.type, new_root.signed_bytes, new_root.signatures)
            new_root.signed.verify_delegate(Root.type, new_root.signed_bytes, new_root.signatures)
        except UnsignedMetadataError as e:
            raise SigningError(f"cannot rotate root: {e}") from e

        targets = state.targets.signed
        targets.version += 1
        targets.expires = now + self._expiry.targets
        both = _merge(self._keys, new_keys)
        new_state = self._sign_online(
            new_root,
            Metadata(targets),
            snapshot_version=state.snapshot.signed.version + 1,
            timestamp_version=state.timestamp.signed.version + 1,
            keys=both,
        )
        self._write_online(new_state)
        self._write_metadata(f"{new_root.signed.version}.root.json", new_root)
        self._keys = new_keys
        logger.info("rotated root to version %d", new_root.signed.version)
        return new_state.versions()

    def trusted_root(self) -> bytes:
        """The newest root metadata, the bytes to hand a client as its trust anchor (out of band)."""
        versions = self._root_versions()
        if not versions:
            raise SigningError(f"no TUF repository under {self._prefix!r}; initialize it first")
        return self._read(f"{versions[-1]}.root.json", _LIMITS.root_max_length)

    def versions(self) -> RepositoryVersions:
        """The current version of each top-level role."""
        return self._load().versions()

    # ------------------------------------------------------------------ internals

    def _now(self) -> datetime:
        # TUF expiry has whole-second resolution; dropping microseconds keeps what we sign equal to
        # what we serialize.
        return self._clock().astimezone(UTC).replace(microsecond=0)

    def _key(self, path: str) -> str:
        return validate_key(f"{self._prefix}{path}")

    def _root_versions(self) -> list[int]:
        directory = f"{self._prefix}{METADATA_DIR}"
        versions = []
        for key in self._store.list(directory):
            match = _ROOT_FILE.fullmatch(key[len(directory) :])
            if match:
                versions.append(int(match.group(1)))
        return sorted(versions)

    def _read(self, filename: str, max_bytes: int) -> bytes:
        return self._store.get(self._key(metadata_path(filename)), max_bytes=max_bytes)

    def _load(self) -> _State:
        """The current metadata, trusted only as far as our own keys signed it.

        The store (or whoever sits between us and it) is not trusted: every role must carry valid
        signatures of this repository's own keys, and timestamp -> snapshot -> targets must match by
        version, length and hash. Otherwise the next publish would sign an attacker's targets.
        """
        versions = self._root_versions()
        if not versions:
            raise SigningError(f"no TUF repository under {self._prefix!r}; initialize it first")
        root = _parse(self._read(f"{versions[-1]}.root.json", _LIMITS.root_max_length), Root)
        timestamp = _parse(self._read("timestamp.json", _LIMITS.timestamp_max_length), Timestamp)
        snapshot_version = timestamp.signed.snapshot_meta.version
        snapshot_bytes = self._read(f"{snapshot_version}.snapshot.json", _LIMITS.snapshot_max_length)
        snapshot = _parse(snapshot_bytes, Snapshot)
        targets_meta = snapshot.signed.meta.get("targets.json")
        if targets_meta is None:
            raise SigningError(f"snapshot version {snapshot_version} lists no targets.json")
        targets_bytes = self._read(f"{targets_meta.version}.targets.json", _LIMITS.targets_max_length)
        targets = _parse(targets_bytes, Targets)
        self._check_keys_match(root.signed)
        for role, metadata in (("root", root), ("timestamp", timestamp), ("snapshot", snapshot), ("targets", targets)):
            self._check_signed_by_us(role, metadata)
        try:
            timestamp.signed.snapshot_meta.verify_length_and_hashes(snapshot_bytes)
            targets_meta.verify_length_and_hashes(targets_bytes)
        except LengthOrHashMismatchError as exc:
            raise VerificationError("stored metadata", f"LengthOrHashMismatchError: {exc}") from None
        if snapshot.signed.version != snapshot_version or targets.signed.version != targets_meta.version:
            raise VerificationError("stored metadata", "versions do not match what timestamp and snapshot name")
        return _State(root=root, targets=targets, snapshot=snapshot, timestamp=timestamp)

    def _check_signed_by_us(self, role: str, metadata: Metadata[Any]) -> None:
        payload = CanonicalJSONSerializer().serialize(metadata.signed)
        valid = 0
        for key in self._keys.public_keys(role):
            signature = metadata.signatures.get(key.keyid)
            if signature is None:
                continue
            try:
                key.verify_signature(signature, payload)
            except UnverifiedSignatureError:
                continue
            valid += 1
        needed = self._keys.root_threshold if role == "root" else 1
        if valid < needed:
            raise VerificationError(
                f"stored {role} metadata", f"signed by {valid} of this repository's keys, {needed} needed"
            )

    def _check_keys_match(self, root: Root) -> None:
        """Signing with keys the root does not name would publish metadata no client accepts."""
        for role in ROLES:
            delegated = root.roles[role]
            ours = [k.keyid for k in self._keys.public_keys(role) if k.keyid in delegated.keyids]
            if len(ours) < delegated.threshold:
                raise SigningError(
                    f"these keys cannot sign {role}: root version {root.version} names other keys "
                    f"({len(ours)} of ours, threshold {delegated.threshold})"
                )

    @staticmethod
    def _set_role_keys(root: Root, keys: KeySet) -> None:
        for role in ROLES:
            for key in keys.public_keys(role):
                root.add_key(key, role)
        root.roles["root"].threshold = keys.root_threshold

    def _sign_online(
        self,
        root: Metadata[Root],
        targets: Metadata[Targets],
        *,
        snapshot_version: int,
        timestamp_version: int,
        keys: Mapping[str, tuple[Signer, ...]] | None = None,
    ) -> _State:
        """Sign ``targets``, then a snapshot pinning it, then a timestamp pinning that snapshot."""
        signers = keys or {role: self._keys.signers(role) for role in ONLINE_ROLES}
        now = self._now()
        _sign(targets, signers["targets"])
        snapshot = Metadata(
            Snapshot(
                version=snapshot_version,
                expires=now + self._expiry.snapshot,
                meta={"targets.json": self._metafile(targets)},
            )
        )
        _sign(snapshot, signers["snapshot"])
        timestamp = Metadata(
            Timestamp(
                version=timestamp_version,
                expires=now + self._expiry.timestamp,
                snapshot_meta=self._metafile(snapshot),
            )
        )
        _sign(timestamp, signers["timestamp"])
        return _State(root=root, targets=targets, snapshot=snapshot, timestamp=timestamp)

    @staticmethod
    def _metafile(metadata: Metadata[Any]) -> MetaFile:
        # Length and hash as well as the version: the client then caps the download at the exact
        # length and rejects any other bytes under that version's name.
        data = metadata.to_bytes()
        return MetaFile(
            version=metadata.signed.version, length=len(data), hashes={_HASH: hashlib.sha256(data).hexdigest()}
        )

    def _write_targets(self, state: _State) -> RepositoryVersions:
        """Sign and write ``state.targets.signed`` (changed in place) as the next targets version."""
        new_targets = state.targets.signed
        new_targets.version += 1
        new_targets.expires = self._now() + self._expiry.targets
        new_state = self._sign_online(
            state.root,
            Metadata(new_targets),
            snapshot_version=state.snapshot.signed.version + 1,
            timestamp_version=state.timestamp.signed.version + 1,
        )
        self._write_online(new_state)
        return new_state.versions()

    def _write_online(self, state: _State) -> None:
        self._write_metadata(f"{state.targets.signed.version}.targets.json", state.targets)
        self._write_metadata(f"{state.snapshot.signed.version}.snapshot.json", state.snapshot)
        self._write_metadata("timestamp.json", state.timestamp)

    def _write_metadata(self, filename: str, metadata: Metadata[Any]) -> None:
        self._store.put(self._key(metadata_path(filename)), metadata.to_bytes())


def _sign(metadata: Metadata[Any], signers: Iterable[Signer]) -> None:
    metadata.signatures.clear()
    for signer in signers:
        metadata.sign(signer, append=True)


def _distinct(signers: Iterable[Signer]) -> tuple[Signer, ...]:
    by_keyid: dict[str, Signer] = {}
    for signer in signers:
        by_keyid.setdefault(signer.public_key.keyid, signer)
    return tuple(by_keyid.values())


def _merge(old: KeySet, new: KeySet) -> dict[str, tuple[Signer, ...]]:
    return {role: _distinct((*old.signers(role), *new.signers(role))) for role in ROLES}


def _parse(data: bytes, signed_type: type[_S]) -> Metadata[_S]:
    try:
        metadata = Metadata[_S].from_bytes(data)
    except DeserializationError as e:
        raise SigningError(f"stored {signed_type.type} metadata cannot be parsed: {e}") from e
    if not isinstance(metadata.signed, signed_type):
        raise SigningError(f"stored {signed_type.type} metadata holds {metadata.signed.type}")
    return metadata
