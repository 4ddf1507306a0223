"""The wire end to end: one gateway and three agent processes of two classes, on loopback with mTLS.

They enroll with bootstrap tokens, receive an assignment pushed by the gateway, install it (TUF
verification, A/B slot, self-test), serve it on their local inference API, report health, and roll a
version that fails its self-test back automatically, reporting why.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from edgefleet_core.optimize.model_io import serialize
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.records import InstallRecord
from edgefleet_operator.fleet.state import FleetState
from edgefleet_proto.v1 import inference_pb2, inference_pb2_grpc
from tests.support.fleet import FleetSite, Process, fleet_site, gateway_address, inference_address, wait_for
from tests.support.tiny_models import tiny_cnn

pytestmark = pytest.mark.integration
NAMESPACE = "demo"
MODEL = "digits"
CLASSES = {"edge-a": "cpu-small", "edge-b": "cpu-small", "edge-c": "cpu-large"}
METRICS_AGENT = "edge-a"
"""The agent started with ``--metrics-listen``."""


def _model(folder: Path, seed: int) -> Path:
    path = folder / f"seed{seed}" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serialize(tiny_cnn(seed=seed)))
    return path


def _installs(state: FleetState) -> dict[tuple[str, int], InstallRecord]:
    return {(device, record.revision): record for _, device, record in state.installs(NAMESPACE)}


def _predict(address: str, image: np.ndarray) -> tuple[str, np.ndarray]:
    with grpc.insecure_channel(address) as channel:
        response = inference_pb2_grpc.InferenceStub(channel).Predict(
            inference_pb2.PredictRequest(
                model_name=MODEL,
                inputs=[
                    inference_pb2.Tensor(
                        name="input", dtype=inference_pb2.DATA_TYPE_FLOAT, shape=list(image.shape),
                        data=image.astype("<f4").tobytes(),
                    )
                ],
            ),
            timeout=10,
        )  # fmt: skip
    (output,) = response.outputs
    return response.model_version, np.frombuffer(output.data, "<f4").reshape(tuple(output.shape))


def _scrape(agent: Process) -> dict[str, float]:
    """The agent's ``/metrics`` (it printed where), as sample line (name and labels) → value."""
    found = re.search(r"metrics on (http://\S+/metrics)", agent.output())
    assert found is not None, agent.output()[-2000:]
    with urllib.request.urlopen(found[1], timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in lines if not line.startswith("#")}


def _expected(model: Path, image: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": image})[0])


def _wait_installed(state: FleetState, devices: list[str], version: str, outcome: str) -> dict[str, InstallRecord]:
    """Each device's report on its current assignment (classes get revisions of their own)."""

    def reported() -> dict[str, InstallRecord] | None:
        found = _installs(state)
        records = {}
        for device in devices:
            assignment = state.assignments_for(NAMESPACE, device).assignments[f"{NAMESPACE}/{MODEL}"]
            assert assignment.version == version
            if (device, assignment.revision) in found:
                records[device] = found[(device, assignment.revision)]
        return records if len(records) == len(devices) else None

    records = wait_for(f"install reports of {version} from {devices}", reported, timeout=90)
    assert {d: r.outcome for d, r in records.items()} == dict.fromkeys(devices, outcome), records
    return records


def test_gateway_and_three_agents_install_report_and_roll_back(tmp_path: Path) -> None:
    v1, v2, bad = _model(tmp_path, 1), _model(tmp_path, 2), _model(tmp_path, 3)
    image = np.random.default_rng(7).uniform(0, 1, (1, 1, 8, 8)).astype(np.float32)
    with fleet_site(tmp_path / "site") as site:
        _publish(site, v1, v2, bad)
        state = FleetState(LocalStore(site.folder / "store"))
        gateway = site.start_gateway()
        fleet, enroll = gateway_address(gateway)
        agents = {
            name: site.start_agent(
                name, gateway=fleet, enroll_gateway=enroll, token=site.token(device_class),
                extra=("--metrics-listen", "127.0.0.1:0") if name == METRICS_AGENT else (),
            )
            for name, device_class in CLASSES.items()
        }  # fmt: skip

        # Enrolled: each device is in the fleet state with the class its token named.
        devices = {d.name: d for d in state.list_devices(NAMESPACE)}
        assert {n: d.device_class for n, d in devices.items()} == CLASSES
        assert all(not d.revoked and d.cert_serial for d in devices.values())

        # 1.0.0 everywhere: pushed, installed, served.
        site.assign(model=MODEL, version="1.0.0", devices=tuple(CLASSES))
        _wait_installed(state, list(CLASSES), "1.0.0", "succeeded")
        for name, process in agents.items():
            version, output = _predict(inference_address(process), image)
            assert version == "1.0.0", name
            np.testing.assert_allclose(output, _expected(v1, image), rtol=1e-5, atol=1e-6)

        # Health flows back and is aggregated per model, version and class.
        def aggregated() -> bool:
            found = {(a.device_class, a.version): a for a in state.aggregate(NAMESPACE, MODEL)}
            small, large = found.get(("cpu-small", "1.0.0")), found.get(("cpu-large", "1.0.0"))
            return bool(small and large and small.devices_reporting == 2 and large.devices_reporting == 1
                        and small.inference_count >= 2 and small.installs_succeeded == 2)  # fmt: skip

        wait_for("health aggregated for both classes", aggregated, timeout=30)

        # A version that fails its self-test on the devices of one class: rolled back, reported.
        small = [n for n, c in CLASSES.items() if c == "cpu-small"]
        site.assign(model=MODEL, version="3.0.0", device_class="cpu-small")
        records = _wait_installed(state, small, "3.0.0", "rolled_back")
        assert {r.reason for r in records.values()} == {"SelfTestLatency"}
        assert all(r.from_version == "1.0.0" and r.to_version == "3.0.0" for r in records.values())
        for name in small:
            assert _predict(inference_address(agents[name]), image)[0] == "1.0.0"

        # The agent's metrics, scraped as Prometheus does: what it serves, the rollback and why, its requests.
        scraped = _scrape(agents[METRICS_AGENT])
        served = {k for k, v in scraped.items() if k.startswith("edgefleet_agent_model_info{") and v == 1}
        assert served == {'edgefleet_agent_model_info{model="digits",slot="a",version="1.0.0"}'}, served
        rolled_back = 'edgefleet_agent_updates_total{outcome="rolled_back",reason="SelfTestLatency",stage="self_test"}'
        assert scraped[rolled_back] == 1
        assert scraped['edgefleet_agent_updates_total{outcome="succeeded",reason="Installed",stage=""}'] == 1
        assert scraped['edgefleet_agent_inference_requests_total{model="digits"}'] >= 2
        assert scraped['edgefleet_agent_download_bytes_total{encoding="full"}'] > 0

        # And the fleet moves on: 2.0.0 everywhere (a delta against 1.0.0 where one was published).
        site.assign(model=MODEL, version="2.0.0", devices=tuple(CLASSES))
        _wait_installed(state, list(CLASSES), "2.0.0", "succeeded")
        for process in agents.values():
            version, output = _predict(inference_address(process), image)
            assert version == "2.0.0"
            np.testing.assert_allclose(output, _expected(v2, image), rtol=1e-5, atol=1e-6)

        # Health keeps flowing after the swaps (one entry per model, named by its active version).
        def swapped() -> bool:
            found = {(a.device_class, a.version): a for a in state.aggregate(NAMESPACE, MODEL)}
            small = found.get(("cpu-small", "2.0.0"))
            return bool(small and small.devices_reporting == 2)

        wait_for("health of 2.0.0 from both cpu-small devices", swapped, timeout=30)
        assert not any("INVALID_ARGUMENT" in p.output() for p in agents.values())

        # Everything stops cleanly.
        for process in [*agents.values(), gateway]:
            assert process.terminate() == 0, process.output()[-2000:]


def _publish(site: FleetSite, v1: Path, v2: Path, bad: Path) -> None:
    for device_class in sorted(set(CLASSES.values())):
        site.publish(v1, name=MODEL, version="1.0.0", device_class=device_class)
        site.publish(v2, name=MODEL, version="2.0.0", device_class=device_class)
    # Passes on the publisher's machine, but no device meets a 1 µs p95 latency objective.
    site.publish(bad, name=MODEL, version="3.0.0", device_class="cpu-small", extra=("--latency-slo-ms", "0.001"))
