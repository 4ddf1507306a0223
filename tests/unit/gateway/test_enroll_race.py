"""Concurrent enrollments on one gateway: a single-use token is spent once, a free name is taken once.

The servicer runs Enroll in worker threads, so two devices racing with one token (or for one name)
reach the read-decide-write of the token and device records at the same time. Within one process
the service serializes it; between replicas (separate processes, no shared lock) the store's
create-only keys decide: a token use and a new device's record are each created by one winner.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest

from edgefleet_core.errors import StoreUnavailable
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.state import FleetState
from edgefleet_operator.gateway.errors import GatewayError, PermissionDenied, Unauthenticated, Unavailable
from edgefleet_operator.gateway.pki import FleetCA
from edgefleet_operator.gateway.service import EnrollApplication, GatewayService
from tests.unit.gateway.test_service import csr_pem

RACERS = 8
ROUNDS = 2


def _race(attempts: Sequence[Callable[[], object]]) -> tuple[int, list[GatewayError]]:
    """Run every attempt at once; (successes, refusals)."""
    barrier = threading.Barrier(len(attempts))
    wins: list[object] = []
    refusals: list[GatewayError] = []

    def attempt(call: Callable[[], object]) -> None:
        barrier.wait()
        try:
            wins.append(call())
        except GatewayError as e:
            refusals.append(e)

    threads = [threading.Thread(target=attempt, args=(call,)) for call in attempts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return len(wins), refusals


def _service(tmp_path: Path) -> tuple[GatewayService, FleetState]:
    store = LocalStore(tmp_path / "store")
    fleet = FleetState(store)
    return GatewayService(fleet, store, FleetCA.create()), fleet


def _application(token: str, name: str) -> EnrollApplication:
    return EnrollApplication(bootstrap_token=token, csr_pem=csr_pem(), device_name=name, labels={}, hardware=None,
                             agent_version="0.1.0")  # fmt: skip


def test_a_single_use_token_enrolls_one_device_however_many_race_for_it(tmp_path: Path) -> None:
    service, fleet = _service(tmp_path)
    for round_ in range(ROUNDS):
        token = fleet.create_token("demo", "cpu-small", ttl=timedelta(hours=1))
        applications = [_application(token, f"cam-{round_}-{i}") for i in range(RACERS)]
        wins, refusals = _race([partial(service.enroll, a) for a in applications])
        assert wins == 1
        assert all(isinstance(e, Unauthenticated) and "has been used" in str(e) for e in refusals), refusals
    assert len(fleet.list_devices("demo")) == ROUNDS


def test_a_free_name_is_taken_by_one_device_however_many_race_for_it(tmp_path: Path) -> None:
    service, fleet = _service(tmp_path)
    for round_ in range(ROUNDS):
        tokens = [fleet.create_token("demo", "cpu-small", ttl=timedelta(hours=1)) for _ in range(RACERS)]
        wins, refusals = _race([partial(service.enroll, _application(t, f"cam-{round_}")) for t in tokens])
        assert wins == 1
        assert all(isinstance(e, PermissionDenied) and "already enrolled" in str(e) for e in refusals), refusals


def _replicas(tmp_path: Path, count: int) -> tuple[list[GatewayService], FleetState]:
    """``count`` gateway replicas over one store: no lock in common, as separate processes."""
    store = LocalStore(tmp_path / "store")
    ca = FleetCA.create()
    return [GatewayService(FleetState(store), store, ca) for _ in range(count)], FleetState(store)


def test_replicas_racing_for_a_single_use_token_enroll_one_device(tmp_path: Path) -> None:
    replicas, fleet = _replicas(tmp_path, RACERS)
    for round_ in range(ROUNDS):
        token = fleet.create_token("demo", "cpu-small", ttl=timedelta(hours=1))
        calls = [partial(r.enroll, _application(token, f"cam-{round_}-{i}")) for i, r in enumerate(replicas)]
        wins, refusals = _race(calls)
        assert wins == 1
        assert all(isinstance(e, Unauthenticated) and "has been used" in str(e) for e in refusals), refusals
    assert len(fleet.list_devices("demo")) == ROUNDS


def test_replicas_racing_for_a_free_name_record_one_device(tmp_path: Path) -> None:
    replicas, fleet = _replicas(tmp_path, RACERS)
    for round_ in range(ROUNDS):
        tokens = [fleet.create_token("demo", "cpu-small", ttl=timedelta(hours=1)) for _ in range(RACERS)]
        calls = [partial(r.enroll, _application(t, f"cam-{round_}")) for r, t in zip(replicas, tokens, strict=True)]
        wins, refusals = _race(calls)
        assert wins == 1
        assert all(isinstance(e, PermissionDenied) for e in refusals), refusals
        [device] = [d for d in fleet.list_devices("demo") if d.name == f"cam-{round_}"]
        assert device.cert_serial  # the winner's record, never replaced by a loser


def test_a_multi_use_token_gives_each_racing_replica_a_use_until_none_is_left(tmp_path: Path) -> None:
    replicas, fleet = _replicas(tmp_path, RACERS)
    token = fleet.create_token("demo", "cpu-small", ttl=timedelta(hours=1), uses=3)
    wins, refusals = _race([partial(r.enroll, _application(token, f"cam-{i}")) for i, r in enumerate(replicas)])
    assert wins == 3
    assert len(refusals) == RACERS - 3
    assert len(fleet.list_devices("demo")) == 3


class _FailingPut(LocalStore):
    """A store whose next ``put`` under a prefix fails once (a store error after a token use was claimed)."""

    def __init__(self, root: Path, prefix: str) -> None:
        super().__init__(root)
        self.prefix = prefix
        self.armed = False

    def put(self, key: str, data: bytes) -> None:
        if self.armed and key.startswith(self.prefix):
            self.armed = False
            raise StoreUnavailable(f"injected failure writing {key}")
        super().put(key, data)


def test_a_retry_after_a_store_error_once_the_use_was_claimed_enrolls(tmp_path: Path) -> None:
    store = _FailingPut(tmp_path / "store", "fleet/tokens/")
    fleet = FleetState(store)
    service = GatewayService(fleet, store, FleetCA.create())
    token = fleet.create_token("demo", "cpu-small", ttl=timedelta(hours=1))
    store.armed = True  # create_token's own write is done: fail the redeem's
    application = _application(token, "cam-1")
    with pytest.raises(Unavailable):
        service.enroll(application)  # the use is claimed, then the token record's write fails
    service.enroll(application)  # the agent retries: its own claim, not a second use
    assert [d.name for d in fleet.list_devices("demo")] == ["cam-1"]
    with pytest.raises(Unauthenticated, match="has been used"):
        service.enroll(_application(token, "cam-2"))
