"""Pushes assignment changes to the devices watching them, learned from one cheap poll of the store.

The store has no watch, so one task per gateway polls ``HEAD.json`` (a few bytes) every
``poll_interval``; when the revision moves it asks the store which devices the new revisions touched
and re-reads the assignments of only those connected here (all connected ones when the store cannot
say), handing each watcher the device's latest snapshot. Devices never poll: their stream is a push.
A device whose assignments cannot be read is logged and retried on the next poll; the others are
served meanwhile.

A watcher keeps only the newest snapshot (a slot, not a queue): a slow client can never hold up the
poller or other clients, and it loses nothing, because each snapshot is the device's whole current
state and the watcher sends only what is newer than what it already sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from edgefleet_core.errors import StoreError
from edgefleet_operator.fleet.errors import FleetError
from edgefleet_operator.fleet.records import AssignmentRecord, DeviceAssignments, model_key
from edgefleet_operator.fleet.state import FleetState
from edgefleet_operator.gateway.errors import Unavailable
from edgefleet_operator.gateway.pki import DeviceIdentity

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Removal:
    """Stop serving a model the device holds that has no assignment any more (``ACTION_REMOVE``)."""

    revision: int
    model_namespace: str
    model_name: str


Instruction = AssignmentRecord | Removal
"""What a watch stream yields."""


@dataclass(frozen=True)
class InstalledModel:
    """A model the device reports holding when it starts watching."""

    model_namespace: str
    model_name: str
    version: str


@dataclass(eq=False)
class _Watcher:
    """One open watch stream: the newest snapshot not yet looked at, and a bell."""

    identity: DeviceIdentity
    latest: tuple[DeviceAssignments, int] | None = None
    bell: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    def offer(self, snapshot: DeviceAssignments, head: int) -> None:
        self.latest = (snapshot, head)
        self.bell.set()

    def close(self) -> None:
        self.closed = True
        self.bell.set()


@dataclass
class _Progress:
    """What one stream has sent: per model the revision, and the models the device may still hold."""

    sent: dict[str, int]
    floor: int
    held: set[str]

    def instructions(self, snapshot: DeviceAssignments, head: int) -> list[Instruction]:
        out: list[Instruction] = []
        for key, record in sorted(snapshot.assignments.items(), key=lambda item: item[1].revision):
            if record.revision > self.sent.get(key, self.floor):
                out.append(record)
                self.sent[key] = record.revision
                if record.action == "remove":
                    self.held.discard(key)
                else:
                    self.held.add(key)
        for key in sorted(self.held - snapshot.assignments.keys()):
            namespace, _, name = key.partition("/")
            # Numbered with the device's own latest revision, not HEAD (another device's number):
            # the agent's report on it must name a revision this device was given.
            out.append(Removal(revision=snapshot.revision, model_namespace=namespace, model_name=name))
            self.held.discard(key)
        return out


class AssignmentHub:
    """The poller and the watchers of one gateway process."""

    def __init__(self, fleet: FleetState, *, poll_interval: float = 0.2) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, not {poll_interval}")
        self._fleet = fleet
        self._poll_interval = poll_interval
        self._watchers: dict[str, set[_Watcher]] = {}
        self._head: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._unread: set[str] = set()  # connected devices whose last read failed: read again next poll

    def connected_devices(self) -> int:
        """Devices with at least one watch stream open here."""
        return len(self._watchers)

    async def start(self) -> None:
        """Start polling (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._poll_forever(), name="assignment-hub")

    async def stop(self) -> None:
        """Stop polling and end every watch stream (the agents reconnect elsewhere)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for watchers in self._watchers.values():
            for watcher in watchers:
                watcher.close()

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except (FleetError, StoreError) as e:
                logger.warning("cannot poll the assignment head: %s", e)
            await asyncio.sleep(self._poll_interval)

    async def poll_once(self) -> None:
        """One look at HEAD; on a change, push fresh snapshots to the connected devices it touched."""
        head = await asyncio.to_thread(self._fleet.head_revision)
        if head == self._head and not self._unread:
            return
        touched: set[tuple[str, str]] | None = None
        if self._head is not None and head != self._head:
            touched = await asyncio.to_thread(self._fleet.changed_devices, self._head, head)
        elif self._head == head:
            touched = set()  # only the retries
        # Who to read is decided here, on the loop: the worker thread never touches the watcher sets.
        devices: list[tuple[str, DeviceIdentity]] = []
        for device, watchers in self._watchers.items():
            if not watchers:
                continue
            identity = next(iter(watchers)).identity
            if touched is None or device in self._unread or (identity.namespace, identity.name) in touched:
                devices.append((device, identity))
        snapshots, failed = await asyncio.to_thread(self._read, devices, frozenset(self._unread))
        self._head = head  # the devices that failed are in _unread, so nothing is lost
        self._unread = failed & self._watchers.keys()
        for device, snapshot in snapshots.items():
            for watcher in self._watchers.get(device, ()):
                watcher.offer(snapshot, head)

    def _read(
        self, devices: Iterable[tuple[str, DeviceIdentity]], failing: frozenset[str]
    ) -> tuple[dict[str, DeviceAssignments], set[str]]:
        snapshots: dict[str, DeviceAssignments] = {}
        failed: set[str] = set()
        for device, identity in devices:
            try:
                snapshots[device] = self._fleet.assignments_for(identity.namespace, identity.name)
            except (FleetError, StoreError) as e:
                # One bad record must not stop the pushes to every other device of this replica.
                if device not in failing:  # logged once, not on every poll
                    logger.warning("cannot read the assignments of %s (retried each poll): %s", device, e)
                failed.add(device)
        return snapshots, failed

    async def watch(
        self,
        identity: DeviceIdentity,
        last_revision: int,
        installed: Iterable[InstalledModel] = (),
        *,
        recheck: Callable[[], Awaitable[None]] | None = None,
        recheck_interval: float = 30.0,
    ) -> AsyncGenerator[Instruction, None]:
        """The device's assignments newer than ``last_revision`` in revision order, then each change.

        Models in ``installed`` that have no assignment any more get a :class:`Removal`, as does a
        model whose assignment disappears while the stream is open. Ends when the hub stops.
        ``recheck`` (the device's identity check) is awaited before every delivery and at least every
        ``recheck_interval`` seconds while idle; what it raises ends the stream, so a revoked or
        superseded device's open stream does not outlive the check.
        """
        if recheck_interval <= 0:
            raise ValueError(f"recheck_interval must be positive, not {recheck_interval}")
        watcher = _Watcher(identity)
        # Registered before the first read: a change that lands in between is pushed, not missed.
        self._watchers.setdefault(identity.device_id, set()).add(watcher)
        try:
            try:
                snapshot, head = await asyncio.to_thread(self._snapshot, identity)
            except (FleetError, StoreError) as e:
                raise Unavailable(f"cannot read the assignments of {identity.device_id}: {e}") from e
            progress = _Progress(sent={}, floor=last_revision, held=set())
            for model in installed:
                key = model_key(model.model_namespace, model.model_name)
                progress.held.add(key)
                current = snapshot.assignments.get(key)
                if current is not None and current.action == "remove" and current.revision <= last_revision:
                    progress.sent[key] = current.revision - 1  # the device still holds it: say it again
            latest: tuple[DeviceAssignments, int] | None = (snapshot, head)
            while latest is not None:
                for instruction in progress.instructions(*latest):
                    if recheck is not None:
                        await recheck()
                    yield instruction
                latest = await self._next(watcher, recheck, recheck_interval)
        finally:
            watchers = self._watchers.get(identity.device_id)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._watchers[identity.device_id]

    @staticmethod
    async def _next(
        watcher: _Watcher, recheck: Callable[[], Awaitable[None]] | None, recheck_interval: float
    ) -> tuple[DeviceAssignments, int] | None:
        """The watcher's next snapshot, ``None`` once it is closed; rechecks the device while idle."""
        while not watcher.closed:
            if recheck is None:
                await watcher.bell.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.bell.wait(), recheck_interval)
                if not watcher.bell.is_set():
                    await recheck()  # idle: the device may have been revoked meanwhile
                    continue
            watcher.bell.clear()
            if watcher.latest is not None:
                latest, watcher.latest = watcher.latest, None
                return latest
        return None

    def _snapshot(self, identity: DeviceIdentity) -> tuple[DeviceAssignments, int]:
        head = self._fleet.head_revision()
        return self._fleet.assignments_for(identity.namespace, identity.name), head
