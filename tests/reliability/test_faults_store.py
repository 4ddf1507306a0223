"""The artifact store (a real S3 API server) unavailable for a while: nothing lost, and how long until work resumes.

How the outage is made: a :class:`~tests.support.netproxy.TcpProxy` in front of ``moto_server``,
which drops new connections and resets open ones (``drop()`` + ``cut()``) until ``resume()``. To a
client that is a stopped server on the same port (every request fails fast), but the data survives:
``moto_server`` keeps everything in memory, so stopping and restarting it would lose the store itself
and test nothing of ours, and SIGSTOP would be a hang (only read timeouts, 60 s, would end it), not
an outage. The test reaches the store directly, the processes under test only through the proxy.

An outage lasts until the process under test has logged that it hit it (polled, not a fixed time):
every trial is an outage that was felt. Recovery time runs from ``resume()`` to the work being done.

- **operator publishing**: the outage starts while the operator is about to sign and publish
  (failpoint ``operator.publish.signing=1*sleep(...)`` holds it there); after the store is back
  the model converges: one verified version per class, no unlisted store file, each device assigned
  once, a status that agrees. Lost: anything of that missing or doubled.
- **gateway serving downloads**: the gateway streams targets from S3 to a real agent over a slow
  link; the store goes away mid-download (see
  :func:`test_store_outage_while_agents_download_through_the_gateway`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from minio import Minio

from edgefleet_core.store.url import open_store
from edgefleet_operator.fleet.records import Outcome
from edgefleet_operator.fleet.state import FleetState
from tests.reliability.cp_support import (
    CLASSES,
    MODEL,
    ControlSite,
    JsonObject,
    SimulatedDevices,
    device_class,
    edge_model,
    operator_args,
    published_once_problems,
    rolled_out,
    start_operator,
    stopped_at_exit,
    write_source,
)
from tests.support.agent_faults import (
    CLASS,
    InferenceLoad,
    partial_downloads,
    publish_versions,
    serving,
)
from tests.support.agent_faults import MODEL as AGENT_MODEL
from tests.support.agent_faults import record as install_record
from tests.support.agent_faults import records as install_records
from tests.support.fleet import FleetSite, Process, fleet_site, gateway_address
from tests.support.fleet import wait_for as poll
from tests.support.kube_api import KubeApiServer, kube_api_server
from tests.support.netproxy import TcpProxy, tcp_proxy
from tests.support.reliability import scenario, trials
from tests.support.s3_server import S3Server, running_moto_server

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

__all__ = ["kube_api_server"]  # the fixture, used by name below

HOLD_MS = 1500
"""How long the failpoint holds the operator just before it publishes: the outage starts in that window."""


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A ``moto_server`` of this test's own, its credentials in the environment the processes inherit."""
    with running_moto_server() as server:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
        monkeypatch.setenv("AWS_REGION", server.region)
        yield server


def _bucket(s3: S3Server, name: str) -> str:
    Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=False).make_bucket(name)
    return f"s3://{name}"


def _outage(proxy: TcpProxy) -> None:
    """The store goes away: new connections are refused, open ones reset."""
    proxy.drop()
    proxy.cut()


def _outage_while_publishing(operator: Process, proxy: TcpProxy) -> float:
    """Cut the store while the failpoint holds the operator before its publish, until it hits the outage;
    when the store came back (monotonic)."""
    poll("the operator about to publish", lambda: "failpoint operator.publish.signing" in operator.output())
    _outage(proxy)
    seen = len(operator.output())
    poll(
        "the operator to hit the outage",
        lambda: "will retry" in operator.output()[seen:] or not operator.alive(),
        timeout=60,
    )
    back = time.monotonic()
    proxy.resume()
    assert operator.alive(), operator.output()[-3000:]
    return back


def _converged(server: KubeApiServer, namespace: str) -> Callable[[], JsonObject | None]:
    def check() -> JsonObject | None:
        found = server.get("edgemodels", MODEL, namespace)
        return found if rolled_out(found) else None

    return check


def test_store_outage_while_the_operator_publishes(
    kube_api_server: KubeApiServer, s3: S3Server, tmp_path: Path
) -> None:
    server = kube_api_server
    for cls in CLASSES:
        server.create(device_class(cls))
    source = write_source(tmp_path / "sources")
    record = scenario(
        "store outage while the operator publishes",
        guards="published versions (one per class), signed targets, store files, wave assignments",
    )
    with (
        tcp_proxy(int(s3.endpoint.rpartition(":")[2])) as proxy,
        stopped_at_exit([]) as processes,
    ):
        for trial in range(trials(1, 3)):
            namespace = f"outage-{trial}"
            site = ControlSite.create(tmp_path / namespace, _bucket(s3, namespace), s3.url)
            server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
            with record.trial() as outcome, SimulatedDevices(site.fleet()) as devices:
                devices.enroll(namespace)
                args = operator_args(site, server.url, [namespace], endpoint=f"http://127.0.0.1:{proxy.port}")
                operator = start_operator(
                    namespace, tmp_path / "logs", args, failpoints=f"operator.publish.signing=1*sleep({HOLD_MS})"
                )
                processes.append(operator)
                server.create(edge_model(namespace, *source))
                back = _outage_while_publishing(operator, proxy)
                found = poll(
                    f"{namespace} to converge once the store is back", _converged(server, namespace), timeout=90
                )
                outcome.recovered(time.monotonic() - back)
                problems = published_once_problems(site, namespace, found)
                outcome.lose(len(problems), "; ".join(problems))
                assert problems == []
                assert operator.terminate() == 0, operator.output()[-3000:]


class _S3Site(FleetSite):
    """A :class:`FleetSite` whose TUF repository and fleet state live in a bucket of the S3 test server."""

    bucket_url: str = ""

    @property
    def store_url(self) -> str:
        return self.bucket_url


DEVICE = "edge-1"
STORE_RATE = 1e6
"""Bytes/s between gateway and store once the versions are published: a version (a few MB, full or
delta) takes seconds to stream, so the outage lands while the gateway is still reading it (a limit
on the agent's link would not do: the proxy would buffer what the gateway already read)."""


def _update_through_outage(
    site: FleetSite, state: FleetState, agent: Process, store_link: TcpProxy, current: str, target: str
) -> tuple[float, list[Outcome], list[str]]:
    """Assign ``target``, cut the store once the download is under way, bring it back; (recovery s,
    outcomes of the revision, partial downloads left)."""
    before = store_link.stats.downstream_bytes
    revision = site.assign(model=AGENT_MODEL, version=target, devices=(DEVICE,))
    # The gateway reads the new version from the store (polled by the bytes crossing the store's link).
    poll("the gateway reading the new version", lambda: store_link.stats.downstream_bytes - before > 512 * 1024)
    seen = len(agent.output())
    _outage(store_link)
    # The download itself is cut off (the fetcher's own line), not only a health report.
    poll("the download to hit the outage", lambda: "stream interrupted" in agent.output()[seen:], timeout=60)
    assert serving(agent, current), "the old version must serve during the outage"
    back = time.monotonic()
    store_link.resume()
    poll(f"{target} served", lambda: serving(agent, target) or None, timeout=120)
    recovery = time.monotonic() - back
    poll("the install report", lambda: install_record(state, DEVICE, revision, "succeeded"))
    outcomes = [r.outcome for r in install_records(state, DEVICE, revision)]
    return recovery, outcomes, partial_downloads(site.agent_state(DEVICE))


def test_store_outage_while_agents_download_through_the_gateway(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway streams targets from S3; the store goes away mid-download and comes back.

    The agent sees UNAVAILABLE (the gateway's store retries give up), keeps serving the old version,
    retries with its backoff and resumes from its partial file. Lost: a partial or wrong version
    served, a failed request, a revision without a final ``succeeded``, a partial file left behind.
    Recovery: store back → the new version served.
    """
    record = scenario(
        "store outage while agents download through the gateway",
        guards="served version, inference requests, install reports, partial downloads",
    )
    bucket = _bucket(s3, "downloads")
    with tcp_proxy(int(s3.endpoint.rpartition(":")[2])) as store_link, fleet_site(tmp_path / "site") as plain:
        # Every process, and the in-process CLI, reaches the store through the proxy; the checks go direct.
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{store_link.port}")
        site = _S3Site(plain.folder)
        site.bucket_url = bucket
        site.processes = plain.processes
        publish_versions(site, tmp_path / "models", width=1024)
        state = FleetState(open_store(bucket, endpoint=s3.url))
        store_link.rate_bytes_per_s = STORE_RATE  # new connections only: the gateway's are all new
        fleet, enroll = gateway_address(site.start_gateway())
        agent = site.start_agent(DEVICE, gateway=fleet, enroll_gateway=enroll, token=site.token(CLASS))
        current = "1.0.0"
        first = site.assign(model=AGENT_MODEL, version=current, devices=(DEVICE,))
        poll("the first install", lambda: install_record(state, DEVICE, first, "succeeded"), timeout=90)
        for _ in range(trials(1, 3)):
            target = "2.0.0" if current == "1.0.0" else "1.0.0"
            with InferenceLoad(agent) as load, record.trial() as outcome:
                recovery, outcomes, leftovers = _update_through_outage(site, state, agent, store_link, current, target)
                outcome.recovered(recovery)
                outcome.lose(len(leftovers), f"partial downloads left: {leftovers}" if leftovers else "")
                assert outcomes[-1] == "succeeded", outcomes
                assert not leftovers
                current = target
            assert not load.failed, f"{len(load.failed)} requests failed during the outage: {load.failed[:3]}"
