"""The fleet gateway SIGKILLed under load and restarted on the same ports: agents come back, nothing is lost.

Real processes: ``edgefleet gateway serve`` (file store, mTLS) and several ``edgefleet agent run``
that installed a published model and serve inference requests in a loop (counted by the test) while
they report health every 0.2 s. The gateway is killed mid-load and restarted on the same ports; the
agents reconnect by themselves (their own backoff).

The gateway runs with a health journal (``--health-journal`` under a fixed ``--replica-id``) and a
status interval of 2 s, so every kill lands with acknowledged reports not yet in the store: without
the journal they were lost (about one window per device in every trial), with it the restarted
gateway replays them.

Lost (must be 0): inferences the agents served that
the store's health totals never count once the load has stopped and the gateway flushed (a device's
totals, summed over every gateway replica's shard, must equal what the test counted), and install
reports that were recorded before the kill.
Recovery: from the restarted gateway's ``Popen`` to every agent's health record being written again.
"""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import datetime
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgefleet_core.bundle.publisher import Publisher
from edgefleet_core.optimize.model_io import serialize
from edgefleet_core.signing import KeySet
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet import FleetState
from edgefleet_proto.v1 import inference_pb2, inference_pb2_grpc
from tests.support.fleet import FleetSite, Process, fleet_site, gateway_address, inference_address
from tests.support.fleet import wait_for as poll
from tests.support.reliability import scenario, trials
from tests.support.tiny_models import wide_mlp

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

NAMESPACE = "demo"
MODEL = "wide"
CLASS = "cpu-small"
AGENTS = 3


class InferenceLoad:
    """Requests to one agent's inference API in a loop on a thread; what succeeded is counted."""

    def __init__(self, agent: Process) -> None:
        self.address = inference_address(agent)
        self.served = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"load-{agent.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        x = np.zeros((1, 64), dtype="<f4")
        tensor = inference_pb2.Tensor(name="x", dtype=inference_pb2.DATA_TYPE_FLOAT, shape=[1, 64], data=x.tobytes())
        with grpc.insecure_channel(self.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            while not self._stop.is_set():
                try:
                    stub.Predict(inference_pb2.PredictRequest(model_name=MODEL, inputs=[tensor]), timeout=5)
                except grpc.RpcError:
                    self.failed += 1
                else:
                    self.served += 1
                self._stop.wait(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def _totals(fleet: FleetState) -> dict[str, int]:
    """Device name → inferences of the model counted in the store (every replica's shard added up)."""
    counted: dict[str, int] = {}
    for health in fleet.read_health_report(CLASS)[0]:
        for entry in health.totals.values():
            if entry.model_name == MODEL:
                counted[health.name] = counted.get(health.name, 0) + entry.inference_count
    return counted


def _updated(fleet: FleetState) -> dict[str, datetime]:
    return {health.name: health.updated_at for health in fleet.read_health_report(CLASS)[0]}


def _installs(fleet: FleetState) -> set[tuple[str, int, str]]:
    return {(name, r.revision, r.outcome) for _, name, r in fleet.installs(NAMESPACE)}


def _serving(fleet: FleetState, agents: dict[str, Process]) -> bool:
    succeeded = {name for name, _, outcome in _installs(fleet) if outcome == "succeeded"}
    return succeeded >= set(agents)


def _site_with_model(site: FleetSite, folder: Path) -> None:
    store = site.folder / "store"
    site.trusted_root.write_bytes(Publisher(LocalStore(store), KeySet.load(site.keys)).ensure_initialized())
    path = folder / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialize(wide_mlp(seed=1, width=64)))
    site.publish(path, name=MODEL, version="1.0.0", device_class=CLASS, namespace=NAMESPACE)


def test_gateway_killed_under_load_restarts_and_loses_nothing(tmp_path: Path) -> None:
    record = scenario(
        "gateway SIGKILL under load",
        guards="inferences served by agents vs health totals in the store; install reports",
    )
    with fleet_site(tmp_path / "site") as site:
        _site_with_model(site, tmp_path / "model")
        fleet = FleetState(LocalStore(site.folder / "store"))
        journaled = ("--status-interval", "2", "--replica-id", "gw-0", "--health-journal", str(tmp_path / "journal"))
        gateway = site.start_gateway(extra=journaled)
        fleet_address, enroll_address = gateway_address(gateway)
        agents = {
            f"edge-{i}": site.start_agent(f"edge-{i}", gateway=fleet_address, enroll_gateway=enroll_address,
                                          token=site.token(CLASS, namespace=NAMESPACE),
                                          extra=("--heartbeat-interval", "0.2"))
            for i in range(AGENTS)
        }  # fmt: skip
        site.assign(model=MODEL, version="1.0.0", namespace=NAMESPACE, device_class=CLASS)
        poll("every agent to install the model", lambda: _serving(fleet, agents), timeout=60)
        served = dict.fromkeys(agents, 0)
        for _ in range(trials(1, 5)):
            with record.trial() as outcome:
                loads = {name: InferenceLoad(agent) for name, agent in agents.items()}
                try:
                    installs_before = _installs(fleet)
                    # Under load and reporting through this gateway: some health of this trial is in the store.
                    poll("health totals from every agent", lambda: _totals(fleet).keys() >= agents.keys() or None)
                    gateway.kill()
                    restarted = time.monotonic()
                    before = _updated(fleet)
                    gateway = site.start_gateway(
                        port=int(fleet_address.rsplit(":", 1)[1]),
                        enroll_port=int(enroll_address.rsplit(":", 1)[1]),
                        extra=journaled,
                    )
                    assert gateway_address(gateway) == (fleet_address, enroll_address)

                    def reporting_again(before: dict[str, datetime] = before) -> bool:
                        now = _updated(fleet)
                        return all(name in now and now[name] > before.get(name, now[name].min) for name in agents)

                    poll("every agent reporting to the restarted gateway", reporting_again, timeout=60)
                    outcome.recovered(time.monotonic() - restarted)
                finally:
                    for load in loads.values():
                        load.stop()
                assert all(load.failed == 0 for load in loads.values()), {n: x.failed for n, x in loads.items()}
                for name, load in loads.items():
                    served[name] += load.served
                missing = installs_before - _installs(fleet)
                # Every inference served is counted once the agents' last reports are flushed (polled: they
                # report every 0.2 s and the gateway flushes every 2 s).
                with contextlib.suppress(AssertionError):
                    poll("the health totals to count every inference served", lambda: _totals(fleet) == served,
                         timeout=15)  # fmt: skip
                counted = _totals(fleet)
                short = {n: served[n] - counted.get(n, 0) for n in agents if counted.get(n, 0) != served[n]}
                outcome.lose(len(missing), f"install reports gone: {sorted(missing)}" if missing else "")
                outcome.lose(
                    sum(max(0, d) for d in short.values()), f"inferences not counted: {short}" if short else ""
                )
                assert not missing
                assert not short, f"served minus counted per device (negative: counted twice): {short}"
