"""The agent daemon against a FleetGateway double over real mTLS, with the Updater faked at its seam."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from edgefleet_agent.assignments import AssignmentSpec, InstallResult
from edgefleet_agent.cli import app
from edgefleet_agent.daemon import (
    Agent,
    AgentConfigError,
    AgentSettings,
    Components,
    Progress,
    StoppableServer,
    health_reports,
)
from edgefleet_agent.identity import DeviceIdentity, EnrollmentError
from edgefleet_agent.metrics import AgentMetrics
from edgefleet_agent.runtime import ModelWindowStats
from edgefleet_agent.system import DeviceStats
from edgefleet_core.signing.client import TufClient
from edgefleet_proto.v1 import fleet_pb2
from tests.unit.agent.fake_gateway import TOKEN, FakeGateway, FleetPki, RunningGateway, start_gateway

SHA = "cd" * 32


@dataclass
class FakeUpdater:
    applied: list[AssignmentSpec] = field(default_factory=list)
    results: list[InstallResult] = field(default_factory=list)
    hold: set[int] = field(default_factory=set)
    """Revisions whose apply waits until cancelled."""
    outcomes: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    """Per revision, (outcome, reason) of successive attempts; default succeeded."""
    active: dict[tuple[str, str], str] = field(default_factory=dict)
    recovered: list[InstallResult] = field(default_factory=list)
    raise_on: set[int] = field(default_factory=set)
    """Revisions whose apply raises (a bug in the install path)."""

    def recover(self) -> list[InstallResult]:
        return self.recovered

    def apply(self, assignment: AssignmentSpec, cancelled: Callable[[], bool]) -> InstallResult:
        self.applied.append(assignment)
        if assignment.revision in self.raise_on:
            raise KeyError("boom")
        outcome, reason = "succeeded", "Installed"
        if assignment.action == "remove":
            self.active.pop((assignment.model_namespace, assignment.model_name), None)
            reason = "Removed"
        if assignment.revision in self.hold:
            while not cancelled():
                threading.Event().wait(0.01)
            outcome, reason = "failed", "Superseded"
        elif self.outcomes.get(assignment.revision):
            outcome, reason = self.outcomes[assignment.revision].pop(0)
        if outcome == "succeeded" and assignment.action != "remove":
            self.active[(assignment.model_namespace, assignment.model_name)] = assignment.version
        result = InstallResult(
            revision=assignment.revision,
            model_namespace=assignment.model_namespace,
            model_name=assignment.model_name,
            from_version="",
            to_version=assignment.version,
            outcome=outcome,  # type: ignore[arg-type]
            reason=reason,
            message="",
            failed_phase=None if outcome == "succeeded" else "download",
            durations={"total": 0.01},
            active_slot="a",
            finished_at=datetime.now(UTC),
        )
        self.results.append(result)
        return result

    def installed(self) -> list[tuple[str, str, str]]:
        return [(ns, name, version) for (ns, name), version in sorted(self.active.items())]


class FakeRuntime:
    def drain_windows(self) -> list[ModelWindowStats]:
        return [ModelWindowStats("vision", "digits", "1.0.0", "a", 5, 0, 1.0, 2.0, 3.0, 0)]


class FakeServer:
    stopped = False

    async def stop(self, grace: float | None) -> None:
        self.stopped = True


@dataclass
class World:
    running: RunningGateway
    settings: AgentSettings
    updater: FakeUpdater
    server: FakeServer

    def agent(self, **overrides: object) -> Agent:
        settings = AgentSettings(**{**self.settings.__dict__, **overrides})

        def components(
            s: AgentSettings, identity: DeviceIdentity, tuf: Callable[[], TufClient], metrics: AgentMetrics
        ) -> Components:
            async def start() -> tuple[StoppableServer, int]:
                return self.server, 50051

            return Components(updater=self.updater, runtime=FakeRuntime(), start_inference=start)

        return Agent(settings, components=components, backoff_rand=lambda: 0.0)


@pytest.fixture(scope="module")
def pki() -> FleetPki:
    return FleetPki()


@pytest_asyncio.fixture
async def world(pki: FleetPki, tmp_path: Path) -> AsyncIterator[World]:
    running = await start_gateway(FakeGateway(pki))
    (tmp_path / "ca.pem").write_bytes(pki.ca_pem)
    (tmp_path / "root.json").write_bytes(b'{"signed": "a root"}')
    settings = AgentSettings(
        state_dir=tmp_path / "state",
        gateway=running.fleet,
        enroll_gateway=running.enroll,
        gateway_ca=tmp_path / "ca.pem",
        tuf_root=tmp_path / "root.json",
        name="dev-1",
        token=TOKEN,
        heartbeat_interval=0.05,
        stop_grace=2.0,
    )
    yield World(running, settings, FakeUpdater(), FakeServer())
    await running.server.stop(None)


async def until(condition: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def started(agent: Agent) -> tuple[asyncio.Task[None], list[tuple[str, str]]]:
    ready: list[tuple[str, str]] = []
    task = asyncio.create_task(agent.run(lambda device, address: ready.append((device, address))))
    await until(lambda: ready or task.done())
    if task.done():
        task.result()
    return task, ready


async def stopped(agent: Agent, task: Awaitable[None]) -> None:
    agent.stop()
    await asyncio.wait_for(task, 20)


def _assignment(revision: int, version: str = "1.0.0", model: str = "digits", action: int = 1) -> fleet_pb2.Assignment:
    return fleet_pb2.Assignment(
        revision=revision,
        model_namespace="vision",
        model_name=model,
        version=version,
        action=action,  # type: ignore[arg-type]
        target_paths=[f"cpu-small/vision/{model}/{version}/manifest.json"],
        bundle_sha256=SHA,
        bundle_length=10,
    )


def _last_revision(world: World) -> int:
    path = world.settings.state_dir / "agent.json"
    return int(json.loads(path.read_text())["last_revision"]) if path.exists() else 0


@pytest.mark.asyncio
async def test_enroll_apply_report_and_heartbeat(world: World) -> None:
    agent = world.agent()
    task, ready = await started(agent)
    assert ready == [("default.dev-1", "127.0.0.1:50051")]
    gateway = world.running.gateway
    assert len(gateway.enrolls) == 1
    gateway.push(_assignment(1))
    await until(lambda: gateway.installs)
    assert gateway.installs[0].assignment_revision == 1
    assert gateway.installs[0].outcome == fleet_pb2.INSTALL_OUTCOME_SUCCEEDED
    await until(lambda: _last_revision(world) == 1)
    await until(lambda: not list((world.settings.state_dir / "reports").glob("*.json")))
    await until(lambda: gateway.health)
    assert gateway.health[0].models[0].inference_count == 5
    assert gateway.health[0].window.ToTimedelta().total_seconds() > 0
    await stopped(agent, task)
    assert world.server.stopped


@pytest.mark.asyncio
async def test_a_restart_resumes_from_the_last_applied_revision_without_enrolling(world: World) -> None:
    agent = world.agent()
    task, _ = await started(agent)
    world.running.gateway.push(_assignment(4))
    await until(lambda: _last_revision(world) == 4)
    await stopped(agent, task)

    again = world.agent(token=None)
    task, ready = await started(again)
    gateway = world.running.gateway
    await until(lambda: len(gateway.watches) == 2)
    assert len(gateway.enrolls) == 1
    assert ready[0][0] == "default.dev-1"
    assert gateway.watches[1].last_revision == 4
    assert [(m.model_name, m.version) for m in gateway.watches[1].installed] == [("digits", "1.0.0")]
    gateway.push(_assignment(5, "1.1.0"))
    await until(lambda: _last_revision(world) == 5)
    assert [a.revision for a in world.updater.applied] == [4, 5]
    await stopped(again, task)


@pytest.mark.asyncio
async def test_a_newer_revision_cancels_the_install_in_progress(world: World) -> None:
    world.updater.hold.add(1)
    agent = world.agent()
    task, _ = await started(agent)
    gateway = world.running.gateway
    gateway.push(_assignment(1, "1.0.0"))
    await until(lambda: world.updater.applied)
    gateway.push(_assignment(2, "2.0.0"))
    await until(lambda: _last_revision(world) == 2)
    await until(lambda: len(gateway.installs) == 2)
    assert [(r.assignment_revision, r.reason) for r in gateway.installs] == [(1, "Superseded"), (2, "Installed")]
    await stopped(agent, task)


@pytest.mark.asyncio
async def test_a_transport_failure_is_retried_and_the_resume_point_waits_for_it(world: World) -> None:
    world.updater.outcomes[1] = [("failed", "DownloadFailed")]
    agent = world.agent()
    task, _ = await started(agent)
    gateway = world.running.gateway
    gateway.push(_assignment(1))
    gateway.push(_assignment(2, model="other"))
    await until(lambda: sorted(a.revision for a in world.updater.applied) == [1, 1, 2])
    await until(lambda: _last_revision(world) == 2)
    await until(
        lambda: {(r.assignment_revision, r.reason) for r in gateway.installs} >= {(1, "Installed"), (2, "Installed")}
    )
    await stopped(agent, task)


@pytest.mark.asyncio
async def test_reports_wait_out_an_unavailable_gateway(world: World) -> None:
    world.running.gateway.faults.report_install_failures = 2
    world.updater.recovered = [
        InstallResult(
            9,
            "vision",
            "digits",
            "1.1.0",
            "1.1.0",
            "rolled_back",
            "CrashLoop",
            "",
            "self_test",
            {},
            "a",
            datetime.now(UTC),
        )
    ]
    agent = world.agent()
    task, _ = await started(agent)
    await until(lambda: world.running.gateway.installs)
    assert world.running.gateway.installs[0].reason == "CrashLoop"
    await stopped(agent, task)


@pytest.mark.asyncio
async def test_a_malformed_assignment_is_skipped_and_the_next_one_applied(world: World) -> None:
    agent = world.agent()
    task, _ = await started(agent)
    gateway = world.running.gateway
    gateway.push(_assignment(1, action=0))
    gateway.push(
        fleet_pb2.Assignment(
            revision=2, model_namespace="vision", model_name="digits", action=fleet_pb2.ASSIGNMENT_ACTION_INSTALL
        )
    )
    gateway.push(_assignment(3))
    await until(lambda: _last_revision(world) == 3)
    assert [a.revision for a in world.updater.applied] == [3]
    await stopped(agent, task)


@pytest.mark.asyncio
async def test_the_agent_keeps_serving_while_the_gateway_is_down(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    agent = world.agent()
    task, _ = await started(agent)
    await world.running.server.stop(None)
    # UNAVAILABLE, or DEADLINE_EXCEEDED when a report was in flight as the server went (a loaded machine).
    await until(lambda: re.search(r"health report: (UNAVAILABLE|DEADLINE_EXCEEDED).*kept to send again", caplog.text))
    assert not task.done()
    assert not world.server.stopped
    await stopped(agent, task)


@pytest.mark.asyncio
async def test_health_windows_the_gateway_did_not_acknowledge_are_sent_again(world: World) -> None:
    gateway = world.running.gateway
    gateway.health_failures = 4
    agent = world.agent()
    task, _ = await started(agent)
    await until(lambda: len(gateway.health) >= 6)
    await stopped(agent, task)
    # Every window arrived once, in order, each starting where the previous one ended: none lost.
    starts = [r.window_start.ToDatetime(UTC) for r in gateway.health]
    ends = [s + r.window.ToTimedelta() for s, r in zip(starts, gateway.health, strict=True)]
    assert starts[1:] == ends[:-1]
    assert all(r.models[0].inference_count == 5 for r in gateway.health)


def _window(version: str, slot: str, count: int, errors: int, started: datetime | None, name: str = "digits"
            ) -> ModelWindowStats:  # fmt: skip
    return ModelWindowStats("vision", name, version, slot, count, errors, 1.0, 2.0, 3.0, 0, started)  # type: ignore[arg-type]


def test_a_window_with_a_version_switch_is_split_so_each_version_gets_its_own_counts() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    end = start + timedelta(seconds=30)
    switch = start + timedelta(seconds=12)
    stats = DeviceStats(cpu_percent=1.0, memory_used_bytes=1, memory_total_bytes=2, disk_used_bytes=1,
                        disk_total_bytes=2, energy_joules=None)  # fmt: skip
    windows = [
        _window("1.0.0", "a", 100, 7, start + timedelta(seconds=1)),
        _window("2.0.0", "b", 50, 0, switch),
        _window("4.0.0", "a", 9, 1, start, name="other"),
    ]
    first, second = health_reports(start, end, stats_models=windows, stats=stats)
    assert [(m.model_name, m.version, m.error_count) for m in first.models] == [("digits", "1.0.0", 7)]
    assert [(m.model_name, m.version, m.error_count) for m in second.models] == [
        ("digits", "2.0.0", 0),
        ("other", "4.0.0", 1),
    ]
    assert first.window_start.ToDatetime(UTC) == start
    assert first.window_start.ToDatetime(UTC) + first.window.ToTimedelta() == switch
    assert second.window_start.ToDatetime(UTC) == switch
    assert switch + second.window.ToTimedelta() == end
    # No switch: one report for the whole window.
    [only] = health_reports(start, end, stats_models=windows[1:], stats=stats)
    assert only.window.ToTimedelta() == end - start


@pytest.mark.asyncio
async def test_an_expired_certificate_enrolls_again_with_a_token_and_says_what_to_do_without(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = world.running.gateway
    gateway.enroll_validity = gateway.renew_validity = timedelta(seconds=1)
    agent = world.agent()
    task, _ = await started(agent)
    await stopped(agent, task)
    assert agent.identity is not None
    expires = agent.identity.not_after
    await until(lambda: datetime.now(UTC) > expires)
    # No token: the agent still starts (inference must not depend on the gateway) and says why the
    # gateway refuses it and what to do.
    agent = world.agent(token=None)
    task, ready = await started(agent)
    assert ready
    assert len(gateway.enrolls) == 1
    assert "certificate expired at" in caplog.text
    assert "restart the agent with a new bootstrap token" in caplog.text
    await stopped(agent, task)
    # A token: enrolled again.
    gateway.enroll_validity = timedelta(days=1)
    agent = world.agent()
    task, _ = await started(agent)
    assert len(gateway.enrolls) == 2
    assert agent.identity is not None
    assert agent.identity.not_after > datetime.now(UTC) + timedelta(hours=1)
    await stopped(agent, task)


@pytest.mark.asyncio
async def test_starting_without_identity_or_token_is_a_clear_error(world: World) -> None:
    with pytest.raises(AgentConfigError, match="--token"):
        await world.agent(token=None).run()


@pytest.mark.asyncio
async def test_a_refused_token_stops_the_agent(world: World) -> None:
    with pytest.raises(EnrollmentError, match="UNAUTHENTICATED"):
        await world.agent(token="eft1.wrong.wrong").run()


def test_status_of_an_empty_state_folder(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["status", "--state", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"identity": None, "last_revision": 0, "models": [], "pending_reports": []}
    assert "not enrolled" in CliRunner().invoke(app, ["status", "--state", str(tmp_path)]).output


def test_run_without_identity_or_token_exits_with_a_clear_error(world: World) -> None:
    s = world.settings
    args = ["run", "--state", str(s.state_dir), "--gateway", s.gateway, "--enroll-gateway", s.enroll_gateway]
    args += ["--gateway-ca", str(s.gateway_ca), "--tuf-root", str(s.tuf_root), "--name", "dev-1", "--label", "a=b"]
    result = CliRunner().invoke(app, args, env={"EDGEFLEET_AGENT_TOKEN": ""})
    assert result.exit_code == 1
    assert "--token" in result.output
    assert CliRunner().invoke(app, [*args, "--label", "nonsense"]).exit_code == 2


@pytest.mark.asyncio
async def test_an_install_that_raises_is_reported_and_the_agent_keeps_running(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.updater.raise_on.add(1)
    agent = world.agent()
    task, _ = await started(agent)
    gateway = world.running.gateway
    gateway.push(_assignment(1))
    gateway.push(_assignment(2, model="other"))
    await until(lambda: len(gateway.installs) == 2)
    failed = gateway.installs[0]
    assert (failed.assignment_revision, failed.outcome, failed.reason) == (
        1,
        fleet_pb2.INSTALL_OUTCOME_FAILED,
        "InternalError",
    )
    assert failed.failed_phase != fleet_pb2.INSTALL_PHASE_UNSPECIFIED
    assert "KeyError" in failed.message
    assert "Traceback" in caplog.text
    assert not task.done()
    await stopped(agent, task)


def _scrape(address: str) -> dict[str, float]:
    """``/metrics`` over HTTP, as Prometheus reads it: sample line (name and labels) → value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in lines if not line.startswith("#")}


@pytest.mark.asyncio
async def test_metrics_are_served_while_running_and_count_gateway_failures_and_internal_errors(world: World) -> None:
    world.running.gateway.faults.report_install_failures = 2
    world.updater.raise_on.add(1)
    agent = world.agent(metrics_listen="127.0.0.1:0")
    task, _ = await started(agent)
    address = agent.metrics_address
    assert address is not None
    assert address.startswith("127.0.0.1:")
    gateway = world.running.gateway
    gateway.push(_assignment(1))
    await until(lambda: gateway.installs)
    scraped = await asyncio.to_thread(_scrape, address)
    assert scraped['edgefleet_agent_gateway_failures_total{call="install_report"}'] == 2
    # The Updater raised: the daemon's own report of it is counted (a fake Updater records nothing itself).
    internal = 'edgefleet_agent_updates_total{outcome="failed",reason="InternalError",stage="download"}'
    assert scraped[internal] == 1
    await stopped(agent, task)
    assert agent.metrics_address is None
    with pytest.raises(urllib.error.URLError, match="refused"):  # the port is closed with the agent
        await asyncio.to_thread(_scrape, address)


@pytest.mark.asyncio
async def test_a_metrics_address_that_cannot_be_bound_stops_the_agent_naming_it(world: World) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = world.agent(metrics_listen=f"127.0.0.1:{port}")
        with pytest.raises(AgentConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await asyncio.wait_for(agent.run(), 20)
    assert not world.running.gateway.enrolls


@pytest.mark.asyncio
async def test_a_remove_for_a_held_model_is_applied_whatever_its_revision(world: World) -> None:
    world.updater.active[("vision", "digits")] = "1.0.0"
    world.updater.active[("vision", "other")] = "1.0.0"
    agent = world.agent()
    task, _ = await started(agent)
    gateway = world.running.gateway
    gateway.push(_assignment(5, model="other"))
    await until(lambda: _last_revision(world) == 5)
    # A removal synthesized by the gateway with an older revision: still applied, the model is held.
    gateway.push(_assignment(3, action=fleet_pb2.ASSIGNMENT_ACTION_REMOVE))
    await until(lambda: ("vision", "digits") not in world.updater.active)
    # Not held any more: the same removal again is a duplicate.
    gateway.push(_assignment(3, action=fleet_pb2.ASSIGNMENT_ACTION_REMOVE))
    gateway.push(_assignment(6, model="other", version="2.0.0"))
    await until(lambda: _last_revision(world) == 6)
    assert [(a.revision, a.action) for a in world.updater.applied] == [(5, "install"), (3, "remove"), (6, "install")]
    await stopped(agent, task)


def test_progress_takes_an_old_remove_only_for_a_held_model(tmp_path: Path) -> None:
    progress = Progress(tmp_path)
    spec = AssignmentSpec(7, "vision", "digits", "1.0.0", "install", ("p",), SHA, 1)
    assert progress.accept(spec)
    progress.finish(spec)
    remove = AssignmentSpec(3, "vision", "digits", "", "remove", (), "", 0)
    assert not progress.accept(remove)
    assert progress.accept(remove, held=True)


@pytest.mark.asyncio
async def test_the_certificate_is_renewed_and_the_loops_reconnect_with_it(world: World) -> None:
    gateway = world.running.gateway
    gateway.enroll_validity = timedelta(seconds=5)  # with the minute of back-dating: past 2/3 at once
    gateway.faults.renew_failures = 1
    agent = world.agent()
    identity_dir = world.settings.state_dir / "identity"
    task, _ = await started(agent)
    await until(lambda: agent.renewals == 1)
    assert len(gateway.renewals) == 1
    # The certificates as issued, not as read from disk: on a busy machine the renewal may already
    # have replaced the enrolled certificate by the time the agent reports itself started.
    enrolled_cert, renewed_cert = gateway.issued
    assert (identity_dir / "cert.pem").read_bytes() == renewed_cert
    assert renewed_cert != enrolled_cert
    key = serialization.load_pem_private_key((identity_dir / "key.pem").read_bytes(), password=None)
    leaf = x509.load_pem_x509_certificate(renewed_cert)
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    assert (identity_dir / "key.pem").stat().st_mode & 0o777 == 0o600
    assert not (identity_dir / "renewal.json").exists()
    stored = json.loads((identity_dir / "identity.json").read_text())
    assert datetime.fromisoformat(stored["not_after"]) == leaf.not_valid_after_utc
    # The watch comes back on the new channel, and the other loops keep working.
    watches = len(gateway.watches)
    await until(lambda: len(gateway.watches) > watches or watches >= 2)
    health = len(gateway.health)
    await until(lambda: len(gateway.health) > health)
    gateway.push(_assignment(1))
    await until(lambda: gateway.installs)
    await stopped(agent, task)
