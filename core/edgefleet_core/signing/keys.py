"""The Ed25519 keys of a TUF repository: files for the CLI, a Kubernetes Secret for the operator.

A key set is a handful of named files, ``keys.json`` (which key ids serve which role, and the root
threshold) and one PKCS#8 PEM private key per key, ``<keyid>.pem``. The same names become the
``data`` keys of a Secret, base64-encoded, so both homes hold exactly the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import cast

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

# securesystemslib re-exports these without ``as`` aliases, which mypy's strict mode rejects.
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner, SSlibKey  # type: ignore[attr-defined]

from edgefleet_core.atomic import PRIVATE, fsync_dir, write_file_atomic
from edgefleet_core.errors import SigningError

INDEX_FILE = "keys.json"
INDEX_FORMAT = "edgefleet-tuf-keys/1"
ROLES = ("root", "targets", "snapshot", "timestamp")
ONLINE_ROLES = ("targets", "snapshot", "timestamp")
_KEYID = re.compile(r"^[a-f0-9]{64}$")
_MAX_FILE_BYTES = 64 * 1024  # a key file or index is a few hundred bytes; anything bigger is not ours


class KeySet:
    """The private keys of one repository: ``root`` (N keys, threshold t) and one key per online role."""

    def __init__(
        self,
        root: tuple[CryptoSigner, ...] | tuple[SSlibKey, ...],
        root_threshold: int,
        targets: CryptoSigner,
        snapshot: CryptoSigner,
        timestamp: CryptoSigner,
    ) -> None:
        root_public = tuple(k if isinstance(k, SSlibKey) else k.public_key for k in root)
        if len({key.keyid for key in root_public}) != len(root):
            raise SigningError("the root keys must be distinct")
        if not 1 <= root_threshold <= len(root):
            raise SigningError(f"root threshold {root_threshold} must be between 1 and {len(root)} (the root keys)")
        for public in (*root_public, targets.public_key, snapshot.public_key, timestamp.public_key):
            if not isinstance(public, SSlibKey) or public.keytype != "ed25519":
                raise SigningError(f"key {public.keyid} is not an Ed25519 key")
        self.root = root
        """Root keys; any ``root_threshold`` of them sign a root. Public keys only in an online key set:
        publishing needs the root's public keys, only creating and rotating a root needs its private ones."""
        self._root_public: tuple[SSlibKey, ...] = root_public
        self.root_threshold = root_threshold
        """How many root keys must sign a root."""
        self.targets = targets
        self.snapshot = snapshot
        self.timestamp = timestamp

    @property
    def online_only(self) -> bool:
        """Whether the root private keys are absent (an operator's key set)."""
        return any(isinstance(k, SSlibKey) for k in self.root)

    def __repr__(self) -> str:
        ids = {role: [k.keyid for k in self.public_keys(role)] for role in ROLES}
        return f"KeySet(root_threshold={self.root_threshold}, keyids={ids})"

    @classmethod
    def generate(cls, root_keys: int = 1, root_threshold: int = 1) -> KeySet:
        """Fresh Ed25519 keys: ``root_keys`` for root (``root_threshold`` of them must sign), one per other role."""
        if root_keys < 1:
            raise SigningError(f"need at least one root key, not {root_keys}")
        return cls(
            root=tuple(CryptoSigner.generate_ed25519() for _ in range(root_keys)),
            root_threshold=root_threshold,
            targets=CryptoSigner.generate_ed25519(),
            snapshot=CryptoSigner.generate_ed25519(),
            timestamp=CryptoSigner.generate_ed25519(),
        )

    def signers(self, role: str) -> tuple[CryptoSigner, ...]:
        """The keys that sign ``role`` (one of :data:`ROLES`)."""
        if role == "root":
            if self.online_only:
                raise SigningError(
                    "the root private keys are not in this key set; creating or rotating a root needs them"
                )
            return cast("tuple[CryptoSigner, ...]", self.root)
        if role in ONLINE_ROLES:
            signer: CryptoSigner = getattr(self, role)
            return (signer,)
        raise SigningError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")

    def public_keys(self, role: str) -> tuple[SSlibKey, ...]:
        """The public halves of :meth:`signers` (for root also in an online-only key set)."""
        if role == "root":
            return self._root_public
        return tuple(s.public_key for s in self.signers(role))

    # ------------------------------------------------------------------ files and Secret data

    def to_files(self, *, online_only: bool = False) -> dict[str, bytes]:
        """File name → content: the index plus one PEM private key per distinct key.

        ``online_only`` (or an online-only key set) writes the root keys as public keys
        (``<keyid>.pub.json``), so the files can live on a server without the offline root keys.
        """
        index = {
            "format": INDEX_FORMAT,
            "roles": {
                role: {
                    "keyids": [k.keyid for k in self.public_keys(role)],
                    "threshold": self.root_threshold if role == "root" else 1,
                }
                for role in ROLES
            },
        }
        files = {INDEX_FILE: json.dumps(index, indent=2, sort_keys=True).encode() + b"\n"}
        for key in self.root:
            if online_only or isinstance(key, SSlibKey):
                public = key if isinstance(key, SSlibKey) else key.public_key
                files[f"{public.keyid}.pub.json"] = json.dumps(public.to_dict(), sort_keys=True).encode()
            else:
                files[f"{key.public_key.keyid}.pem"] = key.private_bytes
        for role in ONLINE_ROLES:
            for signer in self.signers(role):
                files[f"{signer.public_key.keyid}.pem"] = signer.private_bytes
        return files

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], source: str) -> KeySet:
        """Parse what :meth:`to_files` wrote; :class:`SigningError` naming ``source`` on anything wrong."""
        raw_index = files.get(INDEX_FILE)
        if raw_index is None:
            raise SigningError(f"{source}: no {INDEX_FILE}")
        roles = _parse_index(raw_index, source)
        loaded: dict[str, CryptoSigner] = {}

        def signer(keyid: str) -> CryptoSigner:
            if keyid not in loaded:
                pem = files.get(f"{keyid}.pem")
                if pem is None:
                    raise SigningError(f"{source}: key file {keyid}.pem is missing")
                loaded[keyid] = _load_private_key(pem, keyid, source)
            return loaded[keyid]

        root_ids, root_threshold = roles["root"]
        online: dict[str, CryptoSigner] = {}
        for role in ONLINE_ROLES:
            keyids, threshold = roles[role]
            if len(keyids) != 1 or threshold != 1:
                raise SigningError(f"{source}: role {role} must have exactly one key and threshold 1")
            online[role] = signer(keyids[0])

        def root_key(keyid: str) -> CryptoSigner | SSlibKey:
            public = files.get(f"{keyid}.pub.json")
            if f"{keyid}.pem" in files or public is None:
                return signer(keyid)
            return _load_public_key(public, keyid, source)

        root_keys = [root_key(k) for k in root_ids]
        if all(isinstance(k, CryptoSigner) for k in root_keys):
            root: tuple[CryptoSigner, ...] | tuple[SSlibKey, ...] = tuple(cast("list[CryptoSigner]", root_keys))
        elif all(isinstance(k, SSlibKey) for k in root_keys):
            root = tuple(cast("list[SSlibKey]", root_keys))
        else:
            raise SigningError(f"{source}: some root keys are private and some public only")
        try:
            return cls(
                root=root,
                root_threshold=root_threshold,
                targets=online["targets"],
                snapshot=online["snapshot"],
                timestamp=online["timestamp"],
            )
        except SigningError as e:
            raise SigningError(f"{source}: {e}") from e

    def save(self, directory: Path, *, overwrite: bool = False) -> None:
        """Write the key files into ``directory`` (created 0700), each 0600, atomically, the index last.

        An existing key directory is refused unless ``overwrite``: replacing keys by accident would
        lock every device out. Overwriting leaves key files the new index does not name in place.
        """
        if (directory / INDEX_FILE).exists() and not overwrite:
            raise SigningError(f"{directory} already holds a key set; refusing to overwrite it")
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            files = self.to_files()
            index = files.pop(INDEX_FILE)
            for name, content in files.items():
                write_file_atomic(directory / name, content, mode=PRIVATE)
            write_file_atomic(directory / INDEX_FILE, index, mode=PRIVATE)
            fsync_dir(directory)
        except OSError as e:
            raise SigningError(f"cannot write keys to {directory}: {e}") from e

    @classmethod
    def load(cls, directory: Path) -> KeySet:
        """Read a key directory written by :meth:`save`, or an online-only one (a mounted Secret of
        :meth:`to_secret_data`: root public keys as ``<keyid>.pub.json``)."""
        if not (directory / INDEX_FILE).is_file():
            raise SigningError(f"{directory}: no key set here ({INDEX_FILE} is missing)")
        files: dict[str, bytes] = {}
        try:
            for path in directory.iterdir():
                # A mounted Secret also holds `..data` links and folders: only our file names count.
                if path.name == INDEX_FILE or path.name.endswith((".pem", ".pub.json")):
                    files[path.name] = _read_bounded(path)
        except OSError as e:
            raise SigningError(f"cannot read keys from {directory}: {e}") from e
        return cls.from_files(files, str(directory))

    def to_secret_data(self, *, online_only: bool = True) -> dict[str, str]:
        """The key files as a Kubernetes Secret's ``data``: file name → base64 of its content.

        Online-only by default: the operator publishes and refreshes, which needs no root private key.
        """
        files = self.to_files(online_only=online_only)
        return {name: base64.b64encode(content).decode("ascii") for name, content in files.items()}

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str]) -> KeySet:
        """Parse a Secret's ``data`` written by :meth:`to_secret_data`."""
        files: dict[str, bytes] = {}
        for name, encoded in data.items():
            try:
                files[name] = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError) as e:
                raise SigningError(f"secret data {name!r} is not valid base64: {e}") from e
        return cls.from_files(files, "secret data")


def _load_public_key(data: bytes, keyid: str, source: str) -> SSlibKey:
    """A root public key written by :meth:`KeySet.to_files`, checked against the key id it is filed under."""
    try:
        body = json.loads(data)
        key = SSlibKey.from_dict(keyid, dict(body))
    except (ValueError, TypeError, KeyError) as exc:
        raise SigningError(f"{source}: public key {keyid}.pub.json is not a key: {exc}") from None
    canonical = encode_canonical(key.to_dict())
    if canonical is None:
        raise SigningError(f"{source}: public key {keyid}.pub.json cannot be canonicalised")
    computed = hashlib.sha256(canonical.encode()).hexdigest()
    if computed != keyid or key.keytype != "ed25519":
        raise SigningError(f"{source}: public key {keyid}.pub.json is another key (or not Ed25519)")
    return key


def _parse_index(raw: bytes, source: str) -> dict[str, tuple[list[str], int]]:
    try:
        index = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SigningError(f"{source}: {INDEX_FILE} is not valid JSON: {e}") from e
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("roles"), dict):
        raise SigningError(f"{source}: {INDEX_FILE} is not an {INDEX_FORMAT} index")
    roles: dict[str, tuple[list[str], int]] = {}
    for role in ROLES:
        entry = index["roles"].get(role)
        keyids = entry.get("keyids") if isinstance(entry, dict) else None
        threshold = entry.get("threshold") if isinstance(entry, dict) else None
        if (
            not isinstance(keyids, list)
            or not keyids
            or not all(isinstance(k, str) and _KEYID.fullmatch(k) for k in keyids)
            or not isinstance(threshold, int)
            or isinstance(threshold, bool)
        ):
            raise SigningError(f"{source}: {INDEX_FILE} has no valid entry for role {role}")
        roles[role] = (keyids, threshold)
    return roles


def _load_private_key(pem: bytes, keyid: str, source: str) -> CryptoSigner:
    try:
        private_key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise SigningError(f"{source}: {keyid}.pem is not an unencrypted PEM private key: {e}") from e
    if not isinstance(private_key, Ed25519PrivateKey):
        raise SigningError(f"{source}: {keyid}.pem holds a {type(private_key).__name__}, not an Ed25519 key")
    signer = CryptoSigner(private_key)
    if signer.public_key.keyid != keyid:
        raise SigningError(f"{source}: {keyid}.pem holds key {signer.public_key.keyid}, not the one its name says")
    return signer


def _read_bounded(path: Path) -> bytes:
    with path.open("rb") as f:
        data = f.read(_MAX_FILE_BYTES + 1)
    if len(data) > _MAX_FILE_BYTES:
        raise SigningError(f"{path} is over {_MAX_FILE_BYTES} bytes; not a key file")
    return data
