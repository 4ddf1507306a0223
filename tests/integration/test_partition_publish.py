"""A partitioned model end to end: `partition plan --out` → `publish` with the plan → `fetch` → an agent serves it.

Real CLI, real TUF repository in a file store, real ONNX Runtime; the agent's Updater installs the
bundle and its runtime serves head then tail through the pipeline, equal to the whole model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgefleet_agent.assignments import AssignmentSpec
from edgefleet_agent.runtime import ModelRuntime
from edgefleet_agent.updater import Updater
from edgefleet_core.bundle.manifest import parse_manifest
from edgefleet_core.cli.main import build_app
from edgefleet_core.cli.optimize_cmd import load_device_class
from edgefleet_core.optimize.model_io import serialize
from edgefleet_core.optimize.runtime import run, session
from edgefleet_core.partition.cuts import VERIFY_OPTIMIZATION, verify_split
from edgefleet_core.partition.plan import PartitionPlan, plan_partition, split_for
from edgefleet_core.partition.profile import example_inputs
from edgefleet_core.signing import StoreFetcher, TufClient
from edgefleet_core.store.local import LocalStore
from tests.support.tiny_models import wide_mlp

pytestmark = pytest.mark.integration
JETSON = Path(__file__).resolve().parents[2] / "examples" / "valid" / "deviceclass-jetson-gpu.yaml"
DEVICE_CLASS = "jetson-orin-nano"
runner = CliRunner()


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(build_app(), list(args), env={"COLUMNS": "250"})
    return result.exit_code, result.stdout + result.stderr


def publish(store: Path, keys: Path, version: str, *args: str) -> tuple[int, str]:
    return cli("publish", *args, "--store", f"file://{store}", "--keys", str(keys), "--model", "mlp",
               "--version", version, "--device-class", DEVICE_CLASS, "--namespace", "demo")  # fmt: skip


def install(store: Path, keys: Path, state: Path) -> Updater:
    """A device's Updater, on a fresh state folder, installs mlp 1.0.0 from ``store``; it then serves it."""
    client = TufClient(StoreFetcher(LocalStore(store)), (keys / "root.json").read_bytes(), state / "tuf" / "metadata")
    path = f"{DEVICE_CLASS}/demo/mlp/1.0.0/manifest.json"
    info = client.target_info(path)
    assert info is not None
    assignment = AssignmentSpec(revision=1, model_namespace="demo", model_name="mlp", version="1.0.0",
                                action="install", target_paths=(path,), bundle_sha256=info.hashes["sha256"],
                                bundle_length=info.length)  # fmt: skip
    updater = Updater(state, DEVICE_CLASS, ModelRuntime(), lambda: client)
    assert updater.recover() == []
    result = updater.apply(assignment)
    assert (result.outcome, result.reason) == ("succeeded", "Installed"), result.message
    return updater


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def planned(tmp_path: Path) -> Path:
    """A `partition plan --out` folder for a small MLP cut after its first Relu, and the model beside it."""
    (tmp_path / "model.onnx").write_bytes(serialize(wide_mlp(width=64)))
    out = tmp_path / "plan"
    code, output = cli("partition", "plan", str(tmp_path / "model.onnx"), "--device-class", str(JETSON),
                       "--runs", "1", "--cut", "a0", "--out", str(out))  # fmt: skip
    assert code == 0, output
    return out


def test_plan_publish_fetch_install_serves_the_whole_models_outputs(planned: Path, tmp_path: Path) -> None:
    keys, store = tmp_path / "keys", tmp_path / "store"
    assert cli("keys", "init", str(keys))[0] == 0
    code, output = publish(store, keys, "1.0.0", str(planned / "head.onnx"), str(planned / "tail.onnx"),
                           "--partition-plan", str(planned / "plan.json"))  # fmt: skip
    assert code == 0, output
    assert "self-test: 1 inputs, 1 outputs" in output

    fetched = tmp_path / "fetched"
    code, output = cli("fetch", "--store", f"file://{store}", "--trusted-root", str(keys / "root.json"),
                       "--model", "mlp", "--device-class", DEVICE_CLASS, "--namespace", "demo",
                       "--out", str(fetched), "--metadata-dir", str(tmp_path / "meta"))  # fmt: skip
    assert code == 0, output
    assert sorted(p.name for p in fetched.iterdir()) == ["head.onnx", "manifest.json", "tail.onnx"]
    for part in ("head.onnx", "tail.onnx"):
        assert (fetched / part).read_bytes() == (planned / part).read_bytes()
    manifest = parse_manifest((fetched / "manifest.json").read_bytes())
    assert manifest.partition_plan is not None
    plan = PartitionPlan.model_validate(manifest.partition_plan)
    plan_id = hashlib.sha256((planned / "plan.json").read_bytes()).hexdigest()
    assert plan.plan_id == plan_id  # the signed plan is the very plan `partition plan` wrote
    assert plan.outputs == ["y"]
    assert manifest.self_test is not None

    # A device installs the bundle through its Updater and serves it.
    updater = install(store, keys, tmp_path / "device")
    [status] = updater.runtime.status("demo", "mlp")
    assert status.partition_plan_id == plan_id
    assert [o.name for o in status.outputs] == ["y"]
    # TensorRT is not here: the tail falls back to the CPU, and the status says so.
    assert status.execution_providers == ("CPUExecutionProvider", "CPUExecutionProvider")

    whole = wide_mlp(width=64)
    rng = np.random.default_rng(7)
    for _ in range(5):
        feed = {"x": rng.normal(0, 1, (1, 64)).astype(np.float32)}
        prediction = updater.runtime.predict("mlp", feed, namespace="demo")
        [(name, got)] = prediction.outputs
        (want,) = run(session(whole, optimization=VERIFY_OPTIMIZATION), ["y"], feed)
        assert name == "y"
        assert (got.dtype, got.shape, got.tobytes()) == (want.dtype, want.shape, want.tobytes())
    updater.runtime.unload("demo", "mlp")


def test_publish_refuses_a_plan_that_does_not_fit(planned: Path, tmp_path: Path) -> None:
    keys, store = tmp_path / "keys", tmp_path / "store"
    assert cli("keys", "init", str(keys))[0] == 0
    head, tail, plan = (str(planned / n) for n in ("head.onnx", "tail.onnx", "plan.json"))
    model = tmp_path / "model.onnx"

    code, output = publish(store, keys, "1.0.0", head, tail)
    assert code == 1
    assert "need --partition-plan" in output
    code, output = publish(store, keys, "1.0.0", str(model), "--partition-plan", plan)
    assert code == 1
    assert "--partition-plan goes with head.onnx and tail.onnx" in output

    # A plan cut elsewhere: its cut tensor is not the head's output.
    document = json.loads((planned / "plan.json").read_bytes())
    moved = [{**c, "tensors": ["h1"]} if c["cutIndex"] == document["chosenCut"] else c for c in document["candidates"]]
    wrong = tmp_path / "wrong-plan.json"
    wrong.write_text(json.dumps({**document, "candidates": moved}), encoding="utf-8")
    code, output = publish(store, keys, "1.0.0", head, tail, "--partition-plan", str(wrong))
    assert code == 1
    assert "is not an output of the head" in output

    no_split = tmp_path / "no-split.json"
    no_split.write_text(json.dumps({**document, "chosenCut": None}), encoding="utf-8")
    code, output = publish(store, keys, "1.0.0", head, tail, "--partition-plan", str(no_split))
    assert code == 1
    assert "chooses no split" in output

    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"apiVersion": "nope"}', encoding="utf-8")
    code, output = publish(store, keys, "1.0.0", head, tail, "--partition-plan", str(garbage))
    assert code == 1
    assert "not an edgefleet partition plan" in output
    assert not (store / "tuf" / "targets").exists() or not any((store / "tuf" / "targets").rglob("*.eft"))


def test_a_plan_that_splits_an_operator_installs_and_serves_the_whole_models_outputs(tmp_path: Path) -> None:
    """The planner's fission candidate (the hidden MatMul in two parts) through publish, install and serving."""
    whole = wide_mlp(width=256)
    inputs = example_inputs(whole, batch=16)
    planned = plan_partition(whole, load_device_class(JETSON), policy="throughput", inputs=inputs, runs=2, warmup=1)
    fissioned = next(c for c in planned.candidates if c.fission is not None and c.fission.output == "h1")
    assert fissioned.fission is not None
    # Deploy that candidate whatever the timings on this machine said.
    plan = planned.model_copy(update={"chosen_cut": fissioned.cut_index, "chosen_fission": fissioned.fission.output})
    split = split_for(whole, plan)
    verify_split(whole, split, inputs)
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "head.onnx").write_bytes(serialize(split.head))
    (parts / "tail.onnx").write_bytes(serialize(split.tail))
    (parts / "plan.json").write_bytes(plan.canonical_json())

    keys, store = tmp_path / "keys", tmp_path / "store"
    assert cli("keys", "init", str(keys))[0] == 0
    code, output = publish(store, keys, "1.0.0", str(parts / "head.onnx"), str(parts / "tail.onnx"),
                           "--partition-plan", str(parts / "plan.json"))  # fmt: skip
    assert code == 0, output

    updater = install(store, keys, tmp_path / "device")
    [status] = updater.runtime.status("demo", "mlp")
    assert status.partition_plan_id == plan.plan_id
    rng = np.random.default_rng(3)
    for _ in range(5):
        feed = {"x": rng.normal(0, 1, (4, 64)).astype(np.float32)}
        [(name, got)] = updater.runtime.predict("mlp", feed, namespace="demo").outputs
        (want,) = run(session(whole, optimization=VERIFY_OPTIMIZATION), ["y"], feed)
        assert name == "y"
        assert (got.dtype, got.shape, got.tobytes()) == (want.dtype, want.shape, want.tobytes())
    updater.runtime.unload("demo", "mlp")
