"""The health journal: acknowledged reports survive a killed gateway, and none is counted twice.

A "kill" here is a service object dropped without its flush or close: what a SIGKILL leaves (the
process-level test is tests/reliability/test_faults_gateway.py).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.state import FleetState
from edgefleet_operator.gateway.errors import Unavailable
from edgefleet_operator.gateway.journal import HealthJournal
from edgefleet_operator.gateway.pki import FleetCA
from edgefleet_operator.gateway.server import GatewayConfig, GatewayConfigError
from edgefleet_operator.gateway.service import GatewayService, ServicePolicy
from tests.unit.gateway.test_service import Clock, Gateway, _samples

REPLICA = "gateway-0"


@pytest.fixture(scope="module")
def ca() -> FleetCA:
    return FleetCA.create()


@pytest.fixture
def gw(tmp_path: Path, ca: FleetCA) -> Gateway:
    clock = Clock()
    store = LocalStore(tmp_path / "store")
    fleet = FleetState(store, clock=clock)
    service = GatewayService(fleet, store, ca, ServicePolicy(), clock=clock)
    return Gateway(clock, store, fleet, service, ca)


def _journaled(gw: Gateway, folder: Path, **options: int) -> GatewayService:
    """A gateway process under the fixed replica id with its journal opened (replaying what is there)."""
    policy = dataclasses.replace(gw.service.policy, replica_id=REPLICA)
    journal = HealthJournal(folder, REPLICA, **options)
    service = GatewayService(
        FleetState(gw.store, clock=gw.clock), gw.store, gw.ca, policy, clock=gw.clock, journal=journal
    )
    service.recover_journal()
    return service


def _inferences(gw: Gateway, device: str = "demo.cam-1") -> int:
    records = {r.device_id: r for r in gw.fleet.read_health("cpu-small")}
    return records[device].totals["demo/digits@1.0.0"].inference_count if device in records else 0


def test_reports_acknowledged_but_not_flushed_survive_a_kill(gw: Gateway, tmp_path: Path) -> None:
    identity = gw.enroll()
    first = _journaled(gw, tmp_path / "journal")
    first.report_health(identity, _samples(100))
    first.flush_health()
    first.report_health(identity, _samples(10))
    first.report_health(identity, _samples(1))  # acknowledged, in memory only: then killed
    assert _inferences(gw) == 100

    again = _journaled(gw, tmp_path / "journal")
    assert again.flush_health() == 1
    assert _inferences(gw) == 111
    [record] = gw.fleet.read_replica_health(REPLICA, "cpu-small")
    assert record.totals["demo/digits@1.0.0"].windows == 3
    # The flush emptied the journal: a third process replays nothing and counts nothing twice.
    third = _journaled(gw, tmp_path / "journal")
    third.flush_health()
    assert _inferences(gw) == 111


def test_a_kill_between_the_shard_write_and_the_segment_deletion_counts_nothing_twice(
    gw: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = gw.enroll()
    first = _journaled(gw, tmp_path / "journal")
    first.report_health(identity, _samples(100))
    monkeypatch.setattr(HealthJournal, "discard_closed", lambda self: None)  # killed right after the write
    first.flush_health()
    first.report_health(identity, _samples(5))  # after the flush: only in the journal
    monkeypatch.undo()
    assert _inferences(gw) == 100

    again = _journaled(gw, tmp_path / "journal")  # replays both segments; the shard already has the 100
    again.flush_health()
    assert _inferences(gw) == 105


def test_a_report_racing_the_flush_is_not_counted_twice(gw: Gateway, tmp_path: Path) -> None:
    """A report that lands after the segment rotated but before its device's record is built."""
    identity = gw.enroll()
    first = _journaled(gw, tmp_path / "journal")
    first.report_health(identity, _samples(100))
    real_rotate = HealthJournal.rotate

    def rotate_then_report(journal: HealthJournal) -> int | None:
        closed = real_rotate(journal)
        first._health_lock.release()  # the event loop gets in between (as it can in production)
        try:
            first.report_health(identity, _samples(7))
        finally:
            first._health_lock.acquire()
        return closed

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HealthJournal, "rotate", rotate_then_report)
        first.flush_health()
    assert _inferences(gw) == 107  # the record was built after the racing report
    again = _journaled(gw, tmp_path / "journal")  # killed: the racing report is still in the journal
    again.flush_health()
    assert _inferences(gw) == 107


def test_a_torn_last_line_is_skipped_and_the_rest_replayed(gw: Gateway, tmp_path: Path) -> None:
    identity = gw.enroll()
    first = _journaled(gw, tmp_path / "journal")
    first.report_health(identity, _samples(3))
    first.report_health(identity, _samples(4))
    [segment] = (tmp_path / "journal" / f"replica-{REPLICA}").glob("segment-*.log")
    data = segment.read_bytes()
    segment.write_bytes(data[: len(data) - 9])  # a power cut in the middle of the second line
    again = _journaled(gw, tmp_path / "journal")
    again.flush_health()
    assert _inferences(gw) == 3


def test_a_full_journal_refuses_reports_so_the_agent_keeps_them(gw: Gateway, tmp_path: Path) -> None:
    identity = gw.enroll()
    service = _journaled(gw, tmp_path / "journal", max_bytes=600)
    accepted = 0
    with pytest.raises(Unavailable, match="cannot journal the health report"):  # noqa: PT012
        while accepted < 10:
            service.report_health(identity, _samples(1))
            accepted += 1
    assert 1 <= accepted < 10
    service.flush_health()  # the store takes them: the journal empties and takes reports again
    service.report_health(identity, _samples(1))
    service.flush_health()
    assert _inferences(gw) == accepted + 1


def test_a_journal_needs_a_replica_id(gw: Gateway, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a configured replica id"):
        GatewayService(gw.fleet, gw.store, gw.ca, gw.service.policy, journal=HealthJournal(tmp_path, "x"))
    with pytest.raises(GatewayConfigError, match="needs a replica id"):
        GatewayConfig(health_journal=tmp_path)


def test_an_unwritable_journal_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(Exception, match=r"health journal folder .* is not writable"):
        HealthJournal(tmp_path / "file", REPLICA)


def test_a_journal_folder_made_anew_under_the_same_replica_id_loses_nothing(gw: Gateway, tmp_path: Path) -> None:
    """A rescheduled pod that kept its name: an empty journal numbers from 1 again, below the shard's numbers."""
    identity = gw.enroll()
    first = _journaled(gw, tmp_path / "j1")
    for _ in range(5):
        first.report_health(identity, _samples(10))
    first.flush_health()
    second = _journaled(gw, tmp_path / "j2")  # the same replica id, a new folder
    second.report_health(identity, _samples(100))
    second.flush_health()
    second.report_health(identity, _samples(1000))  # acknowledged, then killed
    third = _journaled(gw, tmp_path / "j2")
    third.flush_health()
    assert _inferences(gw) == 1150


def test_a_short_write_is_cut_off_so_later_reports_replay(
    gw: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = gw.enroll()
    first = _journaled(gw, tmp_path / "journal")
    first.report_health(identity, _samples(1))
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:10]))  # a disk full part-way
    with pytest.raises(Unavailable):
        first.report_health(identity, _samples(2))
    monkeypatch.undo()
    first.report_health(identity, _samples(4))  # acknowledged after the short write, then killed
    again = _journaled(gw, tmp_path / "journal")
    again.flush_health()
    assert _inferences(gw) == 5
