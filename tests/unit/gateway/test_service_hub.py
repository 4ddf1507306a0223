"""AssignmentHub over a real LocalStore: replay, removals, pushes, slow watchers, touched-only reads, rechecks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.records import AssignmentRecord, DeviceAssignments
from edgefleet_operator.fleet.state import FleetState
from edgefleet_operator.gateway.errors import PermissionDenied
from edgefleet_operator.gateway.hub import AssignmentHub, InstalledModel, Instruction, Removal
from edgefleet_operator.gateway.pki import DeviceIdentity

CAM = DeviceIdentity(device_id="demo.cam-1", namespace="demo", device_class="cpu-small", name="cam-1", serial="1a")
SHA = "ab" * 32


def _assign(fleet: FleetState, model: str, version: str, names: tuple[str, ...] = ("cam-1",)) -> int:
    return fleet.assign(
        "demo",
        names,
        model_namespace="demo",
        model_name=model,
        version=version,
        action="install",
        target_paths=[f"cpu-small/demo/{model}/{version}/manifest.json"],
        bundle_sha256=SHA,
        bundle_length=10,
    )


async def _next(stream: AsyncIterator[Instruction], hub: AssignmentHub) -> Instruction:
    """The stream's next instruction, polling the hub by hand until it comes."""
    waiting = asyncio.ensure_future(anext(stream))
    for _ in range(200):
        await hub.poll_once()
        done, _ = await asyncio.wait({waiting}, timeout=0.01)
        if done:
            return waiting.result()
    waiting.cancel()
    raise AssertionError("no instruction pushed")


@pytest.fixture
def fleet(tmp_path: Path) -> FleetState:
    return FleetState(LocalStore(tmp_path / "store"))


@pytest.mark.asyncio
async def test_replays_newer_assignments_in_order_then_pushes_new_ones(fleet: FleetState) -> None:
    first = _assign(fleet, "digits", "1.0.0")
    second = _assign(fleet, "faces", "2.0.0")
    hub = AssignmentHub(fleet, poll_interval=0.01)
    stream = hub.watch(CAM, 0, ())
    got = [await _next(stream, hub), await _next(stream, hub)]
    assert [i.revision for i in got] == [first, second]
    assert hub.connected_devices() == 1
    third = _assign(fleet, "digits", "1.1.0")
    pushed = await _next(stream, hub)
    assert isinstance(pushed, AssignmentRecord)
    assert (pushed.revision, pushed.version) == (third, "1.1.0")
    await stream.aclose()
    assert hub.connected_devices() == 0


@pytest.mark.asyncio
async def test_resumes_after_last_revision_and_removes_unassigned_models(fleet: FleetState) -> None:
    first = _assign(fleet, "digits", "1.0.0")
    second = _assign(fleet, "faces", "2.0.0")
    hub = AssignmentHub(fleet, poll_interval=0.01)
    stream = hub.watch(CAM, first, [InstalledModel("demo", "digits", "1.0.0"), InstalledModel("demo", "old", "0.1")])
    got = [await _next(stream, hub), await _next(stream, hub)]
    assert isinstance(got[0], AssignmentRecord)
    assert got[0].revision == second
    assert got[1] == Removal(revision=second, model_namespace="demo", model_name="old")
    await stream.aclose()


@pytest.mark.asyncio
async def test_a_synthesized_removal_carries_the_devices_own_revision(fleet: FleetState) -> None:
    own = _assign(fleet, "digits", "1.0.0")
    _assign(fleet, "faces", "2.0.0", ("cam-2",))  # HEAD moves on for another device
    assert fleet.head_revision() > own
    hub = AssignmentHub(fleet, poll_interval=0.01)
    stream = hub.watch(CAM, own, [InstalledModel("demo", "old", "0.1")])
    # The agent reports on it; the gateway refuses revisions never given to this device.
    assert await _next(stream, hub) == Removal(revision=own, model_namespace="demo", model_name="old")
    await stream.aclose()


@pytest.mark.asyncio
async def test_a_watcher_that_does_not_read_only_keeps_the_newest_snapshot(fleet: FleetState) -> None:
    hub = AssignmentHub(fleet, poll_interval=0.01)
    slow = hub.watch(CAM, 0, ())
    fast_identity = DeviceIdentity("demo.cam-2", "demo", "cpu-small", "cam-2", "2b")
    fast = hub.watch(fast_identity, 0, ())
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        _assign(fleet, "digits", version, ("cam-1", "cam-2"))
        got = await _next(fast, hub)
        assert isinstance(got, AssignmentRecord)
        assert got.version == version
    latest = await _next(slow, hub)  # the slow one skips straight to the current state
    assert isinstance(latest, AssignmentRecord)
    assert latest.version == "1.2.0"
    await slow.aclose()
    await fast.aclose()


@pytest.mark.asyncio
async def test_stop_ends_every_stream(fleet: FleetState) -> None:
    hub = AssignmentHub(fleet, poll_interval=0.01)
    await hub.start()
    stream = hub.watch(CAM, 0, ())
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # let the watch register
    for _ in range(100):
        if hub.connected_devices():
            break
        await asyncio.sleep(0.01)
    await hub.stop()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 5)


class CountingFleet(FleetState):
    """Counts the assignment reads the hub makes (the seam the hub calls)."""

    def __init__(self, store: LocalStore) -> None:
        super().__init__(store)
        self.reads: list[str] = []

    def assignments_for(self, namespace: str, name: str) -> DeviceAssignments:
        self.reads.append(name)
        return super().assignments_for(namespace, name)


def _identity(name: str) -> DeviceIdentity:
    return DeviceIdentity(f"demo.{name}", "demo", "cpu-small", name, name.encode().hex())


@pytest.mark.asyncio
async def test_a_change_re_reads_only_the_connected_devices_it_touched(tmp_path: Path) -> None:
    fleet = CountingFleet(LocalStore(tmp_path / "store"))
    hub = AssignmentHub(fleet, poll_interval=0.01)
    streams = {name: hub.watch(_identity(name), 0, ()) for name in ("cam-1", "cam-2", "cam-3")}
    _assign(fleet, "digits", "1.0.0", ("cam-1", "cam-2", "cam-3"))
    for stream in streams.values():
        await _next(stream, hub)
    fleet.reads.clear()
    _assign(fleet, "digits", "1.1.0", ("cam-2",))
    got = await _next(streams["cam-2"], hub)
    assert isinstance(got, AssignmentRecord)
    assert got.version == "1.1.0"
    assert set(fleet.reads) == {"cam-2"}
    for stream in streams.values():
        await stream.aclose()


@pytest.mark.asyncio
async def test_a_bad_assignments_record_skips_only_that_device(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LocalStore(tmp_path / "store")
    fleet = FleetState(store)
    hub = AssignmentHub(fleet, poll_interval=0.01)
    good = hub.watch(_identity("cam-1"), 0, ())
    bad = hub.watch(_identity("cam-2"), 0, ())
    _assign(fleet, "digits", "1.0.0", ("cam-1", "cam-2"))
    await _next(good, hub)
    await _next(bad, hub)
    store.put("fleet/assignments/demo/cam-2.json", b"{not json")
    revision = _assign(fleet, "digits", "1.1.0", ("cam-1",))
    # A full re-read (as when the store cannot say what changed) meets cam-2's broken record: cam-1 is served.
    fleet.changed_devices = lambda after, upto: None  # type: ignore[method-assign]
    got = await _next(good, hub)
    assert isinstance(got, AssignmentRecord)
    assert got.revision == revision
    assert "cannot read the assignments of demo.cam-2" in caplog.text
    store.delete("fleet/assignments/demo/cam-2.json")
    _assign(fleet, "faces", "2.0.0", ("cam-2",))
    healed = await _next(bad, hub)  # once readable again, cam-2 gets its current state
    assert isinstance(healed, AssignmentRecord)
    assert healed.model_name == "faces"
    await good.aclose()
    await bad.aclose()


@pytest.mark.asyncio
async def test_the_recheck_runs_before_each_delivery_and_while_idle_and_ends_the_stream(fleet: FleetState) -> None:
    hub = AssignmentHub(fleet, poll_interval=0.01)
    _assign(fleet, "digits", "1.0.0")
    checks: list[str] = []
    revoked = False

    async def recheck() -> None:
        checks.append("check")
        if revoked:
            raise PermissionDenied("device demo.cam-1 is revoked")

    stream = hub.watch(CAM, 0, (), recheck=recheck, recheck_interval=0.02)
    await _next(stream, hub)
    assert checks == ["check"]
    revoked = True
    with pytest.raises(PermissionDenied):
        await asyncio.wait_for(anext(stream), 5)  # idle: no change comes, the recheck ends it
    assert hub.connected_devices() == 0
