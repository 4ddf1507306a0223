"""The build key changes with every build input and with nothing else."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from edgefleet_core.resources.device_class import DeviceClass
from edgefleet_core.resources.edge_model import EdgeModel
from edgefleet_operator.reconcile import (
    build_inputs,
    build_key,
    effective_partition,
    effective_recipe,
    pinned_data_sha256,
    recipe_field,
)
from tests.unit.operator.reconcile.conftest import CPU, NPU, StagedFile, device_class, edge_model

SOURCE = StagedFile(Path("/models/model.onnx"), "file:///models/model.onnx", "a" * 64)
DATA = {"uri": "s3://bucket/eval.npz", "sha256": "b" * 64}
CPU_CLASS = device_class(CPU)
NPU_CLASS = device_class(NPU, accelerator=True)


def _model(**spec: Any) -> EdgeModel:
    return edge_model(SOURCE, **spec)


def _key(model: EdgeModel, cls: DeviceClass = CPU_CLASS, data: str | None = None, seed: int = 0) -> str:
    return build_key(model, cls, data_sha256=data, seed=seed)


BASE = _model()


def test_key_is_full_sha256_hex_and_deterministic() -> None:
    key = _key(BASE)
    assert re.fullmatch(r"[a-f0-9]{64}", key)
    assert _key(_model()) == key
    assert build_inputs(BASE, CPU_CLASS, data_sha256=None)["sourceSha256"] == "a" * 64


@pytest.mark.parametrize(
    ("label", "changed"),
    [
        ("source sha256", edge_model(StagedFile(SOURCE.path, SOURCE.uri, "c" * 64))),
        ("task", _model(task="regression")),
        ("model recipe", _model(optimization={"recipe": {"passes": [{"type": "FP16"}]}})),
        (
            "override for this class",
            _model(
                optimization={
                    "recipe": {"passes": [{"type": "GraphOptimization"}]},
                    "overrides": [{"deviceClass": CPU, "recipe": {"passes": [{"type": "FP16"}]}}],
                }
            ),
        ),
        (
            "objective",
            _model(optimization={"recipe": {"passes": [{"type": "GraphOptimization"}]}, "objective": "size"}),
        ),
        ("max drop", _model(accuracy={"maxDrop": 0.05})),
        ("metric", _model(accuracy={"metric": "top1Agreement"})),
        ("samples", _model(accuracy={"evaluationData": {**DATA, "samples": 10}})),
        (
            "options",
            _model(
                optimization={
                    "recipe": {"passes": [{"type": "GraphOptimization", "graphOptimization": {"level": "basic"}}]}
                }
            ),
        ),
    ],
)
def test_each_build_input_changes_the_key(label: str, changed: EdgeModel) -> None:
    assert _key(changed) != _key(BASE), label


def test_data_class_and_seed_change_the_key() -> None:
    assert _key(BASE, data="d" * 64) != _key(BASE)
    assert _key(BASE, data="d" * 64) != _key(BASE, data="e" * 64)
    assert _key(BASE, seed=1) != _key(BASE)
    assert _key(BASE, device_class(CPU, memory="2Gi")) != _key(BASE)
    assert _key(BASE, device_class(CPU, default_recipe={"passes": [{"type": "FP16"}]})) != _key(BASE)
    assert _key(BASE, NPU_CLASS) != _key(BASE)


@pytest.mark.parametrize(
    ("label", "same"),
    [
        ("rollout", _model(rollout={"waves": [{"percent": 100}], "autoRollback": False})),
        ("paused", _model(paused=True)),
        ("artifact policy", _model(artifactPolicy="Delete")),
        ("labels and generation", edge_model(SOURCE, labels={"team": "vision"}, generation=7)),
        ("source uri", edge_model(StagedFile(SOURCE.path, "s3://bucket/moved/model.onnx", SOURCE.sha256))),
        (
            "spelled-out default",
            _model(
                optimization={
                    "recipe": {"passes": [{"type": "GraphOptimization", "graphOptimization": {"level": "extended"}}]}
                }
            ),
        ),
        (
            "override for another class",
            _model(
                optimization={
                    "recipe": {"passes": [{"type": "GraphOptimization"}]},
                    "overrides": [{"deviceClass": NPU, "recipe": {"passes": [{"type": "FP16"}]}}],
                }
            ),
        ),
        ("partition policy on a class without accelerator", _model(partition={"policy": "off"})),
    ],
)
def test_what_is_not_a_build_input_keeps_the_key(label: str, same: EdgeModel) -> None:
    assert _key(same) == _key(BASE), label


def test_evaluation_data_counts_by_digest_not_uri() -> None:
    here = _model(accuracy={"evaluationData": DATA})
    moved = _model(accuracy={"evaluationData": {**DATA, "uri": "file:///data/eval.npz"}})
    assert _key(here, data="b" * 64) == _key(moved, data="b" * 64)


def test_class_description_and_labels_are_not_build_inputs() -> None:
    described = device_class(CPU, description="fanless boxes", labels={"site": "plant-3"})
    assert _key(BASE, described) == _key(BASE)


def test_partition_counts_only_where_it_applies() -> None:
    auto = _model(partition={"policy": "auto"})
    throughput = _model(partition={"policy": "auto", "objective": "throughput"})
    manual = _model(partition={"policy": "manual", "cut": ["g1"]})
    off = _model(partition={"policy": "off"})
    assert _key(auto, NPU_CLASS) == _key(BASE, NPU_CLASS)  # auto is the default
    assert len({_key(m, NPU_CLASS) for m in (auto, throughput, manual, off)}) == 4
    assert len({_key(m, CPU_CLASS) for m in (auto, throughput, manual, off)}) == 1


def test_effective_partition() -> None:
    no_link = device_class(NPU, accelerator=True, link=False)
    assert effective_partition(BASE.spec, CPU_CLASS) is None
    assert effective_partition(BASE.spec, NPU_CLASS) is not None
    assert effective_partition(_model(partition={"policy": "off"}).spec, NPU_CLASS) is None
    assert effective_partition(BASE.spec, no_link) is None  # auto needs a link to price cuts
    manual = _model(partition={"policy": "manual", "cut": ["g1"]}).spec
    assert effective_partition(manual, no_link) is not None  # reported by the build, not ignored


def test_effective_recipe_and_its_field() -> None:
    override = {"deviceClass": NPU, "recipe": {"passes": [{"type": "FP16"}]}}
    model = _model(optimization={"recipe": {"passes": [{"type": "GraphOptimization"}]}, "overrides": [override]})
    fp16 = effective_recipe(model.spec, NPU)
    assert fp16 is not None
    assert [p.type for p in fp16.passes] == ["FP16"]
    assert recipe_field(model.spec, NPU) == "spec.optimization.overrides[0].recipe"
    assert recipe_field(model.spec, CPU) == "spec.optimization.recipe"
    bare = _model(optimization={"objective": "size"})
    assert effective_recipe(bare.spec, CPU) is None
    assert recipe_field(bare.spec, CPU) is None


def test_pinned_data_sha256() -> None:
    assert pinned_data_sha256(BASE.spec) is None
    assert pinned_data_sha256(_model(accuracy={"evaluationData": DATA}).spec) == "b" * 64
