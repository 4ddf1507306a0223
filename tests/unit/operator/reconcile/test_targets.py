"""Which DeviceClasses an EdgeModel targets: names, selectors, both, and the errors that name the field."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from edgefleet_core.resources.edge_model import Targets
from edgefleet_operator.reconcile import SpecError, resolve_targets, targets_class
from tests.unit.operator.reconcile.conftest import device_class

CLASSES = [
    device_class("zeta-gpu", labels={"accelerated": "yes", "tier": "edge"}, accelerator=True),
    device_class("alpha-cpu", labels={"tier": "edge"}),
    device_class("mid-npu", labels={"accelerated": "yes"}, accelerator=True),
    device_class("lab-cpu", labels={}),
]


def _targets(body: Mapping[str, object]) -> Targets:
    return Targets.model_validate(body)


def _names(body: Mapping[str, object]) -> list[str]:
    return [c.metadata.name for c in resolve_targets(_targets(body), CLASSES)]


def test_names_resolve_sorted_by_name() -> None:
    assert _names({"deviceClasses": ["zeta-gpu", "alpha-cpu"]}) == ["alpha-cpu", "zeta-gpu"]


def test_selector_matches_labels() -> None:
    assert _names({"selector": {"matchLabels": {"accelerated": "yes"}}}) == ["mid-npu", "zeta-gpu"]
    expressions = {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["edge"]}]}
    assert _names({"selector": expressions}) == ["alpha-cpu", "zeta-gpu"]
    assert _names({"selector": {"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}}) == [
        "lab-cpu",
        "mid-npu",
    ]


def test_names_and_selector_are_a_union_without_duplicates() -> None:
    body = {"deviceClasses": ["zeta-gpu", "lab-cpu"], "selector": {"matchLabels": {"accelerated": "yes"}}}
    assert _names(body) == ["lab-cpu", "mid-npu", "zeta-gpu"]


def test_unknown_name_names_its_index() -> None:
    with pytest.raises(SpecError) as caught:
        _names({"deviceClasses": ["alpha-cpu", "beta-cpu"], "selector": {"matchLabels": {"accelerated": "yes"}}})
    assert caught.value.field == "spec.targets.deviceClasses[1]"
    assert caught.value.message == "DeviceClass 'beta-cpu' does not exist"
    assert str(caught.value) == "spec.targets.deviceClasses[1]: DeviceClass 'beta-cpu' does not exist"


def test_selector_matching_nothing_is_a_spec_error() -> None:
    with pytest.raises(SpecError) as caught:
        _names({"selector": {"matchLabels": {"accelerated": "no"}}})
    assert caught.value.field == "spec.targets"
    assert "alpha-cpu" in caught.value.message  # says which classes there are


def test_no_classes_at_all() -> None:
    with pytest.raises(SpecError) as caught:
        resolve_targets(_targets({"selector": {"matchLabels": {"a": "b"}}}), [])
    assert caught.value.field == "spec.targets"
    with pytest.raises(SpecError) as named:
        resolve_targets(_targets({"deviceClasses": ["alpha-cpu"]}), [])
    assert named.value.field == "spec.targets.deviceClasses[0]"


def test_targets_class_by_name_or_labels() -> None:
    by_name = _targets({"deviceClasses": ["lab-cpu"]})
    by_label = _targets({"selector": {"matchLabels": {"accelerated": "yes"}}})
    lab, gpu = CLASSES[3], CLASSES[0]
    assert targets_class(by_name, lab)
    assert not targets_class(by_name, gpu)
    assert targets_class(by_label, gpu)
    assert not targets_class(by_label, lab)
    # A relabelled class leaves (or joins) the selection: that is what re-planning checks.
    relabelled = device_class("zeta-gpu", labels={"accelerated": "no"}, accelerator=True)
    assert not targets_class(by_label, relabelled)
