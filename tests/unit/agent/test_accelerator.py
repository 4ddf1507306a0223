"""FailoverStage at its seam (the remote stage it attaches), and the accel-server address check."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from edgefleet_agent.accelerator import AcceleratorServer, FailoverStage, parse_target, stage_id_for
from edgefleet_agent.errors import InferenceFailed, InvalidTensors
from edgefleet_agent.pipeline import LocalStage

CPU = ["CPUExecutionProvider"]


def relu() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


class FakeRemote:
    """Stands in for RemoteStage: answers with ``answer`` or raises ``error``."""

    execution_provider = "FakeAcceleratorExecutionProvider"
    broken = None

    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.closed: list[bool] = []

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.error is not None:
            raise self.error
        return {"y": np.full(2, 7.0, np.float32)}

    def close(self, *, unload: bool = True) -> None:
        self.closed.append(unload)


def stage(monkeypatch: pytest.MonkeyPatch, remote: FakeRemote, tmp_path: Path) -> tuple[FailoverStage, list[str]]:
    monkeypatch.setattr(FailoverStage, "_connect", lambda self: remote)
    detached: list[str] = []
    server = AcceleratorServer("127.0.0.1:1", tmp_path, retry_seconds=3600)
    failover = FailoverStage(server, relu(), LocalStage(relu(), CPU), CPU, label="t", on_detach=detached.append)
    return failover, detached


def test_a_request_the_server_fails_but_the_local_session_runs_detaches_the_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    remote = FakeRemote(InferenceFailed("remote stage failed (13): CUDA out of memory"))
    failover, detached = stage(monkeypatch, remote, tmp_path)
    assert failover.execution_provider == "FakeAcceleratorExecutionProvider"
    attached_before = failover.attached
    outputs = failover.run({"x": np.array([-1.0, 2.0], np.float32)})
    np.testing.assert_array_equal(outputs["y"], [0.0, 2.0])  # the local session's answer
    assert (attached_before, failover.attached) == (True, False)
    assert failover.execution_provider == "CPUExecutionProvider"
    assert detached == ["CPUExecutionProvider"]
    assert "CUDA out of memory" in (failover.last_problem or "")
    failover.close()


def test_a_request_that_fails_locally_too_is_the_requests_fault(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    remote = FakeRemote(InferenceFailed("remote stage failed (13): bad shape"))
    failover, detached = stage(monkeypatch, remote, tmp_path)
    with pytest.raises(InvalidTensors, match="no value for inputs"):
        failover.run({"z": np.zeros(2, np.float32)})
    assert failover.attached  # the server did nothing wrong
    assert detached == []
    failover.close()
    assert remote.closed == [True]  # closing unloads the stage from the server


def test_an_invalid_request_is_not_retried_locally(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    remote = FakeRemote(InvalidTensors("input 'x' has shape [3]"))
    failover, detached = stage(monkeypatch, remote, tmp_path)
    with pytest.raises(InvalidTensors, match="shape"):
        failover.run({"x": np.zeros(2, np.float32)})
    assert failover.attached
    assert detached == []
    failover.close()


def test_answers_come_from_the_server_while_it_answers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    failover, _ = stage(monkeypatch, FakeRemote(None), tmp_path)
    np.testing.assert_array_equal(failover.run({"x": np.zeros(2, np.float32)})["y"], [7.0, 7.0])
    failover.close()


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:50051",
        "accel.local:9",
        "[::1]:50051",
        "unix:/run/edgefleet/accel.sock",
        " host:1 ",
        "ipv6:[::1]:1",
        "dns:///accel.local:50051",
        "unix-abstract:edgefleet-accel",
    ],
)
def test_good_targets(target: str) -> None:
    assert parse_target(target) == target.strip()


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("localhost", "not HOST:PORT"),
        (":50051", "not HOST:PORT"),
        ("a b:1", "not HOST:PORT"),
        ("host:0", "from 1 to 65535"),
        ("host:65536", "from 1 to 65535"),
        ("host:-1", "from 1 to 65535"),
        ("[::1:50051", "IPv6"),
        ("unix:", "names nothing"),
        ("unix:///", "names nothing"),
        ("::1:50051", "IPv6"),
        ("http://host:1", "not a URL"),
        ("host:\u0665\u0660", "from 1 to 65535"),
    ],
)
def test_bad_targets_are_named(target: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_target(target)


def test_stage_ids_are_per_device_and_version_and_the_same_on_every_start() -> None:
    tail = relu()
    one = stage_id_for("device-1", "vision", "cnn", "1.0.0", tail)
    assert one == stage_id_for("device-1", "vision", "cnn", "1.0.0", tail)
    others = {
        stage_id_for("device-2", "vision", "cnn", "1.0.0", tail),
        stage_id_for("device-1", "vision", "cnn", "1.0.1", tail),  # the same tail in another version
        stage_id_for("device-1", "other", "cnn", "1.0.0", tail),
        stage_id_for("device-1", "vision", "cnn", "1.0.0", tail + b"\0"),
    }
    assert one not in others
    assert len(others) == 4


def test_re_attaches_back_off_after_failures_and_reset_once_the_server_answers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    remote = FakeRemote(None)
    failover, _ = stage(monkeypatch, remote, tmp_path)
    server = failover.server
    spacings = []
    for _ in range(6):
        before = time.monotonic()
        failover._failed()
        spacings.append(round((failover._next_attempt - before) / server.retry_seconds))
    assert spacings == [1, 2, 4, 8, 8, 8]
    failover.run({"x": np.zeros(2, np.float32)})  # answered by the server
    failover._failed()
    assert round((failover._next_attempt - time.monotonic()) / server.retry_seconds) == 1
    failover.close()
