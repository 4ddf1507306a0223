"""The Argo CD health check (docs/gitops/argocd-health.lua) in a Lua 5.1 interpreter, as Argo CD runs it.

Argo CD runs health checks with gopher-lua (Lua 5.1) with only the base, package, table and a
"safe" os library opened (argo-cd ``util/lua/lua.go``, ``runLua``), the object as the global ``obj``;
the chunk returns ``hs``. Here: lupa's Lua 5.1 with the libraries Argo CD does not open removed.

Inputs: docs/gitops/testdata (Argo CD's convention, expectations in health_test.yaml), which must
still be what the reconciler writes; the same objects freshly produced by the reconciler; and
hand-written malformed objects (edge_cases.yaml).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

from tests.unit.gitops.conftest import DOCS

HERE = Path(__file__).resolve().parent
SCRIPT = DOCS / "argocd-health.lua"
ARGO_HEALTH_CODES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
NOT_OPENED_BY_ARGO_CD = ("io", "string", "math", "debug", "coroutine", "os")
"""Libraries Argo CD's VM does not open (its os is a safe subset the check does not need)."""


def health(obj: Any) -> tuple[str, str]:
    """(status, message) of ``obj`` by the health check, run as Argo CD runs it."""
    runtime = lua51.LuaRuntime()
    lua_globals = runtime.globals()
    for name in NOT_OPENED_BY_ARGO_CD:
        lua_globals[name] = None
    lua_globals.obj = runtime.table_from(obj, recursive=True) if isinstance(obj, dict | list) else obj
    hs = runtime.execute(SCRIPT.read_text(encoding="utf-8"))
    status, message = hs["status"], hs["message"]
    assert status in ARGO_HEALTH_CODES, status
    assert isinstance(message, str)
    assert message, f"a {status} health needs a message"
    return status, message


def _health_tests() -> list[dict[str, Any]]:
    document = yaml.safe_load((DOCS / "health_test.yaml").read_text(encoding="utf-8"))
    tests: list[dict[str, Any]] = document["tests"]
    return tests


def _load(input_path: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DOCS / input_path).read_text(encoding="utf-8"))
    return loaded


# ------------------------------------------------------------------------------ Argo CD's testdata


@pytest.mark.parametrize("case", _health_tests(), ids=lambda case: Path(case["inputPath"]).stem)
def test_health_of_each_sample(case: dict[str, Any]) -> None:
    expected = case["healthStatus"]
    assert health(_load(case["inputPath"])) == (expected["status"], expected["message"])


def test_every_sample_has_an_expectation_named_after_it() -> None:
    listed = {Path(case["inputPath"]).name for case in _health_tests()}
    assert listed == {p.name for p in (DOCS / "testdata").glob("*.yaml")}
    for case in _health_tests():
        # Argo CD's naming: the expected health first (healthy_..., progressing_..., degraded_...).
        assert Path(case["inputPath"]).stem.split("_")[0] == case["healthStatus"]["status"].lower()


def _health_projection(obj: dict[str, Any]) -> dict[str, Any]:
    """What any health check reads: generations, deletion, pause, phase, and each condition's verdict."""
    status = obj.get("status") or {}
    return {
        "generation": obj["metadata"].get("generation"),
        "deletionTimestamp": obj["metadata"].get("deletionTimestamp"),
        "paused": obj["spec"].get("paused"),
        "observedGeneration": status.get("observedGeneration"),
        "rolloutPhase": status.get("rolloutPhase"),
        "conditions": [
            (c["type"], c["status"], c["reason"], c.get("observedGeneration")) for c in status.get("conditions", [])
        ],
    }


def test_the_samples_are_what_the_reconciler_writes(samples: dict[str, dict[str, Any]]) -> None:
    # After a change of the status code this fails: rewrite the samples (see tests/unit/gitops/samples.py).
    for case in _health_tests():
        name = Path(case["inputPath"]).stem
        assert _health_projection(_load(case["inputPath"])) == _health_projection(samples[name]), name


@pytest.mark.parametrize("case", _health_tests(), ids=lambda case: Path(case["inputPath"]).stem)
def test_health_of_what_the_reconciler_writes_now(samples: dict[str, dict[str, Any]], case: dict[str, Any]) -> None:
    status, _ = health(samples[Path(case["inputPath"]).stem])
    assert status == case["healthStatus"]["status"]


# ------------------------------------------------------------------------------ malformed objects


def _edge_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = yaml.safe_load((HERE / "edge_cases.yaml").read_text(encoding="utf-8"))
    return cases


@pytest.mark.parametrize("case", _edge_cases(), ids=lambda case: str(case["name"]))
def test_malformed_objects_never_raise(case: dict[str, Any]) -> None:
    status, _ = health(case["object"])
    assert status == case["expected"]


def test_the_check_survives_obj_that_is_not_a_table() -> None:
    assert health(None)[0] == "Progressing"
    assert health("EdgeModel")[0] == "Progressing"


def test_the_harness_catches_a_lua_error() -> None:
    # The check relies on Lua raising on misuse; a harness that swallowed errors would prove nothing.
    runtime = lua51.LuaRuntime()
    with pytest.raises(lua51.LuaError):
        runtime.execute("local t = nil; return t.status")
    runtime.globals().string = None
    with pytest.raises(lua51.LuaError):
        runtime.execute("return string.format('%d', 1)")


# ------------------------------------------------------------------------------ installing it


def test_argocd_cm_carries_the_same_check() -> None:
    config_map = yaml.safe_load((DOCS / "argocd-cm.yaml").read_text(encoding="utf-8"))
    assert (config_map["apiVersion"], config_map["kind"], config_map["metadata"]["name"]) == (
        "v1",
        "ConfigMap",
        "argocd-cm",
    )
    # Argo CD's key for a health customization: resource.customizations.health.<group>_<kind>.
    assert config_map["data"] == {
        "resource.customizations.health.edgefleet.io_EdgeModel": SCRIPT.read_text(encoding="utf-8")
    }
