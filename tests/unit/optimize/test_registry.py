"""The pass registry, the CRD's pass enum, the options models and the docs say the same thing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgefleet_core.optimize.data import Dataset
from edgefleet_core.optimize.graph import parameter_count
from edgefleet_core.optimize.passes.base import PassContext, TrainingRequest
from edgefleet_core.optimize.passes.graph_optimization import GraphOptimizationPass
from edgefleet_core.optimize.passes.registry import PASSES, create_pass
from edgefleet_core.resources import custom_resource_definitions
from edgefleet_core.resources.recipe import OPTIONS_BY_PASS, GraphOptimizationOptions, PassSpec
from edgefleet_core.training import load_trainer
from tests.support.tiny_models import tiny_cnn, tiny_inputs

DOCS = Path(__file__).resolve().parents[3] / "docs" / "optimization.md"


def _crd_pass_enum() -> list[str]:
    spec = custom_resource_definitions()["DeviceClass"].schema["properties"]["spec"]
    items = spec["properties"]["defaultRecipe"]["properties"]["passes"]["items"]
    return list(items["properties"]["type"]["enum"])


def _doc_rows() -> dict[str, list[str]]:
    rows = {}
    in_table = False
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        if line.startswith("| pass |"):
            in_table = True
            continue
        if in_table and line.startswith("|---"):
            continue
        if in_table and line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
        elif in_table:
            break
    return rows


def test_registry_matches_the_crd_enum_and_the_options_models() -> None:
    assert list(PASSES) == _crd_pass_enum()
    assert set(PASSES) == set(OPTIONS_BY_PASS)
    for name, cls in PASSES.items():
        assert cls.pass_type == name
        assert cls.options_type is OPTIONS_BY_PASS[name]
        assert cls.capability.summary


def test_every_pass_is_documented_with_its_capabilities() -> None:
    rows = _doc_rows()
    assert set(rows) == set(PASSES)
    yes_no = {True: "yes", False: "no"}
    for name, cls in PASSES.items():
        _, _, precision, needs_data, needs_trainer, exact = rows[name]
        cap = cls.capability
        assert precision == (cap.precision or "-"), name
        assert needs_data == yes_no[cap.needs_data], name
        assert needs_trainer == yes_no[cap.needs_trainer], name
        assert exact == yes_no[cap.exact], name


def test_create_pass_defaults_absent_options() -> None:
    created = create_pass(PassSpec.model_validate({"type": "GraphOptimization"}))
    assert isinstance(created, GraphOptimizationPass)
    assert created.options == GraphOptimizationOptions()


def test_training_works_after_graph_optimization_fused_the_model() -> None:
    # Recipes may fine-tune after GraphOptimization; the trainer must see through CPU fusions.
    trainer = load_trainer()
    assert trainer is not None
    source = tiny_cnn()
    x = tiny_inputs(32)
    ctx = PassContext("CPUExecutionProvider", frozenset({"fp32"}), source)
    fused = GraphOptimizationPass(GraphOptimizationOptions()).apply(source, ctx).model
    assert any(n.op_type == "FusedConv" for n in fused.graph.node)
    data = Dataset({"input": x}, np.arange(32) % 10)
    trained = trainer.train(fused, data, TrainingRequest(epochs=1, learning_rate=1e-3, batch_size=16, teacher=source))
    assert parameter_count(trained) > 0
    assert not any(n.op_type == "FusedConv" for n in trained.graph.node)
