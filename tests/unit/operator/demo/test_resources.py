"""The demo's resource files (examples/demo) and their copy into a run's folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from edgefleet_core.resources.loading import load_resources, parse_resource
from edgefleet_operator.demo.errors import DemoSetupError
from edgefleet_operator.demo.resources import default_source, prepare

ROOT = Path(__file__).resolve().parents[4]
SOURCE = ROOT / "examples" / "demo"


def test_the_package_finds_the_repository_resources() -> None:
    assert default_source() == SOURCE
    assert sorted(p.name for p in SOURCE.iterdir()) == [
        "deviceclass-edge-cpu.yaml",
        "deviceclass-edge-npu.yaml",
        "edgemodel-digits.yaml",
    ]


def test_every_demo_file_is_a_valid_resource() -> None:
    # Raises, naming the field, on anything the CRDs or the models refuse.
    kinds = sorted(r.kind for r in load_resources(sorted(SOURCE.glob("*.yaml"))))
    assert kinds == ["DeviceClass", "DeviceClass", "EdgeModel"]


def test_the_two_classes_differ_in_hardware_and_only_one_can_be_partitioned() -> None:
    cpu = yaml.safe_load((SOURCE / "deviceclass-edge-cpu.yaml").read_text())
    npu = yaml.safe_load((SOURCE / "deviceclass-edge-npu.yaml").read_text())
    assert "accelerator" not in cpu["spec"]
    assert npu["spec"]["accelerator"]["link"]["bandwidthMBps"] > 0
    assert cpu["spec"]["selector"] != npu["spec"]["selector"]
    model = yaml.safe_load((SOURCE / "edgemodel-digits.yaml").read_text())
    assert model["spec"]["partition"] == {"policy": "manual", "objective": "throughput", "cut": ["relu.1"]}
    assert model["spec"]["targets"]["deviceClasses"] == ["edge-cpu", "edge-npu"]


def test_prepare_copies_the_sources_and_names_them_relative_to_the_copy(tmp_path: Path) -> None:
    resources = prepare(SOURCE, tmp_path / "resources")
    assert [c.name for c in resources.classes] == ["edge-cpu", "edge-npu"]
    assert resources.classes[1].labels == {"edgefleet.io/hardware": "edge-npu"}
    assert (resources.namespace, resources.model_name) == ("demo", "digits")
    written = yaml.safe_load(resources.edge_model_path.read_text())
    assert written == resources.edge_model
    parse_resource(written)  # the copy is still a valid EdgeModel
    spec = written["spec"]
    assert spec["source"]["uri"] == "file://./models/digits-small-cnn.onnx"
    assert resources.model_path == tmp_path / "resources" / "models" / "digits-small-cnn.onnx"
    # The pinned digests still hold for the copies (the control plane checks them).
    assert hashlib.sha256(resources.model_path.read_bytes()).hexdigest() == spec["source"]["sha256"]
    data = spec["accuracy"]["evaluationData"]
    assert hashlib.sha256(resources.data_path.read_bytes()).hexdigest() == data["sha256"]
    assert {p.name for p in (tmp_path / "resources").glob("*.yaml")} == {p.name for p in SOURCE.glob("*.yaml")}


def test_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DemoSetupError, match="run `edgefleet demo` from a checkout"):
        prepare(tmp_path / "nowhere", tmp_path / "out")


def test_a_folder_without_two_classes_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "demo"
    source.mkdir()
    (source / "edgemodel-digits.yaml").write_bytes((SOURCE / "edgemodel-digits.yaml").read_bytes())
    (tmp_path / "models").mkdir()
    for name in ("digits-small-cnn.onnx", "digits-small-cnn-data.npz"):
        (tmp_path / "models" / name).write_bytes((ROOT / "examples" / "models" / name).read_bytes())
    with pytest.raises(DemoSetupError, match="at least two DeviceClasses"):
        prepare(source, tmp_path / "out")
