"""The agent SIGKILLed at each phase of an update, by failpoint, then restarted without it.

Each phase has a failpoint in the agent's update path (``agent.update.<phase>``); an agent started
with ``EDGEFLEET_FAILPOINTS=<point>=kill`` dies exactly there, as at a power cut. After it is
restarted without failpoints it must: serve a verified version (the old or the new one, never a
partial one), finish the update by itself, have reported it exactly once (one ``succeeded`` record,
no spurious failure), and leave no temp files, staging folders or partial downloads in its state.
Recovery time: from the restart to serving the new version.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet_core.failpoints import ENV
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.state import FleetState
from tests.support.agent_faults import (
    CLASS,
    MODEL,
    VERSIONS,
    interrupted_writes,
    partial_downloads,
    publish_versions,
    record,
    records,
    serving,
    start_agent,
    verified_on_disk,
)
from tests.support.fleet import FleetSite, fleet_site, gateway_address, wait_for
from tests.support.reliability import Scenario, scenario, trials

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

PHASES: dict[str, str] = {
    # The manifest is one chunk, the payload two (1 MiB each): the kill lands after its first.
    "download": "agent.update.download=1*off->kill",
    "decode": "agent.update.decode=kill",
    "switch": "agent.update.switch=kill",
    "switched": "agent.update.switched=kill",
    "selftest": "agent.update.selftest=kill",
    "commit": "agent.update.commit=kill",
    "committed": "agent.update.committed=kill",
}
"""Phase → the failpoint configuration that kills the agent in it."""
PARALLEL = 4


@dataclass
class PhaseRun:
    """One agent's trials at one phase."""

    phase: str
    record: Scenario
    served_old: int = 0
    served_new: int = 0


def _next(version: str) -> str:
    return VERSIONS[(VERSIONS.index(version) + 1) % len(VERSIONS)]


def _run_phase(site: FleetSite, state: FleetState, phase: str, count: int) -> PhaseRun:
    name = f"phase-{phase}"
    fleet, enroll = gateway_address(site.processes[0])
    guards = "verified versions, install reports, state files"
    run = PhaseRun(phase, scenario(f"agent killed at {phase}", guards=guards))
    agent = site.start_agent(name, gateway=fleet, enroll_gateway=enroll, token=site.token(CLASS))
    current = VERSIONS[0]
    revision = site.assign(model=MODEL, version=current, devices=(name,))
    wait_for(f"{name} installs {current}", lambda: record(state, name, revision, "succeeded"), timeout=60)
    agent.terminate()
    for _ in range(count):
        with run.record.trial() as trial:
            target = _next(current)
            doomed = start_agent(site, name, gateway=fleet, enroll_gateway=enroll, env={ENV: PHASES[phase]})
            revision = site.assign(model=MODEL, version=target, devices=(name,))
            wait_for(f"{name} killed at {phase}", lambda: not doomed.alive(), timeout=60)  # noqa: B023
            assert doomed.popen.returncode == -9, f"{name} ended with {doomed.popen.returncode}, not SIGKILL"
            assert f"failpoint {PHASES[phase].split('=')[0]}: kill" in doomed.output(), doomed.output()[-3000:]
            state_dir = site.agent_state(name)
            if phase == "download":
                assert partial_downloads(state_dir), "the kill did not land mid-download"
            on_disk = verified_on_disk(state_dir)
            assert on_disk in (current, target), f"{on_disk} on disk after a kill at {phase}"
            assert record(state, name, revision) is None, "a report for an update that never finished"

            restarted = time.monotonic()
            agent = site.start_agent(name, gateway=fleet, enroll_gateway=enroll)
            status_first = serving(agent, current) or serving(agent, target)
            assert status_first, "not serving a verified version right after the restart"
            if serving(agent, current):
                run.served_old += 1
            else:
                run.served_new += 1
            wait_for(f"{name} serves {target}", lambda: serving(agent, target), timeout=60)  # noqa: B023
            trial.recovered(time.monotonic() - restarted)
            done = wait_for(f"{name} reports revision {revision}",
                            lambda: record(state, name, revision), timeout=30)  # fmt: skip  # noqa: B023
            reported = [(r.outcome, r.to_version) for r in records(state, name, revision)]
            assert reported == [("succeeded", target)], reported
            assert done.from_version in (current, target), done
            # Acknowledged reports leave the queue; temp files and partials are gone once it settled.
            wait_for("the report queue empties", lambda: not any((state_dir / "reports").glob("*.json")))  # noqa: B023
            wait_for("partial downloads removed", lambda: not partial_downloads(state_dir))  # noqa: B023
            leftovers = interrupted_writes(state_dir)
            trial.lose(len(leftovers), "files of interrupted writes left in the state" if leftovers else "")
            assert not leftovers, leftovers
            assert verified_on_disk(state_dir) == target
            agent.terminate()
            current = target
    return run


@pytest.mark.timeout(900)  # full mode (EDGEFLEET_RELIABILITY=full) runs more trials
def test_agent_killed_in_each_update_phase_recovers_a_verified_version(tmp_path: Path) -> None:
    count = trials(1, 5)
    with fleet_site(tmp_path / "site") as site:
        publish_versions(site, tmp_path / "models", width=640)
        state = FleetState(LocalStore(site.folder / "store"))
        site.start_gateway()
        with ThreadPoolExecutor(PARALLEL) as pool:
            futures = [pool.submit(_run_phase, site, state, phase, count) for phase in PHASES]
            runs = [f.result() for f in futures]
    for run in runs:
        summary = run.record.summary()
        print(f"{run.phase}: {summary['trials']} trials, {summary['failures']} failed, lost {summary['lost']}, "
              f"recovery {summary['recovery_s']}; came back on old {run.served_old}, new {run.served_new}")  # fmt: skip
        assert summary["failures"] == 0
        assert summary["lost"] == 0
    by_phase = {run.phase: run for run in runs}
    # Before the pointer flips the old version must come back; after the commit, the new one.
    for phase in ("download", "decode", "switch", "switched", "selftest", "commit"):
        assert by_phase[phase].served_new == 0, phase
    assert by_phase["committed"].served_old == 0
