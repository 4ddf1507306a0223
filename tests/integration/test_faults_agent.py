"""Faults the agent must survive, with real processes: SIGKILL mid-update, gateway restarts, bad bytes.

Each test starts the real gateway and agent commands. A kill is SIGKILL at a random moment of an
update (a power cut); afterwards the agent must come back on a verified version — the old or the
new one, never a half-written one — and finish or retry the update by itself.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.state import FleetState
from edgefleet_proto.v1 import inference_pb2
from tests.support.agent_faults import CLASS, MODEL, NAMESPACE, VERSIONS
from tests.support.agent_faults import model_status as _status
from tests.support.agent_faults import publish_versions as _publish_versions
from tests.support.agent_faults import record as _record
from tests.support.agent_faults import records as _records
from tests.support.agent_faults import verified_on_disk as _verified_on_disk
from tests.support.fleet import FleetSite, fleet_site, gateway_address, wait_for
from tests.support.netproxy import TcpProxy

pytestmark = pytest.mark.integration
KILL_TRIALS = 50
PARALLEL_AGENTS = 2


@dataclass
class KillTrial:
    start_version: str
    target_version: str
    delay_s: float
    on_disk_after_kill: str | None
    served_after_restart: str
    final_outcome: str


def _kill_trials(site: FleetSite, state: FleetState, name: str, trials: int, seed: int) -> list[KillTrial]:
    rng = random.Random(seed)
    fleet, enroll = gateway_address(site.processes[0])
    agent = site.start_agent(name, gateway=fleet, enroll_gateway=enroll, token=site.token(CLASS))
    current = "1.0.0"
    revision = site.assign(model=MODEL, version=current, devices=(name,))
    wait_for(f"{name} installs {current}", lambda: _record(state, name, revision, "succeeded"), timeout=60)
    # The first full update, timed, sets the window the kills are drawn from.
    started = time.monotonic()
    revision = site.assign(model=MODEL, version="2.0.0", devices=(name,))
    wait_for(f"{name} installs 2.0.0", lambda: _record(state, name, revision, "succeeded"), timeout=60)
    window = max(time.monotonic() - started, 0.2)
    current = "2.0.0"
    results = []
    for trial in range(trials):
        target = VERSIONS[(VERSIONS.index(current) + 1) % len(VERSIONS)]
        delay = rng.uniform(0, window * 1.2)
        revision = site.assign(model=MODEL, version=target, devices=(name,))
        time.sleep(delay)  # the kill point itself is what is random here, not a wait for a condition
        agent.kill()
        on_disk = _verified_on_disk(site.agent_state(name))
        assert on_disk in (current, target), f"trial {trial}: {on_disk} on disk, not {current} or {target}"
        agent = site.start_agent(name, gateway=fleet, enroll_gateway=enroll)
        status = wait_for(f"{name} serving after restart", lambda: _status(agent), timeout=30)  # noqa: B023
        assert status.active_version in (current, target), f"trial {trial}: serving {status.active_version}"
        assert status.state == inference_pb2.MODEL_STATE_READY
        record = wait_for(f"trial {trial}: {name} finishes revision {revision}",
                          lambda: _record(state, name, revision, "succeeded"), timeout=60)  # fmt: skip  # noqa: B023
        results.append(KillTrial(current, target, delay, on_disk, status.active_version, record.outcome))
        current = target
    agent.terminate()
    return results


def test_sigkill_at_random_points_of_updates_never_leaves_a_partial_version(tmp_path: Path) -> None:
    with fleet_site(tmp_path / "site") as site:
        _publish_versions(site, tmp_path / "models")
        state = FleetState(LocalStore(site.folder / "store"))
        site.start_gateway()
        per_agent = KILL_TRIALS // PARALLEL_AGENTS
        with ThreadPoolExecutor(PARALLEL_AGENTS) as pool:
            runs = [
                pool.submit(_kill_trials, site, state, f"kill-{i}", per_agent, seed=i) for i in range(PARALLEL_AGENTS)
            ]
            trials = [t for run in runs for t in run.result()]
    assert len(trials) >= KILL_TRIALS
    old = sum(t.served_after_restart == t.start_version for t in trials)
    print(f"{len(trials)} kills: {old} came back on the old version, {len(trials) - old} on the new one; "
          f"kill delays {min(t.delay_s for t in trials):.2f}-{max(t.delay_s for t in trials):.2f} s")  # fmt: skip
    # The kills landed on both sides of the switch, so both outcomes were really exercised.
    assert any(t.served_after_restart == t.start_version for t in trials)
    assert any(t.served_after_restart == t.target_version for t in trials)


def test_gateway_restart_mid_download_resumes_from_the_offset(tmp_path: Path) -> None:
    with fleet_site(tmp_path / "site") as site:
        _publish_versions(site, tmp_path / "models", width=1536)  # ~9 MB per version
        state = FleetState(LocalStore(site.folder / "store"))
        gateway = site.start_gateway()
        fleet, enroll = gateway_address(gateway)
        fleet_port = int(fleet.rsplit(":", 1)[1])
        # 4 MB/s: a full download takes seconds, so the restart lands in the middle of it.
        proxy = TcpProxy(fleet_port, rate_bytes_per_s=4e6).start()
        try:
            agent = site.start_agent("resumer", gateway=f"127.0.0.1:{proxy.port}", enroll_gateway=enroll,
                                     token=site.token(CLASS))  # fmt: skip
            revision = site.assign(model=MODEL, version="1.0.0", devices=("resumer",))
            wait_for("a third of the bundle transferred", lambda: proxy.stats.downstream_bytes > 3e6, timeout=60)
            gateway.kill()
            restarted = site.start_gateway(name="gateway-2", port=fleet_port, enroll_port=int(enroll.rsplit(":", 1)[1]))
            assert restarted.alive()
            wait_for("install after the restart", lambda: _record(state, "resumer", revision, "succeeded"), timeout=90)
            # Resumed, not restarted: the agent says so, and far less than two bundles crossed the link.
            assert "resum" in agent.output().lower(), agent.output()[-3000:]
            folder = site.folder / "store" / "tuf" / "targets" / CLASS / NAMESPACE / MODEL / "1.0.0"
            bundle = sum(p.stat().st_size for p in folder.glob("*.eft"))  # the full bundle, no deltas
            # A restart from zero would resend the 3 MB that had crossed before the kill; a resume
            # resends at most the chunk in flight (1 MiB) and what the proxy had buffered.
            print(f"crossed {proxy.stats.downstream_bytes} bytes for a {bundle}-byte bundle")
            assert proxy.stats.downstream_bytes < bundle + 2_500_000, (proxy.stats.downstream_bytes, bundle)
        finally:
            proxy.stop()


def test_corruption_in_transit_is_detected_and_refetched(tmp_path: Path) -> None:
    with fleet_site(tmp_path / "site") as site:
        _publish_versions(site, tmp_path / "models", width=512)
        state = FleetState(LocalStore(site.folder / "store"))
        gateway = site.start_gateway()
        fleet, enroll = gateway_address(gateway)
        proxy = TcpProxy(int(fleet.rsplit(":", 1)[1])).start()
        try:
            site.start_agent("transit", gateway=f"127.0.0.1:{proxy.port}", enroll_gateway=enroll,
                             token=site.token(CLASS))  # fmt: skip
            # One flipped byte in the middle of the bundle's transfer: TLS's record MAC catches it,
            # the connection drops, and the agent resumes from what it had verified as received.
            proxy.corrupt_downstream_after = proxy.stats.downstream_bytes + 300_000
            revision = site.assign(model=MODEL, version="1.0.0", devices=("transit",))
            wait_for("install despite the corruption", lambda: _record(state, "transit", revision, "succeeded"))
            # Resumed inside the same attempt: no failed attempt was ever reported.
            assert [r.outcome for r in _records(state, "transit", revision)] == ["succeeded"]
            assert proxy.corrupt_downstream_after is None, "the corruption was never injected"
        finally:
            proxy.stop()


def test_corrupted_target_in_the_store_is_refused_and_never_activated(tmp_path: Path) -> None:
    with fleet_site(tmp_path / "site") as site:
        _publish_versions(site, tmp_path / "models", width=256)
        state = FleetState(LocalStore(site.folder / "store"))
        gateway = site.start_gateway()
        fleet, enroll = gateway_address(gateway)
        agent = site.start_agent("victim", gateway=fleet, enroll_gateway=enroll, token=site.token(CLASS))
        first = site.assign(model=MODEL, version="1.0.0", devices=("victim",))
        assert wait_for("1.0.0 installed", lambda: _record(state, "victim", first)).outcome == "succeeded"
        # Someone with write access to the bucket changes 2.0.0's payloads (same length, other bytes).
        for payload in (site.folder / "store" / "tuf" / "targets").rglob("*.eft"):
            if "/2.0.0/" in payload.as_posix():
                data = bytearray(payload.read_bytes())
                data[len(data) // 2] ^= 0x01
                payload.write_bytes(bytes(data))
        second = site.assign(model=MODEL, version="2.0.0", devices=("victim",))
        record = wait_for("the refusal reported", lambda: _record(state, "victim", second), timeout=60)
        assert record.outcome == "refused_verification", record
        assert record.failed_phase in ("download", "verify"), record
        status = _status(agent)
        assert status is not None
        assert status.active_version == "1.0.0"
        assert _verified_on_disk(site.agent_state("victim")) == "1.0.0"
