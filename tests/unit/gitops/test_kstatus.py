"""What Flux (kstatus) reads from the EdgeModel status at each phase, without custom code.

:mod:`tests.unit.gitops.kstatus` is kstatus's computation ported from its Go source; its own rules
are tested first, on hand-made objects, so that a wrong port cannot pass the phase tests.
"""

from __future__ import annotations

from typing import Any

import celpy
import pytest
import yaml
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

from tests.unit.gitops.conftest import EXAMPLES
from tests.unit.gitops.kstatus import KstatusError, compute


def _edge_model(*conditions: tuple[str, str], generation: int = 3, observed: int | None = 3) -> dict[str, Any]:
    status: dict[str, Any] = {
        "conditions": [{"type": t, "status": s, "reason": "R", "message": t} for t, s in conditions]
    }
    if observed is not None:
        status["observedGeneration"] = observed
    return {
        "apiVersion": "edgefleet.io/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": "m", "generation": generation},
        "status": status,
    }


# ------------------------------------------------------------------------------ the port itself


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        # checkGenericProperties: deletion first, whatever the conditions say.
        (
            {**_edge_model(("Stalled", "True")), "metadata": {"deletionTimestamp": "2026-11-01T00:00:00Z"}},
            "Terminating",
        ),
        # checkGeneration: a mismatch wins over Ready; an absent observedGeneration skips the check.
        (_edge_model(("Ready", "True"), observed=2), "InProgress"),
        (_edge_model(("Ready", "True"), observed=None), "Current"),
        # The standard conditions, in list order.
        (_edge_model(("Reconciling", "True")), "InProgress"),
        (_edge_model(("Stalled", "True")), "Failed"),
        (_edge_model(("Reconciling", "True"), ("Stalled", "True")), "InProgress"),
        (_edge_model(("Stalled", "True"), ("Reconciling", "True")), "Failed"),
        # checkReadyCondition when no standard condition decides.
        (_edge_model(("Ready", "True"), ("Reconciling", "False"), ("Stalled", "False")), "Current"),
        (_edge_model(("Ready", "False"), ("Reconciling", "False")), "InProgress"),
        (_edge_model(("Ready", "Unknown")), "InProgress"),
        # No known condition at all: Current (kstatus's assumption for unknown resources).
        (_edge_model(("Optimized", "False")), "Current"),
        ({"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel", "metadata": {"generation": 1}}, "Current"),
    ],
)
def test_the_port_follows_kstatus_rules(obj: dict[str, Any], expected: str) -> None:
    assert compute(obj).status == expected


@pytest.mark.parametrize(
    "obj",
    [
        {"kind": "EdgeModel", "metadata": {"generation": "2"}, "status": {"observedGeneration": 2}},
        {"kind": "EdgeModel", "metadata": {"generation": 2}, "status": "ready"},
        {"kind": "EdgeModel", "metadata": {}, "status": {"conditions": [{"type": "Ready", "status": True}]}},
        {"kind": "EdgeModel", "metadata": {"deletionTimestamp": 5}},
    ],
)
def test_fields_of_the_wrong_type_are_errors_as_in_kstatus(obj: dict[str, Any]) -> None:
    with pytest.raises(KstatusError):
        compute(obj)


def test_built_in_kinds_are_not_ported() -> None:
    with pytest.raises(NotImplementedError):
        compute({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {}})


# ------------------------------------------------------------------------------ the phases


KSTATUS: dict[str, str] = {
    # kstatus reads an object without status or conditions as Current: nothing in the status can
    # change that (the operator writes it on its first reconcile); Flux's healthCheckExprs in
    # examples/gitops/flux closes the gap, see test_flux_health_check_expressions below.
    "progressing_no_status": "Current",
    "progressing_building": "InProgress",
    "progressing_rolling_out": "InProgress",
    "progressing_no_devices": "InProgress",
    "progressing_new_generation": "InProgress",
    "progressing_retrying": "InProgress",
    "progressing_deleting": "Terminating",
    # Paused is not done: a rollout held by spec.paused keeps Flux waiting, as a paused Deployment does.
    "suspended_paused": "InProgress",
    "healthy_rolled_out": "Current",
    # The user must act: a spec error, a rollout rolled back or failed. Failed, never Current.
    "degraded_invalid_spec": "Failed",
    "degraded_rolled_back": "Failed",
    "degraded_rollout_failed": "Failed",
}


def test_every_phase_has_an_expectation(samples: dict[str, dict[str, Any]]) -> None:
    assert set(KSTATUS) == set(samples)


@pytest.mark.parametrize("phase", sorted(KSTATUS))
def test_kstatus_reads_each_phase_right(samples: dict[str, dict[str, Any]], phase: str) -> None:
    result = compute(samples[phase])
    assert result.status == KSTATUS[phase], result
    if result.status in ("InProgress", "Failed") and phase != "progressing_new_generation":
        assert result.message, "Flux shows this message: it must say why"


def test_a_stall_says_what_to_fix(samples: dict[str, dict[str, Any]]) -> None:
    assert "spec.targets.deviceClasses[1]" in compute(samples["degraded_invalid_spec"]).message
    rolled_back = compute(samples["degraded_rolled_back"])
    assert rolled_back.reason == "RolledBack"
    assert "rolled back 2 device(s) to 1" in rolled_back.message


# ------------------------------------------------------------------------------ Flux's CEL checks


def _flux_exprs() -> dict[str, str]:
    documents = list(yaml.safe_load_all((EXAMPLES / "flux" / "kustomizations.yaml").read_text(encoding="utf-8")))
    (fleet,) = [d for d in documents if d["spec"].get("healthCheckExprs")]
    (check,) = fleet["spec"]["healthCheckExprs"]
    assert (check["apiVersion"], check["kind"]) == ("edgefleet.io/v1alpha1", "EdgeModel")
    return {key: check[key] for key in ("inProgress", "failed", "current") if key in check}


def _flux_cel_status(obj: dict[str, Any], exprs: dict[str, str]) -> str:
    """Flux RFC-0009's evaluation: generation first, then inProgress, failed, current; none → InProgress.

    An expression that cannot be evaluated (a field not there yet) leaves the resource not ready
    ("Unknown"): Flux keeps waiting, up to the Kustomization's timeout.
    """
    generation = obj.get("metadata", {}).get("generation")
    observed = (obj.get("status") or {}).get("observedGeneration")
    if observed is not None and observed != generation:
        return "InProgress"
    env = celpy.Environment()
    activation = {key: json_to_cel(value) for key, value in obj.items()}
    for key, verdict in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
        if key not in exprs:
            continue
        try:
            result = env.program(env.compile(exprs[key])).evaluate(activation)
        except CELEvalError:
            return "Unknown"
        if bool(result):
            return verdict
    return "InProgress"


# Flux waits on what it applied, never on an object being deleted.
@pytest.mark.parametrize("phase", sorted(set(KSTATUS) - {"progressing_deleting"}))
def test_flux_health_check_expressions(samples: dict[str, dict[str, Any]], phase: str) -> None:
    obj = samples[phase]
    verdict = _flux_cel_status(obj, _flux_exprs())
    if phase == "progressing_no_status":
        assert verdict == "Unknown"  # not Current: Flux waits for the operator's first status
    else:
        assert verdict == KSTATUS[phase]
