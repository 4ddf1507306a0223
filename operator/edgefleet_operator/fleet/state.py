"""The fleet's shared state, kept in the artifact store so that any gateway replica can serve any device.

Layout under ``prefix`` (default ``fleet/``)::

    tokens/<token-id>.json                          bootstrap tokens (the secret only as sha256)
    devices/<namespace>/<name>.json                 device records
    assignments/<namespace>/<name>.json             a device's current assignments, one per model
    assignments/HEAD.json                           {"revision": N}, the highest revision, written last
    assignment-changes/<revision, 20 digits>.json   the devices one revision touched, written first
    health/<device-class>/replica-<replica-id>.json one shard per gateway replica and class: the health
                                                    of the devices that replica served, its counts only
    installs/<namespace>.<name>/<revision>-<outcome>.json   install reports (a duplicate overwrites itself)

Every write is one store ``put``, which is atomic. The control plane is the single writer of
assignments. A revision's change file is written before any device file and ``HEAD.json`` after
all of them, so a gateway that sees a new HEAD finds the assignments it announces and, in the change
files, which devices to re-read; a run that died midway leaves its change file, so its revision is
never reused. (Change files are not under ``assignments/``: a namespace called ``changes`` would
share their folder.) Health is sharded by replica because a device moves between replicas: each
replica writes only what it received, once per class per flush, and readers sum the shards of a
device. The store offers no compare-and-swap, so two replicas redeeming the same token in the same
instant could both succeed; the Kubernetes-API backend (issue 7) closes that with resource versions.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import statistics
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final, TypeVar

from pydantic import BaseModel, ValidationError

from edgefleet_core.bundle.distribution import version_key
from edgefleet_core.errors import StoreLimitExceeded, StoreNotFound
from edgefleet_core.resources.base import DNS_SUBDOMAIN_PATTERN
from edgefleet_core.store.base import ArtifactStore
from edgefleet_operator.fleet.errors import FleetInputError, FleetRecordError, TokenRefused, UnknownDevice
from edgefleet_operator.fleet.records import (
    DNS_LABEL_PATTERN,
    REPLICA_ID_PATTERN,
    TOKEN_ID_PATTERN,
    Action,
    AssignmentChange,
    AssignmentRecord,
    BootstrapToken,
    DeviceAssignments,
    DeviceHealthRecord,
    DeviceRecord,
    HealthAggregate,
    InstallRecord,
    ModelTotals,
    ReplicaHealth,
    TokenUse,
    WaveRef,
    model_key,
)

logger = logging.getLogger(__name__)

MAX_RECORD_BYTES: Final = 1 << 20
"""Largest record read from the store: every record is a few KiB; a bigger one is not ours."""
MAX_SHARD_BYTES: Final = 64 << 20
"""Largest health shard written or read: a replica's devices of one class, a few KiB each."""
MAX_CHANGE_SPAN: Final = 1000
"""Most revisions :meth:`FleetState.changed_devices` reads; above, a full re-read is cheaper."""
TOKEN_PREFIX: Final = "eft1"  # noqa: S105  (the format marker, not a secret)
TOKEN_RETRY_GRACE: Final = timedelta(minutes=5)
"""How long an Enroll retried with a spent token by the same device name still gets its identity."""
DEFAULT_HEALTHY_ERROR_RATE: Final = 0.01

_SECRET = re.compile(r"^[A-Za-z0-9_-]{43}$")  # 32 random bytes, urlsafe base64 without padding
_TOKEN_ID = re.compile(TOKEN_ID_PATTERN)
_LABEL = re.compile(DNS_LABEL_PATTERN)
_SUBDOMAIN = re.compile(DNS_SUBDOMAIN_PATTERN)
_REPLICA_ID = re.compile(REPLICA_ID_PATTERN)
_SHARD_FILE = re.compile(r"^replica-([a-z0-9-]{1,63})\.json$")
_R = TypeVar("_R", bound=BaseModel)


def utc_now() -> datetime:
    """The default clock."""
    return datetime.now(UTC)


def _secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_label(what: str, value: str) -> str:
    if not _LABEL.fullmatch(value):
        raise FleetInputError(f"{what} {value!r} is not a DNS-1123 label (lowercase alphanumerics and '-', 1-63)")
    return value


def _check_class(device_class: str) -> str:
    if not _SUBDOMAIN.fullmatch(device_class):
        raise FleetInputError(f"device class {device_class!r} is not a DNS-1123 subdomain")
    return device_class


def _belongs(key: str, record: DeviceRecord | None, namespace: str, name: str) -> DeviceRecord | None:
    # A record copied under another device's key must not lend that device its certificate serial.
    if record is not None and (record.namespace, record.name) != (namespace, name):
        raise FleetRecordError(key, f"holds the record of device {record.namespace}/{record.name}")
    return record


class FleetState:
    """Tokens, devices, assignments, health and install reports of one fleet, over ``store``.

    Stateless itself: two objects over the same store (two gateway replicas) see the same fleet.
    ``clock`` decides token expiry and the retry grace (inject one in tests).
    """

    def __init__(
        self, store: ArtifactStore, prefix: str = "fleet/", *, clock: Callable[[], datetime] = utc_now
    ) -> None:
        if prefix and not prefix.endswith("/"):
            raise FleetInputError(f"fleet state prefix {prefix!r} must be empty or end in '/'")
        self._store = store
        self._prefix = prefix
        self._clock = clock

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise FleetInputError("the fleet state's clock returned a naive datetime; it must be timezone-aware")
        return now.astimezone(UTC)

    # ------------------------------------------------------------------------------- store access

    def _key(self, *parts: str) -> str:
        return self._prefix + "/".join(parts)

    def _read(self, key: str, model: type[_R]) -> _R | None:
        """The record under ``key``, ``None`` if absent; :class:`FleetRecordError` if it is not one."""
        try:
            data = self._store.get(key, max_bytes=MAX_RECORD_BYTES)
        except StoreNotFound:
            return None
        except StoreLimitExceeded as e:
            raise FleetRecordError(key, f"larger than {MAX_RECORD_BYTES} bytes") from e
        try:
            return model.model_validate_json(data)
        except ValidationError as e:
            raise FleetRecordError(key, f"not a valid {model.__name__}: {e}") from e

    def _read_all(self, prefix: str, model: type[_R]) -> list[tuple[str, _R]]:
        found = []
        for key in self._store.list(prefix):
            if not key.endswith(".json"):
                continue  # not a record of ours (a stray upload): ignored, not parsed
            record = self._read(key, model)
            if record is not None:  # removed between list and get
                found.append((key, record))
        return found

    def _write(self, key: str, record: BaseModel) -> None:
        self._store.put(key, record.model_dump_json().encode())

    # ------------------------------------------------------------------------------------- tokens

    def create_token(
        self, namespace: str, device_class: str, *, ttl: timedelta, device_name: str | None = None, uses: int = 1
    ) -> str:
        """A new bootstrap token, ``eft1.<token-id>.<secret>``; only its sha256 is stored."""
        if ttl <= timedelta(0):
            raise FleetInputError(f"token TTL must be positive, not {ttl}")
        if uses < 1:
            raise FleetInputError(f"a token needs at least one use, not {uses}")
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        try:
            record = BootstrapToken(
                token_id=token_id,
                secret_sha256=_secret_sha256(secret),
                namespace=namespace,
                device_class=device_class,
                device_name=device_name,
                expires_at=self._now() + ttl,
                uses_left=uses,
                used_by=[],
            )
        except ValidationError as e:
            raise FleetInputError(f"cannot create a token: {e}") from e
        self._write(self._key("tokens", f"{token_id}.json"), record)
        logger.info("created bootstrap token %s for %s (class %s, %d use(s))", token_id, namespace, device_class, uses)
        return f"{TOKEN_PREFIX}.{token_id}.{secret}"

    def check_token(self, token: str) -> BootstrapToken:
        """The token's record if its secret is right, without spending it (expiry and uses not checked).

        Lets the gateway learn the namespace, class and pinned name before it builds the identity it
        then passes to :meth:`redeem_token`.
        """
        token_id, secret = self._parse_token(token)
        record = self._read(self._key("tokens", f"{token_id}.json"), BootstrapToken)
        # Unknown id and wrong secret read the same, so a caller learns nothing about which ids exist.
        if record is None or not hmac.compare_digest(record.secret_sha256, _secret_sha256(secret)):
            raise TokenRefused("unknown", "bootstrap token is not known")
        return record

    def redeem_token(self, token: str, device_name: str, device_id: str) -> BootstrapToken:
        """Spend one use of ``token`` on ``device_name``; the record as it was stored afterwards.

        Refused (:class:`TokenRefused`) when malformed, unknown, pinned to another name, expired or
        used up. A retry by the same device name within :data:`TOKEN_RETRY_GRACE` of its use is not
        refused and spends nothing: the gateway then hands out the same identity again.
        """
        record = self.check_token(token)
        if record.device_name is not None and device_name != record.device_name:
            raise TokenRefused("name-mismatch", f"bootstrap token {record.token_id} is for another device name")
        now = self._now()
        for use in record.used_by:
            if use.device_name == device_name and timedelta(0) <= now - use.used_at <= TOKEN_RETRY_GRACE:
                logger.info("bootstrap token %s: retry by %s within the grace period", record.token_id, device_name)
                return record
        if now >= record.expires_at:
            raise TokenRefused("expired", f"bootstrap token {record.token_id} expired at {record.expires_at}")
        if record.uses_left <= 0:
            raise TokenRefused("used", f"bootstrap token {record.token_id} has been used")
        try:
            use = TokenUse(device_name=device_name, device_id=device_id, used_at=now)
        except ValidationError as e:
            raise FleetInputError(f"cannot redeem a token for {device_name!r}: {e}") from e
        # Each use claims a create-only key of its own first: two gateway replicas redeeming the
        # last use at once both read uses_left 1, but only one creates the key. The record
        # written after it is for reading; the claims are what count.
        total = record.uses_left + len(record.used_by)
        index = len(record.used_by)
        while not self._store.create(self._use_key(record.token_id, index), use.model_dump_json().encode()):
            claimed = self._read(self._use_key(record.token_id, index), TokenUse)
            if (claimed is not None and claimed.device_name == device_name
                    and timedelta(0) <= now - claimed.used_at <= TOKEN_RETRY_GRACE):  # fmt: skip
                # This device's own claim: an attempt that failed after it (the record write, or
                # a store create retried after it had landed). A retry, not a second use.
                use = claimed
                break
            index += 1
            if index >= total:
                raise TokenRefused("used", f"bootstrap token {record.token_id} has been used (by a concurrent "
                                   "enrollment)")  # fmt: skip
        spent = record.model_copy(update={"uses_left": total - index - 1, "used_by": [*record.used_by, use]})
        self._write(self._key("tokens", f"{record.token_id}.json"), spent)
        return spent

    def _use_key(self, token_id: str, index: int) -> str:
        """The create-only key a token's ``index``-th use claims."""
        return self._key("tokens", token_id, "uses", f"{index}.json")

    @staticmethod
    def _parse_token(token: str) -> tuple[str, str]:
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not _TOKEN_ID.fullmatch(parts[1]):
            raise TokenRefused("malformed", f"not a bootstrap token (expected {TOKEN_PREFIX}.<id>.<secret>)")
        if not _SECRET.fullmatch(parts[2]):
            raise TokenRefused("malformed", "bootstrap token secret is malformed")
        return parts[1], parts[2]

    # ------------------------------------------------------------------------------------ devices

    def _device_key(self, namespace: str, name: str) -> str:
        return self._key("devices", _check_label("namespace", namespace), f"{_check_label('device name', name)}.json")

    def put_device(self, record: DeviceRecord) -> None:
        """Create or replace a device record."""
        self._write(self._device_key(record.namespace, record.name), record)

    def create_device(self, record: DeviceRecord) -> bool:
        """Record a device that has no record yet; ``False`` if one appeared meanwhile (another enrollment won)."""
        return self._store.create(self._device_key(record.namespace, record.name), record.model_dump_json().encode())

    def get_device(self, namespace: str, name: str) -> DeviceRecord | None:
        """The device record, or ``None`` if the device never enrolled."""
        key = self._device_key(namespace, name)
        return _belongs(key, self._read(key, DeviceRecord), namespace, name)

    def list_devices(self, namespace: str | None = None) -> list[DeviceRecord]:
        """Every device record (of one namespace), by namespace and name."""
        prefix = (
            self._key("devices", "")
            if namespace is None
            else self._key("devices", _check_label("namespace", namespace), "")
        )
        records = []
        for key, record in self._read_all(prefix, DeviceRecord):
            if key != self._device_key(record.namespace, record.name):
                raise FleetRecordError(key, f"holds the record of device {record.namespace}/{record.name}")
            records.append(record)
        return sorted(records, key=lambda r: (r.namespace, r.name))

    def revoke_device(self, namespace: str, name: str) -> DeviceRecord:
        """Mark the device revoked (its certificate is refused from now on); the updated record."""
        record = self.get_device(namespace, name)
        if record is None:
            raise UnknownDevice(namespace, name)
        revoked = record.model_copy(update={"revoked": True})
        self.put_device(revoked)
        logger.info("[%s/%s] revoked", namespace, name)
        return revoked

    # -------------------------------------------------------------------------------- assignments

    def _head_key(self) -> str:
        return self._key("assignments", "HEAD.json")

    def head_revision(self) -> int:
        """The highest assignment revision ever written (0 before the first): one tiny object to poll."""
        key = self._head_key()
        try:
            data = self._store.get(key, max_bytes=MAX_RECORD_BYTES)
        except StoreNotFound:
            return 0
        except StoreLimitExceeded as e:
            raise FleetRecordError(key, f"larger than {MAX_RECORD_BYTES} bytes") from e
        try:
            revision = json.loads(data)["revision"]
        except (ValueError, TypeError, KeyError) as e:
            raise FleetRecordError(key, f'not {{"revision": <int>}}: {e}') from e
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
            raise FleetRecordError(key, f"revision {revision!r} is not a non-negative integer")
        return revision

    def assign(
        self,
        namespace: str,
        device_names: Sequence[str],
        *,
        model_namespace: str,
        model_name: str,
        version: str,
        action: Action,
        target_paths: Sequence[str],
        bundle_sha256: str,
        bundle_length: int,
        delta_from_version: str | None = None,
        wave: WaveRef | None = None,
    ) -> int:
        """Assign a model version to devices under one new revision (HEAD + 1, see below); the revision.

        For the single writer (the control plane). A device's earlier assignment of the same model is
        replaced. Devices need not have enrolled yet: they find the assignment when they connect.
        """
        names = list(dict.fromkeys(device_names))
        if not names:
            raise FleetInputError("no devices to assign to")
        current = [self.assignments_for(namespace, name) for name in names]
        # Above every revision these devices hold, not only above HEAD: a run that died before writing
        # HEAD may have left a device with HEAD + 1, and a revision must never be reused on a device.
        revision = max([self.head_revision(), *(c.revision for c in current)]) + 1
        # Nor on any other device: a died run left its change file (written first), so skip past it;
        # gateways then learn of that run's devices too, with the next HEAD.
        while self._store.stat(self._change_key(revision)) is not None:
            revision += 1
        try:
            record = AssignmentRecord(
                revision=revision,
                model_namespace=model_namespace,
                model_name=model_name,
                version=version,
                action=action,
                target_paths=list(target_paths),
                bundle_sha256=bundle_sha256,
                bundle_length=bundle_length,
                delta_from_version=delta_from_version,
                wave=wave,
            )
            change = AssignmentChange(revision=revision, namespace=namespace, names=names)
        except ValidationError as e:
            raise FleetInputError(f"invalid assignment: {e}") from e
        # First: every revision that touched a device file has its change file (see changed_devices).
        self._write(self._change_key(revision), change)
        for device in current:
            updated = {**device.assignments, model_key(model_namespace, model_name): record}
            self._write(
                self._assignments_key(namespace, device.name), device.model_copy(update={"assignments": updated})
            )
        # Last: a gateway that sees this revision finds every device file it covers already written.
        self._store.put(self._head_key(), json.dumps({"revision": revision}).encode())
        logger.info(
            "revision %d: %s %s/%s %s on %d device(s) in %s",
            revision, action, model_namespace, model_name, version, len(names), namespace,
        )  # fmt: skip
        return revision

    def _change_key(self, revision: int) -> str:
        return self._key("assignment-changes", f"{revision:020d}.json")

    def changed_devices(self, after: int, upto: int) -> set[tuple[str, str]] | None:
        """The (namespace, name) of every device an assignment revision in (``after``, ``upto``] touched.

        One read per revision (a revision without a change file is a gap, not an error: revisions may
        skip numbers). ``None`` when the caller should re-read every device instead: more than
        :data:`MAX_CHANGE_SPAN` revisions, or a malformed change file (logged with its key).
        """
        if after < 0 or upto < 0:
            raise FleetInputError(f"revisions are not negative: ({after}, {upto}]")
        if upto - after > MAX_CHANGE_SPAN:
            return None
        changed: set[tuple[str, str]] = set()
        for revision in range(after + 1, upto + 1):
            key = self._change_key(revision)
            try:
                change = self._read(key, AssignmentChange)
            except FleetRecordError as e:
                logger.warning("%s; re-reading every device's assignments", e)
                return None
            if change is None:
                continue
            if change.revision != revision:
                logger.warning("fleet record %s: holds revision %d; re-reading every device", key, change.revision)
                return None
            changed.update((change.namespace, name) for name in change.names)
        return changed

    def latest_revision_for(self, namespace: str, name: str) -> int:
        """The highest assignment revision the device holds (0 if none): what an install report may name."""
        return self.assignments_for(namespace, name).revision

    def _assignments_key(self, namespace: str, name: str) -> str:
        return self._key(
            "assignments", _check_label("namespace", namespace), f"{_check_label('device name', name)}.json"
        )

    def assignments_for(self, namespace: str, name: str) -> DeviceAssignments:
        """The device's current assignments (none if it has never been assigned anything)."""
        key = self._assignments_key(namespace, name)
        record = self._read(key, DeviceAssignments)
        if record is None:
            return DeviceAssignments(namespace=namespace, name=name, assignments={})
        if (record.namespace, record.name) != (namespace, name):
            raise FleetRecordError(key, f"holds the assignments of {record.namespace}/{record.name}")
        return record

    # ------------------------------------------------------------------------------------- health

    def _shard_key(self, device_class: str, replica_id: str) -> str:
        return self._key("health", device_class, f"replica-{replica_id}.json")

    def write_replica_health(self, replica_id: str, device_class: str, records: Sequence[DeviceHealthRecord]) -> None:
        """Replace this replica's health shard of ``device_class`` with ``records`` (one put).

        Each record counts only what this replica received; the shard holds every device of the
        class the replica keeps figures for (a device left out loses this replica's share of its
        totals). The caller bounds the rate.
        """
        if not _REPLICA_ID.fullmatch(replica_id):
            raise FleetInputError(f"replica id {replica_id!r} is not 1-63 of [a-z0-9-]")
        _check_class(device_class)
        devices: dict[str, DeviceHealthRecord] = {}
        for record in records:
            if record.device_class != device_class:
                raise FleetInputError(
                    f"device {record.device_id} is of class {record.device_class}, not {device_class}"
                )
            if record.device_id in devices:
                raise FleetInputError(f"device {record.device_id} appears twice in one health shard")
            devices[record.device_id] = record
        shard = ReplicaHealth(replica_id=replica_id, device_class=device_class, updated_at=self._now(), devices=devices)
        data = shard.model_dump_json().encode()
        if len(data) > MAX_SHARD_BYTES:
            # Written, it could never be read back: refuse now, while the caller still holds the figures.
            raise FleetInputError(
                f"health shard of {replica_id}/{device_class} is {len(data)} bytes, over {MAX_SHARD_BYTES}"
            )
        self._store.put(self._shard_key(device_class, replica_id), data)

    def read_replica_health(self, replica_id: str, device_class: str) -> list[DeviceHealthRecord]:
        """One replica's own shard of a class (not merged), by device id; empty if it has none.

        For a replica that restarts under the same id: it resumes its counts instead of overwriting
        them. :class:`FleetRecordError` if the shard is malformed or oversized.
        """
        if not _REPLICA_ID.fullmatch(replica_id):
            raise FleetInputError(f"replica id {replica_id!r} is not 1-63 of [a-z0-9-]")
        key = self._shard_key(_check_class(device_class), replica_id)
        shard = self._read_shard(key, device_class, replica_id)
        return [] if shard is None else sorted(shard.devices.values(), key=lambda r: r.device_id)

    def _read_shard(self, key: str, device_class: str, replica_id: str) -> ReplicaHealth | None:
        try:
            data = self._store.get(key, max_bytes=MAX_SHARD_BYTES)
        except StoreNotFound:
            return None
        except StoreLimitExceeded as e:
            raise FleetRecordError(key, f"larger than {MAX_SHARD_BYTES} bytes") from e
        try:
            shard = ReplicaHealth.model_validate_json(data)
        except ValidationError as e:
            raise FleetRecordError(key, f"not a valid ReplicaHealth: {e}") from e
        if (shard.device_class, shard.replica_id) != (device_class, replica_id):
            raise FleetRecordError(key, f"holds the shard of replica {shard.replica_id}, class {shard.device_class}")
        return shard

    def read_health_report(self, device_class: str | None = None) -> tuple[list[DeviceHealthRecord], list[str]]:
        """Every device's merged health record (of one class), by class and device id, and the shards skipped.

        A device's record is the sum of its records in every replica's shard (see :func:`merge_health`).
        A malformed or oversized shard is skipped with a warning naming its key, never blocking the
        others; its key is in the second list so callers can report it.
        """
        base = self._key("health", "")
        prefix = base if device_class is None else self._key("health", _check_class(device_class), "")
        parts: dict[tuple[str, str], list[DeviceHealthRecord]] = {}
        skipped: list[str] = []
        for key in sorted(self._store.list(prefix)):
            device_folder, _, file = key[len(base) :].partition("/")
            match = _SHARD_FILE.fullmatch(file)
            if match is None or not _SUBDOMAIN.fullmatch(device_folder):
                continue  # not a shard of ours (a stray upload, a record of an older layout): not parsed
            try:
                shard = self._read_shard(key, device_folder, match.group(1))
            except FleetRecordError as e:
                logger.warning("%s; skipped, the other replicas' health still counts", e)
                skipped.append(key)
                continue
            if shard is None:  # removed between list and get
                continue
            for record in shard.devices.values():
                parts.setdefault((record.device_class, record.device_id), []).append(record)
        return [merge_health(parts[device]) for device in sorted(parts)], skipped

    def read_health(self, device_class: str | None = None) -> list[DeviceHealthRecord]:
        """Every device's merged health record (of one class), by class and device id; bad shards skipped."""
        return self.read_health_report(device_class)[0]

    def read_device_health(self, device_class: str, device_id: str) -> DeviceHealthRecord | None:
        """One device's merged health record, ``None`` if no replica has one (reads the class's shards)."""
        found = [r for r in self.read_health(device_class) if r.device_id == device_id]
        return found[0] if found else None

    def record_install(self, namespace: str, name: str, record: InstallRecord) -> bool:
        """Keep an install report; ``False`` if the same report (revision and outcome) is already kept."""
        key = self._install_dir(namespace, name) + f"{record.revision}-{record.outcome}.json"
        if self._store.stat(key) is not None:
            return False
        self._write(key, record)
        return True

    def _install_dir(self, namespace: str, name: str) -> str:
        return self._key("installs", f"{_check_label('namespace', namespace)}.{_check_label('device name', name)}", "")

    def installs(self, namespace: str | None = None) -> list[tuple[str, str, InstallRecord]]:
        """Every install report kept, as (namespace, device name, report), by device and revision."""
        found = []
        for key, record in self._read_all(self._key("installs", ""), InstallRecord):
            device = key[len(self._key("installs", "")) :].split("/", 1)[0]
            ns, _, name = device.partition(".")
            if not _LABEL.fullmatch(ns) or not _LABEL.fullmatch(name):
                raise FleetRecordError(key, "not under installs/<namespace>.<name>/")
            if namespace is None or ns == namespace:
                found.append((ns, name, record))
        return sorted(found, key=lambda item: (item[0], item[1], item[2].revision, item[2].finished_at))

    def aggregate(
        self,
        model_namespace: str,
        model_name: str,
        device_class: str | None = None,
        *,
        healthy_error_rate: float = DEFAULT_HEALTHY_ERROR_RATE,
    ) -> list[HealthAggregate]:
        """Health of each version of a model per device class, from the health records and install reports.

        Computed from the store only, so every replica gives the same answer. Install counts are per
        device: its latest report (highest revision) for a version decides which count it is in.
        """
        health = self.read_health(device_class)
        classes = {record.device_id: record.device_class for record in self.list_devices()}
        classes.update({h.device_id: h.device_class for h in health})
        latest: dict[tuple[str, str], InstallRecord] = {}
        for ns, name, install in self.installs():
            if (install.model_namespace, install.model_name) != (model_namespace, model_name):
                continue
            slot = (f"{ns}.{name}", install.to_version)
            if slot not in latest or (install.revision, install.finished_at) >= (
                latest[slot].revision,
                latest[slot].finished_at,
            ):
                latest[slot] = install
        groups: dict[tuple[str, str], _Group] = {}
        for record in health:
            for totals in record.totals.values():
                if (totals.model_namespace, totals.model_name) == (model_namespace, model_name):
                    groups.setdefault((record.device_class, totals.version), _Group()).add_device(
                        totals, healthy_error_rate
                    )
        for (device, version), install in latest.items():
            cls = classes.get(device)
            if cls is None or (device_class is not None and cls != device_class):
                continue
            groups.setdefault((cls, version), _Group()).add_install(install)
        ordered = sorted(groups.items(), key=lambda item: (item[0][0], version_key(item[0][1]), item[0][1]))
        return [group.result(model_namespace, model_name, cls, version) for (cls, version), group in ordered]


def merge_health(parts: Sequence[DeviceHealthRecord]) -> DeviceHealthRecord:
    """One device's health from its records in several replicas' shards (each counting its own reports).

    Counters of the same model version are summed; its latest latencies come from the part updated
    last; the latest window is the one that started last; the latest install the one that finished
    last. ``parts`` must be records of one device, in a fixed order (ties go to the first).
    """
    if not parts:
        raise FleetInputError("no health records to merge")
    if len(parts) == 1:
        return parts[0]
    newest = max(parts, key=lambda p: p.updated_at)
    totals: dict[str, ModelTotals] = {}
    updated: dict[str, datetime] = {}
    for part in parts:
        for key, t in part.totals.items():
            seen = totals.get(key)
            if seen is None:
                totals[key], updated[key] = t, part.updated_at
                continue
            latest = t if part.updated_at > updated[key] else seen
            updated[key] = max(updated[key], part.updated_at)
            # model_copy skips validation: sums of non-negative counters stay valid.
            totals[key] = latest.model_copy(
                update={
                    "windows": seen.windows + t.windows,
                    "inference_count": seen.inference_count + t.inference_count,
                    "error_count": seen.error_count + t.error_count,
                    "accelerator_fallback_count": seen.accelerator_fallback_count + t.accelerator_fallback_count,
                }
            )
    windows = [p.last_window for p in parts if p.last_window is not None]
    installs = [p.last_install for p in parts if p.last_install is not None]
    return newest.model_copy(
        update={
            "totals": totals,
            "last_window": max(windows, key=lambda w: w.window_start, default=None),
            "last_install": max(installs, key=lambda i: (i.finished_at, i.revision), default=None),
        }
    )


class _Group:
    """Running sums for one (device class, version) of :meth:`FleetState.aggregate`."""

    def __init__(self) -> None:
        self.devices = 0
        self.healthy = 0
        self.inferences = 0
        self.errors = 0
        self.fallbacks = 0
        self.p95s: list[float] = []
        self.installs: dict[str, int] = {"succeeded": 0, "failed": 0, "rolled_back": 0, "refused_verification": 0}

    def add_device(self, totals: ModelTotals, healthy_error_rate: float) -> None:
        self.devices += 1
        self.inferences += totals.inference_count
        self.errors += totals.error_count
        self.fallbacks += totals.accelerator_fallback_count
        if totals.windows > 0 and totals.inference_count > 0:
            self.p95s.append(totals.last_p95_ms)
        if _rate(totals.error_count, totals.inference_count) <= healthy_error_rate:
            self.healthy += 1

    def add_install(self, install: InstallRecord) -> None:
        self.installs[install.outcome] += 1

    def result(self, model_namespace: str, model_name: str, device_class: str, version: str) -> HealthAggregate:
        return HealthAggregate(
            model_namespace=model_namespace,
            model_name=model_name,
            device_class=device_class,
            version=version,
            devices_reporting=self.devices,
            inference_count=self.inferences,
            error_count=self.errors,
            error_rate=_rate(self.errors, self.inferences),
            p95_ms_max=max(self.p95s, default=0.0),
            p95_ms_median=statistics.median(self.p95s) if self.p95s else 0.0,
            accelerator_fallback_count=self.fallbacks,
            installs_succeeded=self.installs["succeeded"],
            installs_failed=self.installs["failed"],
            installs_rolled_back=self.installs["rolled_back"],
            installs_refused=self.installs["refused_verification"],
            devices_healthy=self.healthy,
            healthy_ratio=self.healthy / self.devices if self.devices else 0.0,
        )


def _rate(errors: int, inferences: int) -> float:
    # Errors are counted among the inferences; min() keeps a device that reports otherwise within [0, 1].
    return min(1.0, errors / inferences) if inferences else 0.0
