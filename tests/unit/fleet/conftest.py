"""A fleet state over a real LocalStore, with a clock the test moves."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet import FleetState


@dataclass
class Clock:
    """A settable clock: token expiry and the retry grace without waiting."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def fleet(store: LocalStore, clock: Clock) -> FleetState:
    return FleetState(store, clock=clock)
