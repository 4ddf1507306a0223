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
- **gateway serving downloads**: see :func:`test_store_outage_while_agents_download_through_the_gateway`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from minio import Minio

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
from tests.support.fleet import Process
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
