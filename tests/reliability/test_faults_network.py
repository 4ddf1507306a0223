"""The link between agent and gateway stalls or goes down, mid-download and mid-health-reporting.

A :class:`TcpProxy` sits between the real agent and gateway processes. Two faults:

- *stall mid-download*: every byte is held (the agent sees a hang, not a reset), then the link comes
  back for new connections only — the stalled ones stay hung for good, as after a NAT or firewall
  lost its state. The agent must notice by itself (keepalive pings, ``--keepalive 10``), reconnect,
  resume the download from its partial file and finish the update.
- *outage or stall mid-health-reporting*: open connections are reset and new ones refused for a while;
  or every byte is held for a while and then delivered late.

Throughout, the agent keeps serving inference (every request answered), and no health window is
lost or counted twice: the gateway's totals must add up to exactly the requests served (windows the
gateway did not acknowledge are sent again). Recovery time: link back → update finished, or → totals
caught up.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.state import FleetState
from tests.support.agent_faults import (
    CLASS,
    MODEL,
    InferenceLoad,
    health_totals,
    partial_downloads,
    publish_versions,
    record,
    records,
    serving,
)
from tests.support.fleet import FleetSite, fleet_site, gateway_address, wait_for
from tests.support.netproxy import TcpProxy
from tests.support.reliability import scenario, trials

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

DEVICE = "netfault"
FAULT_S = 3.0
"""How long each fault lasts: longer than a heartbeat, shorter than the keepalive."""
AGENT_OPTIONS = ("--keepalive", "10", "--heartbeat-interval", "0.5")
STALL_DETECTED_S = 30.0
"""Bound on link back → update finished: one keepalive interval, its timeout, a reconnect, the rest."""


def _counted(state: FleetState) -> int:
    return sum(inferences for inferences, _ in health_totals(state, DEVICE).values())


def _stall_mid_download(site: FleetSite, state: FleetState, proxy: TcpProxy, target: str) -> tuple[int, float]:
    """Stall the link once a megabyte of ``target`` crossed; (revision, seconds from link back to installed)."""
    before = proxy.stats.downstream_bytes
    revision = site.assign(model=MODEL, version=target, devices=(DEVICE,))
    wait_for("a megabyte of the bundle crossed", lambda: proxy.stats.downstream_bytes > before + 1_000_000)
    proxy.stall()
    time.sleep(FAULT_S)  # the stall's length is the fault itself, not a wait for a condition
    assert record(state, DEVICE, revision) is None, "the update finished although the link was stalled"
    proxy.resume(abandon=True)
    back = time.monotonic()
    wait_for(f"{target} installed after the stall", lambda: record(state, DEVICE, revision), timeout=90)
    return revision, time.monotonic() - back


def _fault_mid_reporting(
    state: FleetState, proxy: TcpProxy, load: InferenceLoad, served_before: int, *, stall: bool
) -> float:
    """Under inference load, stall the link (hold every byte) or take it down (reset open connections,
    refuse new ones) for a while; seconds from link back to the gateway's totals caught up."""
    counted = load.served
    if stall:
        proxy.stall()
    else:
        proxy.drop()
        proxy.cut()
    wait_for("requests served during the fault", lambda: load.served > counted + 20)
    time.sleep(FAULT_S)  # the fault's length is the fault itself
    proxy.resume()  # a stall's held bytes now arrive, late: reports the agent already gave up on
    back = time.monotonic()
    load.stop()  # a fixed count for the totals to reach
    wait_for("the gateway's totals catch up", lambda: _counted(state) >= served_before + load.served, timeout=60)
    return time.monotonic() - back


@pytest.mark.timeout(900)  # full mode (EDGEFLEET_RELIABILITY=full) runs more trials
def test_stall_and_outage_between_agent_and_gateway_lose_nothing(tmp_path: Path) -> None:
    download = scenario("link stalled mid-download", guards="update progress, inference requests")
    reporting = scenario("link down or stalled mid-health-reporting", guards="health windows (inference counts)")
    with fleet_site(tmp_path / "site") as site:
        publish_versions(site, tmp_path / "models", width=1024)  # ~4 MB per version
        state = FleetState(LocalStore(site.folder / "store"))
        fleet, enroll = gateway_address(site.start_gateway())
        # 3 MB/s: a download takes over a second, so the stall lands in the middle of it.
        proxy = TcpProxy(int(fleet.rsplit(":", 1)[1]), rate_bytes_per_s=3e6).start()
        try:
            agent = site.start_agent(DEVICE, gateway=f"127.0.0.1:{proxy.port}", enroll_gateway=enroll,
                                     token=site.token(CLASS), extra=AGENT_OPTIONS)  # fmt: skip
            current = "1.0.0"
            revision = site.assign(model=MODEL, version=current, devices=(DEVICE,))
            wait_for("the first install", lambda: record(state, DEVICE, revision, "succeeded"), timeout=60)
            served = 0
            for _ in range(trials(1, 5)):
                target = "2.0.0" if current == "1.0.0" else "1.0.0"
                with InferenceLoad(agent) as load, download.trial() as trial:
                    revision, seconds = _stall_mid_download(site, state, proxy, target)
                    trial.recovered(seconds)
                    # Keepalive 10 s, pings answered within 5 s, then a reconnect: not the minute
                    # gRPC's own ping timeout took before the agent set it.
                    assert seconds < STALL_DETECTED_S, f"{seconds:.1f} s to notice the stall and finish"
                    assert [r.outcome for r in records(state, DEVICE, revision)] == ["succeeded"]
                    assert serving(agent, target)
                    current = target
                served += load.served
                assert not load.failed, f"{len(load.failed)} requests failed during the stall: {load.failed[:3]}"
                for stall in (False, True):
                    with InferenceLoad(agent) as load, reporting.trial() as trial:
                        trial.recovered(_fault_mid_reporting(state, proxy, load, served, stall=stall))
                        twice = _counted(state) - (served + load.served)
                        # A window whose ack was lost comes back as a resend; the gateway counts it once.
                        assert not twice, f"{twice} inferences counted twice after a {'stall' if stall else 'cut'}"
                    served += load.served
                    assert not load.failed, f"{len(load.failed)} requests failed: {load.failed[:3]}"
            # Resumed, not restarted; and nothing left to resume.
            assert "resuming at byte" in agent.output(), "the download started again from zero"
            assert not partial_downloads(site.agent_state(DEVICE))
        finally:
            proxy.stop()
    for record_ in (download, reporting):
        summary = record_.summary()
        print(f"{record_.name}: {summary}")
        assert summary["failures"] == 0
        assert summary["lost"] == 0
